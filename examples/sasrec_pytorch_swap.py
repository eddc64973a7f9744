"""Swap fastpe's RMHA-4 into SASRec.pytorch's model, train it briefly, save and reload it.

No extra installs; runs in seconds on a CPU:

    python examples/sasrec_pytorch_swap.py                 # rmha-4
    python examples/sasrec_pytorch_swap.py --encoding rope --steps 100

``SASRec`` below is python/model.py of pmixer/SASRec.pytorch (commit fde8a9c) with its arguments
unpacked and torch tensors in place of numpy arrays: ``torch.nn.MultiheadAttention`` on
sequence-first tensors with a bool causal mask, left-padded sequences, a learnt ``pos_emb`` of
``maxlen + 1`` rows (position ids 1..L, 0 = padding) added to the scaled item embeddings.
``main`` follows python/main.py step by step and shows where the one fastpe line goes: after the
model's own initialisation (so ``patch`` matches the scale of the initialised position table and
the init loop does not overwrite fastpe's tables) and before the optimizer is built (so the
optimizer holds the parameters ``patch`` adds) and before a saved state dict is loaded (so a
patched checkpoint fits).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fastpe
from fastpe.integrations.sasrec import patch


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden_units: int, dropout_rate: float):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(hidden_units, hidden_units, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout_rate)

    def forward(self, inputs):
        outputs = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(inputs.transpose(-1, -2))))))
        return outputs.transpose(-1, -2)


class SASRec(nn.Module):
    def __init__(self, item_num: int, hidden_units: int = 32, maxlen: int = 20, num_blocks: int = 2,
                 num_heads: int = 2, dropout_rate: float = 0.1, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.item_emb = nn.Embedding(item_num + 1, hidden_units, padding_idx=0)
        self.pos_emb = nn.Embedding(maxlen + 1, hidden_units, padding_idx=0)
        self.emb_dropout = nn.Dropout(dropout_rate)
        self.attention_layernorms = nn.ModuleList()
        self.attention_layers = nn.ModuleList()
        self.forward_layernorms = nn.ModuleList()
        self.forward_layers = nn.ModuleList()
        self.last_layernorm = nn.LayerNorm(hidden_units, eps=1e-8)
        for _ in range(num_blocks):
            self.attention_layernorms.append(nn.LayerNorm(hidden_units, eps=1e-8))
            self.attention_layers.append(nn.MultiheadAttention(hidden_units, num_heads, dropout_rate))
            self.forward_layernorms.append(nn.LayerNorm(hidden_units, eps=1e-8))
            self.forward_layers.append(PointWiseFeedForward(hidden_units, dropout_rate))

    def log2feats(self, log_seqs: torch.Tensor) -> torch.Tensor:
        seqs = self.item_emb(log_seqs) * self.item_emb.embedding_dim ** 0.5
        poss = torch.arange(1, log_seqs.shape[1] + 1, device=log_seqs.device).expand_as(log_seqs)
        poss = poss * (log_seqs != 0)
        seqs = self.emb_dropout(seqs + self.pos_emb(poss))
        tl = seqs.shape[1]
        attention_mask = ~torch.tril(torch.ones((tl, tl), dtype=torch.bool, device=seqs.device))
        for i in range(len(self.attention_layers)):
            seqs = torch.transpose(seqs, 0, 1)
            if self.norm_first:
                x = self.attention_layernorms[i](seqs)
                mha_outputs, _ = self.attention_layers[i](x, x, x, attn_mask=attention_mask)
                seqs = torch.transpose(seqs + mha_outputs, 0, 1)
                seqs = seqs + self.forward_layers[i](self.forward_layernorms[i](seqs))
            else:
                mha_outputs, _ = self.attention_layers[i](seqs, seqs, seqs, attn_mask=attention_mask)
                seqs = torch.transpose(self.attention_layernorms[i](seqs + mha_outputs), 0, 1)
                seqs = self.forward_layernorms[i](seqs + self.forward_layers[i](seqs))
        return self.last_layernorm(seqs)

    def forward(self, log_seqs, pos_seqs, neg_seqs):
        feats = self.log2feats(log_seqs)
        return (feats * self.item_emb(pos_seqs)).sum(-1), (feats * self.item_emb(neg_seqs)).sum(-1)

    def predict(self, log_seqs, item_indices):
        final = self.log2feats(log_seqs)[:, -1, :]
        return self.item_emb(item_indices).matmul(final.unsqueeze(-1)).squeeze(-1)


def initialise(model: SASRec) -> None:
    """python/main.py's initialisation: xavier_normal_ on every parameter it applies to, then row 0
    (padding) of both tables zeroed."""
    for _, param in model.named_parameters():
        try:
            torch.nn.init.xavier_normal_(param.data)
        except ValueError:
            pass  # 1-d parameters (biases, LayerNorm)
    model.pos_emb.weight.data[0, :] = 0
    model.item_emb.weight.data[0, :] = 0


def synthetic_sequences(users: int, items: int, maxlen: int, seed: int = 0) -> torch.Tensor:
    """Left-padded ``[users, maxlen + 1]`` item ids where each next item is a few steps on from the last."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.zeros(users, maxlen + 1, dtype=torch.long)
    for u in range(users):
        length = int(torch.randint(4, maxlen + 2, (1,), generator=gen))
        item = int(torch.randint(1, items + 1, (1,), generator=gen))
        for t in range(maxlen + 1 - length, maxlen + 1):
            seqs[u, t] = item
            item = (item + int(torch.randint(1, 3, (1,), generator=gen)) - 1) % items + 1
    return seqs


