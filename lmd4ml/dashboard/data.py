"""What the dashboard shows, as plain functions of runs and numpy arrays (no Dash here).

:class:`RunData` holds one run's values in memory: read from its store once, then followed
through its shared-memory ring while it trains. A long scalar field is read as its outline
(``Run.outline``: the lowest and highest value of each of ``OUTLINE_BLOCKS`` or more blocks,
from the store's min–max pyramid), a vector field such as a histogram at ``VECTOR_ROWS``
steps; every step that arrives after is kept. :func:`minmax_indices`, :func:`spread_indices`
and :func:`ema` thin out and smooth long series on the server, so that a page showing 10⁶
steps gets a few thousand points per trace; smoothed, each point is the moving average of
every step up to it (the stored values are read once, when first smoothed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import scipy.signal

from lmd4ml.dashboard.findings import checked
from lmd4ml.telemetry.ring import RingReader
from lmd4ml.telemetry.store import STATUSES, Run, RunStoreError, load_run, read_notes
from lmd4ml.telemetry.writer import live_ring

# A run that trains but has no ring (it could not be made) is re-read from its store at most
# this often: a full read of a long run costs far more than a ring read.
STORE_POLL_S = 2.0
# Steps a vector field (a histogram) is read at from a run's store: its heatmap shows 200 of
# them; read whole, 10⁶ steps of a 100-bin histogram would be 400 MB.
VECTOR_ROWS = 400
# A live run's findings are re-read from its store at most this often: its diagnosis runs
# when its steps have grown by a tenth, and one small read is all it costs.
FINDINGS_S = 5.0
# Blocks a long scalar field is read at least as (two points each): the 1000 points a line is
# thinned to (figure.LINE_BUDGET) come from them; 10⁶ steps are read as 1953 blocks.
OUTLINE_BLOCKS = 500
# Steps a run's speed is read over from the store's clock (its last ones).
CLOCK_WINDOW = 64


def minmax_indices(values: np.ndarray, budget: int) -> np.ndarray:
    """Indices that keep the shape of a long 1-D series in about ``budget`` points.

    The series is cut into ``budget // 2`` buckets; each keeps its smallest and largest value
    (NaN counts as neither), so spikes survive. The first and last points are always kept.

    Example:
      >>> minmax_indices(np.array([0.0, 5, 1, 1, 1, -3, 1, 2]), 4).tolist()
      [0, 1, 5, 7]
      >>> minmax_indices(np.arange(3.0), 10).tolist()
      [0, 1, 2]
    """
    n = len(values)
    if n <= budget:
        return np.arange(n)
    size = math.ceil(n / max(1, budget // 2))
    nan = np.isnan(values)
    low, high = np.where(nan, np.inf, values), np.where(nan, -np.inf, values)
    # Whole buckets as one reshaped view, the shorter last one apart: padding it would copy
    # the whole series.
    whole = n // size * size
    starts = np.arange(0, whole, size)
    keep = [
        starts + low[:whole].reshape(-1, size).argmin(axis=1),
        starts + high[:whole].reshape(-1, size).argmax(axis=1),
        [0, n - 1],
    ]
    if whole < n:
        keep.append([whole + low[whole:].argmin(), whole + high[whole:].argmax()])
    return np.unique(np.concatenate(keep))


def spread_indices(steps: np.ndarray, budget: int) -> np.ndarray:
    """Indices of at most ``budget`` of the increasing ``steps``, spread evenly over the
    steps rather than the rows: the first at or after each of ``budget`` evenly spaced steps,
    the first and last included. A long run read at a few steps and then followed live has
    its rows dense at the end, which would take most of a heatmap spread over rows.

    Example:
      >>> spread_indices(np.array([0, 100, 200, 300, 301, 302, 303, 304]), 4).tolist()
      [0, 2, 3, 7]
      >>> spread_indices(np.arange(3), 4).tolist()
      [0, 1, 2]
    """
    if len(steps) <= budget:
        return np.arange(len(steps))
    return np.unique(np.searchsorted(steps, np.linspace(steps[0], steps[-1], budget)))


def ema(values: np.ndarray, weight: float, start: int = 0, previous: float = 0.0) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) of a 1-D series, or of
    its continuation after ``start`` finite values whose average was ``previous``.

    ``weight`` in [0, 1): 0 returns the values as they are. The recurrence
    mₜ = w mₜ₋₁ + (1 - w) xₜ runs over the finite values only, as a linear filter in C; a
    NaN or infinite value is shown as itself and left out of the average, as TensorBoard
    does (one NaN step would otherwise hide the rest of the line).

    Example:
      >>> ema(np.array([1.0, 3.0, 3.0]), 0.5).round(4).tolist()
      [1.0, 2.3333, 2.7143]
      >>> ema(np.array([3.0]), 0.5, start=2, previous=7 / 3).round(4).tolist()
      [2.7143]
      >>> ema(np.array([1.0, np.nan, 3.0, 3.0]), 0.5).round(4).tolist()
      [1.0, nan, 2.3333, 2.7143]
    """
    values = np.asarray(values, np.float64)
    if weight <= 0 or len(values) == 0:
        return values
    if not weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    finite = np.isfinite(values)
    if not finite.all():
        out = values.copy()
        out[finite] = ema(values[finite], weight, start, previous)
        return out
    log_w = math.log(weight)
    # The debiased average is mₜ / (1 - wᵗ⁺¹), with 1 - wᵗ⁺¹ through expm1: as exact, and
    # many times faster than a power per step. It is 1.0 in float64 once wᵗ⁺¹ < 2⁻⁵⁴, after
    # 38 / -ln w steps: only those before are divided.
    carry = previous * -math.expm1(start * log_w) if start else 0.0
    averages, _ = scipy.signal.lfilter([1 - weight], [1, -weight], values, zi=[weight * carry])
    biased = min(len(values), max(0, math.ceil(38 / -log_w) - start))
    averages[:biased] /= -np.expm1(np.arange(start + 1.0, start + biased + 1) * log_w)
    return averages


