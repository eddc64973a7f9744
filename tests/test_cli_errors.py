"""Bad input on the command line and in data files: a clear, early error, never a silently wrong or
lost run. One test per case of the table of common mistakes (README, "When something goes wrong")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpe.cli import main
from fastpe.data import DataFormatError, read_dataset, read_pairs, synthetic_dataset
from fastpe.data.readers import InteractionData
from fastpe.train import TrainConfig, train
from fastpe.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
DATA = synthetic_dataset(n_users=30, n_items=60, min_len=4, max_len=9, seed=3)
# A run small enough for a second on one thread.
TINY = ["--synthetic", "n_users=30,n_items=60,min_len=4,max_len=9", "--epochs", "1", "--d-model", "8",
        "--max-len", "8", "--batch-size", "16", "--samples-per-user", "1", "--eval-negatives", "20",
        "--no-full-ranking", "--no-progress", "--threads", "1"]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def tiny(out_dir, **kw) -> TrainConfig:
    base = dict(d_model=8, n_blocks=1, n_heads=1, max_len=8, batch_size=16, epochs=1, samples_per_user=1,
                warmup_steps=2, patience=0, progress=False, threads=1, eval_negatives=20, full_ranking=False,
                out_dir=str(out_dir))
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args):
    pass


def user_error(capsys, argv, *words):
    """Run the command line; it must fail with exit status 2 and a short message holding ``words``."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 2, err
    for word in words:
        assert word in err, err
    return err


def run_cli(args, cwd, env=None, **kw):
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastpe", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120, **kw)


# ------------------------------------------------------------------------------------------- data


def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_the_data(capsys, tmp_path):
    afile = write(tmp_path / "afile", "x")
    user_error(capsys, ["train", *TINY, "--out-dir", str(afile)], "--out-dir", "is a file, not a folder")
    user_error(capsys, ["study", "--encodings", "none", *TINY, "--out-dir", str(afile / "run")], "is a file")


def test_a_study_whose_data_cannot_be_read_leaves_no_folder_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_error(capsys, ["study", "--encodings", "none", "--data", str(tmp_path / "missing.csv")], "missing.csv")
    assert not (tmp_path / "runs").exists()


def test_resume_without_out_dir_points_at_the_latest_folder_of_the_same_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "study-1" / "runs").mkdir(parents=True)
    (tmp_path / "runs" / "train-1").mkdir()
    (tmp_path / "runs" / "train-1" / "last.pt").write_bytes(b"")
    user_error(capsys, ["study", "--encodings", "none", *TINY, "--resume"], "latest study here is runs/study-1")
    user_error(capsys, ["train", *TINY, "--resume"], "latest run here is runs/train-1")

def test_a_max_len_whose_attention_scores_cannot_fit_in_memory_is_refused_before_the_data(capsys):
    # 256 sequences x 100000^2 float32 scores: 9 TiB, beyond any machine's memory; before this check
    # the run read the data, built the model and died in the CPU allocator with a traceback.
    user_error(capsys, ["train", *TINY, "--max-len", "100000", "--device", "cpu"], "--max-len 100000",
               "on the CPU", "lower --max-len")

def test_user_item_rating_is_not_read_as_a_timestamp(tmp_path):
    # Each user's last line is the latest interaction; its rating is the lowest. Reading the rating
    # as a time would make the highest-rated item the test item.
    f = write(tmp_path / "ratings.txt", "u1 a 5\nu1 b 4\nu1 c 1\nu2 a 2\nu2 d 5\nu2 b 3\n")
    with pytest.raises(DataFormatError, match=r"ratings\.txt:1: the third column \('5'\) does not look like a Unix "
                                              r"timestamp.*--columns user,item,rating"):
        read_dataset(f)
    d = read_dataset(f, columns="user,item,rating")
    assert d.timestamps is None
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["a", "b", "c"]  # file order kept
    d = read_dataset(f, columns="user,item,timestamp")  # the user says it is a time: sorted by it
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["c", "b", "a"]
    epoch = write(tmp_path / "epoch.txt", "u1 a 1300000000\nu1 b 1200000000\n")
    assert [read_pairs(epoch).item_ids[i - 1] for i in read_pairs(epoch).sequences[0]] == ["b", "a"]


