"""The dashboard's data, panels and callbacks, as plain functions (no server, no browser)."""

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import plotly.io as pio
import pytest
from dash import Patch, html, no_update

import lmd4ml as lm
from lmd4ml.dashboard import app, cli, data, figure, findings, inputs
from lmd4ml.dashboard.data import (
    VECTOR_ROWS,
    RunCache,
    RunData,
    _Column,
    ema,
    ema_at,
    minmax_indices,
)
from lmd4ml.dashboard.panels import grid, leaf_label, plan
from lmd4ml.describing import json_safe
from lmd4ml.diagnosis import LiveDiagnosis
from lmd4ml.telemetry import runs, store
from lmd4ml.telemetry.store import Run, RunWriter, new_run_dir
from lmd4ml.telemetry.summaries import DEFAULT_SIZES, Sizes
from lmd4ml.telemetry.writer import Telemetry

SMALL = Sizes(block_rows=4, factor=2, chunk_rows=8)  # summaries of a few thousand steps
COCKPIT_SHAPES = {
    "alpha": (), "distance": (), "update_size": (), "grad_norm": (), "norm_test": (),
    "inner_test": (), "ortho_test": (), "grad_hist_1d": (100,), "grad_hist_2d": (40, 50),
    "mean_gsnr": (), "hess_max_ev": (), "hess_trace": (), "tic_diag": (), "tic_trace": (),
    "loss": (), "early_stopping": (), "cabs": (), "noise_scale": (),
}  # fmt: skip


def fake_run(runs_dir, name, fields, n_steps, pid=None, status="finished", **metadata):
    """A stored run of ``n_steps`` steps of made-up values for ``fields`` {key: shape}."""
    metadata |= {"keys": list(fields), "pid": os.getpid() if pid is None else pid}
    layout = {k: (shape, "int32" if "hist" in k else "float32") for k, shape in fields.items()}
    writer = RunWriter(new_run_dir(runs_dir, name), metadata, layout)
    rng = np.random.default_rng(0)
    for step in range(n_steps):
        writer.append(step, {k: rng.integers(0, 9, s) if "hist" in k else rng.random(s)
                             for k, s in fields.items()})  # fmt: skip
    if status == "running":
        writer.flush()
    else:
        writer.close(status)
    return writer


LEAVES = [f"grad_norm['layers'][{i}]['{w}']" for i in range(3) for w in ("kernel", "bias")]
KINDS = {
    "loss": "loss",
    "grad_norm": "grad_norm",
    "alpha": "alpha",
    "norm_test": "norm_test",
    "inner_test": "inner_test",
    "ortho_test": "ortho_test",
    "grad_hist_1d": "grad_hist_1d",
    "hess_trace": "hess_trace",
    "hyper/learning_rate": "hyperparameter",
    "val_acc": "user",
}


def cockpit_values(step: int, lr: float) -> dict[str, object]:
    """Made-up values of every kind of panel at ``step``: each a known function of it (α
    beyond the gauge's edge every 7th step, validation accuracy every 5th, no Hessian
    trace before step 1000)."""
    values = {
        "loss": 2.3 * np.exp(-10 * lr * step), "grad_norm['total']": 1 + 0.01 * step,
        "alpha": 2.5 if step % 7 == 3 else -1 + 0.05 * step, "norm_test": 0.5 + 0.01 * step,
        "inner_test": 0.2, "ortho_test": 20.0, "grad_hist_1d": np.arange(8) * step,
        "hyper/learning_rate": lr * min(1.0, (step + 1) / 10),
    }  # fmt: skip
    values |= {leaf: 10.0**-i * (step + 1) for i, leaf in enumerate(LEAVES)}
    if step % 5 == 4:
        values["val_acc"] = 1 - 0.9 * np.exp(-step / 20)
    return values


def cockpit_run(
    runs_dir, name, n_steps, lr=0.01, status="finished", summarise=DEFAULT_SIZES, **metadata
):
    """A stored run with a panel of every kind, as lm.train records it: quantity kinds,
    histogram bins, the user's config, hyperparameters and values, the steps it expects
    (its scalars summarised with the sizes ``summarise``)."""
    fields = {key: ((), "float32") for key in KINDS if key not in ("grad_norm", "grad_hist_1d")}
    fields |= {leaf: ((), "float32") for leaf in ["grad_norm['total']", *LEAVES]}
    fields["grad_hist_1d"] = ((8,), "int64")
    metadata = {
        "keys": list(KINDS), "pid": os.getpid(), "total_steps": n_steps,
        "quantities_by_key": {k: {"class": None, "kind": kind} for k, kind in KINDS.items()},
        "axes": {"grad_hist_1d": {"gradient": np.linspace(-0.35, 0.35, 8).tolist()}},
        "config": {"lr": lr, "batch_size": 64, "optimizer": {"name": "adam"}}, **metadata,
    }  # fmt: skip
    writer = RunWriter(new_run_dir(runs_dir, name), metadata, fields, summarise=summarise)
    for step in range(n_steps):
        writer.append(step, cockpit_values(step, lr))
    if status == "running":
        writer.flush()
    else:
        writer.close(status)
    return writer


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_minmax_thinning_keeps_extremes_and_the_last_point():
    values = np.sin(np.linspace(0, 50, 100_000))
    values[12_345] = 10.0
    values[54_321] = np.nan
    keep = minmax_indices(values, 2000)
    assert len(keep) <= 2002
    assert 12_345 in keep and keep[0] == 0 and keep[-1] == 99_999
    assert np.all(np.diff(keep) > 0)


def test_ema_matches_the_recurrence():
    x = np.random.default_rng(1).normal(size=5000)
    m, expected = 0.0, []
    for i, v in enumerate(x):
        m = 0.97 * m + 0.03 * v
        expected.append(m / (1 - 0.97 ** (i + 1)))
    np.testing.assert_allclose(ema(x, 0.97), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ema(x, 0.0), x)
    with pytest.raises(ValueError, match="smoothing"):
        ema(x, 1.0)
    head = ema(x[:3000], 0.97)  # continued where it stopped, it is the same
    np.testing.assert_allclose(ema(x[3000:], 0.97, 3000, head[-1]), expected[3000:], rtol=1e-9)
    # at some indices only, a piece at a time: the same
    at = np.array([0, 1, 999, 1000, 1001, 2047, 4096, 4999])
    for piece in (1, 7, 1000, 4096, 10_000):
        values, (count, last) = ema_at(x, 0.97, at, piece)
        np.testing.assert_allclose(values, np.array(expected)[at], rtol=1e-9)
        assert count == len(x) and last == pytest.approx(expected[-1], rel=1e-9)
    assert ema_at(x, 0.97, np.array([], int))[0].shape == (0,)


