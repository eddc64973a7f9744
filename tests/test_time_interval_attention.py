"""Time-interval (TiSASRec) attention: the bucket function and the torch backend against the
float64 reference written from the formula, outputs and every gradient."""

import importlib

import pytest
import torch

import fastpe
from fastpe.ops import time_interval_attention
from fastpe.ops.relative_attention import personal_time_steps, time_interval_buckets
from fastpe.reference import time_interval_attention_materialized, time_interval_buckets_reference
from helpers import assert_matches_reference, make_masks, randn

NAMES = ["q", "k", "v", "rel_k", "rel_v", "pos_k", "pos_v"]
DAY = 86400


def tisas_inputs(b, h, L, dh, span=8, per_head=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(b, h, L, dh, gen=gen, dtype=torch.float64) for _ in range(3))
    table = (h, span + 1, dh) if per_head else (span + 1, dh)
    rk, rv = (randn(*table, gen=gen, dtype=torch.float64) for _ in range(2))
    pk, pv = (randn(h if per_head else 1, L, dh, gen=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, rk, rv, pk, pv


def random_times(b, L, seed=0, ties=True):
    """Unix seconds with gaps from minutes to months, some repeated (equal timestamps), in time order."""
    gen = torch.Generator().manual_seed(seed)
    gaps = (torch.rand(b, L, generator=gen, dtype=torch.float64) * 6).exp() * 600
    if ties:
        gaps = gaps.masked_fill(torch.rand(b, L, generator=gen) < 0.2, 0.0)
    return (1.6e9 + gaps.cumsum(dim=1)).round().long()


def op(backend, times, **kw):
    def run(q, k, v, rk, rv, pk, pv):
        return time_interval_attention(q, k, v, rk, rv, times, pos_k=pk, pos_v=pv, backend=backend, **kw)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,h,L,dh,per_head", [(2, 1, 1, 8, False), (3, 1, 13, 30, False), (2, 2, 50, 50, True),
                                               (2, 1, 37, 90, False)])
def test_torch_matches_reference(dtype, b, h, L, dh, per_head):
    inputs = tisas_inputs(b, h, L, dh, per_head=per_head, seed=L)
    masks = make_masks("padding+causal", b, h, L, L, seed=L)
    times = random_times(b, L, seed=L)
    assert_matches_reference(op("torch", times, **masks), op("reference", times, **masks), inputs, dtype, NAMES)


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "fully_padded", "bool_3d", "float_bias", "float_padding"])
@pytest.mark.parametrize("unit", ["user", DAY, "tensor"])
def test_torch_matches_reference_masks_and_units(kind, unit):
    b, h, L = 3, 2, 11
    inputs = tisas_inputs(b, h, L, 6, span=5, per_head=True)
    masks = make_masks(kind, b, h, L, L)
    times = random_times(b, L, seed=3)
    if unit == "tensor":
        unit = torch.tensor([60.0, 3600.0, 7.5])
    assert_matches_reference(op("torch", times, time_unit=unit, **masks), op("reference", times, time_unit=unit, **masks),
                             inputs, torch.float32, NAMES)


def test_hand_computed_buckets():
    # Valid times 18, 123, 99, 87 (+1.7e9): intervals from the first 0, 105, 81, 69; smallest
    # nonzero interval u = 12; tau = round(0, 8.75, 6.75, 5.75) = 0, 9, 7, 6; K = 6 clips 9 and 7.
    t = torch.tensor([[5, 66, 99, 18, 123, 99, 87]]) + 1_700_000_000
    kpm = torch.tensor([[True, True, False, False, False, False, False]])  # 5 and 66 are padding: not read
    # tau = 0, 0, 7, 0, 9, 7, 6: padding counts as the first time.
    expected = torch.tensor([[0, 0, 6, 0, 6, 6, 6],
                             [0, 0, 6, 0, 6, 6, 6],
                             [6, 6, 0, 6, 2, 0, 1],
                             [0, 0, 6, 0, 6, 6, 6],
                             [6, 6, 2, 6, 0, 2, 3],
                             [6, 6, 0, 6, 2, 0, 1],
                             [6, 6, 1, 6, 3, 1, 0]])
    assert torch.equal(time_interval_buckets_reference(t, None, kpm, 6)[0], expected)
    assert torch.equal(time_interval_buckets(personal_time_steps(t, None, kpm), 6)[0], expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float32])
@pytest.mark.parametrize("unit", [None, 1.0, 3600.0])
def test_bucket_function_matches_reference(dtype, unit):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        b, L = 4, 1 + seed * 7
        # Float32 times must be exact: small values there; int64/float64 take Unix seconds.
        base = 0 if dtype in (torch.int32, torch.float32) else 1_600_000_000
        t = (torch.randint(0, 10_000_000, (b, L), generator=gen) // torch.randint(1, 5000, (b, 1), generator=gen)
             * 97 + base).to(dtype)
        kpm = torch.arange(L)[None, :] < torch.randint(0, L + 1, (b, 1), generator=gen)
        units = None if unit is None else torch.full((b,), unit, dtype=torch.float64)
        for mask in (None, kpm):
            for span in (0, 3, 256):
                got = time_interval_buckets(personal_time_steps(t, units, mask), span)
                want = time_interval_buckets_reference(t, units, mask, span)
                assert torch.equal(got, want), (seed, span, mask is None)


