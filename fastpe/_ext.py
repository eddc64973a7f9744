"""Loader of the compiled CUDA extension (``csrc/``) and the functions behind ``backend="cuda"``.

Each op named in ``IMPLEMENTED_OPS`` is a function with the same signature as the op's ``torch``
backend in :mod:`fastpe.ops`. Nothing is loaded or built at import; the first call of
:func:`unavailable_reason` (made when ``backend="cuda"`` or ``"auto"`` meets a CUDA tensor) does:

1. a prebuilt library ``fastpe/_C*.so`` (``FASTPE_BUILD_CUDA=1 pip install --no-build-isolation .``);
2. otherwise a just-in-time build of the sources with ``torch.utils.cpp_extension.load`` (needs
   nvcc and ninja), cached under ``$FASTPE_CACHE_DIR`` (default ``~/.cache/fastpe``) in a folder
   named after a hash of the sources, torch and CUDA versions, so it compiles once.

The sources are the repository's ``csrc/`` in a checkout or editable install, and a copy in
``fastpe/_csrc/`` in an installed wheel (setup.py ships it as package data). Both builds put the
ops in the namespace ``torch.ops.fastpe_<hash of the sources>`` (:func:`ops_namespace`), so a
prebuilt library compiled from other sources is passed over for a fresh build, and graphs that
torch.compile cached against another build miss.

Environment: ``FASTPE_CUDA_JIT=0`` forbids the just-in-time build; ``FASTPE_CUDA_ARCH_LIST``
(e.g. ``"8.0;9.0"``) picks the GPU architectures it compiles for (default: the visible GPU's);
``FASTPE_VERBOSE_BUILD=1`` shows the compiler's output.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from pathlib import Path

import torch

from fastpe import _digest, _ext_ops
from fastpe._digest import files_digest

IMPLEMENTED_OPS: tuple[str, ...] = ("relative_attention", "time_interval_attention", "rotary", "rotatory_add",
                                     "concat_projection")

# The torch.ops namespace the functions below call: ops_namespace() of the loaded build, set by
# _load (the tests point it at the CPU emulation's).
_NAMESPACE: str | None = None
_UNSET = object()
_reason: object = _UNSET
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """None when the extension is loaded and usable, else why it is not (loads it on first call)."""
    global _reason
    if _reason is _UNSET:
        _reason = _load()
    return _reason  # type: ignore[return-value]


def sources_dir() -> Path | None:
    """Where the CUDA sources are: the checkout's ``csrc/`` or the wheel's ``fastpe/_csrc/``."""
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "_csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def sources_digest(src: Path) -> str:
    """Hash of the source files of the build (headers included), so any edit gives a fresh build."""
    return files_digest(src, _SOURCE_SUFFIXES)


def ops_namespace(digest: str, prefix: str = "fastpe") -> str:
    """The torch.ops namespace of a CUDA build whose sources hash to ``digest`` (setup.py has a
    copy; :func:`fastpe._digest.ops_namespace` says why it follows the sources)."""
    return _digest.ops_namespace(digest, prefix)


def _ops_loaded(namespace: str) -> bool:
    return hasattr(getattr(torch.ops, namespace), "relative_attention_fwd")


def _load() -> str | None:
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build; the cuda backend needs a CUDA build of torch "
            "(and, unless fastpe was installed with its compiled extension, nvcc and ninja)"
        )
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    src = sources_dir()
    if src is None:
        return "fastpe's CUDA sources (csrc/, or fastpe/_csrc/ in a wheel) are not installed"
    digest = sources_digest(src)
    namespace = ops_namespace(digest)
    problems = []
    if not _ops_loaded(namespace):
        prebuilt = sorted(glob.glob(str(_PACKAGE_DIR / "_C*.so"))) + sorted(glob.glob(str(_PACKAGE_DIR / "_C*.pyd")))
        for path in prebuilt:
            try:
                torch.ops.load_library(path)
            except Exception as exc:  # e.g. built against another torch: fall back to a fresh build
                problems.append(f"loading the prebuilt extension {path} failed: {exc}")
                continue
            if _ops_loaded(namespace):
                break
            # Its ops live in another namespace, harmless beside a fresh build's.
            problems.append(f"the prebuilt extension {path} was compiled from other sources than {src} (rebuild it: "
                            "FASTPE_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    if not _ops_loaded(namespace):
        reason = _jit_build(src, digest, namespace)
        if reason is None and not _ops_loaded(namespace):
            reason = f"the just-in-time build of {src} defines no ops in torch.ops.{namespace}"
        if reason is not None:
            problems.append(reason)
            return "; ".join(problems)
    try:
        _ext_ops.register(namespace)
    except Exception as exc:
        return f"the CUDA extension loaded but registering its Python parts failed: {exc}"
    global _NAMESPACE
    _NAMESPACE = namespace
    return None


def cache_dir() -> Path:
    root = os.environ.get("FASTPE_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastpe"


def _jit_build(src: Path, digest: str, namespace: str) -> str | None:
    if os.environ.get("FASTPE_CUDA_JIT", "1") == "0":
        return "fastpe has no prebuilt CUDA extension of its sources and FASTPE_CUDA_JIT=0 forbids building one"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "building the CUDA extension just in time needs ninja (pip install ninja)"
    if cpp_extension.CUDA_HOME is None:
        return "building the CUDA extension just in time needs nvcc (set CUDA_HOME or put nvcc on PATH)"
    tag = hashlib.sha256(f"{digest} {torch.__version__} {torch.version.cuda}".encode()).hexdigest()[:16]
    name = f"fastpe_cuda_{tag}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(src / "bindings.cpp")] + sorted(str(p) for p in src.glob("*.cu"))
    arch = os.environ.get("FASTPE_CUDA_ARCH_LIST")
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    warnings.warn(
        f"fastpe: compiling the CUDA extension just in time into {build_dir} (once; a minute or two)",
        stacklevel=4,
    )
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", f"-DFASTPE_OPS_NS={namespace}"],
            extra_cuda_cflags=["-O3", "-lineinfo", f"-DFASTPE_OPS_NS={namespace}"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=os.environ.get("FASTPE_VERBOSE_BUILD", "0") not in ("", "0"),
        )
    except Exception as exc:
        return f"building the CUDA extension just in time in {build_dir} failed: {exc}"
    finally:
        if arch:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    return None


def _ops():
    return getattr(torch.ops, _NAMESPACE)


def relative_attention(q, k, v, rel_k, rel_v, key_padding_mask=None, attn_bias=None, is_causal=False, dropout_p=0.0,
                       scale=None):
    return _ext_ops.relative_attention(
        _ops(), q, k, v, rel_k, rel_v, key_padding_mask, attn_bias, is_causal, dropout_p, scale
    )


def time_interval_attention(q, k, v, rel_k, rel_v, timestamps, time_unit=None, key_padding_mask=None, attn_bias=None,
                            is_causal=False, dropout_p=0.0, scale=None):
    return _ext_ops.time_interval_attention(
        _ops(), q, k, v, rel_k, rel_v, timestamps, time_unit, key_padding_mask, attn_bias, is_causal, dropout_p, scale
    )


def rotary(x, angles, positions=None, interleaved=True):
    return _ext_ops.rotary(_ops(), x, angles, positions, interleaved)


def rotatory_add(x, angles, positions=None):
    return _ext_ops.rotatory_add(_ops(), x, angles, positions)


def concat_projection(x, table, weight, bias=None, positions=None):
    return _ext_ops.concat_projection(_ops(), x, table, weight, bias, positions)
