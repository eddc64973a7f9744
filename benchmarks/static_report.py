"""Static sm_90a report of every kernel fastpe launches, without a GPU.

For each op (relative attention, time-interval attention, rotary, rotatory, concat-projection),
shape, dropout setting and direction, the op's own planners build the launches the op would issue
(on small CPU tensors laid out as the modules lay them out, nothing is launched). Each launch is specialized
exactly as Triton's JIT would at launch time (16-byte alignment, integer arguments equal to 1)
and compiled for sm_90a; the CUDA kernels in ``csrc/`` are compiled with ``nvcc -Xptxas -v``.
From the compiled artefacts alone it reads registers, spills and shared memory (ptxas), the
occupancy and waves they allow, the SASS (cuobjdump) and its hot loop, and writes
``DIR/static_sm90.json`` and ``DIR/static_sm90.md``::

    python3 benchmarks/static_report.py --out DIR [--ops rmha,concat] [--shapes S2,B4h1L20dh16]
        [--dropout both|off|on] [--no-cuda] [--no-trace] [--jobs N] [--compare OLD/static_sm90.json]

Shapes: S1 = B512 h2 L50 dh32, S2 = B256 h2 L200 dh64, S3 = B128 h1 L75 dh90, or any
``B<b>h<h>L<l>dh<dh>``. The non-attention ops run at the same size: rotary on ``x [B, L, h, dh]``,
rotatory and concat-projection on ``x [B, L, d = h*dh]``.

A SASS loop is a backward branch to an instruction on every path to it (a natural loop of the
control-flow graph; ptxas also branches back from cold paths it places after the code, which are
not loops). The hot loop of a kernel is the SASS loop with the most instructions of its
own (outside loops nested in it); for the Triton kernels, among the loops with at least a quarter
of that count, the one with the most tensor-core work of its own (then the most instructions):
the loop over score tiles, not an outer loop over query blocks whose own epilogue may be longer,
nor a short inner loop of a few MMAs. Its count is static (every path of the body). For the
relative-attention kernels (those with ``BLOCK_M`` and ``BLOCK_N``) one pass of a loop handles
one ``BLOCK_M x BLOCK_N`` score tile, so ``hot_loop_score_elements`` is that tile per thread.

Time model per launch (README, "Static kernel report"): the largest of bytes / HBM bandwidth,
warp instructions / issue rate and tensor-core FLOPs / dense rate, the last two for the busiest
SM (``ceil(CTAs / SMs)`` equal CTAs; see :func:`busiest_sm_factor`). Instructions: each SASS loop
is matched to the ``for`` of the kernel source it compiles (the source line of its backward
branch, from ``nvdisasm -g``), and its own instructions count as often as that loop's body runs
over the grid, counted by running the planned launch under Triton's interpreter (the first and
last program per grid row and, where they differ, a bisection for where the first one's counts
end; all programs when those miss a loop: see :func:`trace_trips`); the instructions outside
every loop count once per program. Every path of a loop body counts (a branch skipped at run
time still counts), so the
term is an upper bound of the work per iteration. Where a loop cannot be matched (or with
``--no-trace``) the older heuristic applies, marked "heuristic": loops of at least a quarter of
the hot loop's size once per score tile (it charges a tile every alternative loop and a loop
over diagonals once), every other loop once, and for kernels without a score tile that is a
lower bound (marked ``>=``). Bytes: every distinct tensor a launch is given, touched once. The
baseline beside each op: SDPA-equivalent FLOPs and bytes for attention, a same-size clone for
rotary/rotatory, ``nn.Linear`` for concat-projection. Global-memory atomics and reductions are
counted the same way (``global_atomic_instructions``) but not priced: :func:`atomics_table` shows
the L2 rate each launch's modelled time assumes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# H200 SXM (sm_90a). Rates are the datasheet peaks the model divides by.
MACHINE = dict(
    name="H200 SXM (sm_90a)", sms=132, hbm_bytes_per_s=4.8e12,
    issue_per_s=132 * 4 * 1.98e9,  # 132 SMs x 4 schedulers x 1 warp instruction/clock x 1.98 GHz
    tensor_flops_per_s=989e12,  # dense bf16/fp16
    registers_per_partition=16384, partitions=4, max_warps_per_sm=64, max_ctas_per_sm=32,
    shared_per_sm=233472, shared_reserved_per_cta=1024,
)

SHAPES = {"S1": (512, 2, 50, 32), "S2": (256, 2, 200, 64), "S3": (128, 1, 75, 90)}
OPS = ("rmha", "tisas", "rotary", "rotatory", "concat")
ATTENTION_OPS = ("rmha", "tisas")  # score-tile kernels, with and without dropout
KMAX = 4  # RMHA-4
TIME_SPAN = 256  # TiSASRec's K: interval tables of K + 1 rows
DROPOUT_P = 0.1
CUDA_SOURCES = {  # csrc file -> ops whose kernels it holds (a file not listed counts for every op)
    "relative_attention_fwd.cu": ("rmha",), "relative_attention_bwd.cu": ("rmha",),
    "rotary.cu": ("rotary", "rotatory"), "concat_projection.cu": ("concat",),
    "reduce.cu": ("rmha", "rotary", "rotatory", "concat"),
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def parse_shape(text: str):
    if text in SHAPES:
        return text, SHAPES[text]
    m = re.fullmatch(r"B(\d+)h(\d+)L(\d+)dh(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}: use S1, S2, S3 or B<b>h<h>L<l>dh<dh>, e.g. B4h1L20dh16")
    return text, tuple(int(g) for g in m.groups())


# ----------------------------------------------------------------------------------------------
# the launches each op plans (the ops' own planners, on CPU tensors laid out as the modules do)
# ----------------------------------------------------------------------------------------------


def _heads_view(t, b, length, h, dh):
    return t.view(b, length, h, dh).transpose(1, 2)  # [B, h, L, dh], as fastpe.nn's _heads


def plan_op(op, dims, dtype, dropout):
    """{direction: [Launch]} and the baseline {direction: (name, bytes, flops)} of one problem."""
    from fastpe.kernels.triton import concat, interval, rmha, rotations

    b, h, length, dh = dims
    d = h * dh
    size = dtype.itemsize
    if op in ATTENTION_OPS:
        # self-attention: q, k, v are head views of one [B, L, 3d] projection
        q, k, v = (_heads_view(t, b, length, h, dh) for t in torch.zeros(b, length, 3 * d, dtype=dtype).chunk(3, dim=-1))
        rows = 2 * KMAX + 1 if op == "rmha" else TIME_SPAN + 1
        rel_k, rel_v = torch.zeros(1, rows, dh, dtype=dtype), torch.zeros(1, rows, dh, dtype=dtype)
        kpm = torch.zeros(b, length, dtype=torch.bool)
        p = DROPOUT_P if dropout else 0.0
        seed = torch.zeros(1, dtype=torch.int64) if dropout else None
        scale = 1.0 / math.sqrt(dh)
        dout = _heads_view(torch.zeros(b, length, d, dtype=dtype), b, length, h, dh)  # grad of out.transpose(1, 2)
        if op == "rmha":
            out, lse, p_sums, fwd = rmha.plan_forward(q, k, v, rel_k, rel_v, kpm, None, seed, False, p, scale)
            *_grads, bwd = rmha.plan_backward(dout, q, k, v, rel_k, rel_v, kpm, None, seed, out, lse, p_sums, False, p,
                                              scale)
        else:
            tau = torch.zeros(b, length, dtype=torch.int32)  # the int32 time steps the op computes
            out, lse, fwd = interval.plan_forward(q, k, v, rel_k, rel_v, tau, kpm, None, seed, False, p, scale)
            *_grads, bwd = interval.plan_backward(dout, q, k, v, rel_k, rel_v, tau, kpm, None, seed, out, lse, False,
                                                  p, scale)
        per_tensor = b * h * length * dh * size
        flops = 4 * b * h * length * length * dh  # S = QK^T, O = PV; the backward does 2.5x that
        baseline = {"fwd": ("SDPA", 4 * per_tensor + b * length, flops),  # q, k, v, mask -> o
                    "bwd": ("SDPA", 8 * per_tensor + b * length + 4 * b * h * length, 2.5 * flops)}  # + do, lse -> dq, dk, dv
        return {"fwd": fwd, "bwd": bwd}, baseline
    if op == "rotary":
        x = torch.zeros(b, length, 3 * d, dtype=dtype).chunk(3, dim=-1)[0].view(b, length, h, dh)  # q of the projection
        angles = torch.zeros(length, dh // 2, dtype=dtype)
        _y, fwd = rotations.plan_rotary_forward(x, angles, None, False)
        _dx, _da, bwd = rotations.plan_rotary_backward(torch.zeros(b, length, h, dh, dtype=dtype), x, angles, None, False)
        clone = ("clone", 2 * b * length * d * size, 0)
        return {"fwd": fwd, "bwd": bwd}, {"fwd": clone, "bwd": clone}
    if op == "rotatory":
        x = torch.zeros(b, length, d, dtype=dtype)
        angles = torch.zeros(length, d // 2, dtype=dtype)
        _y, fwd = rotations.plan_rotatory_forward(x, angles, None)
        _da, bwd = rotations.plan_rotatory_backward(torch.zeros_like(x), angles, None)
        clone = ("clone", 2 * b * length * d * size, 0)
        return {"fwd": fwd, "bwd": bwd}, {"fwd": clone, "bwd": clone}
    if op == "concat":
        x = torch.zeros(b, length, d, dtype=dtype)
        table = torch.zeros(length, d, dtype=dtype)
        weight, bias = torch.zeros(d, 2 * d, dtype=dtype), torch.zeros(d, dtype=dtype)
        _y, fwd = concat.plan_forward(x, table, weight, bias, None)
        *_grads, bwd = concat.plan_backward(torch.zeros(b, length, d, dtype=dtype), x, table, weight, None, True)
        m = b * length
        # nn.Linear(2d -> d) on the concatenated input: forward, and dX + dW (+ db) backward
        fwd_bytes = (m * 2 * d + 2 * d * d + m * d) * size
        bwd_bytes = (m * d + m * 2 * d + 2 * d * d + m * 2 * d + 2 * d * d) * size
        flops = 2 * m * 2 * d * d
        return {"fwd": fwd, "bwd": bwd}, {"fwd": ("nn.Linear", fwd_bytes, flops), "bwd": ("nn.Linear", bwd_bytes, 2 * flops)}
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------
# specializing and compiling a launch as Triton's JIT would
# ----------------------------------------------------------------------------------------------


def _tools():
    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return {name: str(bin_dir / name) for name in ("ptxas", "cuobjdump", "nvdisasm")}


def specialize(launch):
    """(signature, constexprs, attrs, options) exactly as the JIT computes them when it launches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, debug=False)
    bound, spec, options = binder(**launch.args, **launch.constexprs, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def variant_key(launch):
    signature, constexprs, attrs, _options = specialize(launch)
    return (launch.kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
            repr(sorted(attrs.items())), launch.num_warps, launch.num_stages)


def compile_launch(launch) -> dict:
    """Compile for sm_90a and analyse: registers, spills, shared memory, SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialize(launch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    log = io.StringIO()
    previous = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options.__dict__)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = previous
    tools = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "k.ptx"
        cubin = pathlib.Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas_log = log.getvalue()
        if "Used" not in ptxas_log:  # Triton's cache served the kernel: run ptxas as Triton does
            ptx.write_text(compiled.asm["ptx"])
            out = str(pathlib.Path(tmp) / "p.cubin")
            ptxas_log = _run([tools["ptxas"], "-lineinfo", "-v", "--gpu-name=sm_90a", str(ptx), "-o", out])
        sass = _run([tools["cuobjdump"], "-sass", str(cubin)])
        line_of = parse_line_info(_run([tools["nvdisasm"], "-c", "-g", str(cubin)]))
    resources = parse_ptxas(ptxas_log)
    if len(resources) != 1:
        raise RuntimeError(f"{launch.kernel.__name__}: expected one ptxas entry, got {list(resources)}:\n{ptxas_log}")
    res = next(iter(resources.values()))
    res["shared_bytes"] += compiled.metadata.shared  # Triton's shared memory is dynamic
    functions = parse_sass(sass)
    return dict(res, **analyse_sass(next(iter(functions.values())), line_of, by_tensor_work=True))


def _run(cmd) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------
# reading ptxas and SASS
# ----------------------------------------------------------------------------------------------


def parse_ptxas(log: str) -> dict:
    """{mangled entry: {registers, spill_store_bytes, spill_load_bytes, spill_bytes, stack_bytes, shared_bytes}}."""
    out = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = out.setdefault(m.group(1), dict(registers=None, spill_store_bytes=0, spill_load_bytes=0,
                                                       stack_bytes=0, shared_bytes=0))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and "Function properties for" not in line:
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(s.group(1)) if s else 0
            current = None  # the entry's summary line closes it (device functions follow)
    for res in out.values():
        res["spill_bytes"] = res["spill_store_bytes"] + res["spill_load_bytes"]
    return out


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict:
    """{function: [(address, opcode, operands, guard)]} from ``cuobjdump -sass``; ``guard`` is the
    instruction's predicate (``"@!P0"``), empty when it always runs."""
    functions = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s*:\s*(\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _SASS_LINE.match(line)
        if m and current is not None:
            guard = re.match(r"^(@!?U?P[T0-9]+)\s+", m.group(2))
            body = m.group(2)[guard.end():] if guard else m.group(2)
            opcode, _, operands = body.partition(" ")
            current.append((int(m.group(1), 16), opcode, operands.strip(), guard.group(1) if guard else ""))
    return functions


def parse_line_info(text: str) -> dict:
    """{address: "file.py:line"} from ``nvdisasm -g`` (the source line of each SASS instruction)."""
    line_of, current = {}, None
    for line in text.splitlines():
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            current = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/", line)
        if m and current is not None:
            line_of[int(m.group(1), 16)] = current
    return line_of


CATEGORIES = {  # opcode (before the first dot) -> class, for the hot-loop mix
    "tensor": {"HGMMA", "HMMA", "IMMA", "WGMMA", "QGMMA", "IGMMA"},
    "compare_select": {"ISETP", "FSETP", "DSETP", "HSETP2", "SEL", "FSEL", "PLOP3", "P2R", "R2P",
                       "FMNMX", "VIMNMX", "IMNMX", "HMNMX2"},
    "fp_arith": {"FADD", "FMUL", "FFMA", "HADD2", "HMUL2", "HFMA2", "MUFU", "FCHK", "DADD", "DMUL", "DFMA"},
    "int_arith": {"IMAD", "IADD3", "VIADD", "LOP3", "SHF", "LEA", "IABS", "UIADD3", "UIMAD", "ULOP3", "USHF",
                  "ULEA", "SGXT", "IADD", "FLO", "POPC", "BREV", "PRMT"},
    "convert": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"},
    "memory": {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LD", "ST", "ATOMG", "ATOM", "REDG", "RED", "ATOMS",
               "UBLKCP", "UTMALDG", "UTMASTG", "LDC", "ULDC"},
    "spill": {"LDL", "STL"},
    "sync_control": {"BAR", "BRA", "BSSY", "BSYNC", "WARPSYNC", "SHFL", "EXIT", "WARPGROUP", "DEPBAR", "LDGDEPBAR",
                     "SYNCS", "VOTE", "MEMBAR", "CALL", "RET"},
}
_CATEGORY_OF = {op: cat for cat, ops in CATEGORIES.items() for op in ops}


def _tensor_flops(opcode: str) -> float:
    """FLOPs one warp's instruction does: HMMA.16816 is m16n8k16 per warp; HGMMA.64xNxK is one
    warpgroup's (four warps') 64xNxK."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c / 4
    m = re.match(r"HMMA\.(\d+)", opcode)
    if m:
        shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(m.group(1))
        return 2 * shape[0] * shape[1] * shape[2] if shape else 0.0
    return 0.0


# Global-memory atomics and reductions (ATOMS, shared memory, and REDUX, a warp's register
# reduction, are not): performed at the L2, whose throughput the time model has no term for.
GLOBAL_ATOMICS = {"ATOMG", "ATOM", "REDG", "RED"}


def _global_atomic(opcode: str) -> int:
    return int(opcode.split(".")[0] in GLOBAL_ATOMICS)


def _target_address(operands):
    """The code address among a branch's or call's operands, else None."""
    m = re.search(r"(?:^|[ ,`(])(0x[0-9a-f]+)", operands)
    return int(m.group(1), 16) if m else None


def _branch_target(opcode, operands):
    """Address a direct branch goes to, else None."""
    return _target_address(operands) if opcode.split(".")[0] in ("BRA", "JMP") else None


def _successors(instructions):
    """Per instruction, the indices control can go to next: a branch's or call's target, and the
    next instruction unless the instruction always leaves (an unguarded ``BRA``/``JMP``, ``EXIT``,
    ``RET``; a call returns to the next one). ``BRA.DIV`` (taken when the warp has diverged) and
    guarded ones may fall through."""
    index_of = {addr: i for i, (addr, *_rest) in enumerate(instructions)}
    succ = []
    for i, (_addr, opcode, operands, guard) in enumerate(instructions):
        base = opcode.split(".")[0]
        target = _target_address(operands) if base in ("BRA", "JMP", "CALL") else None
        out = [index_of[target]] if target in index_of else []
        always = guard in ("", "@PT") and ".DIV" not in opcode and not re.match(r"!?U?P[T0-9]+,", operands)
        if not (always and base in ("BRA", "JMP", "EXIT", "RET", "KILL")) and i + 1 < len(instructions):
            out.append(i + 1)
        succ.append(out)
    return succ


def _dominators(succ):
    """Immediate dominator per reachable instruction (``{index: index}``, the entry maps to itself),
    by the iterative algorithm of Cooper, Harvey and Kennedy over reverse postorder."""
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:  # postorder without recursion
        node, children = stack[-1]
        child = next((c for c in children if c not in seen), None)
        if child is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(child)
            stack.append((child, iter(succ[child])))
    rpo = order[::-1]
    position = {n: k for k, n in enumerate(rpo)}
    preds = collections.defaultdict(list)
    for n in rpo:
        for c in succ[n]:
            preds[c].append(n)
    idom = {0: 0}
    changed = True
    while changed:
        changed = False
        for n in rpo[1:]:
            done = [p for p in preds[n] if p in idom]
            new = done[0]
            for p in done[1:]:
                a, b = p, new
                while a != b:
                    while position[a] > position[b]:
                        a = idom[a]
                    while position[b] > position[a]:
                        b = idom[b]
                new = a
            if idom.get(n) != new:
                idom[n] = new
                changed = True
    return idom


def find_loops(instructions):
    """Loops as (start index, end index) of a backward branch and its target, widest first: the
    back edges of natural loops, where the target dominates the branch (every path from the
    entry to the branch passes the target). Other backward branches are not loops: ptxas places
    cold paths (a warp-collective reduction for a diverged warp, entered by ``BRA.DIV``) after
    the code and branches back into the loop from there."""
    if not instructions:
        return []
    succ = _successors(instructions)
    idom = _dominators(succ)
    index_of = {addr: i for i, (addr, *_rest) in enumerate(instructions)}

    def dominates(a, b):
        while b != a and idom[b] != b:
            b = idom[b]
        return b == a

    loops = set()
    for i, (addr, opcode, operands, _guard) in enumerate(instructions):
        target = _branch_target(opcode, operands)
        # a branch to itself is the trap after EXIT (unreachable), not a loop; nor is a branch to
        # an address that is no instruction of the function
        t = index_of.get(target)
        if i in idom and t is not None and target < addr and dominates(t, i):
            loops.add((t, i))
    return sorted(loops, key=lambda se: (se[0], -se[1]))


def analyse_sass(instructions, line_of=None, by_tensor_work=False) -> dict:
    """Instruction counts of the whole kernel and of its hot loop (see the module docstring;
    ``by_tensor_work``: the Triton rule), and per loop its own instructions and tensor FLOPs
    (outside loops nested in it) and the source line of its backward branch (the ``for`` it
    compiles, given ``line_of`` from nvdisasm)."""
    real = [ins for ins in instructions if ins[1] != "NOP"]
    loops = [(s, e) for s, e in find_loops(instructions)]

    def summed(weight):  # a measure of the instructions s..e: the sum of weight(opcode)
        return lambda s, e: sum(weight(op) for _a, op, *_rest in instructions[s:e + 1])

    count, flops, atomics = summed(lambda op: op != "NOP"), summed(_tensor_flops), summed(_global_atomic)

    def inside(inner, outer):
        return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]

    outermost_nested = {}
    for loop in loops:
        nested = [other for other in loops if inside(other, loop)]
        outermost_nested[loop] = [n for n in nested if not any(inside(n, o) for o in nested)]

    def own_of(measure):  # per loop, what lies outside the loops nested in it
        return {loop: measure(*loop) - sum(measure(*n) for n in outermost_nested[loop]) for loop in loops}

    own, own_flops, own_atomics = own_of(count), own_of(flops), own_of(atomics)
    total_flops = sum(_tensor_flops(op) for _a, op, *_rest in real)
    total_atomics = sum(_global_atomic(op) for _a, op, *_rest in real)
    result = dict(
        sass_instructions=len(real),
        tensor_core_instructions=sum(1 for _a, op, *_rest in real if _CATEGORY_OF.get(op.split(".")[0]) == "tensor"),
        spill_instructions=sum(1 for _a, op, *_rest in real if op.split(".")[0] in ("LDL", "STL")),
        global_atomic_instructions=total_atomics,
        loops=len(loops),
    )
    result["loop_list"] = [dict(line=(line_of or {}).get(instructions[e][0]), instructions=own[(s, e)],
                                tensor_flops=own_flops[(s, e)], global_atomics=own_atomics[(s, e)]) for s, e in loops]
    result["outside_loops_instructions"] = len(real) - sum(own.values())
    result["outside_loops_tensor_flops"] = total_flops - sum(own_flops.values())
    result["outside_loops_global_atomics"] = total_atomics - sum(own_atomics.values())
    if not loops:
        return dict(result, hot_loop_instructions=0, hot_loop_tensor_core_instructions=0, hot_loop_mix={},
                    heavy_loop_instructions=0, heavy_loop_tensor_flops=0.0, once_instructions=len(real),
                    once_tensor_flops=total_flops)
    if by_tensor_work:  # Triton: among the loops of at least a quarter of the largest own size
        biggest = max(own.values())
        hot = max((loop for loop in loops if own[loop] * 4 >= biggest),
                  key=lambda loop: (own_flops[loop], own[loop], count(*loop)))
    else:
        hot = max(loops, key=lambda loop: (own[loop], count(*loop)))
    body = [ins for ins in instructions[hot[0]:hot[1] + 1] if ins[1] != "NOP"]
    mix = {}
    for _a, op, *_rest in body:
        cat = _CATEGORY_OF.get(op.split(".")[0], "other")
        mix[cat] = mix.get(cat, 0) + 1
    # loops at least a quarter of the hot loop's size run once per score tile (time model)
    heavy = [loop for loop in loops if own[loop] * 4 >= own[hot]]
    heavy = [loop for loop in heavy if not any(inside(loop, other) for other in heavy)]
    heavy_instructions = sum(count(*loop) for loop in heavy)
    heavy_flops = sum(flops(*loop) for loop in heavy)
    return dict(
        result,
        hot_loop_instructions=len(body),
        hot_loop_tensor_core_instructions=mix.get("tensor", 0),
        hot_loop_mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])),
        heavy_loop_instructions=heavy_instructions,
        heavy_loop_tensor_flops=heavy_flops,
        once_instructions=len(real) - heavy_instructions,
        once_tensor_flops=total_flops - heavy_flops,
    )


def occupancy(registers, shared_bytes, num_warps):
    """Resident CTAs per SM on sm_90 (registers per warp in 256-register units per partition)."""
    mc = MACHINE
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_regs = mc["partitions"] * (mc["registers_per_partition"] // regs_per_warp)
    limits = [warps_by_regs // num_warps, mc["max_warps_per_sm"] // num_warps, mc["max_ctas_per_sm"]]
    if shared_bytes:
        limits.append(mc["shared_per_sm"] // (shared_bytes + mc["shared_reserved_per_cta"]))
    return max(0, min(limits))


# ----------------------------------------------------------------------------------------------
# loop trip counts: the planned launches run under Triton's interpreter, a few programs per row
# ----------------------------------------------------------------------------------------------


# Constexprs the interpreter cannot run (inline assembly, libdevice's fast paths), replaced by
# their portable forms for tracing: neither changes a loop.
_INTERPRETABLE = {"FAST_TRIG": False, "CVT_ASM": False, "PTX": False}


def launch_spec(launch) -> dict:
    """A launch as JSON: its kernel by module and name, tensors by shape, strides and dtype."""
    def arg(value):
        if isinstance(value, torch.Tensor):
            return dict(tensor=list(value.shape), stride=list(value.stride()), dtype=str(value.dtype).removeprefix("torch."))
        return value

    consts = dict(launch.constexprs)
    for key, safe in _INTERPRETABLE.items():
        if key in consts:
            consts[key] = safe(consts[key]) if callable(safe) else safe
    return dict(module=launch.kernel.fn.__module__, kernel=launch.kernel.__name__, grid=list(launch.grid),
                args={k: arg(v) for k, v in launch.args.items()}, constexprs=consts,
                num_warps=launch.num_warps, num_stages=launch.num_stages)


def _zeros_like_spec(v):
    extent = 1 + sum((n - 1) * st for n, st in zip(v["tensor"], v["stride"]) if n > 0)
    return torch.zeros(extent, dtype=getattr(torch, v["dtype"])).as_strided(v["tensor"], v["stride"])


def trace_trips(specs) -> list:
    """For each launch spec (:func:`launch_spec`), ``{"file.py:line": iterations}``: how often the
    body of each ``for`` of the kernel's source runs over the whole grid. Needs ``TRITON_INTERPRET=1``
    (see :func:`traced_trips`). Along the grid's first axis (batch x heads, sequence groups, or
    persistent programs) the first and the last program run; when their counts differ, as in a
    persistent kernel whose first programs take one tile more than the rest, a bisection finds
    where the first program's counts end (assumed: programs ``0..p`` count like the first, the rest
    like the last, as ``range(pid, tiles, programs)`` gives; a third count found on the way falls
    back to the first program standing for all but the last). Every program along the other axes
    runs. The inputs are zeros: no key padding, and for the
    time-interval kernels all time steps equal, so their loops over the 64-bucket chunks a query
    block uses run once (a best case: real time steps use a few chunks). No other loop bound
    depends on the data."""
    import builtins
    import importlib

    from triton.runtime import interpreter

    counts = {}

    class CountedRange:
        """``range`` that counts its iterations per call site."""

        def __init__(self, *args):
            frame = sys._getframe(1)
            self.key = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            self.args = args
            counts.setdefault(self.key, 0)  # a loop that never runs is known to run 0 times

        def __iter__(self):
            for value in builtins.range(*self.args):
                counts[self.key] += 1
                yield value

    modules = [importlib.import_module(f"fastpe.kernels.triton.{name}") for name in ("concat", "interval", "rmha", "rotations")]
    builder = interpreter.interpreter_builder
    set_idx, set_dim = builder.set_grid_idx, builder.set_grid_dim
    out = []
    try:
        for module in modules:
            module.range = CountedRange
        for spec in specs:
            kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
            args = {k: _zeros_like_spec(v) if isinstance(v, dict) and "tensor" in v else v for k, v in spec["args"].items()}
            grid = tuple(spec["grid"]) + (1,) * (3 - len(spec["grid"]))
            builder.set_grid_dim = lambda _x, _y, _z, grid=grid: set_dim(*grid)  # the kernel sees its real grid

            def run(programs, kernel=kernel, args=args, spec=spec, grid=grid):
                """Counts of these programs along axis 0 (with every program along the others)."""
                builder.set_grid_idx = lambda x, y, z: set_idx(programs[x], y, z)
                counts.clear()
                kernel[(len(programs), grid[1], grid[2])](**args, **spec["constexprs"], num_warps=spec["num_warps"],
                                                          num_stages=spec["num_stages"])
                return dict(counts)

            if spec.get("all_programs"):
                out.append(run(list(range(grid[0]))))
                continue
            first = run([0])
            last = run([grid[0] - 1]) if grid[0] > 1 else first
            like_first = grid[0] - 1  # the last program that counts like the first
            if first != last:
                lo, hi = 0, grid[0] - 1
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    seen = run([mid])
                    if seen not in (first, last):
                        lo = grid[0] - 2  # not two-valued: the first stands for all but the last
                        break
                    lo, hi = (mid, hi) if seen == first else (lo, mid)
                like_first = lo
            n_first, n_last = like_first + 1, grid[0] - like_first - 1
            out.append({key: first.get(key, 0) * n_first + last.get(key, 0) * n_last for key in first.keys() | last.keys()})
    finally:
        builder.set_grid_idx, builder.set_grid_dim = set_idx, set_dim
        for module in modules:
            vars(module).pop("range", None)
    return out


def traced_trips(launches, all_programs=False) -> list | None:
    """:func:`trace_trips` of these launches in a child process with the interpreter on; None
    (and the heuristic model) if it fails. ``all_programs``: run every program of the grid (for
    kernels whose programs take different branches by their id, which the sampled programs miss)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump([dict(launch_spec(launch), all_programs=all_programs) for launch in launches], f)
        f.flush()
        proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--trace-trips", f.name],
                              capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"tracing loop trips failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# records and the time model
