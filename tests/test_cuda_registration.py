"""The Python side of the cuda backend without any compiled code: the operator schemas of
csrc/bindings.cpp, their fake implementations and autograd registrations, the loader's
messages, and the packaging of the sources. Runs on any machine."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastpe
from fastpe import _ext, _ext_ops
from fastpe.backends import BackendUnavailableError, resolve_backend

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = ROOT / "csrc" / "bindings.cpp"
NAMESPACE = "fastpe_schema_test"


def schemas():
    return re.findall(r'm\.def\(\s*"([^"]+)"', BINDINGS.read_text())


@pytest.fixture(scope="module")
def ops():
    """The schemas of bindings.cpp defined in a test namespace (no kernels), with the Python
    registrations the extension gets."""
    lib = torch.library.Library(NAMESPACE, "DEF")
    for schema in schemas():
        lib.define(schema)
    _ext_ops.register(NAMESPACE)
    yield getattr(torch.ops, NAMESPACE)
    lib._destroy()


def test_every_op_has_a_schema_and_each_contract_function_exists():
    names = {s.split("(")[0] for s in schemas()}
    for op in _ext.IMPLEMENTED_OPS:
        assert callable(getattr(_ext, op))
    assert {"relative_attention_fwd", "relative_attention_bwd", "rotary_fwd", "rotary_bwd", "rotatory_add_fwd",
            "rotatory_add_bwd", "concat_projection_fwd", "concat_projection_bwd"} <= names


def test_register_is_idempotent(ops):
    _ext_ops.register(NAMESPACE)


def test_fake_implementations_give_the_real_shapes(ops):
    with FakeTensorMode():
        q = torch.empty(2, 3, 7, 30, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 9, 30, dtype=torch.bfloat16)
        v = torch.empty(2, 3, 9, 50, dtype=torch.bfloat16)
        rk, rv = torch.empty(3, 9, 30, dtype=torch.bfloat16), torch.empty(3, 9, 50, dtype=torch.bfloat16)
        out, lse, rng = ops.relative_attention_fwd(q, k, v, rk, rv, None, None, True, 0.1, 0.2)
        assert out.shape == (2, 3, 7, 50) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
        assert rng.shape == (2,) and rng.dtype == torch.int64
        grads = ops.relative_attention_bwd(out, q, k, v, rk, rv, None, None, out, lse, rng, True, 0.1, 0.2)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, rk.shape, rv.shape]
        _, lse64, _ = ops.relative_attention_fwd(*(t.double() for t in (q, k, v, rk, rv)), None, None, False, 0.0, 1.0)
        assert lse64.dtype == torch.float64

        x = torch.empty(4, 10, 2, 16, dtype=torch.float16)
        angles = torch.empty(12, 8)
        assert ops.rotary_fwd(x, angles, None, True).shape == x.shape
        dx, da = ops.rotary_bwd(x, x, angles, None, False, True)
        assert dx.shape == x.shape and da.shape == angles.shape and da.dtype == torch.float32
        assert ops.rotary_bwd(x, x, angles, None, False, False)[1].shape == (0,)
        x3 = torch.empty(4, 10, 16)
        assert ops.rotatory_add_fwd(x3, angles, None).shape == x3.shape
        assert ops.rotatory_add_bwd(x3, angles, None).shape == angles.shape

        x = torch.empty(4, 10, 6)
        table, weight, bias = torch.empty(12, 5), torch.empty(7, 11), torch.empty(7)
        assert ops.concat_projection_fwd(x, table, weight, bias, None).shape == (4, 10, 7)
        grads = ops.concat_projection_bwd(torch.empty(4, 10, 7), x, table, weight, None, True)
        assert [g.shape for g in grads] == [x.shape, table.shape, weight.shape, bias.shape]


def test_autograd_is_registered_for_every_forward(ops):
    for name in ("relative_attention_fwd", "rotary_fwd", "rotatory_add_fwd", "concat_projection_fwd"):
        op = getattr(ops, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"), name


def test_cuda_backend_says_why_it_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    reason = _ext.unavailable_reason()
    expected = "CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert reason is not None and expected in reason
    with pytest.raises(BackendUnavailableError, match=re.escape(expected)):
        resolve_backend("cuda", "relative_attention", torch.device("cuda"))
    assert "cuda" not in fastpe.available_backends("cuda")


def test_import_fastpe_loads_no_extension():
    code = "import sys, fastpe; assert 'fastpe._ext' not in sys.modules; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _setup_py_function(name: str):
    """A function of setup.py, defined without running setup()."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"hashlib": __import__("hashlib"), "Path": Path, "SOURCE_SUFFIXES": _ext._SOURCE_SUFFIXES}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_sources_are_found_and_hashed_and_named_like_setup_py():
    src = _ext.sources_dir()
    assert src == ROOT / "csrc"
    assert {p.name for p in src.glob("*.cu")} >= {"relative_attention_fwd.cu", "relative_attention_bwd.cu", "rotary.cu"}
    digest = _ext.sources_digest(src)
    assert _setup_py_function("sources_digest")(src) == digest
    assert _setup_py_function("ops_namespace")(digest) == _ext.ops_namespace(digest) == "fastpe_" + digest[:12]


def test_ops_namespace_follows_the_sources(tmp_path):
    """Compile caches key graphs on op names: a build of other sources must name its ops apart,
    or a graph cached against an older build would call this one's ops with its arguments."""
    import shutil

    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy)
    before = _ext.ops_namespace(_ext.sources_digest(copy))
    assert before == _ext.ops_namespace(_ext.sources_digest(ROOT / "csrc")) and before.isidentifier()
    with open(copy / "attention.cuh", "a") as f:
        f.write("\n// edited\n")
    assert _ext.ops_namespace(_ext.sources_digest(copy)) != before
    assert "#error" in BINDINGS.read_text().split("#ifndef FASTPE_OPS_NS", 1)[1].split("#endif", 1)[0]


def test_wheel_ships_the_sources_for_the_just_in_time_build(tmp_path):
    """A wheel built without the extension carries csrc/ as fastpe/_csrc/, where the installed
    package looks for it, with the same hash as the checkout's csrc/."""
    import shutil
    import zipfile

    work = tmp_path / "src"
    work.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in"):
        shutil.copy2(ROOT / name, work / name)
    shutil.copytree(ROOT / "fastpe", work / "fastpe", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_csrc"))
    shutil.copytree(ROOT / "csrc", work / "csrc")
    env = {**__import__("os").environ, "FASTPE_BUILD_CUDA": "0"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(work)],
        check=True, env=env, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("fastpe-*.whl"))
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    shipped = installed / "fastpe" / "_csrc"
    assert (shipped / "bindings.cpp").is_file() and (shipped / "attention.cuh").is_file()
    assert _ext.sources_digest(shipped) == _ext.sources_digest(ROOT / "csrc")
    code = "from fastpe import _ext; print(_ext.sources_dir())"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(installed)})
    assert Path(out.stdout.strip()) == shipped