def test_a_header_line_is_skipped(tmp_path):
    d = read_dataset(write(tmp_path / "p.txt", "user_id item_id\nu1 10\nu1 11\nu2 10\n"))
    assert d.user_ids == ["u1", "u2"] and d.item_ids == ["10", "11"]
    assert any("header" in n for n in d.notes)
    # A header naming the time column makes it one, whatever its values look like.
    d = read_dataset(write(tmp_path / "t.txt", "user_id\titem_id\ttimestamp\nu1\ta\t3\nu1\tb\t1\nu1\tc\t2\n"))
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["b", "c", "a"]
    d = read_dataset(write(tmp_path / "s.txt", "user items\n1 10 11 12\n2 11 13\n"))  # one line per user
    assert d.user_ids == ["1", "2"] and d.n_interactions == 5


def test_movielens_u_data_with_one_flag(tmp_path, capsys):
    udata = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n186\t51\t2\t880606923\n"
    f = write(tmp_path / "u.data", udata)
    with pytest.raises(DataFormatError, match=r"u\.data:1: 4 columns.*--columns user,item,rating,timestamp"):
        read_dataset(f)
    d = read_dataset(f, columns="user,item,rating,timestamp")
    assert d.user_ids == ["196", "186"]
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["377", "242"]  # by time; the rating is ignored
    np.testing.assert_array_equal(d.timestamps[1], [880606923, 891717742])
    user_error(capsys, ["train", "--data", str(f), "--out-dir", str(tmp_path / "r")], "u.data:1", "--columns")


def test_binary_file_names_file_and_byte_offset(tmp_path):
    with pytest.raises(DataFormatError, match=r"blob\.txt:2: not UTF-8 text \(byte b'\\xff' at byte offset 6 "):
        read_dataset(write(tmp_path / "blob.txt", b"u1 10\n\xff\xfe\x00\x01"))
    with pytest.raises(DataFormatError, match=r"zeros\.txt:1: a NUL byte at byte offset 4"):
        read_dataset(write(tmp_path / "zeros.txt", b"u1 1\x00\x00\x00\n"))
    seq = write(tmp_path / "S.txt", "1 10 11\n")
    with pytest.raises(DataFormatError, match=r"S_item2attributes\.json: not UTF-8 text .* byte offset 2"):
        read_dataset(seq, attributes=write(tmp_path / "S_item2attributes.json", b'{"\xc3\x28": [1]}'))


def test_inter_file_with_a_byte_order_mark(tmp_path):
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    f = write(tmp_path / "b.inter", "\ufeff" + header + "u1\ti1\t20\nu1\ti2\t10\nu2\ti1\t5\n")
    d = read_dataset(f)
    assert d.user_ids == ["u1", "u2"] and [d.item_ids[i - 1] for i in d.sequences[0]] == ["i2", "i1"]


def test_attributes_naming_no_item_are_reported(tmp_path, capsys):
    seq = "\n".join(f"{u} " + " ".join(str(10 + (u + k) % 30) for k in range(6)) for u in range(30)) + "\n"
    f = write(tmp_path / "S.txt", seq)
    write(tmp_path / "S_item2attributes.json", json.dumps({"B0001": [1], "B0002": [2]}))
    assert main(["train", "--data", str(f), "--out-dir", str(tmp_path / "r"), *TINY[2:]]) == 0
    out = capsys.readouterr().out
    assert "names none of the items" in out.split("epoch 1/1")[0]  # printed before training
    notes = json.loads((tmp_path / "r" / "summary.json").read_text())["data_notes"]
    assert any("names none of the items" in n for n in notes)