def train(model: SASRec, seqs: torch.Tensor, items: int, steps: int, batch: int = 64,
          optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """SASRec's objective: binary cross-entropy of the next item against one sampled negative."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        rows = seqs[torch.randint(0, seqs.shape[0], (batch,), generator=gen)]
        log_seqs, pos = rows[:, :-1], rows[:, 1:]
        neg = torch.randint(1, items + 1, pos.shape, generator=gen)
        pos_logits, neg_logits = model(log_seqs, pos, neg)
        valid = pos != 0
        bce = nn.functional.binary_cross_entropy_with_logits
        pos_logits, neg_logits = pos_logits[valid], neg_logits[valid]
        loss = bce(pos_logits, torch.ones_like(pos_logits)) + bce(neg_logits, torch.zeros_like(neg_logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def hit_rate(model: SASRec, seqs: torch.Tensor, items: int, k: int = 10) -> float:
    """HR@k of the last item of each sequence against all items (the history is the rest)."""
    model.eval()
    scores = model.predict(seqs[:, :-1], torch.arange(1, items + 1).expand(seqs.shape[0], items))
    top = scores.topk(k, dim=-1).indices + 1
    return (top == seqs[:, -1:]).any(-1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoding", default="rmha-4", help="rmha-<k>, rope, none, abs, learnt or rotatory")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    items, maxlen = 50, 20
    seqs = synthetic_sequences(300, items, maxlen)

    # As python/main.py: build, initialise, patch, (load a state dict), then the optimizer.
    model = SASRec(items, maxlen=maxlen)
    initialise(model)

    # 'learnt' keeps the model's own pos_emb: the swapped model computes exactly what it did.
    same = patch(copy.deepcopy(model), "learnt").eval()
    torch.testing.assert_close(same.predict(seqs[:8, :-1], seqs[:8, -1:]), model.eval().predict(seqs[:8, :-1], seqs[:8, -1:]))

    patch(model, args.encoding, need_weights=False)  # <- the fastpe line, fused path (weights never read)
    print(model.fastpe_patch.summary())
    # (main.py: model.load_state_dict(torch.load(args.state_dict_path)) goes here, after patch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    start = time.perf_counter()
    losses = train(model, seqs, items, args.steps, optimizer=optimizer)
    print(f"{args.encoding}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps "
          f"({time.perf_counter() - start:.1f} s), HR@10 {hit_rate(model, seqs, items):.3f}")

    # Save with the encoding configuration; load into a freshly built (unpatched) model.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sasrec.pt"
        fastpe.save(model, path)
        fresh = fastpe.load(path, SASRec(items, maxlen=maxlen)).eval()
    torch.testing.assert_close(fresh.predict(seqs[:8, :-1], seqs[:8, -1:]), model.eval().predict(seqs[:8, :-1], seqs[:8, -1:]))
    print(f"reloaded: {type(fresh.attention_layers[0]).__name__}, pos_emb {type(fresh.pos_emb).__name__}, same predictions")


if __name__ == "__main__":
    main()
