"""Durable run store: one SQLite file per run, readable while it is written.

A runs directory holds one subdirectory per run, each with a ``run.sqlite``: the run's
metadata, its field layout (name, shape, dtype) and the value of every field at every
tracked step. The file is in WAL mode with ``synchronous=NORMAL``: a commit survives the
writing process being killed (not a power cut), and readers in other processes see every
committed step without blocking the writer. ``RunWriter`` commits in batches, at most every
``commit_every`` seconds, so a killed run loses at most the steps appended since its last
commit.

Layout of the file (format ``lmd4ml-run``, version 2):

* ``meta(key, value)``: JSON values for ``format``, ``version``, ``start_time``,
  ``end_time`` (Unix seconds), ``status``, ``metadata`` (the caller's dict), for a run
  whose recording stopped early ``error`` (why), and the notes written at its end
  (:data:`NOTES`: ``findings``, ``lm.diagnose``'s findings as dicts);
* ``fields(idx, name, shape, dtype)``: the layout, in the writer's order;
* ``steps(step, time)``: every appended step and its wall time (Unix seconds); version 1
  files, which kept no clock, have ``steps(step)`` alone and still open;
* ``v<idx>(step, value)``: one table per field, the value's raw bytes (C order, the
  layout's dtype and shape); a step the caller left the field out of has no row;
* for each scalar field of a numeric dtype, what reads a long run fast
  (:mod:`lmd4ml.telemetry.summaries`, its sizes in ``meta`` as ``summaries``):
  ``m<idx>(level, block, data)``, its min–max pyramid, and ``c<idx>(block, steps, data)``,
  its rows in chunks. Files without them (older ones) read as before, from ``v<idx>``.

Example:
  >>> import tempfile, numpy as np
  >>> runs = tempfile.mkdtemp()
  >>> fields = {"loss": ((), np.float32), "hist": ((3,), np.int32)}
  >>> with RunWriter(new_run_dir(runs, "demo"), {"lr": 0.1}, fields) as writer:
  ...     for step in range(4):
  ...         writer.append(step, {"loss": 1.0 / (step + 1), "hist": [step, 0, 1]})
  >>> run = load_run(f"{runs}/demo")
  >>> run.metadata["lr"], run.metadata["status"], run.keys
  (0.1, 'finished', ['loss', 'hist'])
  >>> steps, values = run["hist"]
  >>> steps.tolist(), values.shape, values.dtype
  ([0, 1, 2, 3], (4, 3), dtype('int32'))
  >>> [(r["name"], r["n_steps"]) for r in list_runs(runs)]
  [('demo', 4)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import os
import pathlib
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lmd4ml import checks
from lmd4ml.telemetry import summaries
from lmd4ml.telemetry.summaries import Sizes

FORMAT = "lmd4ml-run"
VERSION = 2
# The first version whose steps table keeps each step's wall time.
_CLOCK_VERSION = 2
DB_NAME = "run.sqlite"
_RUN_KEYS = ("format", "version", "start_time", "end_time", "status")
# How a run can end; "running" is its status until then (or forever, if it was killed).
# "incomplete": its file failed (disk full, deleted) and recording stopped before the run
# ended; its "error" says why and from which step.
STATUSES = ("finished", "failed", "interrupted", "incomplete")

# name -> (index in the file, shape, dtype)
Layout = dict[str, tuple[int, tuple[int, ...], np.dtype]]

# Keys the store itself puts in a run's metadata (and list_runs adds); the caller's dict
# may not use them, so that nothing it passes is silently replaced.
NOTES = ("findings",)
"""What a run's writer may add to its meta table at the end (:meth:`RunWriter.note`)."""
RESERVED_KEYS = frozenset(
    {"format", "version", "start_time", "end_time", "status", "error", "path", "name", "n_steps",
     *NOTES}
)  # fmt: skip

# The parameters a statement takes in SQLite before 3.32.
_PARAMS_PER_INSERT = 999

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE fields (idx INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    " shape TEXT NOT NULL, dtype TEXT NOT NULL)",
    "CREATE TABLE steps (step INTEGER PRIMARY KEY, time REAL NOT NULL)",
)


class RunStoreError(ValueError):
    """A path that is not a readable lmd4ml run: missing, damaged or foreign."""


def default_run_name() -> str:
    """A new run's name: ``YYYYmmdd-HHMMSS-xxxx``, local time and a random suffix, so that
    names sort by start time.

    Example:
      >>> len(default_run_name())
      20
    """
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def plain_name(name: object) -> bool:
    """Whether ``name`` names a directory right inside another: a string, not empty, ``.``
    or ``..``, without a slash, backslash or NUL.

    Example:
      >>> plain_name("baseline"), plain_name("../x"), plain_name(""), plain_name(3)
      (True, False, False, False)
    """
    return isinstance(name, str) and name not in ("", ".", "..") and not re.search(r"[/\\\0]", name)