# ----------------------------------------------------------------------------------------------


def launch_bytes(launch) -> int:
    """Bytes of the distinct tensors a launch is given, each touched once: per storage, the
    elements of its distinct views, at most the span they cover (q, k, v of one projection
    count once each; a strided view counts its elements, not its span; a dummy argument that
    repeats another tensor counts nothing)."""
    per_storage = {}
    for value in launch.args.values():
        if not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        extent = 1 + sum((s - 1) * abs(st) for s, st in zip(value.shape, value.stride()))
        start = value.data_ptr()
        views, lo, hi = per_storage.get(value.untyped_storage().data_ptr(), ({}, start, start))
        views[(start, tuple(value.shape), value.stride())] = value.numel() * value.element_size()
        end = start + extent * value.element_size()
        per_storage[value.untyped_storage().data_ptr()] = (views, min(lo, start), max(hi, end))
    return sum(min(sum(views.values()), hi - lo) for views, lo, hi in per_storage.values())


def busiest_sm_factor(ctas):
    """How much more than its even share the busiest SM issues: equal CTAs spread over the SMs,
    the busiest gets ``ceil(ctas / SMs)`` of them (150 CTAs on 132 SMs: 2, so 1.76x the 150/132
    an even spread would give; 38 CTAs: 132/38, the other SMs idle). 1 when the CTAs divide evenly."""
    return math.ceil(ctas / MACHINE["sms"]) * MACHINE["sms"] / ctas