def test_ema_leaves_non_finite_values_out():
    """A NaN or infinite step shows as itself and the average goes on over the finite ones
    (TensorBoard's rule): one bad step does not hide the rest of the smoothed line."""
    x = np.random.default_rng(3).normal(size=3000)
    bad = np.array([0, 5, 6, 1500, 2999])
    x[bad] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
    finite = np.isfinite(x)
    smoothed = ema(x, 0.9)
    np.testing.assert_array_equal(smoothed[~finite], x[~finite])
    np.testing.assert_allclose(smoothed[finite], ema(x[finite], 0.9), rtol=1e-12)
    by_hand = _ema_by_the_recurrence(x[finite], 0.9)
    np.testing.assert_allclose(smoothed[finite], by_hand, rtol=1e-9)
    # Read at some rows a piece at a time, and carried on in a growing column: the same.
    at = np.array([1, 5, 7, 1499, 1500, 1501, 2998])
    for piece in (1, 7, 1000):
        values, carry = ema_at(x, 0.9, at, piece)
        np.testing.assert_allclose(values, smoothed[at], rtol=1e-12)
        assert carry == (int(finite.sum()), pytest.approx(smoothed[2998], rel=1e-12))
    column = _Column(np.arange(1500), x[:1500].copy())
    column.smoothed(0.9)
    column.extend(np.arange(1500, 3000), x[1500:])
    np.testing.assert_allclose(column.smoothed(0.9), smoothed, rtol=1e-12)


def test_a_long_runs_histogram_is_read_at_steps_spread_over_it(tmp_path):
    fake_run(tmp_path, "long", {"loss": (), "grad_hist_1d": (5,)}, 2 * VECTOR_ROWS)
    run = RunData(tmp_path / "long")
    assert run.columns["loss"].n == 2 * VECTOR_ROWS
    hist = run.columns["grad_hist_1d"]
    assert hist.n == VECTOR_ROWS and hist.steps[-1] == 2 * VECTOR_ROWS - 1
    assert set(np.diff(hist.steps)) <= {1, 2, 3}  # spread evenly, the last included


def test_a_growing_column_smooths_its_new_steps_on():
    x = np.random.default_rng(2).normal(size=3000)
    column = _Column(np.arange(1000), x[:1000].copy())
    np.testing.assert_allclose(column.smoothed(0.9), ema(x[:1000], 0.9))
    column.extend(np.arange(1000, 3000), x[1000:])
    np.testing.assert_allclose(column.smoothed(0.9), ema(x, 0.9), rtol=1e-12)
    np.testing.assert_allclose(column.smoothed(0.5), ema(x, 0.5), rtol=1e-12)


def _ema_by_the_recurrence(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's debiased moving average, one step at a time."""
    average, out = 0.0, []
    for t, value in enumerate(values.astype(np.float64)):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (t + 1)))
    return np.array(out)


