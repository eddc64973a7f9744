"""The tisas encoding end to end: the layer, the factory names, save/load, CARCA and SASRec with
timestamps, training and the study on timestamped data."""

from __future__ import annotations

import pytest
import torch

import fastpe
from fastpe.data import InteractionData, synthetic_dataset
from fastpe.models import CARCA, SASRec
from fastpe.ops import time_interval_attention
from fastpe.train import TrainConfig, train
from fastpe.train.study import run_study

DATA = synthetic_dataset(n_users=40, n_items=60, min_len=5, max_len=12, seed=2)


def batch(b=3, L=9, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, d, generator=gen)
    t = (1.6e9 + torch.rand(b, L, generator=gen, dtype=torch.float64).mul(8).exp().mul(60).cumsum(1)).round()
    pad = torch.arange(L)[None, :] < torch.tensor([3, 0, L])[:b, None]  # the last row is all padding
    return x, t, pad


def test_factory_names_and_options():
    layer = fastpe.positional_encoding("tisas", 12, num_heads=3, max_len=20)
    assert isinstance(layer, fastpe.TimeIntervalMultiheadAttention) and layer.kind == "attention"
    assert layer.time_span == 256 and layer.max_len == 20 and layer.time_key.shape == (3, 257, 4)
    assert fastpe.positional_encoding("TiSAS-64", 12).time_span == 64
    assert fastpe.encoding_kind("tisas-8") == "attention"
    assert isinstance(fastpe.input_encoding("tisas", 12), fastpe.NoEncoding)
    shared = fastpe.attention_layer("tisas-4", 12, 2, per_head_tables=False, position_tables=False, time_unit=86400)
    assert shared.time_key.shape == (5, 6) and shared.position_key is None and shared.time_unit == 86400
    with pytest.raises(ValueError, match="unknown positional encoding 'tisas-x'"):
        fastpe.positional_encoding("tisas-x", 8)
    with pytest.raises(ValueError, match="time_unit must be 'user' or a positive number"):
        fastpe.attention_layer("tisas", 8, time_unit=0)


def test_layer_is_the_op_with_its_tables():
    x, t, pad = batch()
    layer = fastpe.positional_encoding("tisas-6", 8, num_heads=2, max_len=16).double()
    out, weights = layer(x.double(), x.double(), x.double(), key_padding_mask=pad, is_causal=True, timestamps=t)
    assert weights.shape == (3, 9, 9)
    q, k, v = (z.view(3, 9, 2, 4).transpose(1, 2) for z in layer._project(x.double(), x.double(), x.double()))
    want = time_interval_attention(q, k, v, layer.time_key, layer.time_value, t, pos_k=layer.position_key[:, :9],
                                   pos_v=layer.position_value[:, :9], key_padding_mask=pad, is_causal=True,
                                   backend="reference")
    want = layer.out_proj(want.transpose(1, 2).reshape(3, 9, 8))
    want[2] = 0.0  # the fully padded row gives 0
    torch.testing.assert_close(out, want)
    # Padding timestamps are never read; the batch of one sequence works unbatched too.
    garbage = t.masked_fill(pad, float("nan"))
    torch.testing.assert_close(layer(x.double(), x.double(), x.double(), key_padding_mask=pad, timestamps=garbage,
                                     need_weights=False)[0],
                               layer(x.double(), x.double(), x.double(), key_padding_mask=pad, timestamps=t,
                                     need_weights=False)[0])
    single, _ = layer(x[1].double(), x[1].double(), x[1].double(), timestamps=t[1])
    torch.testing.assert_close(single, layer(x[1:2].double(), x[1:2].double(), x[1:2].double(), timestamps=t[1:2])[0][0])