def new_run_dir(runs_dir: str | os.PathLike, name: str | None = None) -> pathlib.Path:
    """Create and return a fresh run directory ``runs_dir/<name>``.

    Without a name it is a :func:`default_run_name`, so directory listings sort by start
    time. An existing name raises ``FileExistsError``.

    Example:
      >>> import tempfile
      >>> new_run_dir(tempfile.mkdtemp(), "baseline").name
      'baseline'
    """
    runs_dir = pathlib.Path(runs_dir)
    if name is not None and not plain_name(name):
        raise ValueError(f"new_run_dir: name must be a plain directory name, got {name!r}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        path = runs_dir / (name or default_run_name())
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if name is not None:
                raise


def _json_default(value: Any) -> Any:
    """Numpy values as plain Python; anything else as its repr rather than failing a run."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def as_stored(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata`` as a run's store keeps it and gives it back: through JSON.

    Example:
      >>> as_stored({"sizes": (2, 3), "lr": np.float32(0.5), "tx": print})
      {'sizes': [2, 3], 'lr': 0.5, 'tx': '<built-in function print>'}
    """
    return json.loads(_dumps(dict(metadata)))


def _connect(path: pathlib.Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened and committed explicitly by _transaction.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        # SQLite rolls back by itself on some errors (a full disk): a second ROLLBACK would
        # raise "no transaction is active" in place of the error that matters.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _identity(path: pathlib.Path) -> tuple[int, int]:
    """Device and inode: which file ``path`` names now."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _insert(conn: sqlite3.Connection, table: str, rows: list[tuple]) -> None:
    """Insert ``rows`` a few hundred per statement. ``executemany`` steps SQLite once per row
    and hands the GIL back and forth each time: behind a busy training thread, that took
    seconds for a second's steps, and the writer fell ever further behind."""
    per_statement = _PARAMS_PER_INSERT // len(rows[0]) if rows else 1
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        marks = ",".join(["(" + ",".join("?" * len(chunk[0])) + ")"] * len(chunk))
        conn.execute(f"INSERT INTO {table} VALUES {marks}", [v for row in chunk for v in row])


def _initialise(
    conn: sqlite3.Connection, layout: Layout, metadata: Mapping[str, Any], sizes: Sizes | None
) -> None:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "start_time": time.time(),
        "end_time": None,
        "status": "running",
        "metadata": dict(metadata),
    }
    if sizes is not None:
        meta["summaries"] = dataclasses.asdict(sizes)
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, _dumps(v)) for k, v in meta.items()])
    for name, (idx, shape, dtype) in layout.items():
        conn.execute(
            "INSERT INTO fields VALUES (?, ?, ?, ?)", (idx, name, json.dumps(shape), dtype.str)
        )
        conn.execute(f"CREATE TABLE v{idx} (step INTEGER PRIMARY KEY, value BLOB NOT NULL)")
        if sizes is not None and summaries.summarised(shape, dtype):
            conn.execute(
                f"CREATE TABLE m{idx} (level INTEGER, block INTEGER, data BLOB NOT NULL,"
                " PRIMARY KEY (level, block)) WITHOUT ROWID"
            )
            conn.execute(
                f"CREATE TABLE c{idx} (block INTEGER PRIMARY KEY, steps BLOB NOT NULL,"
                " data BLOB NOT NULL)"
            )


