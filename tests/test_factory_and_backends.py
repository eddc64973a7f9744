"""Encodings by name, backend resolution, and what `import fastpe` pulls in."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpe
from fastpe.backends import BackendUnavailableError, available_backends, resolve_backend


@pytest.mark.parametrize("name", fastpe.ENCODINGS)
def test_every_study_encoding_builds_and_runs(name):
    module = fastpe.positional_encoding(name, 16, max_len=20, num_heads=2)
    x = torch.randn(2, 9, 16)
    out = module(x, x, x, need_weights=False)[0] if module.kind == "attention" else module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert module.kind == fastpe.encoding_kind(name)
    assert isinstance(fastpe.attention_layer(name, 16, 2), torch.nn.Module)


def test_kinds_and_generic_rmha_distance():
    assert fastpe.encoding_kind("rmha-4") == "attention" and fastpe.encoding_kind("rope") == "attention"
    assert fastpe.encoding_kind("abs+con") == "input"
    assert fastpe.attention_layer("rmha-2", 8, 2).relative_key.shape == (5, 4)
    assert isinstance(fastpe.input_encoding("rmha-4", 8), fastpe.NoEncoding)
    assert isinstance(fastpe.attention_layer("learnt", 8, 2), fastpe.MultiheadAttention)
    enc = fastpe.positional_encoding("rotatory", 8, mode="rotate", reverse=True)
    assert enc.mode == "rotate" and enc.reverse
    rope = fastpe.positional_encoding("rope", 8, num_heads=2, learnable="angles", max_len=33)
    assert rope.angle_weight.shape == (33, 2)


@pytest.mark.parametrize("bad", ["sinusoid", "rmha", "rmha-x", "rope+con", ""])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(ValueError, match="expected one of none, abs, learnt"):
        fastpe.positional_encoding(bad, 8)


def test_backend_resolution_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", "relative_attention", cpu) == "torch"
    assert resolve_backend("reference", "rotary", cpu) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_backends("cpu") == ["reference", "torch"]
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        resolve_backend("triton", "concat_projection", cpu)
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        resolve_backend("cuda", "concat_projection", cpu)
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("torch", "flash", cpu)


def test_auto_falls_back_to_torch_for_shapes_triton_declines(monkeypatch):
    # Pretend auto prefers triton on this device (it runs under the interpreter here): a head size
    # above Triton's limit must run through the torch composition, an explicit request must refuse.
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("fastpe.backends._auto_order", lambda op, device, klass="any": ("triton", "torch"))
    from fastpe.kernels.triton._limits import MAX_HEAD_DIM

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, MAX_HEAD_DIM + 2, generator=g) for _ in range(3))
    table = torch.randn(9, MAX_HEAD_DIM + 2, generator=g)
    out = fastpe.relative_attention(q, k, v, table, table, backend="auto")
    torch.testing.assert_close(out, fastpe.relative_attention(q, k, v, table, table, backend="torch"))
    with pytest.raises(ValueError, match="head sizes up to"):
        fastpe.relative_attention(q, k, v, table, table, backend="triton")
    x, pos_table, weight = torch.randn(1, 5, 4, generator=g), torch.randn(5000, 3, generator=g), torch.randn(6, 7, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4999]])
    out = fastpe.concat_projection(x, pos_table, weight, positions=positions, backend="auto")
    torch.testing.assert_close(out, fastpe.concat_projection(x, pos_table, weight, positions=positions, backend="torch"))


def test_auto_follows_the_measured_order_per_shape_class(monkeypatch, tmp_path):
    import json

    from fastpe import backends

    measured = {"relative_attention": {"L<=64,dh<=64": ["triton", "cuda"]}, "rotary": {"any": ["triton"]}}
    path = tmp_path / "auto_preferences.json"
    path.write_text(json.dumps({"measured": {"gpu": "test"}, "order": measured}))
    assert backends._load_auto_preferences(path) == measured
    assert backends._load_auto_preferences(tmp_path / "absent.json") == {}
    monkeypatch.setattr(backends, "AUTO_PREFERENCES", measured)
    gpu = torch.device("cuda")  # only the device type is read
    assert backends._auto_order("relative_attention", gpu, "L<=64,dh<=64") == ("triton", "cuda", "torch")
    assert backends._auto_order("relative_attention", gpu, "L>64,dh>64") == ("cuda", "triton", "torch")
    assert backends._auto_order("rotary", gpu) == ("triton", "cuda", "torch")
    assert backends._auto_order("rotary", torch.device("cpu")) == ("torch",)

    seen = []
    monkeypatch.setattr(backends, "_auto_order", lambda op, device, klass="any": seen.append(klass) or ("torch",))
    for length, head in ((7, 8), (100, 90)):
        q = torch.randn(1, 1, length, head)
        fastpe.relative_attention(q, q, q, torch.zeros(9, head), torch.zeros(9, head))
    assert seen == ["L<=64,dh<=64", "L>64,dh>64"]


def test_import_fastpe_imports_only_torch():
    code = "import sys, fastpe; bad = [m for m in ('triton', 'fastpe._C', 'fastpe.kernels.triton') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_runs_every_encoding(capsys):
    from fastpe.cli import main

    assert main(["demo", "--batch", "4", "--length", "9", "--d-model", "16"]) == 0
    printed = capsys.readouterr().out
    for name in fastpe.ENCODINGS:
        assert f"| {name} " in printed


def test_quickstart_example_runs():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")], capture_output=True, text=True, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("finite=True") == len(fastpe.ENCODINGS)
