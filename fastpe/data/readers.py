"""Readers for the dataset formats of sequential recommendation.

Every reader returns an :class:`InteractionData`: per-user item sequences in time order with item
ids remapped to ``1..n_items`` (0 is padding), optional timestamps and optional item features.
Malformed input raises :class:`DataFormatError` naming the file and the line.

Formats:

* ``pairs``: one interaction per line, ``user item`` in time order per user (SASRec.pytorch,
  BERT4Rec preprocessing, JODIE Wikipedia), optionally with more columns: a header line naming
  them (``user_id item_id rating timestamp``) or ``columns`` (``"user,item,rating,timestamp"``
  for MovieLens ``u.data``) says what each is. A third column without either is read as a
  timestamp only when every value looks like Unix time (>= 1e8, i.e. after March 1973); anything
  else (a rating, say) is an error that says how to name it, never a silent re-ordering.
* ``sequences``: one line per user, ``user item item ...`` in time order (S3Rec), with an optional
  ``item2attributes.json`` (``{item: [attribute ids]}``) giving multi-hot item attributes.
* ``recbole``: RecBole atomic files: ``<name>.inter`` (typed header such as
  ``user_id:token item_id:token rating:float timestamp:float``, tab separated) and optionally
  ``<name>.item`` with item attributes (``token``/``token_seq`` fields become multi-hot, ``float``
  fields dense features scaled to [0, 1]).

Blank lines and a leading UTF-8 byte-order mark are skipped everywhere; a header line of column
names (``user_id item_id ...``) is recognised and skipped in pairs and sequences files; a file that
is not UTF-8 text is refused with its name and the byte offset. Attribute entries for items that never occur in the
interactions are ignored and counted in ``InteractionData.notes``; items without attributes get an
all-zero feature row.
"""

from __future__ import annotations

import codecs
import json
import math
import re
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
        # Leave-one-out evaluates users with a training, a validation and a test item (fastpe.data.split).
        short = sum(len(s) < 3 for s in self.sequences)
        return (f"{self.name}: {self.n_users} users, {self.n_items} items, {self.n_interactions} interactions, "
                f"{feats} item features, {time}"
                + (f"; {short} users have fewer than 3 interactions (trained on, not evaluated)" if short else ""))


def _text(path: Path, raw: bytes, number: int | None, offset: int) -> str:
    """``raw`` decoded as UTF-8, or an error naming the file and the byte offset of the first bad byte."""
    where = f"{path}:{number}" if number is not None else str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{where}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at byte offset "
                              f"{offset + exc.start} of the file); is this a binary file?") from None
    nul = text.find("\x00")
    if nul >= 0:
        at = offset + len(text[:nul].encode("utf-8"))
        raise DataFormatError(f"{where}: a NUL byte at byte offset {at} of the file: this is a binary file, not text")
    return text


