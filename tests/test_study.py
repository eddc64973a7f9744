"""The study protocol end to end on the built-in synthetic data, its executors and the command line.

The default study's data is the walk task: the next item continues a walk along a cycle, in a
direction the set of history items does not reveal. A bidirectional CARCA without a positional
encoding (which sees its history as a set) is capped at the order-blind ceiling; encodings that
see order must beat it by more than two standard errors. The fixture runs a smaller version of
the default preset (fewer users, items and encodings) in two processes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest

from fastpe.cli import build_parser, main
from fastpe.train import TrainConfig
from fastpe.train.cli import SYNTHETIC_PRESET, config_from_args
from fastpe.train.presets import PRESETS
from fastpe.train.study import aggregate, converged, metric_keys, parse_encodings, reading, run_study

SEEDS = [0, 1]
ENCODINGS = ["none", "learnt", "rope"]
SMALL = {**SYNTHETIC_PRESET, "synthetic": {**SYNTHETIC_PRESET["synthetic"], "n_users": 300, "n_items": 60},
         "progress": False}
TINY = TrainConfig(synthetic={"task": "walk", "n_users": 40, "n_items": 30, "min_len": 5, "max_len": 10}, d_model=8,
                   n_blocks=1, max_len=10, epochs=2, threads=1, progress=False, next_slot=True, full_ranking=False)


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = TrainConfig(**SMALL)
    return run_study(cfg, ENCODINGS, SEEDS, out, log=quiet, jobs=2), cfg


def same(a, b) -> bool:
    """Equal, with NaN (a metric not computed, e.g. full ranking when it is off) equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def runs_of(result, encoding):
    return {r["seed"]: r for r in result["runs"] if r["encoding"] == encoding}


