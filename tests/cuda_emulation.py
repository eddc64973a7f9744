"""Builds and loads the CPU emulation of the CUDA extension (csrc/ compiled with
FASTPE_EMULATION against csrc/emulation/), which registers the extension's operators in the
namespace ``fastpe_emu_<hash of csrc/>`` for CPU tensors. The kernels, the torch glue and the Python
registration are the ones the GPU runs; only the hardware is emulated (see
csrc/emulation/cuda_emulation.h)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastpe import _ext, _ext_ops

_SOURCES = _ext.sources_dir()
NAMESPACE = _ext.ops_namespace(_ext.sources_digest(_SOURCES), "fastpe_emu") if _SOURCES else "fastpe_emu"


def _cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    return None


@functools.lru_cache(maxsize=None)
def _build() -> str | None:
    """None once the emulation is loaded, else why it cannot be."""
    from torch.utils import cpp_extension

    src = _ext.sources_dir()
    include = _cuda_include()
    if src is None or include is None:
        return "the CUDA headers (cuda_fp16.h) or the csrc/ sources are missing"
    if not cpp_extension.is_ninja_available() or shutil.which("c++") is None:
        return "ninja or a C++ compiler is missing"
    digest = (_ext.sources_digest(src)[:8] + _ext.sources_digest(src / "emulation")[:8])
    name = f"fastpe_emu_{digest}"
    build_dir = _ext.cache_dir() / "emulation" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(src / "bindings.cpp"), str(src / "emulation" / "cuda_emulation.cpp")]
    for cu in sorted(src.glob("*.cu")):  # each kernel file as its own C++ translation unit
        wrapper = build_dir / f"emu_{cu.stem}.cpp"
        text = f'// generated: {cu.name} in the CPU emulation ({digest})\n#include "{cu}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(src), str(include)],
        extra_cflags=["-O1", "-DFASTPE_EMULATION=1", f"-DFASTPE_OPS_NS={NAMESPACE}", "-Wno-unused-function"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("FASTPE_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    _ext_ops.register(NAMESPACE)
    return None


def emulated_ops():
    """``torch.ops.<NAMESPACE>``, building the emulation on first use (skips the test if impossible)."""
    reason = _build()
    if reason is not None:
        pytest.skip(f"CPU emulation of the CUDA kernels unavailable: {reason}")
    return getattr(torch.ops, NAMESPACE)
