"""Export a stored run: CSV, JSON, or through any live sink after the fact (TensorBoard).

Example:
  >>> import tempfile, numpy as np
  >>> from lmd4ml.telemetry.store import RunWriter, load_run
  >>> out = tempfile.mkdtemp()
  >>> with RunWriter(out, {}, {"loss": ((), "float32"), "hist": ((2,), "int32")}) as w:
  ...     w.append(0, {"loss": 0.5, "hist": [3, 1]})
  ...     w.append(1, {"loss": 0.25})
  >>> to_csv(load_run(out), f"{out}/run.csv")
  >>> print(open(f"{out}/run.csv").read(), end="")
  step,key,value
  0,loss,0.5
  0,hist[0],3
  0,hist[1],1
  1,loss,0.25
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Any

import numpy as np

from lmd4ml.telemetry.sinks import TensorBoardSink
from lmd4ml.telemetry.store import STATUSES, Run


def element_names(key: str, shape: tuple[int, ...]) -> list[str]:
    """Column or tag names of a field's elements: ``key``, ``key[i]``, ``key[i,j]``, …"""
    if not shape:
        return [key]
    return [f"{key}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def as_text(values: np.ndarray) -> np.ndarray:
    """Values as CSV cells: booleans as 0/1, so that every cell parses as a number; floats as
    the shortest text that reads back to the same value of their own dtype."""
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    return values.astype(str)


def to_csv(run: Run, path: str | os.PathLike) -> None:
    """Write the run in long form, ``step,key,value``: one row per element of every field at
    every step it was tracked, by step, then fields in the run's order, then elements.

    A scalar field's key is its name; an array's elements are ``name[i]`` (``name[i,j]`` for
    2-D, …, C order). Booleans are written as 0/1, floats as the shortest text that reads
    back (as their dtype) to the same value, ``nan``/``inf`` as such. A field not tracked at
    a step has no rows there.
    """
    # Empty arrays first: a run without fields still concatenates.
    steps, keys, values = [np.empty(0, np.int64)], [np.empty(0, object)], [np.empty(0, object)]
    for key in run.keys:
        field_steps, field_values = run[key]
        names = np.array(element_names(key, field_values.shape[1:]), dtype=object)
        steps.append(np.repeat(field_steps, names.size))
        keys.append(np.tile(names, len(field_steps)))
        values.append(as_text(field_values.reshape(-1)).astype(object))
    # Stable: within a step, the fields stay in the run's order and the elements in theirs.
    order = np.argsort(np.concatenate(steps), kind="stable")
    columns = [np.concatenate(column)[order].tolist() for column in (steps, keys, values)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "key", "value"])
        writer.writerows(zip(*columns, strict=True))


def to_json(run: Run, path: str | os.PathLike) -> None:
    """Write ``{"metadata", "steps", "times", "fields": {name: {"shape", "dtype", "steps",
    "values"}}}``: every step of the run and its wall time (:meth:`Run.times`), then each
    field's steps and one (nested) list of values per step. Non-finite floats are written as
    ``NaN``/``Infinity``, which Python's ``json`` reads back but strict JSON parsers reject.
    """
    fields = {}
    for key in run.keys:
        steps, values = run[key]
        fields[key] = {
            "shape": list(values.shape[1:]),
            "dtype": values.dtype.name,
            "steps": steps.tolist(),
            "values": values.tolist(),
        }
    with open(path, "w") as f:
        clock = {"steps": run.steps().tolist(), "times": run.times().tolist()}
        json.dump({"metadata": run.metadata, **clock, "fields": fields}, f)


def replay(run: Run, sink: Any) -> None:
    """Send a stored run through a live sink, as if it were training: ``start`` with the
    run's metadata (plus its ``name`` and ``run_dir``) and layout, ``write`` every step with
    its values and wall time (the run's start time for a run of format version 1, which kept
    no clock), ``close`` with the run's status ("incomplete" for one still marked running:
    killed, or training now). A sink that raises is closed as "failed" and the error goes on.
    """
    metadata = {**run.metadata, "name": run.path.name, "run_dir": str(run.path)}
    steps, times = run.steps(), run.times()
    times = np.where(np.isnan(times), float(run.metadata["start_time"]), times)
    columns = {key: run[key] for key in run.keys}
    cursor = dict.fromkeys(columns, 0)
    sink.start(metadata, {key: (run.shapes[key], run.dtypes[key]) for key in run.keys})
    try:
        for step, wall_time in zip(steps.tolist(), times.tolist(), strict=True):
            values = {}
            for key, (field_steps, field_values) in columns.items():
                at = cursor[key]
                if at < len(field_steps) and field_steps[at] == step:
                    values[key] = field_values[at]
                    cursor[key] = at + 1
            sink.write(step, wall_time, values)
    except BaseException:
        sink.close("failed")
        raise
    status = run.metadata["status"]
    sink.close(status if status in STATUSES else "incomplete")


def to_tensorboard(run: Run, logdir: str | os.PathLike) -> pathlib.Path:
    """Write a stored run as TensorBoard event files in ``logdir/<run name>`` and return that
    directory: :func:`replay` through :class:`~lmd4ml.telemetry.sinks.TensorBoardSink`, the
    writer a live run uses (scalars grouped by ``/``, histograms with their bins' real edges,
    2-D histograms as images, each step at its wall time). A run directory that already holds
    event files is refused (``FileExistsError``).
    """
    sink = TensorBoardSink(logdir)
    replay(run, sink)
    return sink.path
