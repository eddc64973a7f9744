"""The SASRec.pytorch adapter: nn.MultiheadAttention compatibility of fastpe's layers, patch() on
the example's SASRec.pytorch-style model, and the example script itself."""

import copy
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpe
from fastpe.integrations import NewParametersWarning, add_new_parameters, new_parameters
from fastpe.integrations import sasrec as adapter
from fastpe.integrations.position import AdditivePositionEmbedding, ZeroPositionEmbedding
from fastpe.reference import relative_attention_reference

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sasrec_pytorch_swap.py"
E, HEADS, ITEMS, MAXLEN = 16, 2, 30, 9


def _example():
    spec = importlib.util.spec_from_file_location("sasrec_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _example()


def trained(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module.eval()


def model_pair(encoding, **options):
    torch.manual_seed(0)
    model = trained(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS))
    return model, adapter.patch(copy.deepcopy(model), encoding, **options)


def left_padded(lengths=(9, 5, 2, 7)):
    seq = torch.randint(1, ITEMS + 1, (len(lengths), MAXLEN))
    return seq.masked_fill(torch.arange(MAXLEN)[None, :] < (MAXLEN - torch.tensor(lengths))[:, None], 0)


# --- nn.MultiheadAttention compatibility ----------------------------------------------------


@pytest.mark.parametrize("cls", [fastpe.MultiheadAttention, fastpe.RelativeMultiheadAttention, fastpe.RotaryMultiheadAttention])
@pytest.mark.parametrize("bias,kdim", [(True, None), (False, None), (True, 12)])
def test_state_dict_names_and_shapes_match_torch(cls, bias, kdim):
    torch_layer = nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=kdim)
    layer = cls(E, HEADS, bias=bias, kdim=kdim, vdim=kdim, batch_first=False)
    theirs = {k: v.shape for k, v in torch_layer.state_dict().items()}
    ours = {k: v.shape for k, v in layer.state_dict().items()}
    positional = {"relative_key", "relative_value", "angle_weight", "inv_freq"}
    assert {k: ours[k] for k in theirs} == theirs
    assert set(ours) - set(theirs) <= positional
    layer.load_state_dict(torch_layer.state_dict(), strict=False)  # and back, for the plain layer
    if cls is fastpe.MultiheadAttention:
        torch_layer.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("need_weights", [True, False])
def test_plain_layer_matches_torch_on_sasrec_calls(need_weights):
    """Sequence-first, query != key (SASRec passes the layer-normed Q), bool causal mask."""
    torch_layer = trained(nn.MultiheadAttention(E, HEADS, dropout=0.2))
    layer = fastpe.MultiheadAttention(E, HEADS, dropout=0.2, batch_first=False).eval()
    layer.load_state_dict(torch_layer.state_dict())
    seqs = torch.randn(MAXLEN, 4, E)
    q = nn.functional.layer_norm(seqs, (E,))
    causal = ~torch.tril(torch.ones(MAXLEN, MAXLEN, dtype=torch.bool))
    out_ref, w_ref = torch_layer(q, seqs, seqs, attn_mask=causal, need_weights=need_weights)
    out, w = layer(q, seqs, seqs, attn_mask=causal, need_weights=need_weights)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)


def test_layer_factory_is_sequence_first():
    layer = adapter.multihead_attention("rmha-4", E, HEADS, 0.1)
    assert isinstance(layer, fastpe.RelativeMultiheadAttention) and not layer.batch_first and layer.dropout == 0.1
    assert adapter.multihead_attention("rope", E, HEADS, batch_first=True).batch_first


# --- patch() --------------------------------------------------------------------------------


def test_patch_learnt_keeps_the_function_and_names():
    model, patched = model_pair("learnt")
    assert all(type(m) is fastpe.MultiheadAttention for m in patched.attention_layers)
    assert patched.pos_emb is not None and type(patched.pos_emb) is nn.Embedding
    assert list(patched.state_dict()) == list(model.state_dict())
    seqs = left_padded()
    torch.testing.assert_close(patched.log2feats(seqs), model.log2feats(seqs), rtol=1e-5, atol=1e-5)


