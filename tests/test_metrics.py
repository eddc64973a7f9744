"""Ranking metrics against hand-computed cases, including ties; the evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastpe.data import leave_one_out, synthetic_dataset
from fastpe.train.evaluate import PopularityScorer, evaluate, prepare_stage
from fastpe.train.metrics import full_ranks, hit_at, ndcg_at, sampled_ranks, summarize


def test_sampled_ranks_hand_cases():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # positive (col 0) best: rank 0
        [0.1, 0.9, 0.5, 0.05],  # positive (col 3) below all three: rank 3
        [0.5, 0.5, 0.5, 0.5],  # all tied: pessimistic, rank 3 (not 0)
        [0.2, 0.7, 0.7, 0.1],  # positive (col 1) tied with col 2: rank 1
    ])
    positive = torch.tensor([0, 3, 1, 1])
    assert sampled_ranks(scores, positive).tolist() == [0, 3, 3, 1]
    valid = torch.tensor([[True] * 4, [True, True, False, True], [True] * 4, [True, True, False, True]])
    assert sampled_ranks(scores, positive, valid).tolist() == [0, 2, 3, 0]  # padding columns never compete


def test_hit_and_ndcg_values():
    ranks = torch.tensor([0, 1, 9, 10, 50])
    assert hit_at(ranks, 10).tolist() == [1, 1, 1, 0, 0]
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(ndcg_at(ranks, 10).numpy(), expected)
    out = summarize(ranks, (1, 10))
    assert out["hit@1"] == pytest.approx(0.2) and out["hit@10"] == pytest.approx(0.6)
    assert out["ndcg@10"] == pytest.approx(sum(expected) / 5)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 51) / 5)


def test_full_ranks_exclusion_and_padding():
    # items 1..5, column 0 is padding
    scores = torch.tensor([[99.0, 0.5, 0.9, 0.5, 0.1, 0.7]])
    target = torch.tensor([1])
    assert full_ranks(scores, target).tolist() == [3]  # items 2, 5 higher, item 3 ties; padding ignored
    excluded = torch.tensor([[False, True, True, False, False, False]])  # history {1, 2}; 1 is the target
    assert full_ranks(scores, target, excluded).tolist() == [2]  # the target still competes, item 2 does not


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        sampled_ranks(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))


class ConstantScorer:
    def __call__(self, rows, candidates):
        return torch.zeros(candidates.shape)


class OracleScorer:
    def __init__(self, stage):
        self.stage = stage

    def __call__(self, rows, candidates):
        targets = torch.as_tensor(self.stage.data.targets[rows])
        return (candidates == targets[:, None]).float()


def test_protocol_constant_model_gets_worst_rank_and_oracle_the_best():
    split = leave_one_out(synthetic_dataset(n_users=60, seed=1))
    stage = prepare_stage(split, "test", 10, 100, seed=0)
    worst = evaluate(ConstantScorer(), stage, split.n_items, (10,), True, True)
    assert worst["sampled_hit@10"] == 0.0 and worst["full_hit@10"] == 0.0
    best = evaluate(OracleScorer(stage), stage, split.n_items, (10,), True, True)
    assert best["sampled_ndcg@10"] == 1.0 and best["full_ndcg@10"] == 1.0


def test_same_candidates_for_every_run_and_valid_subset():
    split = leave_one_out(synthetic_dataset(n_users=80, seed=1))
    a, b = prepare_stage(split, "valid", 10, 100, 0), prepare_stage(split, "valid", 10, 100, 0)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    c = prepare_stage(split, "valid", 10, 100, 0, max_users=20)
    assert len(c.data.targets) == 20


def test_popularity_scores_and_history_exclusion():
    split = leave_one_out(synthetic_dataset(n_users=100, seed=2))
    stage = prepare_stage(split, "test", 10, 100, 0)
    pop = PopularityScorer(split, "cpu")
    counts = np.bincount(np.concatenate([split.train_sequence(u) for u in range(100)]), minlength=split.n_items + 1)
    np.testing.assert_array_equal(pop.counts.numpy()[1:], counts[1:])
    with_history = evaluate(pop, stage, split.n_items, (10,), False, True, exclude_history=True)
    without = evaluate(pop, stage, split.n_items, (10,), False, True, exclude_history=False)
    assert with_history["full_mrr"] >= without["full_mrr"]