def test_data_too_short_to_evaluate_or_too_few_items(tmp_path, capsys):
    short = write(tmp_path / "short.txt", "".join(f"u{u} {u} {u + 1}\n" for u in range(20)))  # 2 items per user
    user_error(capsys, ["train", "--data", str(short), "--out-dir", str(tmp_path / "a"), *TINY[2:]],
               "every user has fewer than 3 interactions")
    assert not (tmp_path / "a" / "summary.json").exists()
    # Every item of a data file competes in the "sampled" evaluation: said loudly, and kept in the summary.
    few = write(tmp_path / "few.txt", "".join(f"u{u} {(u * 7 + i) % 60}\n" for u in range(30) for i in range(6)))
    assert main(["train", "--data", str(few), "--out-dir", str(tmp_path / "b"), *TINY[2:], "--eval-negatives", "100"]) == 0
    out = capsys.readouterr().out
    assert "warning: few has 60 items, not more than --eval-negatives 100" in out.split("epoch 1/1")[0]
    assert "--eval-negatives 100" in json.loads((tmp_path / "b" / "summary.json").read_text())["warnings"][0]
    # A generated catalogue is sized on purpose (the demo's): a note says what the sampled columns are.
    assert main(["train", "--out-dir", str(tmp_path / "b2"), *TINY, "--eval-negatives", "100"]) == 0
    out = capsys.readouterr().out
    assert "note: the synthetic catalogue has 60 items" in out and "warning: synthetic" not in out
    tiny_catalogue = ["--synthetic", "task=lag,n_users=30,n_items=8,min_len=4,max_len=9", *TINY[2:]]
    user_error(capsys, ["train", "--out-dir", str(tmp_path / "c"), *tiny_catalogue], "8 items",
               "every metric would be 1")


def test_summary_json_is_strict_json(tmp_path):
    assert ckpt.json_text({"a": float("nan"), "b": [float("inf"), 1.5]}, indent=None) == '{"a": null, "b": [null, 1.5]}'
    train(tiny(tmp_path / "r"), DATA, quiet)

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    for name in ("summary.json", "metrics.jsonl"):
        for line in (tmp_path / "r" / name).read_text().splitlines() if name.endswith("l") else [
                (tmp_path / "r" / name).read_text()]:
            json.loads(line, parse_constant=refuse)


# --------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("option, value, words", [
    ("--epochs", "0", "positive integer"), ("--epochs", "-1", "positive integer"),
    ("--batch-size", "0", "positive integer"), ("--batch-size", "-5", "positive integer"),
    ("--samples-per-user", "0", "positive integer"), ("--negatives", "0", "positive integer"),
    ("--eval-negatives", "0", "positive integer"), ("--lr", "inf", "finite number > 0"), ("--lr", "0", "> 0"),
    ("--lr", "nan", "finite"), ("--dropout", "1", "[0, 1)"), ("--d-model", "0", "positive"),
    ("--max-len", "-3", "positive"), ("--cutoffs", "0,10", "positive integers"), ("--cutoffs", "10,10", "distinct"),
    ("--patience", "-1", ">= 0"), ("--weight-decay", "-1", ">= 0"), ("--encoding", "foo", "unknown encoding 'foo'"),
    ("--model", "bert", "invalid choice"), ("--synthetic", "users=4", "unknown option 'users'"),
    ("--columns", "user,rating", "one user and one item"), ("--rope-base", "1", "> 1"),
])
def test_numeric_and_named_options_are_checked_before_anything_is_read(tmp_path, capsys, option, value, words):
    # --data names a file that does not exist: had the option passed, the error would be about the data.
    user_error(capsys, ["train", "--data", str(tmp_path / "none.txt"), "--out-dir", str(tmp_path / "r"), option, value],
               f"argument {option}", words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, words", [
    (["--seeds", "0"], "argument --seeds: expected a positive integer"),
    (["--seeds", "-2"], "argument --seeds"),
    (["--encodings", "abs,foo"], "unknown encoding 'foo'"),
    (["--encodings", "abs,abs"], "abs listed more than once"),
    (["--encodings", "abs,rope", "--d-model", "6", "--n-heads", "2"], "rope needs an even head size"),
])
def test_study_checks_every_argument_and_name_before_the_first_run(tmp_path, capsys, argv, words):
    user_error(capsys, ["study", "--out-dir", str(tmp_path / "s"), *TINY, *argv], words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, words", [
    (["--d-model", "30", "--n-heads", "4"], "--d-model 30 is not divisible by --n-heads 4"),
    (["--select-metric", "sampled_ndcg@20"], "--select-metric: expected one of"),
    (["--target", "all"], "--target all"),
    (["--resume", "--restart"], "exclude each other"),
    (["--device", "tpu"], "--device"),
    (["--cuda-graphs"] if not torch.cuda.is_available() else ["--device", "nope"], "--"),
])
def test_options_that_depend_on_each_other(tmp_path, capsys, argv, words):
    user_error(capsys, ["train", "--out-dir", str(tmp_path / "r"), *TINY, *argv], words)
    assert not (tmp_path / "r").exists()