def test_a_long_field_is_drawn_from_its_outline_smoothed_over_every_step(tmp_path, monkeypatch):
    """3000 rows read as their outline (20 blocks or more of the store's min–max pyramid, its
    sizes made small): spikes drawn, every step counted, the smoothed line the moving average
    of the whole series at each step drawn, read once and continued live."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=3000).astype(np.float32)
    values[[100, 1700, 2900]] = [50, -40, 60]
    run_dir = new_run_dir(tmp_path, "long")
    fields = {"loss": ((), np.float32)}
    with RunWriter(run_dir, {"keys": ["loss"]}, fields, summarise=SMALL) as writer:
        for step, value in enumerate(values):
            writer.append(2 * step, {"loss": value})
    reads = []
    values_of = Run.values
    monkeypatch.setattr(Run, "values", lambda run, key: reads.append(key) or values_of(run, key))
    cache, listing = RunCache(outline_blocks=20), app.Listing(tmp_path)

    def loss_trace(smoothing: float) -> dict:
        fig, _, _ = app.update(cache, listing, [], smoothing, (), False, None, redraw=True)
        return next(
            t for t in fig["data"] if t["meta"] == {**t["meta"], "field": "loss", "kind": "lines"}
        )

    trace = loss_trace(0.0)
    column = cache.get(run_dir).columns["loss"]
    assert column.count == 3000 and 40 <= column.n < 200
    rows = np.array(trace["x"]) // 2
    assert {100, 1700, 2900, 0, 2999} <= set(rows.tolist())
    np.testing.assert_array_equal(trace["y"], values[rows].astype(np.float64))
    _, _, status = app.update(cache, listing, [], 0.0, (), False, None, redraw=True)
    assert "3000 steps" in str(status)

    for weight in (0.9, 0.5):
        trace = loss_trace(weight)
        assert trace["x"] == column.steps.tolist()  # every step held, fewer than the budget
        expected = _ema_by_the_recurrence(values, weight)[column.steps // 2]
        np.testing.assert_allclose(trace["y"], expected, rtol=1e-9)
    assert reads == ["loss"]  # read once, for the first weight
    loss_trace(0.5)
    assert reads == ["loss"]

    # a poll brings new steps, smoothed on from the whole series
    fig, view, _ = app.update(cache, listing, [], 0.5, (), False, None, redraw=True)
    new = rng.normal(size=5).astype(np.float32)
    column.extend(np.arange(6000, 6010, 2), new)
    patch, _, status = app.update(cache, listing, [], 0.5, (), False, view, redraw=False)
    kinds = {
        i: t["meta"]["kind"] for i, t in enumerate(fig["data"]) if t["meta"]["field"] == "loss"
    }
    extended = {
        kinds[op["location"][1]]: op["params"]["value"]
        for op in patch.to_plotly_json()["operations"]
        if op["location"][-1] == "y"
    }
    everything = _ema_by_the_recurrence(np.concatenate([values, new]), 0.5)
    np.testing.assert_allclose(extended["lines"], everything[3000:], rtol=1e-9)
    np.testing.assert_array_equal(extended["raw"], new.astype(np.float64))  # drawn behind
    assert reads == ["loss"] and "3005 steps" in str(status)


def test_cockpit_keys_go_to_their_groups():
    panels = plan(list(COCKPIT_SHAPES), COCKPIT_SHAPES)
    found = {(p.group, p.title): (p.kind, p.fields) for p in panels}
    assert found[("STEP SIZE", "distance and update size")] == (
        "lines",
        ("distance", "update_size"),
    )
    assert found[("GRADIENTS", "gradient tests")][1] == ("norm_test", "inner_test", "ortho_test")
    assert found[("GRADIENTS", "gradient histogram")][0] == "heatmap"
    assert found[("GRADIENTS", "gradient histogram, latest")][0] == "bars"
    assert found[("GRADIENTS", "2-D gradient histogram")][0] == "image"
    assert found[("CURVATURE", "TIC")][1] == ("tic_diag", "tic_trace")
    assert found[("CURVATURE", "top Hessian eigenvalue")][0] == "lines"
    assert found[("PERFORMANCE", "mini-batch loss")][1] == ("loss",)
    # Cockpit's gauges beside their series: α on its parabola, the tests in the plane
    assert found[("STEP SIZE", "α gauge")] == ("alpha", ("alpha",))
    assert found[("GRADIENTS", "gradient tests gauge")] == (
        "tests", ("norm_test", "inner_test", "ortho_test")
    )  # fmt: skip
    assert not any(p.group == "MORE" for p in panels)
    # a value axis titled with what it shows and its unit
    units = {p.title: p.unit for p in panels}
    assert units["gradient norm"] == "‖g‖₂ (loss / θ)"
    assert units["suggested batch sizes"] == "batch size (samples)"


def test_hess_max_ev_siblings_share_a_curvature_panel_whatever_the_name():
    keys = ["hess_max_ev", "hess_max_ev_converged", "hess_max_ev_iterations", "top",
            "top_converged", "top_iterations"]  # fmt: skip
    kinds = {"top": "hess_max_ev", "top_converged": "hess_max_ev_converged",
             "top_iterations": "hess_max_ev_iterations"}  # fmt: skip
    panels = {p.title: p for p in plan(keys, dict.fromkeys(keys, ()), kinds)}
    lanczos = panels["Lanczos products, converged"]
    assert (lanczos.group, lanczos.kind) == ("CURVATURE", "lines")
    assert lanczos.fields == (
        "hess_max_ev_iterations", "top_iterations", "hess_max_ev_converged", "top_converged"
    )  # fmt: skip
    assert panels["top Hessian eigenvalue"].fields == ("hess_max_ev", "top")
    assert {p.group for p in panels.values()} == {"CURVATURE"}


def test_custom_quantities_get_a_plot_from_their_shape():
    shapes = {"loss": (), "mine": (), "vec": (7,), "per_layer['a']": (), "per_layer['b']": ()}
    panels = {p.title: p for p in plan(["loss", "mine", "vec", "per_layer"], shapes)}
    assert (panels["mine"].kind, panels["vec"].kind) == ("lines", "heatmap")
    assert panels["per_layer"].fields == ("per_layer['a']", "per_layer['b']")
    assert panels["per_layer"].group == "MORE"
    # only what is tracked: no gradient or curvature panels for this run
    assert {p.group for p in panels.values()} == {"PERFORMANCE", "MORE"}


def test_cockpits_bottom_row_and_layers_past_four_leaves():
    leaves = [f"grad_norm['l{i}']" for i in range(6)]
    shapes = {
        "loss": (),
        "hyper/learning_rate": (),
        "hyper/b1": (),
        "val_acc": (),
        "val_loss": (),
        **dict.fromkeys(leaves, ()),
        "few['a']": (),
        "few['b']": (),
    }
    kinds = {"hyper/learning_rate": "hyperparameter", "hyper/b1": "hyperparameter",
             "val_acc": "user", "val_loss": "user"}  # fmt: skip
    keys = ["loss", "grad_norm", "hyper/learning_rate", "hyper/b1", "val_acc", "val_loss",
            "few"]  # fmt: skip
    panels = plan(keys, shapes, kinds)
    drawn = [(p.group, p.kind, p.title, p.fields, p.unit) for p in panels]
    assert drawn == [
        ("HYPERPARAMETERS", "lines", "learning_rate", ("hyper/learning_rate",), "learning_rate"),
        ("HYPERPARAMETERS", "lines", "b1", ("hyper/b1",), "b1"),
        # six leaves: one heatmap of labelled rows, not six lines
        ("STEP SIZE", "layers", "grad_norm by layer", ("grad_norm",), "‖g‖₂ (loss / θ)"),
        ("PERFORMANCE", "lines", "mini-batch loss", ("loss",), "loss (batch mean)"),
        ("PERFORMANCE", "lines", "val_acc", ("val_acc",), "val_acc"),
        ("PERFORMANCE", "lines", "val_loss", ("val_loss",), "val_loss"),
        ("MORE", "lines", "few", ("few['a']", "few['b']"), "few"),  # two leaves: lines
    ]  # fmt: skip
    # below Cockpit's columns, the bottom row fills the grid's width, its last panel spanning
    # what is left; other quantities come after
    places, n_rows, n_cols = grid(panels)
    assert (n_rows, n_cols) == (4, 3)
    assert places == [(2, 1, 1), (2, 2, 1), (1, 1, 1), (2, 3, 1), (3, 1, 1), (3, 2, 2),
                      (4, 1, 1)]  # fmt: skip
    assert leaf_label("grad_norm", "grad_norm['layers'][2]['kernel']") == "layers/2/kernel"


def test_full_figure_then_patches_then_a_redraw_past_the_budget(tmp_path):
    fields = {"loss": (), "grad_hist_1d": (20,), "grad_hist_2d": (4, 5), "mine": ()}
    fake_run(tmp_path, "r", fields, 50, status="running")
    cache, listing = RunCache(), app.Listing(tmp_path)
    fig, view, status = app.update(cache, listing, [], 0.0, (), False, None, redraw=True)
    kinds = {(t["meta"]["field"], t["type"]) for t in fig["data"]}
    assert kinds == {("loss", "scatter"), ("grad_hist_1d", "heatmap"), ("grad_hist_1d", "bar"),
                     ("grad_hist_2d", "heatmap"), ("mine", "scatter")}  # fmt: skip
    assert all(len(t["x"]) == 50 for t in fig["data"] if t["type"] == "scatter")
    assert "STARTING" in str(status)  # running, its process alive, no ring: not live yet
    json.loads(pio.to_json(fig))  # what Dash sends must serialise

    # new steps reach the cached run; the next poll sends only them
    run = cache.get(str(tmp_path / "r"))
    column = run.columns["loss"]
    column.extend(np.arange(50, 53), np.array([0.5, np.nan, 0.25]))
    out, view2, _ = app.update(cache, listing, [], 0.0, (), False, view, redraw=False)
    assert isinstance(out, Patch)
    ops = out.to_plotly_json()["operations"]
    i = next(i for i, t in enumerate(fig["data"]) if t["meta"]["field"] == "loss")
    assert ops == [
        {"operation": "Extend", "location": ["data", i, "x"], "params": {"value": [50, 51, 52]}},
        {
            "operation": "Extend",
            "location": ["data", i, "y"],
            "params": {"value": [0.5, None, 0.25]},
        },
    ]
    assert view2["traces"][i]["n"] == 53
    # nothing new: the page is left alone (a replot costs it far more than a poll)
    out, view2, _ = app.update(cache, listing, [], 0.0, (), False, view2, redraw=False)
    assert out is no_update and view2["traces"][i]["n"] == 53

    # a trace past twice its budget: the whole figure again, thinned
    n = 2 * figure.LINE_BUDGET
    column.extend(np.arange(53, 53 + n), np.random.default_rng(0).random(n))
    out, _, _ = app.update(cache, listing, [], 0.0, (), False, view2, redraw=False)
    assert isinstance(out, dict)
    assert len(out["data"][i]["x"]) <= figure.LINE_BUDGET + 2


def test_histograms_are_drawn_over_their_bin_centres(tmp_path):
    hist_1d = lm.GradHist1d(nbins=20, maxval=0.5)
    hist_2d = lm.GradHist2d(bins=(4, 5), range=((-0.1, 0.1), (-2.0, 3.0)))
    axes = runs.base_metadata([hist_1d, hist_2d], ["a", "b"], {})["axes"]
    fields = {"grad_hist_1d": (20,), "grad_hist_2d": (4, 5), "unbinned": (3,)}
    fake_run(tmp_path, "r", fields, 5, axes=axes)
    fig, _, _ = app.update(RunCache(), app.Listing(tmp_path), [], 0.0, (), False, None, redraw=True)
    by = {(t["meta"]["field"], t["type"]): t for t in fig["data"]}
    centres = np.linspace(-0.5, 0.5, 21)[:-1] + 0.025
    np.testing.assert_allclose(by["grad_hist_1d", "heatmap"]["y"], centres)
    np.testing.assert_allclose(by["grad_hist_1d", "bar"]["x"], centres)
    image = by["grad_hist_2d", "heatmap"]
    np.testing.assert_allclose(image["y"], [-0.075, -0.025, 0.025, 0.075])  # gradient: rows
    np.testing.assert_allclose(image["x"], [-1.5, -0.5, 0.5, 1.5, 2.5])  # parameter: columns
    assert "parameter" in image["hovertemplate"]
    assert by["unbinned", "heatmap"]["y"] == [0, 1, 2]

    def titles(trace: dict) -> tuple[str, str]:
        """The (x, y) axis titles of the panel ``trace`` is drawn in."""
        axes = (fig["layout"][trace[a].replace(a[0], f"{a[0]}axis")] for a in ("xaxis", "yaxis"))
        return tuple(axis.get("title", {}).get("text") for axis in axes)

    assert titles(by["grad_hist_1d", "heatmap"]) == ("step", "gradient")
    assert titles(by["grad_hist_1d", "bar"]) == ("gradient", "count")
    assert titles(by["grad_hist_2d", "heatmap"]) == ("parameter", "gradient")
    assert titles(by["unbinned", "heatmap"]) == ("step", "bin")


def test_options_and_overlay_redraw_with_one_trace_per_run(tmp_path):
    fake_run(tmp_path, "a", {"loss": (), "grad_norm": ()}, 30)
    fake_run(tmp_path, "b", {"loss": ()}, 20)
    cache, listing = RunCache(), app.Listing(tmp_path)
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    logged = frozenset({"gradient norm", "mini-batch loss"})
    fig, _, status = app.update(cache, listing, paths, 0.9, logged, True, None, redraw=False)
    loss = [t for t in fig["data"] if t["meta"]["field"] == "loss" and t.get("opacity") is None]
    assert [len(t["x"]) for t in loss] == [30, 20]
    assert fig["layout"]["showlegend"] and fig["layout"]["template"]["layout"]["paper_bgcolor"]
    assert all(fig["layout"][f"yaxis{s}"]["type"] == "log" for s in ("", "2"))
    assert "FINISHED" in str(status)
    # smoothing on: the drawn loss is the EMA of the stored one
    _, values = lm.load_run(paths[0])["loss"]
    np.testing.assert_allclose(loss[0]["y"], ema(values, 0.9))
    # the newest run is shown when none is chosen
    fig, _, _ = app.update(cache, listing, [], 0.0, (), False, None, redraw=True)
    assert {t["meta"]["run"] for t in fig["data"]} == {"b"}


def test_a_killed_run_says_so_and_a_damaged_one_is_listed_disabled(tmp_path):
    fake_run(tmp_path, "killed", {"loss": ()}, 12, pid=dead_pid(), status="running")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.sqlite").write_bytes(b"not a database")
    listing = app.Listing(tmp_path)
    options = {o["value"].rsplit("/", 1)[-1]: o for o in app.run_table(listing)[0]}
    assert options["broken"]["disabled"] and not options["killed"]["disabled"]
    _, _, status = app.update(RunCache(), listing, [], 0.0, (), False, None, redraw=True)
    assert "TRAINING PROCESS GONE" in str(status) and "12 stored steps" in str(status)


def test_a_live_run_is_followed_through_its_ring_until_it_ends(tmp_path):
    run_dir = new_run_dir(tmp_path, "live")
    shapes = {
        "loss": jax.ShapeDtypeStruct((), np.float32),
        "h": jax.ShapeDtypeStruct((3,), np.int32),
    }
    telemetry = Telemetry(run_dir, {"keys": ["loss", "h"], "pid": os.getpid()}, shapes)
    try:
        telemetry.submit(0, {"loss": np.float32(1.0), "h": np.arange(3, dtype=np.int32)})
        for _ in range(100):  # the writer thread publishes within its interval
            data = RunData(run_dir)
            data.refresh()
            if data.last_step == 0:
                break
        assert data.state == "live" and data.version == 1
        for step in range(1, 6):
            telemetry.submit(step, {"loss": np.float32(1 / (step + 1))})
        telemetry.close()
        data.refresh()
    finally:
        telemetry.close()
    assert data.state == "finished" and data.version == 2
    assert data.columns["loss"].steps.tolist() == list(range(6))
    assert data.columns["h"].steps.tolist() == [0]


def test_pause_csv_and_the_command_line(tmp_path, capsys):
    assert app.toggle_pause(None) == (False, "❚❚ pause", "")
    assert app.toggle_pause(1)[0] and app.toggle_pause(1)[2] == "❚❚ PAUSED"
    fake_run(tmp_path, "r", {"loss": (), "v": (2,)}, 3)
    download = app.csv_download(app.Listing(tmp_path), [])
    assert download["filename"] == "r.csv"
    _, loss = lm.load_run(tmp_path / "r")["loss"]
    assert download["content"].splitlines()[:2] == ["step,run,key,value", f"0,r,loss,{loss[0]!s}"]
    with pytest.raises(SystemExit):
        cli.main(["dashboard", str(tmp_path / "nope")])
    assert "expected the runs_dir" in capsys.readouterr().err
    assert cli.configure(["dashboard", str(tmp_path)]).docs == findings.DOCS_URL
    docs = cli.configure(["dashboard", str(tmp_path), "--docs", "https://x.org/lmd4ml"]).docs
    assert docs == "https://x.org/lmd4ml/"
    with pytest.raises(SystemExit):
        cli.main(["dashboard", str(tmp_path), "--docs", "file:///etc"])
    assert "docs_url must be an http(s) URL" in capsys.readouterr().err


def test_dashboard_needs_a_runs_dir():
    learner = lm.Learner(jnp.zeros(2), lambda w, b: (b @ w) ** 2, [jnp.ones((2, 2))],
                         optax.sgd(0.1), [lm.Loss()])  # fmt: skip
    with pytest.raises(ValueError, match="runs_dir"):
        lm.train(learner, runs_dir=None, dashboard=True, progress=False)


def test_training_goes_on_when_its_dashboard_dies(tmp_path, capsys):
    from lmd4ml.dashboard import launch

    def kill_the_server(epoch, history):
        if epoch == 1:
            for _, proc in launch._started.values():
                proc.kill()
                proc.wait()

    data = [(jnp.ones((4, 2)), jnp.ones(4))] * 3
    learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1]) ** 2, data,
                         optax.sgd(0.1), [lm.Loss()])  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    history = lm.train(learner, epochs=3, runs_dir=tmp_path, dashboard=port,
                       on_epoch=kill_the_server, progress=False)  # fmt: skip
    assert f"lmd4ml dashboard: http://127.0.0.1:{port}/ (server pid" in capsys.readouterr().out
    assert history.dashboard_url == f"http://127.0.0.1:{port}/"  # the URL it serves on
    assert len(history["step"]) == 9
    assert lm.list_runs(tmp_path)[-1]["status"] == "finished"


def traces_of(fig: dict, field: str, kind: str | None = None) -> list[dict]:
    """The traces drawing ``field`` (of plotly type ``kind``)."""
    return [t for t in fig["data"] if t["meta"]["field"] == field and kind in (None, t["type"])]


def axis_of(fig: dict, trace: dict, axis: str) -> dict:
    """The layout of the x or y ``axis`` a trace is drawn on."""
    return fig["layout"][trace[f"{axis}axis"].replace(axis, f"{axis}axis")]


def test_the_figure_reads_like_cockpits(tmp_path):
    cockpit_run(tmp_path, "r", 40)
    stored = lm.load_run(tmp_path / "r")
    fig, view = figure.figure([RunData(tmp_path / "r")], 0.5, {"grad_norm by layer"})
    json.loads(pio.to_json(fig))  # what Dash sends must serialise
    layout = fig["layout"]

    # value axes titled with their units; every heatmap has a colour bar saying what it shows
    (loss,) = [t for t in traces_of(fig, "loss") if "opacity" not in t]
    assert axis_of(fig, loss, "y")["title"]["text"] == "loss (batch mean)"
    assert axis_of(fig, loss, "x")["title"]["text"] == "step"
    heatmaps = [t for t in fig["data"] if t["type"] == "heatmap"]
    assert {t["meta"]["field"] for t in heatmaps} == {"grad_hist_1d", "grad_norm"}
    assert {t["colorbar"]["title"]["text"] for t in heatmaps} == {
        "log₁₀(1 + count)", "log₁₀ ‖g‖₂ (loss / θ)"
    }  # fmt: skip

    # smoothing: the raw series drawn faint behind the smoothed one, as TensorBoard does
    raw, smooth = traces_of(fig, "alpha", "scatter")[:2]
    steps, alphas = stored["alpha"]
    assert raw["opacity"] == figure.RAW_OPACITY and not raw["showlegend"]
    assert (raw["meta"]["kind"], smooth["meta"]["kind"]) == ("raw", "lines")
    np.testing.assert_allclose(raw["y"], alphas)
    np.testing.assert_allclose(smooth["y"], ema(alphas, 0.5))
    assert raw["x"] == smooth["x"] == steps.tolist()

    # log scale per panel: the layers' colours here, α's negative values still on a linear axis
    (layers,) = traces_of(fig, "grad_norm", "heatmap")
    assert layers["y"] == [
        "total",
        *(f"layers/{i}/{w}" for i in range(3) for w in ("kernel", "bias")),
    ]
    _, values = stored[LEAVES[2]]
    np.testing.assert_allclose(np.array(layers["z"])[:, 3], np.log10(values), rtol=1e-6)
    assert axis_of(fig, smooth, "y").get("type") is None and min(raw["y"]) < 0
    toggles = {a["name"]: a["text"] for a in layout["annotations"] if a.get("name")}
    assert toggles[inputs.LOG_TOGGLE + "grad_norm by layer"] == "log ✓"
    assert toggles[inputs.LOG_TOGGLE + "α (alpha)"] == "log"
    # α, layers, the tests' lines, latest histogram, Hessian trace, lr, loss, val_acc
    assert len(toggles) == 8
    # ... nothing in the main legend for one run: no stray "trace 15"
    assert all(t["showlegend"] is False or t.get("legend") for t in fig["data"])

    # Cockpit's α gauge: every step on the parabola, the last 10% (4 steps) apart, α beyond
    # the edge at the edge
    gauge = {t["meta"]["field"]: t for t in fig["data"] if t["xaxis"] == raw["xaxis"]}
    (every, recent) = [t for t in traces_of(fig, "alpha") if t["mode"] == "markers"]
    assert [a for _, a in recent["customdata"]] == pytest.approx(alphas[-4:].tolist())
    assert recent["x"] == pytest.approx(np.clip(alphas[-4:], -1.5, 1.5).tolist())
    assert recent["y"] == pytest.approx((np.clip(alphas[-4:], -1.5, 1.5) ** 2).tolist())
    assert every["name"] == f"all: mean {alphas.mean():.2f}" and len(every["x"]) == 40
    assert recent["marker"]["symbol"] == ["circle", "circle", "triangle-right", "circle"]
    assert gauge  # drawn on its own axes, not the α series'

    # the gradient-tests gauge: the latest norm test as a circle, inner and ortho as bands
    (circle,) = [t for t in traces_of(fig, "norm_test") if t.get("fill")]
    (inner,) = [t for t in traces_of(fig, "inner_test") if t.get("fill")]
    (ortho,) = [t for t in traces_of(fig, "ortho_test") if t.get("fill")]
    norm = stored["norm_test"][1][-1]
    assert np.hypot(circle["x"], circle["y"]) == pytest.approx(figure.symlog(norm))
    assert max(inner["y"]) == pytest.approx(figure.symlog(0.2))
    assert max(ortho["x"]) == pytest.approx(figure.symlog(figure.TESTS_EDGE))  # 20: at the edge
    assert ortho["name"] == "ortho_test 20" and circle["name"] == f"norm_test {norm:.3g}"

    # Cockpit's bottom row, and a panel without values that says so instead of empty axes
    panels = {t["meta"]["panel"] for t in fig["data"]}
    assert {"learning_rate", "mini-batch loss", "val_acc"} <= panels
    empty = [a for a in layout["annotations"] if a["text"] == figure.EMPTY]
    assert len(empty) == 1
    for trace in traces_of(fig, "hess_trace"):  # raw and smoothed
        assert axis_of(fig, trace, "x")["visible"] is False and trace["x"] == []
    key = figure.view_key([str(tmp_path / "r")], 0.5, ["grad_norm by layer"], False, [[]])
    assert view["key"] == key


def test_an_overlay_names_runs_by_their_settings_and_shows_each_runs_heatmaps(tmp_path):
    cockpit_run(tmp_path, "a", 30, lr=0.01)
    cockpit_run(tmp_path, "b", 20, lr=0.003)
    runs = [RunData(tmp_path / "a"), RunData(tmp_path / "b")]
    fig, _ = figure.figure(runs)
    legend = [t["name"] for t in fig["data"] if t["showlegend"] and not t.get("legend")]
    assert legend == ["a (lr=0.01)", "b (lr=0.003)"]  # the settings that differ, once each
    assert all(isinstance(t["showlegend"], bool) and t.get("name") for t in fig["data"])
    for field in ("grad_hist_1d", "grad_norm"):  # a heatmap for every run, titled by it
        drawn = traces_of(fig, field, "heatmap")
        assert [t["meta"]["run"] for t in drawn] == ["a", "b"]
        assert len({t["yaxis"] for t in drawn}) == 2
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert "<b>gradient histogram</b> · b" in titles
    assert [t["meta"]["run"] for t in traces_of(fig, "grad_hist_1d", "bar")] == ["a", "b"]
    loss = [t for t in traces_of(fig, "loss")]
    assert [t["line"]["color"] for t in loss] == list(figure.COLORS[:2])


def apply(fig: dict, patch: Patch) -> dict:
    """``fig`` after the Dash ``patch`` (its Assign and Extend operations)."""
    fig = json.loads(json.dumps(fig))
    for op in patch.to_plotly_json()["operations"]:
        *path, last = op["location"]
        target = fig
        for part in path:
            target = target[part]
        if op["operation"] == "Assign":
            target[last] = op["params"]["value"]
        else:
            assert op["operation"] == "Extend", op
            target[last].extend(op["params"]["value"])
    return fig


def close(a: object, b: object) -> bool:
    """Whether two JSON values are equal, numbers up to rounding (a smoothed series
    continued step by step, against the same smoothed whole)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, float | int) and isinstance(b, float | int):
        return bool(np.isclose(a, b, rtol=1e-9, atol=1e-12))
    return a == b