def test_study_writes_table_reading_csv_json_and_plots(study):
    result, _ = study
    out = result["out_dir"]
    text = open(f"{out}/results.md").read()
    for word in ("| none", "| learnt", "| popularity", "| ceiling, order-aware", "| ceiling, order-blind",
                 "sampled ndcg@10", "sampled hit@1", "± ", "train seq/s", "wall time", "2 processes",
                 "Reading (test sampled_ndcg@10", "runs converged", "CPU time of the runs"):
        assert word in text, word
    with open(f"{out}/runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["encoding"], int(r["seed"])) for r in rows] == [(e, s) for e in ENCODINGS for s in SEEDS]
    saved = json.load(open(f"{out}/runs.json"))
    assert same(saved["runs"], result["runs"]) and saved["popularity_test"]["sampled_ndcg@10"] > 0
    assert saved["references"]["ceiling, order-blind"]["sampled_hit@1"] < 0.5
    assert all(r["cpu_seconds"] > 0 and r["train_seq_per_s"] > 0 for r in result["runs"])
    for image in ("plot.png", "curves.png"):
        assert open(f"{out}/{image}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_order_aware_encodings_beat_none_beyond_two_standard_errors(study):
    # The separation the default study is built to show, asserted from the runs themselves: the
    # gap of the means against two standard errors of the difference, and none at most at the
    # order-blind ceiling while both order-aware encodings pass it.
    result, _ = study
    metric = "test_sampled_ndcg@10"
    blind = result["references"]["ceiling, order-blind"]["sampled_ndcg@10"]
    none = [r[metric] for r in runs_of(result, "none").values()]
    none_mean = sum(none) / len(none)
    assert none_mean < blind + 0.02
    for name in ("learnt", "rope"):
        mine = [r[metric] for r in runs_of(result, name).values()]
        mean = sum(mine) / len(mine)
        error = math.sqrt(_var(mine) / len(mine) + _var(none) / len(none))
        assert mean - none_mean > max(2 * error, 0.05), (name, mine, none)
        assert mean > blind, (name, mine, blind)
    assert "beyond 2 standard errors: learnt" in result["reading"] and "rope (" in result["reading"].split("; not:")[0]


def _var(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def test_training_beats_popularity(study):
    result, _ = study
    pop = result["popularity_test"]
    for r in result["runs"]:
        assert r["test_sampled_ndcg@10"] > pop["sampled_ndcg@10"] + 0.15


def test_resumed_study_reuses_finished_runs(study):
    result, cfg = study
    again = run_study(cfg, ENCODINGS, SEEDS, result["out_dir"], resume=True, log=quiet)
    assert same(again["runs"], result["runs"]) and again["wall_seconds"] < 30
    assert "6 of 6 runs reused from an earlier invocation" in open(f"{result['out_dir']}/results.md").read()


def test_resumed_study_with_more_epochs_trains_unfinished_runs_on(tmp_path):
    # A long study is extended in steps (--resume --epochs N): runs stopped by the epoch limit train
    # on from their checkpoints and end where an uninterrupted study of N epochs ends.
    straight = run_study(replace(TINY, epochs=3, patience=0), ["none"], [0], tmp_path / "straight", log=quiet)
    run_study(replace(TINY, epochs=1, patience=0), ["none"], [0], tmp_path / "steps", log=quiet)
    extended = run_study(replace(TINY, epochs=3, patience=0), ["none"], [0], tmp_path / "steps", resume=True,
                         log=quiet)
    assert [r["epochs_run"] for r in extended["runs"]] == [3]
    assert same(metrics_of(extended), metrics_of(straight))


def metrics_of(result):
    keep = ("encoding", "seed", "best_epoch", "epochs_run")
    return [{k: v for k, v in r.items() if k in keep or k.startswith(("test_", "valid_"))} for r in result["runs"]]


def test_process_pool_gives_the_sequential_results(tmp_path):
    sequential = run_study(TINY, ["rope", "none"], [0], tmp_path / "one", log=quiet)
    pooled = run_study(TINY, ["rope", "none"], [0], tmp_path / "two", log=quiet, jobs=2)
    assert same(metrics_of(pooled), metrics_of(sequential))
    assert [r["encoding"] for r in pooled["runs"]] == ["rope", "none"]  # table order, not finish order


def test_ray_executor_gives_the_sequential_results_and_resumes(tmp_path):
    pytest.importorskip("ray")
    sequential = run_study(TINY, ["none", "rope"], [0], tmp_path / "one", log=quiet)
    on_ray = run_study(TINY, ["none", "rope"], [0], tmp_path / "ray", log=quiet, executor="ray", jobs=2)
    assert same(metrics_of(on_ray), metrics_of(sequential))
    assert (tmp_path / "ray" / "runs" / "rope" / "seed0" / "summary.json").exists()
    again = run_study(TINY, ["none", "rope"], [0], tmp_path / "ray", log=quiet, executor="ray", resume=True)
    assert same(metrics_of(again), metrics_of(sequential)) and "2 of 2 runs reused" in open(tmp_path / "ray" / "results.md").read()


def test_parse_encodings():
    assert len(parse_encodings("all")) == 9
    assert parse_encodings(" abs, rope ") == ["abs", "rope"]
    with pytest.raises(ValueError):
        parse_encodings(" , ")


def test_cli_train_and_study(tmp_path, capsys):
    small = ["--synthetic", "n_users=40", "--epochs", "1", "--d-model", "8", "--no-progress"]
    assert main(["train", "--encoding", "rope", "--out-dir", str(tmp_path / "t"), *small]) == 0
    printed = capsys.readouterr().out
    assert "popularity (test)" in printed and "sampled_ndcg@10" in printed and "synthetic: 40 users" in printed
    assert "+ rope (base 1000)" in printed  # rope's base is part of the run's summary
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["rope_base"] == 1000.0
    assert main(["study", "--encodings", "abs,rmha-4", "--seeds", "1", "--out-dir", str(tmp_path / "s"), *small]) == 0
    printed = capsys.readouterr().out
    assert "| abs" in printed and "| rmha-4" in printed and "Reading" in printed
    assert "Preset `demo`" in (tmp_path / "s" / "results.md").read_text()
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["d_model"] == 8 and cfg["n_blocks"] == SYNTHETIC_PRESET["n_blocks"]  # preset fills the rest
    assert cfg["synthetic"]["task"] == "walk" and cfg["synthetic"]["n_users"] == 40


def test_presets_are_listed_and_configure_the_published_models(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in PRESETS:
        assert name in text
    parse = build_parser().parse_args
    sasrec = config_from_args(parse(["train", "--preset", "sasrec", "--data", "beauty"]))
    assert (sasrec.model, sasrec.d_model, sasrec.max_len, sasrec.n_blocks, sasrec.n_heads, sasrec.activation,
            sasrec.dropout, sasrec.lr, sasrec.batch_size, sasrec.warmup_steps, sasrec.encoding) == \
        ("sasrec", 50, 50, 2, 1, "relu", 0.5, 1e-3, 128, 0, "learnt")
    assert config_from_args(parse(["train", "--preset", "sasrec-movielens"])).max_len == 200
    carca = config_from_args(parse(["study", "--preset", "carca-beauty", "--epochs", "3"]), skip=("encoding", "seed"))
    assert (carca.data, carca.d_model, carca.max_len, carca.n_blocks, carca.n_heads, carca.dropout, carca.lr,
            carca.activation, carca.residual, carca.epochs) == ("beauty", 90, 75, 3, 1, 0.5, 1e-4, "leakyrelu", "mul", 3)
    games = config_from_args(parse(["train", "--preset", "carca-games", "--data", "x.txt"]))
    assert (games.d_model, games.max_len, games.n_heads) == (90, 50, 3)


def test_study_with_a_preset_writes_its_deviations(tmp_path):
    assert main(["study", "--preset", "carca-beauty", "--data", "synthetic", "--synthetic", "n_users=30",
                 "--encodings", "none", "--seeds", "1", "--epochs", "1", "--d-model", "6", "--n-blocks", "1",
                 "--max-len", "12", "--no-full-ranking", "--no-progress", "--jobs", "1",
                 "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "Preset `carca-beauty`" in text and "Deviations from the paper:" in text and "held-out next item" in text
    assert "epochs=1 (preset 1801)" in text and "data='synthetic' (preset 'beauty')" in text
    run = tmp_path / "train"
    assert main(["train", "--preset", "sasrec", "--synthetic", "n_users=30", "--epochs", "1", "--d-model", "8",
                 "--no-full-ranking", "--no-progress", "--out-dir", str(run)]) == 0
    assert "Preset `sasrec`" in (run / "preset.md").read_text()
    assert json.loads((run / "config.json").read_text())["activation"] == "relu"


def test_reading_names_the_encodings_beyond_two_standard_errors():
    def row(encoding, seed, value, best=3, run=5):
        return {"encoding": encoding, "seed": seed, "test_sampled_ndcg@10": value, "best_epoch": best,
                "epochs_run": run}

    rows = [row("none", 0, 0.50), row("none", 1, 0.52), row("abs", 0, 0.70), row("abs", 1, 0.72),
            row("rope", 0, 0.40), row("rope", 1, 0.70, best=5)]
    text = reading(rows, ["none", "abs", "rope"], "sampled_ndcg@10")
    assert "beyond 2 standard errors: abs (+0.200 ± 0.014)" in text and "not: rope (+0.040 ± 0.150)" in text
    assert "5 of 6 runs converged" in text
    assert "no standard error" in reading(rows[:1] + rows[2:3], ["none", "abs"], "sampled_ndcg@10")
    assert converged(row("a", 0, 0.1, best=4, run=9)) and not converged(row("a", 0, 0.1, best=9, run=9))


def test_table_shows_spread_only_over_several_runs():
    import statistics

    def row(encoding, seed, value):
        return {"encoding": encoding, "seed": seed, "train_seq_per_s": 10.0, "step": "eager", "backend": "torch",
                **{f"test_{k}": value for k in metric_keys([10])}}

    table = {r["encoding"]: r for r in aggregate([row("abs", 0, 0.5), row("rope", 0, 0.2), row("rope", 1, 0.4)],
                                                   ["abs", "rope"], [10], None,
                                                   {"ceiling": {k: 0.9 for k in metric_keys([10])}})}
    assert table["abs"]["sampled ndcg@10"] == "0.5000"
    assert table["rope"]["sampled ndcg@10"] == f"0.3000 ± {statistics.stdev([0.2, 0.4]):.4f}"
    assert table["ceiling"]["full hit@10"] == "0.9000"


def test_study_rejects_bad_executor_options(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        run_study(TINY, ["none"], [0], tmp_path, executor="spark")
    with pytest.raises(ValueError, match="jobs"):
        run_study(TINY, ["none"], [0], tmp_path, jobs=0)


def test_default_jobs_fill_the_cores_with_runs_of_the_given_threads(monkeypatch):
    from fastpe.train import executors

    monkeypatch.setattr(executors.os, "cpu_count", lambda: 8)
    cpu = replace(TINY, device="cpu")
    assert executors.auto_jobs(replace(cpu, threads=1), runs=18) == 8
    assert executors.auto_jobs(replace(cpu, threads=4), runs=18) == 2
    assert executors.auto_jobs(replace(cpu, threads=1), runs=3) == 3
    assert executors.auto_jobs(replace(cpu, threads=0), runs=18) == 1  # torch's own threads use every core
    assert executors.threads_per_run(replace(cpu, threads=0), jobs=4) == 2
