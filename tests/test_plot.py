"""lm.plot: the dashboard's figure, static, from a History, a stored Run or a run directory."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import plotly.graph_objects as go
import pytest

import lmd4ml as lm


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[lm.History, Path]:
    """One short run of a two-layer model: its History and its stored run."""
    rng = np.random.default_rng(0)
    data = [(jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=8)))] * 6

    def loss_fn(w, batch):
        x, y = batch
        return (jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2

    quantities = [lm.Loss(), lm.GradNorm(per_layer=True), lm.Alpha(), lm.NormTest(),
                  lm.GradHist1d(nbins=10, maxval=1.0)]  # fmt: skip
    params = {"a": jnp.full((3, 4), 0.3), "b": jnp.full(4, 0.1)}
    learner = lm.Learner(params, loss_fn, data, optax.sgd(0.05), quantities)
    runs = tmp_path_factory.mktemp("runs")
    history = lm.train(learner, epochs=2, runs_dir=runs, run_name="r", progress=False)
    return history, runs / "r"


def drawn(fig: go.Figure) -> dict[tuple[str, str], go.Scatter]:
    """(field, kind) -> trace, for the traces drawing a run's values."""
    return {(t.meta["field"], t.meta["kind"]): t for t in fig.data if t.meta["kind"] != "static"}


def test_a_history_a_run_and_a_run_directory_give_the_pages_figure(trained):
    history, run_dir = trained
    from_history, from_run, from_dir = (
        lm.plot(history), lm.plot(lm.load_run(run_dir)), lm.plot(str(run_dir))
    )  # fmt: skip
    assert all(isinstance(f, go.Figure) for f in (from_history, from_run, from_dir))
    assert from_run.to_dict() == from_dir.to_dict()
    # the same panels and values whichever way; a History has no metadata, so its histogram
    # is over bin positions rather than the gradient's values
    got, want = drawn(from_history), drawn(from_run)
    assert got.keys() == want.keys()
    assert {"lines", "alpha_all", "alpha_recent", "norm_circle", "heatmap", "bars"} <= {
        kind for _, kind in got
    }
    for key, trace in want.items():
        if key[1] not in ("heatmap", "bars"):
            assert trace.x == got[key].x and trace.y == got[key].y, key
    np.testing.assert_allclose(got["loss", "lines"].y, history["loss"])
    assert got["loss", "lines"].x == tuple(history.steps("loss").tolist())
    assert want["grad_hist_1d", "bars"].x[0] == pytest.approx(-0.9)  # a bin's centre
    assert got["grad_hist_1d", "bars"].x[0] == 0
    # a per-layer pytree: a line per leaf, named by its path
    assert {"grad_norm['a']", "grad_norm['b']", "grad_norm['total']"} <= {f for f, _ in got}


def test_options_reach_the_figure_and_bad_ones_are_refused(trained):
    history, run_dir = trained
    fig = lm.plot(run_dir, smoothing=0.9, log=["mini-batch loss"], dark=True)
    kinds = [t.meta["kind"] for t in fig.data if t.meta["field"] == "loss"]
    assert kinds == ["raw", "lines"]
    (loss,) = [t for t in fig.data if t.meta["field"] == "loss" and t.meta["kind"] == "lines"]
    assert fig.layout[loss.yaxis.replace("y", "yaxis")].type == "log"
    assert fig.layout.template.layout.paper_bgcolor == "rgb(17,17,17)"
    # a static figure has no switches that would do nothing
    assert not any(a.name for a in fig.layout.annotations) and fig.layout.uirevision is None
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\), got 1"):
        lm.plot(history, smoothing=1)
    with pytest.raises(TypeError, match=r"lm\.plot takes .* got dict"):
        lm.plot(dict(history))
    with pytest.raises(lm.RunStoreError, match="not an lmd4ml run"):
        lm.plot(run_dir.parent)


def test_plotly_is_imported_only_by_lm_plot(monkeypatch):
    here = {**os.environ, "PYTHONPATH": str(Path(lm.__file__).parents[1])}
    check = "import sys, lmd4ml; print(sorted({'plotly', 'dash'} & sys.modules.keys()))"
    out = subprocess.run([sys.executable, "-c", check], env=here, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "lmd4ml\[dashboard\]"'):
        lm.plot("anywhere")


def test_a_history_read_as_outlines_is_drawn_while_its_store_lives(trained, monkeypatch):
    """A History long enough that the store made for the plot is read as outlines: the
    figure reads that store again (to smooth over every step, for the α gauge's mean of every
    step) before it is removed. Made long enough here by small summaries and outlines."""
    from lmd4ml.dashboard.data import RunData, ema
    from lmd4ml.telemetry.store import RunWriter
    from lmd4ml.telemetry.summaries import Sizes

    history, _ = trained
    monkeypatch.setattr(RunWriter.__init__, "__defaults__", (1.0, Sizes(2, 2, 4)))
    monkeypatch.setattr(RunData.__init__, "__defaults__", (2,))
    fig = drawn(lm.plot(history, smoothing=0.5))
    loss, values = fig["loss", "lines"], np.asarray(history["loss"])
    assert len(loss.x) < len(values)  # an outline of the 12 steps
    rows = np.searchsorted(history.steps("loss"), loss.x)
    np.testing.assert_allclose(loss.y, ema(values, 0.5)[rows], rtol=1e-9)
    alphas = np.asarray(history["alpha"])
    assert fig["alpha", "alpha_all"].name == f"all: mean {np.nanmean(alphas):.2f}"
