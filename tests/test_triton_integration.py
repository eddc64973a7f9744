"""The triton backend inside PyTorch: import isolation, custom ops (opcheck), torch.compile.

torch.compile sees each fused op as one ``torch.library`` custom op (``fastpe_triton_<hash>::*``)
with a fake implementation and registered autograd; on the CPU the ops run their kernels
under the Triton interpreter, so ``aot_eager`` (dynamo capture plus AOT autograd: where graph
breaks and fake-tensor errors show) and Inductor are tested here, CUDA graphs on a GPU.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import fastpe  # noqa: E402
from fastpe.backends import resolve_backend  # noqa: E402
from fastpe.ops import concat_projection, relative_attention, rotary, rotatory  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's numpy scalars

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_fastpe_does_not_import_triton():
    code = "import sys, fastpe; fastpe.relative_attention; assert 'triton' not in sys.modules, 'triton imported'"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_every_op_is_implemented_and_auto_never_picks_the_interpreter():
    from fastpe.kernels import triton as kt

    assert set(kt.IMPLEMENTED_OPS) == {"relative_attention", "time_interval_attention", "rotary", "rotatory_add",
                                      "concat_projection"}
    for op in kt.IMPLEMENTED_OPS:
        assert resolve_backend("triton", op, torch.device(DEVICE)) == "triton"
        if DEVICE == "cpu":
            assert resolve_backend("auto", op, torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


def _op_cases():
    from fastpe.kernels.triton import _ops  # registers the ops

    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(grad)

    ops = getattr(torch.ops, _ops.NAMESPACE)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    kpm[0, :2] = True
    seed = torch.tensor([5], device=DEVICE)
    bias = torch.randn(1, 2, 5, 5, generator=g).to(DEVICE)
    # transposed views where the real ops meet them: fake outputs must get the real strides
    # a shared rel_k and per-head rel_v: the two tables' gradients are reduced differently
    q, k, v, rk, rv = t(2, 5, 2, 8).transpose(1, 2), t(2, 2, 5, 8), t(2, 5, 2, 8).transpose(1, 2), t(1, 9, 8), t(2, 8, 9).mT
    out, lse, p_sums = ops.rmha_fwd(q, k, v, rk, rv, kpm, bias, seed, True, 0.2, 0.3)
    x4, ang, x3 = t(2, 2, 5, 8).transpose(1, 2), t(4, 6).t(), t(2, 5, 8)
    pos = torch.tensor([0, 1, 1, 3, 5], device=DEVICE)
    xc, tab, w, b = t(5, 2, 8).transpose(0, 1), t(6, 4), t(3, 12), t(3)
    def plain(args):  # backward ops are not differentiable again (no double backward)
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    return {
        "rmha_fwd": (ops.rmha_fwd.default, (q, k, v, rk, rv, kpm, bias, seed, True, 0.2, 0.3)),
        "rmha_bwd": (ops.rmha_bwd.default,
                     plain((t(2, 2, 5, 8), q, k, v, rk, rv, kpm, bias, seed, out, lse, p_sums, True, 0.2, 0.3))),
        "rotary_fwd": (ops.rotary_fwd.default, (x4, ang, None, True)),
        "rotary_bwd": (ops.rotary_bwd.default, plain((t(2, 5, 2, 8), x4, ang, pos, False))),
        "rotatory_add_fwd": (ops.rotatory_add_fwd.default, (x3, ang, pos)),
        "rotatory_add_bwd": (ops.rotatory_add_bwd.default, plain((t(2, 5, 8), ang, None))),
        "concat_projection_fwd": (ops.concat_projection_fwd.default, (xc, tab, w, b, None)),
        "concat_projection_bwd": (ops.concat_projection_bwd.default, plain((t(2, 5, 3), xc, tab, w, pos, True))),
    }


@pytest.mark.parametrize("name", ["rmha_fwd", "rmha_bwd", "rotary_fwd", "rotary_bwd", "rotatory_add_fwd",
                                  "rotatory_add_bwd", "concat_projection_fwd", "concat_projection_bwd"])
def test_opcheck(name):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each op."""
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args)


def test_op_namespace_is_named_after_the_package_sources(tmp_path):
    """Compile caches key graphs on op names: a graph compiled against other sources must miss."""
    from fastpe._digest import files_digest
    from fastpe.kernels.triton import _ops

    package_dir = pathlib.Path(fastpe.__file__).resolve().parent
    assert _ops.NAMESPACE == "fastpe_triton_" + files_digest(package_dir, (".py",), recursive=True)[:12]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kernel.py").write_text("BLOCK = 64\n")
    before = files_digest(tmp_path, (".py",), recursive=True)
    (tmp_path / "sub" / "kernel.py").write_text("BLOCK = 32\n")
    assert files_digest(tmp_path, (".py",), recursive=True) != before


