"""Python side of the compiled operators: fake (meta) implementations, autograd formulas, and
the functions behind ``backend="cuda"``.

The operators themselves (schemas and kernels) are defined in ``csrc/bindings.cpp`` with
``TORCH_LIBRARY``. Here every function takes the operator namespace (``fastpe_<hash of the sources>``
for the CUDA extension, ``fastpe_emu_<hash>`` for the CPU emulation build the tests use), so both run
exactly the same registration and wrapper code. Each forward is one operator to autograd and to
``torch.compile``; its backward is another.
"""

from __future__ import annotations

import math

import torch

from fastpe._time_steps import personal_time_steps

_REGISTERED: set[str] = set()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def register(namespace: str) -> None:
    """Register fake implementations and autograd formulas for the ops of ``namespace``.

    The C++ library defining the ops must be loaded first. Idempotent.
    """
    if namespace in _REGISTERED:
        return
    ops = getattr(torch.ops, namespace)

    def name(op: str) -> str:
        return f"{namespace}::{op}"

    # ---- fake implementations: shapes, dtypes and (contiguous) strides of the real outputs ----

    @torch.library.register_fake(name("relative_attention_fwd"))
    def _rmha_fwd_fake(q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale):
        b, h, lq, _ = q.shape
        out = q.new_empty((b, h, lq, v.shape[-1]))
        lse = q.new_empty((b, h, lq), dtype=_lse_dtype(q.dtype))
        return out, lse, q.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake(name("relative_attention_bwd"))
    def _rmha_bwd_fake(grad_out, q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, out, lse, rng_state, is_causal,
                       dropout_p, scale):
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), rel_k.new_empty(rel_k.shape),
                rel_v.new_empty(rel_v.shape))

    @torch.library.register_fake(name("time_interval_attention_fwd"))
    def _tisas_fwd_fake(q, k, v, rel_k, rel_v, tau, key_padding_mask, attn_bias, is_causal, dropout_p, scale):
        return _rmha_fwd_fake(q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale)

    @torch.library.register_fake(name("time_interval_attention_bwd"))
    def _tisas_bwd_fake(grad_out, q, k, v, rel_k, rel_v, tau, key_padding_mask, attn_bias, out, lse, rng_state,
                        is_causal, dropout_p, scale):
        return _rmha_bwd_fake(grad_out, q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, out, lse, rng_state,
                              is_causal, dropout_p, scale)

    @torch.library.register_fake(name("rotary_fwd"))
    def _rotary_fwd_fake(x, angles, positions, interleaved):
        return x.new_empty(x.shape)

    @torch.library.register_fake(name("rotary_bwd"))
    def _rotary_bwd_fake(grad_y, x, angles, positions, interleaved, angles_grad):
        dangles = angles.new_empty(angles.shape) if angles_grad else angles.new_empty((0,))
        return x.new_empty(x.shape), dangles

    @torch.library.register_fake(name("rotatory_add_fwd"))
    def _rotatory_fwd_fake(x, angles, positions):
        return x.new_empty(x.shape)

    @torch.library.register_fake(name("rotatory_add_bwd"))
    def _rotatory_bwd_fake(grad_y, angles, positions):
        return angles.new_empty(angles.shape)

    @torch.library.register_fake(name("concat_projection_fwd"))
    def _concat_fwd_fake(x, table, weight, bias, positions):
        return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))

    @torch.library.register_fake(name("concat_projection_bwd"))
    def _concat_bwd_fake(grad_y, x, table, weight, positions, has_bias):
        dbias = x.new_empty((weight.shape[0],)) if has_bias else x.new_empty((0,))
        return x.new_empty(x.shape), table.new_empty(table.shape), weight.new_empty(weight.shape), dbias

    @torch.library.register_fake(name("philox_host"))
    def _philox_fake(inputs):
        return inputs.new_empty((inputs.shape[0], 4))

    # ---- autograd: each forward op's backward calls the matching backward op ----

    def register_relative_autograd(forward_op: str, backward_op: str) -> None:
        """RMHA and time-interval attention share one autograd formula: their inputs differ only in the
        bucket inputs (none, or ``tau``) between the tables and the masks, and the backward op takes
        the forward's tensor inputs, then ``out, lse, rng_state``, then the three scalars."""

        def setup(ctx, inputs, output):
            *tensors, is_causal, dropout_p, scale = inputs
            ctx.save_for_backward(*tensors, *output)
            ctx.is_causal, ctx.dropout_p, ctx.scale = is_causal, dropout_p, scale

        def backward(ctx, grad_out, _grad_lse, _grad_rng):
            dq, dk, dv, drk, drv = getattr(ops, backward_op)(grad_out, *ctx.saved_tensors, ctx.is_causal,
                                                            ctx.dropout_p, ctx.scale)
            return (dq, dk, dv, drk, drv) + (None,) * (len(ctx.needs_input_grad) - 5)  # none for the rest

        torch.library.register_autograd(name(forward_op), backward, setup_context=setup)

    register_relative_autograd("relative_attention_fwd", "relative_attention_bwd")
    register_relative_autograd("time_interval_attention_fwd", "time_interval_attention_bwd")

    def rotary_setup(ctx, inputs, output):
        x, angles, positions, interleaved = inputs
        ctx.save_for_backward(x, angles, positions)
        ctx.interleaved = interleaved

    def rotary_backward(ctx, grad_y):
        x, angles, positions = ctx.saved_tensors
        need_angles = ctx.needs_input_grad[1]
        dx, dangles = ops.rotary_bwd(grad_y, x, angles, positions, ctx.interleaved, need_angles)
        return dx, (dangles if need_angles else None), None, None

    torch.library.register_autograd(name("rotary_fwd"), rotary_backward, setup_context=rotary_setup)

    def rotatory_setup(ctx, inputs, output):
        _x, angles, positions = inputs
        ctx.save_for_backward(angles, positions)

    def rotatory_backward(ctx, grad_y):
        angles, positions = ctx.saved_tensors
        dangles = ops.rotatory_add_bwd(grad_y, angles, positions) if ctx.needs_input_grad[1] else None
        return grad_y, dangles, None  # y = x + code: dx = dy

    torch.library.register_autograd(name("rotatory_add_fwd"), rotatory_backward, setup_context=rotatory_setup)

    def concat_setup(ctx, inputs, output):
        x, table, weight, bias, positions = inputs
        ctx.save_for_backward(x, table, weight, positions)
        ctx.has_bias = bias is not None

    def concat_backward(ctx, grad_y):
        x, table, weight, positions = ctx.saved_tensors
        dx, dtable, dweight, dbias = ops.concat_projection_bwd(grad_y, x, table, weight, positions, ctx.has_bias)
        return dx, dtable, dweight, (dbias if ctx.has_bias else None), None

    torch.library.register_autograd(name("concat_projection_fwd"), concat_backward, setup_context=concat_setup)

    # The backward ops are not differentiable: say so instead of silently dropping a double backward.
    def no_double_backward(ctx, *grads):
        raise NotImplementedError("the cuda backend of fastpe does not support double backward (create_graph=True)")

    def no_setup(ctx, inputs, output):
        pass

    for op in ("relative_attention_bwd", "time_interval_attention_bwd", "rotary_bwd", "rotatory_add_bwd", "concat_projection_bwd"):
        torch.library.register_autograd(name(op), no_double_backward, setup_context=no_setup)

    _REGISTERED.add(namespace)


