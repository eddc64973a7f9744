"""Readers for the dataset formats of sequential recommendation.

Every reader returns an :class:`InteractionData`: per-user item sequences in time order with item
ids remapped to ``1..n_items`` (0 is padding), optional timestamps and optional item features.
Malformed input raises :class:`DataFormatError` naming the file and the line.

Formats:

* ``pairs``: one interaction per line, ``user item`` (optionally ``user item timestamp``), in
  time order per user (SASRec.pytorch, BERT4Rec preprocessing, JODIE Wikipedia).
* ``sequences``: one line per user, ``user item item ...`` in time order (S3Rec), with an optional
  ``item2attributes.json`` (``{item: [attribute ids]}``) giving multi-hot item attributes.
* ``recbole``: RecBole atomic files: ``<name>.inter`` (typed header such as
  ``user_id:token item_id:token rating:float timestamp:float``, tab separated) and optionally
  ``<name>.item`` with item attributes (``token``/``token_seq`` fields become multi-hot, ``float``
  fields dense features scaled to [0, 1]).

Blank lines are skipped everywhere. Attribute entries for items that never occur in the
interactions are ignored and counted in ``InteractionData.notes``; items without attributes get an
all-zero feature row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataFormatError(ValueError):
    """Malformed dataset input; the message starts with ``file:line:``."""


@dataclass
class InteractionData:
    """Per-user interaction sequences with remapped item ids (1..n_items, 0 = padding)."""

    name: str
    sequences: list[np.ndarray]
    n_items: int
    timestamps: list[np.ndarray] | None = None
    item_features: np.ndarray | None = None  # [n_items + 1, A] float32, row 0 = padding (zeros)
    feature_names: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)  # original id of each user, in sequence order
    item_ids: list[str] = field(default_factory=list)  # original id of item i at index i - 1
    notes: list[str] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def describe(self) -> str:
        feats = self.item_features.shape[1] if self.item_features is not None else 0
        time = "with timestamps" if self.timestamps is not None else "no timestamps"
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, {self.n_interactions} interactions, "
                f"{feats} item features, {time}")


def _lines(path: Path):
    """``(line_number, stripped_text)`` of the non-blank lines of a text file."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if text:
                yield number, text


class _ItemIndex:
    """Original item id -> 1..n in order of first appearance."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def __call__(self, item: str) -> int:
        found = self.index.get(item)
        if found is None:
            self.ids.append(item)
            found = self.index[item] = len(self.ids)
        return found


def _build(name, users: dict[str, list], items: _ItemIndex, times: dict[str, list] | None) -> InteractionData:
    user_ids = list(users)
    sequences = [np.asarray(users[u], dtype=np.int64) for u in user_ids]
    timestamps = None if times is None else [np.asarray(times[u], dtype=np.float64) for u in user_ids]
    return InteractionData(name, sequences, len(items.ids), timestamps, user_ids=user_ids, item_ids=items.ids)


def read_pairs(path: str | Path, name: str | None = None) -> InteractionData:
    """``user item [timestamp]`` per line, in time order for each user."""
    path = Path(path)
    users: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    items = _ItemIndex()
    with_time = None
    for number, text in _lines(path):
        parts = text.split()
        if len(parts) not in (2, 3):
            raise DataFormatError(f"{path}:{number}: expected 'user item' or 'user item timestamp', got {text[:80]!r}")
        has_time = len(parts) == 3
        if with_time is None:
            with_time = has_time
        elif with_time != has_time:
            raise DataFormatError(f"{path}:{number}: {len(parts)} fields, but earlier lines have {3 if with_time else 2}")
        users.setdefault(parts[0], []).append(items(parts[1]))
        if has_time:
            times.setdefault(parts[0], []).append(_float(parts[2], path, number, "timestamp"))
    if not users:
        raise DataFormatError(f"{path}: no interactions (the file is empty)")
    data = _build(name or path.stem, users, items, times if with_time else None)
    if data.timestamps is not None:
        _sort_by_time(data)
    return data


def read_sequences(path: str | Path, attributes: str | Path | None = None, name: str | None = None) -> InteractionData:
    """One line per user, ``user item item ...`` in time order; optional item2attributes.json."""
    path = Path(path)
    users: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    items = _ItemIndex()
    for number, text in _lines(path):
        parts = text.split()
        if len(parts) < 2:
            raise DataFormatError(f"{path}:{number}: expected 'user item item ...' (a user and at least one item), got {text[:80]!r}")
        user = parts[0]
        if user in users:
            raise DataFormatError(f"{path}:{number}: user {user!r} already has a line (line {first_line[user]}); "
                                  "this format holds one line per user (use the 'pairs' format for one interaction per line)")
        first_line[user] = number
        users[user] = [items(i) for i in parts[1:]]
    if not users:
        raise DataFormatError(f"{path}: no interactions (the file is empty)")
    data = _build(name or path.stem, users, items, None)
    if attributes is not None:
        read_item_attributes_json(attributes, data)
    return data


def read_item_attributes_json(path: str | Path, data: InteractionData) -> InteractionData:
    """Attach multi-hot features from ``{item: [attribute, ...]}`` JSON to ``data`` (in place)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON (column {exc.colno}): {exc.msg}") from exc
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}:1: expected a JSON object {{item: [attribute ids]}}, got {type(raw).__name__}")
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}
    vocab: dict[str, int] = {}
    rows, cols, unknown = [], [], 0
    for item, attrs in raw.items():
        if not isinstance(attrs, list):
            raise DataFormatError(f"{path}:1: item {item!r}: expected a list of attribute ids, got {type(attrs).__name__}")
        row = index.get(str(item))
        if row is None:
            unknown += 1
            continue
        for a in attrs:
            if not isinstance(a, (int, str)) or isinstance(a, bool):
                raise DataFormatError(f"{path}:1: item {item!r}: attribute ids must be integers or strings, got {a!r}")
            rows.append(row)
            cols.append(vocab.setdefault(str(a), len(vocab)))
    features = np.zeros((data.n_items + 1, len(vocab)), dtype=np.float32)
    features[rows, cols] = 1.0
    data.item_features = features
    data.feature_names = [f"attr={a}" for a in vocab]
    covered = len(set(rows))
    data.notes.append(f"{path.name}: {len(vocab)} attributes, {covered}/{data.n_items} items have attributes")
    if unknown:
        data.notes.append(f"{path.name}: ignored {unknown} entries for items that occur in no interaction")
    return data