def model_time(bytes_, warp_instructions, tensor_flops, ctas=None):
    """The largest of the three terms; the issue and tensor terms are those of the busiest SM
    (:func:`busiest_sm_factor`) when the launch's CTA count is given (a baseline has none: ideal)."""
    tail = busiest_sm_factor(ctas) if ctas else 1.0
    terms = {
        "memory": bytes_ / MACHINE["hbm_bytes_per_s"],
        "issue": tail * warp_instructions / MACHINE["issue_per_s"],
        "tensor": tail * tensor_flops / MACHINE["tensor_flops_per_s"],
    }
    bound = max(terms, key=terms.get)
    return {f"t_{k}_us": v * 1e6 for k, v in terms.items()} | {"time_us": terms[bound] * 1e6, "bound": bound,
                                                                "busiest_sm_factor": round(tail, 3)}


def launch_record(op, shape_name, dims, dtype, dropout, direction, index, launch, analysis, trips=None):
    """One launch's row. ``trips``: the traced iterations of each source loop over the grid
    (:func:`trace_trips`); when every SASS loop's source line is among them, the instruction and
    FLOP terms count each loop's own instructions that many times, else the per-tile heuristic."""
    b, h, length, dh = dims
    ctas = math.prod(launch.grid)
    consts = launch.constexprs
    score_tile = op in ATTENTION_OPS and "BLOCK_M" in consts and "BLOCK_N" in consts
    threads = launch.num_warps * 32
    per_thread = consts["BLOCK_M"] * consts["BLOCK_N"] / threads if score_tile else None
    ctas_per_sm = occupancy(analysis["registers"], analysis["shared_bytes"], launch.num_warps)
    loops = analysis["loop_list"]
    traced = trips is not None and all(loop["line"] in trips for loop in loops)
    if traced:
        # A helper's loop inlined at several call sites compiles to one SASS loop per site, all on
        # the helper's line, while the trace counts the line's iterations over every site: each
        # copy gets an equal share (exact when the sites run equally often, as the time-interval
        # backward's two table builds per query block do; charging each copy the whole count
        # double-counted them).
        copies = collections.Counter(loop["line"] for loop in loops)
        loops = [dict(loop, trips=trips[loop["line"]] / copies[loop["line"]]) for loop in loops]
        warp_instr = launch.num_warps * (ctas * analysis["outside_loops_instructions"]
                                         + sum(loop["instructions"] * loop["trips"] for loop in loops))
        flops = launch.num_warps * (ctas * analysis["outside_loops_tensor_flops"]
                                    + sum(loop["tensor_flops"] * loop["trips"] for loop in loops))
        # warp instructions; each performs up to 32 lanes' operations at the L2 (not in the time model)
        atomics = round(launch.num_warps * (ctas * analysis["outside_loops_global_atomics"]
                                            + sum(loop["global_atomics"] * loop["trips"] for loop in loops)))
    elif score_tile:
        tiles = b * h * math.ceil(length / consts["BLOCK_M"]) * math.ceil(length / consts["BLOCK_N"])
        warp_instr = launch.num_warps * (tiles * analysis["heavy_loop_instructions"] + ctas * analysis["once_instructions"])
        flops = launch.num_warps * (tiles * analysis["heavy_loop_tensor_flops"] + ctas * analysis["once_tensor_flops"])
    else:
        warp_instr = launch.num_warps * ctas * (analysis["heavy_loop_instructions"] + analysis["once_instructions"])
        flops = launch.num_warps * ctas * (analysis["heavy_loop_tensor_flops"] + analysis["once_tensor_flops"])
    if not traced:
        atomics = None if analysis["global_atomic_instructions"] else 0  # (uncounted without traced trips)
    bytes_ = launch_bytes(launch)
    rec = dict(
        op=op, kernel=launch.kernel.__name__, launch=index, shape=shape_name, dims=dict(B=b, h=h, L=length, dh=dh),
        dtype=DTYPE_NAMES[dtype], dropout=dropout, direction=direction, grid=list(launch.grid), ctas=ctas,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
        constexprs={k: v for k, v in consts.items() if not isinstance(v, bool) or v},
        registers=analysis["registers"], spill_bytes=analysis["spill_bytes"],
        spill_store_bytes=analysis["spill_store_bytes"], spill_load_bytes=analysis["spill_load_bytes"],
        stack_bytes=analysis["stack_bytes"], shared_bytes=analysis["shared_bytes"],
        ctas_per_sm=ctas_per_sm, warps_per_sm=ctas_per_sm * launch.num_warps,
        waves=round(ctas / (ctas_per_sm * MACHINE["sms"]), 3) if ctas_per_sm else None,
        sass_instructions=analysis["sass_instructions"], tensor_core_instructions=analysis["tensor_core_instructions"],
        spill_instructions=analysis["spill_instructions"], loops=analysis["loops"],
        hot_loop_instructions=analysis["hot_loop_instructions"],
        hot_loop_tensor_core_instructions=analysis["hot_loop_tensor_core_instructions"],
        hot_loop_mix=analysis["hot_loop_mix"],
        hot_loop_score_elements=per_thread,
        hot_loop_instructions_per_score_element=(
            round(analysis["hot_loop_instructions"] / per_thread, 1) if per_thread else None),
        score_loops_instructions_per_score_element=(
            round(analysis["heavy_loop_instructions"] / per_thread, 1) if per_thread else None),
        # every instruction the launch runs (all threads) per score element of the L x L problem
        kernel_instructions_per_score_element=(
            round(32 * warp_instr / (b * h * length * length), 1) if score_tile and traced else None),
        loop_trips=(loops if traced else [dict(loop, trips=trips.get(loop["line"])) for loop in loops])
        if trips is not None else None,
        model=dict(bytes=bytes_, warp_instructions=warp_instr, tensor_flops=flops, global_atomic_instructions=atomics,
                   trips="traced" if traced else "heuristic",
                   lower_bound=not traced and not score_tile and analysis["loops"] > 0, **model_time(bytes_, warp_instr, flops, ctas)),
    )
    return rec


