"""The package builds as a pure-Python wheel where no CUDA toolchain is present, without torch as a
build requirement."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_torch_is_not_a_build_requirement():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip() in ("torch", "triton") for r in requires), requires


def test_wheel_is_pure_python_without_cuda(tmp_path):
    pytest.importorskip("setuptools")
    import torch

    # Auto mode (unset) must give a pure wheel where torch has no CUDA; on a CUDA machine, skip the build.
    env = {"FASTPE_BUILD_CUDA": "0" if torch.version.cuda else "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = list(tmp_path.glob("fastpe-*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl"), wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "fastpe/__init__.py" in names and "fastpe/ops/relative_attention.py" in names
    assert not any(n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
