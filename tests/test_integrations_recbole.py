"""The RecBole adapter: its layer against RecBole's layer math, patch() on SASRec/BERT4Rec-shaped
models, and (when RecBole is installed) the real thing.

The first part needs no RecBole: ``RecBoleAttention`` below restates the math of RecBole 1.2.1's
``recbole.model.layers.MultiHeadAttention`` (query/key/value Linear, scores / sqrt(dh) + additive
mask, softmax, attention dropout, dense, hidden dropout, residual + LayerNorm), and ``MiniSeqRec``
the parts of its SASRec / BERT4Rec that patch() touches.
"""

import copy
import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpe
from fastpe.integrations import NewParametersWarning, add_new_parameters
from fastpe.integrations import recbole as adapter
from fastpe.integrations.position import AdditivePositionEmbedding, ZeroPositionEmbedding
from fastpe.reference import relative_attention_reference, rotary_reference

HIDDEN, HEADS, LEN, ITEMS = 8, 2, 6, 30


class RecBoleAttention(nn.Module):
    """RecBole 1.2.1's MultiHeadAttention, restated (same submodule names and math)."""

    def __init__(self, n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, layer_norm_eps):
        super().__init__()
        self.num_attention_heads = n_heads
        self.attention_head_size = hidden_size // n_heads
        self.all_head_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, input_tensor, attention_mask):
        b, length, _ = input_tensor.shape
        shape = (b, length, self.num_attention_heads, self.attention_head_size)
        q = self.query(input_tensor).view(shape).permute(0, 2, 1, 3)
        k = self.key(input_tensor).view(shape).permute(0, 2, 3, 1)
        v = self.value(input_tensor).view(shape).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k) / math.sqrt(self.attention_head_size) + attention_mask
        probs = self.attn_dropout(self.softmax(scores))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(b, length, self.all_head_size)
        return self.LayerNorm(self.out_dropout(self.dense(context)) + input_tensor)


# The class name is what patch() recognises RecBole's layer by (with its submodules).
RecBoleAttention.__name__ = "MultiHeadAttention"


class FeedForward(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.dense_1, self.dense_2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        return self.LayerNorm(self.dense_2(torch.nn.functional.gelu(self.dense_1(x))) + x)


class TransformerLayer(nn.Module):
    def __init__(self, heads, hidden, eps):
        super().__init__()
        self.multi_head_attention = RecBoleAttention(heads, hidden, 0.0, 0.0, eps)
        self.feed_forward = FeedForward(hidden, eps)

    def forward(self, x, mask):
        return self.feed_forward(self.multi_head_attention(x, mask))


class TransformerEncoder(nn.Module):
    def __init__(self, n_layers, heads, hidden, eps):
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(heads, hidden, eps) for _ in range(n_layers))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class MiniSeqRec(nn.Module):
    """The input and encoder of RecBole's SASRec (bidirectional=False) or BERT4Rec (True)."""

    def __init__(self, bidirectional=False, n_layers=2, eps=1e-12):
        super().__init__()
        self.bidirectional = bidirectional
        self.item_embedding = nn.Embedding(ITEMS, HIDDEN, padding_idx=0)
        self.position_embedding = nn.Embedding(LEN, HIDDEN)
        self.trm_encoder = TransformerEncoder(n_layers, HEADS, HIDDEN, eps)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=eps)

    def get_attention_mask(self, item_seq):  # as RecBole's SequentialRecommender
        mask = (item_seq != 0).unsqueeze(1).unsqueeze(2)
        if not self.bidirectional:
            mask = torch.tril(mask.expand((-1, -1, item_seq.size(-1), -1)))
        return torch.where(mask, 0.0, -10000.0)

    def forward(self, item_seq):
        position_ids = torch.arange(item_seq.size(1), device=item_seq.device).unsqueeze(0).expand_as(item_seq)
        x = self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(position_ids))
        return self.trm_encoder(x, self.get_attention_mask(item_seq))


def right_padded(lengths=(6, 3, 1, 4)):
    seq = torch.randint(1, ITEMS, (len(lengths), LEN))
    return seq.masked_fill(torch.arange(LEN)[None, :] >= torch.tensor(lengths)[:, None], 0)


