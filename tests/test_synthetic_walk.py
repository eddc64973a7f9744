"""The synthetic walk task (the default study's data) and the ceilings it reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastpe.data import leave_one_out, synthetic_dataset
from fastpe.data.synthetic import _generate, walk_ceilings
from fastpe.train.evaluate import prepare_stage

OPTIONS = {"task": "walk", "n_users": 120, "n_items": 60, "min_len": 5, "max_len": 12, "seed": 3}


def positions(data, cycle):
    index = np.empty(data.n_items + 1, dtype=np.int64)
    index[cycle] = np.arange(len(cycle))
    return index


def test_walk_follows_the_cycle_in_one_direction_per_user_and_hides_order_in_time():
    data, walks, cycle = _generate(**{**OPTIONS, "rule_prob": 1.0, "lag": 2, "n_categories": 6})
    index = positions(data, cycle)
    directions = []
    for seq, stamps, (at, direction) in zip(data.sequences, data.timestamps, walks):
        steps = np.diff(index[seq]) % data.n_items
        assert set(steps.tolist()) == {1 if direction == 1 else data.n_items - 1}
        assert (stamps == stamps[0]).all()  # time features carry no order
        np.testing.assert_array_equal(cycle[at % data.n_items], seq)
        directions.append(direction)
    assert 0.3 < np.mean(np.array(directions) == 1) < 0.7
    # neighbours share a category: the category is the item's arc of the cycle
    categories = data.item_features[cycle].argmax(1)
    assert (np.diff(categories) >= 0).all() and len(set(categories.tolist())) == 6


def test_distractors_leave_the_walk_where_it_was():
    data, walks, cycle = _generate(**{**OPTIONS, "rule_prob": 0.7, "lag": 2, "n_categories": 8})
    followed = 0
    for seq, (at, direction) in zip(data.sequences, walks):
        moved = np.diff(at) != 0
        np.testing.assert_array_equal(np.diff(at)[moved], direction)
        np.testing.assert_array_equal(seq[1:][moved], cycle[at[1:][moved] % data.n_items])
        followed += moved.mean()
    assert 0.6 < followed / len(walks) < 0.8


def test_lag_task_is_unchanged_by_the_walk_option():
    a = synthetic_dataset(n_users=30, seed=2)
    b = _generate(30, 200, 12, 30, 2, 0.7, 8, 2, "lag")[0]
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))
    with pytest.raises(ValueError, match="task"):
        synthetic_dataset(task="spiral")
    with pytest.raises(ValueError, match="max_len < n_items"):
        synthetic_dataset(task="walk", n_items=10, max_len=12)


def test_ceilings_without_distractors_are_certainty_and_a_coin_flip():
    # Every next item continues the walk: knowing order ranks it first; not knowing it, the two
    # items beyond the ends of the arc are equally likely, so rank 1 or 2 with probability 1/2.
    options = {**OPTIONS, "rule_prob": 1.0}
    split = leave_one_out(synthetic_dataset(**options))
    stage = prepare_stage(split, "test", 12, 100, 0)  # 100 negatives >= every untouched item
    best = walk_ceilings(options, split, stage, cutoffs=(1, 10))
    for kind in ("sampled", "full"):
        assert best["order-aware"][f"{kind}_hit@1"] == pytest.approx(1.0)
        assert best["order-aware"][f"{kind}_ndcg@10"] == pytest.approx(1.0)
        assert best["order-blind"][f"{kind}_hit@1"] == pytest.approx(0.5)
        assert best["order-blind"][f"{kind}_hit@10"] == pytest.approx(1.0)
        assert best["order-blind"][f"{kind}_ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_ceilings_with_distractors_and_few_negatives_stay_ordered():
    options = {**OPTIONS, "rule_prob": 0.8}
    split = leave_one_out(synthetic_dataset(**options))
    stage = prepare_stage(split, "valid", 12, 20, 0)
    best = walk_ceilings(options, split, stage, cutoffs=(1, 10))
    aware, blind = best["order-aware"], best["order-blind"]
    assert 0.7 < aware["full_hit@1"] < 0.9 and 0.3 < blind["full_hit@1"] < 0.5
    for key in aware:
        assert aware[key] >= blind[key] - 1e-9, key
    with pytest.raises(ValueError, match="truncated"):
        walk_ceilings(options, split, prepare_stage(split, "test", 4, 20, 0))
