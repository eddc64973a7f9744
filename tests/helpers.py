"""Shared test utilities: random inputs, mask kinds, per-dtype tolerances, gradient comparison.

Used by the tests of every backend, so a fused backend is held to exactly the checks the
``torch`` backend passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# (atol, rtol) for comparing a backend's output in `dtype` with the float64 reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}

MASK_KINDS = (
    "none",
    "padding",
    "causal",
    "padding+causal",
    "fully_padded",
    "bool_2d",
    "bool_3d",
    "float_bias",
    "float_padding",
)


def make_masks(kind: str, batch: int, heads: int, lq: int, lk: int, device="cpu", seed: int = 0):
    """``dict(key_padding_mask=..., attn_mask=..., is_causal=...)`` for one mask kind.

    Padding is left padding with random lengths (each sequence keeps >= 1 key) except
    ``fully_padded``, where the first sequence is all padding.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {"key_padding_mask": None, "attn_mask": None, "is_causal": False}

    def padding():
        lengths = torch.randint(1, lk + 1, (batch,), generator=gen)
        return (torch.arange(lk)[None, :] < (lk - lengths)[:, None]).to(device)

    if kind == "none":
        pass
    elif kind == "padding":
        out["key_padding_mask"] = padding()
    elif kind == "causal":
        out["is_causal"] = True
    elif kind == "padding+causal":
        out["key_padding_mask"] = padding()
        out["is_causal"] = True
    elif kind == "fully_padded":
        kpm = padding()
        kpm[0] = True
        out["key_padding_mask"] = kpm
    elif kind == "bool_2d":
        out["attn_mask"] = (torch.rand(lq, lk, generator=gen) < 0.3).to(device)
    elif kind == "bool_3d":
        mask = torch.rand(batch * heads, lq, lk, generator=gen) < 0.3
        mask[0, 0] = True  # one query row with no allowed key
        out["attn_mask"] = mask.to(device)
    elif kind == "float_bias":
        out["attn_mask"] = torch.randn(batch, 1, lq, lk, generator=gen).to(device)
    elif kind == "float_padding":
        kpm = padding()
        out["key_padding_mask"] = torch.zeros(batch, lk).masked_fill(kpm.cpu(), -1e4).to(device)
    else:
        raise ValueError(kind)
    return out


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, requires_grad=True, scale=1.0):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def concat_inputs(b, L, d_in, d_pos, d_out, bias, pos_kind, device="cpu", rows=None, seed=None):
    """Float64 ``[x, table, weight(, bias)]`` leaves on ``device`` and positions of ``pos_kind``
    ("none", "1d", "2d", "repeated", "padded") for concat-projection tests; ``rows`` table rows (L + 2)."""
    gen = torch.Generator().manual_seed(L if seed is None else seed)
    rows = L + 2 if rows is None else rows
    inputs = [
        randn(b, L, d_in, gen=gen, dtype=torch.float64),
        randn(rows, d_pos, gen=gen, dtype=torch.float64),
        randn(d_out, d_in + d_pos, gen=gen, dtype=torch.float64, scale=0.1),
    ]
    if bias:
        inputs.append(randn(d_out, gen=gen, dtype=torch.float64))
    positions = {
        "none": None,
        "1d": torch.randint(0, rows, (L,), generator=gen),
        "2d": torch.randint(0, rows, (b, L), generator=gen),
        "repeated": torch.zeros(b, L, dtype=torch.int64),
        # left-padded sequences: padding tokens at row 0, items at 1..length
        "padded": (torch.arange(L)[None, :] - (L - torch.randint(0, L + 1, (b,), generator=gen))[:, None] + 1).clamp(min=0),
    }[pos_kind]
    inputs = [t.detach().to(device).requires_grad_() for t in inputs]
    return inputs, None if positions is None else positions.to(device)


def concat_runner(backend: str, positions):
    """``fn(x, table, weight[, bias])`` calling concat-projection with ``backend`` and ``positions``."""
    from fastpe.ops import concat_projection

    return lambda x, t, w, *bb: concat_projection(x, t, w, *(bb or [None]), positions=positions, backend=backend)


def run_with_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor | None = None, seed: int = 1):
    """Output of ``fn(*inputs)`` and the gradients of every input that requires grad.

    Inputs are cloned into fresh leaves so that two calls never share gradient buffers.
    """
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad_out.to(device=out.device, dtype=out.dtype))
    grads = [leaf.grad if leaf.requires_grad else None for leaf in leaves]
    return out.detach(), grads


def assert_matches_reference(
    fn: Callable,
    reference: Callable,
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    names: Sequence[str] | None = None,
    tol: tuple[float, float] | None = None,
    grad_tol_scale: float = 1.0,
):
    """``fn`` on ``inputs`` (in ``dtype``) agrees with ``reference`` on the same inputs in float64,
    for the output and every gradient. NaN anywhere fails (torch.testing rejects it)."""
    atol, rtol = tol if tol is not None else TOLERANCES[dtype]
    low = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    high = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in low]
    # Both runs draw the same upstream gradient (same seed, same output shape).
    out_ref, grads_ref = run_with_grads(reference, high)
    out, grads = run_with_grads(fn, low)
    assert out.shape == out_ref.shape, f"output shape {tuple(out.shape)}, expected {tuple(out_ref.shape)}"
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    names = names or [f"input {i}" for i in range(len(inputs))]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if g_ref is None:
            continue
        assert g is not None, f"no gradient for {name}"
        scale = max(1.0, float(g_ref.abs().max()))  # gradients summed over batches grow with it
        torch.testing.assert_close(
            g.double(), g_ref, atol=atol * grad_tol_scale * scale, rtol=rtol * grad_tol_scale,
            msg=lambda m, name=name: f"grad of {name}: {m}",
        )
