"""Dataset readers, the leave-one-out split, padding and the synthetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastpe.data import (
    DataFormatError,
    eval_set,
    leave_one_out,
    load_dataset,
    pad_left,
    read_dataset,
    read_pairs,
    read_recbole,
    read_sequences,
    sample_eval_negatives,
    sniff_format,
    synthetic_dataset,
    time_features,
    training_examples,
)
from fastpe.data.split import epoch_batches, n_batches

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- pairs
def test_pairs_remap_order_and_blank_lines(tmp_path):
    f = write(tmp_path / "p.txt", "u1 100\n\nu2 7\nu1 7\n   \nu1 55\n")
    d = read_pairs(f)
    assert d.n_users == 2 and d.n_items == 3 and d.item_ids == ["100", "7", "55"]
    assert d.user_ids == ["u1", "u2"]
    np.testing.assert_array_equal(d.sequences[0], [1, 2, 3])  # file order kept
    np.testing.assert_array_equal(d.sequences[1], [2])
    assert d.timestamps is None


def test_pairs_with_timestamps_sorted_stably(tmp_path):
    f = write(tmp_path / "p.txt", "a x 30\na y 10\na z 30\na w 20\n")
    d = read_pairs(f, columns="user,item,timestamp")  # small numbers: a timestamp only when named one
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["y", "w", "x", "z"]
    np.testing.assert_array_equal(d.timestamps[0], [10, 20, 30, 30])


@pytest.mark.parametrize("text, line, words", [
    ("a 1\nb\n", 2, "expected 'user item'"),
    ("a 1\nb 2 3 4\n", 2, "expected 'user item'"),
    ("a 1 5\nb 2\n", 2, "3"),
    ("a 1 x\n", 1, r"third column \('x'\) does not look like a Unix timestamp"),
    ("a 1 nan\n", 1, "does not look like a Unix timestamp"),
])
def test_pairs_malformed_lines_name_file_and_line(tmp_path, text, line, words):
    f = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataFormatError, match=rf"bad\.txt:{line}: .*{words}"):
        read_pairs(f)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="empty"):
        read_pairs(write(tmp_path / "e.txt", "\n\n"))


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_dataset(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------ sequences
def test_sequences_with_attributes_and_unknown_items(tmp_path):
    f = write(tmp_path / "S.txt", "1 10 11 12\n\n2 11 13\n")
    attrs = write(tmp_path / "S_item2attributes.json", json.dumps({"10": [1, 2], "13": [2], "999": [5]}))
    d = read_dataset(f)  # auto: one line per user, attributes found next to it
    assert d.n_items == 4 and d.item_features.shape == (5, 2)
    np.testing.assert_array_equal(d.item_features[0], [0, 0])  # padding row
    np.testing.assert_array_equal(d.item_features[1], [1, 1])  # item "10"
    np.testing.assert_array_equal(d.item_features[2], [0, 0])  # item "11": no attributes
    np.testing.assert_array_equal(d.item_features[4], [0, 1])  # item "13"
    assert any("ignored 1 entries" in n for n in d.notes)  # item 999 is not in the interactions
    assert attrs.exists()


def test_sequences_bad_json_is_a_clear_error(tmp_path):
    f = write(tmp_path / "S.txt", "1 10 11\n")
    bad = write(tmp_path / "attrs.json", '{"10": [1, 2],\n "11": [3,, 4]}')
    with pytest.raises(DataFormatError, match=r"attrs\.json:2: invalid JSON"):
        read_sequences(f, bad)
    with pytest.raises(DataFormatError, match="expected a list"):
        read_sequences(f, write(tmp_path / "a2.json", '{"10": 3}'))
    with pytest.raises(DataFormatError, match="expected a JSON object"):
        read_sequences(f, write(tmp_path / "a3.json", "[1, 2]"))


def test_sequences_malformed_lines(tmp_path):
    with pytest.raises(DataFormatError, match=r"S\.txt:2: expected 'user item item"):
        read_sequences(write(tmp_path / "S.txt", "1 10 11\n2\n"))
    with pytest.raises(DataFormatError, match=r"S\.txt:3: user '1' already has a line \(line 1\)"):
        read_sequences(write(tmp_path / "S.txt", "1 10 11\n2 3 4 5\n1 7 8 9\n"))


def test_sniff_format(tmp_path):
    assert sniff_format(write(tmp_path / "a.txt", "1 2\n1 3\n2 4\n")) == "pairs"
    assert sniff_format(write(tmp_path / "b.txt", "1 2 3 4 5\n2 4\n")) == "sequences"
    assert sniff_format(write(tmp_path / "c.txt", "1 2\n2 3\n")) == "sequences"  # one line per user
    assert sniff_format(tmp_path / "x.inter") == "recbole"


# -------------------------------------------------------------------------------------- recbole
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_recbole_sorts_by_time_and_reads_item_fields(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    write(folder / "toy.inter", INTER + "u\ti2\t5\t200\nu\ti1\t3\t100\n\nv\ti3\t1\t50\nv\ti1\t1\t60\n")
    write(folder / "toy.item", "item_id:token\ttitle:token_seq\tyear:token\tgenre:token_seq\tprice:float\n"
                               "i1\tA B\t1995\tComedy Drama\t10\ni2\tC\t1996\tDrama\t30\nzz\tQ\t1990\tHorror\t0\n")
    d = read_recbole(folder, max_attribute_vocab=2)  # the title's 3 words exceed the limit
    assert [d.item_ids[i - 1] for i in d.sequences[0]] == ["i1", "i2"]  # sorted by timestamp
    np.testing.assert_array_equal(d.timestamps[0], [100, 200])
    assert d.feature_names == ["year=1995", "year=1996", "genre=Comedy", "genre=Drama", "price"]
    i1, i3 = d.item_ids.index("i1") + 1, d.item_ids.index("i3") + 1
    np.testing.assert_array_equal(d.item_features[i1], [1, 0, 1, 1, 0])  # lowest price -> 0
    np.testing.assert_array_equal(d.item_features[i3], [0, 0, 0, 0, 0])  # not listed in .item
    assert d.item_features[d.item_ids.index("i2") + 1, -1] == 1.0  # price scaled to [0, 1]
    assert any("skipped field title" in n for n in d.notes)
    assert any("ignored 1 rows" in n for n in d.notes)  # item zz has no interaction


@pytest.mark.parametrize("text, match", [
    ("user_id\titem_id\n1\t2\n", r"toy\.inter:1: header field 'user_id' is not 'name:type'"),
    ("user_id:token\trating:float\n1\t2\n", r"toy\.inter:1: the header has no item_id"),
    (INTER + "1\t2\t3\n", r"toy\.inter:2: expected 4 tab-separated fields"),
    (INTER + "1\t2\t3\t4\n1\t3\t3\tsoon\n", r"toy\.inter:3: timestamp 'soon' is not a number"),
])
def test_recbole_malformed(tmp_path, text, match):
    with pytest.raises(DataFormatError, match=match):
        read_recbole(write(tmp_path / "toy.inter", text))


# ---------------------------------------------------------------------------------------- split
def make_data(lengths, n_items=20):
    d = synthetic_dataset(n_users=len(lengths), n_items=n_items, min_len=1, max_len=1, seed=0)
    rng = np.random.default_rng(1)
    d.sequences = [rng.integers(1, n_items + 1, size=n) for n in lengths]
    d.timestamps = [np.arange(n, dtype=np.float64) * 3600 + 1.6e9 for n in lengths]
    return d


def test_leave_one_out_short_users():
    d = make_data([1, 2, 3, 6])
    s = leave_one_out(d)
    np.testing.assert_array_equal(s.n_train, [1, 2, 1, 4])
    np.testing.assert_array_equal(s.eval_users, [2, 3])  # 3+ interactions are evaluated
    np.testing.assert_array_equal(s.train_users(), [1, 3])  # 2+ training items give a pair
    seq = d.sequences[3]
    valid, test = eval_set(s, "valid", 10, [3]), eval_set(s, "test", 10, [3])
    assert valid.targets[0] == seq[4] and test.targets[0] == seq[5]
    np.testing.assert_array_equal(valid.items[0, -4:], seq[:4])
    np.testing.assert_array_equal(test.items[0, -5:], seq[:5])
    assert (valid.items[0, :-4] == 0).all()
    np.testing.assert_allclose(test.target_context[0], s.context[3][5])
    # training never reaches the validation or test item
    b = training_examples(s, np.array([3]), 10, "all", np.random.default_rng(0))
    np.testing.assert_array_equal(b.items[0, -3:], seq[:3])
    np.testing.assert_array_equal(b.targets[0, -3:], seq[1:4])
    for _ in range(20):
        b = training_examples(s, np.array([3]), 10, "prefix", np.random.default_rng(_))
        cut = int((b.items[0] != 0).sum())
        assert 1 <= cut <= 3 and b.targets[0, 0] == seq[cut]


def test_pad_left_truncates_to_most_recent():
    out = pad_left([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3)
    np.testing.assert_array_equal(out, [[3, 4, 5], [0, 0, 7], [0, 0, 0]])
    ctx = pad_left([np.ones((2, 6)), np.full((4, 6), 2.0)], 3, 0.0, np.float32)
    assert ctx.shape == (2, 3, 6) and (ctx[0, 0] == 0).all() and (ctx[1] == 2).all()


def test_epoch_batches_have_static_shape_and_cover_users():
    s = leave_one_out(synthetic_dataset(n_users=50, seed=3))
    batches = list(epoch_batches(s, 16, 12, "prefix", np.random.default_rng(0), samples_per_user=2))
    assert len(batches) == n_batches(s, 16, 2)
    assert all(b.items.shape == (16, 12) and b.targets.shape == (16, 1) for b in batches)
    assert sum(int((b.targets != 0).sum()) for b in batches) == 2 * len(s.train_users())
    assert batches[-1].context.shape == (16, 12, 6)


def test_eval_negatives_exclude_history_random_order():
    s = leave_one_out(make_data([30] * 40, n_items=150))
    e = eval_set(s, "test", 10)
    cands, pos = sample_eval_negatives(e, 150, 100, np.random.default_rng(0))
    assert cands.shape == (40, 101)
    np.testing.assert_array_equal(cands[np.arange(40), pos], e.targets)
    assert len(set(pos.tolist())) > 10  # the positive is not always in the same column
    for row, known, p in zip(cands, e.known, pos):
        negs = np.delete(row, p)
        assert len(set(negs.tolist())) == 100 and not set(negs.tolist()) & set(known.tolist())


def test_eval_negatives_small_catalogue_pads():
    s = leave_one_out(make_data([5] * 3, n_items=8))
    e = eval_set(s, "test", 5)
    cands, pos = sample_eval_negatives(e, 8, 100, np.random.default_rng(0))
    for row, known in zip(cands, e.known):
        real = row[row != 0]
        assert len(real) == 1 + 8 - len(set(known.tolist()))


def test_time_features():
    f = time_features(np.array([0.0, 1700000000.0]))  # 1970-01-01 00:00 Thu; 2023-11-14 22:13 Tue
    np.testing.assert_allclose(f[0], [0, 0, 0, 3 / 6, 0, 0])
    np.testing.assert_allclose(f[1], [1, 10 / 11, 13 / 30, 1 / 6, 22 / 23, 13 / 59], rtol=1e-6)


def test_synthetic_is_deterministic_and_follows_its_rule():
    a, b = synthetic_dataset(seed=5), synthetic_dataset(seed=5)
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))
    assert a.item_features.shape == (a.n_items + 1, 8) and a.timestamps is not None
    # the rule: next = succ[item two back] for about rule_prob of the steps
    pairs = {}
    for seq in a.sequences:
        for t in range(2, len(seq)):
            pairs.setdefault(seq[t - 2], []).append(seq[t])
    agree = np.mean([np.mean(np.array(v) == np.bincount(v).argmax()) for v in pairs.values() if len(v) >= 5])
    assert agree > 0.6
    assert load_dataset("synthetic", synthetic_options={"n_users": 10}).n_users == 10


# ------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not (SHARED / "ml-100k").exists(), reason="shared data not present")
def test_ml100k_reader():
    d = load_dataset("ml-100k", SHARED)
    assert (d.n_users, d.n_items, d.n_interactions) == (943, 1682, 100000)
    assert d.timestamps is not None and all((np.diff(t) >= 0).all() for t in d.timestamps)
    assert any(n.startswith("class=") for n in d.feature_names) and "movie_title" not in str(d.feature_names)
    s = leave_one_out(d)
    assert len(s.eval_users) == 943 and s.context_dim == 6
    assert 0.0 <= min(c.min() for c in s.context) and max(c.max() for c in s.context) <= 1.0


@pytest.mark.skipif(not (SHARED / "amazon-beauty").exists(), reason="shared data not present")
def test_beauty_reader():
    d = load_dataset("beauty", SHARED)
    assert (d.n_users, d.n_items, d.n_interactions) == (22363, 12101, 198502)
    assert d.item_features is not None and d.item_features[1:].sum(axis=1).min() >= 1
    assert d.timestamps is None and leave_one_out(d).context is None