@pytest.mark.parametrize("outlined", [False, True])
def test_new_steps_patch_every_kind_of_trace_as_a_redraw_would_draw_it(tmp_path, outlined):
    """Read whole, or its scalars as outlines (2 blocks or more of 4 steps: 3 of 8 steps, 1
    of 4, the last 3 steps; the gauges and layers read every step when drawn)."""
    cockpit_run(tmp_path, "r", 30, status="running", summarise=SMALL)
    cache, listing = RunCache(outline_blocks=2 if outlined else 10**9), app.Listing(tmp_path)
    logged = frozenset({"grad_norm by layer"})
    fig, view, _ = app.update(cache, listing, [], 0.5, logged, False, None, redraw=True)
    run = cache.get(tmp_path / "r")
    assert (run.columns["loss"].n < 30) == outlined
    for step in range(30, 36):  # as the ring brings them
        for field, value in cockpit_values(step, 0.01).items():
            run.columns[field].extend(np.array([step]), np.array([value]))
    patch, view, _ = app.update(cache, listing, [], 0.5, logged, False, view, redraw=False)
    assert isinstance(patch, Patch)
    patched = apply(fig, patch)
    fresh, fresh_view = figure.figure([run], 0.5, logged)
    assert view["traces"] == fresh_view["traces"]
    for old, new in zip(patched["data"], fresh["data"], strict=True):
        for key in ("x", "y", "z", "name", "customdata", "marker"):
            assert close(old.get(key), new.get(key)), (old["meta"], key)
    # a panel's first values: redrawn, so that it no longer says it has none
    run.columns["hess_trace"].extend(np.array([36]), np.array([7.0]))
    out, view, _ = app.update(cache, listing, [], 0.5, logged, False, view, redraw=False)
    assert isinstance(out, dict) and figure.EMPTY not in json.dumps(out["layout"]["annotations"])
    # a test's last value not finite: its latest finite one may be one an outline left out,
    # so the figure is redrawn from every row; read whole, a patch says it
    run.columns["norm_test"].extend(np.array([37]), np.array([np.nan]))
    patch, _, _ = app.update(cache, listing, [], 0.5, logged, False, view, redraw=False)
    assert isinstance(patch, dict) == outlined
    drawn = patch if outlined else apply(out, patch)
    (gauge,) = [t for t in traces_of(drawn, "norm_test") if t.get("fill")]
    assert gauge["name"] == f"norm_test {cockpit_values(35, 0.01)['norm_test']:.3g}"


