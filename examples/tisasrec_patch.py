"""Run a TiSASRec.pytorch-style model through fastpe: same weights, same outputs, no [B, L, L, d].

No extra installs; runs in seconds on a CPU:

    python examples/tisasrec_patch.py
    python examples/tisasrec_patch.py --batch 128 --maxlen 200 --hidden 64     # the benchmark's size

The model below follows the layout of pmixer/TiSASRec.pytorch (the names ``patch`` relies on):
``time_matrix_K_emb`` / ``time_matrix_V_emb`` embed the ``[B, L, L]`` clipped interval matrix into
``[B, L, L, d]`` key and value tensors, ``abs_pos_K_emb`` / ``abs_pos_V_emb`` add position keys
and values, and ``TimeAwareMultiHeadAttention`` (``Q_w``, ``K_w``, ``V_w``) attends causally.
``fastpe.integrations.tisasrec.patch(model)`` runs the same computation through fastpe's
time-interval attention; the model can then be fed the ``[B, L]`` time sequence instead of the
``[B, L, L]`` matrix.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from fastpe.integrations.tisasrec import patch


def relation_matrix(time_seq: np.ndarray, time_span: int) -> np.ndarray:
    """TiSASRec's clipped interval matrix of one sequence: ``min(|t_i - t_j|, time_span)``."""
    return np.minimum(np.abs(time_seq[:, None] - time_seq[None, :]), time_span).astype(np.int64)


def personal_times(timestamps: np.ndarray) -> np.ndarray:
    """TiSASRec's preprocessing of one user's sorted times: ``round((t - t_first) / u) + 1`` with
    ``u`` the smallest nonzero interval (1 if none), so that padding (0) precedes every item."""
    gaps = np.diff(timestamps)
    gaps = gaps[gaps != 0]
    unit = gaps.min() if len(gaps) else 1
    return np.round((timestamps - timestamps.min()) / unit).astype(np.int64) + 1


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x):
        y = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(x.transpose(-1, -2))))))
        return y.transpose(-1, -2) + x


