"""A synthetic dataset on which order matters: the built-in default of ``fastpe train/study``.

Every item ``i`` has a fixed successor ``succ[i]`` (a random permutation without fixed points).
Each user's sequence starts with ``lag`` random items; afterwards the next item is, with
probability ``rule_prob``, the successor of the item ``lag`` steps back, otherwise a uniformly
random item. With ``lag = 2`` the next item depends on the second most recent item, not on the
most recent one: a model that sees the history as a set (CARCA without a positional encoding is
permutation invariant) cannot tell which history item rules the next step, while a model that
knows positions can.

Items carry a random category (one-hot attributes) and interactions carry timestamps (random
gaps), so the attribute and context paths of CARCA are exercised; neither is informative.
"""

from __future__ import annotations

import numpy as np

from fastpe.data.readers import InteractionData


def synthetic_dataset(n_users: int = 400, n_items: int = 200, min_len: int = 12, max_len: int = 30, lag: int = 2,
                      rule_prob: float = 0.7, n_categories: int = 8, seed: int = 0) -> InteractionData:
    if n_items < 3 or n_users < 1 or not 1 <= min_len <= max_len or lag < 1 or not 0.0 <= rule_prob <= 1.0:
        raise ValueError("synthetic_dataset: need n_items >= 3, n_users >= 1, 1 <= min_len <= max_len, lag >= 1 "
                         f"and rule_prob in [0, 1]; got {n_items}, {n_users}, {min_len}, {max_len}, {lag}, {rule_prob}")
    rng = np.random.default_rng(seed)
    # A single cycle through all items: a permutation without fixed points.
    cycle = rng.permutation(n_items) + 1
    succ = np.zeros(n_items + 1, dtype=np.int64)
    succ[cycle] = np.roll(cycle, -1)
    sequences, timestamps = [], []
    for _ in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        seq = np.empty(length, dtype=np.int64)
        follow = rng.random(length) < rule_prob
        noise = rng.integers(1, n_items + 1, size=length)
        for t in range(length):
            seq[t] = succ[seq[t - lag]] if t >= lag and follow[t] else noise[t]
        sequences.append(seq)
        start = rng.uniform(1.5e9, 1.6e9)  # 2017-2020
        timestamps.append(start + np.cumsum(rng.exponential(6 * 3600.0, size=length)))
    categories = rng.integers(0, n_categories, size=n_items)
    features = np.zeros((n_items + 1, n_categories), dtype=np.float32)
    features[np.arange(1, n_items + 1), categories] = 1.0
    return InteractionData(
        name="synthetic",
        sequences=sequences,
        n_items=n_items,
        timestamps=timestamps,
        item_features=features,
        feature_names=[f"category={c}" for c in range(n_categories)],
        user_ids=[str(u + 1) for u in range(n_users)],
        item_ids=[str(i) for i in range(1, n_items + 1)],
        notes=[f"synthetic: next item = succ[item {lag} back] with p={rule_prob}, else random; seed={seed}"],
    )