def test_an_outline_changes_only_which_points_a_line_draws(tmp_path):
    """A cockpit of 600 steps with its scalars read as outlines (20 blocks or more of the
    store's min-max pyramid, made small) draws what it draws read whole: gauges and layers
    from every step, the lines at fewer steps but each point the series' (or, smoothed, its
    moving average over every step) there; a test whose last steps are NaN shows its last
    finite value."""
    writer = cockpit_run(tmp_path, "r", 600, status="running", summarise=SMALL)
    for step in range(600, 620):  # the norm test undefined from step 600 on
        writer.append(step, {**cockpit_values(step, 0.01), "norm_test": np.nan})
    writer.close()
    outlined, whole = RunData(tmp_path / "r", 20), RunData(tmp_path / "r", 10**9)
    assert outlined.columns["loss"].n < 200 and whole.columns["loss"].n == 620
    logged = frozenset({"grad_norm by layer"})
    for smoothing in (0.0, 0.5):
        drawn, _ = figure.figure([outlined], smoothing, logged)
        expected, _ = figure.figure([whole], smoothing, logged)
        for trace, want in zip(drawn["data"], expected["data"], strict=True):
            assert trace["meta"] == want["meta"]
            field, kind = trace["meta"]["field"], trace["meta"]["kind"]
            if kind not in ("lines", "raw"):
                for key in ("x", "y", "z", "name", "customdata", "marker"):
                    assert close(trace.get(key), want.get(key)), (trace["meta"], key)
                continue
            column = whole.columns[field]
            at = np.searchsorted(column.steps, trace["x"])
            assert np.array_equal(column.steps[at], trace["x"]) and len(at) <= len(want["x"])
            series = column.smoothed(smoothing) if kind == "lines" and smoothing else column.values
            assert close(trace["y"], _series_of(series[at])), trace["meta"]
    (loss,) = [t for t in traces_of(drawn, "loss") if t["meta"]["kind"] == "lines"]
    assert len(loss["x"]) < 200  # at fewer steps than the 620 it has
    (circle,) = [t for t in traces_of(drawn, "norm_test") if t.get("fill")]
    assert circle["name"] == f"norm_test {0.5 + 0.01 * 599:.3g}"


