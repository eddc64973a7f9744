"""Synthetic datasets on which order matters: the built-in default of ``fastpe train/study``.

``task="lag"`` (the generator's default): every item ``i`` has a fixed successor ``succ[i]`` (a random permutation without fixed points).
Each user's sequence starts with ``lag`` random items; afterwards the next item is, with
probability ``rule_prob``, the successor of the item ``lag`` steps back, otherwise a uniformly
random item. With ``lag = 2`` the next item depends on the second most recent item, not on the
most recent one: a model that sees the history as a set (CARCA without a positional encoding is
permutation invariant) cannot tell which history item rules the next step, while a model that
knows positions can.

``task="walk"`` (the default study's data): the items lie on one random cycle and every user
walks along it, forwards or backwards (half the users each); each step continues the walk with
probability ``rule_prob``, otherwise the user takes a random "distractor" item and the walk goes on
from where it was. The next item is the walk's continuation next to the last walk item. Reversing
the walk gives the same set of items, so a model that sees the history as a set cannot know the
direction: of the two items beyond the ends of the walked arc it can only guess, while a model that
sees order picks the right one. :func:`walk_ceilings` computes what the two can reach at best. The
interactions of a user share one timestamp, so the time features carry no order either.

Items carry a category (one-hot attributes) and interactions carry timestamps, so the attribute
and context paths of CARCA are exercised. In the lag task both are random (uninformative); in the
walk task the category is the item's arc of the cycle (neighbours share it, which speeds up
learning the cycle without telling its direction) and a user's timestamps are all equal.
"""

from __future__ import annotations

import numpy as np

from fastpe.data.readers import InteractionData


TASKS = ("lag", "walk")


def synthetic_dataset(n_users: int = 400, n_items: int = 200, min_len: int = 12, max_len: int = 30, lag: int = 2,
                      rule_prob: float = 0.7, n_categories: int = 8, seed: int = 0, task: str = "lag") -> InteractionData:
    return _generate(n_users, n_items, min_len, max_len, lag, rule_prob, n_categories, seed, task)[0]


