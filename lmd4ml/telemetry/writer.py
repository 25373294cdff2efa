"""Telemetry for a training run: records are written on a background thread.

``lm.train`` fetches a tracked step's metrics one step late, so the host never waits for the
step it just dispatched, and hands them to :class:`Telemetry`, which only queues them. Its
writer thread publishes each record to the run's shared-memory ring (live readers such as
the dashboard) and appends it to the run store on disk. Watching never stops training: a
failing sink is reported once and skipped. Under ``jax.distributed`` only process 0 writes
(:func:`writes_telemetry`).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmd4ml.telemetry.ring import RingWriter, ring_name
from lmd4ml.telemetry.store import RunWriter

Fields = dict[str, tuple[tuple[int, ...], np.dtype]]
LIVE_FILE = "live.json"


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
        try:
            self.ring = RingWriter(ring_name(self.run_dir.name), fields, capacity=ring_capacity)
        except Exception as error:  # a run without live view still trains and is kept
            self._warn("the live ring", "at the start", error)
            self._failed.add("the live ring")
        else:
            live = {"ring": self.ring.name, "pid": os.getpid()}
            (self.run_dir / LIVE_FILE).write_text(json.dumps(live))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="lmd4ml-telemetry", daemon=True)
        self._thread.start()

    def submit(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue one tracked step's metrics (host or device arrays); never blocks."""
        self._queue.put((step, metrics))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            self._write(*item)
            if self._queue.empty():
                # Woken in bursts rather than on every step: each wake-up takes the GIL from
                # the training thread, and a live view does not need to be fresher than this.
                self._closing.wait(self.interval)

    def _write(self, step: int, metrics: Mapping[str, Any]) -> None:
        # The names are fixed by the layout; naming every leaf again would cost more than
        # writing it.
        values = {
            name: np.asarray(leaf)
            for key, value in metrics.items()
            for name, leaf in zip(self._names[key], jax.tree.leaves(value), strict=True)
        }
        if self.ring is not None:
            self._guarded("the live ring", step, self.ring.write, values)
        self._guarded("the run store", step, self.store.append, values)

    def _guarded(self, sink: str, step: int, write: Any, values: dict) -> None:
        if sink in self._failed:
            return
        try:
            write(step, values)
        except Exception as error:  # any failure: watching must never stop training
            self._failed.add(sink)
            self._warn(sink, f"at step {step}", error)

    @staticmethod
    def _warn(sink: str, when: str, error: Exception) -> None:
        warnings.warn(
            f"lmd4ml telemetry: {sink} failed {when} and is off for the rest of the run "
            f"({type(error).__name__}: {error}); training goes on",
            RuntimeWarning,
            stacklevel=1,
        )

    def close(self, status: str = "finished") -> None:
        """Write what is queued, mark the run ``status`` and release the ring. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._closing.set()
        self._thread.join()
        self.store.close(status)
        if self.ring is not None:
            self.ring.close()
        (self.run_dir / LIVE_FILE).unlink(missing_ok=True)


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