def test_layer_errors_and_gradients():
    x, t, pad = batch()
    layer = fastpe.positional_encoding("tisas-6", 8, num_heads=2, max_len=16, backend="torch")
    with pytest.raises(ValueError, match=r"needs timestamps=\[B, L\]"):
        layer(x, x, x)
    with pytest.raises(ValueError, match=r"timestamps: expected \[B, L\]"):
        layer(x, x, x, timestamps=t[0])
    with pytest.raises(ValueError, match="exceeds the configured maximum max_len=4"):
        fastpe.positional_encoding("tisas-6", 8, max_len=4)(x, x, x, timestamps=t)
    out, _ = layer(x, x, x, key_padding_mask=pad, timestamps=t, need_weights=False)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(layer.time_key.grad.abs().sum()) > 0 and float(layer.position_value.grad.abs().sum()) > 0


def test_save_and_load_keep_the_configuration(tmp_path):
    layer = fastpe.positional_encoding("tisas-12", 8, num_heads=2, max_len=16, time_unit=3600.0)
    fastpe.save(layer, tmp_path / "layer.pt")
    loaded = fastpe.load(tmp_path / "layer.pt")
    assert loaded.config() == layer.config()
    x, t, pad = batch()
    torch.testing.assert_close(loaded(x, x, x, key_padding_mask=pad, timestamps=t)[0],
                               layer(x, x, x, key_padding_mask=pad, timestamps=t)[0])
    model = SASRec(30, d_model=8, max_len=9, encoding="tisas-12")
    fastpe.save(model, tmp_path / "model.pt")
    fresh = fastpe.load(tmp_path / "model.pt", SASRec(30, d_model=8, max_len=9, encoding="rmha-4"))
    assert isinstance(fresh.encoder.blocks[0].attention, fastpe.TimeIntervalMultiheadAttention)


@pytest.mark.parametrize("cls", [CARCA, SASRec])
def test_models_take_timestamps(cls):
    x, t, pad = batch()
    model = cls(30, d_model=8, n_heads=2, max_len=9, encoding="tisas-16", dropout=0.0).eval()
    items = torch.randint(1, 31, (3, 9)).masked_fill(pad, 0)
    candidates = torch.randint(1, 31, (3, 1, 4))
    assert model.needs_timestamps
    with pytest.raises(ValueError, match="needs the timestamps"):
        model(items, None, candidates)
    logits = model(items, None, candidates, timestamps=t)
    assert logits.shape == (3, 1, 4) and torch.isfinite(logits).all()
    # The intervals matter: stretching one user's gaps unevenly changes its scores only.
    t2 = t.clone()
    t2[1, 5:] += 1e7
    other = model(items, None, candidates, timestamps=t2)
    assert not torch.allclose(other[1], logits[1]) and torch.equal(other[0], logits[0])
    # A uniform shift of every time or a common scale changes nothing (relative to the user's unit).
    torch.testing.assert_close(model(items, None, candidates, timestamps=t * 3 + 1e5), logits)


def test_train_carca_and_sasrec_with_tisas(tmp_path):
    for model in ("carca", "sasrec"):
        cfg = TrainConfig(model=model, encoding="tisas-32", d_model=16, n_blocks=1, n_heads=2, max_len=10,
                          batch_size=16, epochs=1, negatives=3, warmup_steps=2, progress=False, threads=1,
                          out_dir=str(tmp_path / model))
        summary = train(cfg, DATA, lambda *a: None)
        assert summary["history"][0]["loss"] > 0 and 0.0 <= summary["test"]["sampled_ndcg@10"] <= 1.0


def test_timestamps_are_required_from_the_data(tmp_path):
    untimed = InteractionData(name="untimed", sequences=DATA.sequences, n_items=DATA.n_items)
    cfg = TrainConfig(encoding="tisas", epochs=1, progress=False, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="needs timestamps, and the data set 'untimed' has none"):
        train(cfg, untimed, lambda *a: None)
    with pytest.raises(ValueError, match="encodings tisas need timestamps"):
        run_study(cfg, ["none", "tisas"], [0], tmp_path / "study", log=lambda *a: None, data=untimed)
    assert not (tmp_path / "study" / "runs").exists()
