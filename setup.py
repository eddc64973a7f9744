"""Build script: pure Python by default, plus the CUDA extension when it can be built.

The extension (csrc/) is compiled only when torch with CUDA and nvcc are importable/usable in the
build environment, which means building without isolation on a CUDA machine:

    FASTPE_BUILD_CUDA=1 pip install --no-build-isolation -e .

Switches: FASTPE_BUILD_CUDA=1 forces the build (and fails loudly if it cannot), =0 skips it;
unset, it is built when possible. FASTPE_CUDA_ARCH_LIST (default "8.0;9.0", the A100 and H100/H200
generations) picks the GPU targets; TORCH_CUDA_ARCH_LIST is used when it is set instead.

Without a built extension, fastpe compiles it just in time on first use of backend="cuda"
(see fastpe/_ext.py). For that, every package build ships the kernel sources as package data in
fastpe/_csrc/, so an installed wheel can compile them too.
"""

import glob
import hashlib
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def sources_digest(src: Path) -> str:
    """Same hash as fastpe._ext.sources_digest (tests/test_cuda_registration.py checks it)."""
    h = hashlib.sha256()
    for path in sorted(p for p in src.glob("*") if p.suffix in SOURCE_SUFFIXES):
        h.update(str(path.relative_to(src)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def ops_namespace(digest: str, prefix: str = "fastpe") -> str:
    """Same as fastpe._ext.ops_namespace (tests/test_cuda_registration.py checks it)."""
    return f"{prefix}_{digest[:12]}"


class BuildPyWithSources(build_py):
    """Copies csrc/ (kernels, headers, glue) into the package as fastpe/_csrc/."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastpe" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        for path in sorted((ROOT / "csrc").glob("*")):
            if path.suffix in SOURCE_SUFFIXES:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)


def cuda_extension_modules():
    switch = os.environ.get("FASTPE_BUILD_CUDA", "").strip()
    if switch == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if switch == "1":
            raise RuntimeError("FASTPE_BUILD_CUDA=1 but torch is not importable in the build environment "
                               "(build with --no-build-isolation)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        if switch == "1":
            raise RuntimeError(f"FASTPE_BUILD_CUDA=1 but torch {torch.__version__} has no CUDA or nvcc was not found")
        return [], {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ or "FASTPE_CUDA_ARCH_LIST" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTPE_CUDA_ARCH_LIST", "8.0;9.0")
    # csrc/*.cpp is the torch glue (bindings.cpp); csrc/emulation/ is a test tool, not built here.
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        if switch == "1":
            raise RuntimeError("FASTPE_BUILD_CUDA=1 but csrc/ holds no sources")
        return [], {}
    # The ops' namespace follows the sources, as fastpe._ext.ops_namespace names it: torch.compile's
    # caches key graphs on op names, and a graph cached against other sources must miss.
    namespace = f"-DFASTPE_OPS_NS={ops_namespace(sources_digest(ROOT / 'csrc'))}"
    ext = CUDAExtension(
        "fastpe._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        # No --use_fast_math: it turns sincosf into __sinf/__cosf, far off for rotary angles of
        # hundreds of radians. The kernels use fast exponentials where they are accurate enough.
        extra_compile_args={"cxx": ["-O3", namespace], "nvcc": ["-O3", "-lineinfo", namespace]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension_modules()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
