"""HessMaxEV's sibling values (converged, products used) and the sibling protocol: in the
metrics, the monitor, the history, the run store, the dashboard and the TensorBoard export."""

from __future__ import annotations

import dataclasses

import jax
import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm
from lmd4ml.dashboard import figure
from lmd4ml.dashboard.data import RunData
from lmd4ml.quantities import Report


def hessian_eigenvalues(case: models.Case, params, batch) -> np.ndarray:
    """The eigenvalues of the loss's Hessian, ascending, by brute force."""
    return np.linalg.eigvalsh(reference.hessian(case.loss_fn, params, batch))


def test_converged_and_iterations_are_reported_beside_the_value(regression_case) -> None:
    """A normal run converges within max_iters; one capped at 2 products (42 parameters,
    distinct eigenvalues) does not, and says so. Renamed, the siblings follow the name."""
    quantities = [
        lm.HessMaxEV(krylov_dim=4),
        lm.HessMaxEV(max_iters=2, name="capped"),
    ]
    step = lm.instrument(regression_case.loss_fn, optax.sgd(0.1), quantities)
    for t, (before, metrics, after) in enumerate(models.run_steps(step, regression_case)):
        assert set(metrics) == {
            f"{key}{suffix}"
            for key in ("hess_max_ev", "capped")
            for suffix in ("", "_converged", "_iterations")
        }
        eigenvalues = hessian_eigenvalues(
            regression_case, before.params, regression_case.batches[t]
        )
        top, radius = eigenvalues[-1], np.abs(eigenvalues).max()
        assert abs(metrics["hess_max_ev"] - top) <= 1e-3 * radius, t
        assert metrics["hess_max_ev_converged"].dtype == np.bool_
        assert bool(metrics["hess_max_ev_converged"]), t
        iterations = int(metrics["hess_max_ev_iterations"])
        assert 4 < iterations <= 100, t  # it restarted
        assert iterations == int(after.quantity_states["hess_max_ev"].iterations)

        assert not bool(metrics["capped_converged"]), t
        assert int(metrics["capped_iterations"]) == 2
        # A Ritz value lies inside the spectrum: here short of λ_max by more than rtol.
        assert eigenvalues[0] <= metrics["capped"] < top - 1e-3 * radius, t


# --------------------------------------------------------------------------- the protocol


def test_sibling_keys_clash_like_any_key() -> None:
    clashes = [
        [lm.HessMaxEV(), lm.Loss(name="hess_max_ev_iterations")],
        [lm.HessMaxEV(name="top"), lm.quantity("top_converged", lambda ctx: ctx.loss)],
    ]
    for quantities in clashes:
        with pytest.raises(ValueError, match="share the key"):
            lm.instrument(lambda w, x: x @ w, optax.sgd(0.1), quantities)
    with pytest.raises(ValueError, match=r"hess_max_ev_iterations.*HessMaxEV\(.*Loss\("):
        lm.monitor(optax.sgd(0.1), clashes[0])
    assert lm.HessMaxEV(name="top").metric_keys == ("top", "top_converged", "top_iterations")


@dataclasses.dataclass(frozen=True)
class LossSpread(lm.Quantity):
    """The mean loss, with the smallest and largest sample's beside it."""

    key = "loss_spread"
    siblings = ("min", "max")
    wrong: bool = False

    def compute(self, ctx, state):
        if self.wrong:
            return ctx.loss, state
        return Report(ctx.loss, {"min": ctx.losses.min(), "max": ctx.losses.max()}), state


