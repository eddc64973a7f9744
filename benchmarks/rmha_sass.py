"""Static sm_90a numbers of the Triton relative attention, without a GPU.

Builds the launches ``fastpe.kernels.triton.rmha`` plans at the benchmark shapes (bf16, key
padding, with and without dropout), compiles each for sm_90a, and reads registers and spill
bytes from ``ptxas -v`` and the hot loop from the SASS (the innermost loop with the largest
body): its instruction count and the score elements one pass handles per thread.

    python benchmarks/rmha_sass.py [--out FILE.md] [--shapes S1,S2,S3]

Run without TRITON_INTERPRET. Minimal by design: the project-wide static report covers every op.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

# this checkout's fastpe, whatever an editable install points at
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # name: (B, h, L, dh)
    "S1": (512, 2, 50, 32),
    "S2": (256, 2, 200, 64),
    "S3": (128, 1, 75, 90),
}
SMS = 132
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SHARED_PER_SM = 233472


def _bin(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def plan(shape, dropout):
    from fastpe.kernels.triton import rmha

    b, h, L, dh = shape
    dt = torch.bfloat16
    q = torch.zeros(b, h, L, dh, dtype=dt)
    rk = torch.zeros(1, 9, dh, dtype=dt)
    kpm = torch.zeros(b, L, dtype=torch.bool)
    seed = torch.zeros(1, dtype=torch.int64) if dropout else None
    p = 0.1 if dropout else 0.0
    out, lse, fwd = rmha.plan_forward(q, q, q, rk, rk, kpm, None, seed, False, p, 0.1)
    *_g, bwd = rmha.plan_backward(out, q, q, q, rk, rk, kpm, None, seed, out, lse, False, p, 0.1)
    return fwd, bwd


def specialized_source(launch):
    """The kernel as a launch compiles it: Triton's launcher turns integer arguments equal to 1 into
    constants and marks pointers and integers divisible by 16 (which lets loads vectorize), so
    the same is done here with its own specialization rule."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from fastpe.kernels.triton.compile_check import signature_of

    signature = signature_of(launch)
    constexprs = dict(launch.constexprs)
    attrs = {}
    names = list(launch.kernel.arg_names)
    for name, value in launch.args.items():
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(key, str) and "D" in key:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_launch(launch):
    import triton
    from triton.backends.compiler import GPUTarget

    src = specialized_source(launch)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def ptxas_usage(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_bin("ptxas"), "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return regs, stores + loads


def sass_lines(cubin):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
    instrs = []  # (address, text)
    for line in res.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2).strip()))
    return instrs


def hot_loop(instrs):
    """(instruction count, mnemonic histogram) of the innermost loop with the largest body."""
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    loops = []
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if not m or m.group(1) is None:
            continue
        target = int(m.group(1), 16)
        if target <= addr and target in index:
            loops.append((index[target], i))
    if not loops:
        return None, {}
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    start, end = max(innermost, key=lambda lp: lp[1] - lp[0])
    body = [t for _, t in instrs[start:end + 1] if not t.startswith("NOP")]
    hist = {}
    for t in body:
        op = t.split()[0] if not t.startswith("@") else t.split()[1]
        op = op.split(".")[0]
        hist[op] = hist.get(op, 0) + 1
    return len(body), hist


def score_elements(launch):
    c = launch.constexprs
    return c["BLOCK_M"] * c["BLOCK_N"] / (32 * launch.num_warps)


def occupancy(regs, shared, warps):
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_shared = SHARED_PER_SM // (shared + 1024) if shared else 32
    return max(0, min(by_regs, by_warps, by_shared, 32))


def measure(name, shape, dropout, direction, launch):
    compiled = compile_launch(launch)
    regs, spills = ptxas_usage(compiled.asm["ptx"])
    count, hist = hot_loop(sass_lines(compiled.asm["cubin"]))
    shared = compiled.metadata.shared
    ctas = occupancy(regs, shared, launch.num_warps)
    programs = math.prod(launch.grid)
    waves = programs / (ctas * SMS) if ctas else float("inf")
    elems = score_elements(launch)
    return dict(
        shape=name, direction=direction, dropout=dropout, kernel=launch.kernel.__name__, grid=launch.grid,
        block=(launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]), num_warps=launch.num_warps,
        regs=regs, spill_bytes=spills, shared=shared, ctas_per_sm=ctas, waves=waves,
        hot_loop=count, elems=elems, per_elem=(count / elems) if count else None, hist=hist,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="S1,S2,S3")
    parser.add_argument("--directions", default="fwd,bwd")
    parser.add_argument("--dropout", default="no,yes")
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--hist", action="store_true", help="print the hot loop's mnemonic histogram")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("rmha_sass: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = []
    for name in args.shapes.split(","):
        for dropout in [d == "yes" for d in args.dropout.split(",")]:
            fwd, bwd = plan(SHAPES[name], dropout)
            for direction, launches in (("fwd", fwd), ("bwd", bwd)):
                if direction in args.directions.split(","):
                    rows.append(measure(name, SHAPES[name], dropout, direction, launches[0]))
    head = ("| shape | dir | dropout | block | warps | grid | regs | spill B | smem B | CTAs/SM | waves "
            "| hot loop instr | score elems/thread | instr/elem |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per = f"{r['per_elem']:.1f}" if r["per_elem"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['direction']} | {'yes' if r['dropout'] else 'no'} | {r['block'][0]}x{r['block'][1]} "
            f"| {r['num_warps']} | {'x'.join(map(str, r['grid']))} | {r['regs']} | {r['spill_bytes']} | {r['shared']} "
            f"| {r['ctas_per_sm']} | {r['waves']:.2f} | {r['hot_loop']} | {r['elems']:g} | {per} |"
        )
        if args.hist:
            top = sorted(r["hist"].items(), key=lambda kv: -kv[1])[:14]
            lines.append("|  | " + ", ".join(f"{k} {v}" for k, v in top) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
