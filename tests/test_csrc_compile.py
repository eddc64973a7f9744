"""Compile-checks the CUDA sources without a GPU: every csrc/*.cu with nvcc to sm_90a machine code
and to compute_80 PTX (with the defines of torch's extension build, warnings as errors), and the
torch glue csrc/bindings.cpp with g++ -fsyntax-only against the CPU torch wheel's headers. Skips
when nvcc (or g++) is absent. About two minutes on two cores.

sm_80 stops at PTX: its front end and optimizer (cicc) see the sources with ``__CUDA_ARCH__`` = 800,
but ptxas would check nothing the sm_90a pass does not (no inline assembly, the same register and
static shared-memory limits) and cost the most of the test (relative_attention_bwd.cu: 45 s of
160 s)."""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cuda_emulation import _cuda_include

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# What torch.utils.cpp_extension adds to every nvcc command line.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _nvcc_cmd(nvcc, cu, out_dir):
    return [
        nvcc, "-std=c++17", "-O3", "-c", str(cu), "-o", str(out_dir / f"{cu.stem}.o"), f"-I{CSRC}",
        "-gencode", "arch=compute_80,code=compute_80", "-gencode", "arch=compute_90a,code=sm_90a",
        *TORCH_NVCC_FLAGS, "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
    ]


def _glue_cmd(tmp_path, nvcc):
    from torch.utils.cpp_extension import include_paths

    # The CPU wheel lacks this generated header of c10/cuda; its content in a CUDA build is one macro.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = _cuda_include()
    return [
        "g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
        *(f"-I{p}" for p in include_paths()), f"-I{tmp_path / 'stub'}", f"-I{cuda_include}", f"-I{CSRC}",
        "-DFASTPE_OPS_NS=fastpe_syntax_check",
        str(CSRC / "bindings.cpp"),
    ]


def test_kernels_and_glue_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "csrc/ holds no .cu files"
    jobs = {cu.name: _nvcc_cmd(nvcc, cu, tmp_path) for cu in sources}
    if shutil.which("g++") and _cuda_include() is not None:
        jobs["bindings.cpp (g++ -fsyntax-only)"] = _glue_cmd(tmp_path, nvcc)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(jobs, pool.map(_run, jobs.values())))
    failures = {name: out for name, (rc, out) in results.items() if rc != 0}
    assert not failures, "\n\n".join(f"{name}:\n{out[-4000:]}" for name, out in failures.items())


def test_kernel_files_include_no_torch_headers():
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")):
        text = path.read_text()
        for header in ("<torch/", "<ATen/", "<c10/", "<pybind11"):
            assert header not in text, f"{path.name} includes a torch header ({header}); keep torch in bindings.cpp"