# ----------------------------------------------------------------------------------------------
# CUDA kernels
# ----------------------------------------------------------------------------------------------


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _cuda_dtype(name):
    """The first floating-point template argument of a kernel's name."""
    m = re.search(r"[<, ](__nv_bfloat16|__half|double|float)[>, ]", name)
    return {"__nv_bfloat16": "bf16", "__half": "fp16", "double": "fp64", "float": "fp32"}[m.group(1)] if m else None


def compile_cuda(source: str) -> list[dict]:
    """Compile one csrc file for sm_90a with ``-Xptxas -v``; one record per kernel instantiation."""
    nvcc = shutil.which("nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        obj = pathlib.Path(tmp) / "k.o"
        log = _run([nvcc, "-O3", "-lineinfo", "-arch=sm_90a", "-Xptxas", "-v", "-c", str(ROOT / "csrc" / source), "-o", str(obj)])
        sass = _run([_tools()["cuobjdump"], "-sass", str(obj)])
    resources = parse_ptxas(log)
    functions = parse_sass(sass)
    names = demangle(sorted(resources))
    records = []
    for mangled, res in sorted(resources.items()):
        analysis = analyse_sass(functions.get(mangled, []))
        pretty = names[mangled]
        short = pretty.replace("(anonymous namespace)::", "")
        short = re.sub(r"^void |\([^()]*\)$", "", short)  # return type, parameter list
        short = re.sub(r"fastpe::(attn::)?", "", short)
        records.append(dict(
            op="+".join(CUDA_SOURCES.get(source, OPS)), kernel=short, source=f"csrc/{source}", backend="cuda",
            shape=None, dtype=_cuda_dtype(pretty), dropout=None,
            direction="bwd" if "bwd" in short else ("fwd" if "fwd" in short else None),
            grid=None, num_warps=None, num_stages=None, registers=res["registers"], spill_bytes=res["spill_bytes"],
            spill_store_bytes=res["spill_store_bytes"], spill_load_bytes=res["spill_load_bytes"],
            stack_bytes=res["stack_bytes"], shared_bytes=res["shared_bytes"], ctas_per_sm=None, waves=None,
            sass_instructions=analysis["sass_instructions"], tensor_core_instructions=analysis["tensor_core_instructions"],
            spill_instructions=analysis["spill_instructions"], loops=analysis["loops"],
            hot_loop_instructions=analysis["hot_loop_instructions"],
            hot_loop_tensor_core_instructions=analysis["hot_loop_tensor_core_instructions"],
            hot_loop_mix=analysis["hot_loop_mix"], hot_loop_score_elements=None,
        ))
    return records


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

_VARIANTS: list = []  # unique launches, read by the forked compile workers
_PROBLEMS: list = []  # (op, shape, dims, dropout, launches, baseline), read by the forked tracing workers


def _compile_index(i):
    try:
        return i, compile_launch(_VARIANTS[i]), None
    except Exception as exc:  # noqa: BLE001  (report every failing variant)
        return i, None, f"{type(exc).__name__}: {exc}"


def _cuda_job(source):
    try:
        return source, compile_cuda(source), None
    except Exception as exc:  # noqa: BLE001
        return source, [], f"{type(exc).__name__}: {exc}"


def _flat(launches) -> list:
    """A problem's ``{direction: [Launch]}`` in one list: the order its traced trips come in."""
    return [launch for direction in launches.values() for launch in direction]


def _trips_job(i):
    return i, traced_trips(_flat(_PROBLEMS[i][4]))


def build(ops, shapes, dropouts, dtype, cuda, jobs, log=print, trace=True):
    """Plan, compile and model every launch. ``trace``: count loop trips under the interpreter
    (:func:`trace_trips`); without it every record uses the per-tile heuristic."""
    global _VARIANTS, _PROBLEMS
    problems = []  # (op, shape name, dims, dropout, {direction: launches}, baseline)
    for shape_name, dims in shapes:
        for op in ops:
            for dropout in (dropouts if op in ATTENTION_OPS else (False,)):  # only attention has dropout
                launches, baseline = plan_op(op, dims, dtype, dropout)
                problems.append((op, shape_name, dims, dropout, launches, baseline))
    keys, unique = [], {}
    for *_head, launches, _b in problems:
        for direction_launches in launches.values():
            for launch in direction_launches:
                key = variant_key(launch)
                unique.setdefault(key, launch)
                keys.append(key)
    _VARIANTS = list(unique.values())
    index_of = {key: i for i, key in enumerate(unique)}
    every_source = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    sources = [s for s in every_source if cuda and set(CUDA_SOURCES.get(s, OPS)) & set(ops)]
    _PROBLEMS = problems
    log(f"compiling {len(_VARIANTS)} Triton variants ({len(keys)} launches) and {len(sources)} CUDA files "
        f"for sm_90a with {jobs} jobs" + (f", tracing the loops of {len(problems)} problems" if trace else ""))
    start = time.perf_counter()
    traced = range(len(problems)) if trace else ()
    if jobs > 1:
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            cuda_futures = [pool.submit(_cuda_job, s) for s in sources]
            trip_futures = [pool.submit(_trips_job, i) for i in traced]
            results = list(pool.map(_compile_index, range(len(_VARIANTS))))
            cuda_results = [f.result() for f in cuda_futures]
            trip_results = dict(f.result() for f in trip_futures)
    else:
        results = [_compile_index(i) for i in range(len(_VARIANTS))]
        cuda_results = [_cuda_job(s) for s in sources]
        trip_results = dict(_trips_job(i) for i in traced)
    log(f"compiled and traced in {time.perf_counter() - start:.0f} s")
    analyses = {i: a for i, a, _e in results}
    # A loop the first and last programs never reached (a branch taken by the program id): trace
    # every program of that launch, when the grid is small enough for the interpreter.
    for p, (*_head, launches, _b) in enumerate(problems):
        for i, (launch, trips) in enumerate(zip(_flat(launches), trip_results.get(p) or [])):
            analysis = analyses.get(index_of[variant_key(launch)])
            if (analysis and math.prod(launch.grid) <= 4096
                    and any(loop["line"] not in trips for loop in analysis["loop_list"])):
                retraced = traced_trips([launch], all_programs=True)
                if retraced:
                    trip_results[p][i] = retraced[0]
    failures = [f"{_VARIANTS[i].kernel.__name__}: {err}" for i, _a, err in results if err]
    failures += [f"csrc/{s}: {err}" for s, _r, err in cuda_results if err]
    records, summary = [], []
    for p, (op, shape_name, dims, dropout, launches, baseline) in enumerate(problems):
        problem_trips = iter(trip_results.get(p) or [])
        for direction, direction_launches in launches.items():
            rows = []
            for index, launch in enumerate(direction_launches):
                trips = next(problem_trips, None)
                analysis = analyses.get(index_of[variant_key(launch)])
                if analysis is None:
                    continue
                rows.append(launch_record(op, shape_name, dims, dtype, dropout, direction, index, launch, analysis, trips))
            records += rows
            name, b_bytes, b_flops = baseline[direction]
            base = model_time(b_bytes, 0, b_flops)
            total = sum(r["model"]["time_us"] for r in rows)
            slowest = max(rows, key=lambda r: r["model"]["time_us"]) if rows else None
            summary.append(dict(
                op=op, shape=shape_name, dtype=DTYPE_NAMES[dtype], dropout=dropout, direction=direction,
                launches=len(direction_launches), time_us=round(total, 3),
                bound=f"{slowest['kernel']}: {slowest['model']['bound']}" if slowest else None,
                lower_bound=any(r["model"]["lower_bound"] for r in rows),
                trips="traced" if rows and all(r["model"]["trips"] == "traced" for r in rows) else "heuristic",
                baseline=dict(name=name, bytes=b_bytes, flops=b_flops, time_us=round(base["time_us"], 3), bound=base["bound"]),
                ratio=round(total / base["time_us"], 2) if base["time_us"] else None,
            ))
    for _s, recs, _e in cuda_results:
        records += recs
    return dict(machine=MACHINE, records=records, summary=summary), failures


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def attention_table(report) -> list[str]:
    """The relative-attention score kernels at a glance (the issue's targets are read here)."""
    rows = [r for r in report["records"] if r.get("hot_loop_score_elements")]
    if not rows:
        return []
    lines = ["| shape | dropout | dir | kernel | regs | spill B | elems/thread | instr/elem (hot loop) | "
             "instr/elem (whole kernel) | CTAs/SM | waves |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {'yes' if r['dropout'] else 'no'} | {r['direction']} | {r['kernel']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {_fmt(r['hot_loop_score_elements'])} | "
                     f"{_fmt(r['hot_loop_instructions_per_score_element'])} | "
                     f"{_fmt(r.get('kernel_instructions_per_score_element'))} | {r['ctas_per_sm']} | {_fmt(r['waves'], 2)} |")
    return lines


# The static targets of the Triton relative attention's score kernels (the issue that asked for
# this report): spill bytes and SASS instructions per score element in the hot loop, per
# direction, and where a grid is under 4 waves, at most this share of the busiest SM's time idle
# on the others (1 - 1 / busiest_sm_factor).
TARGETS = {"fwd": dict(spill_bytes=0, per_element=25), "bwd": dict(spill_bytes=512, per_element=60)}
MAX_TAIL = 0.10


def targets_table(report) -> list[str]:
    """Each relative-attention score kernel against :data:`TARGETS`: the value, the limit, and
    which targets it misses."""
    rows = [r for r in report["records"] if r["op"] == "rmha" and r.get("hot_loop_score_elements")]
    if not rows:
        return []
    lines = ["| shape | dropout | dir | spill B (limit) | instr/elem, hot loop (limit) | idle SM share (waves) | "
             "misses |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = TARGETS[r["direction"]]
        per_elem = r["hot_loop_instructions_per_score_element"]
        tail = 1 - 1 / r["model"]["busiest_sm_factor"] if r["waves"] is not None and r["waves"] < 4 else None
        misses = [name for name, miss in (("spills", r["spill_bytes"] > limit["spill_bytes"]),
                                          ("instr/elem", per_elem > limit["per_element"]),
                                          ("tail", tail is not None and tail > MAX_TAIL)) if miss]
        lines.append(f"| {r['shape']} | {'yes' if r['dropout'] else 'no'} | {r['direction']} | "
                     f"{r['spill_bytes']} ({limit['spill_bytes']}) | {_fmt(per_elem)} ({limit['per_element']}) | "
                     f"{'-' if tail is None else f'{100 * tail:.0f}%'} ({_fmt(r['waves'], 2)}) | "
                     f"{', '.join(misses) or 'none'} |")
    return lines


def comparison_table(before, after) -> list[str]:
    """Before -> after per op, shape, dropout and direction present in both reports: the modelled
    time and, for the relative-attention score kernels, registers, spills, instructions per score
    element and waves (kernels matched by their place in the direction's launches)."""
    def key(row):
        return (row["op"], row["shape"], row["dropout"], row["direction"])

    old_summary = {key(s): s for s in before["summary"]}
    old_score = {}
    for r in before["records"]:
        if r.get("hot_loop_score_elements"):
            old_score.setdefault(key(r), []).append(r)
    new_score = {}
    for r in after["records"]:
        if r.get("hot_loop_score_elements"):
            new_score.setdefault(key(r), []).append(r)
    lines = ["| op | shape | dropout | dir | model us | launches | score kernel | regs | spill B | instr/elem (hot loop) | "
             "instr/elem (whole kernel) | waves |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def arrow(a, b, digits=1):
        return f"{_fmt(a, digits)} -> {_fmt(b, digits)}"

    for s in after["summary"]:
        old = old_summary.get(key(s))
        if old is None:
            continue
        head = (f"| {s['op']} | {s['shape']} | {'yes' if s['dropout'] else 'no'} | {s['direction']} | "
                f"{arrow(old['time_us'], s['time_us'])} | {old['launches']} -> {s['launches']} |")
        pairs = list(zip(old_score.get(key(s), []), new_score.get(key(s), [])))
        if not pairs:
            lines.append(head + " - | - | - | - | - | - |")
        for o, n in pairs:
            lines.append(head + f" {n['kernel']} | {o['registers']} -> {n['registers']} | "
                         f"{o['spill_bytes']} -> {n['spill_bytes']} | "
                         f"{arrow(o['hot_loop_instructions_per_score_element'], n['hot_loop_instructions_per_score_element'])} | "
                         f"{arrow(o.get('kernel_instructions_per_score_element'), n.get('kernel_instructions_per_score_element'))} | "
                         f"{arrow(o['waves'], n['waves'], 2)} |")
    return lines


def atomics_table(report) -> list[str]:
    """Launches with global atomics or reductions: how many, and the rate the L2 must sustain for
    the modelled time to hold (each warp instruction counted as 32 lanes: an upper bound)."""
    rows = [r for r in report["records"] if r.get("backend") != "cuda" and r["model"].get("global_atomic_instructions") != 0]
    lines = []
    for r in rows:
        m = r["model"]
        warp_ops = m.get("global_atomic_instructions")
        lanes = None if warp_ops is None else 32 * warp_ops
        rate = None if lanes is None else lanes / (m["time_us"] * 1e-6) / 1e9
        lines.append(f"| {r['op']} | {r['shape']} | {'yes' if r['dropout'] else 'no'} | {r['direction']} | {r['kernel']} | "
                     f"{_fmt(warp_ops)} | {_fmt(None if lanes is None else lanes / 1e6, 2)} | {m['time_us']:.2f} | "
                     f"{_fmt(rate, 0)} |")
    if not lines:
        return []
    return ["| op | shape | drop | dir | kernel | atomic warp instr | lane ops, M (at most) | model us | L2 rate needed, G/s |",
            "|---|---|---|---|---|---|---|---|---|", *lines]


def markdown(report, command, before=None) -> str:
    mc = report["machine"]
    lines = [
        "# Static kernel report, sm_90a", "",
        f"Generated by `{command}` (no GPU: compiled artefacts only). Machine model: {mc['name']}, "
        f"{mc['sms']} SMs, {mc['hbm_bytes_per_s'] / 1e12:.1f} TB/s HBM, "
        f"{mc['issue_per_s'] / 1e12:.3f} T warp instructions/s, {mc['tensor_flops_per_s'] / 1e12:.0f} TFLOP/s dense bf16.",
        "How to read it: README, section \"Static kernel report\".", "",
        *(["## Before -> after", "", f"Against `{before['path']}`.", "", *comparison_table(before, report), ""]
          if before else []),
        *(["## Relative attention: score kernels", "", *attention_table(report), ""] if attention_table(report) else []),
        *(["## Relative attention: static targets", "",
           f"Per direction: spill bytes, SASS instructions per score element in the hot loop; under 4 waves, "
           f"at most {100 * MAX_TAIL:.0f}% of the busiest SM's time idle on the others.", "",
           *targets_table(report), ""] if targets_table(report) else []),
        "## Per op: modelled time against the baseline", "",
        "| op | shape | dropout | dir | launches | model us | loops | bound (slowest launch) | baseline | baseline us | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        mark = ">=" if s["lower_bound"] else ""
        lines.append(f"| {s['op']} | {s['shape']} | {'yes' if s['dropout'] else 'no'} | {s['direction']} | {s['launches']} | "
                     f"{mark}{s['time_us']:.2f} | {s.get('trips', 'heuristic')} | {s['bound']} | {s['baseline']['name']} | "
                     f"{s['baseline']['time_us']:.2f} | {mark}{s['ratio']} |")
    atomics = atomics_table(report)
    if atomics:
        lines += ["", "## Global atomics (not in the time model)", "",
                  "The time model has no term for atomics: each warp instruction below performs up to 32 "
                  "reductions or exchanges at the L2 (counted with the traced loop trips, `-` where untraced). "
                  "The last column is the rate at which the L2 must complete them for the modelled time to "
                  "hold; only a GPU run (`benchmarks/gpu_suite.py`) says whether it does.", "", *atomics]
    lines += [
        "", "## Triton launches", "",
        "| op | shape | drop | dir | kernel | grid | warps/stages | regs | spill B | smem KiB | CTAs/SM | waves | "
        "SASS | TC | hot loop | hot TC | elems/thr | instr/elem | cmp+sel % | model us | bound |",
        "|" + "---|" * 21,
    ]
    for r in report["records"]:
        if r.get("backend") == "cuda":
            continue
        hot = r["hot_loop_instructions"]
        cmp_share = 100 * r["hot_loop_mix"].get("compare_select", 0) / hot if hot else None
        m = r["model"]
        lines.append(
            f"| {r['op']} | {r['shape']} | {'yes' if r['dropout'] else 'no'} | {r['direction']} | {r['kernel']} | "
            f"{'x'.join(map(str, r['grid']))} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {r['ctas_per_sm']} | {_fmt(r['waves'], 2)} | {r['sass_instructions']} | "
            f"{r['tensor_core_instructions']} | {hot} | {r['hot_loop_tensor_core_instructions']} | "
            f"{_fmt(r['hot_loop_score_elements'])} | {_fmt(r['hot_loop_instructions_per_score_element'])} | "
            f"{_fmt(cmp_share, 0)} | {'>=' if m['lower_bound'] else ''}{m['time_us']:.2f} | {m['bound']} |")
    cuda = [r for r in report["records"] if r.get("backend") == "cuda"]
    if cuda:
        lines += ["", "## CUDA kernels (csrc/, nvcc -arch=sm_90a -Xptxas -v)", "",
                  "| source | kernel | dtype | regs | spill B | static smem B | SASS | TC | hot loop | hot TC |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in cuda:
            lines.append(f"| {r['source']} | `{r['kernel']}` | {_fmt(r['dtype'])} | {r['registers']} | {r['spill_bytes']} | "
                         f"{r['shared_bytes']} | {r['sass_instructions']} | {r['tensor_core_instructions']} | "
                         f"{r['hot_loop_instructions']} | {r['hot_loop_tensor_core_instructions']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="static_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for static_sm90.md and static_sm90.json")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--shapes", default="S1,S2,S3", help="comma-separated S1/S2/S3 or B<b>h<h>L<l>dh<dh>")
    parser.add_argument("--dropout", choices=("both", "off", "on"), default="both", help="relative attention with/without dropout")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels in csrc/")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-trace", action="store_true",
                        help="skip counting loop trips under the interpreter (faster; per-tile heuristic time model)")
    parser.add_argument("--compare", type=pathlib.Path, metavar="JSON",
                        help="an earlier static_sm90.json: add a before -> after table")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        parser.error(f"unknown op(s) {bad}: choose from {', '.join(OPS)}")
    try:
        shapes = [parse_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    cuda = not args.no_cuda
    if cuda and shutil.which("nvcc") is None:
        parser.error("nvcc is not on PATH: put it there or pass --no-cuda")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    before = None
    if args.compare is not None:
        try:
            before = json.loads(args.compare.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {args.compare}: cannot read it ({exc})")
        if not (isinstance(before, dict) and isinstance(before.get("summary"), list)
                and isinstance(before.get("records"), list)):
            parser.error(f"--compare {args.compare}: not a static_sm90.json (no summary and records lists)")
        before["path"] = str(args.compare)
    dropouts = {"both": (False, True), "off": (False,), "on": (True,)}[args.dropout]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    report, failures = build(ops, shapes, dropouts, dtype, cuda, args.jobs, log=lambda m: print(m, file=sys.stderr),
                             trace=not args.no_trace)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python3 benchmarks/static_report.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    (args.out / "static_sm90.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "static_sm90.md").write_text(markdown(report, command, before))
    print(f"wrote {args.out / 'static_sm90.md'} and static_sm90.json ({len(report['records'])} records)", file=sys.stderr)
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trace-trips"]:  # the child process of traced_trips
        print(json.dumps(trace_trips(json.loads(pathlib.Path(sys.argv[2]).read_text()))))
        sys.exit(0)
    sys.exit(main())