class TimeAwareMultiHeadAttention(nn.Module):
    """The materialised time-aware attention: per head, ``q_i . (k_j + pK_j + tK_ij)`` over
    ``[B, L, L, dh]`` interval keys, causal, padding queries filled with a large negative number."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.Q_w, self.K_w, self.V_w = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head_num, self.head_size = heads, hidden // heads

    def forward(self, queries, keys, time_mask, attn_mask, time_k, time_v, abs_pos_k, abs_pos_v):
        b, length, d = queries.shape
        h, dh = self.head_num, self.head_size

        def split(x):  # [B, L, (L,) d] -> [B, h, L, (L,) dh]
            return x.view(*x.shape[:-1], h, dh).movedim(-2, 1)

        q, k, v = split(self.Q_w(queries)), split(self.K_w(keys)), split(self.V_w(keys))
        pk, pv, tk, tv = split(abs_pos_k), split(abs_pos_v), split(time_k), split(time_v)
        scores = q @ k.transpose(-1, -2) + q @ pk.transpose(-1, -2) + (tk @ q.unsqueeze(-1)).squeeze(-1)
        scores = scores / dh ** 0.5
        masked = time_mask[:, None, :, None] | attn_mask  # padding queries (whole rows), future keys
        scores = scores.masked_fill(masked, -2.0 ** 32 + 1)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = weights @ v + weights @ pv + (weights.unsqueeze(-2) @ tv).squeeze(-2)
        return out.transpose(1, 2).reshape(b, length, d)


class TiSASRec(nn.Module):
    def __init__(self, item_num: int, maxlen: int = 50, hidden: int = 32, blocks: int = 2, heads: int = 1,
                 time_span: int = 256, dropout: float = 0.2):
        super().__init__()
        self.item_emb = nn.Embedding(item_num + 1, hidden, padding_idx=0)
        self.item_emb_dropout = nn.Dropout(dropout)
        self.abs_pos_K_emb, self.abs_pos_V_emb = nn.Embedding(maxlen, hidden), nn.Embedding(maxlen, hidden)
        self.time_matrix_K_emb = nn.Embedding(time_span + 1, hidden)
        self.time_matrix_V_emb = nn.Embedding(time_span + 1, hidden)
        self.abs_pos_K_emb_dropout, self.abs_pos_V_emb_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.time_matrix_K_dropout, self.time_matrix_V_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.attention_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.attention_layers = nn.ModuleList(TimeAwareMultiHeadAttention(hidden, heads, dropout) for _ in range(blocks))
        self.forward_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.forward_layers = nn.ModuleList(PointWiseFeedForward(hidden, dropout) for _ in range(blocks))
        self.last_layernorm = nn.LayerNorm(hidden, eps=1e-8)

    def seq2feats(self, user_ids, log_seqs, time_matrices):
        device = self.item_emb.weight.device
        log_seqs = torch.as_tensor(log_seqs, device=device)
        seqs = self.item_emb_dropout(self.item_emb(log_seqs) * self.item_emb.embedding_dim ** 0.5)
        positions = torch.arange(log_seqs.shape[1], device=device).expand_as(log_seqs)
        abs_pos_k = self.abs_pos_K_emb_dropout(self.abs_pos_K_emb(positions))
        abs_pos_v = self.abs_pos_V_emb_dropout(self.abs_pos_V_emb(positions))
        time_matrices = torch.as_tensor(time_matrices, device=device)
        time_k = self.time_matrix_K_dropout(self.time_matrix_K_emb(time_matrices))  # [B, L, L, d]
        time_v = self.time_matrix_V_dropout(self.time_matrix_V_emb(time_matrices))
        timeline_mask = log_seqs == 0
        seqs = seqs * ~timeline_mask.unsqueeze(-1)
        length = seqs.shape[1]
        causal = ~torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
        for i in range(len(self.attention_layers)):
            q = self.attention_layernorms[i](seqs)
            seqs = q + self.attention_layers[i](q, seqs, timeline_mask, causal, time_k, time_v, abs_pos_k, abs_pos_v)
            seqs = self.forward_layers[i](self.forward_layernorms[i](seqs))
            seqs = seqs * ~timeline_mask.unsqueeze(-1)
        return self.last_layernorm(seqs)

    def forward(self, user_ids, log_seqs, time_matrices, pos_seqs, neg_seqs):
        feats = self.seq2feats(user_ids, log_seqs, time_matrices)
        device = feats.device
        pos = self.item_emb(torch.as_tensor(pos_seqs, device=device))
        neg = self.item_emb(torch.as_tensor(neg_seqs, device=device))
        return (feats * pos).sum(-1), (feats * neg).sum(-1)

    def predict(self, user_ids, log_seqs, time_matrices, item_indices):
        feats = self.seq2feats(user_ids, log_seqs, time_matrices)[:, -1]
        items = self.item_emb(torch.as_tensor(item_indices, device=feats.device))
        return (items @ feats.unsqueeze(-1)).squeeze(-1)


def sample_batch(rng: np.random.Generator, batch: int, maxlen: int, items: int, time_span: int):
    """Left-padded sequences, their TiSASRec time sequences (0 at padding) and interval matrices."""
    seqs = np.zeros((batch, maxlen), dtype=np.int64)
    time_seq = np.zeros((batch, maxlen), dtype=np.int64)
    for row in range(batch):
        n = int(rng.integers(2, maxlen + 1))
        stamps = np.sort(1.6e9 + rng.exponential(86400.0, size=n).cumsum().round())
        seqs[row, maxlen - n:] = rng.integers(1, items + 1, size=n)
        time_seq[row, maxlen - n:] = personal_times(stamps)
    matrices = np.stack([relation_matrix(t, time_span) for t in time_seq])
    return seqs, time_seq, matrices


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = TiSASRec(args.items, args.maxlen, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    for _ in range(args.steps):  # a few steps of the original code, so the weights are trained
        seqs, _, matrices = sample_batch(rng, args.batch, args.maxlen, args.items, 256)
        pos = np.roll(seqs, -1, axis=1)
        neg = rng.integers(1, args.items + 1, size=seqs.shape)
        pos_logits, neg_logits = model(None, seqs, matrices, pos, neg)
        keep = torch.as_tensor(pos != 0)
        loss = (nn.functional.softplus(-pos_logits) + nn.functional.softplus(neg_logits))[keep].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    patched = patch(copy.deepcopy(model))
    seqs, time_seq, matrices = sample_batch(rng, args.batch, args.maxlen, args.items, 256)
    candidates = rng.integers(1, args.items + 1, size=(args.batch, 101))
    with torch.no_grad():
        start = time.perf_counter()
        original = model.predict(None, seqs, matrices, candidates)
        t_original = time.perf_counter() - start
        start = time.perf_counter()
        from_matrix = patched.predict(None, seqs, matrices, candidates)
        from_times = patched.predict(None, seqs, time_seq, candidates)
        t_patched = (time.perf_counter() - start) / 2
    print(f"trained {args.steps} steps; scores of {args.batch} users x 101 candidates:")
    print(f"  original vs patched (interval matrix): max |diff| = {(original - from_matrix).abs().max():.2e}")
    print(f"  original vs patched (time sequence):   max |diff| = {(original - from_times).abs().max():.2e}")
    print(f"  predict: original {1e3 * t_original:.1f} ms, patched {1e3 * t_patched:.1f} ms")


if __name__ == "__main__":
    main()