class RunWriter:
    """Append the values of tracked steps to a new ``run.sqlite`` in ``run_dir``.

    ``fields`` maps each field name to ``(shape, dtype)``; ``append`` takes any subset of
    them per step, as arrays (or scalars, JAX arrays) cast to that dtype. Steps must
    increase. Appends are buffered and committed once ``commit_every`` seconds have passed
    since the last commit, and on ``flush`` and ``close``. One thread at a time.

    A commit raises what keeps it from the file (``sqlite3.OperationalError`` for a full
    disk, ``RunStoreError`` once the file was deleted or replaced: SQLite would go on
    writing into the unlinked one) and keeps the steps buffered; ``abandon`` then ends the
    run as ``"incomplete"``, keeping every step committed before.

    Used as a context manager it closes the run as ``"failed"`` when the block raises and
    ``"finished"`` otherwise.

    Scalar fields also get a min–max pyramid and chunks of their rows, sized by
    ``summarise`` (:mod:`lmd4ml.telemetry.summaries`; ``None``: none, as older files), so
    that ``Run.outline`` and reading them whole cost a few thousand rows at any length.

    Example:
      >>> import tempfile
      >>> writer = RunWriter(tempfile.mkdtemp(), {}, {"loss": ((), "float32")})
      >>> writer.append(0, {"loss": 0.5})
      >>> writer.close(); writer.close()
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        metadata: Mapping[str, Any],
        fields: Mapping[str, tuple[tuple[int, ...], Any]],
        commit_every: float = 1.0,
        summarise: Sizes | None = summaries.DEFAULT_SIZES,
    ):
        reserved = sorted(RESERVED_KEYS.intersection(metadata))
        if reserved:
            raise ValueError(f"RunWriter: metadata may not use the store's keys {reserved}")
        self.layout: Layout = {
            name: (idx, tuple(int(n) for n in shape), np.dtype(dtype))
            for idx, (name, (shape, dtype)) in enumerate(fields.items())
        }
        self.path = pathlib.Path(run_dir) / DB_NAME
        if self.path.exists():
            raise FileExistsError(
                f"RunWriter: {self.path} already exists; runs are never overwritten"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.commit_every = commit_every
        self._sizes = summarise
        self._summaries = {
            idx: summaries.start(dtype)
            for idx, shape, dtype in self.layout.values()
            if summarise is not None and summaries.summarised(shape, dtype)
        }
        self._buffer: dict[int, list[tuple[int, bytes]]] = {
            i: [] for i, _, _ in self.layout.values()
        }
        self._steps: list[tuple[int, float]] = []
        self._last_step: int | None = None
        # The file is built under another name and renamed into place, so that a reader
        # never finds a half-initialised run.
        staging = self.path.with_name(f".{DB_NAME}.{secrets.token_hex(4)}")
        try:
            conn = _connect(staging)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                with _transaction(conn):
                    _initialise(conn, self.layout, metadata, summarise)
            finally:
                conn.close()
            os.replace(staging, self.path)
        except BaseException:
            # A start that failed (a full disk) leaves no half-built file behind.
            for suffix in ("", "-wal", "-shm", "-journal"):
                staging.with_name(staging.name + suffix).unlink(missing_ok=True)
            raise
        self._conn: sqlite3.Connection | None = _connect(self.path)
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._identity = _identity(self.path)
        self._last_commit = time.monotonic()

    def append(self, step: int, values: Mapping[str, Any], wall_time: float | None = None) -> None:
        """Buffer the values of one step, taken at ``wall_time`` (Unix seconds, default now);
        commit if ``commit_every`` seconds have passed."""
        if self._conn is None:
            raise ValueError(f"RunWriter: {self.path} is closed")
        step = int(step)
        wall_time = time.time() if wall_time is None else float(wall_time)
        if not math.isfinite(wall_time):
            raise ValueError(f"RunWriter: wall_time of step {step} is {wall_time}, not a time")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"RunWriter: step {step} after step {self._last_step}; steps must increase"
            )
        if not values.keys() <= self.layout.keys():
            unknown = sorted(set(values) - self.layout.keys())
            raise ValueError(f"RunWriter: fields {unknown} not in the layout {list(self.layout)}")
        rows = []
        for name, value in values.items():
            idx, shape, dtype = self.layout[name]
            array = np.asarray(value, dtype=dtype)
            if array.shape != shape:
                raise ValueError(
                    f"RunWriter: field {name!r} has shape {array.shape}, layout says {shape}"
                )
            rows.append((idx, array.tobytes()))
        # Buffered only once every value is valid, so a rejected step leaves nothing behind.
        for idx, blob in rows:
            self._buffer[idx].append((step, blob))
        self._steps.append((step, wall_time))
        self._last_step = step
        if time.monotonic() - self._last_commit >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit every buffered step."""
        if self._conn is None:
            raise ValueError(f"RunWriter: {self.path} is closed")
        if not self._file_is_ours():
            raise RunStoreError(f"{self.path}: deleted or replaced while the run was writing it")
        if self._steps:
            states = {}
            # Unpacked in C (itemgetter): a generator's frame per row cost a third more.
            steps = np.fromiter(map(operator.itemgetter(0), self._steps), np.int64)
            with _transaction(self._conn) as conn:
                _insert(conn, "steps", self._steps)
                for idx, rows in self._buffer.items():
                    _insert(conn, f"v{idx}", rows)
                    if idx in self._summaries:
                        # A field with a row at every step has the steps' steps.
                        of = steps if len(rows) == len(steps) else None
                        states[idx] = self._summarise(conn, idx, rows, of)
            # Only once committed: a commit that failed leaves the summaries where they were.
            self._summaries = states
            self._steps.clear()
            for rows in self._buffer.values():
                rows.clear()
        self._last_commit = time.monotonic()

    def _summarise(
        self,
        conn: sqlite3.Connection,
        idx: int,
        rows: list[tuple[int, bytes]],
        steps: np.ndarray | None,
    ) -> summaries.State:
        """Insert what field ``idx``'s new ``rows`` (at ``steps``, if known) complete of its
        chunks and pyramid; its summaries' next state."""
        assert self._sizes is not None  # fields are summarised only with sizes
        state = self._summaries[idx]
        if steps is None:
            steps = np.fromiter(map(operator.itemgetter(0), rows), np.int64, len(rows))
        values = np.frombuffer(
            b"".join(map(operator.itemgetter(1), rows)), state.chunk_values.dtype
        )
        state, chunks, records = summaries.advance(state, steps, values, self._sizes)
        _insert(conn, f"c{idx}", chunks)
        _insert(
            conn, f"m{idx}", [(level, block, record.tobytes()) for level, block, record in records]
        )
        return state

    def _file_is_ours(self) -> bool:
        """Whether ``path`` still names the file this writer opened."""
        try:
            return _identity(self.path) == self._identity
        except FileNotFoundError:
            return False

    def _end(self, status: str, error: str | None = None) -> None:
        assert self._conn is not None
        ending = {"status": status, "end_time": time.time()}
        if error is not None:
            ending["error"] = error
        with _transaction(self._conn) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(key, _dumps(value)) for key, value in ending.items()],
            )

    def note(self, notes: Mapping[str, Any]) -> None:
        """Record ``notes`` (keys of :data:`NOTES`, JSON values) in the run's meta table, at
        once; a reader finds them in ``run.metadata``.

        Example:
          >>> import tempfile
          >>> writer = RunWriter(tempfile.mkdtemp(), {}, {"loss": ((), "float32")})
          >>> writer.note({"findings": []}); writer.close()
          >>> load_run(writer.path.parent).metadata["findings"]
          []
        """
        if self._conn is None:
            raise ValueError(f"RunWriter: {self.path} is closed")
        unknown = sorted(set(notes) - set(NOTES))
        if unknown:
            raise ValueError(f"RunWriter.note: {unknown} are not notes; notes are {NOTES}")
        if not self._file_is_ours():
            raise RunStoreError(f"{self.path}: deleted or replaced while the run was writing it")
        with _transaction(self._conn) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(key, _dumps(value)) for key, value in notes.items()],
            )

    def close(self, status: str = "finished") -> None:
        """Commit what is buffered, record ``status`` and the end time; later calls do nothing."""
        if status not in STATUSES:
            raise ValueError(f"RunWriter.close: status must be one of {STATUSES}, got {status!r}")
        if self._conn is None:
            return
        try:
            self.flush()
            self._end(status)
        finally:
            self._conn.close()
            self._conn = None

    def abandon(self, error: str) -> bool:
        """End the run after its file failed: drop the steps not committed, record status
        ``"incomplete"`` and ``error`` where the file still takes them (a full disk may not,
        a deleted or replaced file is left alone), and close. Whether it recorded them;
        never raises."""
        if self._conn is None:
            return False
        self._steps.clear()
        for rows in self._buffer.values():
            rows.clear()
        try:
            if self._file_is_ours():
                self._end("incomplete", error)
                return True
            # The write-ahead log beside the path is still this writer's: emptied into the file
            # it opened, or readers of a file put at the path would read it as that one's.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return False
        except (OSError, sqlite3.Error):
            return False  # what was committed before is the run
        finally:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("failed" if exc_type is not None else "finished")