def test_equal_timestamps_give_bucket_zero():
    t = torch.full((2, 6), 1_650_000_000)
    assert torch.equal(time_interval_buckets(personal_time_steps(t, None, None), 256), torch.zeros(2, 6, 6, dtype=torch.long))
    inputs = tisas_inputs(2, 1, 6, 4)
    assert_matches_reference(op("torch", t), op("reference", t), inputs, torch.float64, NAMES)


def test_gaps_beyond_the_span_are_clipped():
    # Gaps of 1, then 10^6 and 10^12 units: everything past the first pair lands in bucket K.
    t = torch.tensor([[0, 1, 10**6, 10**12 + 10**6]])
    buckets = time_interval_buckets(personal_time_steps(t, None, None), 256)
    assert buckets[0, 0, 1] == 1 and bool((buckets[0, :2, 2:] == 256).all()) and buckets[0, 2, 3] == 256
    inputs = tisas_inputs(1, 1, 4, 4, span=256)
    assert_matches_reference(op("torch", t), op("reference", t), inputs, torch.float64, NAMES)


def test_order_of_timestamps_does_not_matter():
    # Only |t_i - t_j| counts: permuting positions (bidirectional, no position tables) permutes the output,
    # and decreasing times give the buckets of the reversed increasing ones.
    b, h, L, dh = 2, 2, 9, 4
    q, k, v, rk, rv, _, _ = tisas_inputs(b, h, L, dh, span=20)
    t = random_times(b, L, seed=5)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    out = time_interval_attention(q, k, v, rk, rv, t, backend="torch")
    shuffled = time_interval_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], rk, rv, t[:, perm], backend="torch")
    torch.testing.assert_close(shuffled, out[:, :, perm])
    forward = time_interval_buckets(personal_time_steps(t, None, None), 20)
    backward = time_interval_buckets(personal_time_steps(t.flip(1), None, None), 20)
    assert torch.equal(backward, forward.flip(1, 2))


def test_padding_timestamps_are_never_read():
    b, h, L = 2, 1, 8
    inputs = tisas_inputs(b, h, L, 4)
    kpm = torch.arange(L)[None, :] < torch.tensor([[3], [0]])
    t = random_times(b, L).double()
    garbage = t.masked_fill(kpm, float("nan"))
    a = time_interval_attention(*inputs[:5], t, key_padding_mask=kpm, backend="torch")
    c = time_interval_attention(*inputs[:5], garbage, key_padding_mask=kpm, backend="torch")
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(ValueError, match="NaN or infinite times at non-padding positions"):
        time_interval_attention(*inputs[:5], garbage, backend="torch")