def _float(text: str, path: Path, number: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}:{number}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{path}:{number}: {what} {text!r} is not finite")
    return value


def _sort_by_time(data: InteractionData) -> None:
    """Order each user's interactions by timestamp (stable: ties keep file order)."""
    for u, ts in enumerate(data.timestamps):
        order = np.argsort(ts, kind="stable")
        data.sequences[u] = data.sequences[u][order]
        data.timestamps[u] = ts[order]


def _header(path: Path, text: str, number: int) -> list[tuple[str, str]]:
    fields = []
    for column in text.split("\t"):
        name, sep, kind = column.strip().partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataFormatError(f"{path}:{number}: header field {column!r} is not 'name:type' with type token, "
                                  "token_seq, float or float_seq (RecBole atomic files need a typed header)")
        fields.append((name, kind))
    return fields


def _atomic_rows(path: Path):
    """Header fields and ``(line_number, values)`` of a RecBole atomic file (tab separated)."""
    lines = _lines(path)
    try:
        number, text = next(lines)
    except StopIteration:
        raise DataFormatError(f"{path}: empty file (expected a typed header line)") from None
    fields = _header(path, text, number)

    def rows():
        # Re-read raw lines: a tab-separated row may have empty fields that strip() would lose.
        with open(path, encoding="utf-8") as handle:
            for n, line in enumerate(handle, start=1):
                if n <= number or not line.strip():
                    continue
                values = line.rstrip("\r\n").split("\t")
                if len(values) != len(fields):
                    raise DataFormatError(f"{path}:{n}: expected {len(fields)} tab-separated fields "
                                          f"({', '.join(f for f, _ in fields)}), got {len(values)}")
                yield n, values

    return fields, rows()


def read_recbole(path: str | Path, item_file: str | Path | None = None, name: str | None = None,
                 max_attribute_vocab: int = 500, attribute_fields: list[str] | None = None) -> InteractionData:
    """RecBole atomic files: ``path`` is a ``.inter`` file or a folder holding ``<folder>.inter``.

    The ``.item`` file next to it (or ``item_file``) gives item features: by default every
    ``token``/``token_seq`` field with at most ``max_attribute_vocab`` distinct values (so a title's
    words are left out) and every ``float`` field; ``attribute_fields`` names them explicitly.
    Interactions are ordered by ``timestamp`` when that field exists (ties keep file order).
    """
    path = Path(path)
    if path.is_dir():
        path = path / f"{path.name}.inter"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such RecBole .inter file")
    fields, rows = _atomic_rows(path)
    names = [f for f, _ in fields]
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DataFormatError(f"{path}:1: the header has no {required} field (got {', '.join(names)})")
    u_col, i_col = names.index("user_id"), names.index("item_id")
    t_col = names.index("timestamp") if "timestamp" in names else None
    users: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    items = _ItemIndex()
    for number, values in rows:
        user, item = values[u_col].strip(), values[i_col].strip()
        if not user or not item:
            raise DataFormatError(f"{path}:{number}: empty user_id or item_id")
        users.setdefault(user, []).append(items(item))
        if t_col is not None:
            times.setdefault(user, []).append(_float(values[t_col].strip(), path, number, "timestamp"))
    if not users:
        raise DataFormatError(f"{path}: no interactions after the header")
    data = _build(name or path.stem, users, items, times if t_col is not None else None)
    if data.timestamps is not None:
        _sort_by_time(data)
    item_path = Path(item_file) if item_file is not None else path.with_suffix(".item")
    if item_file is not None or item_path.exists():
        _read_recbole_items(item_path, data, max_attribute_vocab, attribute_fields)
    return data