def _raw_lines(path: Path):
    """``(line_number, text)`` of every line without its line break; a leading BOM is dropped."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start = 0
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                start = len(codecs.BOM_UTF8)
            yield number, _text(path, raw[start:], number, offset + start).rstrip("\r\n")
            offset += len(raw)


def _lines(path: Path):
    """``(line_number, stripped_text)`` of the non-blank lines of a text file."""
    for number, line in _raw_lines(path):
        text = line.strip()
        if text:
            yield number, text


# Header words (lower case, without "_", "-" or a ":type" suffix) -> the column's role.
HEADER_ROLES = {
    **dict.fromkeys(("user", "userid", "uid", "users", "reviewerid", "visitorid", "sessionid"), "user"),
    **dict.fromkeys(("item", "itemid", "iid", "items", "movieid", "productid", "asin", "itemidlist", "itemlist",
                     "sequence", "itemsequence"), "item"),
    **dict.fromkeys(("timestamp", "time", "ts", "date", "datetime", "unixtime", "unixreviewtime"), "timestamp"),
    **dict.fromkeys(("rating", "ratings", "score", "stars", "overall", "label", "count"), "rating"),
}
COLUMN_ROLES = ("user", "item", "timestamp", "rating", "skip")
EPOCH_SECONDS_MIN = 1e8  # Unix time of March 1973: smaller values are ratings, counts or indices, not timestamps


def header_roles(parts: list[str]) -> list[str] | None:
    """The role of each column when ``parts`` is a header line (every field a known column name,
    the first a user), else None."""
    roles = [HEADER_ROLES.get(re.sub(r"[_\-\s]", "", p.split(":")[0].lower())) for p in parts]
    if roles and roles[0] == "user" and "item" in roles and None not in roles:
        return roles
    return None


def parse_columns(columns) -> list[str]:
    """``"user,item,rating,timestamp"`` (or a list) -> the role of each column, checked."""
    roles = [c.strip().lower() for c in (columns.split(",") if isinstance(columns, str) else columns)]
    bad = [c for c in roles if c not in COLUMN_ROLES]
    if bad or roles.count("user") != 1 or roles.count("item") != 1 or roles.count("timestamp") > 1:
        raise ValueError(f"columns: expected the role of each column, one of {', '.join(COLUMN_ROLES)}, with exactly "
                         f"one user and one item column, got {columns!r}")
    return roles


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


def read_pairs(path: str | Path, name: str | None = None, columns: str | list[str] | None = None) -> InteractionData:
    """One interaction per line, ``user item`` in time order for each user, or the columns named by
    a header line or ``columns`` (roles user, item, timestamp, rating, skip; ratings are ignored)."""
    path = Path(path)
    roles = parse_columns(columns) if columns is not None else None
    rows: list[tuple[int, list[str]]] = []
    width = header_at = None
    for number, text in _lines(path):
        parts = text.split()
        if not rows and header_at is None:
            named = header_roles(parts)
            if named is not None:
                header_at = number
                roles = roles or named
                if len(roles) != len(parts):
                    raise DataFormatError(f"{path}:{number}: the header has {len(parts)} columns but --columns names "
                                          f"{len(roles)}")
                width = len(parts)
                continue
        if width is None:
            width = len(roles) if roles is not None else len(parts)
            if roles is None and width not in (2, 3):
                raise DataFormatError(
                    f"{path}:{number}: {len(parts)} columns: expected 'user item' or 'user item timestamp'; say what "
                    "the columns are with --columns, e.g. --columns user,item,rating,timestamp "
                    f"for MovieLens u.data, got {text[:80]!r}")
        if len(parts) != width:
            expected = " ".join(roles) if roles else "user item" + (" timestamp" if width == 3 else "")
            earlier = ("the header" if header_at and not rows else "--columns" if columns is not None
                       else "earlier lines")
            raise DataFormatError(f"{path}:{number}: expected '{expected}' ({width} fields, as {earlier}), got "
                                  f"{len(parts)}: {text[:80]!r}")
        rows.append((number, parts))
    if not rows:
        raise DataFormatError(f"{path}: no interactions (" + ("only a header line)" if header_at else "the file is empty)"))
    if roles is None:
        roles = ["user", "item"] + (["timestamp"] if width == 3 else [])
        if width == 3:
            _check_third_column_is_time(path, rows)
    u_col, i_col = roles.index("user"), roles.index("item")
    t_col = roles.index("timestamp") if "timestamp" in roles else None
    users: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    items = _ItemIndex()
    for number, parts in rows:
        users.setdefault(parts[u_col], []).append(items(parts[i_col]))
        if t_col is not None:
            times.setdefault(parts[u_col], []).append(_float(parts[t_col], path, number, "timestamp"))
    data = _build(name or path.stem, users, items, times if t_col is not None else None)
    if header_at is not None:
        data.notes.append(f"{path.name}: line {header_at} is a header ({', '.join(roles)}), skipped")
    ignored = [r for r in roles if r in ("rating", "skip")]
    if ignored:
        data.notes.append(f"{path.name}: {len(ignored)} column(s) ignored ({', '.join(ignored)})")
    if data.timestamps is not None:
        _sort_by_time(data)
    return data


def _check_third_column_is_time(path: Path, rows) -> None:
    """A bare third column is a timestamp only if every value looks like Unix time."""
    for number, parts in rows:
        try:
            value = float(parts[2])
        except ValueError:
            value = math.nan
        if not (value >= EPOCH_SECONDS_MIN and math.isfinite(value)):
            raise DataFormatError(
                f"{path}:{number}: the third column ({parts[2]!r}) does not look like a Unix timestamp (every value "
                f"should be >= {EPOCH_SECONDS_MIN:.0e}); if it is a rating pass --columns user,item,rating (ignored, "
                "file order kept), if it is a time pass --columns user,item,timestamp")


def read_sequences(path: str | Path, attributes: str | Path | None = None, name: str | None = None) -> InteractionData:
    """One line per user, ``user item item ...`` in time order; optional item2attributes.json."""
    path = Path(path)
    users: dict[str, list[int]] = {}
    first_line: dict[str, int] = {}
    items = _ItemIndex()
    header = None
    for number, text in _lines(path):
        parts = text.split()
        if not users and header is None and header_roles(parts) is not None:
            header = number
            continue
        if len(parts) < 2:
            raise DataFormatError(f"{path}:{number}: expected 'user item item ...' (a user and at least one item), got {text[:80]!r}")
        user = parts[0]
        if user in users:
            raise DataFormatError(f"{path}:{number}: user {user!r} already has a line (line {first_line[user]}); "
                                  "this format holds one line per user (use the 'pairs' format for one interaction per line)")
        first_line[user] = number
        users[user] = [items(i) for i in parts[1:]]
    if not users:
        raise DataFormatError(f"{path}: no interactions (" + ("only a header line)" if header else "the file is empty)"))
    data = _build(name or path.stem, users, items, None)
    if header is not None:
        data.notes.append(f"{path.name}: line {header} is a header, skipped")
    if attributes is not None:
        read_item_attributes_json(attributes, data)
    return data


def read_item_attributes_json(path: str | Path, data: InteractionData) -> InteractionData:
    """Attach multi-hot features from ``{item: [attribute, ...]}`` JSON to ``data`` (in place)."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open: {exc.strerror}") from exc
    bom = len(codecs.BOM_UTF8) if content.startswith(codecs.BOM_UTF8) else 0
    try:
        raw = json.loads(_text(path, content[bom:], None, bom))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON (column {exc.colno}): {exc.msg}") from exc
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
    if raw and not covered:
        data.notes.append(f"warning: {path.name} names none of the items of the interactions (it has "
                          f"{next(iter(raw))!r}, the interactions {data.item_ids[0]!r}): the model gets no attributes; "
                          "is it the file of another data set?")
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
        for n, line in _raw_lines(path):
            if n <= number or not line.strip():
                continue
            values = line.split("\t")
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
    widths: set[int] = set()
    for number, text in _lines(path):
        parts = text.split()
        if not seen and header_roles(parts) is not None:
            # A header naming more than user and item columns belongs to a table of interactions.
            if len(parts) > 2 or "timestamp" in header_roles(parts):
                return "pairs"
            continue
        widths.add(len(parts))
        repeated = repeated or parts[0] in seen
        seen.add(parts[0])
    if max(widths, default=0) > 3:
        # A table (every line as wide, users on several lines: MovieLens u.data) or sequences.
        return "pairs" if repeated and len(widths) == 1 else "sequences"
    # Two or three fields on every line: pairs when a user has several lines, else one line per user.
    return "pairs" if repeated else "sequences"


def read_dataset(path: str | Path, fmt: str = "auto", attributes: str | Path | None = None,
                 name: str | None = None, columns: str | list[str] | None = None) -> InteractionData:
    """Read ``path`` in the given format (``auto`` sniffs it; ``columns`` implies pairs). For the
    ``sequences`` format an ``<stem>_item2attributes.json`` next to the file is used when
    ``attributes`` is not given."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt == "auto":
        fmt = "pairs" if columns is not None and not path.is_dir() and path.suffix != ".inter" else sniff_format(path)
    if columns is not None and fmt != "pairs":
        raise ValueError(f"{path}: --columns describes a pairs file (one interaction per line), but the format is "
                         f"{fmt}")
    if fmt == "recbole":
        return read_recbole(path, name=name)
    if fmt == "pairs":
        return read_pairs(path, name=name, columns=columns)
    if fmt == "sequences":
        if attributes is None:
            guess = path.with_name(f"{path.stem}_item2attributes.json")
            attributes = guess if guess.exists() else None
        return read_sequences(path, attributes, name=name)
    raise ValueError(f"unknown dataset format {fmt!r}; expected auto, pairs, sequences or recbole")