def _series_of(values: np.ndarray) -> list:
    """Values as the figure sends them: NaN as null."""
    return [None if not np.isfinite(v) else float(v) for v in values]


def test_no_runs_or_no_steps_show_a_message_not_empty_axes(tmp_path):
    cache, listing = RunCache(), app.Listing(tmp_path)
    fig, view, _ = app.update(cache, listing, [], 0.0, (), False, None, redraw=True)
    assert fig["data"] == [] and view is None
    assert fig["layout"]["xaxis"] == {"visible": False} == fig["layout"]["yaxis"]
    assert f"no runs yet in {tmp_path}" in fig["layout"]["annotations"][0]["text"]
    cockpit_run(tmp_path, "r", 0, status="running")
    fig, view, _ = app.update(cache, app.Listing(tmp_path), [], 0.0, (), False, None, True)
    assert fig["data"] == [] and view is None
    assert fig["layout"]["annotations"][0]["text"].startswith("r: no steps recorded yet")


def test_the_status_line_says_how_far_a_run_is_and_how_long_it_has_left(tmp_path, monkeypatch):
    cockpit_run(tmp_path, "r", 50, status="running", total_steps=200)
    line = app.describe(RunData(tmp_path / "r"))  # running, no ring yet: starting
    assert "r · step 49 of 200 (25%)" in str(line)
    (bar,) = [c for c in line.children if isinstance(c, html.Progress)]
    assert (bar.value, bar.max) == ("50", "200")
    # with the store's per-step clock, the speed and the time left: 10 steps a second

    def clock(run: store.Run, last: int) -> tuple[np.ndarray, np.ndarray]:
        steps = run.steps()[-last:]
        return steps, 1.8e9 + 0.1 * steps

    monkeypatch.setattr(store.Run, "clock", clock)
    line = str(app.describe(RunData(tmp_path / "r")))
    assert "step 49 of 200 (25%) · ETA 15 s · 10 steps/s" in line
    cockpit_run(tmp_path, "done", 50)
    assert "■ FINISHED" in str(app.describe(RunData(tmp_path / "done")))


