"""Data-parallel training: two CPU processes (gloo, started by torchrun) train as one process does
with the same global batch and seed, and checkpoints move between the two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpe.cli import main
from fastpe.data import synthetic_dataset
from fastpe.data.split import epoch_batches
from fastpe.train import TrainConfig
from fastpe.train import checkpoint as ckpt
from fastpe.train.distributed import local_rows
from fastpe.train.steps import sampled_bce_loss
from fastpe.train.trainer import Run, _batch_tensors

ROOT = Path(__file__).resolve().parents[1]
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available")

# Tiny CARCA with a parametrised positional encoding; no dropout, whose draws differ between a
# shard and the whole batch. 40 users in evaluation batches of 16: the two processes score 16 and
# 24 users (uneven shards).
ARGS = ["--synthetic", "n_users=40", "--epochs", "2", "--d-model", "8", "--model", "carca", "--encoding", "rmha-4",
        "--batch-size", "32", "--eval-batch-size", "16", "--dropout", "0", "--threads", "1", "--no-progress",
        "--device", "cpu"]


def torchrun(*args: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    # --standalone: a rendezvous on a free local port, so runs never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "fastpe", "train", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_same_parameters(single: Path, parallel: Path) -> None:
    a, b = ckpt.load(single)["model"], ckpt.load(parallel)["model"]
    assert a.keys() == b.keys()  # the bare module's names, no "module." prefix
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("in_proj_bias"):
            # The key bias has an exactly zero gradient (softmax ignores a constant added to every
            # score), so Adam (update g / sqrt(v)) turns the rounding noise of the differently
            # ordered gradient sums into small steps of its own; it changes no output.
            d = len(x) // 3
            torch.testing.assert_close(x[d:2 * d], y[d:2 * d], rtol=0, atol=1e-3, msg=name)
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        # Gradient sums are reduced in another order: float32 tolerances, not bitwise.
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def assert_same_run(single: dict, parallel: dict) -> None:
    assert (single["epochs_run"], single["best_epoch"]) == (parallel["epochs_run"], parallel["best_epoch"])
    assert len(single["history"]) == len(parallel["history"])
    for a, b in zip(single["history"], parallel["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        for key in a:
            if key.startswith("valid_"):
                assert b[key] == pytest.approx(a[key], abs=1e-6), key
    for part in ("valid", "test", "popularity_test"):
        assert single[part].keys() == parallel[part].keys()
        for key in single[part]:
            assert parallel[part][key] == pytest.approx(single[part][key], abs=1e-6), (part, key)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert main(["train", *ARGS, "--out-dir", str(out)]) == 0
    return out


@needs_gloo
def test_two_processes_train_as_one(single, tmp_path):
    out = tmp_path / "ddp"
    torchrun(*ARGS, "--out-dir", str(out))
    one, two = summary(single), summary(out)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert "full_ndcg@10" in two["test"]  # full ranking gathered too
    assert_same_run(one, two)
    assert_same_parameters(single / "last.pt", out / "last.pt")
    assert_same_parameters(single / "best.pt", out / "best.pt")
    assert {p.name for p in out.iterdir()} == {"config.json", "last.pt", "best.pt", "metrics.jsonl", "summary.json"}


@needs_gloo
def test_checkpoint_of_two_processes_resumes_in_one(single, tmp_path):
    out = tmp_path / "resumed"
    torchrun(*ARGS, "--out-dir", str(out), "--stop-after-epochs", "1")
    assert not (out / "summary.json").exists()
    assert main(["train", *ARGS, "--out-dir", str(out), "--resume"]) == 0
    assert summary(out)["world_size"] == 1
    assert_same_run(summary(single), summary(out))
    assert_same_parameters(single / "last.pt", out / "last.pt")


def test_shards_together_give_the_single_process_loss_and_gradient(tmp_path):
    """Without processes: the loss of each half of a batch (negatives drawn for the whole batch,
    divided by its number of targets, times 2) averages to the whole batch's loss and gradient."""
    data = synthetic_dataset(n_users=40, n_items=80, min_len=4, max_len=12, seed=3)
    run = Run(TrainConfig(d_model=8, n_blocks=1, max_len=8, dropout=0.0, batch_size=16, progress=False,
                          out_dir=str(tmp_path), negatives=4), data, lambda *a: None)
    batch = next(epoch_batches(run.split, 16, 8, run.mode, np.random.default_rng(0)))
    batch.targets[-3:] = 0  # padding rows, all in the second half: the halves hold unequal numbers of targets
    batch.items[-3:] = 0

    def loss_and_grads(b, n_targets=None, shard=(0, 1)):
        run.model.zero_grad()
        generator = torch.Generator().manual_seed(5)
        loss = sampled_bce_loss(run.model, *_batch_tensors(b, run.device, run.use_context), run.split.n_items, 4,
                                generator, False, n_targets, shard)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in run.model.parameters()]

    whole, whole_grads = loss_and_grads(batch)
    n_targets = torch.tensor(float((batch.targets != 0).sum()))
    halves = [loss_and_grads(batch.rows(*local_rows(16, 2, r)), n_targets, (r, 2)) for r in (0, 1)]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, whole)
    for g0, g1, g in zip(halves[0][1], halves[1][1], whole_grads):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-4, atol=1e-7)


def test_processes_leave_the_group_together_only_after_a_command_that_finished(monkeypatch, tmp_path):
    """``main`` meets the other processes at a barrier before leaving the process group only when
    its command succeeded: after an error the others may never reach that barrier (atexit's
    teardown leaves at once instead)."""
    from fastpe.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "leave", lambda: calls.append("leave"))
    with pytest.raises(SystemExit):  # argparse's own errors
        main(["train", *ARGS, "--epochs", "0"])
    assert main(["train", *ARGS, "--out-dir", str(tmp_path / "run"), "--max-len", "10000000"]) == 2
    assert calls == []
    assert main(["train", *ARGS, "--epochs", "1", "--out-dir", str(tmp_path / "run")]) == 0
    assert calls == ["leave"]


def test_batch_size_must_divide_among_processes():
    assert local_rows(32, 2, 0) == (0, 16) and local_rows(32, 2, 1) == (16, 32)
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by the 4 processes"):
        local_rows(30, 4, 1)
