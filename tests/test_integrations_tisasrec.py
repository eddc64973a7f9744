"""The TiSASRec.pytorch adapter: the patched model against the original materialised math of the
example's TiSASRec-layout model, outputs and gradients, from the interval matrix and from the
time sequence; the example script itself."""

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastpe.integrations import tisasrec as adapter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tisasrec_patch.py"
ITEMS, MAXLEN, SPAN = 40, 13, 20


def _example():
    spec = importlib.util.spec_from_file_location("tisasrec_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _example()


def models(heads=2, hidden=12, dropout=0.2, seed=0):
    torch.manual_seed(seed)
    model = example.TiSASRec(ITEMS, MAXLEN, hidden, blocks=2, heads=heads, time_span=SPAN, dropout=dropout).double()
    with torch.no_grad():  # trained-looking weights, the padding row included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), adapter.patch(copy.deepcopy(model).eval())


def batch(seed=0, b=5):
    rng = np.random.default_rng(seed)
    seqs, time_seq, matrices = example.sample_batch(rng, b, MAXLEN, ITEMS, SPAN)
    seqs[0] = 0  # a user with no history at all
    time_seq[0] = 0
    matrices[0] = 0
    return seqs, time_seq, matrices, rng.integers(1, ITEMS + 1, size=(b, 7))


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_patched_model_gives_the_original_outputs(heads):
    original, patched = models(heads=heads, hidden=12)
    seqs, time_seq, matrices, candidates = batch(seed=heads)
    assert matrices.max() == SPAN  # some intervals are clipped
    want = original.seq2feats(None, seqs, matrices)
    for times in (matrices, time_seq, torch.as_tensor(time_seq)):
        got = patched.seq2feats(None, seqs, times)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(patched.predict(None, seqs, time_seq, candidates),
                               original.predict(None, seqs, matrices, candidates), rtol=1e-10, atol=1e-10)


def test_patched_model_gives_the_original_gradients():
    original, patched = models(dropout=0.0)
    original.train(), patched.train()  # no dropout: training mode computes the same function
    seqs, time_seq, matrices, _ = batch(seed=7)
    pos, neg = np.roll(seqs, -1, axis=1), np.roll(seqs, 3, axis=1)
    grads = []
    for model, times in ((original, matrices), (patched, time_seq)):
        model.zero_grad()
        pos_logits, neg_logits = model(None, seqs, times, pos, neg)
        (pos_logits.square().sum() + neg_logits.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        if g is None:  # e.g. the position rows never used
            continue
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_training_mode_with_dropout_runs_and_is_finite():
    _, patched = models()
    patched.train()
    seqs, time_seq, _, _ = batch(seed=3)
    pos_logits, neg_logits = patched(None, seqs, time_seq, np.roll(seqs, -1, 1), seqs)
    (pos_logits.sum() - neg_logits.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)
    assert patched.time_matrix_K_emb.weight.grad.abs().sum() > 0


def test_patch_checks_the_layout_and_unpatch_restores():
    original, patched = models()
    seqs, time_seq, matrices, _ = batch()
    with pytest.raises(ValueError, match="already patched"):
        adapter.patch(patched)
    with pytest.raises(ValueError, match="not laid out like TiSASRec.pytorch: no item_emb"):
        adapter.patch(nn.Linear(2, 2))
    broken = copy.deepcopy(original)
    del broken.attention_layers[0].Q_w
    with pytest.raises(ValueError, match=r"attention_layers\[0\] \(TimeAwareMultiHeadAttention\) has no Q_w"):
        adapter.patch(broken)
    with pytest.raises(ValueError, match="time_matrices: expected"):
        patched.seq2feats(None, seqs, matrices[:, :3])
    with pytest.raises(ValueError, match=r"buckets: ids must lie in \[0, 20\]"):
        patched.seq2feats(None, seqs, matrices + 1)
    adapter.unpatch(patched)
    torch.testing.assert_close(patched.seq2feats(None, seqs, matrices), original.seq2feats(None, seqs, matrices))
    # The weights were never touched: the same state dict before and after.
    assert all(torch.equal(a, b) for a, b in zip(patched.state_dict().values(), original.state_dict().values()))


def test_example_script_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3", "--batch", "8", "--maxlen", "20"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    diffs = [float(x) for x in re.findall(r"max \|diff\| = (\S+)", result.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, result.stdout
