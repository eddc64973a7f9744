"""Training runs: resumption, determinism, checkpoints, step modes, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fastpe.data import synthetic_dataset
from fastpe.data.split import epoch_batches
from fastpe.train import TrainConfig, train
from fastpe.train import checkpoint as ckpt
from fastpe.train.trainer import Run, WarmupSchedule, _batch_tensors

DATA = synthetic_dataset(n_users=48, n_items=120, min_len=5, max_len=14, seed=4)


def tiny(out_dir, **kw) -> TrainConfig:
    base = dict(d_model=16, n_blocks=1, n_heads=2, max_len=10, batch_size=16, epochs=2, samples_per_user=2,
                dropout=0.3, warmup_steps=3, patience=0, progress=False, threads=1, out_dir=str(out_dir))
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args):
    pass


def params(path):
    return ckpt.load(path)["model"]


@pytest.mark.parametrize("model, encoding", [("carca", "rotatory"), ("sasrec", "rmha-4")])
def test_resume_continues_exactly(tmp_path, model, encoding):
    kw = dict(model=model, encoding=encoding, negatives=3, schedule="cosine")
    full = train(tiny(tmp_path / "full", **kw), DATA, quiet)
    first = train(tiny(tmp_path / "resumed", stop_after_epochs=1, **kw), DATA, quiet)
    assert first["interrupted"] and first["epoch"] == 1
    resumed = train(tiny(tmp_path / "resumed", resume=True, **kw), DATA, quiet)
    assert resumed["history"] == full["history"]
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    for name in ("last.pt", "best.pt"):
        a, b = params(tmp_path / "full" / name), params(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = ckpt.load(tmp_path / "full" / "last.pt")["optimizer"]["state"]
    opt_b = ckpt.load(tmp_path / "resumed" / "last.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = train(tiny(tmp_path / "a", epochs=1), DATA, quiet)
    b = train(tiny(tmp_path / "b", epochs=1), DATA, quiet)
    c = train(tiny(tmp_path / "c", epochs=1, seed=1), DATA, quiet)
    assert a["history"] == b["history"] and a["test"] == b["test"]
    pa, pb, pc = params(tmp_path / "a" / "last.pt"), params(tmp_path / "b" / "last.pt"), params(tmp_path / "c" / "last.pt")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_run_outputs_and_summary(tmp_path):
    s = train(tiny(tmp_path / "r", cutoffs=(5, 10), epochs=3, patience=1, select_metric="sampled_hit@10"), DATA, quiet)
    out = tmp_path / "r"
    assert {p.name for p in out.iterdir()} == {"config.json", "last.pt", "best.pt", "metrics.jsonl", "summary.json"}
    assert json.loads((out / "summary.json").read_text())["test"] == s["test"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == s["epochs_run"]
    assert set(s["test"]) >= {"sampled_hit@5", "sampled_ndcg@10", "full_hit@10", "full_ndcg@5"}
    assert 1 <= s["best_epoch"] <= s["epochs_run"] and s["train_seq_per_s"] > 0
    assert s["step"] == "eager" and s["device"] == "cpu" and s["backends"] == {}  # learnt: no fused op
    best_valid = max(h["valid_sampled_hit@10"] for h in s["history"])
    assert s["history"][s["best_epoch"] - 1]["valid_sampled_hit@10"] == best_valid  # selection on validation


def test_refuses_to_overwrite_or_resume_another_config(tmp_path):
    train(tiny(tmp_path / "r", epochs=1), DATA, quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(tmp_path / "r", epochs=1), DATA, quiet)
    with pytest.raises(ValueError, match="d_model"):
        train(tiny(tmp_path / "r", epochs=2, d_model=8, resume=True), DATA, quiet)
    # a finished run resumed with more epochs continues
    s = train(tiny(tmp_path / "r", epochs=2, resume=True), DATA, quiet)
    assert s["epochs_run"] == 2


def test_bidirectional_model_refuses_every_position_targets(tmp_path):
    with pytest.raises(ValueError, match="causal"):
        train(tiny(tmp_path / "r", target="all"), DATA, quiet)


def test_cuda_graphs_are_refused_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device|--cuda-graphs needs a CUDA device"):
        train(tiny(tmp_path / "r", cuda_graphs=True), DATA, quiet)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, path)

    def broken(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(ckpt.load(path)["a"], torch.ones(2))  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_warmup_schedule():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupSchedule(opt, 0.1, warmup=4, total=12, kind="cosine")
    values = [sched.value(s) for s in range(12)]
    np.testing.assert_allclose(values[:4], [0.025, 0.05, 0.075, 0.1])
    assert values[4] == pytest.approx(0.1) and values[-1] < 0.01
    sched.apply()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def compiled_vs_eager(tmp_path, compile_backend):
    losses = {}
    for kind in ("eager", "compiled"):
        cfg = tiny(tmp_path / kind, encoding="rmha-4", d_model=8, n_heads=1, max_len=6, dropout=0.0,
                   compile_backend=compile_backend)
        run = Run(cfg, DATA, quiet)
        step = run.make_step(kind)
        batches = list(epoch_batches(run.split, 16, 6, run.mode, np.random.default_rng(0)))[:3]
        losses[kind] = [float(step(*_batch_tensors(b, run.device, run.use_context))) for b in batches]
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)


def test_compiled_step_traces_whole_and_matches_eager(tmp_path):
    """torch.compile of the training step (dynamo + AOTAutograd, forward and backward), without the
    slow C++ code generation of inductor on the CPU."""
    compiled_vs_eager(tmp_path, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTPE_RUN_SLOW") != "1", reason="slow (inductor compilation); FASTPE_RUN_SLOW=1 runs it")
def test_compiled_step_with_inductor_matches_eager(tmp_path):
    """The same with inductor's generated kernels (about 1-2 minutes of compilation on 2 CPU cores)."""
    compiled_vs_eager(tmp_path, "inductor")


@pytest.mark.gpu
def test_cuda_graphed_compiled_and_eager_steps_train(tmp_path):
    """On a GPU: bf16 autocast, fused Adam, the fused backends (auto), the whole step captured in a
    CUDA graph; the benchmark times the eager, compiled and graphed steps."""
    for encoding in ("rmha-4", "learnt", "rope"):
        s = train(tiny(tmp_path / encoding, device="cuda", encoding=encoding, cuda_graphs=True, epochs=4, dropout=0.1,
                       benchmark_steps=5), DATA, quiet)
        assert s["step"] == "graphed" and s["amp"] == "bfloat16" and s["device"].startswith("cuda")
        losses = [h["loss"] for h in s["history"]]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
        assert all(isinstance(s["throughput_seq_per_s"][k], float) for k in ("eager", "compiled", "graphed")), \
            s["throughput_seq_per_s"]


def test_unknown_selection_metric_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--select-metric: expected one of"):
        train(tiny(tmp_path / "r", select_metric="sampled_ndcg@20"), DATA, quiet)


def test_full_ranking_on_a_user_subset(tmp_path):
    s = train(tiny(tmp_path / "r", epochs=1, full_ranking_users=10), DATA, quiet)
    assert s["full_ranking_users"] == 10 and "full_ndcg@10" in s["test"] and "full_ndcg@10" in s["popularity_test"]
    everyone = train(tiny(tmp_path / "all", epochs=1), DATA, quiet)
    assert everyone["full_ranking_users"] == len(DATA.sequences)
    assert s["test"]["sampled_ndcg@10"] == everyone["test"]["sampled_ndcg@10"]  # sampled metrics use every user