def test_fake_implementations_match_real_shapes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, (op, args) in _op_cases().items():
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride(), name


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """Every fused op in one module: concat-projection -> Rotatory -> RoPE -> RMHA-4."""

    def __init__(self, d=16, h=2, max_len=12, dropout=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.h, self.dropout = h, dropout
        self.table = torch.nn.Parameter(torch.randn(max_len, 8, generator=g))
        self.weight = torch.nn.Parameter(torch.randn(d, d + 8, generator=g) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(d, generator=g))
        self.angles = torch.nn.Parameter(torch.randn(max_len, d // 2, generator=g))
        self.rope = torch.nn.Parameter(torch.randn(max_len, d // h // 2, generator=g))
        self.rel_k = torch.nn.Parameter(torch.randn(h, 9, d // h, generator=g))
        self.rel_v = torch.nn.Parameter(torch.randn(9, d // h, generator=g))

    def forward(self, x, pad, positions):
        b, L, d = x.shape
        y = concat_projection(x, self.table, self.weight, self.bias, positions=positions, backend="triton")
        y = rotatory(y, self.angles, backend="triton")
        heads = y.view(b, L, self.h, d // self.h)
        q = rotary(heads, self.rope, positions=positions, backend="triton").transpose(1, 2)
        v = heads.transpose(1, 2)
        out = relative_attention(q, q, v, self.rel_k, self.rel_v, key_padding_mask=pad, is_causal=True,
                                 dropout_p=self.dropout, backend="triton")
        return out.transpose(1, 2).reshape(b, L, d)


def _run(module, x, pad, positions, seed=3):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, pad, positions)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out))
    return out.detach(), [x.grad] + [p.grad for p in module.parameters()]


def _compare(backend, dropout, positions_kind, tol=1e-5):
    import copy

    torch._dynamo.reset()
    eager = Block(dropout=dropout).to(DEVICE)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    b, L = 2, 10
    x = torch.randn(b, L, 16, device=DEVICE)
    pad = torch.zeros(b, L, dtype=torch.bool, device=DEVICE)
    pad[0, :3] = True
    positions = None if positions_kind == "none" else torch.randint(0, 12, (b, L), device=DEVICE)
    out_e, grads_e = _run(eager, x, pad, positions)
    out_c, grads_c = _run(compiled, x, pad, positions)
    torch.testing.assert_close(out_c, out_e, atol=tol, rtol=tol)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, atol=tol, rtol=tol)


@pytest.mark.parametrize("dropout,positions", [(0.0, "none"), (0.1, "2d")])
def test_compile_fullgraph_aot_eager_matches_eager(dropout, positions):
    """fullgraph=True: any graph break is an error. Same seed, same dropout mask as eager."""
    _compare("aot_eager", dropout, positions)


def test_compile_fullgraph_inductor_matches_eager():
    """Inductor generates code around the custom ops (and checks the fakes' strides at run time)."""
    if DEVICE == "cuda":
        pytest.skip("covered by test_gpu_compile_inductor_matches_eager")
    _compare("inductor", 0.0, "2d", tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_compile_inductor_matches_eager(dropout):
    # Inductor draws the seed tensor with its own RNG: compare without dropout exactly, with it loosely.
    if dropout:
        torch._dynamo.reset()
        compiled = torch.compile(Block(dropout=dropout).cuda(), fullgraph=True)
        x = torch.randn(2, 10, 16, device="cuda")
        pad = torch.zeros(2, 10, dtype=torch.bool, device="cuda")
        out, grads = _run(compiled, x, pad, None)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    else:
        _compare("inductor", 0.0, "2d", tol=1e-4)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_fresh_dropout_masks():
    """The dropout seed is a device tensor drawn inside the captured graph: replays differ."""
    q = torch.randn(4, 2, 20, 16, device="cuda")
    rk = torch.randn(9, 16, device="cuda")
    static_out = torch.empty(4, 2, 20, 16, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        relative_attention(q, q, q, rk, rk, dropout_p=0.3, backend="triton")  # warm up (compile)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(relative_attention(q, q, q, rk, rk, dropout_p=0.3, backend="triton"))
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out)
    assert torch.isfinite(static_out).all()


def test_tensors_beyond_32_bit_offsets_are_refused():
    from fastpe.kernels.triton import _launch

    _launch.check_int32_indexing("op", torch.empty(2, 2**29, device="meta"))  # fine
    with pytest.raises(ValueError, match="32-bit offsets"):
        _launch.check_int32_indexing("op", torch.empty(2, 2**30, device="meta"))
