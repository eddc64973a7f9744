"""The inline PTX of the Triton kernels, run on the CPU under TRITON_INTERPRET=1.

Triton's interpreter has no inline assembly, so the kernels take portable paths there
(``tl.load``, ``tl.store``, ``tl.atomic_add``, conversions) and their inline PTX (``_launch.inline_ptx``,
``_launch.packed_cvt``, ``rmha._COMPILED``) ran only on a GPU. :func:`enable` gives the interpreter
an emulation of the PTX subset those snippets use, so the interpreter tests run them: operand
numbering against the constraint string, packing, predicates, byte addresses, vector widths and
their alignment, half order of packed conversions, fixed-point reductions.

Written from the PTX ISA (version 8.x), not from the kernels. Registers are the raw bits of each
inline-assembly instance's operands, one numpy lane per instance. Stricter than the hardware where
the hardware would be silently wrong: a misaligned access, an output not written on every lane, a
register read before it is written, a side effect in a block marked pure and an instruction
outside the subset raise :class:`PtxError`.

``pack`` groups consecutive elements of the flattened operands (the order a thread holds the
elements of contiguous data): exact for element-wise blocks (every block here); a block that mixes
the elements it packs would see another grouping than on the GPU.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl
from triton._C.libtriton import interpreter as _native
from triton.runtime import interpreter as _interpreter

# instances run per block of assembly (and pack, where not 1): what a test reached
CALLS: collections.Counter = collections.Counter()
REGISTER_BITS = {"h": 16, "r": 32, "l": 64}  # the constraint letters the kernels use
_UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}  # raw bits of each width
_COMPARE = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
            "ge": np.greater_equal}


class PtxError(AssertionError):
    """Inline PTX the emulation cannot run, or that would be wrong or undefined on a GPU."""


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _signed(v: np.ndarray, bits: int) -> np.ndarray:
    return (v & _mask(bits)).astype(np.uint64).view(np.int64) if bits == 64 else \
        ((v & _mask(bits)).astype(np.int64) ^ (1 << (bits - 1))) - (1 << (bits - 1))


def _f32(v: np.ndarray) -> np.ndarray:
    return (v & _mask(32)).astype(np.uint32).view(np.float32)


def _round16(v: np.ndarray, kind: str) -> np.ndarray:
    """cvt.rn.{bf16,f16}.f32: round to nearest even (torch's conversions), as raw 16 bits."""
    x = torch.from_numpy(_f32(v).copy())
    y = x.to(torch.bfloat16 if kind == "bf16" else torch.float16)
    return y.view(torch.int16).numpy().view(np.uint16).astype(np.uint64)


def _split_operands(text: str) -> list[str]:
    """Operands separated by top-level commas (``{$0, $1}`` and ``[$2+8]`` stay whole)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _statements(asm: str) -> list[str]:
    """The block's statements, scope braces dropped (a vector operand's braces never start or end one)."""
    out = []
    for s in asm.split(";"):
        s = s.strip()
        while s[:1] in ("{", "}") and s:
            s = s[1:].strip()
        while s[-1:] == "}" and "{" not in s:
            s = s[:-1].strip()
        if s:
            out.append(s)
    return out


@dataclass
class _Register:
    bits: int
    value: np.ndarray  # uint64, one lane per instance
    written: np.ndarray  # bool per lane


class _Machine:
    def __init__(self, lanes: int, is_pure: bool, asm: str):
        self.lanes, self.is_pure, self.asm = lanes, is_pure, asm
        self.regs: dict[str, _Register] = {}

    def fail(self, what: str) -> None:
        raise PtxError(f"{what} (in {self.asm!r})")

    def declare(self, name: str, bits: int) -> None:
        self.regs[name] = _Register(bits, np.zeros(self.lanes, np.uint64), np.zeros(self.lanes, bool))

    def read(self, operand: str, active: np.ndarray) -> np.ndarray:
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", operand):
            return np.full(self.lanes, int(operand, 0) & ((1 << 64) - 1), np.uint64)
        reg = self.regs.get(operand)
        if reg is None:
            self.fail(f"undeclared register {operand}")
        if not reg.written[active].all():
            self.fail(f"register {operand} read before it is written")
        return reg.value

    def write(self, operand: str, value: np.ndarray, active: np.ndarray) -> None:
        reg = self.regs.get(operand)
        if reg is None:
            self.fail(f"undeclared register {operand}")
        reg.value = np.where(active, np.asarray(value, np.uint64) & _mask(reg.bits), reg.value)
        reg.written = reg.written | active

    def address(self, operand: str, active: np.ndarray, nbytes: int) -> np.ndarray:
        m = re.fullmatch(r"\[\s*([$\w]+)\s*(?:\+\s*(-?\d+))?\s*\]", operand)
        if not m:
            self.fail(f"unsupported address {operand}")
        addr = self.read(m.group(1), active) + np.uint64(int(m.group(2) or 0) & ((1 << 64) - 1))
        bad = active & (addr % np.uint64(nbytes) != 0)
        if bad.any():
            self.fail(f"misaligned {nbytes}-byte access at {int(addr[bad][0]):#x}")
        return addr

    def side_effect(self, op: str) -> None:
        if self.is_pure:
            self.fail(f"{op} writes memory but the block is marked pure (the compiler may drop or move it)")

    def execute(self, statement: str) -> None:
        active = np.ones(self.lanes, bool)
        m = re.match(r"@(!?)([$\w]+)\s+(.*)", statement)
        if m:
            guard = self.read(m.group(2), active) != 0
            active = ~guard if m.group(1) else guard
            statement = m.group(3)
        op, _, rest = statement.partition(" ")
        ops = _split_operands(rest)
        parts = op.split(".")
        if op == ".reg":  # .reg .pred p;  .reg .b32 v, w;  .reg .b8 t<4>;
            kind, _, names = rest.strip().partition(" ")
            bits = 1 if kind == ".pred" else int(kind[2:])
            for name in (n.strip() for n in names.split(",")):
                many = re.fullmatch(r"(\w+)<(\d+)>", name)
                for one in ([f"{many.group(1)}{i}" for i in range(int(many.group(2)))] if many else [name]):
                    self.declare(one, bits)
        elif parts[0] == "mov" and len(parts) == 2 and parts[1] in ("b16", "b32", "b64"):
            self.write(ops[0], self.read(ops[1], active), active)
        elif parts[0] == "setp" and len(parts) == 3 and parts[1] in _COMPARE:
            bits = int(parts[2][1:])
            a, b = self.read(ops[1], active), self.read(ops[2], active)
            if parts[2][0] == "s":
                a, b = _signed(a, bits), _signed(b, bits)
            else:
                a, b = a & _mask(bits), b & _mask(bits)
            self.write(ops[0], _COMPARE[parts[1]](a, b).astype(np.uint64), active)
        elif op in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            # d = {a -> upper half, b -> lower half}
            kind = parts[2][:-2]
            hi, lo = _round16(self.read(ops[1], active), kind), _round16(self.read(ops[2], active), kind)
            self.write(ops[0], (hi << np.uint64(16)) | lo, active)
        elif parts[0] in ("ld", "st") and len(parts) >= 3 and parts[1] == "global":
            self.memory(parts[0], parts[2:], ops, active)
        elif parts[0] == "red" and len(parts) == 4 and parts[1:3] == ["global", "add"] and parts[3] in ("u32", "u64"):
            self.side_effect(op)
            bits = int(parts[3][1:])
            addr = self.address(ops[0], active, bits // 8)
            val = self.read(ops[1], active) & _mask(bits)
            val = val.astype(np.uint32) if bits == 32 else val.view(np.int64)  # (the interpreter adds int64)
            _native.atomic_rmw(_native.RMW_OP.ADD, addr, val, active, _native.MEM_SEMANTIC.RELAXED)
        else:
            self.fail(f"unsupported PTX instruction {statement!r}")

    def memory(self, kind: str, suffix: list[str], ops: list[str], active: np.ndarray) -> None:
        vec = 1
        if suffix[0] in ("v2", "v4"):
            vec, suffix = int(suffix[0][1:]), suffix[1:]
        if len(suffix) != 1 or suffix[0] not in ("b16", "b32", "b64"):
            self.fail(f"unsupported {kind}.global type {'.'.join(suffix)}")
        bits = int(suffix[0][1:])
        dtype = _UNSIGNED[bits]
        regs_op, addr_op = (ops[0], ops[1]) if kind == "ld" else (ops[1], ops[0])
        regs = [r.strip() for r in regs_op.strip("{}").split(",")] if vec > 1 else [regs_op]
        if len(regs) != vec:
            self.fail(f"{kind}.v{vec} takes {vec} registers, got {regs_op}")
        addr = self.address(addr_op, active, vec * bits // 8)
        if kind == "st":
            self.side_effect("st.global")
        for i, reg in enumerate(regs):
            at = addr + np.uint64(i * bits // 8)
            if kind == "ld":
                raw = _native.load(at, active, np.zeros(self.lanes, dtype), np.dtype(dtype))
                self.write(reg, raw.astype(np.uint64), active)
            else:
                _native.store(at, (self.read(reg, active) & _mask(bits)).astype(dtype), active)


def _raw(data: np.ndarray) -> tuple[np.ndarray, int]:
    if data.dtype == np.bool_:
        raise PtxError("a boolean operand has no PTX register: convert it to an integer first")
    bits = data.dtype.itemsize * 8
    return data.reshape(-1).view(_UNSIGNED[bits]), bits


def _layout(bits: int, letter: str, pack: int, what: str) -> tuple[int, int]:
    """(elements per register, registers per instance) of an operand of ``bits``-bit elements: an
    instance's ``pack`` elements fill whole registers (several to one register, or one each)."""
    reg = REGISTER_BITS.get(letter)
    if reg is None:
        raise PtxError(f"{what}: constraint {letter!r} not emulated")
    per_reg = min(pack, reg // bits) if bits <= reg else 0
    if per_reg == 0 or per_reg * bits != reg or pack % per_reg:
        raise PtxError(f"{what}: {pack} x {bits}-bit elements do not fill {reg}-bit registers")
    return per_reg, pack // per_reg


def run(asm: str, constraints: str, inputs: list[np.ndarray], out_dtypes: list[np.dtype], is_pure: bool,
        pack: int) -> list[np.ndarray]:
    """Run ``asm`` once per group of ``pack`` elements of the flattened, equally shaped ``inputs``;
    returns the outputs as flat arrays of ``out_dtypes``."""
    letters = [c.strip() for c in constraints.split(",")]
    outs = [c[1:] for c in letters if c.startswith("=")]
    ins = [c for c in letters if not c.startswith("=")]
    if len(outs) != len(out_dtypes) or len(ins) != len(inputs):
        raise PtxError(f"constraints {constraints!r}: {len(outs)} outputs and {len(ins)} inputs, "
                       f"called with {len(out_dtypes)} and {len(inputs)}")
    n = inputs[0].size if inputs else 0
    if n % pack:
        raise PtxError(f"{n} elements do not split into groups of pack={pack}")
    lanes = n // pack
    CALLS[asm if pack == 1 else f"{asm} (pack={pack})"] += lanes
    machine = _Machine(lanes, is_pure, asm)
    slot = 0
    out_regs = []
    for i, (letter, dt) in enumerate(zip(outs, out_dtypes)):
        bits = np.dtype(dt).itemsize * 8
        per_reg, nregs = _layout(bits, letter, pack, f"output {i}")
        names = [f"${slot + r}" for r in range(nregs)]
        for name in names:
            machine.declare(name, REGISTER_BITS[letter])
        out_regs.append((names, per_reg, bits, dt))
        slot += nregs
    for i, (letter, data) in enumerate(zip(ins, inputs)):
        raw, bits = _raw(data)
        per_reg, nregs = _layout(bits, letter, pack, f"input {i}")
        groups = raw.reshape(lanes, pack).astype(np.uint64)
        for r in range(nregs):
            word = np.zeros(lanes, np.uint64)
            for e in range(per_reg):
                word |= groups[:, r * per_reg + e] << np.uint64(e * bits)
            name = f"${slot + r}"
            machine.declare(name, REGISTER_BITS[letter])
            machine.write(name, word, np.ones(lanes, bool))
        slot += nregs
    for statement in _statements(asm):
        machine.execute(statement)
    results = []
    for i, (names, per_reg, bits, dt) in enumerate(out_regs):
        elems = np.zeros((lanes, pack), np.uint64)
        for r, name in enumerate(names):
            reg = machine.regs[name]
            if not reg.written.all():
                machine.fail(f"output {name} is not written on every lane (undefined on a GPU)")
            for e in range(per_reg):
                elems[:, r * per_reg + e] = (reg.value >> np.uint64(e * bits)) & _mask(bits)
        results.append(elems.reshape(-1).astype(_UNSIGNED[bits]).view(dt))
    return results


def _elementwise(name, fn):
    """The libdevice function ``name`` of a float32 tensor, computed by numpy in float32."""

    def call(x, _semantic=None):
        CALLS[f"libdevice.{name}"] += x.handle.data.size
        data = fn(x.handle.data.astype(np.float32)).astype(np.float32)
        return tl.core.tensor(_interpreter.TensorHandle(data, tl.float32), x.type)

    return staticmethod(call)


class _Libdevice:
    """The libdevice functions of the compiled-only paths: ``__nv_fast_log2f`` is ``lg2.approx.f32``
    (within about 2**-22 of ``log2``), ``__nv_fast_cosf`` / ``__nv_fast_sinf`` are ``cos.approx`` /
    ``sin.approx`` (absolute error about 2**-21 on [-pi, pi], which the kernels' range reduction
    must keep them in: raises beyond, with float32 slack), ``__nv_rintf`` rounds half to even."""

    fast_log2f = _elementwise("fast_log2f", np.log2)
    rint = _elementwise("rint", np.rint)

    @staticmethod
    def _reduced(x):
        if np.abs(x).max(initial=0.0) > np.pi + 1e-3:
            raise PtxError(f"cos.approx / sin.approx called outside [-pi, pi] (|x| up to {np.abs(x).max()})")
        return x

    fast_cosf = _elementwise("fast_cosf", lambda x: np.cos(_Libdevice._reduced(x)))
    fast_sinf = _elementwise("fast_sinf", lambda x: np.sin(_Libdevice._reduced(x)))


class _Call:
    def __init__(self, results):
        self.results = results

    def get_result(self, i):
        return self.results[i]


def _create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
    shape = values[0].data.shape if values else ()
    out_tl = [ty.element_ty if isinstance(ty, tl.block_type) else ty for ty in types]
    out_np = [_interpreter._get_np_dtype(ty) for ty in out_tl]
    flat = run(asm, constraints, [v.data for v in values], out_np, is_pure, pack)
    return _Call([_interpreter.TensorHandle(r.reshape(shape), ty) for r, ty in zip(flat, out_tl)])


def enable(monkeypatch) -> None:
    """Run the kernels' inline PTX under the interpreter: the emulation as the interpreter's
    inline assembly, the planners' PTX switches on, plans not cached (a plan made without them
    must not be reused)."""
    from fastpe.kernels.triton import _launch, rmha, rotations

    monkeypatch.setattr(_interpreter.InterpreterBuilder, "create_inline_asm", _create_inline_asm)
    monkeypatch.setattr(_launch, "inline_ptx", lambda device: True)
    monkeypatch.setattr(_launch, "packed_cvt", lambda device: True)
    monkeypatch.setattr(_launch, "approximate_math", lambda device: True)
    monkeypatch.setattr(rmha, "_COMPILED", tl.constexpr(True))
    monkeypatch.setattr(rmha, "libdevice", _Libdevice())
    monkeypatch.setattr(rotations, "libdevice", _Libdevice())
    monkeypatch.setattr(_launch, "PLAN_CACHE", False)
