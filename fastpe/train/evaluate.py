"""Evaluation on the leave-one-out split: sampled candidates and full ranking.

* Sampled: the positive and ``n`` negatives drawn once per stage (fixed ``eval_seed``, so every
  run and encoding sees the same candidates), uniformly from the items the user never interacted
  with, in a random order per user; ties count against the positive (see ``metrics``).
* Full: every item competes except the padding id and, with ``exclude_history`` (the default),
  the items of the user's history before the target; the target itself always competes, even
  when it also occurs in the history (repeat consumption).

Profiles hold at most ``max_len`` most recent items; candidates get the context (time features)
of the target interaction, never a positional code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from fastpe.data.split import EvalSet, Split, eval_set, sample_eval_negatives
from fastpe.train import distributed
from fastpe.train.metrics import full_ranks, sampled_ranks, summarize


@dataclass
class StageData:
    """One stage ("valid" or "test") ready for repeated evaluation."""

    stage: str
    data: EvalSet
    candidates: np.ndarray  # [U, 1 + n]
    positive: np.ndarray  # [U]


def prepare_stage(split: Split, stage: str, max_len: int, n_negatives: int, seed: int,
                  max_users: int = 0) -> StageData:
    rng = np.random.default_rng([seed, 0 if stage == "valid" else 1])
    users = split.eval_users
    if max_users and len(users) > max_users:
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    data = eval_set(split, stage, max_len, users)
    candidates, positive = sample_eval_negatives(data, split.n_items, n_negatives, rng)
    return StageData(stage, data, candidates, positive)


def _tensor(a, device, dtype=None):
    return None if a is None else torch.as_tensor(a, device=device, dtype=dtype)


class ModelScorer:
    """Scores candidates with a model: ``(rows, candidates [b, N]) -> [b, N]`` (float32)."""

    def __init__(self, model, stage: StageData, device, amp_dtype=None, item_chunk: int = 4096):
        self.model, self.stage, self.device = model, stage, device
        self.amp_dtype = amp_dtype
        self.item_chunk = item_chunk
        self.eval_table_threshold = 128
        self.table = None  # computed on first use; the model does not change during one evaluation

    def __call__(self, rows: np.ndarray, candidates: torch.Tensor) -> torch.Tensor:
        d = self.stage.data
        items = _tensor(d.items[rows], self.device)
        ctx = _tensor(None if d.context is None else d.context[rows], self.device)
        tctx = _tensor(None if d.target_context is None else d.target_context[rows][:, None, :], self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            times = {}
            if getattr(self.model, "needs_timestamps", False):
                times["timestamps"] = _tensor(d.times[rows], self.device)
            profile, padding = self.model.encode(items, ctx, **times)
            # Many candidates per user (full ranking): gather per-item terms computed once.
            table = None
            if candidates.shape[1] > self.eval_table_threshold:
                if self.table is None:
                    self.table = self.model.candidate_table()
                table = self.table
            out = []
            for start in range(0, candidates.shape[1], self.item_chunk):
                chunk = candidates[:, None, start:start + self.item_chunk]
                out.append(self.model.score(profile, padding, chunk, tctx, item_table=table).float()[:, 0])
        return torch.cat(out, dim=1)


class PopularityScorer:
    """The popularity baseline: an item's score is its number of training interactions."""

    def __init__(self, split: Split, device):
        counts = np.bincount(np.concatenate([split.train_sequence(u) for u in range(split.data.n_users)] + [np.zeros(0, np.int64)]),
                             minlength=split.n_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.counts = torch.as_tensor(counts, device=device)

    def __call__(self, rows, candidates):
        return self.counts[candidates]


@torch.no_grad()
def evaluate(scorer, stage: StageData, n_items: int, cutoffs=(10,), sampled: bool = True, full: bool = False,
             exclude_history: bool = True, batch_size: int = 256, device="cpu",
             sharded: bool = False, progress: str | None = None) -> dict[str, float]:
    """Metrics ``{"sampled_hit@10": ..., "full_ndcg@10": ...}`` of a scorer on one stage.

    ``sharded``: under data-parallel training every process calls this with the same model and
    scores a contiguous block of whole batches (the batches one process would score, so the same
    numbers); the per-user ranks are gathered in order and every process gets the same metrics.
    ``progress``: show a progress bar with this title.
    """
    device = torch.device(device)
    model = getattr(scorer, "model", None)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    n_users = len(stage.data.targets)
    starts = range(0, n_users, batch_size)
    counts = [n_users]
    if sharded and distributed.world_size() > 1:
        world, n = distributed.world_size(), len(starts)
        bounds = [min(n * r // world * batch_size, n_users) for r in range(world + 1)]
        counts = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        rank = distributed.rank()
        starts = range(bounds[rank], bounds[rank + 1], batch_size)
    sampled_out, full_out = [], []
    all_items = torch.arange(1, n_items + 1, device=device)
    try:
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False, dynamic_ncols=True):
            rows = np.arange(start, min(start + batch_size, n_users))
            if sampled:
                cands = torch.as_tensor(stage.candidates[rows], device=device)
                scores = scorer(rows, cands)
                sampled_out.append(sampled_ranks(scores, torch.as_tensor(stage.positive[rows], device=device), cands != 0))
            if full:
                scores = scorer(rows, all_items.expand(len(rows), n_items))
                scores = torch.cat([torch.full((len(rows), 1), float("-inf"), device=device), scores], dim=1)
                excluded = None
                if exclude_history:
                    excluded = torch.zeros(len(rows), n_items + 1, dtype=torch.bool, device=device)
                    for i, r in enumerate(rows):
                        excluded[i, torch.as_tensor(stage.data.history[r], device=device)] = True
                targets = torch.as_tensor(stage.data.targets[rows], device=device)
                full_out.append(full_ranks(scores, targets, excluded))
    finally:
        if model is not None:
            model.train(was_training)

    def ranks(parts):
        local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
        return distributed.gather_rows(local, counts) if len(counts) > 1 else local

    metrics = {}
    if sampled:
        metrics.update(summarize(ranks(sampled_out), cutoffs, "sampled_"))
    if full:
        metrics.update(summarize(ranks(full_out), cutoffs, "full_"))
    return metrics
