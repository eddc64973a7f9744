"""Training and evaluation: sampled-negative BCE, model selection on validation, resumable runs,
the study protocol (every encoding over several seeds)."""

from fastpe.train.config import TrainConfig
from fastpe.train.metrics import full_ranks, hit_at, ndcg_at, sampled_ranks, summarize
from fastpe.train.trainer import Run, train

__all__ = ["Run", "TrainConfig", "full_ranks", "hit_at", "ndcg_at", "sampled_ranks", "summarize", "train"]
