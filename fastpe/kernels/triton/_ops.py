"""Autograd and torch.compile integration of the Triton kernels.

Each op has two entry points over the same launch planners:

* eager: a ``torch.autograd.Function`` (the default: a ``torch.library`` custom op costs tens
  of microseconds of dispatch per call, which is more than these kernels take);
* compiled: ``torch.library.custom_op`` ops in the ``fastpe_triton`` namespace with fake
  (meta) implementations and ``register_autograd``; used while ``torch.compile`` traces, so
  a compiled module sees one opaque node per op and never breaks its graph.

``torch.library.triton_op`` would let Inductor look inside the kernels, but its fake
implementation runs the op body on fake tensors, which cannot work under the Triton
interpreter the CPU tests use; custom ops work on both, and these kernels have nothing for
Inductor to fuse with anyway.
"""

from __future__ import annotations

import torch

from fastpe.kernels.triton import _launch
from fastpe.kernels.triton import rmha as _rmha

NAMESPACE = "fastpe_triton"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# relative attention
# ----------------------------------------------------------------------------------------------


def _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
    out, lse, launches = _rmha.plan_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale)
    _launch.run(launches)
    return out, lse


def _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, is_causal, dropout_p, scale):
    dq, dk, dv, drk, drv, launches = _rmha.plan_backward(
        dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, is_causal, dropout_p, scale
    )
    _launch.run(launches)
    return dq, dk, dv, drk, drv


class _RelativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
        out, lse = _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse)
        ctx.options = (is_causal, dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse = ctx.saved_tensors
        grads = _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, *ctx.options)
        return (*grads, None, None, None, None, None, None)


@torch.library.custom_op(f"{NAMESPACE}::rmha_fwd", mutates_args=())
def _rmha_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor, rel_v: torch.Tensor,
    kpm: torch.Tensor | None, bias: torch.Tensor | None, seed: torch.Tensor | None,
    is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale)


@_rmha_fwd_op.register_fake
def _(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
    b, h, lq, _ = q.shape
    return q.new_empty((b, h, lq, v.shape[-1])), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::rmha_bwd", mutates_args=())
def _rmha_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor,
    rel_v: torch.Tensor, kpm: torch.Tensor | None, bias: torch.Tensor | None, seed: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, is_causal, dropout_p, scale)


@_rmha_bwd_op.register_fake
def _(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, is_causal, dropout_p, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(rel_k), torch.empty_like(rel_v))


def _rmha_setup_context(ctx, inputs, output):
    q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse)
    ctx.options = (is_causal, dropout_p, scale)


def _rmha_op_backward(ctx, dout, _dlse):
    q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse = ctx.saved_tensors
    grads = _rmha_bwd_op(dout.contiguous(), q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, *ctx.options)
    return (*grads, None, None, None, None, None, None)


_rmha_fwd_op.register_autograd(_rmha_op_backward, setup_context=_rmha_setup_context)


def relative_attention(q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False,
                       dropout_p=0.0, scale=None):
    """The triton backend of :func:`fastpe.ops.relative_attention` (canonical masks)."""
    if attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "relative_attention: the triton backend does not compute gradients for a float attn_mask "
            "that requires grad; detach it or use backend='torch'"
        )
    _rmha._check_supported(q, v, rel_k)
    scale = _rmha.default_scale(q, scale)
    dropout_p = float(dropout_p)
    # The dropout seed is a device tensor drawn from torch's generator: torch.manual_seed
    # reproduces it, and a captured CUDA graph draws a fresh one on every replay.
    seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64) if dropout_p > 0.0 else None
    bias = None if attn_bias is None else attn_bias.detach()
    if torch.compiler.is_compiling():
        out, _lse = _rmha_fwd_op(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)
        return out
    if _needs_grad(q, k, v, rel_k, rel_v):
        return _RelativeAttention.apply(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)
    out, _lse = _rmha_forward(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)
    return out
