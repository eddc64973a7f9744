"""Leave-one-out split, context (time) features, padding and the batches the trainer consumes.

Split (per user, interactions in time order): the last item is the test target, the second-to-last
the validation target, the rest is training. Users with fewer than 3 interactions keep everything
for training and are not evaluated (a user with 2 interactions still gives one training pair
``item1 -> item2``; a user with 1 gives none). Validation profiles are the training items; test
profiles are the training items plus the validation item.

Sequences are left-padded with 0 to a fixed length ``max_len`` and truncated to their most
recent ``max_len`` items, so the most recent item is always last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastpe.data.readers import InteractionData

TIME_FEATURES = ("year", "month", "day", "weekday", "hour", "minute")


def time_features(timestamps: np.ndarray, year_range: tuple[int, int] | None = None) -> np.ndarray:
    """``[n, 6]`` float32 in [0, 1] from Unix seconds (UTC): year (scaled over ``year_range``),
    month, day of month, weekday (Monday = 0), hour, minute."""
    seconds = np.asarray(timestamps, dtype=np.float64).astype(np.int64).astype("datetime64[s]")
    years = seconds.astype("datetime64[Y]")
    months = seconds.astype("datetime64[M]")
    days = seconds.astype("datetime64[D]")
    year = years.astype(np.int64) + 1970
    if year_range is None:
        year_range = (int(year.min()), int(year.max())) if len(year) else (1970, 1970)
    lo, hi = year_range
    out = np.empty((len(seconds), 6), dtype=np.float32)
    out[:, 0] = (year - lo) / (hi - lo) if hi > lo else 0.0
    out[:, 1] = (months - years).astype(np.int64) / 11.0
    out[:, 2] = (days - months).astype(np.int64) / 30.0
    out[:, 3] = ((days.astype(np.int64) + 3) % 7) / 6.0  # 1970-01-01 was a Thursday
    out[:, 4] = (seconds - days).astype("timedelta64[h]").astype(np.int64) / 23.0
    out[:, 5] = (seconds - seconds.astype("datetime64[h]")).astype("timedelta64[m]").astype(np.int64) / 59.0
    return out


@dataclass
class Split:
    """Leave-one-out view of an :class:`InteractionData`."""

    data: InteractionData
    n_train: np.ndarray  # [U] training interactions per user
    eval_users: np.ndarray  # users with a validation and a test target (>= 3 interactions)
    context: list[np.ndarray] | None  # per user [n, 6] time features, or None without timestamps

    @property
    def n_items(self) -> int:
        return self.data.n_items

    @property
    def context_dim(self) -> int:
        return 0 if self.context is None else len(TIME_FEATURES)

    @property
    def feature_dim(self) -> int:
        return 0 if self.data.item_features is None else self.data.item_features.shape[1]

    def train_sequence(self, user: int) -> np.ndarray:
        return self.data.sequences[user][: self.n_train[user]]

    def train_users(self) -> np.ndarray:
        """Users with at least one training pair (2+ training interactions)."""
        return np.flatnonzero(self.n_train >= 2)

    def stage_index(self, stage: str, user: int) -> int:
        """Index of the target interaction of ``stage`` ("valid" or "test") in the user's sequence."""
        n = len(self.data.sequences[user])
        if stage == "valid":
            return n - 2
        if stage == "test":
            return n - 1
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")


def leave_one_out(data: InteractionData) -> Split:
    lengths = np.array([len(s) for s in data.sequences], dtype=np.int64)
    evaluated = lengths >= 3
    n_train = np.where(evaluated, lengths - 2, lengths)
    context = None
    if data.timestamps is not None:
        every = np.concatenate(data.timestamps) if data.timestamps else np.zeros(1)
        years = every.astype(np.int64).astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
        year_range = (int(years.min()), int(years.max()))
        context = [time_features(ts, year_range) for ts in data.timestamps]
    return Split(data, n_train, np.flatnonzero(evaluated), context)


def pad_left(sequences: list[np.ndarray], max_len: int, fill=0, dtype=np.int64) -> np.ndarray:
    """``[len(sequences), max_len, ...]``: each sequence truncated to its last ``max_len`` entries
    and left-padded with ``fill``."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    tail = () if not sequences else np.asarray(sequences[0]).shape[1:]
    out = np.full((len(sequences), max_len, *tail), fill, dtype=dtype)
    for row, seq in enumerate(sequences):
        seq = np.asarray(seq)[-max_len:]
        if len(seq):
            out[row, max_len - len(seq):] = seq
    return out


@dataclass
class Batch:
    """Numpy arrays of one training batch; ``targets`` is ``[B, T]`` (T = 1 or max_len), 0 = none."""

    items: np.ndarray  # [B, L] int64
    targets: np.ndarray  # [B, T] int64
    context: np.ndarray | None = None  # [B, L, C] float32
    target_context: np.ndarray | None = None  # [B, T, C] float32
    times: np.ndarray | None = None  # [B, L] float64 timestamps of the items (0 at padding)

    def __len__(self) -> int:
        return len(self.items)

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows ``[start, stop)`` (views): one process's shard of a data-parallel batch."""
        def cut(a):
            return None if a is None else a[start:stop]

        return Batch(cut(self.items), cut(self.targets), cut(self.context), cut(self.target_context), cut(self.times))