# ---- the functions behind backend="cuda" (signatures of the torch backends in fastpe.ops) ----


def _relative_inputs(op, q, rel_k, rel_v, attn_bias, scale):
    """What RMHA and time-interval attention both do before their kernel: refuse a trainable float
    mask, default the scale, and give shared ``[R, dh]`` tables a head axis of one."""
    if attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{op}: the cuda backend does not compute gradients for a float attn_mask; "
            "pass a mask that does not require grad, or use backend='torch'"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rel_k = rel_k.unsqueeze(0) if rel_k.dim() == 2 else rel_k
    rel_v = rel_v.unsqueeze(0) if rel_v.dim() == 2 else rel_v
    return rel_k, rel_v, float(scale)


def relative_attention(ops, q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False,
                       dropout_p=0.0, scale=None):
    rel_k, rel_v, scale = _relative_inputs("relative_attention", q, rel_k, rel_v, attn_bias, scale)
    out, _lse, _rng = ops.relative_attention_fwd(
        q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, bool(is_causal), float(dropout_p), scale
    )
    return out


def time_interval_attention(ops, q, k, v, rel_k, rel_v, timestamps, time_unit=None, key_padding_mask=None,
                            attn_bias=None, is_causal=False, dropout_p=0.0, scale=None):
    """TiSASRec attention: the kernels take the personal time steps ``tau [B, L]`` and compute the
    buckets ``min(|tau_i - tau_j|, K)`` themselves (K = rows of the tables - 1)."""
    rel_k, rel_v, scale = _relative_inputs("time_interval_attention", q, rel_k, rel_v, attn_bias, scale)
    tau = personal_time_steps(timestamps, time_unit, key_padding_mask)
    out, _lse, _rng = ops.time_interval_attention_fwd(
        q, k, v, rel_k, rel_v, tau, key_padding_mask, attn_bias, bool(is_causal), float(dropout_p), scale
    )
    return out


def rotary(ops, x, angles, positions=None, interleaved=True):
    return ops.rotary_fwd(x, angles, positions, bool(interleaved))


def rotatory_add(ops, x, angles, positions=None):
    return ops.rotatory_add_fwd(x, angles, positions)


def concat_projection(ops, x, table, weight, bias=None, positions=None):
    return ops.concat_projection_fwd(x, table, weight, bias, positions)
