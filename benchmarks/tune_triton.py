"""Sweep the Triton kernels' config knobs on a GPU and print, per shape class, the fastest setting.

The planners in ``fastpe.kernels.triton`` pick block sizes, warps and the backward mode from a
small table keyed on sequence length, head size and (batch x heads) vs the SM count; those
defaults were chosen without a GPU. This script times forward+backward for each candidate
(``fastpe.kernels.triton._launch.override``) next to the baselines of the targets:

* RMHA-4 vs SDPA without positions, same shape (target: within 1.5x);
* rotary / Rotatory with angle gradients vs a clone of the same tensor (target: within 3x);
* concat-projection vs a plain ``nn.Linear`` of the same output size (target: within 1.1x).

Usage (on a CUDA machine)::

    python benchmarks/tune_triton.py [--quick] [--dtype bf16]

Copy the winners into the config functions (``fwd_config``/``bwd_config`` in ``rmha.py``,
``_config`` in ``rotations.py``, ``plan_gemm``/``bwd_config`` in ``concat.py``).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RMHA_SHAPES = [(512, 2, 50, 32), (256, 2, 200, 64), (128, 1, 75, 90), (256, 2, 128, 64), (128, 3, 35, 32)]
ROTARY_SHAPES = [(512, 50, 2, 32), (128, 200, 3, 64)]
CONCAT_SHAPES = [(512, 50, 64), (128, 75, 90), (256, 200, 128)]


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def fwd_bwd(fn, *leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def sweep(name, make_run, grids, baseline_ms):
    from fastpe.kernels.triton import _launch

    rows = []
    default = bench(make_run())
    rows.append(("default", default))
    for op, grid in grids.items():
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            knobs = dict(zip(keys, values))
            try:
                with _launch.override(op, **knobs):
                    ms = bench(make_run())
            except Exception as exc:  # an invalid combination (e.g. out of shared memory): skip it
                print(f"    {op} {knobs}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            rows.append((f"{op} {knobs}", ms))
    best = min(rows, key=lambda r: r[1])
    print(f"{name}: baseline {baseline_ms:.4f} ms | default {default:.4f} ms ({default / baseline_ms:.2f}x) | "
          f"best {best[1]:.4f} ms ({best[1] / baseline_ms:.2f}x) with {best[0]}")
    return best


def rmha(dtype, quick):
    from fastpe.ops import relative_attention

    for b, h, L, dh in RMHA_SHAPES:
        q, k, v = (torch.randn(b, h, L, dh, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        rk, rv = (torch.randn(9, dh, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        pad = torch.zeros(b, L, dtype=torch.bool, device="cuda")
        pad[:, : L // 4] = True
        base = bench(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), q, k, v))

        def make_run():
            return fwd_bwd(lambda: relative_attention(q, k, v, rk, rv, key_padding_mask=pad, backend="triton"), q, k, v, rk, rv)

        grids = {
            "rmha_fwd": {"block_m": [16, 32, 64], "block_n": [32, 64, 128], "num_warps": [4, 8]},
            "rmha_bwd": {"mode": ["fused", "split"], "block_m": [16, 32, 64], "block_n": [32, 64],
                         "b_per_prog": [1, 2, 4, 8], "num_warps": [4, 8]},
        }
        if quick:
            grids = {"rmha_fwd": {"block_m": [32, 64]}, "rmha_bwd": {"mode": ["fused", "split"], "b_per_prog": [1, 4]}}
        sweep(f"RMHA-4 B={b} h={h} L={L} dh={dh} {dtype} (vs SDPA, no positions, no mask)", make_run, grids, base)


def rotary(dtype, quick):
    from fastpe.ops import rotary as rot, rotatory

    for b, L, h, d in ROTARY_SHAPES:
        x = torch.randn(b, h, L, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        angles = torch.randn(L, d // 2, device="cuda", dtype=dtype, requires_grad=True)
        base = bench(lambda: x.clone())
        grids = {"rotary": {"block_b": [4, 8, 16, 32], "block_l": [1, 2, 4, 8, 16], "num_warps": [2, 4, 8]}}
        if quick:
            grids = {"rotary": {"block_b": [8, 16], "block_l": [2, 4, 8]}}
        sweep(f"rotary B={b} L={L} h={h} D={d} {dtype} (vs clone)",
              lambda: fwd_bwd(lambda: rot(x, angles, backend="triton"), x, angles), grids, base)
        x3 = torch.randn(b, L, h * d, device="cuda", dtype=dtype, requires_grad=True)
        angles3 = torch.randn(L, h * d // 2, device="cuda", dtype=dtype, requires_grad=True)
        sweep(f"rotatory B={b} L={L} d={h * d} {dtype} (vs clone)",
              lambda: fwd_bwd(lambda: rotatory(x3, angles3, backend="triton"), x3, angles3), grids, bench(lambda: x3.clone()))


def concat(dtype, quick):
    from fastpe.ops import concat_projection

    for b, L, d in CONCAT_SHAPES:
        x = torch.randn(b, L, d, device="cuda", dtype=dtype, requires_grad=True)
        table = torch.randn(L, d, device="cuda", dtype=dtype, requires_grad=True)
        weight = torch.randn(d, 2 * d, device="cuda", dtype=dtype, requires_grad=True)
        bias = torch.randn(d, device="cuda", dtype=dtype, requires_grad=True)
        lin = torch.nn.Linear(d, d, device="cuda", dtype=dtype)
        base = bench(fwd_bwd(lambda: lin(x), x))
        grids = {
            "concat_gemm": {"block_m": [32, 64, 128], "block_n": [32, 64, 128], "num_warps": [4, 8], "num_stages": [2, 3]},
            "concat_bwd": {"groups": [32, 66, 132, 264], "block_l": [2, 4, 8], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
        }
        if quick:
            grids = {"concat_gemm": {"block_m": [64, 128]}, "concat_bwd": {"groups": [66, 132, 264]}}
        sweep(f"concat-projection B={b} L={L} d={d} {dtype} (vs Linear(d, d))",
              lambda: fwd_bwd(lambda: concat_projection(x, table, weight, bias, backend="triton"), x, table, weight, bias),
              grids, base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="a few candidates per op (minutes, not tens of minutes)")
    parser.add_argument("--ops", default="rmha,rotary,concat")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for op in args.ops.split(","):
        {"rmha": rmha, "rotary": rotary, "concat": concat}[op](DTYPES[args.dtype], args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
