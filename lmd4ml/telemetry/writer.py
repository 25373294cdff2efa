"""Telemetry for a training run: records are written on a background thread.

``lm.train`` fetches a tracked step's metrics one step late, so the host never waits for the
step it just dispatched, and hands them to :class:`Telemetry`, which only queues them. Its
writer thread publishes each record to the run's shared-memory ring (live readers such as
the dashboard), appends it to the run store on disk and hands it to the run's sinks
(:class:`Sink`: TensorBoard, W&B, MLflow). Watching never stops training: a failing sink is
reported once and skipped. Under ``jax.distributed`` only process 0 writes
(:func:`writes_telemetry`).

Faults while writing, and what they cost:

* the disk fills up, or the store file is deleted or replaced: one ``RuntimeWarning``; the
  store records nothing more, keeps every step it committed before (at most about a second
  behind the failure) and is marked ``status="incomplete"`` with the ``error`` (where the
  file still takes that: a full disk may not, a deleted or replaced file is left alone);
  training and the live ring go on;
* the ring cannot be made or written: one warning, no live view, the store goes on;
* a sink raises: one warning naming it; it is not called again, the others go on;
* the process is killed: the store keeps what it committed and reads as ``"running"``;
  the ring's watchdog removes the shared memory.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from lmd4ml import checks
from lmd4ml.telemetry.ring import RingWriter, ring_name
from lmd4ml.telemetry.store import RunWriter, as_stored

Fields = dict[str, tuple[tuple[int, ...], np.dtype]]
LIVE_FILE = "live.json"
STORE, RING = "the run store", "the live ring"


def writes_telemetry() -> bool:
    """Whether this process writes runs, rings and dashboards: process 0 under
    ``jax.distributed`` (the others compute and join the collectives but write nothing), or
    the only process.

    Example:
      >>> writes_telemetry()
      True
    """
    return jax.process_index() == 0


def flat_name(key: str, path: tuple) -> str:
    """The field name of one leaf of a quantity's value: its key, plus the leaf's path.

    Example:
      >>> flat_name("grad_norm", ())
      'grad_norm'
      >>> flat_name("per_layer", (jax.tree_util.DictKey("w"),))
      "per_layer['w']"
    """
    return key + jax.tree_util.keystr(path)


def flatten(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One entry per leaf of every quantity's value, named by :func:`flat_name`.

    Example:
      >>> sorted(flatten({"loss": 1.0, "per_layer": {"a": 2.0, "b": 3.0}}))
      ['loss', "per_layer['a']", "per_layer['b']"]
    """
    flat = {}
    for key, value in metrics.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(value):
            flat[flat_name(key, path)] = leaf
    return flat


def fields_of(shapes: Mapping[str, Any]) -> Fields:
    """The record layout (shape and dtype of each flat field) from ``jax.eval_shape`` output."""
    return {name: (tuple(s.shape), np.dtype(s.dtype)) for name, s in flatten(shapes).items()}


class Sink(Protocol):
    """Somewhere else a run's values go, beside its store and ring (TensorBoard, W&B, MLflow).

    Each method is called from the telemetry writer thread, never the training thread, in
    order: ``start`` once, then ``write`` for every recorded step, then ``close`` once.

    * ``start(metadata, fields)``: ``metadata`` is the run's metadata as the store keeps it
      (``quantities_by_key``, ``config``, ``keys``, ...) plus ``"name"`` (the run's name) and
      ``"run_dir"`` (a string, or ``None`` when the run has no store); ``fields`` maps each
      of the store's flat field names (:func:`flat_name`: ``loss``, ``grad_norm['b1']``) to
      its shape and dtype.
    * ``write(step, wall_time, values)``: the fields of one recorded step (any subset), as
      host numpy arrays the sink must not modify; ``wall_time`` is the Unix time at which
      they were fetched.
    * ``close(status)``: "finished", "failed", "interrupted" or "incomplete".

    A sink that raises is reported once (a ``RuntimeWarning`` naming it) and not called
    again; training never stops for it.
    """

    def start(
        self, metadata: Mapping[str, Any], fields: Mapping[str, tuple[tuple[int, ...], np.dtype]]
    ) -> None: ...

    def write(self, step: int, wall_time: float, values: Mapping[str, np.ndarray]) -> None: ...

    def close(self, status: str) -> None: ...


