"""The SASRec.pytorch adapter: nn.MultiheadAttention compatibility of fastpe's layers, patch() on
the example's SASRec.pytorch-style model, and the example script itself."""

import copy
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpe
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
    _, patched = model_pair("abs")
    assert isinstance(patched.pos_emb, AdditivePositionEmbedding)
    ids = torch.arange(MAXLEN).expand(2, MAXLEN)
    torch.testing.assert_close(patched.pos_emb(ids)[1], fastpe.SinusoidalEncoding(E, MAXLEN).codes)
    # Later SASRec.pytorch versions number positions 1..L with 0 = padding (padding_idx=0).
    model = example.SASRec(ITEMS, hidden_units=E, maxlen=MAXLEN)
    model.pos_emb = nn.Embedding(MAXLEN + 1, E, padding_idx=0)
    adapter.patch(model, "rotatory")
    codes = model.pos_emb(torch.tensor([[0, 0, 1, 2, 3]]))
    assert torch.equal(codes[0, :2], torch.zeros(2, E)) and codes[0, 2:].abs().sum() > 0
    codes.sum().backward()
    assert model.pos_emb.encoding.angle_weight.grad is not None


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
    # The load restores weights and encodings, not patch()'s need_weights=False hook: the fresh
    # model takes the need_weights=True path, equal up to rounding.
    torch.testing.assert_close(fresh.log2feats(seqs[:4, :-1]), patched.log2feats(seqs[:4, :-1]), rtol=1e-5, atol=1e-5)


def test_example_script_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "15"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "rmha-4: loss" in result.stdout and "same predictions" in result.stdout, result.stdout