def _log2feats_with_reference_rmha(model, patched, seqs):
    """The original model's log2feats with pos_emb zeroed and each attention layer computed by
    fastpe's reference RMHA from the patched layer's weights and tables."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.pos_emb.weight.zero_()

    def rmha(layer):
        def forward(query, key, value, attn_mask=None, **_):
            length, batch, _ = query.shape
            w_q, w_k, w_v = layer.in_proj_weight.chunk(3)
            b_q, b_k, b_v = layer.in_proj_bias.chunk(3)
            split = lambda t: t.view(length, batch, HEADS, E // HEADS).permute(1, 2, 0, 3)  # noqa: E731
            q, k, v = (split(nn.functional.linear(t, w, b)) for t, w, b in
                       ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
            bias = torch.zeros(length, length).masked_fill(attn_mask, float("-inf"))
            out = relative_attention_reference(q, k, v, layer.relative_key[None], layer.relative_value[None], attn_bias=bias)
            return layer.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, E)), None
        return forward

    for i, layer in enumerate(patched.attention_layers):
        reference.attention_layers[i].forward = rmha(layer)
    return reference.log2feats(seqs)


def test_patch_rmha_computes_relative_attention_on_sasrec_layout():
    model, patched = model_pair("rmha-4")
    assert isinstance(patched.pos_emb, ZeroPositionEmbedding)
    for old, new in zip(model.attention_layers, patched.attention_layers):
        assert isinstance(new, fastpe.RelativeMultiheadAttention) and not new.batch_first and new.dropout == old.dropout
        assert torch.equal(new.in_proj_weight, old.in_proj_weight) and torch.equal(new.out_proj.weight, old.out_proj.weight)
    with torch.no_grad():  # give the relative tables values worth checking
        for layer in patched.attention_layers:
            layer.relative_key.normal_()
            layer.relative_value.normal_()
    seqs = left_padded()
    expected = _log2feats_with_reference_rmha(model, patched, seqs)
    torch.testing.assert_close(patched.log2feats(seqs), expected, rtol=1e-5, atol=1e-5)


def test_need_weights_false_takes_the_fast_path_with_the_same_result():
    model, patched = model_pair("rmha-4")
    fast = adapter.patch(copy.deepcopy(model), "rmha-4", need_weights=False)
    fast.load_state_dict(patched.state_dict())
    seqs = left_padded()
    torch.testing.assert_close(fast.log2feats(seqs), patched.log2feats(seqs), rtol=1e-5, atol=1e-5)
    x = torch.randn(MAXLEN, 2, E)
    layer = fast.attention_layers[0]
    assert layer(x, x, x)[1] is None and layer(x, x, x, None, True)[1] is None
    assert patched.attention_layers[0](x, x, x)[1] is not None


def test_patch_abs_rotatory_and_padding_idx():
    _, patched = model_pair("abs", scale=1.0)
    assert isinstance(patched.pos_emb, AdditivePositionEmbedding)
    # SASRec.pytorch numbers positions 1..L, 0 = padding (padding_idx=0): row 0 gives zeros.
    ids = torch.arange(MAXLEN + 1).expand(2, MAXLEN + 1)
    codes = fastpe.SinusoidalEncoding(E, MAXLEN + 1).codes
    torch.testing.assert_close(patched.pos_emb(ids)[1], torch.cat([torch.zeros(1, E), codes[1:]]))
    model = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN)
    adapter.patch(model, "rotatory")
    codes = model.pos_emb(torch.tensor([[0, 0, 1, 2, 3]]))
    assert torch.equal(codes[0, :2], torch.zeros(2, E)) and codes[0, 2:].abs().sum() > 0
    codes.sum().backward()
    assert model.pos_emb.encoding.angle_weight.grad is not None


# --- placement: the patch may come before the host's init, after its optimizer ---------------


@pytest.mark.parametrize("encoding", ["none", "learnt", "abs", "rotatory", "rmha-4", "rope"])
def test_host_code_that_touches_pos_emb_weight_runs_after_patch(encoding):
    """SASRec.pytorch's main.py zeroes row 0 of pos_emb.weight after building the model."""
    model = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN), encoding)
    example.initialise(model)  # xavier_normal_ on every parameter, then pos_emb.weight.data[0, :] = 0
    assert model.pos_emb.weight.shape == (MAXLEN + 1, E)
    assert not model.pos_emb.weight[0].any()
    assert torch.isfinite(model.log2feats(left_padded())).all()