def _generate(n_users, n_items, min_len, max_len, lag, rule_prob, n_categories, seed, task):
    """``(data, walks, cycle)``: ``walks[u] = (walk position after each item, direction)`` for the
    walk task (an unwrapped index into ``cycle``; a distractor leaves it unchanged), else None."""
    if n_items < 3 or n_users < 1 or not 1 <= min_len <= max_len or lag < 1 or not 0.0 <= rule_prob <= 1.0:
        raise ValueError("synthetic_dataset: need n_items >= 3, n_users >= 1, 1 <= min_len <= max_len, lag >= 1 "
                         f"and rule_prob in [0, 1]; got {n_items}, {n_users}, {min_len}, {max_len}, {lag}, {rule_prob}")
    if task not in TASKS:
        raise ValueError(f"synthetic_dataset: task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "walk" and max_len >= n_items:
        raise ValueError(f"synthetic_dataset: the walk task needs max_len < n_items (got {max_len}, {n_items}): "
                         "a walk must not close the cycle")
    rng = np.random.default_rng(seed)
    # A single cycle through all items: a permutation without fixed points.
    cycle = rng.permutation(n_items) + 1
    succ = np.zeros(n_items + 1, dtype=np.int64)
    succ[cycle] = np.roll(cycle, -1)
    sequences, timestamps, walks = [], [], []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        follow = rng.random(length) < rule_prob
        noise = rng.integers(1, n_items + 1, size=length)
        if task == "lag":
            seq = np.empty(length, dtype=np.int64)
            for t in range(length):
                seq[t] = succ[seq[t - lag]] if t >= lag and follow[t] else noise[t]
        else:
            direction = 1 if rng.random() < 0.5 else -1
            seq, at = _walk(cycle, int(rng.integers(n_items)), direction, follow, noise)
            walks.append((at, direction))
        sequences.append(seq)
        start = rng.uniform(1.5e9, 1.6e9)  # 2017-2020
        gaps = rng.exponential(6 * 3600.0, size=length)
        timestamps.append(start + (np.cumsum(gaps) if task == "lag" else np.zeros(length)))
    categories = rng.integers(0, n_categories, size=n_items)
    if task == "walk":  # neighbours on the cycle share a category: item attributes help find them
        categories[cycle - 1] = np.arange(n_items) * n_categories // n_items
    features = np.zeros((n_items + 1, n_categories), dtype=np.float32)
    features[np.arange(1, n_items + 1), categories] = 1.0
    data = InteractionData(
        name="synthetic",
        sequences=sequences,
        n_items=n_items,
        timestamps=timestamps,
        item_features=features,
        feature_names=[f"category={c}" for c in range(n_categories)],
        user_ids=[str(u + 1) for u in range(n_users)],
        item_ids=[str(i) for i in range(1, n_items + 1)],
        notes=[f"synthetic: next item = succ[item {lag} back] with p={rule_prob}, else random; seed={seed}"
               if task == "lag" else
               f"synthetic walk: next item continues a walk along a cycle (either direction) with p={rule_prob}, "
               f"else a random distractor; seed={seed}"],
    )
    return data, (walks if task == "walk" else None), cycle


def _walk(cycle: np.ndarray, start: int, direction: int, follow: np.ndarray, noise: np.ndarray):
    """Items of a walk along ``cycle`` from index ``start`` and the walk's (unwrapped) position after
    each item; where ``follow`` is False a distractor from ``noise`` is taken instead of a step
    (the first item always starts the walk)."""
    seq = np.empty(len(follow), dtype=np.int64)
    at = np.empty(len(follow), dtype=np.int64)
    at[0] = start
    seq[0] = cycle[start]
    for t in range(1, len(follow)):
        at[t] = at[t - 1] + direction * bool(follow[t])
        seq[t] = cycle[at[t] % len(cycle)] if follow[t] else noise[t]
    return seq, at


def walk_ceilings(options: dict, split, stage, cutoffs=(10,), full: bool = True,
                  exclude_history: bool = True) -> dict[str, dict[str, float]]:
    """The best expected test metrics on the walk task of a model that sees order and of one that
    sees the history as a set (``{"order-aware": {...}, "order-blind": {...}}``).

    ``options`` are the generator's (``task="walk"``); ``stage`` is a prepared evaluation stage
    (``fastpe.train.evaluate.prepare_stage``) whose sampled candidates are scored. The next item is
    the walk's continuation with probability ``rule_prob``, otherwise uniformly random, so the best
    ranking puts first the continuation (knowing order) or the items beyond both ends of the walked
    arc, equally likely by symmetry (not knowing it), and the rest in any order. Ties are broken at
    random, so the value is an expectation (a model's scores rarely tie exactly; the evaluation
    counts exact ties against the positive). The order-blind value assumes the arc's items are told
    apart from distractors, so it is an upper bound.
    """
    opts = {**options, "task": "walk"}
    names = ("n_users", "n_items", "min_len", "max_len", "lag", "rule_prob", "n_categories", "seed", "task")
    defaults = dict(zip(names, (400, 200, 12, 30, 2, 0.7, 8, 0, "walk")))
    data, walks, cycle = _generate(**{k: opts.get(k, defaults[k]) for k in names})
    n = data.n_items
    if any(len(h) > stage.data.items.shape[1] for h in stage.data.history):
        raise ValueError("walk_ceilings: some profiles are truncated (history longer than max_len); the ceilings "
                         "assume the model sees the whole history")
    out = {}
    for name, blind in (("order-aware", False), ("order-blind", True)):
        sums: dict[str, float] = {}
        for row, user in enumerate(stage.data.users):
            t = split.stage_index(stage.stage, int(user))
            at, direction = walks[user]
            ends = [cycle[(at[t - 1] + direction) % n]]
            if blind:
                ends.append(cycle[(at[0] - direction) % n])
            target = int(stage.data.targets[row])
            kinds = {"sampled": [int(c) for c in stage.candidates[row] if c != 0]}
            if full:
                history = set(stage.data.history[row].tolist()) if exclude_history else set()
                kinds["full"] = [i for i in range(1, n + 1) if i == target or i not in history]
            for kind, competing in kinds.items():
                favoured = sorted({e for e in ends if e in competing})
                first = len(favoured)
                ranks = (range(first) if target in favoured else
                         range(first, len(competing)))  # 0-based ranks, each equally likely
                for k in cutoffs:
                    hits = [r for r in ranks if r < k]
                    sums[f"{kind}_hit@{k}"] = sums.get(f"{kind}_hit@{k}", 0.0) + len(hits) / len(ranks)
                    sums[f"{kind}_ndcg@{k}"] = (sums.get(f"{kind}_ndcg@{k}", 0.0)
                                                + sum(1.0 / np.log2(r + 2) for r in hits) / len(ranks))
        out[name] = {key: float(value) / max(len(stage.data.users), 1) for key, value in sums.items()}
    return out