Carry = tuple[int, float]
"""Where :func:`ema` carries on from: the finite values averaged so far, and their average."""


def carried(values: np.ndarray, averages: np.ndarray, start: int, previous: float) -> Carry:
    """Where :func:`ema` carries on after ``values`` (their ``averages``), having started
    after ``start`` finite values whose average was ``previous``.

    Example:
      >>> x = np.array([1.0, 3.0, np.nan])
      >>> carried(x, ema(x, 0.5), 0, 0.0)
      (2, 2.3333333333333335)
    """
    finite = np.flatnonzero(np.isfinite(values))
    if not len(finite):
        return start, previous
    return start + len(finite), float(averages[finite[-1]])


def ema_at(
    values: np.ndarray, weight: float, at: np.ndarray, piece: int = 1 << 16
) -> tuple[np.ndarray, Carry]:
    """:func:`ema` of a series at the increasing indices ``at``, and where :func:`ema` would
    carry on after it (:func:`carried`). Averaged ``piece`` values at a time, each carrying
    on from the one before: the average of all of a long series is never held, and each
    piece's arrays stay in the CPU's caches (a quarter less time at 10⁶ values than in one go).

    Example:
      >>> at, carry = ema_at(np.array([1.0, 3.0, 3.0]), 0.5, np.array([0, 2]), piece=2)
      >>> at.round(4).tolist(), carry[0], round(carry[1], 4)  # as ema(): [1.0, 2.3333, 2.7143]
      ([1.0, 2.7143], 3, 2.7143)
    """
    out, carry = np.empty(len(at)), (0, 0.0)
    ends = np.searchsorted(at, np.arange(piece, len(values) + piece, piece))
    first = 0
    for start, end in zip(range(0, len(values), piece), ends, strict=True):
        part = values[start : start + piece]
        averages = ema(part, weight, *carry)
        out[first:end] = averages[at[first:end] - start]
        first, carry = end, carried(part, averages, *carry)
    return out, carry


