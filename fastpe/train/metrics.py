"""Ranking metrics with pessimistic ties.

The rank of the positive is the number of competing candidates whose score is greater than **or
equal to** its score (0 = ranked first). A negative that ties the positive is counted above it,
so a model that gives every candidate the same score gets the worst rank, never the best.

``Hit@k = [rank < k]``, ``NDCG@k = [rank < k] / log2(rank + 2)`` (one relevant item).
"""

from __future__ import annotations

import math

import torch


def _check_scores(scores: torch.Tensor) -> None:
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: the model produced an invalid score")


def sampled_ranks(scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks ``[U]`` of the positive among sampled candidates.

    scores: ``[U, C]``; positive: ``[U]`` column of the positive; valid: optional ``[U, C]`` bool,
    False for padding columns (fewer negatives than asked), which never compete.
    """
    _check_scores(scores)
    pos_score = scores.gather(1, positive[:, None])
    beats = scores >= pos_score
    beats.scatter_(1, positive[:, None], False)
    if valid is not None:
        beats &= valid
    return beats.sum(dim=1)


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks ``[U]`` of ``targets`` among all items; scores ``[U, n_items + 1]`` (column 0 is the
    padding id and never competes); ``excluded`` ``[U, n_items + 1]`` bool marks items that do not
    compete (e.g. the user's history). The target itself always competes."""
    _check_scores(scores)
    target_score = scores.gather(1, targets[:, None])
    beats = scores >= target_score
    beats[:, 0] = False
    beats.scatter_(1, targets[:, None], False)
    if excluded is not None:
        beats &= ~excluded
    return beats.sum(dim=1)


def hit_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return (ranks < k).double()


def ndcg_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.double() + 2.0), torch.zeros((), dtype=torch.float64))


def summarize(ranks: torch.Tensor, cutoffs=(10,), prefix: str = "") -> dict[str, float]:
    """Mean Hit@k and NDCG@k for each cutoff, plus the mean reciprocal rank."""
    out = {}
    if len(ranks) == 0:
        return {f"{prefix}{m}@{k}": math.nan for k in cutoffs for m in ("hit", "ndcg")}
    ranks = ranks.cpu()
    for k in cutoffs:
        out[f"{prefix}hit@{k}"] = float(hit_at(ranks, k).mean())
        out[f"{prefix}ndcg@{k}"] = float(ndcg_at(ranks, k).mean())
    out[f"{prefix}mrr"] = float((1.0 / (ranks.double() + 1.0)).mean())
    return out