def test_a_quantity_of_ones_own_reports_siblings(regression_case) -> None:
    step = lm.instrument(regression_case.loss_fn, optax.sgd(0.1), [LossSpread(name="s")])
    _, metrics = step(step.init(regression_case.params), regression_case.batches[0])
    losses = reference.per_sample_grads(
        regression_case.loss_fn, regression_case.params, regression_case.batches[0]
    ).losses
    np.testing.assert_allclose(
        [metrics["s"], metrics["s_min"], metrics["s_max"]],
        [losses.mean(), losses.min(), losses.max()],
        rtol=1e-12,
    )
    step = lm.instrument(regression_case.loss_fn, optax.sgd(0.1), [LossSpread(wrong=True)])
    with pytest.raises(TypeError, match=r"declares siblings \('min', 'max'\).*Report"):
        step(step.init(regression_case.params), regression_case.batches[0])
    with pytest.raises(ValueError, match="sibling key must be an identifier"):
        type("Bad", (lm.Quantity,), {"key": "bad", "siblings": ("a-b",), "compute": None})


# ------------------------------------------------------------------- everywhere keys are read


def test_siblings_reach_the_monitor(regression_case) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.HessMaxEV(max_iters=3)])
    params, batch = regression_case.params, regression_case.batches[0]
    opt_state = tx.init(params)
    before = lm.metrics(opt_state)
    assert not before["hess_max_ev_converged"] and before["hess_max_ev_iterations"] == 0
    assert before["hess_max_ev_iterations"].dtype == np.int32
    grads = jax.grad(lambda p: regression_case.loss_fn(p, batch).mean())(params)
    _, opt_state = jax.jit(
        lambda g, s, p: tx.update(g, s, p, loss_fn=regression_case.loss_fn, batch=batch)
    )(grads, opt_state, params)
    got = lm.metrics(opt_state)
    assert set(got) == {"step", "hess_max_ev", "hess_max_ev_converged", "hess_max_ev_iterations"}
    eigenvalues = hessian_eigenvalues(regression_case, params, batch)
    assert eigenvalues[0] <= got["hess_max_ev"] <= eigenvalues[-1]
    assert not got["hess_max_ev_converged"] and got["hess_max_ev_iterations"] == 3


def test_siblings_reach_history_store_dashboard_and_tensorboard(regression_case, tmp_path) -> None:
    quantities = [lm.Loss(), lm.HessMaxEV(max_iters=3, name="top")]
    learner = lm.Learner(
        regression_case.params,
        regression_case.loss_fn,
        regression_case.batches,
        optax.sgd(0.1),
        quantities,
    )
    history = lm.train(learner, epochs=2, runs_dir=tmp_path, run_name="r", progress=False)
    assert history["top_converged"].dtype == np.bool_ and history["top_converged"].shape == (6,)
    assert not history["top_converged"].any()  # 3 products do not reach rtol on 42 parameters
    assert history["top_iterations"].tolist() == [3] * 6
    assert history.steps("top_iterations").tolist() == list(range(6))

    run = lm.load_run(tmp_path / "r")
    assert run.metadata["keys"] == ["loss", "top", "top_converged", "top_iterations"]
    assert set(run.keys) == set(run.metadata["keys"])
    about = run.metadata["quantities_by_key"]
    assert about["top_iterations"]["kind"] == "hess_max_ev_iterations"
    assert about["top_converged"]["sibling_of"] == "top"
    assert about["top"]["args"]["max_iters"] == 3
    np.testing.assert_array_equal(run["top_iterations"][1], history["top_iterations"])
    np.testing.assert_array_equal(run["top_converged"][1], history["top_converged"])

    data = RunData(tmp_path / "r")
    panels = {p.title: p for p in figure.runs_plan([data])}
    lanczos = panels["Lanczos products, converged"]
    assert (lanczos.group, lanczos.fields) == ("CURVATURE", ("top_iterations", "top_converged"))
    assert panels["top Hessian eigenvalue (top)"].fields == ("top",)
    drawn, _ = figure.figure([data])
    lines = {t["meta"]["field"]: t["y"] for t in drawn["data"]}
    assert lines["top_iterations"] == [3.0] * 6 and lines["top_converged"] == [0.0] * 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = lm.to_tensorboard(run, tmp_path / "tb")
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    assert {"top", "top_converged", "top_iterations"} <= set(events.Tags()["scalars"])
    assert [s.value for s in events.Scalars("top_iterations")] == [3.0] * 6