def _step(model, optimizer):
    seqs = left_padded()
    pos_logits, neg_logits = model(seqs, seqs, torch.randint(1, ITEMS + 1, seqs.shape))
    optimizer.zero_grad()
    (pos_logits.square().mean() + neg_logits.square().mean()).backward()
    optimizer.step()


def test_patch_after_the_optimizer_keeps_training_the_host_weights_and_warns_about_new_ones():
    torch.manual_seed(0)
    model = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS)
    host = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    adapter.patch(model, "rmha-4")
    layer = model.attention_layers[0]
    assert layer.in_proj_weight is host["attention_layers.0.in_proj_weight"]  # the very same Parameter
    assert layer.out_proj.weight is host["attention_layers.0.out_proj.weight"]
    assert model.fastpe_patch.new_parameters == [
        f"attention_layers.{i}.relative_{t}" for i in (0, 1) for t in ("key", "value")]
    before = layer.in_proj_weight.detach().clone()
    with pytest.warns(NewParametersWarning, match=r"not the 4 parameters patch\(\) added .*add_new_parameters"):
        _step(model, optimizer)
    assert not torch.equal(layer.in_proj_weight, before)  # the old optimizer still trains the host weights
    assert layer.relative_key.grad is not None
    # The fix the warning names: the tables join the optimizer, which then trains them.
    assert add_new_parameters(optimizer, model) == 4 and add_new_parameters(optimizer, model) == 0
    table = layer.relative_key.detach().clone()
    _step(model, optimizer)
    assert not torch.equal(layer.relative_key, table)


def test_no_warning_when_the_optimizer_is_built_after_patch():
    model = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), "rope",
                          learnable="frequencies")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewParametersWarning)
        _step(model, optimizer)
    assert [p for p in new_parameters(model)] == [layer.inv_freq for layer in model.attention_layers]
    with pytest.raises(ValueError, match="was not patched by fastpe"):
        new_parameters(nn.Linear(2, 2))


# --- scale of the additive encodings ----------------------------------------------------------


def _rms(table):
    return table[1:].detach().square().mean().sqrt().item()  # row 0 = padding


@pytest.mark.parametrize("encoding", ["abs", "rotatory"])
def test_patch_matches_the_scale_of_the_table_it_replaces(encoding):
    model = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN)
    example.initialise(model)  # xavier: rms about sqrt(2 / (rows + d)), far below the codes' 0.71
    target = _rms(model.pos_emb.weight)
    adapter.patch(model, encoding)
    assert _rms(model.pos_emb.weight) == pytest.approx(target, rel=1e-5)
    ids = torch.arange(1, MAXLEN + 1)[None]
    assert model.pos_emb(ids).square().mean().sqrt().item() == pytest.approx(target, rel=1e-5)
    assert model.fastpe_patch.options["scale"] == pytest.approx(target / math.sqrt(0.5), rel=1e-5)
    unit = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN), encoding, scale=1.0)
    assert _rms(unit.pos_emb.weight) == pytest.approx(math.sqrt(0.5), rel=1e-5)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN), encoding, scale=-1.0)


# --- saved models travel --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["none", "learnt", "abs"])
def test_patched_state_dict_loads_into_the_unpatched_model_and_computes_the_same(encoding):
    torch.manual_seed(0)
    model = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS)
    example.initialise(model)
    patched = trained(adapter.patch(copy.deepcopy(model), encoding))
    unpatched = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS).eval()
    unpatched.load_state_dict(patched.state_dict())  # strict
    seqs = left_padded()
    torch.testing.assert_close(unpatched.log2feats(seqs), patched.log2feats(seqs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoding", ["none", "abs", "rotatory", "rmha-4"])
def test_patched_state_dict_loads_into_a_model_patched_afresh(encoding):
    """The fresh model's own table differs, so its matched scale does too: the saved table carries its scale."""
    torch.manual_seed(0)
    patched = trained(adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), encoding))
    torch.manual_seed(1)
    fresh = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), encoding).eval()
    fresh.load_state_dict(patched.state_dict())
    seqs = left_padded()
    torch.testing.assert_close(fresh.log2feats(seqs), patched.log2feats(seqs), rtol=1e-5, atol=1e-5)