def check_sinks(sinks: Any) -> tuple[Sink, ...]:
    """``sinks`` as a tuple, once each has the :class:`Sink` methods; a clear error if not.

    Example:
      >>> check_sinks([object()])
      Traceback (most recent call last):
      ...
      TypeError: sinks[0] is a object, which lacks start, write, close; a sink has the methods ...
    """
    if isinstance(sinks, str | bytes | Mapping) or not isinstance(sinks, Sequence):
        raise TypeError(f"sinks must be a list of sinks, got {type(sinks).__name__}")
    for i, sink in enumerate(sinks):
        lacks = [m for m in ("start", "write", "close") if not callable(getattr(sink, m, None))]
        if lacks:
            raise TypeError(
                f"sinks[{i}] is a {type(sink).__name__}, which lacks {', '.join(lacks)}; a sink "
                "has the methods of lmd4ml.telemetry.writer.Sink"
            )
    return tuple(sinks)


def _sink_labels(sinks: Sequence[Sink]) -> list[str]:
    """A name for each sink in warnings: its class, numbered where classes repeat."""
    names = [type(sink).__qualname__ for sink in sinks]
    return [
        f"the sink {name}" + (f" #{i}" if names.count(name) > 1 else "")
        for i, name in enumerate(names)
    ]


class Telemetry:
    """Where one run's values go: its ring (live), its store (durable) and its sinks, fed
    from a thread.

    ``shapes`` is what ``jax.eval_shape`` gives for a step's full metrics; a step may submit
    any subset of its keys. ``submit`` returns at once while fewer than ``max_queued`` steps
    wait (else it waits for room); the thread writes what has queued up every ``interval``
    seconds; ``close`` writes what is left, then closes everything.
    Without a ``run_dir`` there is no store nor ring, only the sinks; ``name`` is the run's
    name for them (by default the directory's). ``notes`` gives what the store keeps
    besides the values (:meth:`~lmd4ml.telemetry.store.RunWriter.note`: a live diagnosis's
    findings): noted after each burst of steps when they changed, so that a dashboard reads
    them while the run trains, and once more when the sinks have closed.
    """

    def __init__(
        self,
        run_dir: Path | None,
        metadata: Mapping[str, Any],
        shapes: Mapping[str, Any],
        sinks: Sequence[Sink] = (),
        name: str | None = None,
        ring_capacity: int = 4096,
        interval: float = 0.05,
        notes: Callable[[], Mapping[str, Any]] | None = None,
        max_queued: int = 10_000,
    ):
        if run_dir is None and name is None:
            raise ValueError("Telemetry: a run without a run_dir needs a name")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.name = name if name is not None else self.run_dir.name
        self.interval = interval
        self._notes = notes
        self._noted: Mapping[str, Any] | None = None
        self.fields = fields = fields_of(shapes)
        self._names = {key: list(fields_of({key: shape})) for key, shape in shapes.items()}
        self.store = None if self.run_dir is None else RunWriter(self.run_dir, metadata, fields)
        self._failed: set[str] = set()
        self.ring: RingWriter | None = None
        if self.run_dir is not None:
            self._guarded(RING, "at the start", self._open_ring, ring_capacity)
        self._sinks = dict(zip(_sink_labels(sinks), sinks, strict=True))
        run_dir_text = None if self.run_dir is None else str(self.run_dir)
        self._sink_metadata = {**as_stored(metadata), "name": self.name, "run_dir": run_dir_text}
        self._status = "finished"
        checks.check_int("Telemetry: max_queued", max_queued, 1)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._dropping = False
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="lmd4ml-telemetry", daemon=True)
        self._thread.start()

    def submit(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue one tracked step's metrics (host or device arrays). The step's wall time is
        now: the loop submits a step as soon as it has fetched its values.

        Returns at once unless ``max_queued`` steps already wait for the writer (a sink slower
        than training): then it waits for room, so that what is queued stays bounded and no
        step is lost. Should the writer thread have stopped, the step is dropped with one
        warning rather than training waiting forever.
        """
        if not self._put((step, metrics, time.time())) and not self._dropping:
            self._dropping = True
            warnings.warn(
                f"lmd4ml telemetry: the writer of the run {self.run_dir or self.name} stopped "
                f"at step {step}: later steps are not recorded; training goes on",
                RuntimeWarning,
                stacklevel=2,
            )

    def _put(self, item: Any) -> bool:
        """Queue ``item``, waiting for room while the writer thread lives; False if it has
        stopped (nothing would ever make room)."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def _open_ring(self, capacity: int) -> None:
        # A run without live view still trains and is kept.
        assert self.run_dir is not None
        name = ring_name(self.run_dir.name, str(self.run_dir.resolve()))
        self.ring = RingWriter(name, self.fields, capacity=capacity)
        live = {"ring": self.ring.name, "pid": os.getpid()}
        (self.run_dir / LIVE_FILE).write_text(json.dumps(live))

    def _drain(self) -> None:
        # Sinks start here, not on the training thread: some take seconds (a login, a server).
        for label, sink in self._sinks.items():
            self._guarded(label, "at the start", sink.start, self._sink_metadata, self.fields)
        while (item := self._queue.get()) is not None:
            self._write(*item)
            if self._queue.empty():
                self._note()
                # Woken in bursts rather than on every step: each wake-up takes the GIL from
                # the training thread, and a live view does not need to be fresher than this.
                self._closing.wait(self.interval)
        for label, sink in self._sinks.items():
            self._guarded(label, "at the end", sink.close, self._status)

    def _write(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        # The names are fixed by the layout; naming every leaf again would cost more than
        # writing it.
        values = {
            name: np.asarray(leaf)
            for key, value in metrics.items()
            for name, leaf in zip(self._names[key], jax.tree.leaves(value), strict=True)
        }
        if self.ring is not None:
            self._guarded(RING, step, self.ring.write, step, values)
        if self.store is not None:
            self._guarded(STORE, step, self.store.append, step, values, wall_time)
        for label, sink in self._sinks.items():
            self._guarded(label, step, sink.write, step, wall_time, values)

    def _note(self) -> None:
        """Store the notes if they changed since they were last stored (rarely: a finding
        that appears, grows or ends)."""
        if self.store is None or self._notes is None:
            return
        notes = self._notes()
        if notes != self._noted:
            self._noted = notes
            self._guarded(STORE, "noting findings", self.store.note, notes)

    def _guarded(self, sink: str, when: int | str, call: Callable[..., Any], *args: Any) -> None:
        """``call(*args)``, unless ``sink`` has failed; its first failure turns it off with
        one warning (``when``: a step, or a moment such as "at the start")."""
        if sink in self._failed:
            return
        try:
            call(*args)
        except Exception as error:  # any failure: watching must never stop training
            self._failed.add(sink)
            when = f"at step {when}" if isinstance(when, int) else when
            cause = f"{type(error).__name__}: {error}"
            if sink == STORE:
                assert self.store is not None
                marked = self.store.abandon(f"recording stopped {when} ({cause})")
                what = "the run records nothing more" + (
                    ", and is marked incomplete with the steps committed before" if marked else ""
                )
            elif sink == RING:
                self._close_ring()
                what = "no live view, the run store goes on"
            else:
                what = "it is not called again"
            warnings.warn(
                f"lmd4ml telemetry: {sink} failed {when} ({cause}) in the run "
                f"{self.run_dir or self.name}: {what}; training goes on",
                RuntimeWarning,
                stacklevel=1,
            )

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
        if self.run_dir is not None:
            (self.run_dir / LIVE_FILE).unlink(missing_ok=True)

    def close(self, status: str = "finished") -> None:
        """Write what is queued, mark the run ``status``, close the sinks and release the
        ring. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._status = status
        self._put(None)
        self._closing.set()
        try:
            self._thread.join()
            if self.store is not None:
                if self._notes is not None:
                    self._guarded(STORE, "at the end", self.store.note, self._notes())
                # Committed before it is closed, so that a failure to commit is one like any
                # other.
                self._guarded(STORE, "at the end", self.store.flush)
                self._guarded(STORE, "at the end", self.store.close, status)
        finally:  # the shared memory goes even if closing is interrupted (a second Ctrl-C)
            self._close_ring()


def live_ring(run_dir: str | os.PathLike) -> str | None:
    """The shared-memory ring of a run that is training now, or None once it has ended.

    Example:
      >>> import tempfile
      >>> live_ring(tempfile.mkdtemp()) is None
      True
    """
    try:
        live = json.loads((Path(run_dir) / LIVE_FILE).read_text())
        os.kill(live["pid"], 0)  # a run killed before it could remove live.json is not live
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return live["ring"]