def test_the_runs_table_tells_runs_apart_and_the_csv_holds_every_value(tmp_path):
    cockpit_run(tmp_path, "a", 3, lr=0.01)
    fake_run(tmp_path, "b", {"loss": (), "h": (2, 2)}, 2, config={"lr": 0.5, "batch_size": 64})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.sqlite").write_bytes(b"not a database")
    listing = app.Listing(tmp_path)
    options, head, _ = app.run_table(listing)

    def cells(component) -> list[str]:
        return [c.children for c in component.children]

    # the settings that differ (a setting one run lacks too), not batch_size: the same in both
    assert cells(head)[1:] == ["run", "status", "steps", "started", "lr", "optimizer.name"]
    rows = {o["value"].rsplit("/", 1)[-1]: (cells(o["label"]), o["disabled"]) for o in options}
    assert rows["a"][0][:3] == ["a", "finished", "3 / 3"] and rows["a"][0][4:] == ["0.01", "adam"]
    assert rows["b"][0][:3] == ["b", "finished", "2"] and rows["b"][0][4:] == ["0.5", ""]
    assert rows["broken"][1] and not rows["a"][1]

    download = app.csv_download(listing, [str(tmp_path / "a"), str(tmp_path / "b")])
    assert download["filename"] == "2-runs.csv"
    table = list(csv.reader(io.StringIO(download["content"])))
    assert table[0] == ["step", "run", "key", "value"]
    for name in ("a", "b"):
        run = lm.load_run(tmp_path / name)
        for key in run.keys:
            steps, values = run[key]
            names = [f"{key}[{','.join(map(str, i))}]" if i else key
                     for i in np.ndindex(*values.shape[1:])]  # fmt: skip
            for step, value in zip(steps, values, strict=True):
                for element, x in zip(names, np.ravel(value), strict=True):
                    assert [str(step), name, element, str(x)] in table
    n = sum(len(lm.load_run(tmp_path / r)[k][0]) * int(np.prod(lm.load_run(tmp_path / r).shapes[k]))
            for r in ("a", "b") for k in lm.load_run(tmp_path / r).keys)  # fmt: skip
    assert len(table) == 1 + n


def test_a_panels_log_toggle_switches_it_alone():
    assert app.toggle_log("gradient norm", frozenset()) == ["gradient norm"]
    assert app.toggle_log("gradient norm", frozenset({"gradient norm", "loss"})) == ["loss"]
    assert app.toggle_log(None, frozenset({"loss"})) is no_update