def training_examples(split: Split, users: np.ndarray, max_len: int, mode: str, rng: np.random.Generator) -> Batch:
    """Training rows for ``users``.

    ``mode="all"`` (causal encoders): input = training items but the last, targets = the next item
    at every position. ``mode="prefix"`` (bidirectional encoders, which must not see the target):
    one random cut per user, input = the items before the cut, target = the item at the cut.
    """
    items, targets, ctx, tctx, times = [], [], [], [], []
    stamps = split.data.timestamps
    for u in users:
        seq = split.train_sequence(u)
        c = split.context[u][: len(seq)] if split.context is not None else None
        if mode == "all":
            items.append(seq[:-1])
            targets.append(seq[1:])
            if stamps is not None:
                times.append(stamps[u][: len(seq) - 1])
            if c is not None:
                ctx.append(c[:-1])
                tctx.append(c[1:])
        elif mode == "prefix":
            cut = int(rng.integers(1, len(seq)))
            items.append(seq[:cut])
            targets.append(seq[cut:cut + 1])
            if stamps is not None:
                times.append(stamps[u][:cut])
            if c is not None:
                ctx.append(c[:cut])
                tctx.append(c[cut:cut + 1])
        else:
            raise ValueError(f"mode must be 'all' or 'prefix', got {mode!r}")
    width = max_len if mode == "all" else 1
    batch = Batch(pad_left(items, max_len), pad_left(targets, width))
    if split.context is not None:
        batch.context = pad_left(ctx, max_len, 0.0, np.float32)
        batch.target_context = pad_left(tctx, width, 0.0, np.float32)
    if stamps is not None:
        batch.times = pad_left(times, max_len, 0.0, np.float64)
    return batch


def pad_batch(batch: Batch, size: int) -> Batch:
    """Append all-padding rows up to ``size`` rows (static shapes; such rows have no targets)."""
    extra = size - len(batch)
    if extra < 0:
        raise ValueError(f"batch has {len(batch)} rows, more than {size}")
    if extra == 0:
        return batch

    def grow(a):
        return None if a is None else np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])

    return Batch(grow(batch.items), grow(batch.targets), grow(batch.context), grow(batch.target_context),
                 grow(batch.times))


def epoch_batches(split: Split, batch_size: int, max_len: int, mode: str, rng: np.random.Generator,
                  samples_per_user: int = 1):
    """Yield fixed-size :class:`Batch` es covering every training user ``samples_per_user`` times
    in a random order; the last batch is padded with empty rows."""
    users = np.repeat(split.train_users(), samples_per_user)
    users = users[rng.permutation(len(users))]
    for start in range(0, len(users), batch_size):
        yield pad_batch(training_examples(split, users[start:start + batch_size], max_len, mode, rng), batch_size)


def n_batches(split: Split, batch_size: int, samples_per_user: int = 1) -> int:
    return -(-len(split.train_users()) * samples_per_user // batch_size)


@dataclass
class EvalSet:
    """Profiles and targets of one evaluation stage, one row per evaluated user."""

    users: np.ndarray
    items: np.ndarray  # [U, L] profiles
    targets: np.ndarray  # [U]
    context: np.ndarray | None  # [U, L, C]
    target_context: np.ndarray | None  # [U, C]
    history: list[np.ndarray]  # per user, the items before the target (the full profile, untruncated)
    known: list[np.ndarray]  # per user, every item the user interacted with
    times: np.ndarray | None = None  # [U, L] float64 timestamps of the profiles (0 at padding)


def eval_set(split: Split, stage: str, max_len: int, users: np.ndarray | None = None) -> EvalSet:
    users = split.eval_users if users is None else np.asarray(users)
    items, targets, ctx, tctx, history, known, times = [], [], [], [], [], [], []
    stamps = split.data.timestamps
    for u in users:
        seq = split.data.sequences[u]
        t = split.stage_index(stage, u)
        history.append(seq[:t])
        known.append(seq)
        items.append(seq[:t])
        targets.append(seq[t])
        if stamps is not None:
            times.append(stamps[u][:t])
        if split.context is not None:
            ctx.append(split.context[u][:t])
            tctx.append(split.context[u][t])
    c = pad_left(ctx, max_len, 0.0, np.float32) if split.context is not None else None
    tc = np.stack(tctx).astype(np.float32) if split.context is not None and len(tctx) else None
    ts = pad_left(times, max_len, 0.0, np.float64) if stamps is not None else None
    return EvalSet(users, pad_left(items, max_len), np.asarray(targets, dtype=np.int64), c, tc, history, known, ts)


def sample_eval_negatives(eval_data: EvalSet, n_items: int, n_negatives: int, rng: np.random.Generator):
    """Candidates ``[U, 1 + n]`` in a random order per user and the column of the positive.

    Negatives are distinct and drawn uniformly from the items the user never interacted with
    (fewer when the catalogue has fewer such items than ``n``: the row is padded with 0, which
    the evaluation ignores).
    """
    rows, positive = [], []
    for target, known in zip(eval_data.targets, eval_data.known):
        excluded = set(known.tolist()) | {int(target)}
        available = n_items - len(excluded)
        want = min(n_negatives, max(available, 0))
        chosen: list[int] = []
        seen = set()
        while len(chosen) < want:
            for i in rng.integers(1, n_items + 1, size=2 * (want - len(chosen)) + 8).tolist():
                if i not in excluded and i not in seen:
                    seen.add(i)
                    chosen.append(i)
                    if len(chosen) == want:
                        break
        row = np.zeros(1 + n_negatives, dtype=np.int64)
        row[0] = target
        row[1:1 + want] = chosen
        order = rng.permutation(1 + want)  # padding columns stay at the end
        row[: 1 + want] = row[: 1 + want][order]
        rows.append(row)
        positive.append(int(np.flatnonzero(order == 0)[0]))
    return np.stack(rows) if rows else np.zeros((0, 1 + n_negatives), dtype=np.int64), np.asarray(positive, dtype=np.int64)