def test_lr_divergence_names_lr_epoch_and_step(tmp_path):
    from fastpe.train.validation import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ of \d+ .*learning rate 1e\+30 .*lower --lr"):
        train(tiny(tmp_path / "r", lr=1e30, warmup_steps=0), DATA, quiet)


def test_user_error_is_two_lines_and_the_traceback_is_opt_in(tmp_path, capsys, monkeypatch):
    argv = ["train", "--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "r")]
    user_error(capsys, argv, "missing.txt", "no such file", "--debug")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        main([*argv, "--debug"])
    monkeypatch.setenv("FASTPE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_named_data_set_missing_says_where_to_put_it(tmp_path, capsys):
    user_error(capsys, ["train", "--data", "ml-100k", "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "r")],
               "--data-root", "FASTPE_DATA_ROOT", str(tmp_path / "ml-100k" / "ml-100k.inter"))


# ------------------------------------------------------------------------------ folders and resume
def test_second_run_in_a_locked_folder_refuses_at_once(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "r"
        out.mkdir()
        write(out / ".lock", json.dumps({"pid": holder.pid, "host": socket.gethostname(), "what": "fastpe train",
                                         "started": "2026-01-01T10:00:00+00:00"}))
        user_error(capsys, ["train", "--out-dir", str(out), *TINY], "in use by fastpe train",
                   f"pid {holder.pid}", "started 2026-01-01T10:00:00")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_replaced(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "r"
    out.mkdir()
    write(out / ".lock", json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday"}))
    assert main(["train", "--out-dir", str(out), *TINY]) == 0
    assert f"replaced the stale lock of a run (pid {dead.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "summary.json").exists()  # released at the end


def test_folder_lock_is_exclusive_and_released(tmp_path):
    from fastpe.train.lock import FolderLock, FolderLocked

    with FolderLock(tmp_path, "first"):
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path, "second").acquire()
    with FolderLock(tmp_path, "third"):
        pass
    assert not (tmp_path / ".lock").exists()


def test_resume_without_out_dir_or_without_a_run(tmp_path, capsys):
    user_error(capsys, ["train", "--resume", *TINY], "--resume needs --out-dir")
    user_error(capsys, ["study", "--resume", *TINY], "--resume needs --out-dir")
    user_error(capsys, ["train", "--resume", "--out-dir", str(tmp_path / "none"), *TINY], "no run to continue")


def test_resume_may_change_evaluation_only_options(tmp_path):
    first = train(tiny(tmp_path / "r", epochs=2, stop_after_epochs=1), DATA, quiet)
    assert first["interrupted"]
    lines = []
    s = train(tiny(tmp_path / "r", epochs=2, resume=True, full_ranking=True, full_ranking_users=5, valid_users=10,
                   cutoffs=(5, 10), exclude_history=False), DATA, lines.append)
    assert s["epochs_run"] == 2 and "full_ndcg@5" in s["test"]
    assert any("evaluation options changed" in line and "valid_users" in line for line in lines)
    with pytest.raises(ValueError, match="options that change training differ.*lr"):
        train(tiny(tmp_path / "r", epochs=3, resume=True, lr=0.5), DATA, quiet)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_corrupt_last_checkpoint_names_the_file_and_the_way_out(tmp_path, capsys, damage):
    out = tmp_path / "r"
    assert main(["train", "--out-dir", str(out), *TINY, "--epochs", "2", "--stop-after-epochs", "1"]) == 0
    last = out / "last.pt"
    content = last.read_bytes()
    last.write_bytes({"truncated": content[: len(content) // 2], "empty": b"",
                      "random": np.random.default_rng(0).bytes(2000)}[damage])
    capsys.readouterr()
    user_error(capsys, ["train", "--out-dir", str(out), *TINY, "--epochs", "2", "--resume"],
               str(last), "is corrupt or incomplete", "best.pt", "is intact", "--restart")
    assert main(["train", "--out-dir", str(out), *TINY, "--epochs", "2", "--restart"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


def interrupted_main(argv) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:  # escaping, it would also end the test session
        pytest.fail("Ctrl-C ended in a KeyboardInterrupt traceback")


def test_ctrl_c_keeps_the_last_epoch_and_prints_the_resume_command(tmp_path, capsys, monkeypatch):
    from fastpe.train.trainer import Run

    real_epoch = Run.train_epoch

    def interrupted_in_epoch_3(self, step, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C (SIGINT) raises in the main thread
        return real_epoch(self, step, epoch)

    monkeypatch.setattr(Run, "train_epoch", interrupted_in_epoch_3)
    out = tmp_path / "run"
    assert interrupted_main(["train", *TINY, "--epochs", "5", "--patience", "0", "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"interrupted; {out / 'last.pt'} keeps epoch 2" in err, err
    command = err.strip().splitlines()[-1].split()
    assert command[0] == "fastpe" and command[-3:] == ["--out-dir", str(out), "--resume"]
    assert ckpt.load(out / "last.pt")["state"]["epoch"] == 2 and not (out / ".lock").exists()
    monkeypatch.setattr(Run, "train_epoch", real_epoch)
    assert main(command[1:]) == 0  # the printed command continues the run
    assert f"resumed {out / 'last.pt'} after epoch 2" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 5


def test_ctrl_c_in_a_study_points_at_the_study(tmp_path, capsys, monkeypatch):
    from fastpe.train.trainer import Run

    def interrupted(self, step, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "train_epoch", interrupted)
    out = tmp_path / "s"
    assert interrupted_main(["study", *TINY, "--encodings", "abs", "--seeds", "1", "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"finished runs are kept in {out}" in err and "no epoch was complete" in err
    assert err.strip().splitlines()[-1].endswith(f"--out-dir {out} --resume") and not (out / ".lock").exists()


# ---------------------------------------------------------------------------------- what is reported
def test_summary_records_the_backend_that_ran_per_op(tmp_path):
    s = train(tiny(tmp_path / "a", encoding="learnt", backend="torch"), DATA, quiet)
    assert s["backends"] == {} and s["backend"].startswith("none")  # no fused op: not "torch"
    s = train(tiny(tmp_path / "b", encoding="rmha-4", n_heads=2), DATA, quiet)
    assert s["backends"] == {"relative_attention": "torch"} and s["backend"] == "torch"


def test_run_says_what_it_does_and_reports_users_and_times(tmp_path):
    data = InteractionData("mixed", [np.array([1, 2]), *DATA.sequences], DATA.n_items)  # one user too short
    lines = []
    s = train(tiny(tmp_path / "r", epochs=2, cutoffs=(10,)), data, lines.append)
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))
    before = "\n".join(lines[:first_epoch])
    assert "mixed: 31 users" in before and "parameters" in before and f"output: {tmp_path / 'r'}" in before
    assert "1 users have fewer than 3 interactions (trained on, not evaluated)" in before
    assert any(line.startswith("evaluating test") and "30 users" in line for line in lines)
    epoch_line = lines[first_epoch]
    assert "valid sampled NDCG@10" in epoch_line and "HR@10" in epoch_line and " s (train " in epoch_line
    assert s["users"] == {"total": 31, "evaluated": 30, "not_evaluated": 1}
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_seconds"] > 0 and r["valid_seconds"] > 0 for r in rows)


def test_evaluation_shows_a_progress_bar(tmp_path, capsys):
    train(tiny(tmp_path / "r", progress=True), DATA, quiet)
    err = capsys.readouterr().err
    assert "validation, epoch 1" in err and "test" in err


def test_help_lists_names_and_no_double_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default None)" not in text and "(fastpe.ENCODINGS)" not in text
    assert "rotatory+con" in text and "on when stderr is a terminal" in text and "--columns" in text
    assert "(default runs/<command>-<timestamp>)" in text


def test_curves_give_each_seed_its_own_line_style(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from fastpe.train.study import plot_curves

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    history = [{"epoch": 1, "loss": 1.0, "valid_sampled_ndcg@10": 0.1}, {"epoch": 2, "loss": 0.5,
                                                                         "valid_sampled_ndcg@10": 0.2}]
    runs = [("abs", history), ("abs", history), ("rope", history), ("rope", history)]
    plot_curves(runs, ["abs", "rope"], "sampled_ndcg@10", tmp_path / "c.png", "t")
    lines = figures[0].axes[0].get_lines()
    styles = {(line.get_color(), line.get_linestyle()) for line in lines}
    assert len(lines) == 4 and len(styles) == 4  # every run can be told apart
