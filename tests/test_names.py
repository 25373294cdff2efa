"""Two settings of one instrument: ``name=`` keys a quantity, everywhere a key is read."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import models
import numpy as np
import optax
import pytest

import lmd4ml as lm
from lmd4ml.dashboard import app, figure
from lmd4ml.dashboard.panels import plan
from lmd4ml.telemetry import runs

NBINS = 11


def narrow_and_wide() -> list[lm.Quantity]:
    return [lm.GradHist1d(nbins=NBINS, maxval=0.01, name="narrow"), lm.GradHist1d(nbins=NBINS)]


def metrics_of(case: models.Case, quantities: list[lm.Quantity]) -> list[dict]:
    """``lm.instrument``'s metrics at each of the case's batches, as numpy."""
    step = lm.instrument(case.loss_fn, optax.sgd(0.1), quantities)
    state, out = step.init(case.params), []
    for batch in case.batches:
        state, metrics = step(state, batch)
        out.append(lm.stats.to_host(metrics))
    return out


def alone(case: models.Case, q: lm.Quantity) -> list[Any]:
    """What ``q`` gives at each step when it is the only quantity, under its default key."""
    default = dataclasses.replace(q, name=None)
    return [m[default.key] for m in metrics_of(case, [default])]


def assert_equal_steps(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# --------------------------------------------------------------------------------- the API


def test_name_sets_the_key_and_the_class_keeps_its_default() -> None:
    narrow, wide = narrow_and_wide()
    assert (narrow.key, wide.key) == ("narrow", "grad_hist_1d")
    assert lm.GradHist1d.key == "grad_hist_1d" and lm.NormTest.key == "norm_test"
    assert lm.GradHist1d(100, 0.05) == lm.GradHist1d()  # positional settings as before
    assert narrow != lm.GradHist1d(nbins=NBINS, maxval=0.01)  # the name is part of it
    assert repr(narrow) == "GradHist1d(nbins=11, maxval=0.01, name='narrow')"
    assert repr(wide) == "GradHist1d(nbins=11, maxval=0.05)"
    with pytest.raises(TypeError):
        lm.Loss("mine")  # name= is keyword-only
    assert lm.quantity("max_loss", lambda ctx: ctx.losses.max()).key == "max_loss"


@pytest.mark.parametrize("bad", ["my-hist", "1st", "", "two words", "a.b", 3])
def test_a_bad_name_is_refused_at_construction(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"GradHist1d: name= must be an identifier") as caught:
        lm.GradHist1d(maxval=0.1, name=bad)
    message = str(caught.value)
    assert repr(bad) in message and "letters, digits and _, not starting with a digit" in message
    with pytest.raises(ValueError, match=rf"lm.quantity: key must be an identifier.*{bad!r}"):
        lm.quantity(bad, lambda ctx: ctx.loss)


def test_clashing_keys_are_refused_before_any_compute(mlp_case: models.Case) -> None:
    clashes = [
        [lm.GradHist1d(), lm.GradHist1d(maxval=0.1)],  # two of a kind, neither named
        [lm.Loss(), lm.NormTest(name="loss")],  # a name taken by another quantity's key
        [lm.NormTest(name="mine"), lm.quantity("mine", lambda ctx: ctx.loss)],
    ]
    for quantities in clashes:
        key = quantities[1].key
        match = rf"share the key\(s\) \['{key}'\].*unique.*name="
        with pytest.raises(ValueError, match=match):
            lm.instrument(mlp_case.loss_fn, optax.sgd(0.1), quantities)
        with pytest.raises(ValueError, match=match):
            lm.monitor(optax.sgd(0.1), quantities)
        with pytest.raises(ValueError, match=match):
            lm.Learner(
                mlp_case.params, mlp_case.loss_fn, mlp_case.batches, optax.sgd(0.1), quantities
            )
    with pytest.raises(ValueError, match=r"'step' is reserved.*name="):
        lm.instrument(mlp_case.loss_fn, optax.sgd(0.1), [lm.Loss(name="step")])


# ------------------------------------------------------------------------- the same values


def test_two_histograms_in_one_step_equal_each_alone(mlp_case: models.Case) -> None:
    narrow, wide = narrow_and_wide()
    together = metrics_of(mlp_case, [narrow, wide])
    assert all(sorted(m) == ["grad_hist_1d", "narrow"] for m in together)
    assert_equal_steps([m["narrow"] for m in together], alone(mlp_case, narrow))
    assert_equal_steps([m["grad_hist_1d"] for m in together], alone(mlp_case, wide))
    # the settings differ, and so do the counts: the narrow one clamps more into its edges
    first = together[0]
    assert first["narrow"].sum() == first["grad_hist_1d"].sum() > 0
    edges = [0, NBINS - 1]
    assert first["narrow"][edges].sum() > first["grad_hist_1d"][edges].sum()


def test_a_renamed_norm_test_equals_the_default_one(mlp_case: models.Case) -> None:
    together = metrics_of(mlp_case, [lm.NormTest(), lm.NormTest(name="norm_test_b")])
    default = alone(mlp_case, lm.NormTest())
    assert_equal_steps([m["norm_test_b"] for m in together], default)
    assert_equal_steps([m["norm_test"] for m in together], default)


def test_two_stateful_quantities_of_one_class_keep_their_own_state(
    mlp_case: models.Case,
) -> None:
    a = lm.HessTrace(method="hutchinson", probes=3, seed=0)
    b = lm.HessTrace(method="hutchinson", probes=3, seed=1, name="trace_b")
    step = lm.instrument(mlp_case.loss_fn, optax.sgd(0.1), [a, b])
    assert sorted(step.init(mlp_case.params).quantity_states) == ["hess_trace", "trace_b"]
    together = metrics_of(mlp_case, [a, b])
    assert_equal_steps([m["hess_trace"] for m in together], alone(mlp_case, a))
    assert_equal_steps([m["trace_b"] for m in together], alone(mlp_case, b))
    assert together[0]["hess_trace"] != together[0]["trace_b"]  # other probes


def test_monitor_and_train_give_both_keys(mlp_case: models.Case, tmp_path) -> None:
    quantities = narrow_and_wide()
    want = metrics_of(mlp_case, quantities)

    tx = lm.monitor(optax.sgd(0.1), quantities)
    params, opt_state = mlp_case.params, tx.init(mlp_case.params)
    for batch, expected in zip(mlp_case.batches, want, strict=True):
        grads = jax.grad(lambda p, b=batch: mlp_case.loss_fn(p, b).mean())(params)
        updates, opt_state = tx.update(
            grads, opt_state, params, loss_fn=mlp_case.loss_fn, batch=batch
        )
        params = optax.apply_updates(params, updates)
        got = lm.metrics(opt_state)
        for key in ("narrow", "grad_hist_1d"):
            np.testing.assert_array_equal(got[key], expected[key])

    learner = lm.Learner(
        mlp_case.params, mlp_case.loss_fn, mlp_case.batches, optax.sgd(0.1), quantities
    )
    history = lm.train(learner, runs_dir=tmp_path, run_name="names-train", progress=False)
    for key in ("narrow", "grad_hist_1d"):
        np.testing.assert_array_equal(history[key], np.stack([m[key] for m in want]))

    # a schedule of its own, by name
    learner = lm.Learner(
        mlp_case.params, mlp_case.loss_fn, mlp_case.batches, optax.sgd(0.1), quantities
    )
    history = lm.train(learner, epochs=2, schedules={"narrow": 2}, runs_dir=None, progress=False)
    n = 2 * len(mlp_case.batches)
    assert history.steps("narrow").tolist() == list(range(0, n, 2))
    assert history.steps("grad_hist_1d").tolist() == list(range(n))


# ----------------------------------------------------------------- metadata, dashboard, export


def test_metadata_records_each_keys_class_and_settings() -> None:
    quantities = [
        *narrow_and_wide(),
        lm.NormTest(name="norm_test_b"),
        lm.GradHist2d(bins=(3, 4), name="joint"),
        lm.quantity("max_loss", lambda ctx: ctx.losses.max()),
    ]
    meta = runs.base_metadata(quantities, [q.key for q in quantities], {})
    described = json.loads(json.dumps(meta["quantities_by_key"], allow_nan=False))
    assert described == meta["quantities_by_key"]  # JSON as it is
    assert described["narrow"] == {
        "class": "GradHist1d",
        "kind": "grad_hist_1d",
        "args": {"nbins": NBINS, "maxval": 0.01},
    }
    assert described["grad_hist_1d"]["args"] == {"nbins": NBINS, "maxval": 0.05}
    assert described["norm_test_b"] == {"class": "NormTest", "kind": "norm_test", "args": {}}
    assert described["joint"]["args"] == {"bins": [3, 4], "range": [[-1.0, 1.0], [-2.0, 2.0]]}
    assert described["max_loss"]["class"] == "quantity"
    assert described["max_loss"]["kind"] == "max_loss"
    assert set(meta["axes"]) == {"narrow", "grad_hist_1d", "joint"}  # each its own bins
    # and so a run's metadata can rebuild its quantities
    assert lm.GradHist1d(**described["narrow"]["args"], name="narrow") == quantities[0]


def test_the_dashboard_draws_a_renamed_histogram_as_a_histogram(
    mlp_case: models.Case, tmp_path
) -> None:
    learner = lm.Learner(
        mlp_case.params,
        mlp_case.loss_fn,
        mlp_case.batches,
        optax.sgd(0.1),
        [lm.Loss(), *narrow_and_wide(), lm.NormTest(name="noise")],
    )
    lm.train(learner, runs_dir=tmp_path, run_name="names-dash", progress=False)
    run = lm.load_run(tmp_path / "names-dash")
    assert run.metadata["quantities_by_key"]["narrow"]["kind"] == "grad_hist_1d"

    fig, _, _ = app.update(
        app.RunCache(), app.Listing(tmp_path), [], 0.0, (), False, None, redraw=True
    )
    panels = figure.runs_plan([app.RunCache().get(tmp_path / "names-dash")])
    by_field = {(f, p.kind): p for p in panels for f in p.fields}
    for key in ("narrow", "grad_hist_1d"):
        for kind in ("heatmap", "bars"):
            assert by_field[key, kind].group == "GRADIENTS"
    assert by_field["noise", "lines"].title == "gradient tests (noise)"
    assert not any(p.group == "MORE" for p in panels)

    traces = {(t["meta"]["field"], t["type"]): t for t in fig["data"]}
    centres = np.linspace(-0.01, 0.01, NBINS + 1)[:-1] + 0.01 / NBINS
    np.testing.assert_allclose(traces["narrow", "heatmap"]["y"], centres, atol=1e-15)
    np.testing.assert_allclose(traces["narrow", "bar"]["x"], centres, atol=1e-15)
    np.testing.assert_allclose(traces["grad_hist_1d", "bar"]["x"][-1], 0.05 - 0.05 / NBINS)


def test_a_run_without_kinds_is_planned_as_before() -> None:
    shapes = {"narrow": (NBINS,), "noise": ()}
    old = plan(["narrow", "noise"], shapes)
    assert [(p.group, p.kind, p.fields) for p in old] == [
        ("MORE", "heatmap", ("narrow",)),
        ("MORE", "lines", ("noise",)),
    ]
    new = plan(["narrow", "noise"], shapes, {"narrow": "grad_hist_1d", "noise": "norm_test"})
    assert [(p.group, p.kind, p.fields) for p in new] == [
        ("GRADIENTS", "lines", ("noise",)),
        ("GRADIENTS", "tests", ("noise", "", "")),  # the gauge's circle: a norm test
        ("GRADIENTS", "heatmap", ("narrow",)),
        ("GRADIENTS", "bars", ("narrow",)),
    ]


def test_tensorboard_bins_a_renamed_histogram_by_its_settings(
    mlp_case: models.Case, tmp_path
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = lm.Learner(
        mlp_case.params, mlp_case.loss_fn, mlp_case.batches, optax.sgd(0.1), narrow_and_wide()
    )
    lm.train(learner, runs_dir=tmp_path, run_name="names-tb", progress=False)
    logdir = lm.to_tensorboard(lm.load_run(tmp_path / "names-tb"), tmp_path / "tb")
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    events.Reload()
    for key, maxval in (("narrow", 0.01), ("grad_hist_1d", 0.05)):
        limits = events.Histograms(key)[0].histogram_value.bucket_limit
        np.testing.assert_allclose(limits, np.linspace(-maxval, maxval, NBINS + 1)[1:])