STORED_FINDINGS = [
    {"code": "lr_too_small", "severity": "warning", "first_step": 5, "last_step": 25,
     "message": "α stays near -1 <b>and</b> the loss barely moves.",
     "docs": "javascript:alert(1)"},
    {"code": "stalled", "severity": "error", "first_step": 30, "last_step": 39,
     "message": "the parameters are not moving."},
    # what a damaged or hostile store could hold: none of it is shown
    {"code": "<script>", "severity": "error", "first_step": 0, "last_step": 1, "message": "x"},
    {"code": "stalled", "severity": "fatal", "first_step": 0, "last_step": 1, "message": "x"},
    {"code": "stalled", "severity": "error", "first_step": 9, "last_step": 2, "message": "x"},
    {"code": "stalled", "severity": "error", "first_step": True, "last_step": 2, "message": "x"},
    "not a finding",
]  # fmt: skip


def shapes_named(fig: dict, name: str) -> list[dict]:
    return [s for s in fig["layout"]["shapes"] if s.get("name") == name]


def test_findings_show_in_a_strip_on_their_panels_with_the_rules_zones(tmp_path):
    writer = cockpit_run(tmp_path, "r", 40, status="running")
    writer.note({"findings": STORED_FINDINGS})
    writer.close()
    run = RunData(tmp_path / "r")
    assert [(f.code, f.severity, f.first_step, f.last_step) for f in run.findings] == [
        ("lr_too_small", "warning", 5, 25), ("stalled", "error", 30, 39)
    ]  # fmt: skip
    fig, view = figure.figure([run])
    json.loads(pio.to_json(fig))

    # a band over the finding's steps on the panels of the instruments it is read from: the
    # α and loss lines (stalled reads update_size and distance, which this run has not)
    bands = shapes_named(fig, "finding lr_too_small")
    on = {figure_panel(fig, band["xref"]) for band in bands}
    assert on == {"α (alpha)", "mini-batch loss"}
    assert {(b["x0"], b["x1"], b["fillcolor"], b["label"]["text"]) for b in bands} == {
        (4.5, 25.5, findings.SEVERITY_COLORS["warning"], "lr_too_small")
    }  # fmt: skip
    assert not shapes_named(fig, "finding stalled")

    # the rules' zones: α at -1, 0 and 1 on its lines, the gradient tests at 1
    alpha_axis = traces_of(fig, "alpha", "scatter")[0]["yaxis"]
    zones = [s for s in fig["layout"]["shapes"] if s.get("name", "").startswith("zone")]
    assert sorted((s["y0"], s["yref"]) for s in zones if s["yref"] == alpha_axis) == [
        (-1, alpha_axis), (0, alpha_axis), (1, alpha_axis)
    ]  # fmt: skip
    tests_axis = traces_of(fig, "norm_test", "scatter")[0]["yaxis"]
    assert [s["y0"] for s in zones if s["yref"] == tests_axis] == [1.0]
    assert view["key"] != figure.view_key([str(run.path)], 0.0, (), False, [[]])

    # the strip above the figure: worst first; severity, code, steps, message, and a link to
    # the instrument's page of the docs site in a new tab, made from the code alone
    _, _, status = app.update(RunCache(), app.Listing(tmp_path), [], 0.0, (), False, None, True,
                              "https://docs.example/lmd4ml/")  # fmt: skip
    strip = status[-1]
    rows = [[c.children for c in row.children] for row in strip.children]
    assert [r[:3] for r in rows] == [
        ["error", "stalled", "steps 30–39"], ["warning", "lr_too_small", "steps 5–25"]
    ]  # fmt: skip
    assert rows[1][3] == STORED_FINDINGS[0]["message"]  # text: Dash escapes it
    links = [row.children[-1] for row in strip.children]
    assert [(a.href, a.target) for a in links] == [
        ("https://docs.example/lmd4ml/instruments/update_size/", "_blank"),
        ("https://docs.example/lmd4ml/instruments/alpha/", "_blank"),
    ]
    assert "<script>" not in str(strip) and "javascript" not in str(strip)
    with pytest.raises(ValueError, match="docs_url must be an http"):
        app.create_app(tmp_path, docs_url="javascript:alert(1)")


def figure_panel(fig: dict, xref: str) -> str:
    """The panel a shape on axis ``xref`` lies on, by the traces drawn there."""
    return next(t["meta"]["panel"] for t in fig["data"] if t["xaxis"] == xref)


def test_the_stability_limit_is_drawn_where_eta_lambda_max_reaches_it(tmp_path):
    sgd = json_safe(optax.sgd(0.1, momentum=0.5))
    fake_run(tmp_path, "sgd", {"hess_max_ev": ()}, 5, optimizer=sgd)
    fake_run(tmp_path, "adam", {"hess_max_ev": ()}, 5, optimizer=json_safe(optax.adam(0.1)))
    (line,) = shapes_named(figure.figure([RunData(tmp_path / "sgd")])[0], "zone η·λ_max = 3")
    assert line["y0"] == pytest.approx(3 / 0.1)  # 2 + 2β over η
    assert [s.name for s in lm.plot(tmp_path / "sgd").layout.shapes] == ["zone η·λ_max = 3"]
    adam, _ = figure.figure([RunData(tmp_path / "adam")])
    assert not [s for s in adam["layout"]["shapes"] if s.get("name", "").startswith("zone")]


def test_a_live_runs_findings_reach_the_page_while_it_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FINDINGS_S", 0.0)
    run_dir = new_run_dir(tmp_path, "live")
    live = LiveDiagnosis(window=2, min_windows=1, persist=1)
    shapes = {"update_size": jax.ShapeDtypeStruct((), np.float32)}
    metadata = {"keys": ["update_size"], "pid": os.getpid()}
    telemetry = Telemetry(run_dir, metadata, shapes, sinks=[live], notes=live.notes)
    cache, listing = RunCache(), app.Listing(tmp_path)
    try:
        telemetry.submit(0, {"update_size": np.float32(0.0)})
        for _ in range(100):  # the writer thread publishes within its interval
            run = cache.get(run_dir)
            if run.last_step == 0:
                break
            time.sleep(0.01)
        _, view, status = app.update(cache, listing, [], 0.0, (), False, None, True)
        assert run.state == "live" and run.findings == [] and len(status) == 1
        with pytest.warns(RuntimeWarning, match="stalled"):
            for step in range(1, 8):
                telemetry.submit(step, {"update_size": np.float32(0.0)})
            for _ in range(200):  # checked at steps 2, 4 and 6; noted after a burst
                if cache.get(run_dir).findings:
                    break
                time.sleep(0.01)
        assert run.state == "live" and [f.code for f in run.findings] == ["stalled"]
        fig, _, status = app.update(cache, listing, [], 0.0, (), False, view, False)
        assert isinstance(fig, dict) and shapes_named(fig, "finding stalled")  # redrawn
        assert "stalled" in str(status[-1])
    finally:
        telemetry.close()
