"""Every shipped Triton kernel variant compiles for sm_90, without a GPU.

The interpreter the other tests use runs kernels as numpy code and misses errors only the
compiler sees (tl.dot with a dimension under 16, layouts, types). The check runs
``python -m fastpe.kernels.triton.compile_check`` in a subprocess without TRITON_INTERPRET.
Compiling ~70 variants takes a minute or two on two cores, so the subprocess starts when this
module is collected and works on the second core while the interpreter tests run on the first;
the test (in the file collected last) only waits for its verdict.
"""

import atexit
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_PROC = None


def _start():
    global _PROC
    if _PROC is None:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        _PROC = subprocess.Popen(
            [sys.executable, "-m", "fastpe.kernels.triton.compile_check", "--jobs", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        atexit.register(lambda: _PROC.poll() is None and _PROC.kill())
    return _PROC


_start()


def test_every_kernel_variant_compiles_for_sm90():
    proc = _start()
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    assert "compiled" in out and "FAILED" not in out, out


def _compiled_script(script, code, *args):
    """Run ``code`` from the file ``script`` (Triton reads kernel source from a file) without the
    interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script.write_text(code)
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_compile_check_sees_errors_the_interpreter_misses(tmp_path):
    """The check can fail: a tl.dot with K = 8 runs under the interpreter but does not compile."""
    code = """
import triton, triton.language as tl
from fastpe.kernels.triton import compile_check
from fastpe.kernels.triton._launch import Launch
import torch

@triton.jit
def small_dot(X, Y, K: tl.constexpr):
    a = tl.load(X + tl.arange(0, 16)[:, None] * K + tl.arange(0, K)[None, :])
    tl.store(Y + tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :], tl.dot(a, tl.trans(a)))

launch = Launch(small_dot, (1,), dict(X=torch.zeros(16, 8), Y=torch.zeros(16, 16)), dict(K=8))
compile_check.all_variants = lambda: [launch]
raise SystemExit(compile_check.main(["--jobs", "1"]))
"""
    res = _compiled_script(tmp_path / "small_dot.py", code)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED small_dot" in res.stdout


def test_compile_check_flags_mma_operands_sized_by_a_narrow_mask(tmp_path):
    """The check fails a 16-bit warp-level dot whose operand derives from a uint8 load (a padding
    mask): Triton then gives it 8-bit register fragments (``kWidth`` 4), each costing a move; the
    same kernel with the mask through ``rmha._mask_barrier`` passes."""
    code = """
import sys
import triton, triton.language as tl
from fastpe.kernels.triton import compile_check
from fastpe.kernels.triton._launch import Launch
from fastpe.kernels.triton.rmha import _mask_barrier
import torch

@triton.jit
def masked_dot(X, KPM, Y, BARRIER: tl.constexpr):
    rows = tl.arange(0, 16)
    cols = tl.arange(0, 32)
    keep = tl.load(KPM + cols) == 0
    if BARRIER:
        keep = _mask_barrier(keep) != 0
    a = tl.load(X + rows[:, None] * 32 + cols[None, :])
    b = tl.load(X + cols[:, None] * 32 + cols[None, :], mask=keep[:, None], other=0.0)
    tl.store(Y + rows[:, None] * 32 + cols[None, :], tl.dot(a, b))

args = dict(X=torch.zeros(32, 32, dtype=torch.bfloat16), KPM=torch.zeros(32, dtype=torch.uint8), Y=torch.zeros(16, 32))
launch = Launch(masked_dot, (1,), args, dict(BARRIER=sys.argv[1] == "barrier"), num_warps=1)
compile_check.all_variants = lambda: [launch]
raise SystemExit(compile_check.main(["--jobs", "1"]))
"""
    res = _compiled_script(tmp_path / "masked_dot.py", code, "plain")
    assert res.returncode == 1 and "FAILED masked_dot" in res.stdout and "kWidth 4" in res.stdout, res.stdout + res.stderr
    res = _compiled_script(tmp_path / "masked_dot.py", code, "barrier")
    assert res.returncode == 0, res.stdout + res.stderr