class Run:
    """A stored run, as returned by ``load_run``.

    ``metadata``, ``keys``, ``shapes`` and ``dtypes`` (of each key's value at one step) are
    read once; ``run[key]``, ``values``, ``outline``, ``thin``, ``steps()`` and ``times()``
    read the file on every call, so a run that is still being written shows every step
    committed so far.
    """

    def __init__(
        self,
        db: pathlib.Path,
        metadata: dict,
        layout: Layout,
        sizes: Sizes | None = None,
        summarised: frozenset[str] = frozenset(),
    ):
        self.path = db.parent
        self.metadata = metadata
        self.keys = list(layout)
        self.shapes = {key: shape for key, (_, shape, _) in layout.items()}
        self.dtypes = {key: dtype for key, (_, _, dtype) in layout.items()}
        self._db = db
        self._layout = layout
        self._sizes = sizes
        self._summarised = summarised  # the keys with a pyramid and chunks

    def __getitem__(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``: int64 steps of shape (n,), values of shape (n, *shape)."""
        self._table(key)
        with _snapshot(self._db) as conn:
            return self._whole(conn, key)

    def values(self, key: str) -> np.ndarray:
        """``run[key]``'s values alone; for a long scalar field, faster: its chunks' steps are
        not decoded.

        Example:
          >>> import tempfile
          >>> with RunWriter(tempfile.mkdtemp(), {}, {"x": ((), "int64")}) as writer:
          ...     writer.append(0, {"x": 7})
          >>> load_run(writer.path).values("x").tolist()
          [7]
        """
        self._table(key)
        with _snapshot(self._db) as conn:
            return self._whole(conn, key, with_steps=False)[1]

    def _whole(
        self, conn: sqlite3.Connection, key: str, with_steps: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every row of ``key``: its chunks, then the rows after them. ``with_steps=False``
        decodes only the last chunk's steps (decoding costs more than reading them): the
        steps returned are then those of that chunk and the rows after."""
        if key not in self._summarised:
            return self._rows(conn, key)
        assert self._sizes is not None  # keys are summarised only with sizes
        idx, _, dtype = self._layout[key]
        size = self._sizes.chunk_rows
        # Row by row: group_concat copies a growing buffer of megabytes over and over.
        chunks = conn.execute(f"SELECT block, data FROM c{idx} ORDER BY block").fetchall()
        if [block for block, _ in chunks] != list(range(len(chunks))):
            raise RunStoreError(f"{self._db}: damaged, the chunks of {key!r} are not 0, 1, …")
        decoded = len(chunks) if with_steps else min(1, len(chunks))
        steps = self._chunk_steps(conn, key, len(chunks) - decoded)
        if len(steps) != decoded * size or any(len(d) != size * dtype.itemsize for _, d in chunks):
            raise RunStoreError(f"{self._db}: damaged, a chunk of {key!r} is not {size} rows")
        since = int(steps[-1]) + 1 if len(steps) else None
        after_steps, after_values = self._rows(conn, key, since)
        values = np.empty(len(chunks) * size + len(after_values), dtype)
        for i, (_, data) in enumerate(chunks):  # each copied once, into place
            values[i * size : (i + 1) * size] = np.frombuffer(data, dtype)
        values[len(chunks) * size :] = after_values
        return np.concatenate([steps, after_steps]), values

    def _chunk_steps(self, conn: sqlite3.Connection, key: str, first: int) -> np.ndarray:
        """The steps of ``key``'s chunks from block ``first`` on, checked to increase."""
        blobs = conn.execute(
            f"SELECT steps FROM c{self._layout[key][0]} WHERE block >= ? ORDER BY block", (first,)
        ).fetchall()
        steps = np.concatenate(
            [np.empty(0, np.int64), *(summaries.decode_steps(blob) for (blob,) in blobs)]
        )
        if np.any(steps[1:] <= steps[:-1]):
            raise RunStoreError(f"{self._db}: damaged, the chunks of {key!r} go back in steps")
        return steps

    def _rows(
        self, conn: sqlite3.Connection, key: str, since: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``key`` at steps from ``since`` on (by default all), in step order."""
        where, bound = ("", ()) if since is None else (" WHERE step >= ?", (since,))
        # Concatenated by SQLite: fetching a Python row per step costs about 1 µs each.
        steps, data = conn.execute(
            f"SELECT group_concat(step), group_concat(value, '') FROM {self._table(key)}{where}",
            bound,
        ).fetchone()
        steps, values = self._arrays(key, _integers(steps), data or b"")
        # A table is scanned in step order (rowid order), which SQL does not promise.
        if np.any(steps[1:] < steps[:-1]):
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
        return steps, values

    def outline(self, key: str, blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A scalar field thinned for a plot, its spikes kept: ``(steps, values, rows)`` of its
        first and last rows and of the lowest and the highest of each of at least ``blocks``
        runs of consecutive rows (NaN counts as neither); ``rows`` are their indices among the
        field's rows (0, 1, …), increasing. Read from the field's min–max pyramid: the level
        with between ``blocks`` and ``factor · blocks`` blocks, the finest after it, the rows
        after those; every row while there are fewer than ``blocks`` blocks of
        ``Sizes.block_rows``, or when the file keeps no pyramid of the field.

        Example:
          >>> import tempfile
          >>> sizes = Sizes(block_rows=4, factor=2, chunk_rows=8)
          >>> with RunWriter(tempfile.mkdtemp(), {}, {"x": ((), "int64")}, summarise=sizes) as w:
          ...     for step in range(50):
          ...         w.append(step, {"x": 1000 if step == 21 else step % 4})
          >>> steps, values, rows = load_run(w.path).outline("x", 3)  # 3 blocks of 16 rows
          >>> steps.tolist()  # the first, each block's lowest and highest, the rows after
          [0, 3, 16, 21, 32, 35, 47, 48, 49]
          >>> values.tolist()
          [0, 3, 0, 1000, 0, 3, 3, 0, 1]
        """
        checks.check_int("Run.outline: blocks", blocks, 1)
        self._table(key)  # a KeyError naming the run's keys
        if self.shapes[key] != ():
            raise ValueError(f"Run.outline: {key!r} has shape {self.shapes[key]}, not a scalar")
        idx = self._layout[key][0]
        with _snapshot(self._db) as conn:
            count = 0  # level-0 blocks
            if key in self._summarised:
                (count,) = conn.execute(f"SELECT count(*) FROM m{idx} WHERE level = 0").fetchone()
            if count < blocks:
                steps, values = self._whole(conn, key)
                return steps, values, np.arange(len(steps))
            assert self._sizes is not None  # keys are summarised only with sizes
            factor, level = self._sizes.factor, 0
            while count // factor ** (level + 1) >= blocks:
                level += 1
            coarse = self._records(conn, key, level, 0)
            fine = self._records(conn, key, 0, len(coarse) * factor**level)
            if len(coarse) * factor**level + len(fine) != count:
                raise RunStoreError(f"{self._db}: damaged, the min–max pyramid of {key!r} has gaps")
            last = (fine if len(fine) else coarse)["last_step"][-1]
            first = conn.execute(
                f"SELECT step, value FROM {self._table(key)} ORDER BY step LIMIT 1"
            ).fetchall()
            first_steps, first_values = self._arrays(
                key, np.array([step for step, _ in first], np.int64), b"".join(v for _, v in first)
            )
            tail_steps, tail_values = self._rows(conn, key, int(last))
        records = np.concatenate([coarse, fine])
        first_tail_row = count * self._sizes.block_rows - 1
        rows = np.concatenate(
            [[0][: len(first_steps)], records["min_row"], records["max_row"],
             np.arange(first_tail_row, first_tail_row + len(tail_steps))]
        )  # fmt: skip
        steps = np.concatenate([first_steps, records["min_step"], records["max_step"], tail_steps])
        values = np.concatenate([first_values, records["min"], records["max"], tail_values])
        rows, keep = np.unique(rows.astype(np.int64), return_index=True)
        return steps[keep], values[keep], rows

    def _records(self, conn: sqlite3.Connection, key: str, level: int, first: int) -> np.ndarray:
        """The pyramid's records of ``key`` at ``level`` from block ``first`` on."""
        idx, _, dtype = self._layout[key]
        (data,) = conn.execute(
            f"SELECT group_concat(data, '') FROM (SELECT data FROM m{idx}"
            " WHERE level = ? AND block >= ? ORDER BY block)",
            (level, first),
        ).fetchone()
        kind = summaries.record_dtype(dtype)
        data = data or b""
        if len(data) % kind.itemsize:
            raise RunStoreError(f"{self._db}: damaged, the min–max pyramid of {key!r}")
        records = np.frombuffer(bytearray(data), kind)
        # Concatenated in the order asked for, which SQL does not promise either.
        if np.any(records["last_step"][1:] < records["last_step"][:-1]):
            records = np.sort(records, order="last_step", kind="stable")
        return records

    def thin(self, key: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``run[key]`` at most ``n`` >= 2 of its steps, spread evenly from the first to the
        last: the first tracked step at or after each of ``n`` evenly spaced steps. What a plot
        of a long run shows, read with ``n`` look-ups rather than every row.

        Example:
          >>> import tempfile
          >>> with RunWriter(tempfile.mkdtemp(), {}, {"x": ((), "int64")}) as writer:
          ...     for step in range(0, 1000, 10):
          ...         writer.append(step, {"x": step})
          >>> steps, values = load_run(writer.path).thin("x", 4)
          >>> steps.tolist(), values.tolist()
          ([0, 330, 660, 990], [0, 330, 660, 990])
        """
        if n < 2:
            raise ValueError(f"Run.thin: n must be at least 2 (the first and last), got {n}")
        table = self._table(key)
        with _reading(self._db) as conn:
            # Two queries: SQLite seeks min() or max() alone, but scans for both at once.
            (first,) = conn.execute(f"SELECT min(step) FROM {table}").fetchone()
            (last,) = conn.execute(f"SELECT max(step) FROM {table}").fetchone()
            rows: dict[int, bytes] = {}
            if first is not None:
                for at in np.unique(np.linspace(first, last, n).round().astype(np.int64)):
                    step, value = conn.execute(
                        f"SELECT step, value FROM {table} WHERE step >= ? ORDER BY step LIMIT 1",
                        (int(at),),
                    ).fetchone()
                    rows[step] = value
            steps = np.fromiter(rows, np.int64, len(rows))
            return self._arrays(key, steps, b"".join(rows.values()))

    def _table(self, key: str) -> str:
        if key not in self._layout:
            raise KeyError(f"{key!r} is not a field of the run {self.path}; it has {self.keys}")
        return f"v{self._layout[key][0]}"

    def _arrays(self, key: str, steps: np.ndarray, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        _, shape, dtype = self._layout[key]
        if len(data) != len(steps) * dtype.itemsize * math.prod(shape):
            raise RunStoreError(f"{self._db}: values of {key!r} do not match its layout")
        # A copy of SQLite's bytes: values the caller may change in place.
        return steps, np.frombuffer(bytearray(data), dtype).reshape(len(steps), *shape)

    def steps(self) -> np.ndarray:
        """Every appended step, int64, increasing."""
        with _reading(self._db) as conn:
            conn.text_factory = bytes
            (steps,) = conn.execute("SELECT group_concat(step) FROM steps").fetchone()
            return np.sort(_integers(steps))

    def times(self) -> np.ndarray:
        """The wall time of every step of :meth:`steps`, in its order: float64 Unix seconds
        at which the step's values were taken; NaN throughout for a run of format version 1,
        which kept no clock.

        Example:
          >>> import tempfile
          >>> with RunWriter(tempfile.mkdtemp(), {}, {"x": ((), "int64")}) as writer:
          ...     writer.append(0, {"x": 1}, wall_time=1700000000.25)
          ...     writer.append(5, {"x": 2}, wall_time=1700000001.5)
          >>> load_run(writer.path).times().tolist()
          [1700000000.25, 1700000001.5]
        """
        if self.metadata["version"] < _CLOCK_VERSION:
            return np.full(len(self.steps()), np.nan)
        with _reading(self._db) as conn:
            conn.text_factory = bytes
            # 17 significant digits read back to the same double; SQLite's default text of
            # a REAL keeps 15 (10 µs of a Unix time).
            steps, times = conn.execute(
                "SELECT group_concat(step), group_concat(printf('%!.17g', time)) FROM steps"
            ).fetchone()
            steps = _integers(steps)
            times = np.empty(0) if times is None else np.fromstring(times, np.float64, sep=",")
            if len(times) != len(steps):
                raise RunStoreError(f"{self._db}: damaged, its steps table lacks times")
        return times[np.argsort(steps, kind="stable")]

    def clock(self, last: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``last`` steps and their wall times, as :meth:`steps` and :meth:`times`
        end: what a run's speed is read from, ``last`` rows rather than its whole clock (10⁶
        steps' take half a second).

        Example:
          >>> import tempfile
          >>> with RunWriter(tempfile.mkdtemp(), {}, {"x": ((), "int64")}) as writer:
          ...     for step in range(5):
          ...         writer.append(step, {"x": step}, wall_time=100.0 + step)
          >>> steps, times = load_run(writer.path).clock(2)
          >>> steps.tolist(), times.tolist()
          ([3, 4], [103.0, 104.0])
        """
        checks.check_int("Run.clock: last", last, 1)
        clocked = self.metadata["version"] >= _CLOCK_VERSION
        with _reading(self._db) as conn:
            rows = conn.execute(
                f"SELECT step, {'time' if clocked else 'NULL'} FROM steps"
                " ORDER BY step DESC LIMIT ?",
                (last,),
            ).fetchall()[::-1]
            steps = np.array([step for step, _ in rows], np.int64)
            times = np.array([np.nan if t is None else t for _, t in rows], np.float64)
        return steps, times

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.metadata['status']!r}, keys={self.keys})"


@contextlib.contextmanager
def _snapshot(db: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection in one read transaction: every query sees the same commit."""
    with _reading(db) as conn:
        conn.text_factory = bytes
        conn.execute("BEGIN")
        yield conn


def _integers(text: bytes | None) -> np.ndarray:
    """SQLite's ``group_concat`` of integers as int64, parsed in C."""
    if text is None:  # no rows
        return np.empty(0, np.int64)
    return np.fromstring(text, np.int64, sep=",")


@contextlib.contextmanager
def _reading(db: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; whatever goes wrong reading becomes a RunStoreError."""
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise RunStoreError(f"{db}: cannot open ({e})") from e
    try:
        yield conn
    except RunStoreError:
        raise
    except (sqlite3.Error, ValueError, TypeError) as e:
        raise RunStoreError(f"{db}: damaged or not an lmd4ml run ({e})") from e
    finally:
        conn.close()


def _check_file(db: pathlib.Path) -> None:
    """Catch an empty, foreign or truncated file before SQLite reads it."""
    with open(db, "rb") as f:
        header = f.read(100)
    if not header:
        raise RunStoreError(f"{db}: empty file, not an lmd4ml run")
    if not header.startswith(b"SQLite format 3\0"):
        raise RunStoreError(f"{db}: not an SQLite database (bad header)")
    if len(header) < 100:
        raise RunStoreError(f"{db}: truncated ({len(header)} bytes)")
    wal = db.with_name(db.name + "-wal")
    # With a live write-ahead log the main file may legitimately lag behind its header.
    if wal.exists() and wal.stat().st_size > 0:
        return
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    n_pages = int.from_bytes(header[28:32], "big")
    size = db.stat().st_size
    # The header's page count is valid when its version stamp matches the change counter.
    if header[24:28] == header[92:96] and size < page_size * n_pages:
        raise RunStoreError(
            f"{db}: truncated ({size} bytes, its header says {page_size * n_pages})"
        )


def _check_version(db: pathlib.Path, version: Any) -> None:
    """``RunStoreError`` naming ``version`` unless this lmd4ml reads it."""
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise RunStoreError(
            f"{db}: run format version {version}, written by a newer lmd4ml; this one reads "
            f"versions up to {VERSION} (upgrade lmd4ml to read it)"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunStoreError(
            f"{db}: damaged, its run format version {version!r} is none that lmd4ml wrote"
        )


def _field(db: pathlib.Path, name: str, shape: str, dtype: str) -> tuple[tuple[int, ...], np.dtype]:
    """A field's shape and dtype as its file records them; ``RunStoreError`` unless values
    of them can be read as arrays (a plain dtype, a shape of at most 32 sizes)."""
    sizes, kind = json.loads(shape), np.dtype(dtype)
    plain = not (kind.hasobject or kind.fields or kind.subdtype or kind.itemsize == 0)
    if not (
        plain
        and isinstance(sizes, list)
        and len(sizes) <= 32
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
    ):
        raise RunStoreError(f"{db}: damaged, field {name!r} has shape {shape} and dtype {dtype}")
    return tuple(sizes), kind


def _open(path: str | os.PathLike) -> tuple[Run, int]:
    """The run at ``path`` and its number of steps."""
    path = pathlib.Path(path)
    db = path / DB_NAME if path.is_dir() else path
    if not db.is_file():
        what = f"no {DB_NAME} in it" if path.is_dir() else "no such file or directory"
        raise RunStoreError(f"{path}: not an lmd4ml run ({what})")
    _check_file(db)
    with _reading(db) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        if not {"meta", "fields", "steps"} <= tables:
            raise RunStoreError(f"{db}: an SQLite database but not an lmd4ml run (no run tables)")
        meta = {key: json.loads(value) for key, value in conn.execute("SELECT * FROM meta")}
        if meta.get("format") != FORMAT:
            raise RunStoreError(f"{db}: not an lmd4ml run (format {meta.get('format')!r})")
        _check_version(db, meta.get("version"))
        missing = [key for key in (*_RUN_KEYS, "metadata") if key not in meta]
        if missing:
            raise RunStoreError(f"{db}: damaged, its run metadata lacks {missing}")
        if not isinstance(meta["start_time"], int | float):
            raise RunStoreError(f"{db}: damaged, its start_time is {meta['start_time']!r}")
        layout = {
            name: (idx, *_field(db, name, shape, dtype))
            for idx, name, shape, dtype in conn.execute("SELECT * FROM fields ORDER BY idx")
        }
        missing = [name for name, (idx, _, _) in layout.items() if f"v{idx}" not in tables]
        if missing:
            raise RunStoreError(f"{db}: damaged, no values table for fields {missing}")
        sizes = Sizes.from_json(meta["summaries"]) if "summaries" in meta else None
        summarised = frozenset(
            name
            for name, (idx, shape, dtype) in layout.items()
            if sizes is not None
            and summaries.summarised(shape, dtype)
            and {f"m{idx}", f"c{idx}"} <= tables
        )
        (n_steps,) = conn.execute("SELECT count(*) FROM steps").fetchone()
        metadata = {
            **meta["metadata"],
            **{key: meta[key] for key in (*_RUN_KEYS, "error", *NOTES) if key in meta},
        }
    return Run(db, metadata, layout, sizes, summarised), n_steps


def load_run(path: str | os.PathLike) -> Run:
    """The run in directory ``path`` (or its ``run.sqlite``); ``RunStoreError`` if there is none.

    Example:
      >>> import tempfile
      >>> load_run(tempfile.mkdtemp())
      Traceback (most recent call last):
      ...
      lmd4ml.telemetry.store.RunStoreError: ...: not an lmd4ml run (no run.sqlite in it)
    """
    return _open(path)[0]


def read_notes(path: str | os.PathLike) -> dict[str, Any]:
    """The notes (:data:`NOTES`) of the run in directory ``path`` as committed so far: one
    small read, for a reader following a run that is still being written (its writer notes
    a live diagnosis's findings as they change); ``RunStoreError`` if it cannot be read.

    Example:
      >>> import tempfile
      >>> writer = RunWriter(tempfile.mkdtemp(), {}, {"loss": ((), "float32")})
      >>> read_notes(writer.path.parent)
      {}
      >>> writer.note({"findings": []}); read_notes(writer.path.parent)
      {'findings': []}
      >>> writer.close()
    """
    db = pathlib.Path(path) / DB_NAME
    if not db.is_file():
        raise RunStoreError(f"{path}: not an lmd4ml run (no {DB_NAME} in it)")
    marks = ", ".join("?" * len(NOTES))
    with _reading(db) as conn:
        rows = conn.execute(f"SELECT key, value FROM meta WHERE key IN ({marks})", NOTES)
        return {key: json.loads(value) for key, value in rows}


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, every symlink resolved, lies below the directory ``root``.

    Example:
      >>> inside("/srv/runs/a/../b/run.sqlite", "/srv/runs"), inside("/srv/runs/..", "/srv/runs")
      (True, False)
    """
    resolved, root = pathlib.Path(path).resolve(), pathlib.Path(root).resolve()
    return resolved != root and resolved.is_relative_to(root)


def list_runs(runs_dir: str | os.PathLike, confined: bool = False) -> list[dict]:
    """Every run in ``runs_dir``, oldest first: its metadata plus "path", "name", "n_steps".

    Subdirectories without a ``run.sqlite`` are skipped; a run that cannot be read is
    listed with status "damaged" and an "error" message. A missing ``runs_dir`` has no runs.
    ``confined`` also skips, unread, every run whose store lies outside ``runs_dir`` once
    symlinks are resolved (what a server does, so that it hands out nothing from elsewhere).

    Example:
      >>> import tempfile
      >>> list_runs(tempfile.mkdtemp())
      []
    """
    runs_dir = pathlib.Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    entries = []
    for path in runs_dir.iterdir():
        db = path / DB_NAME
        if (confined and not inside(db, runs_dir)) or not db.is_file():
            continue
        place = {"path": str(path), "name": path.name}
        try:
            run, n_steps = _open(path)
            entry = {**run.metadata, **place, "n_steps": n_steps}
            order = run.metadata["start_time"]
        except RunStoreError as e:
            entry = {**place, "n_steps": 0, "start_time": None, "end_time": None}
            entry.update(status="damaged", error=str(e))
            order = db.stat().st_mtime
        entries.append((order, path.name, entry))
    return [entry for _, _, entry in sorted(entries, key=lambda e: e[:2])]
