"""The study protocol end to end on the built-in synthetic data, and the command line.

The synthetic data's next item follows the item two steps back, so a bidirectional CARCA without
a positional encoding (which sees its history as a set) must lose clearly to one with positions.
"""

from __future__ import annotations

import csv
import json

import pytest

from fastpe.cli import main
from fastpe.train import TrainConfig
from fastpe.train.cli import SYNTHETIC_PRESET
from fastpe.train.study import parse_encodings, run_study

SEEDS = [0, 1]


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = TrainConfig(**{**SYNTHETIC_PRESET, "progress": False})
    return run_study(cfg, ["none", "learnt"], SEEDS, out, log=quiet), cfg


def runs_of(result, encoding):
    return {r["seed"]: r for r in result["runs"] if r["encoding"] == encoding}


def test_study_writes_table_csv_json_and_plot(study):
    result, _ = study
    out = result["out_dir"]
    text = open(f"{out}/results.md").read()
    for word in ("| none", "| learnt", "| popularity", "sampled ndcg@10", "full hit@10", "± ", "train seq/s", "wall time"):
        assert word in text
    with open(f"{out}/runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["encoding"], int(r["seed"])) for r in rows] == [(e, s) for e in ("none", "learnt") for s in SEEDS]
    saved = json.load(open(f"{out}/runs.json"))
    assert saved["runs"] == result["runs"] and saved["popularity_test"]["sampled_ndcg@10"] > 0
    for image in ("plot.png", "curves.png"):
        assert open(f"{out}/{image}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for r in result["runs"]:
        assert r["train_seq_per_s"] > 0 and r["step"] == "eager"


def test_training_beats_popularity(study):
    result, _ = study
    pop = result["popularity_test"]
    for r in runs_of(result, "learnt").values():
        assert r["test_sampled_ndcg@10"] > pop["sampled_ndcg@10"] + 0.15
        assert r["test_full_ndcg@10"] > pop["full_ndcg@10"] + 0.15


def test_positional_encoding_clearly_beats_none_on_order_dependent_data(study):
    # Margin from 5 seeds with these settings: learnt - none was 0.13-0.31 (sampled NDCG@10) and
    # 0.10-0.29 (full NDCG@10), with none at 0.20-0.24 and 0.14-0.18.
    result, _ = study
    none, learnt = runs_of(result, "none"), runs_of(result, "learnt")
    for seed in SEEDS:
        assert learnt[seed]["test_sampled_ndcg@10"] > none[seed]["test_sampled_ndcg@10"] + 0.08
        assert learnt[seed]["test_full_ndcg@10"] > none[seed]["test_full_ndcg@10"] + 0.08


def test_resumed_study_reuses_finished_runs(study):
    result, cfg = study
    again = run_study(cfg, ["none", "learnt"], SEEDS, result["out_dir"], resume=True, log=quiet)
    assert again["runs"] == result["runs"] and again["wall_seconds"] < 30
    assert "4 of 4 runs reused from an earlier invocation" in open(f"{result['out_dir']}/results.md").read()


def test_parse_encodings():
    assert len(parse_encodings("all")) == 9
    assert parse_encodings(" abs, rope ") == ["abs", "rope"]
    with pytest.raises(ValueError):
        parse_encodings(" , ")


def test_cli_train_and_study(tmp_path, capsys):
    small = ["--synthetic", "n_users=40", "--epochs", "1", "--d-model", "8", "--no-full-ranking", "--no-progress"]
    assert main(["train", "--encoding", "rope", "--out-dir", str(tmp_path / "t"), *small]) == 0
    printed = capsys.readouterr().out
    assert "popularity (test)" in printed and "sampled_ndcg@10" in printed and "synthetic: 40 users" in printed
    assert "+ rope (base 1000)" in printed  # rope's base is part of the run's summary
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["rope_base"] == 1000.0
    assert main(["study", "--encodings", "abs,rmha-4", "--seeds", "1", "--out-dir", str(tmp_path / "s"), *small]) == 0
    printed = capsys.readouterr().out
    assert "| abs" in printed and "| rmha-4" in printed and (tmp_path / "s" / "results.md").exists()
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["d_model"] == 8 and cfg["n_blocks"] == SYNTHETIC_PRESET["n_blocks"]  # preset fills the rest


def test_table_shows_spread_only_over_several_runs():
    import statistics

    from fastpe.train.study import aggregate, metric_keys

    def row(encoding, seed, value):
        return {"encoding": encoding, "seed": seed, "train_seq_per_s": 10.0, "step": "eager", "backend": "torch",
                **{f"test_{k}": value for k in metric_keys([10])}}

    table = {r["encoding"]: r for r in aggregate([row("abs", 0, 0.5), row("rope", 0, 0.2), row("rope", 1, 0.4)],
                                                   ["abs", "rope"], [10], None)}
    assert table["abs"]["sampled ndcg@10"] == "0.5000"
    assert table["rope"]["sampled ndcg@10"] == f"0.3000 ± {statistics.stdev([0.2, 0.4]):.4f}"