def trained(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module.eval()


def recbole_mask(item_seq, bidirectional):
    return MiniSeqRec(bidirectional).get_attention_mask(item_seq)


def layer_pair(encoding="none", **options):
    reference = trained(RecBoleAttention(HEADS, HIDDEN, 0.0, 0.0, 1e-12))
    layer = adapter.MultiHeadAttention(HEADS, HIDDEN, 0.0, 0.0, 1e-12, encoding=encoding, **options).eval()
    result = layer.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    return reference, trained(layer) if encoding != "none" else layer


# --- the layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_plain_layer_matches_recbole_math(bidirectional):
    reference, layer = layer_pair()
    seq = right_padded()
    mask = recbole_mask(seq, bidirectional)
    x = torch.randn(seq.shape[0], LEN, HIDDEN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out_ref, out = reference(x, mask), layer(x2, mask)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for name, p_ref in reference.named_parameters():
        grad = layer.get_parameter(name).grad
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_fully_masked_sequence_behaves_as_recbole():
    # RecBole's -10000 is finite: a sequence with no item attends uniformly, it does not give 0.
    reference, layer = layer_pair()
    seq = right_padded((6, 0))
    mask = recbole_mask(seq, False)
    x = torch.randn(2, LEN, HIDDEN)
    torch.testing.assert_close(layer(x, mask), reference(x, mask), rtol=1e-5, atol=1e-5)


def _projected(layer, x):
    b = x.shape[0]
    split = lambda t: t.view(b, LEN, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
    return split(layer.query(x)), split(layer.key(x)), split(layer.value(x))


def _finish(layer, x, context):
    context = context.transpose(1, 2).reshape(x.shape[0], LEN, HIDDEN)
    return layer.LayerNorm(layer.dense(context) + x)


@pytest.mark.parametrize("per_head", [False, True])
def test_rmha_layer_matches_fastpe_reference(per_head):
    _, layer = layer_pair("rmha-4", per_head_tables=per_head)
    seq = right_padded()
    mask = recbole_mask(seq, False)
    x = torch.randn(seq.shape[0], LEN, HIDDEN)
    q, k, v = _projected(layer, x)
    rk, rv = (t if per_head else t.unsqueeze(0) for t in (layer.relative_key, layer.relative_value))
    expected = _finish(layer, x, relative_attention_reference(q, k, v, rk, rv, attn_bias=mask))
    torch.testing.assert_close(layer(x, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learnable", ["none", "frequencies", "angles"])
def test_rope_layer_matches_fastpe_reference(learnable):
    _, layer = layer_pair("rope", base=1000.0, learnable=learnable, max_len=LEN)
    seq = right_padded()
    mask = recbole_mask(seq, True)
    x = torch.randn(seq.shape[0], LEN, HIDDEN)
    q, k, v = _projected(layer, x)
    angles = layer.angle_weight if learnable == "angles" else torch.arange(LEN)[:, None] * layer.inv_freq
    q, k = (rotary_reference(t.transpose(1, 2), angles, interleaved=False).transpose(1, 2) for t in (q, k))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + mask, dim=-1)
    torch.testing.assert_close(layer(x, mask), _finish(layer, x, probs @ v), rtol=1e-5, atol=1e-5)


def test_layer_trains_with_attention_dropout():
    layer = adapter.MultiHeadAttention(HEADS, HIDDEN, 0.1, 0.3, 1e-12, encoding="rmha-4").train()
    seq = right_padded()
    x = torch.randn(seq.shape[0], LEN, HIDDEN, requires_grad=True)
    layer(x, recbole_mask(seq, False)).sum().backward()
    assert torch.isfinite(x.grad).all() and layer.relative_value.grad.abs().sum() > 0


def test_attention_bias_checks_the_mask():
    x = torch.randn(2, LEN, HIDDEN)
    with pytest.raises(TypeError, match="additive float mask"):
        adapter.attention_bias(torch.ones(2, 1, LEN, LEN, dtype=torch.bool), 2, LEN)
    with pytest.raises(ValueError, match=r"expected RecBole's \[B=2, 1, L=6, L\]"):
        adapter.attention_bias(torch.zeros(2, LEN, LEN), 2, LEN)
    assert adapter.attention_bias(torch.zeros(2, 1, 1, LEN), 2, LEN).shape == (2, 1, LEN, LEN)
    with pytest.raises(ValueError, match="unknown positional encoding"):
        adapter.MultiHeadAttention(HEADS, HIDDEN, 0.0, 0.0, 1e-12, encoding="rmha")
    assert x.shape == (2, LEN, HIDDEN)


# --- patch() --------------------------------------------------------------------------------


def patched_pair(encoding, bidirectional=False, **options):
    torch.manual_seed(0)
    model = trained(MiniSeqRec(bidirectional))
    return model, adapter.patch(copy.deepcopy(model), encoding, **options)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_patch_learnt_keeps_the_function_and_names(bidirectional):
    model, patched = patched_pair("learnt", bidirectional)
    assert isinstance(patched.trm_encoder.layer[0].multi_head_attention, adapter.MultiHeadAttention)
    assert patched.position_embedding is not None and isinstance(patched.position_embedding, nn.Embedding)
    assert list(patched.state_dict()) == list(model.state_dict())
    seq = right_padded()
    torch.testing.assert_close(patched(seq), model(seq), rtol=1e-5, atol=1e-5)


def test_patch_none_drops_the_absolute_position():
    model, patched = patched_pair("none")
    assert isinstance(patched.position_embedding, ZeroPositionEmbedding)
    with torch.no_grad():
        model.position_embedding.weight.zero_()
    seq = right_padded()
    torch.testing.assert_close(patched(seq), model(seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoding", ["rmha-4", "rope"])
def test_patch_attention_encoding(encoding):
    model, patched = patched_pair(encoding, bidirectional=encoding == "rope")
    assert isinstance(patched.position_embedding, ZeroPositionEmbedding)
    ids = torch.arange(LEN).expand(3, LEN)
    assert torch.equal(patched.position_embedding(ids), torch.zeros(3, LEN, HIDDEN))
    old, new = model.trm_encoder.layer[1].multi_head_attention, patched.trm_encoder.layer[1].multi_head_attention
    assert new.encoding == encoding
    for name, p in old.named_parameters():  # every RecBole weight copied under its own name
        assert torch.equal(new.get_parameter(name), p)
    extra = set(patched.state_dict()) - set(model.state_dict())
    missing = set(model.state_dict()) - set(patched.state_dict())
    assert not missing  # position_embedding.weight is kept, as the all-zero table it now adds
    assert not patched.state_dict()["position_embedding.weight"].any()
    if encoding == "rmha-4":
        assert extra == {f"trm_encoder.layer.{i}.multi_head_attention.relative_{t}" for i in (0, 1) for t in ("key", "value")}
    seq = right_padded()
    out = patched(seq)
    assert out.shape == (seq.shape[0], LEN, HIDDEN) and torch.isfinite(out).all()
    assert not torch.allclose(out, model(seq))


def test_patch_abs_and_rotatory_use_fastpe_tables():
    _, patched = patched_pair("abs", scale=1.0)
    assert isinstance(patched.position_embedding, AdditivePositionEmbedding)
    ids = torch.arange(LEN).expand(2, LEN)
    torch.testing.assert_close(patched.position_embedding(ids)[0], fastpe.SinusoidalEncoding(HIDDEN, LEN).codes)
    _, patched = patched_pair("rotatory", angle_scale=2 * math.pi / 10000)
    codes = patched.position_embedding(ids)
    codes.sum().backward()
    assert patched.position_embedding.encoding.angle_weight.grad is not None


def test_patch_keeps_recbole_parameters_and_reports_new_ones():
    model = MiniSeqRec()
    host = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters())
    adapter.patch(model, "rope", learnable="frequencies")
    layer = model.trm_encoder.layer[0].multi_head_attention
    assert layer.query.weight is host["trm_encoder.layer.0.multi_head_attention.query.weight"]
    assert layer.base == 1000.0 and "rope (learnable=frequencies, base=1000)" in model.fastpe_patch.summary()
    assert model.position_embedding.weight.shape == (LEN, HIDDEN)
    with pytest.warns(NewParametersWarning, match="inv_freq"):
        model(right_padded()).sum().backward()
        optimizer.step()
    assert add_new_parameters(optimizer, model) == 2


def test_patch_errors_name_the_problem():
    with pytest.raises(ValueError, match="found no RecBole attention layer in Sequential.*MultiHeadAttention"):
        adapter.patch(nn.Sequential(nn.Linear(2, 2)), "rmha-4")
    _, patched = patched_pair("rmha-4")
    with pytest.raises(ValueError, match="already patched"):
        adapter.patch(patched, "rope")
    with pytest.raises(ValueError, match="cannot take the place of the model's position embedding"):
        adapter.patch(MiniSeqRec(), "abs+con")
    model = MiniSeqRec()
    del model.position_embedding
    with pytest.raises(ValueError, match="has no attribute 'position_embedding'"):
        adapter.patch(model, "abs")


def test_patched_model_saves_and_loads_into_a_fresh_model(tmp_path):
    _, patched = patched_pair("rmha-4", per_head_tables=True)
    fastpe.save(patched, tmp_path / "model.pt")
    fresh = fastpe.load(tmp_path / "model.pt", MiniSeqRec())
    assert fresh.trm_encoder.layer[0].multi_head_attention.per_head_tables
    seq = right_padded()
    torch.testing.assert_close(fresh.eval()(seq), patched(seq), rtol=0, atol=0)


def test_patched_model_compiles_fullgraph():
    _, patched = patched_pair("rmha-4")
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    seq = right_padded()
    torch.testing.assert_close(compiled(seq), patched(seq), rtol=1e-6, atol=1e-6)


# --- with RecBole installed -----------------------------------------------------------------


def test_real_recbole_layer_matches_adapter():
    layers = pytest.importorskip("recbole.model.layers")
    reference = trained(layers.MultiHeadAttention(HEADS, HIDDEN, 0.0, 0.0, 1e-12))
    layer = adapter.MultiHeadAttention(HEADS, HIDDEN, 0.0, 0.0, 1e-12).eval()
    layer.load_state_dict(reference.state_dict())
    for bidirectional in (False, True):
        seq = right_padded()
        mask = recbole_mask(seq, bidirectional)
        x = torch.randn(seq.shape[0], LEN, HIDDEN)
        torch.testing.assert_close(layer(x, mask), reference(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name,encoding", [("SASRec", "rmha-4"), ("BERT4Rec", "rope")])
def test_real_recbole_models_fit_and_evaluate_the_best_model_safely(model_name, encoding, tmp_path, monkeypatch):
    """RecBole's own SASRec / BERT4Rec on the example's tiny generated dataset: patch(model,
    "learnt") keeps its predictions; the patched model fits one epoch with RecBole's Trainer and
    evaluates its best checkpoint, reloaded by RecBole's own torch.load with safe (weights-only)
    loading on (about 10 s each). Runs where RecBole is installed: in CI, through
    test_recbole_flow_in_its_own_venv."""
    pytest.importorskip("recbole")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    path = Path(__file__).resolve().parents[1] / "examples" / "recbole_sasrec_rmha.py"
    spec = importlib.util.spec_from_file_location("recbole_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    result = example.run(model_name, encoding, workdir=tmp_path, check_learnt=True)
    assert loads == [None], loads  # RecBole's one load of its best model, with torch's safe default
    assert math.isfinite(result["loss"]) and result["loss"] > 0, result
    assert set(result["test"]) == {"recall@10", "ndcg@10"}, result
    assert all(0.0 <= v <= 1.0 for v in result["test"].values()), result
    saved = list((tmp_path / "saved").glob("*.pth"))
    assert len(saved) == 1
    checkpoint = real_load(saved[0], weights_only=True)
    assert checkpoint["config"]["model"] == model_name and isinstance(checkpoint["best_valid_score"], float)
    state = checkpoint["state_dict"]  # the patched model: no absolute position table, relative tables for rmha
    assert not state["position_embedding.weight"].any()
    assert any(k.endswith("relative_key") for k in state) == (encoding == "rmha-4")


def test_safe_checkpoints_refuses_what_is_not_a_trainer():
    with pytest.raises(TypeError, match="expected a RecBole Trainer, got Linear"):
        adapter.safe_checkpoints(nn.Linear(2, 2))


RECBOLE_PYTHON = os.environ.get("FASTPE_RECBOLE_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-recbole" / "bin" / "python")


@pytest.mark.skipif(
    "FASTPE_RECBOLE_PYTHON" not in os.environ and not Path(RECBOLE_PYTHON).exists(),
    reason="no RecBole venv: set FASTPE_RECBOLE_PYTHON to its python (.ci/run builds .venv-recbole from requirements-recbole.txt)",
)
def test_recbole_flow_in_its_own_venv():
    """RecBole's pins (numpy<2) cannot share the main stack's venv, so the real-RecBole tests of
    this file run there, in a subprocess: they must all pass, none skip."""
    root = Path(__file__).resolve().parents[1]
    assert Path(RECBOLE_PYTHON).exists(), f"FASTPE_RECBOLE_PYTHON={RECBOLE_PYTHON} does not exist"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    result = subprocess.run(
        [RECBOLE_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "real_recbole", str(Path(__file__))],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in summary and "skipped" not in summary, result.stdout[-4000:]
