"""The page's text about runs: the runs table, each run's label, progress and the CSV.

Plain functions of run metadata and stored runs (no Dash here). Runs are told apart by name
and by the settings that differ between them: a run's ``config`` (its entries flattened to
``key.sub``), of which the runs table shows those that differ among the listed runs, and an
overlay's legend those that differ among the shown ones. The CSV holds every value of every
chosen run in long format, one row per value: ``step, run, key, value``.

Example:
  >>> runs = [{"name": "a", "config": {"lr": 0.1, "seed": 0}},
  ...         {"name": "b", "config": {"lr": 0.01, "seed": 0}}]
  >>> differing(runs), labels(runs)
  (['lr'], ['a (lr=0.1)', 'b (lr=0.01)'])
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lmd4ml.telemetry.export import as_text, element_names
from lmd4ml.telemetry.store import Run

MAX_COLUMNS = 4  # settings shown in the runs table and in a legend label


def settings(metadata: Mapping[str, Any]) -> dict[str, str]:
    """A run's ``config`` as text, nested entries flattened to ``key.sub`` (numbers to 4
    significant digits); ``{}`` when it records none or not as a dict.

    Example:
      >>> settings({"config": {"lr": 0.00012345, "opt": {"name": "adam", "b1": 0.9}}})
      {'lr': '0.0001234', 'opt.name': 'adam', 'opt.b1': '0.9'}
    """
    config = metadata.get("config")
    return dict(_flat(config)) if isinstance(config, Mapping) else {}


def _flat(config: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            items += _flat(value, f"{prefix}{key}.")
        elif isinstance(value, float | int) and not isinstance(value, bool):
            items.append((f"{prefix}{key}", f"{value:.4g}"))
        else:
            items.append((f"{prefix}{key}", str(value)))
    return items


def differing(runs: Sequence[Mapping[str, Any]], limit: int = MAX_COLUMNS) -> list[str]:
    """The first ``limit`` settings whose values are not the same in every one of ``runs``
    that records some (a setting one of them lacks counts as differing)."""
    each = [s for s in map(settings, runs) if s]
    keys = list(dict.fromkeys(k for s in each for k in s))
    return [k for k in keys if len({s.get(k) for s in each}) > 1][:limit]


def labels(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's name, with the settings that tell it from the others shown with it."""
    keys = differing(runs)
    out = []
    for run in runs:
        own = settings(run)
        told = ", ".join(f"{k}={own[k]}" for k in keys if k in own)
        out.append(f"{run['name']} ({told})" if told else str(run["name"]))
    return out


def total_steps(metadata: Mapping[str, Any]) -> int | None:
    """The steps a run expects to take, as recorded (``total_steps``), if a positive int.

    Example:
      >>> total_steps({"total_steps": 300}), total_steps({"total_steps": "300"}), total_steps({})
      (300, None, None)
    """
    total = metadata.get("total_steps")
    return total if type(total) is int and total > 0 else None


def duration(seconds: float) -> str:
    """A time left, as a person reads it.

    Example:
      >>> duration(42.4), duration(200), duration(3 * 3600 + 125)
      ('42 s', '3 min 20 s', '3 h 02 min')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress(last_step: int, total: int | None, rate: float | None) -> str:
    """ "step s of N (p%)" and, at ``rate`` steps per second, the time left; "" without a
    total. Steps count from 0: step N - 1 is the last.

    Example:
      >>> progress(99, 1000, 30.0)
      'step 99 of 1000 (10%) · ETA 30 s'
      >>> progress(99, 1000, None), progress(5, None, 2.0)
      ('step 99 of 1000 (10%)', '')
    """
    if total is None:
        return ""
    done = min(max(last_step + 1, 0), total)
    text = f"step {last_step} of {total} ({math.floor(100 * done / total)}%)"
    if rate is not None and rate > 0 and done < total:
        text += f" · ETA {duration((total - done) / rate)}"
    return text


def row(run: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    """A listed run's cells in the runs table: name, status, steps (of its total), start
    time (local), then its ``columns`` settings ("" where it has none)."""
    total = total_steps(run)
    steps = f"{run.get('n_steps', 0)}" + (f" / {total}" if total else "")
    start = run.get("start_time")
    started = (
        time.strftime("%m-%d %H:%M", time.localtime(start))
        if isinstance(start, int | float) and math.isfinite(start) and 0 <= start < 2**40
        else ""
    )
    own = settings(run)
    return [str(run["name"]), str(run.get("status", "")), steps, started] + [
        own.get(c, "") for c in columns
    ]


HEADER = ("run", "status", "steps", "started")


def long_csv(runs: Sequence[Run]) -> str:
    """Every value of every field of ``runs`` as CSV, one row per value: ``step, run, key,
    value``; an array field's elements are keys of their own (``hist[3]``, ``h2[1,4]``), as
    :func:`lmd4ml.to_csv` names its columns.

    Example:
      >>> import tempfile
      >>> from lmd4ml.telemetry.store import RunWriter, load_run, new_run_dir
      >>> runs = tempfile.mkdtemp()
      >>> with RunWriter(new_run_dir(runs, "r"), {}, {"loss": ((), "float32"),
      ...                                            "h": ((2,), "int32")}) as w:
      ...     w.append(0, {"loss": 0.5, "h": [3, 1]})
      ...     w.append(1, {"loss": 0.25})
      >>> print(long_csv([load_run(f"{runs}/r")]), end="")
      step,run,key,value
      0,r,loss,0.5
      1,r,loss,0.25
      0,r,h[0],3
      0,r,h[1],1
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "run", "key", "value"])
    for run in runs:
        for key in run.keys:
            steps, values = run[key]
            names = element_names(key, values.shape[1:])
            text = as_text(values.reshape(len(values), len(names)))
            name = run.path.name
            for element, column in zip(names, text.T.tolist(), strict=True):
                writer.writerows(
                    zip(
                        steps.tolist(),
                        [name] * len(steps),
                        [element] * len(steps),
                        column,
                        strict=True,
                    )
                )
    return out.getvalue()
