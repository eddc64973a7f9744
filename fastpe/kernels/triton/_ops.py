"""Autograd and torch.compile integration of the Triton kernels.

Each op has two entry points over the same launch planners:

* eager: a ``torch.autograd.Function`` (the default: a ``torch.library`` custom op costs tens
  of microseconds of dispatch per call, which is more than these kernels take);
* compiled: ``torch.library.custom_op`` ops in the ``fastpe_triton_<hash>`` namespace with fake
  (meta) implementations and ``register_autograd``; used while ``torch.compile`` traces, so
  a compiled module sees one opaque node per op and never breaks its graph.

``torch.library.triton_op`` would let Inductor look inside the kernels, but its fake
implementation runs the op body on fake tensors, which cannot work under the Triton
interpreter the CPU tests use; custom ops work on both, and these kernels have nothing for
Inductor to fuse with anyway.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastpe._digest import files_digest, ops_namespace
from fastpe.kernels.triton import _launch
from fastpe._time_steps import personal_time_steps
from fastpe.kernels.triton import concat as _cat
from fastpe.kernels.triton import interval as _interval
from fastpe.kernels.triton import rmha as _rmha
from fastpe.kernels.triton import rotations as _rot

# Named after fastpe's Python sources, so that compile caches miss when they change (see ops_namespace).
PACKAGE_DIR = Path(__file__).resolve().parents[2]
NAMESPACE = ops_namespace(files_digest(PACKAGE_DIR, (".py",), recursive=True), "fastpe_triton")

# The planners memoized by call shape (configs, grids, scalars; never tensors): a training loop
# repeats a handful of shapes, and planning costs more host time than a small kernel runs.
_plan_rmha_forward = _launch.cached(_rmha, "plan_forward")
_plan_rmha_backward = _launch.cached(_rmha, "plan_backward")
_plan_rotary_forward = _launch.cached(_rot, "plan_rotary_forward")
_plan_rotary_backward = _launch.cached(_rot, "plan_rotary_backward")
_plan_rotatory_forward = _launch.cached(_rot, "plan_rotatory_forward")
_plan_rotatory_backward = _launch.cached(_rot, "plan_rotatory_backward")
_plan_concat_forward = _launch.cached(_cat, "plan_forward")
_plan_concat_backward = _launch.cached(_cat, "plan_backward")
_plan_interval_forward = _launch.cached(_interval, "plan_forward")
_plan_interval_backward = _launch.cached(_interval, "plan_backward")
PLAN_CACHES = (_plan_rmha_forward, _plan_rmha_backward, _plan_interval_forward, _plan_interval_backward,
               _plan_rotary_forward, _plan_rotary_backward,
               _plan_rotatory_forward, _plan_rotatory_backward, _plan_concat_forward, _plan_concat_backward)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# relative attention
# ----------------------------------------------------------------------------------------------


def _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
    out, lse, p_sums, launches = _plan_rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p,
                                                    scale)
    _launch.run(launches)
    return out, lse, p_sums


def _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, is_causal, dropout_p, scale):
    dq, dk, dv, drk, drv, launches = _plan_rmha_backward(
        dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, is_causal, dropout_p, scale
    )
    _launch.run(launches)
    return dq, dk, dv, drk, drv


class _RelativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
        out, lse, p_sums = _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums)
        ctx.options = (is_causal, dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums = ctx.saved_tensors
        grads = _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, *ctx.options)
        return (*grads, None, None, None, None, None, None)


@torch.library.custom_op(f"{NAMESPACE}::rmha_fwd", mutates_args=())
def _rmha_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor, rel_v: torch.Tensor,
    kpm: torch.Tensor | None, bias: torch.Tensor | None, seed: torch.Tensor | None,
    is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rmha_forward(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale)


@_rmha_fwd_op.register_fake
def _(q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale):
    b, h, lq, _ = q.shape
    return q.new_empty((b, h, lq, v.shape[-1])), *(q.new_empty((b, h, lq), dtype=torch.float32) for _ in range(2))


@torch.library.custom_op(f"{NAMESPACE}::rmha_bwd", mutates_args=())
def _rmha_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor,
    rel_v: torch.Tensor, kpm: torch.Tensor | None, bias: torch.Tensor | None, seed: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, p_sums: torch.Tensor, is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rmha_backward(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, is_causal, dropout_p, scale)


@_rmha_bwd_op.register_fake
def _(dout, q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, is_causal, dropout_p, scale):
    # the real op allocates contiguous gradients whatever the inputs' strides: so must the fake
    return tuple(t.new_empty(t.shape) for t in (q, k, v, rel_k, rel_v))


def _rmha_setup_context(ctx, inputs, output):
    q, k, v, rel_k, rel_v, kpm, bias, seed, is_causal, dropout_p, scale = inputs
    out, lse, p_sums = output
    ctx.save_for_backward(q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums)
    ctx.options = (is_causal, dropout_p, scale)


def _rmha_op_backward(ctx, dout, _dlse, _dp_sums):
    q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums = ctx.saved_tensors
    grads = _rmha_bwd_op(dout.contiguous(), q, k, v, rel_k, rel_v, kpm, bias, seed, out, lse, p_sums, *ctx.options)
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
    dropout_p = _rmha.dropout_rate(float(dropout_p))
    # The dropout seed is a device tensor drawn from torch's generator: torch.manual_seed
    # reproduces it, and a captured CUDA graph draws a fresh one on every replay.
    seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64) if dropout_p > 0.0 else None
    bias = None if attn_bias is None else attn_bias.detach()
    if torch.compiler.is_compiling():
        out = _rmha_fwd_op(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)[0]
        return out
    if _needs_grad(q, k, v, rel_k, rel_v):
        return _RelativeAttention.apply(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)
    out = _rmha_forward(q, k, v, rel_k, rel_v, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)[0]
    return out


# ----------------------------------------------------------------------------------------------
# time-interval attention (TiSASRec)
# ----------------------------------------------------------------------------------------------


def _interval_forward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale):
    out, lse, launches = _plan_interval_forward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p,
                                                scale)
    _launch.run(launches)
    return out, lse


def _interval_backward(dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, is_causal, dropout_p, scale):
    dq, dk, dv, drk, drv, launches = _plan_interval_backward(
        dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, is_causal, dropout_p, scale
    )
    _launch.run(launches)
    return dq, dk, dv, drk, drv


class _TimeIntervalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale):
        out, lse = _interval_forward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse)
        ctx.options = (is_causal, dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse = ctx.saved_tensors
        grads = _interval_backward(dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, *ctx.options)
        return (*grads, None, None, None, None, None, None, None)


@torch.library.custom_op(f"{NAMESPACE}::tisas_fwd", mutates_args=())
def _interval_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor, rel_v: torch.Tensor, tau: torch.Tensor,
    kpm: torch.Tensor | None, bias: torch.Tensor | None, seed: torch.Tensor | None,
    is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _interval_forward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale)


@_interval_fwd_op.register_fake
def _(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale):
    b, h, length, _ = q.shape
    return q.new_empty((b, h, length, v.shape[-1])), q.new_empty((b, h, length), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::tisas_bwd", mutates_args=())
def _interval_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_k: torch.Tensor,
    rel_v: torch.Tensor, tau: torch.Tensor, kpm: torch.Tensor | None, bias: torch.Tensor | None,
    seed: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, is_causal: bool, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _interval_backward(dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, is_causal, dropout_p, scale)


@_interval_bwd_op.register_fake
def _(dout, q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, is_causal, dropout_p, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, rel_k, rel_v))


def _interval_setup_context(ctx, inputs, output):
    q, k, v, rel_k, rel_v, tau, kpm, bias, seed, is_causal, dropout_p, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse)
    ctx.options = (is_causal, dropout_p, scale)


def _interval_op_backward(ctx, dout, _dlse):
    q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse = ctx.saved_tensors
    grads = _interval_bwd_op(dout.contiguous(), q, k, v, rel_k, rel_v, tau, kpm, bias, seed, out, lse, *ctx.options)
    return (*grads, None, None, None, None, None, None, None)


_interval_fwd_op.register_autograd(_interval_op_backward, setup_context=_interval_setup_context)


def time_interval_attention(q, k, v, rel_k, rel_v, timestamps, time_unit=None, key_padding_mask=None, attn_bias=None,
                            is_causal=False, dropout_p=0.0, scale=None):
    """The triton backend of :func:`fastpe.ops.time_interval_attention` (canonical masks, positions
    already added). The per-position time steps are computed here with torch ops (int32, see
    :func:`fastpe.kernels.triton.interval.interval_steps`); the buckets in the kernels."""
    if attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "time_interval_attention: the triton backend does not compute gradients for a float attn_mask "
            "that requires grad; detach it or use backend='torch'"
        )
    _interval.check_supported(q, k, v, rel_k)
    tau = _interval.interval_steps(personal_time_steps(timestamps, time_unit, key_padding_mask), rel_k.shape[-2] - 1)
    scale = _rmha.default_scale(q, scale)
    dropout_p = _rmha.dropout_rate(float(dropout_p))
    seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64) if dropout_p > 0.0 else None
    bias = None if attn_bias is None else attn_bias.detach()
    args = (q, k, v, rel_k, rel_v, tau, key_padding_mask, bias, seed, bool(is_causal), dropout_p, scale)
    if torch.compiler.is_compiling():
        return _interval_fwd_op(*args)[0]
    if _needs_grad(q, k, v, rel_k, rel_v):
        return _TimeIntervalAttention.apply(*args)
    return _interval_forward(*args)[0]


# ----------------------------------------------------------------------------------------------
# rotary / rotatory
# ----------------------------------------------------------------------------------------------


def _rotary_forward(x, angles, positions, interleaved):
    y, launches = _plan_rotary_forward(x, angles, positions, interleaved)
    _launch.run(launches)
    return y


def _rotary_backward(dy, x, angles, positions, interleaved, need_dangles=True):
    dx, dangles, launches = _plan_rotary_backward(dy, x, angles, positions, interleaved, need_dangles)
    _launch.run(launches)
    return dx, dangles


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, angles, positions, interleaved):
        ctx.save_for_backward(x, angles, positions)
        ctx.interleaved = interleaved
        return _rotary_forward(x, angles, positions, interleaved)

    @staticmethod
    def backward(ctx, dy):
        x, angles, positions = ctx.saved_tensors
        dx, dangles = _rotary_backward(dy, x, angles, positions, ctx.interleaved, ctx.needs_input_grad[1])
        return dx, dangles, None, None


@torch.library.custom_op(f"{NAMESPACE}::rotary_fwd", mutates_args=())
def _rotary_fwd_op(x: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None, interleaved: bool) -> torch.Tensor:
    return _rotary_forward(x, angles, positions, interleaved)


@_rotary_fwd_op.register_fake
def _(x, angles, positions, interleaved):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::rotary_bwd", mutates_args=())
def _rotary_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotary_backward(dy, x, angles, positions, interleaved)


@_rotary_bwd_op.register_fake
def _(dy, x, angles, positions, interleaved):
    return torch.empty_like(x), angles.new_empty(angles.shape)  # dx keeps x's layout, like the real op


def _rotary_setup_context(ctx, inputs, output):
    x, angles, positions, interleaved = inputs
    ctx.save_for_backward(x, angles, positions)
    ctx.interleaved = interleaved


def _rotary_op_backward(ctx, dy):
    x, angles, positions = ctx.saved_tensors
    dx, dangles = _rotary_bwd_op(dy, x, angles, positions, ctx.interleaved)
    return dx, dangles, None, None


_rotary_fwd_op.register_autograd(_rotary_op_backward, setup_context=_rotary_setup_context)


def rotary(x, angles, positions=None, interleaved=True):
    """The triton backend of :func:`fastpe.ops.rotary` (``x [B, L, H, D]``, any strides)."""
    _rot._check(x, "x")
    interleaved = bool(interleaved)
    if torch.compiler.is_compiling():
        return _rotary_fwd_op(x, angles, positions, interleaved)
    if _needs_grad(x, angles):
        return _Rotary.apply(x, angles, positions, interleaved)
    return _rotary_forward(x, angles, positions, interleaved)


def _rotatory_forward(x, angles, positions):
    y, launches = _plan_rotatory_forward(x, angles, positions)
    _launch.run(launches)
    return y


def _rotatory_backward(dy, angles, positions):
    dangles, launches = _plan_rotatory_backward(dy, angles, positions)
    _launch.run(launches)
    return dangles


class _RotatoryAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, angles, positions):
        ctx.save_for_backward(angles, positions)
        return _rotatory_forward(x, angles, positions)

    @staticmethod
    def backward(ctx, dy):
        angles, positions = ctx.saved_tensors
        dangles = _rotatory_backward(dy, angles, positions) if ctx.needs_input_grad[1] else None
        return dy, dangles, None


@torch.library.custom_op(f"{NAMESPACE}::rotatory_add_fwd", mutates_args=())
def _rotatory_fwd_op(x: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    return _rotatory_forward(x, angles, positions)


@_rotatory_fwd_op.register_fake
def _(x, angles, positions):
    return torch.empty_like(x)


@torch.library.custom_op(f"{NAMESPACE}::rotatory_add_bwd", mutates_args=())
def _rotatory_bwd_op(dy: torch.Tensor, angles: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    return _rotatory_backward(dy, angles, positions)


@_rotatory_bwd_op.register_fake
def _(dy, angles, positions):
    return angles.new_empty(angles.shape)


def _rotatory_setup_context(ctx, inputs, output):
    x, angles, positions = inputs
    ctx.save_for_backward(angles, positions)


def _rotatory_op_backward(ctx, dy):
    angles, positions = ctx.saved_tensors
    dangles = _rotatory_bwd_op(dy, angles, positions) if ctx.needs_input_grad[1] else None
    return dy, dangles, None


_rotatory_fwd_op.register_autograd(_rotatory_op_backward, setup_context=_rotatory_setup_context)


def rotatory_add(x, angles, positions=None):
    """The triton backend of :func:`fastpe.ops.rotatory` with ``mode="add"`` (``x [B, L, d]``)."""
    _rot._check(x, "x")
    if torch.compiler.is_compiling():
        return _rotatory_fwd_op(x, angles, positions)
    if _needs_grad(x, angles):
        return _RotatoryAdd.apply(x, angles, positions)
    return _rotatory_forward(x, angles, positions)


# ----------------------------------------------------------------------------------------------
# concat-projection
# ----------------------------------------------------------------------------------------------


def _concat_forward(x, table, weight, bias, positions):
    y, launches = _plan_concat_forward(x, table, weight, bias, positions)
    _launch.run(launches)
    return y


def _concat_backward(dy, x, table, weight, positions, has_bias, need_dx=True, need_w=True, need_table=True):
    dx, dtable, dweight, dbias, launches = _plan_concat_backward(
        dy, x, table, weight, positions, has_bias, need_dx, need_w, need_table
    )
    _launch.run(launches)
    return dx, dtable, dweight, dbias


class _ConcatProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, weight, bias, positions):
        ctx.save_for_backward(x, table, weight, positions)
        ctx.has_bias = bias is not None
        return _concat_forward(x, table, weight, bias, positions)

    @staticmethod
    def backward(ctx, dy):
        x, table, weight, positions = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dtable, dweight, dbias = _concat_backward(
            dy, x, table, weight, positions, ctx.has_bias and need[3], need[0], need[2], need[1]
        )
        return dx, dtable, dweight, dbias, None


@torch.library.custom_op(f"{NAMESPACE}::concat_projection_fwd", mutates_args=())
def _concat_fwd_op(
    x: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None
) -> torch.Tensor:
    return _concat_forward(x, table, weight, bias, positions)


@_concat_fwd_op.register_fake
def _(x, table, weight, bias, positions):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::concat_projection_bwd", mutates_args=())
def _concat_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dtable, dweight, dbias = _concat_backward(dy, x, table, weight, positions, has_bias)
    # a custom op returns tensors only: an empty bias gradient stands for "no bias"
    return dx, dtable, dweight, dbias if dbias is not None else weight.new_empty(0)


@_concat_bwd_op.register_fake
def _(dy, x, table, weight, positions, has_bias):
    dbias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    return x.new_empty(x.shape), table.new_empty(table.shape), weight.new_empty(weight.shape), dbias


def _concat_setup_context(ctx, inputs, output):
    x, table, weight, bias, positions = inputs
    ctx.save_for_backward(x, table, weight, positions)
    ctx.has_bias = bias is not None


def _concat_op_backward(ctx, dy):
    x, table, weight, positions = ctx.saved_tensors
    dx, dtable, dweight, dbias = _concat_bwd_op(dy, x, table, weight, positions, ctx.has_bias)
    return dx, dtable, dweight, dbias if ctx.has_bias else None, None


_concat_fwd_op.register_autograd(_concat_op_backward, setup_context=_concat_setup_context)


def concat_projection(x, table, weight, bias=None, positions=None):
    """The triton backend of :func:`fastpe.ops.concat_projection`."""
    _cat._check(x, table, positions)
    if torch.compiler.is_compiling():
        return _concat_fwd_op(x, table, weight, bias, positions)
    if _needs_grad(x, table, weight, bias):
        return _ConcatProjection.apply(x, table, weight, bias, positions)
    return _concat_forward(x, table, weight, bias, positions)
