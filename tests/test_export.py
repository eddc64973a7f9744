"""Saving and loading with the encoding configuration (fastpe.save / fastpe.load, config()),
and torch.export of every module with a dynamic batch dimension."""

import inspect

import pytest
import torch
from torch import nn

import fastpe
from fastpe.serialization import fastpe_submodules
from module_zoo import B, D, H, L, MAX_LEN, Wrapped, all_modules, attention_layers, call, input_encodings, left_padding

ZOO = sorted(all_modules())


def _trained(module: nn.Module) -> nn.Module:
    """Perturb every parameter so that a load that silently re-initialises shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


@pytest.mark.parametrize("name", ZOO)
def test_config_names_every_constructor_argument(name):
    module = all_modules()[name]
    params = set(inspect.signature(type(module).__init__).parameters) - {"self", "device", "dtype"}
    assert set(module.config()) == params
    rebuilt = type(module).from_config(module.config())
    assert rebuilt.config() == module.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_save_load_roundtrip(name, tmp_path):
    module = _trained(all_modules()[name])
    path = tmp_path / "m.pt"
    fastpe.save(module, path)
    torch.load(path, weights_only=True)  # readable without unpickling any class
    loaded = fastpe.load(path)
    assert type(loaded) is type(module) and loaded.config() == module.config()
    x, pad = torch.randn(B, L, D), left_padding()
    torch.testing.assert_close(call(loaded.eval(), x, pad), call(module, x, pad), rtol=0, atol=0)


def test_save_load_keeps_non_default_options_and_dtype(tmp_path):
    module = _trained(fastpe.RelativeMultiheadAttention(D, H, max_distance=2, per_head_tables=True, dropout=0.1, bias=False))
    module = module.to(torch.bfloat16)
    fastpe.save(module, tmp_path / "m.pt")
    loaded = fastpe.load(tmp_path / "m.pt")
    assert loaded.max_distance == 2 and loaded.per_head_tables and loaded.dropout == 0.1 and loaded.in_proj_bias is None
    assert loaded.relative_key.dtype == torch.bfloat16 and loaded.in_proj_weight.dtype == torch.bfloat16
    assert isinstance(loaded.relative_key, nn.Parameter) and loaded.relative_key.requires_grad
    torch.testing.assert_close(loaded.relative_key, module.relative_key, rtol=0, atol=0)


def test_backend_override_on_load(tmp_path):
    fastpe.save(fastpe.RotatoryEncoding(D, MAX_LEN, backend="reference"), tmp_path / "m.pt")
    assert fastpe.load(tmp_path / "m.pt", backend="torch").backend == "torch"


class TinyModel(nn.Module):
    """A user model that holds fastpe modules among its own layers."""

    def __init__(self, encoding: str):
        super().__init__()
        self.item_emb = nn.Embedding(20, D, padding_idx=0)
        self.pos = fastpe.input_encoding(encoding, D, MAX_LEN)
        self.blocks = nn.ModuleList(fastpe.attention_layer(encoding, D, H) for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, ids):
        pad = ids == 0
        x = self.pos(self.item_emb(ids), padding_mask=pad)
        for block in self.blocks:
            x = self.norm(x + block(x, x, x, key_padding_mask=pad, need_weights=False, is_causal=True)[0])
        return x


def test_model_checkpoint_restores_its_encodings(tmp_path):
    model = _trained(TinyModel("rmha-4"))
    model.pos = _trained(fastpe.RotatoryEncoding(D, MAX_LEN, mode="rotate"))  # a non-default option
    assert set(fastpe_submodules(model)) == {"pos", "blocks.0", "blocks.1"}
    fastpe.save(model, tmp_path / "model.pt")
    fresh = TinyModel("abs")  # built with another encoding: loading switches it back
    loaded = fastpe.load(tmp_path / "model.pt", fresh)
    assert loaded is fresh
    assert isinstance(fresh.blocks[0], fastpe.RelativeMultiheadAttention)
    assert isinstance(fresh.pos, fastpe.RotatoryEncoding) and fresh.pos.mode == "rotate"
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    torch.testing.assert_close(fresh.eval()(ids), model(ids), rtol=0, atol=0)


def test_model_checkpoint_needs_a_model(tmp_path):
    fastpe.save(TinyModel("rope"), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="holds a model of class .*TinyModel.*pass it as model="):
        fastpe.load(tmp_path / "model.pt")


def test_load_rejects_foreign_files_and_classes(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by fastpe.save"):
        fastpe.load(tmp_path / "other.pt")
    fastpe.save(fastpe.NoEncoding(D), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["module"]["class"] = "os.system"
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not part of fastpe"):
        fastpe.load(tmp_path / "evil.pt")


def test_load_into_wrong_fastpe_module_says_so(tmp_path):
    fastpe.save(fastpe.RelativeMultiheadAttention(D, H), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="RelativeMultiheadAttention"):
        fastpe.load(tmp_path / "m.pt", fastpe.RotaryMultiheadAttention(D, H))


# --- torch.export ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_export_with_dynamic_batch(name):
    module = Wrapped(_trained(all_modules()[name]))
    x, pad = torch.randn(B, L, D), left_padding()
    batch = torch.export.Dim("batch", min=1, max=512)
    program = torch.export.export(module, (x, pad), dynamic_shapes=({0: batch}, {0: batch}))
    for b in (1, B, 5):
        x2, pad2 = torch.randn(b, L, D), left_padding(b, fully_padded_row=b > 1)
        torch.testing.assert_close(program.module()(x2, pad2), module(x2, pad2), rtol=1e-6, atol=1e-6)


def test_export_with_positions_skips_value_checks():
    # The eager range check needs a host sync; an exported program must not contain it.
    enc = _trained(fastpe.input_encoding("rotatory+con", D, MAX_LEN))

    class WithPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x, positions):
            return self.enc(x, positions=positions)

    positions = torch.arange(L).flip(0).expand(B, L).contiguous()
    batch = torch.export.Dim("batch", min=1, max=512)
    program = torch.export.export(WithPositions(), (torch.randn(B, L, D), positions), dynamic_shapes=({0: batch}, {0: batch}))
    x2 = torch.randn(4, L, D)
    p2 = torch.randint(0, MAX_LEN, (4, L))
    torch.testing.assert_close(program.module()(x2, p2), enc(x2, positions=p2))


def test_exported_program_saves_and_loads(tmp_path):
    module = Wrapped(_trained(attention_layers()["rmha-4"]))
    x, pad = torch.randn(B, L, D), left_padding()
    program = torch.export.export(module, (x, pad))
    torch.export.save(program, tmp_path / "rmha.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "rmha.pt2").module()(x, pad), module(x, pad))


def test_zoo_covers_every_encoding():
    names = set(input_encodings()) | set(attention_layers())
    assert {n for n in fastpe.ENCODINGS if fastpe.encoding_kind(n) == "input"} <= names
    assert {"rmha-4", "rope"} <= names