def test_a_learnt_table_does_not_load_silently_into_a_patched_position_module():
    host = trained(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN))
    for encoding in ("none", "abs"):
        patched = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN), encoding)
        with pytest.raises(RuntimeError, match="load the checkpoint into the unpatched model first, then patch"):
            patched.load_state_dict(host.state_dict())
    # The way that works: load into the unpatched model, then patch (patch keeps every weight).
    loaded = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN)
    loaded.load_state_dict(host.state_dict())
    loaded = adapter.patch(loaded, "rmha-4").eval()
    assert torch.equal(loaded.attention_layers[1].in_proj_weight, host.attention_layers[1].in_proj_weight)


def test_fastpe_load_keeps_need_weights_false(tmp_path):
    _, patched = model_pair("rmha-4", need_weights=False)
    fastpe.save(patched, tmp_path / "m.pt")
    fresh = fastpe.load(tmp_path / "m.pt", example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS))
    x = torch.randn(MAXLEN, 2, E)
    for layer in fresh.attention_layers:
        assert layer(x, x, x)[1] is None and layer.fastpe_need_weights is False
    layer = fastpe.load(tmp_path / "m.pt", fresh).attention_layers[0]  # into a model already patched: no second hook
    assert len(layer._forward_pre_hooks) == 1
    plain = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), "rmha-4")
    fastpe.save(plain, tmp_path / "plain.pt")
    reloaded = fastpe.load(tmp_path / "plain.pt", example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS))
    assert reloaded.attention_layers[0](x, x, x)[1] is not None


# --- rope's base ----------------------------------------------------------------------------


def test_rope_base_is_the_studys_and_shows_in_the_summary():
    from fastpe.train.config import TrainConfig

    model = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), "rope")
    assert TrainConfig().rope_base == 1000.0
    assert all(layer.base == TrainConfig().rope_base for layer in model.attention_layers)
    assert "rope (base=1000)" in model.fastpe_patch.summary()
    model = adapter.patch(example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS), "rope", base=10000.0)
    assert model.attention_layers[0].base == 10000.0 and "base=10000" in model.fastpe_patch.summary()


def test_patch_errors_name_the_problem():
    with pytest.raises(ValueError, match="found no attention layer in Linear: looked for torch.nn.MultiheadAttention"):
        adapter.patch(nn.Linear(2, 2), "rmha-4")
    model = nn.Sequential(nn.MultiheadAttention(E, HEADS, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_bias_kv"):
        adapter.patch(model, "rmha-4")
    _, patched = model_pair("rope")
    with pytest.raises(ValueError, match="already holds fastpe attention layers"):
        adapter.patch(patched, "rmha-4")
    with pytest.raises(ValueError, match="rotates it"):
        adapter.patch(example.SASRec(ITEMS, E, MAXLEN), "rotatory", mode="rotate")
    with pytest.raises(ValueError, match="need_weights must be None"):
        adapter.patch(example.SASRec(ITEMS, E, MAXLEN), "rope", need_weights=True)


def test_patched_model_trains_compiles_and_reloads(tmp_path):
    _, patched = model_pair("rope", need_weights=False, learnable="frequencies")
    seqs = example.synthetic_sequences(64, ITEMS, MAXLEN)
    losses = example.train(patched, seqs, ITEMS, steps=15, batch=32)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    patched.eval()
    torch._dynamo.reset()
    compiled = torch.compile(patched.log2feats, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(seqs[:4, :-1]), patched.log2feats(seqs[:4, :-1]), rtol=1e-5, atol=1e-5)
    fastpe.save(patched, tmp_path / "m.pt")
    fresh = fastpe.load(tmp_path / "m.pt", example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN, num_heads=HEADS)).eval()
    assert fresh.attention_layers[0].learnable == "frequencies"
    torch.testing.assert_close(fresh.log2feats(seqs[:4, :-1]), patched.log2feats(seqs[:4, :-1]), rtol=1e-5, atol=1e-5)


def test_example_script_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "15"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "rmha-4: loss" in result.stdout and "same predictions" in result.stdout, result.stdout