def _read_recbole_items(path: Path, data: InteractionData, max_vocab: int, wanted: list[str] | None) -> None:
    fields, rows = _atomic_rows(path)
    names = [f for f, _ in fields]
    if "item_id" not in names:
        raise DataFormatError(f"{path}:1: the header has no item_id field (got {', '.join(names)})")
    if wanted is not None:
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ValueError(f"{path}: attribute fields {missing} are not in the header ({', '.join(names)})")
    i_col = names.index("item_id")
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}
    table: list[tuple[int, list[str]]] = []
    unknown = 0
    for number, values in rows:
        row = index.get(values[i_col].strip())
        if row is None:
            unknown += 1
            continue
        table.append((row, values))
        for col, (fname, kind) in enumerate(fields):
            if kind == "float" and values[col].strip():
                _float(values[col].strip(), path, number, fname)
    columns: list[np.ndarray] = []
    feature_names: list[str] = []
    used = []
    for col, (fname, kind) in enumerate(fields):
        if col == i_col or kind == "float_seq" or (wanted is not None and fname not in wanted):
            continue
        if kind == "float":
            # Scaled to [0, 1] over the listed items; unlisted items and empty fields stay 0.
            values = np.zeros(data.n_items + 1, dtype=np.float64)
            listed = [(row, float(vals[col])) for row, vals in table if vals[col].strip()]
            if listed:
                rows_, raw = zip(*listed)
                raw = np.asarray(raw)
                lo, hi = raw.min(), raw.max()
                values[list(rows_)] = (raw - lo) / (hi - lo) if hi > lo else 0.0
            columns.append(values[:, None].astype(np.float32))
            feature_names.append(fname)
        else:
            tokens = [(row, vals[col].split() if kind == "token_seq" else [vals[col].strip()]) for row, vals in table]
            vocab = sorted({t for _, ts in tokens for t in ts if t})
            if wanted is None and len(vocab) > max_vocab:
                data.notes.append(f"{path.name}: skipped field {fname} ({len(vocab)} distinct values > {max_vocab})")
                continue
            position = {t: j for j, t in enumerate(vocab)}
            block = np.zeros((data.n_items + 1, len(vocab)), dtype=np.float32)
            for row, ts in tokens:
                for t in ts:
                    if t:
                        block[row, position[t]] = 1.0
            columns.append(block)
            feature_names += [f"{fname}={t}" for t in vocab]
        used.append(fname)
    if columns:
        data.item_features = np.concatenate(columns, axis=1)
        data.item_features[0] = 0.0
        data.feature_names = feature_names
    data.notes.append(f"{path.name}: item features from {', '.join(used) or 'no field'} "
                      f"({len(feature_names)} columns), {len(table)}/{data.n_items} items listed")
    if unknown:
        data.notes.append(f"{path.name}: ignored {unknown} rows for items that occur in no interaction")


def sniff_format(path: str | Path) -> str:
    """``"recbole"``, ``"pairs"`` or ``"sequences"`` for a dataset path."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".inter":
        return "recbole"
    seen: set[str] = set()
    repeated = False
    for _, text in _lines(path):
        parts = text.split()
        if len(parts) > 3:
            return "sequences"
        repeated = repeated or parts[0] in seen
        seen.add(parts[0])
    # Two or three fields on every line: pairs when a user has several lines, else one line per user.
    return "pairs" if repeated else "sequences"


def read_dataset(path: str | Path, fmt: str = "auto", attributes: str | Path | None = None,
                 name: str | None = None) -> InteractionData:
    """Read ``path`` in the given format (``auto`` sniffs it). For the ``sequences`` format an
    ``<stem>_item2attributes.json`` next to the file is used when ``attributes`` is not given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    fmt = sniff_format(path) if fmt == "auto" else fmt
    if fmt == "recbole":
        return read_recbole(path, name=name)
    if fmt == "pairs":
        return read_pairs(path, name=name)
    if fmt == "sequences":
        if attributes is None:
            guess = path.with_name(f"{path.stem}_item2attributes.json")
            attributes = guess if guess.exists() else None
        return read_sequences(path, attributes, name=name)
    raise ValueError(f"unknown dataset format {fmt!r}; expected auto, pairs, sequences or recbole")
