"""The dashboard's data, panels and callbacks, as plain functions (no server, no browser)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import plotly.io as pio
import pytest
from dash import Patch, no_update

import lmd4ml as lm
from lmd4ml.dashboard import app, cli, figure
from lmd4ml.dashboard.data import (
    VECTOR_ROWS,
    RunCache,
    RunData,
    _Column,
    ema,
    minmax_indices,
)
from lmd4ml.dashboard.panels import plan
from lmd4ml.telemetry import runs
from lmd4ml.telemetry.store import RunWriter, new_run_dir
from lmd4ml.telemetry.writer import Telemetry

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
    np.testing.assert_allclose(ema(x[3000:], 0.97, before=head), expected[3000:], rtol=1e-9)


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
    assert found[("LOSS", "mini-batch loss")][1] == ("loss",)
    assert not any(p.group == "MORE" for p in panels)


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
    assert {p.group for p in panels.values()} == {"LOSS", "MORE"}


def test_full_figure_then_patches_then_a_redraw_past_the_budget(tmp_path):
    fields = {"loss": (), "grad_hist_1d": (20,), "grad_hist_2d": (4, 5), "mine": ()}
    fake_run(tmp_path, "r", fields, 50, status="running")
    cache, listing = RunCache(), app.Listing(tmp_path)
    fig, view, status = app.update(cache, listing, [], 0.0, False, False, None, redraw=True)
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
    out, view2, _ = app.update(cache, listing, [], 0.0, False, False, view, redraw=False)
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
    out, view2, _ = app.update(cache, listing, [], 0.0, False, False, view2, redraw=False)
    assert out is no_update and view2["traces"][i]["n"] == 53

    # a trace past twice its budget: the whole figure again, thinned
    n = 2 * figure.LINE_BUDGET
    column.extend(np.arange(53, 53 + n), np.random.default_rng(0).random(n))
    out, _, _ = app.update(cache, listing, [], 0.0, False, False, view2, redraw=False)
    assert isinstance(out, dict)
    assert len(out["data"][i]["x"]) <= figure.LINE_BUDGET + 2


def test_histograms_are_drawn_over_their_bin_centres(tmp_path):
    hist_1d = lm.GradHist1d(nbins=20, maxval=0.5)
    hist_2d = lm.GradHist2d(bins=(4, 5), range=((-0.1, 0.1), (-2.0, 3.0)))
    axes = runs.base_metadata([hist_1d, hist_2d], ["a", "b"], {})["axes"]
    fields = {"grad_hist_1d": (20,), "grad_hist_2d": (4, 5), "unbinned": (3,)}
    fake_run(tmp_path, "r", fields, 5, axes=axes)
    fig, _, _ = app.update(
        RunCache(), app.Listing(tmp_path), [], 0.0, False, False, None, redraw=True
    )
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
    fig, _, status = app.update(cache, listing, paths, 0.9, True, True, None, redraw=False)
    loss = [t for t in fig["data"] if t["meta"]["field"] == "loss"]
    assert [len(t["x"]) for t in loss] == [30, 20]
    assert fig["layout"]["showlegend"] and fig["layout"]["template"]["layout"]["paper_bgcolor"]
    assert all(fig["layout"][f"yaxis{s}"]["type"] == "log" for s in ("", "2"))
    assert "FINISHED" in str(status)
    # smoothing on: the drawn loss is the EMA of the stored one
    _, values = lm.load_run(paths[0])["loss"]
    np.testing.assert_allclose(loss[0]["y"], ema(values, 0.9))
    # the newest run is shown when none is chosen
    fig, _, _ = app.update(cache, listing, [], 0.0, False, False, None, redraw=True)
    assert {t["meta"]["run"] for t in fig["data"]} == {"b"}


def test_a_killed_run_says_so_and_a_damaged_one_is_listed_disabled(tmp_path):
    fake_run(tmp_path, "killed", {"loss": ()}, 12, pid=dead_pid(), status="running")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.sqlite").write_bytes(b"not a database")
    listing = app.Listing(tmp_path)
    options = {o["value"].rsplit("/", 1)[-1]: o for o in app.run_options(listing)}
    assert options["broken"]["disabled"] and not options["killed"]["disabled"]
    _, _, status = app.update(RunCache(), listing, [], 0.0, False, False, None, redraw=True)
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
    header, *rows = download["content"].splitlines()  # lm.to_csv's long form
    assert header == "step,key,value" and len(rows) == 3 * 3
    assert [row.split(",")[:2] for row in rows[:3]] == [["0", "loss"], ["0", "v[0]"], ["0", "v[1]"]]
    with pytest.raises(SystemExit):
        cli.main(["dashboard", str(tmp_path / "nope")])
    assert "expected the runs_dir" in capsys.readouterr().err


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
