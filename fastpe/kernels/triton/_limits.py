"""Shape limits of the Triton kernels (no triton import: ``backend="auto"`` reads them to fall
back to the torch composition for shapes the kernels do not take)."""

from __future__ import annotations

MAX_HEAD_DIM = 256
MAX_BUCKETS = 129  # 2k+1 buckets are gathered with an unrolled loop: keep k <= 64
MAX_INTERVAL_BUCKETS = 1025  # time-interval tables (K + 1 rows): per-program scratch of [BLOCK_M, K] per table
MAX_TABLE_ROWS = 4096  # per-sequence positions: a [rows, d_out] partial of the table gradient per token group


def unsupported_reason(op: str, *args) -> str | None:
    """Why the triton backend cannot take these arguments of ``op`` (its torch-backend signature), or None."""
    if op == "relative_attention":
        q, _, v, rel_k = args[:4]
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return f"head sizes above {MAX_HEAD_DIM}"
        if rel_k.shape[-2] > MAX_BUCKETS:
            return f"relative tables of more than {MAX_BUCKETS} rows"
    elif op == "time_interval_attention":
        q, _, v, rel_k = args[:4]
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            return f"head sizes above {MAX_HEAD_DIM}"
        if rel_k.shape[-2] > MAX_INTERVAL_BUCKETS:
            return f"interval tables of more than {MAX_INTERVAL_BUCKETS} rows (K > {MAX_INTERVAL_BUCKETS - 1})"
    elif op == "concat_projection":
        x, table = args[:2]
        positions = args[4] if len(args) > 4 else None
        if (x.shape[1] if positions is None else table.shape[0]) > MAX_TABLE_ROWS:
            return f"position tables of more than {MAX_TABLE_ROWS} used rows"
    return None
