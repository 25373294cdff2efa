"""Telemetry for a training run: records are written on a background thread.

``lm.train`` fetches a tracked step's metrics one step late, so the host never waits for the
step it just dispatched, and hands them to :class:`Telemetry`, which only queues them. Its
writer thread publishes each record to the run's shared-memory ring (live readers such as
the dashboard) and appends it to the run store on disk. Watching never stops training: a
failing sink is reported once and skipped. Under ``jax.distributed`` only process 0 writes
(:func:`writes_telemetry`).

Faults while writing, and what they cost:

* the disk fills up, or the store file is deleted or replaced: one ``RuntimeWarning``; the
  store records nothing more, keeps every step it committed before (at most about a second
  behind the failure) and is marked ``status="incomplete"`` with the ``error`` (where the
  file still takes that: a full disk may not, a deleted or replaced file is left alone);
  training and the live ring go on;
* the ring cannot be made or written: one warning, no live view, the store goes on;
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmd4ml.telemetry.ring import RingWriter, ring_name
from lmd4ml.telemetry.store import RunWriter

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


class Telemetry:
    """The sinks of one run: its ring (live) and its store (durable), fed from a thread.

    ``shapes`` is what ``jax.eval_shape`` gives for a step's full metrics; a step may submit
    any subset of its keys. ``submit`` returns at once; the thread writes what has queued up
    every ``interval`` seconds; ``close`` writes what is left, then closes both sinks.
    """

    def __init__(
        self,
        run_dir: Path,
        metadata: Mapping[str, Any],
        shapes: Mapping[str, Any],
        ring_capacity: int = 4096,
        interval: float = 0.05,
    ):
        self.run_dir = Path(run_dir)
        self.interval = interval
        self.fields = fields = fields_of(shapes)
        self._names = {key: list(fields_of({key: shape})) for key, shape in shapes.items()}
        self.store = RunWriter(self.run_dir, metadata, fields)
        self._failed: set[str] = set()
        self.ring: RingWriter | None = None
        self._guarded(RING, "at the start", self._open_ring, ring_capacity)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="lmd4ml-telemetry", daemon=True)
        self._thread.start()

    def submit(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue one tracked step's metrics (host or device arrays); never blocks. The step's
        wall time is now: the loop submits a step as soon as it has fetched its values."""
        self._queue.put((step, metrics, time.time()))

    def _open_ring(self, capacity: int) -> None:
        # A run without live view still trains and is kept.
        self.ring = RingWriter(ring_name(self.run_dir.name), self.fields, capacity=capacity)
        live = {"ring": self.ring.name, "pid": os.getpid()}
        (self.run_dir / LIVE_FILE).write_text(json.dumps(live))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            self._write(*item)
            if self._queue.empty():
                # Woken in bursts rather than on every step: each wake-up takes the GIL from
                # the training thread, and a live view does not need to be fresher than this.
                self._closing.wait(self.interval)

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
        self._guarded(STORE, step, self.store.append, step, values, wall_time)

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
                marked = self.store.abandon(f"recording stopped {when} ({cause})")
                what = "the run records nothing more" + (
                    ", and is marked incomplete with the steps committed before" if marked else ""
                )
            else:
                self._close_ring()
                what = "no live view, the run store goes on"
            warnings.warn(
                f"lmd4ml telemetry: {sink} failed {when} ({cause}) in {self.run_dir}: {what}; "
                "training goes on",
                RuntimeWarning,
                stacklevel=1,
            )

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.close()
        (self.run_dir / LIVE_FILE).unlink(missing_ok=True)

    def close(self, status: str = "finished") -> None:
        """Write what is queued, mark the run ``status`` and release the ring. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._closing.set()
        try:
            self._thread.join()
            # Committed before it is closed, so that a failure to commit is one like any other.
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
