"""Build script: pure Python by default, plus the CUDA extension when it can be built.

The extension (csrc/) is compiled only when torch with CUDA and nvcc are importable/usable in the
build environment, which means building without isolation on a CUDA machine:

    FASTPE_BUILD_CUDA=1 pip install --no-build-isolation -e .

Switches: FASTPE_BUILD_CUDA=1 forces the build (and fails loudly if it cannot), =0 skips it;
unset, it is built when possible. FASTPE_CUDA_ARCH_LIST (e.g. "8.0;9.0") picks the GPU targets.
Without a built extension, fastpe compiles it just in time on first use of backend="cuda".
"""

import glob
import os

from setuptools import setup


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
    if "FASTPE_CUDA_ARCH_LIST" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTPE_CUDA_ARCH_LIST"]
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        if switch == "1":
            raise RuntimeError("FASTPE_BUILD_CUDA=1 but csrc/ holds no sources")
        return [], {}
    ext = CUDAExtension(
        "fastpe._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
