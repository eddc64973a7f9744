"""Do the patched additive encodings enter SASRec.pytorch at a fair scale? A short study.

SASRec.pytorch (python/main.py) initialises its learnt position table with xavier_normal_
(root-mean-square about 0.09 at maxlen 200, d 50) and multiplies the item embeddings by sqrt(d)
(about 0.24). fastpe's sinusoidal and rotatory codes have root-mean-square 1/sqrt(2) = 0.71, about
3x the item signal: at ``scale=1`` they drown it at the start of training. ``patch`` matches the
scale of the table it replaces by default (``scale="match"``). This study trains the example's
faithful copy of SASRec.pytorch's model with main.py's settings (d 50, maxlen 200, 2 blocks,
1 head, dropout 0.2, Adam lr 1e-3 betas (0.9, 0.98), batch 128, one negative per position) on
ml-100k, evaluates as SASRec.pytorch does (the target against 100 sampled items the user never
touched; HR@10, NDCG@10), and reports test metrics at the epoch of best validation NDCG@10:

    python examples/sasrec_pytorch_scale_study.py --epochs 20 --seeds 0 1 2 --out results/sasrec_pytorch_scale_study.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sasrec_pytorch_swap import SASRec, initialise  # noqa: E402

from fastpe.data.registry import load_dataset  # noqa: E402
from fastpe.integrations.sasrec import patch  # noqa: E402

# (label, encoding, patch options): the model's own table, no position, and each additive encoding
# at fastpe's unit scale and at the matched scale (patch's default).
CONFIGS = [
    ("learnt (SASRec's own)", "learnt", {}),
    ("none", "none", {}),
    ("abs, scale=1", "abs", {"scale": 1.0}),
    ("abs, scale=match", "abs", {}),
    ("rotatory, scale=1", "rotatory", {"scale": 1.0}),
    ("rotatory, scale=match", "rotatory", {}),
]


def left_pad(items: np.ndarray, maxlen: int) -> np.ndarray:
    out = np.zeros(maxlen, dtype=np.int64)
    items = items[-maxlen:]
    if len(items):
        out[-len(items):] = items
    return out


def train_batch(sequences, users, n_items, maxlen, rng):
    """SASRec.pytorch's sampler: the training sequence's inputs, next items and one negative per position."""
    seq, pos, neg = (np.zeros((len(users), maxlen), dtype=np.int64) for _ in range(3))
    for row, u in enumerate(users):
        train = sequences[u][:-2]
        seq[row] = left_pad(train[:-1], maxlen)
        pos[row] = left_pad(train[1:], maxlen)
        seen = set(sequences[u].tolist())
        negatives = rng.integers(1, n_items + 1, size=maxlen)
        for t in range(maxlen):
            while negatives[t] in seen:
                negatives[t] = rng.integers(1, n_items + 1)
        neg[row] = np.where(pos[row] != 0, negatives, 0)
    return torch.from_numpy(seq), torch.from_numpy(pos), torch.from_numpy(neg)


def eval_data(sequences, users, n_items, maxlen, stage, seed=123):
    """Inputs and 101 candidates (target first, then 100 items the user never touched)."""
    rng = np.random.default_rng(seed)
    seqs, cands = [], []
    for u in users:
        s = sequences[u]
        history, target = (s[:-2], s[-2]) if stage == "valid" else (s[:-1], s[-1])
        seen = set(s.tolist())
        negatives = []
        while len(negatives) < 100:
            item = int(rng.integers(1, n_items + 1))
            if item not in seen:
                negatives.append(item)
        seqs.append(left_pad(history, maxlen))
        cands.append([target, *negatives])
    return torch.from_numpy(np.stack(seqs)), torch.tensor(cands)


@torch.no_grad()
def evaluate(model, seqs, cands):
    model.eval()
    scores = torch.cat([model.predict(seqs[i:i + 256], cands[i:i + 256]) for i in range(0, len(seqs), 256)])
    rank = (scores[:, 1:] >= scores[:, :1]).sum(-1)  # ties count against the target
    hit = rank < 10
    return {"HR@10": hit.float().mean().item(),
            "NDCG@10": torch.where(hit, 1.0 / torch.log2(rank.float() + 2), 0.0).mean().item()}


def run(data, encoding, options, seed, epochs, args):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(data.n_items, hidden_units=args.hidden, maxlen=args.maxlen, num_blocks=2, num_heads=1,
                   dropout_rate=0.2)
    initialise(model)
    table_rms = model.pos_emb.weight[1:].square().mean().sqrt().item()
    item_rms = (model.item_emb.weight[1:] * args.hidden ** 0.5).square().mean().sqrt().item()
    patch(model, encoding, need_weights=False, **options)
    codes = model.pos_emb.weight[1:] if encoding != "none" else torch.zeros(1)
    codes_rms = codes.detach().square().mean().sqrt().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    bce = torch.nn.BCEWithLogitsLoss()
    users = np.flatnonzero([len(s) >= 3 for s in data.sequences])
    valid, test = (eval_data(data.sequences, users, data.n_items, args.maxlen, stage) for stage in ("valid", "test"))
    best = {"valid": {"NDCG@10": -1.0}}
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(users)
        for start in range(0, len(order), args.batch):
            seq, pos, neg = train_batch(data.sequences, order[start:start + args.batch], data.n_items, args.maxlen, rng)
            pos_logits, neg_logits = model(seq, pos, neg)
            keep = pos != 0
            loss = bce(pos_logits[keep], torch.ones_like(pos_logits[keep])) + bce(neg_logits[keep], torch.zeros_like(neg_logits[keep]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % args.eval_every == 0 or epoch == epochs:
            v = evaluate(model, *valid)
            if v["NDCG@10"] > best["valid"]["NDCG@10"]:
                best = {"epoch": epoch, "valid": v, "test": evaluate(model, *test)}
    return {"encoding": encoding, "options": options, "seed": seed, "table_rms": table_rms, "item_rms": item_rms,
            "codes_rms": codes_rms, **best}


def report(runs, args, data, minutes) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"# SASRec.pytorch with patched position encodings: scale study ({data.describe()})", "",
        f"Command (one thread, this project's shared 2-core CPU, {minutes:.0f} minutes):", "",
        f"    python examples/sasrec_pytorch_scale_study.py --epochs {args.epochs} --eval-every {args.eval_every} "
        f"--maxlen {args.maxlen} --seeds {' '.join(map(str, seeds))} --threads {args.threads}"
        + (f" --encodings {' '.join(args.encodings)}" if args.encodings else "") + f" --out {args.out}", "",
        f"Model: the example's copy of SASRec.pytorch's model.py, initialised as its main.py does, d {args.hidden}, "
        f"maxlen {args.maxlen}, 2 blocks, 1 head, dropout 0.2; Adam lr 1e-3 betas (0.9, 0.98), batch {args.batch}, "
        f"one negative per position, {args.epochs} epochs. Evaluation as SASRec.pytorch's: the target against 100 "
        f"sampled items the user never touched; test metrics at the epoch of best validation NDCG@10 "
        f"(validated every {args.eval_every} epochs). Every encoding is patched in with need_weights=False.", "",
        "| encoding | codes rms at start | test NDCG@10 (mean ± std) | test HR@10 (mean ± std) | best epochs |",
        "|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        ndcg = np.array([r["test"]["NDCG@10"] for r in group])
        hr = np.array([r["test"]["HR@10"] for r in group])
        spread = (lambda a: a.std(ddof=1) if len(a) > 1 else 0.0)  # noqa: E731
        lines.append(f"| {label} | {np.mean([r['codes_rms'] for r in group]):.3f} | {ndcg.mean():.4f} ± {spread(ndcg):.4f} "
                     f"| {hr.mean():.4f} ± {spread(hr):.4f} | {', '.join(str(r['epoch']) for r in group)} |")
    lines += ["", f"Item signal at start (item embedding x sqrt(d)): rms {np.mean([r['item_rms'] for r in runs]):.3f}; "
              f"the model's own position table: rms {np.mean([r['table_rms'] for r in runs]):.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--maxlen", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encodings", nargs="+", default=None, help="only these of learnt, none, abs, rotatory")
    parser.add_argument("--out", default=None, help="markdown file for the table (a .json beside it holds every run)")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if args.encodings is None or c[1] in args.encodings]
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    started = time.perf_counter()
    runs = []
    # Seed by seed, every configuration, the table rewritten after each seed: a study cut short
    # still compares every encoding over the same seeds.
    for seed in args.seeds:
        for label, encoding, options in configs:
            result = run(data, encoding, options, seed, args.epochs, args)
            result["label"] = label
            runs.append(result)
            print(f"{label:24s} seed {seed}: codes rms {result['codes_rms']:.3f} (table {result['table_rms']:.3f}, "
                  f"items {result['item_rms']:.3f}); best epoch {result['epoch']}, test NDCG@10 "
                  f"{result['test']['NDCG@10']:.4f} HR@10 {result['test']['HR@10']:.4f}", flush=True)
        text = report(runs, args, data, (time.perf_counter() - started) / 60)
        if args.out:
            Path(args.out).write_text(text)
            Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    print(text)
    assert all(math.isfinite(r["test"]["NDCG@10"]) for r in runs)


if __name__ == "__main__":
    main()