def test_fully_padded_rows_are_zero_with_finite_gradients():
    q, k, v, rk, rv, pk, pv = tisas_inputs(2, 2, 6, 4)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0] = True
    t = random_times(2, 6)
    for backend in ("reference", "torch"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, rk, rv, pk, pv)]
        out = time_interval_attention(*leaves[:5], t, pos_k=leaves[5], pos_v=leaves[6], key_padding_mask=kpm,
                                      is_causal=True, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        out.square().sum().backward()
        for leaf in leaves:
            assert torch.isfinite(leaf.grad).all()
        assert torch.equal(leaves[0].grad[0], torch.zeros_like(leaves[0].grad[0]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck(backend):
    q, k, v, rk, rv, pk, pv = tisas_inputs(2, 2, 5, 3, span=3, per_head=True)
    masks = make_masks("padding+causal", 2, 2, 5, 5)
    t = random_times(2, 5, seed=2)
    assert torch.autograd.gradcheck(op(backend, t, **masks), (q, k, v, rk, rv, pk, pv))


def test_dropout_matches_reference_for_one_seed():
    inputs = [x.detach() for x in tisas_inputs(2, 2, 7, 4)]
    t = random_times(2, 7)
    outs = []
    for backend in ("reference", "torch"):
        torch.manual_seed(3)
        outs.append(op(backend, t, dropout_p=0.3)(*inputs))
    torch.testing.assert_close(outs[0], outs[1])


def test_need_weights_and_materialized_baseline_agree():
    q, k, v, rk, rv, _, _ = (x.detach() for x in tisas_inputs(2, 1, 9, 4, span=4))
    t = random_times(2, 9)
    kpm = torch.arange(9)[None, :] < torch.tensor([[2], [0]])
    out, weights = time_interval_attention(q, k, v, rk, rv, t, key_padding_mask=kpm, is_causal=True, need_weights=True)
    assert weights.shape == (2, 1, 9, 9)
    torch.testing.assert_close(weights.sum(-1)[1], torch.ones(1, 9, dtype=torch.float64))
    buckets = time_interval_buckets_reference(t, None, kpm, 4)
    torch.testing.assert_close(time_interval_attention_materialized(q, k, v, rk[None], rv[None], buckets, kpm, True), out)


def test_cuda_backend_needs_cuda_tensors():
    # Both fused backends have kernels (tests/test_triton_time_interval.py, tests/test_cuda_time_interval.py);
    # the CUDA one refuses CPU tensors by name.
    inputs = [x.detach() for x in tisas_inputs(1, 1, 4, 4)][:5]
    with pytest.raises(fastpe.BackendUnavailableError, match="needs CUDA tensors"):
        time_interval_attention(*inputs, torch.arange(4)[None], backend="cuda")


def test_bad_inputs_are_named():
    q, k, v, rk, rv = [x.detach() for x in tisas_inputs(2, 1, 4, 4)][:5]
    t = torch.arange(8).view(2, 4)
    cases = [
        (dict(timestamps=t[:, :3]), ValueError, "timestamps: expected shape"),
        (dict(timestamps=t.bool()), TypeError, "timestamps: expected integer or floating"),
        (dict(time_unit=0.0), ValueError, "time_unit: every unit must be positive"),
        (dict(time_unit="days"), ValueError, "time_unit: expected 'user'"),
        (dict(time_unit=torch.ones(3)), ValueError, r"time_unit: expected a number or a \[B=2\]"),
        (dict(pos_k=torch.zeros(5, 4)), ValueError, "pos_k: expected shape"),
    ]
    for kwargs, error, message in cases:
        call = {"timestamps": t, **kwargs}
        with pytest.raises(error, match=message):
            time_interval_attention(q, k, v, rk, rv, call.pop("timestamps"), **call)
    with pytest.raises(ValueError, match="query and key lengths differ"):
        time_interval_attention(q, k[:, :, :3], v[:, :, :3], rk, rv, t)
    with pytest.raises(ValueError, match="rel_v: expected head size 4"):
        time_interval_attention(q, k, v, rk, rv[:, :3], t)


@pytest.mark.parametrize("shared", [False, True])
def test_bucketed_attention_with_given_ids_matches_reference(shared):
    from fastpe.ops import bucketed_attention

    b, h, L = 3, 2, 10
    q, k, v, rk, rv, _, _ = tisas_inputs(b, h, L, 5, span=6, per_head=True)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 7, (L, L) if shared else (b, L, L), generator=gen, dtype=torch.int32)
    masks = make_masks("padding+causal", b, h, L, L)

    def run(backend):
        return lambda q, k, v, rk, rv: bucketed_attention(q, k, v, rk, rv, ids, backend=backend, **masks)

    assert_matches_reference(run("torch"), run("reference"), (q, k, v, rk, rv), torch.float32, NAMES[:5])
    # The time-interval op is this op with its own ids.
    t = random_times(b, L)
    given = time_interval_buckets_reference(t, None, None, 6)
    torch.testing.assert_close(bucketed_attention(q, k, v, rk, rv, given), time_interval_attention(q, k, v, rk, rv, t))
    with pytest.raises(ValueError, match=r"buckets: ids must lie in \[0, 6\]"):
        bucketed_attention(q, k, v, rk, rv, ids + 1)
    with pytest.raises(TypeError, match="buckets: expected an integer tensor"):
        bucketed_attention(q, k, v, rk, rv, ids.float())
    with pytest.raises(fastpe.BackendUnavailableError, match="no fused kernels yet"):
        bucketed_attention(q, k, v, rk, rv, ids, backend="triton")


@pytest.mark.parametrize("per_head", [False, True])
def test_batch_chunks_and_float_mask_gradient_match_reference(monkeypatch, per_head):
    # Tiny chunks: every batch row is its own chunk, forward and backward.
    ops = importlib.import_module("fastpe.ops.relative_attention")  # the module, not the function of that name
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 1)
    b, h, L = 4, 2, 9
    inputs = tisas_inputs(b, h, L, 3, span=12, per_head=per_head)
    masks = make_masks("padding+causal", b, h, L, L)
    t = random_times(b, L, seed=6)
    gen = torch.Generator().manual_seed(8)
    for shape in ((b, 1, L, L), (1, h, L, L)):
        bias = randn(*shape, gen=gen, dtype=torch.float64)

        def run(backend, bias=bias):
            return lambda *x: time_interval_attention(*x[:5], t, pos_k=x[5], pos_v=x[6], attn_mask=x[7],
                                                      key_padding_mask=masks["key_padding_mask"], is_causal=True,
                                                      backend=backend)

        assert_matches_reference(run("torch"), run("reference"), (*inputs, bias), torch.float64, NAMES + ["attn_mask"])
