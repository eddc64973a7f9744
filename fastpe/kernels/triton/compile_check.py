"""Compile every shipped Triton kernel variant for a GPU target without a GPU.

The Triton interpreter (used by the CPU tests) runs kernels as numpy code and misses errors
that only the compiler sees (``tl.dot`` with a dimension under 16, layout or type errors).
This module builds the launch records the ops would issue for a set of shapes, dtypes and
mask/option combinations (the same planners the ops use, on small CPU tensors, without
launching) and compiles each distinct variant with ``triton.compile`` for sm_90.

Run it without ``TRITON_INTERPRET`` (kernels must be ``JITFunction`` objects)::

    python -m fastpe.kernels.triton.compile_check [--jobs N] [--list]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys
import time

import torch

MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90

TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1",
}


def signature_of(launch):
    sig = {}
    for name, value in launch.args.items():
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.__name__}: cannot type argument {name}={value!r}")
    for name in launch.constexprs:
        sig[name] = "constexpr"
    return sig


def variant_key(launch):
    sig = signature_of(launch)
    consts = tuple(sorted((k, str(v)) for k, v in launch.constexprs.items()))
    return (launch.kernel.__name__, tuple(sorted(sig.items())), consts, launch.num_warps, launch.num_stages)


# ----------------------------------------------------------------------------------------------
# the variants the ops ship
# ----------------------------------------------------------------------------------------------


def _rmha_launches(b, h, lq, lk, dh, dv, dtype, masks, kmax=4, per_head=False, tf32=False, v_per_head=None):
    from fastpe.kernels.triton import rmha

    q = torch.zeros(b, h, lq, dh, dtype=dtype)
    k = torch.zeros(b, h, lk, dh, dtype=dtype)
    v = torch.zeros(b, h, lk, dv, dtype=dtype)
    v_per_head = per_head if v_per_head is None else v_per_head
    rk = torch.zeros(h if per_head else 1, 2 * kmax + 1, dh, dtype=dtype)
    rv = torch.zeros(h if v_per_head else 1, 2 * kmax + 1, dv, dtype=dtype)
    kpm = torch.zeros(b, lk, dtype=torch.bool) if "padding" in masks else None
    bias = torch.zeros(1, 1, lq, lk, dtype=dtype) if "bias" in masks else None
    dropout = 0.1 if "dropout" in masks else 0.0
    seed = torch.zeros(1, dtype=torch.int64) if dropout else None
    causal = "causal" in masks
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out, lse, p_sums, fwd = rmha.plan_forward(q, k, v, rk, rv, kpm, bias, seed, causal, dropout, 0.1)
        *_grads, bwd = rmha.plan_backward(out, q, k, v, rk, rv, kpm, bias, seed, out, lse, p_sums, causal, dropout, 0.1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return fwd + bwd


def rmha_variants():
    """One variant per distinct code path and shipped tile shape (each takes 2-6 s to compile,
    so this is not the full product of dtypes, options and shapes)."""
    every = ("padding", "bias", "causal", "dropout")
    launches = []
    # every dtype with every mask feature: bf16 / fp32 (IEEE) fused backward, fp16 split backward
    launches += _rmha_launches(256, 2, 50, 50, 90, 90, torch.bfloat16, every)  # two-chunk head size
    launches += _rmha_launches(256, 2, 50, 50, 30, 30, torch.float32, every)
    launches += _rmha_launches(8, 2, 200, 200, 90, 90, torch.float16, every)  # two key blocks, split
    # the benchmark shape classes: fused (TF32 and bf16) and split with 64-blocks
    launches += _rmha_launches(512, 2, 50, 50, 32, 32, torch.float32, ("padding",), tf32=True)
    launches += _rmha_launches(512, 2, 50, 50, 32, 32, torch.bfloat16, ("padding",))
    launches += _rmha_launches(256, 2, 200, 200, 64, 64, torch.bfloat16, ("padding",))
    # one query block over two key blocks: dk, dv stored per key block (float32: in column pairs)
    launches += _rmha_launches(128, 1, 75, 75, 90, 90, torch.float32, ("padding", "dropout"))
    # 41 buckets, dv != dh, Lq != Lk, a 16-wide second chunk; and the largest head size
    launches += _rmha_launches(64, 2, 37, 75, 130, 50, torch.bfloat16, ("causal",), kmax=20, per_head=True, v_per_head=False)
    launches += _rmha_launches(64, 2, 37, 75, 256, 256, torch.bfloat16, ("padding",))
    return launches


def _interval_launches(b, h, L, dh, dv, dtype, masks, span=256, per_head=False):
    from fastpe.kernels.triton import interval

    q = torch.zeros(b, h, L, dh, dtype=dtype)
    v = torch.zeros(b, h, L, dv, dtype=dtype)
    rk = torch.zeros(h if per_head else 1, span + 1, dh, dtype=dtype)
    rv = torch.zeros(h if per_head else 1, span + 1, dv, dtype=dtype)
    tau = torch.zeros(b, L, dtype=torch.int32)
    kpm = torch.zeros(b, L, dtype=torch.bool) if "padding" in masks else None
    bias = torch.zeros(1, 1, L, L, dtype=dtype) if "bias" in masks else None
    dropout = 0.1 if "dropout" in masks else 0.0
    seed = torch.zeros(1, dtype=torch.int64) if dropout else None
    causal = "causal" in masks
    out, lse, fwd = interval.plan_forward(q, q, v, rk, rv, tau, kpm, bias, seed, causal, dropout, 0.1)
    *_grads, bwd = interval.plan_backward(out, q, q, v, rk, rv, tau, kpm, bias, seed, out, lse, causal, dropout, 0.1)
    return fwd + bwd


def interval_variants():
    """Time-interval attention, K = 256 with every mask feature: fp16 with one key block per
    sequence, bf16 with two key blocks (the forward's two passes) and a two-chunk head size. (The
    backward kernel takes half a minute to compile: the benchmark shapes are compiled by
    benchmarks/static_report.py --ops tisas.)"""
    every = ("padding", "bias", "causal", "dropout")
    return (_interval_launches(64, 2, 50, 30, 30, torch.float16, every)
            + _interval_launches(8, 2, 200, 90, 90, torch.bfloat16, every, per_head=True))


def _positions(kind, b, L, rows, dtype=torch.int64):
    if kind == "none":
        return None
    if kind == "1d":
        return torch.zeros(L, dtype=dtype)
    return torch.zeros(b, L, dtype=dtype)


def rotation_variants():
    from fastpe.kernels.triton import rotations

    launches = []
    for dtype, interleaved, pos_kind, transposed in [
        (torch.bfloat16, False, "none", True),
        (torch.float32, True, "2d", False),
    ]:
        b, L, h, d = 512, 50, 2, 32
        x = torch.zeros(b, h, L, d, dtype=dtype).transpose(1, 2) if transposed else torch.zeros(b, L, h, d, dtype=dtype)
        angles = torch.zeros(L + 5, d // 2, dtype=dtype)
        pos = _positions(pos_kind, b, L, L + 5)
        _y, fwd = rotations.plan_rotary_forward(x, angles, pos, interleaved)
        _dx, _da, bwd = rotations.plan_rotary_backward(x, x, angles, pos, interleaved)
        launches += fwd + bwd
    for dtype, pos_kind in [(torch.bfloat16, "none"), (torch.float16, "1d")]:
        b, L, d = 128, 75, 90
        x = torch.zeros(b, L, d, dtype=dtype)
        angles = torch.zeros(L, d // 2, dtype=dtype)
        pos = _positions(pos_kind, b, L, L, dtype=torch.int32 if dtype == torch.float16 else torch.int64)
        _y, fwd = rotations.plan_rotatory_forward(x, angles, pos)
        _da, bwd = rotations.plan_rotatory_backward(x, angles, pos)
        launches += fwd + bwd
    return launches


def concat_variants():
    from fastpe.kernels.triton import concat

    launches = []
    for dtype, pos_kind, has_bias, tf32, (b, L, d_in, d_pos, d_out) in [
        (torch.bfloat16, "none", True, False, (512, 50, 64, 64, 64)),
        (torch.float16, "1d", False, False, (128, 75, 90, 90, 90)),
        (torch.float32, "2d", True, False, (256, 200, 64, 32, 64)),
        (torch.float32, "none", True, True, (256, 200, 64, 32, 64)),
        (torch.bfloat16, "2d", True, False, (64, 50, 160, 48, 192)),  # d_out over one tile: dx as its own GEMM
    ]:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            x = torch.zeros(b, L, d_in, dtype=dtype)
            table = torch.zeros(L + 3, d_pos, dtype=dtype)
            weight = torch.zeros(d_out, d_in + d_pos, dtype=dtype)
            bias = torch.zeros(d_out, dtype=dtype) if has_bias else None
            pos = _positions(pos_kind, b, L, L + 3)
            y, fwd = concat.plan_forward(x, table, weight, bias, pos)
            *_grads, bwd = concat.plan_backward(y, x, table, weight, pos, has_bias)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        launches += fwd + bwd
    return launches


def all_variants():
    return rmha_variants() + interval_variants() + rotation_variants() + concat_variants()


# ----------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------


def _compile_one(index):
    import triton
    from triton.backends.compiler import GPUTarget

    launch = _unique_variants()[index]
    start = time.perf_counter()
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature_of(launch), constexprs=dict(launch.constexprs))
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # report every failing variant, not just the first
        return index, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - start
    # the driver refuses a launch needing more shared memory than an SM has (H100/H200: 227 KiB)
    shared = compiled.metadata.shared
    if shared > MAX_SHARED:
        return index, False, f"needs {shared} bytes of shared memory, more than {MAX_SHARED}", time.perf_counter() - start
    narrow = narrow_mma_operands(compiled.asm["ttgir"])
    if narrow:
        return index, False, (f"16-bit warp-level MMA operands in narrower fragments ({', '.join(narrow)}): a narrow "
                              "load (a uint8 mask?) reaches them through elementwise operations, and every operand "
                              "register then costs a move; see rmha._mask_barrier"), \
            time.perf_counter() - start
    return index, True, "", time.perf_counter() - start


_DOT_OPERAND = re.compile(r"tensor<[0-9x]+x(f16|bf16), #ttg\.dot_op<\{opIdx = (\d), parent = #(\w+), kWidth = (\d+)\}>>")
_MMA = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", re.M)


def narrow_mma_operands(ttgir: str) -> list[str]:
    """The 16-bit operands of warp-level (version 2) MMAs whose register fragments Triton sized for
    narrower data (``kWidth`` above 2): it sizes them by the narrowest load an operand derives from
    through elementwise operations, masks included (see ``rmha._mask_barrier``)."""
    version = dict(_MMA.findall(ttgir))
    return sorted({f"operand {op} kWidth {k}" for _t, op, parent, k in _DOT_OPERAND.findall(ttgir)
                   if version.get(parent) == "2" and int(k) > 2})


_CACHE = None


def _unique_variants():
    global _CACHE
    if _CACHE is None:
        seen = {}
        for launch in all_variants():
            seen.setdefault(variant_key(launch), launch)
        _CACHE = list(seen.values())
    return _CACHE


def describe(launch):
    consts = ", ".join(f"{k}={v}" for k, v in launch.constexprs.items())
    dtypes = sorted({TYPES[v.dtype] for v in launch.args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return f"{launch.kernel.__name__}[{'/'.join(dtypes)}; {consts}; warps={launch.num_warps}, stages={launch.num_stages}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--list", action="store_true", help="list the variants without compiling")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (kernels must be JIT functions)", file=sys.stderr)
        return 2
    variants = _unique_variants()
    if args.list:
        for launch in variants:
            print(describe(launch))
        print(f"{len(variants)} variants")
        return 0
    start = time.perf_counter()
    failures = []
    if args.jobs > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_one, range(len(variants))))
    else:
        results = [_compile_one(i) for i in range(len(variants))]
    for index, ok, message, seconds in results:
        if not ok:
            failures.append(f"{describe(variants[index])}\n    {message.splitlines()[0] if message else ''}\n{message}")
    print(f"compiled {len(variants) - len(failures)}/{len(variants)} variants for sm_90 in {time.perf_counter() - start:.1f} s")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
