"""What a run store keeps of each scalar field besides its rows, so that a long run reads fast.

A plot of 10⁶ steps shows a few thousand points, and smoothing one needs every value; read
one SQLite row per step, either costs about 0.1 s per field. So the writer also keeps, for
every scalar field of a plain numeric dtype (what :func:`summarised` accepts):

* a **min–max pyramid**: a level-0 record for each block of ``block_rows`` consecutive rows
  of the field, a level-(k+1) record for each ``factor`` consecutive level-k records. A record
  is the block's lowest and highest value, each with its row (the field's 0, 1, … in step
  order) and step, and the block's last step; NaN counts as neither, an all-NaN block keeps
  NaN. The lowest and highest values of any run of whole blocks are among their records: a
  plot of level k's extremes misses no spike wider apart than its blocks, and reads
  ``rows / (block_rows · factorᵏ)`` records;
* **chunks**: the rows ``chunk_rows`` at a time, their steps (differences, zlib-compressed:
  about 0.1 byte a row when steps are regular) and their values (raw bytes, as the rows hold
  them) as one blob each: reading the field whole reads a few hundred rows, not 10⁶.

Only whole blocks and chunks are written; the rows after them are read from the rows table.
:func:`advance` turns the writer's state and a commit's new rows into what to insert and the
next state; it is pure, so a commit that fails leaves the state as it was.

Example:
  >>> sizes = Sizes(block_rows=2, factor=2, chunk_rows=4)
  >>> state = start(np.dtype("float32"))
  >>> values = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5], np.float32)
  >>> state, chunks, records = advance(state, np.arange(9) * 10, values, sizes)
  >>> for level, block, record in records:  # level, block, lowest (its row), highest (its row)
  ...     print(level, block, record["min"], record["min_row"], record["max"], record["max_row"])
  0 0 1.0 1 3.0 0
  0 1 1.0 3 4.0 2
  0 2 5.0 4 9.0 5
  0 3 2.0 6 6.0 7
  1 0 1.0 1 4.0 2
  1 1 2.0 6 9.0 5
  2 0 1.0 1 9.0 5
  >>> [(block, decode_steps(steps).tolist()) for block, steps, _ in chunks]
  [(0, [0, 10, 20, 30]), (1, [40, 50, 60, 70])]
  >>> state.rows, len(state.chunk_steps)  # the last row waits for its chunk and block
  (9, 1)
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import numpy as np

# Kinds whose values order as numbers: bool, signed and unsigned integers, floats.
_ORDERED_KINDS = "biuf"
# Sizes at most this: a block's or chunk's rows stay far from int64 limits, a chunk in memory.
_MOST = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How a field is summarised; recorded in the run's file, so that readers use the same.

    With the defaults a field of 10⁶ rows has 1953 level-0 records (3906 extremes to plot)
    and 245 chunks; the pyramid costs about 0.15 byte a row, the chunks a row's value and
    about 0.1 byte for its step.
    """

    block_rows: int = 512
    factor: int = 4
    chunk_rows: int = 4096

    def __post_init__(self) -> None:
        for name, least in (("block_rows", 1), ("factor", 2), ("chunk_rows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= _MOST:
                raise ValueError(
                    f"Sizes: {name} must be an integer in [{least}, 2**20], got {value!r}"
                )

    @classmethod
    def from_json(cls, value: Any) -> Sizes:
        """The sizes a file recorded (``dataclasses.asdict``); ``ValueError`` unless valid."""
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(value, dict) or value.keys() != names:
            raise ValueError(f"summary sizes must be a dict of {sorted(names)}, got {value!r}")
        return cls(**value)


DEFAULT_SIZES = Sizes()


def summarised(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether a field of this shape and dtype gets a pyramid and chunks: scalars that order.

    Example:
      >>> summarised((), np.dtype("float32")), summarised((3,), np.dtype("float32"))
      (True, False)
    """
    return shape == () and dtype.kind in _ORDERED_KINDS


def record_dtype(dtype: np.dtype) -> np.dtype:
    """A pyramid record of a field of ``dtype``, as stored (packed, 40 bytes + 2 values)."""
    return np.dtype(
        [("last_step", "<i8"), ("min_row", "<i8"), ("min_step", "<i8"), ("min", dtype),
         ("max_row", "<i8"), ("max_step", "<i8"), ("max", dtype)]
    )  # fmt: skip


def _extremes(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each row of ``low`` is lowest and each row of ``high`` highest, NaN counting as
    neither (the first of ties; of an all-NaN row, its first)."""
    if low.dtype.kind == "f":
        low = np.where(np.isnan(low), np.inf, low)
        high = np.where(np.isnan(high), -np.inf, high)
    return low.argmin(axis=1), high.argmax(axis=1)


def block_records(steps: np.ndarray, values: np.ndarray, first_row: int) -> np.ndarray:
    """A level-0 record for each row of ``values`` (shape (k, size): whole blocks of
    consecutive rows, the first starting at row ``first_row``), at ``steps`` of that shape.

    Example:
      >>> records = block_records(np.array([[0, 2], [4, 6]]), np.array([[1.0, 5], [3, 3]]), 10)
      >>> records[["min_row", "min", "max_row", "max", "last_step"]].tolist()
      [(10, 1.0, 11, 5.0, 2), (12, 3.0, 12, 3.0, 6)]
    """
    blocks = np.arange(len(values))
    records = np.empty(len(values), record_dtype(values.dtype))
    records["last_step"] = steps[:, -1]
    for end, at in zip(("min", "max"), _extremes(values, values), strict=True):
        records[f"{end}_row"] = first_row + blocks * values.shape[1] + at
        records[f"{end}_step"] = steps[blocks, at]
        records[end] = values[blocks, at]
    return records


def merge(groups: np.ndarray) -> np.ndarray:
    """One record for each row of ``groups`` (records, shape (k, size)): the lowest and the
    highest of its records, NaN counting as neither, and its last step.

    Example:
      >>> values = np.array([[2.0], [np.nan], [-1.0], [7.0]])  # four blocks of one row
      >>> merged = merge(block_records(np.arange(4)[:, None], values, 0).reshape(2, 2))
      >>> merged[["min_row", "min", "max_row", "max", "last_step"]].tolist()
      [(0, 2.0, 0, 2.0, 1), (2, -1.0, 3, 7.0, 3)]
    """
    merged = np.empty(len(groups), groups.dtype)
    merged["last_step"] = groups["last_step"][:, -1]
    blocks = np.arange(len(groups))
    for end, at in zip(("min", "max"), _extremes(groups["min"], groups["max"]), strict=True):
        picked = groups[blocks, at]
        for name in (f"{end}_row", f"{end}_step", end):
            merged[name] = picked[name]
    return merged


def encode_steps(steps: np.ndarray) -> bytes:
    """Increasing int64 steps as zlib-compressed differences (the first one from 0)."""
    return zlib.compress(np.diff(steps, prepend=0).astype("<i8").tobytes(), 1)


def decode_steps(blob: bytes) -> np.ndarray:
    """The steps :func:`encode_steps` encoded; ``ValueError`` if ``blob`` is not such."""
    try:
        data = zlib.decompress(blob)
    except zlib.error as e:
        raise ValueError(f"steps of a chunk do not decompress ({e})") from e
    if len(data) % 8:
        raise ValueError(f"steps of a chunk are {len(data)} bytes, not int64s")
    return np.cumsum(np.frombuffer(data, "<i8"), dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class State:
    """The writer's state for one field: its rows so far; the rows not yet in a whole chunk,
    and those not yet in a whole level-0 block; the chunks written; at each level k the
    records not yet in a whole record of level k + 1, and the records each level wrote."""

    rows: int
    chunk_steps: np.ndarray
    chunk_values: np.ndarray
    block_steps: np.ndarray
    block_values: np.ndarray
    chunks: int
    pending: tuple[np.ndarray, ...]
    written: tuple[int, ...]


def start(dtype: np.dtype) -> State:
    """The state of a field with no rows yet."""
    steps, values = np.empty(0, np.int64), np.empty(0, dtype)
    return State(0, steps, values, steps, values, 0, (), (0,))


def _whole(pending: np.ndarray, new: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``pending`` then ``new`` cut into whole blocks of ``size`` (shape (k, size)), the rest."""
    joined = np.concatenate([pending, new])
    whole = len(joined) // size * size
    return joined[:whole].reshape(-1, size), joined[whole:]


def advance(
    state: State, steps: np.ndarray, values: np.ndarray, sizes: Sizes
) -> tuple[State, list[tuple[int, bytes, bytes]], list[tuple[int, int, np.void]]]:
    """Take a field's new rows (``steps`` increasing, after the state's): the next state, the
    chunks completed (``(block, steps blob, values blob)``) and the pyramid records completed
    (``(level, block, record)``, level by level)."""
    steps = np.asarray(steps, np.int64)
    values = np.asarray(values, state.chunk_values.dtype)
    chunk_steps, rest_steps = _whole(state.chunk_steps, steps, sizes.chunk_rows)
    chunk_values, rest_values = _whole(state.chunk_values, values, sizes.chunk_rows)
    chunks = [
        (state.chunks + i, encode_steps(s), v.tobytes())
        for i, (s, v) in enumerate(zip(chunk_steps, chunk_values, strict=True))
    ]
    block_steps, rest_block_steps = _whole(state.block_steps, steps, sizes.block_rows)
    block_values, rest_block_values = _whole(state.block_values, values, sizes.block_rows)
    new = block_records(block_steps, block_values, state.rows - len(state.block_steps))
    records = [(0, state.written[0] + i, record) for i, record in enumerate(new)]
    pending, written = [], [state.written[0] + len(new)]
    level = 0  # merging level's records into level + 1's
    while level < len(state.pending) or len(new):
        below = state.pending[level] if level < len(state.pending) else new[:0]
        groups, rest = _whole(below, new, sizes.factor)
        new = merge(groups) if len(groups) else new[:0]
        done = state.written[level + 1] if level + 1 < len(state.written) else 0
        records += [(level + 1, done + i, record) for i, record in enumerate(new)]
        pending.append(rest)
        written.append(done + len(new))
        level += 1
    next_state = State(
        state.rows + len(steps), rest_steps, rest_values, rest_block_steps, rest_block_values,
        state.chunks + len(chunks), tuple(pending), tuple(written),
    )  # fmt: skip
    return next_state, chunks, records
