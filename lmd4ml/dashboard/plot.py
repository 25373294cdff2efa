"""``lm.plot``: a run's cockpit as a static plotly figure, for a notebook or a paper.

The figure is the dashboard's (:func:`lmd4ml.dashboard.figure.figure`: the same panels, the
same code for each), drawn once: nothing polls or streams. It takes what ``lm.train``
returns (a :class:`~lmd4ml.History`), a stored run (``lm.load_run``'s
:class:`~lmd4ml.Run`) or a run's directory. A History is written to a temporary run store
first and read back as the dashboard reads a run, so that it is drawn by exactly the code
that draws stored runs; of its metadata only the optimizer goes with it (for the stability
limit's line), so its histograms are drawn over bin positions rather than their values, and
every quantity goes by its key.

Like the page, it draws the zones the diagnosis rules read and marks each finding on the
panels of its instruments: a stored run's findings are those its store keeps, a History's
are :func:`lmd4ml.diagnosis.diagnose`'s.

plotly is an optional dependency (the ``dashboard`` extra): ``import lmd4ml`` does not
import it, and ``lm.plot`` says how to install it when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

INSTALL = 'lm.plot needs plotly: pip install "lmd4ml[dashboard]"'


def plot(
    source: Any,
    smoothing: float = 0.0,
    log: Collection[str] = (),
    dark: bool = False,
) -> Any:
    """The cockpit of ``source`` as a ``plotly.graph_objects.Figure``.

    Args:
      source: an ``lm.History`` (what ``lm.train`` returns), an ``lm.Run``
        (``lm.load_run``), or the path of a run's directory.
      smoothing: TensorBoard's debiased moving average, a weight in [0, 1): the smoothed
        line is drawn over the raw one (0: the raw values alone).
      log: titles of the panels to draw in log scale (e.g. ``["gradient norm"]``).
      dark: plotly's dark template instead of the light one.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> data = [(jnp.ones((4, 2)), jnp.ones(4))] * 3
      >>> learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1]) ** 2, data,
      ...                      optax.sgd(0.1), [lm.Loss(), lm.GradNorm()])
      >>> history = lm.train(learner, epochs=2, runs_dir=None, progress=False)
      >>> fig = lm.plot(history)
      >>> sorted({t.meta["field"] for t in fig.data}), len(fig.data[0].x)
      (['grad_norm', 'loss'], 6)
      >>> learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1]) ** 2, data * 10,
      ...                      optax.sgd(0.0), [lm.Loss(), lm.UpdateSize()])
      >>> fig = lm.plot(lm.train(learner, runs_dir=None, progress=False))
      >>> [s.name for s in fig.layout.shapes]
      ['finding stalled']
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"lm.plot: smoothing must be in [0, 1), got {smoothing!r}")
    try:
        import plotly.graph_objects as go
    except ImportError as error:
        raise ImportError(INSTALL) from error
    from lmd4ml.dashboard.data import RunData
    from lmd4ml.dashboard.figure import figure
    from lmd4ml.dashboard.inputs import LOG_TOGGLE
    from lmd4ml.diagnosis import diagnose
    from lmd4ml.learner import History
    from lmd4ml.telemetry.store import Run

    # A long run is read as outlines; the figure reads more of the store (to smooth, for a
    # gauge), so a History's store lives until it is drawn.
    with contextlib.ExitStack() as stack:
        if isinstance(source, History):
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lmd4ml-plot-"))
            run = RunData(_store(source, Path(tmp) / "history"))
            # An empty history has nothing to diagnose (lm.diagnose says so) nor to plot.
            run.findings = list(diagnose(source)) if len(source.get("step", ())) else []
        elif isinstance(source, Run):
            run = RunData(source.path)
        elif isinstance(source, str | os.PathLike):
            run = RunData(source)
        else:
            raise TypeError(
                "lm.plot takes what lm.train returns (an lm.History), an lm.Run (lm.load_run) "
                f"or a run's directory; got {type(source).__name__}"
            )
        fig, _ = figure([run], smoothing, frozenset(log), dark)
    # What only a live page uses: its zoom kept across updates, the panels' log switches.
    layout = fig["layout"]
    del layout["uirevision"]
    layout["annotations"] = [
        a for a in layout["annotations"] if not a.get("name", "").startswith(LOG_TOGGLE)
    ]
    return go.Figure(fig)


def _store(history: Mapping[str, Any], run_dir: Path) -> Path:
    """``history`` written as a finished run in ``run_dir``: each quantity's leaves as flat
    fields, at the steps it was tracked."""
    import jax

    from lmd4ml.telemetry.store import RunWriter
    from lmd4ml.telemetry.writer import flat_name

    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, value in history.items():
        if key == "step":
            continue
        steps = history.steps(key)
        for path, leaf in jax.tree_util.tree_leaves_with_path(value):
            columns[flat_name(key, path)] = (steps, np.asarray(leaf))
    fields = {name: (values.shape[1:], values.dtype) for name, (_, values) in columns.items()}
    keys = [key for key in history if key != "step"]
    optimizer = getattr(history, "metadata", {}).get("optimizer")
    metadata = {"keys": keys} if optimizer is None else {"keys": keys, "optimizer": optimizer}
    by_step: dict[int, dict[str, np.ndarray]] = {}
    for name, (steps, values) in columns.items():
        for step, value in zip(steps.tolist(), values, strict=True):
            by_step.setdefault(step, {})[name] = value
    with RunWriter(run_dir, metadata, fields) as writer:
        for step in sorted(by_step):
            writer.append(step, by_step[step])
    return run_dir