def clock_rate(steps: np.ndarray, times: np.ndarray, window: int = CLOCK_WINDOW) -> float | None:
    """Training steps per second over the last ``window`` steps the store clocked (``times``:
    Unix seconds aligned with ``steps``, NaN where unclocked), or None without two of them.

    Example:
      >>> clock_rate(np.array([0, 10, 20, 30]), np.array([np.nan, 100.0, 101.0, 102.0]))
      10.0
      >>> clock_rate(np.array([0, 1]), np.array([np.nan, np.nan])) is None
      True
    """
    clocked = np.isfinite(times)
    steps, times = steps[clocked][-window:], times[clocked][-window:]
    if len(steps) < 2 or times[-1] <= times[0]:
        return None
    return float((steps[-1] - steps[0]) / (times[-1] - times[0]))


def process_alive(pid: object) -> bool:
    """Whether process ``pid`` exists (a zombie not yet reaped counts as existing).

    Example:
      >>> process_alive(os.getpid()), process_alive(None)
      (True, False)
    """
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


@dataclasses.dataclass(frozen=True)
class _Stored:
    """The first ``count`` rows of ``key`` in ``run``'s store: what it had when read (the
    store only ever appends), read again whole when asked."""

    run: Run
    key: str
    count: int

    def values(self) -> np.ndarray:
        """Their values (``Run.values``: faster than with their steps)."""
        return self._first(self.run.values(self.key))

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Their steps and values."""
        steps, values = self.run[self.key]
        return self._first(steps), values[: self.count]

    def _first(self, read: np.ndarray) -> np.ndarray:
        if len(read) < self.count:
            raise RunStoreError(
                f"{self.run.path}: {self.key!r} has {len(read)} rows, it had {self.count}: "
                "the run was replaced"
            )
        return read[: self.count]


class _Column:
    """One field's rows held in memory, grown in place (amortised doubling).

    ``steps`` and ``values`` are the rows held: every row of the field, or its outline as
    read from the store (``Run.outline``, a few thousand rows: what a line draws) and then
    every row that arrived. For an outline, ``rows`` are the indices of its rows among the
    field's and ``stored`` the rows it was read from: :meth:`smoothed` averages every one of
    them, :meth:`whole` holds them all (for what needs every row: a mean, a heatmap's rows).
    """

    def __init__(
        self,
        steps: np.ndarray,
        values: np.ndarray,
        rows: np.ndarray | None = None,
        stored: _Stored | None = None,
    ):
        self._steps, self._values, self.n = steps, values, len(steps)
        # Held rows read from the store; the rows the field had then, held or not (those
        # after arrive one by one, every one held).
        self._read, self._rows, self._stored = len(steps), rows, stored
        self._rows_read = len(steps) if stored is None else stored.count
        # The stored values, read when first smoothed, then kept (4 bytes a float32 row):
        # another weight then costs one pass over them, not a read of the store as well.
        self._stored_values: np.ndarray | None = None
        self._smoothed: tuple[float, np.ndarray, Carry] = (0.0, np.empty(0), (0, 0.0))

    @property
    def count(self) -> int:
        """The field's rows: those it had when read, held or not, and every one since."""
        return self._rows_read + self.n - self._read

    @property
    def outlined(self) -> bool:
        """Whether it holds an outline of its stored rows rather than every one."""
        return self._stored is not None

    def whole(self) -> _Column:
        """This column holding every row of its field: an outline's are read from the store
        (once: it then holds them, as a field read whole does)."""
        if self._stored is not None:
            steps, values = self._stored.rows()
            self._steps = np.concatenate([steps, self.steps[self._read :]])
            self._values = np.concatenate([values, self.values[self._read :]])
            self.n = self._read = self._rows_read = len(self._steps)
            self._rows = self._stored = self._stored_values = None
            self._smoothed = (0.0, np.empty(0), (0, 0.0))
        return self

    def smoothed(self, weight: float) -> np.ndarray:
        """:func:`ema` of the field's every row, at the rows held: kept and continued as the
        column grows, so that a poll smooths its new rows only."""
        kept_weight, kept, carry = self._smoothed
        if weight != kept_weight or not len(kept):
            kept, carry = self._smooth(weight)
        elif len(kept) < self.n:
            new = self.values[len(kept) :]  # the field's last rows, all held
            averages = ema(new, weight, *carry)
            kept, carry = np.concatenate([kept, averages]), carried(new, averages, *carry)
        self._smoothed = (weight, kept, carry)
        return kept

    def _smooth(self, weight: float) -> tuple[np.ndarray, Carry]:
        if self._stored is None or self._rows is None:
            averages = ema(self.values, weight)
            return averages, carried(self.values, averages, 0, 0.0)
        if self._stored_values is None:
            self._stored_values = self._stored.values()
        # The average at each held row from every row up to it: one pass over the stored
        # values (a few ms for 10⁶), then on over the rows that arrived since.
        held, carry = ema_at(self._stored_values, weight, self._rows)
        since = self.values[self._read :]
        averages = ema(since, weight, *carry)
        return np.concatenate([held, averages]), carried(since, averages, *carry)

    def extend(self, steps: np.ndarray, values: np.ndarray) -> None:
        need = self.n + len(steps)
        if need > len(self._steps):
            capacity = max(need, 2 * len(self._steps), 256)
            grown = np.empty((capacity, *self._values.shape[1:]), self._values.dtype)
            grown[: self.n] = self._values[: self.n]
            self._values = grown
            self._steps = np.concatenate([self._steps[: self.n], np.empty(capacity - self.n, int)])
        self._steps[self.n : need] = steps
        self._values[self.n : need] = values
        self.n = need

    @property
    def steps(self) -> np.ndarray:
        return self._steps[: self.n]

    @property
    def values(self) -> np.ndarray:
        return self._values[: self.n]


class RunData:
    """One run's values in memory, kept up to date by :meth:`refresh`.

    ``state`` is "live" (followed through its ring), "starting" (its process runs, no ring
    yet), "finished", "failed", "interrupted", or "killed" (the store says running but the
    process that wrote it is gone). ``version`` goes up whenever the values were re-read
    rather than appended to, so that a view knows to redraw rather than extend.
    ``findings`` are its diagnosis's (:func:`lmd4ml.dashboard.findings.checked`): those its
    store keeps, re-read every ``FINDINGS_S`` while it trains. Not thread-safe:
    :class:`RunCache` serialises its users.

    ``columns`` holds each field's rows: a long scalar field's as its outline, at least
    ``outline_blocks`` blocks of its rows (``_Column.whole`` for every row).
    """

    def __init__(self, path: str | os.PathLike, outline_blocks: int = OUTLINE_BLOCKS):
        self.path = Path(path)
        self._outline_blocks = outline_blocks
        self.name = self.path.name
        self.version = 0
        self._reader: RingReader | None = None
        self._since = 0
        self._attached = False  # the first ring read after attaching is not a lapped one
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._reload()

    def _reload(self) -> None:
        run = load_run(self.path)
        self.metadata = run.metadata
        self.findings = checked(run.metadata.get("findings"))
        self._findings_at = time.monotonic()
        self.columns = {key: self._read_column(run, key) for key in run.keys}
        self.shapes = {key: col.values.shape[1:] for key, col in self.columns.items()}
        # The store's per-step clock gives an unfinished run's speed before two polls have
        # (read only then, and only its last steps: a finished run needs none, and a long
        # run's whole clock takes long). Stores of the version before it give no rate.
        unfinished = run.metadata.get("status") not in STATUSES
        self.clock_rate = clock_rate(*run.clock(CLOCK_WINDOW)) if unfinished else None
        self.version += 1
        self._read_at = time.monotonic()

    def _read_column(self, run: Run, key: str) -> _Column:
        if run.shapes[key]:
            return _Column(*run.thin(key, VECTOR_ROWS))
        steps, values, rows = run.outline(key, self._outline_blocks)
        if len(rows) == 0 or rows[-1] == len(rows) - 1:  # every row
            return _Column(steps, values)
        return _Column(steps, values, rows, _Stored(run, key, int(rows[-1]) + 1))

    @property
    def last_step(self) -> int:
        """The newest step any field has, or -1."""
        return max((int(c.steps[-1]) for c in self.columns.values() if c.n), default=-1)

    @property
    def state(self) -> str:
        if self._reader is not None:
            return "live"
        status = self.metadata.get("status")
        if status in STATUSES:
            return status
        return "starting" if process_alive(self.metadata.get("pid")) else "killed"

    def steps_per_second(self) -> float | None:
        """Training steps per second over the last few seconds while live (before two
        polls, and for a run followed through its store, from the store's clock)."""
        if self.state not in ("live", "starting"):
            return None
        if len(self._rate) < 2 or self.state == "starting":
            return self.clock_rate
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def refresh(self) -> None:
        """Take in what the run wrote since the last call."""
        ring = live_ring(self.path)
        if self._reader is None and ring is not None:
            try:
                self._reader = RingReader(ring)
            except (FileNotFoundError, ValueError):  # it ended between the two looks
                self._reader = None
            else:
                self._since, self._attached = 0, True
        if self._reader is not None:
            self._read_ring()
            self._read_findings()
            if ring is None:  # it ended: its store now has everything, and its status
                self._reader.close()
                self._reader = None
                self._reload()
        elif self.state == "starting" and time.monotonic() - self._read_at > STORE_POLL_S:
            self._reload()
        now = time.monotonic()
        if self._rate and now - self._rate[0][0] > 5:
            self._rate.popleft()
        self._rate.append((now, self.last_step))

    def _read_findings(self) -> None:
        if time.monotonic() - self._findings_at < FINDINGS_S:
            return
        self._findings_at = time.monotonic()
        # A read that fails now (the file busy, damaged): the findings read before hold.
        with contextlib.suppress(RunStoreError):
            self.findings = checked(read_notes(self.path).get("findings"))

    def _read_ring(self) -> None:
        assert self._reader is not None
        batch = self._reader.read(self._since)
        self._since = batch.next
        if batch.missed and not self._attached:
            # The ring lapped this reader: what it lost is in the store (give or take its
            # last second, which the final re-read at the end of the run brings back).
            # Right after attaching, what the ring no longer holds was read from the store.
            self._reload()
        self._attached = False
        for key, column in self.columns.items():
            if key not in batch.values:
                continue
            take = batch.present[key] & (batch.steps > (column.steps[-1] if column.n else -1))
            if take.any():
                column.extend(batch.steps[take], batch.values[key][take])


class RunCache:
    """The :class:`RunData` of every run a dashboard has shown, by path.

    Callers hold ``lock`` while they refresh runs and read their columns: Dash serves
    callbacks from several threads, and a column read while it grows would be torn.
    A run that cannot be read (damaged, or removed) raises ``RunStoreError``.
    """

    def __init__(self, outline_blocks: int = OUTLINE_BLOCKS) -> None:
        self._runs: dict[str, RunData] = {}
        self._outline_blocks = outline_blocks
        self.lock = threading.RLock()

    def get(self, path: str | os.PathLike) -> RunData:
        """The run at ``path``, refreshed."""
        key = str(Path(path).resolve())
        try:
            data = self._runs.get(key) or self._runs.setdefault(
                key, RunData(path, self._outline_blocks)
            )
            data.refresh()
        except RunStoreError:
            self._runs.pop(key, None)
            raise
        return data
