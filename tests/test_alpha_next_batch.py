"""``Alpha(end="next_batch")``, Cockpit's α: the end point θₜ₊₁ observed on batch t + 1.

Checked against tests/reference.py (per-sample ``jax.grad`` in a Python loop, Cockpit's numpy
fit, float64): the value reported at step t + 1 is α of step t, NaN where step t was not
tracked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm

RTOL = 1e-8
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}
NEXT = lm.Alpha(end="next_batch")


def batches(case: models.Case, n: int) -> list:
    """``n`` batches, the case's own over and over."""
    return [case.batches[i % len(case.batches)] for i in range(n)]


def run(
    case: models.Case, optimizer: optax.GradientTransformation, tracks: list[bool]
) -> tuple[lm.InstrumentedStep, list, list]:
    """(the step, θ₀ … θₙ, the α reported at each step or None where untracked)."""
    step = lm.instrument(case.loss_fn, optimizer, [NEXT])
    state = step.init(case.params)
    thetas, values = [state.params], []
    for batch, track in zip(batches(case, len(tracks)), tracks, strict=True):
        state, metrics = step(state, batch, track=track)
        thetas.append(state.params)
        values.append(float(metrics["alpha"]) if track else None)
    return step, thetas, values


def assert_one_compilation_each(step: lm.InstrumentedStep) -> None:
    """The state comes back with the structure and dtypes it went in with: no retracing."""
    assert set(step.trace_count.values()) == {1}, step.trace_count


# SGD and Adam on a dense model, Adam on a conv (nnx) model.
COMBOS = [("mlp", "sgd"), ("mlp", "adam"), ("nnx_conv", "adam")]
# Step 3 untracked: step 4 has no start to finish; step 5 finishes step 4.
TRACKS = [True, True, True, False, True, True]


@pytest.mark.parametrize(("model", "opt_name"), COMBOS)
def test_matches_cockpits_alpha(model: str, opt_name: str) -> None:
    """At step t + 1 the value is α of step t (start on batch t, end on batch t + 1); NaN at
    the first step and after an untracked one, where no tracked step has just ended."""
    case = models.get(model)
    step, thetas, values = run(case, OPTIMIZERS[opt_name](), TRACKS)
    expected = reference.alpha_next_batch(case.loss_fn, thetas[:-1], batches(case, len(TRACKS)))
    assert all(np.isfinite(expected)) and any(a != -1 for a in expected), expected
    where = f"{model}/{opt_name}"
    assert np.isnan(values[0]) and values[3] is None and np.isnan(values[4]), where
    got = [values[1], values[2], values[5]]
    np.testing.assert_allclose(got, [expected[0], expected[1], expected[4]], RTOL, err_msg=where)
    assert_one_compilation_each(step)


@pytest.mark.filterwarnings("error:non-finite values")
def test_train_records_nan_where_a_schedule_breaks_the_pairs(
    mlp_case: models.Case, tmp_path
) -> None:
    """The NaN α of steps 0 and 4 is recorded as it is, and is no divergence to warn of."""
    learner = lm.Learner(
        mlp_case.params, mlp_case.loss_fn, list(mlp_case.batches), optax.sgd(0.1), [NEXT]
    )
    skip_3 = {"alpha": lambda step: step != 3}
    history = lm.train(learner, epochs=2, schedules=skip_3, runs_dir=tmp_path, progress=False)
    alpha = history["alpha"]
    np.testing.assert_array_equal(history.steps("alpha"), [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(np.isnan(alpha), [True, False, False, True, False])
    (run_info,) = lm.list_runs(tmp_path)
    stored_steps, stored = lm.load_run(run_info["path"])["alpha"]
    np.testing.assert_array_equal(stored_steps, [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(stored, alpha)  # NaN where NaN, bit for bit elsewhere


def test_float32_params(mlp_case: models.Case) -> None:
    """32-bit params: one compilation, and values near the float64 reference."""
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mlp_case.params)
    case32 = models.Case("mlp32", mlp_case.loss_fn, params32, mlp_case.batches)
    step, thetas, values = run(case32, optax.sgd(0.1), [True] * 3)
    expected = reference.alpha_next_batch(mlp_case.loss_fn, thetas[:-1], batches(mlp_case, 3))
    assert np.isnan(values[0])
    np.testing.assert_allclose(values[1:], expected, rtol=1e-3)
    assert_one_compilation_each(step)


def test_monitor_pairs_steps_by_its_counter(mlp_case: models.Case) -> None:
    """With ``lm.monitor`` and the update applied in a program of its own, the pairs are
    found by the step counter, and the values are ``lm.instrument``'s."""
    tx = lm.monitor(optax.adam(1e-2), [NEXT])
    update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, loss_fn=mlp_case.loss_fn, batch=b))
    grad = jax.jit(jax.grad(lambda p, b: jnp.mean(mlp_case.loss_fn(p, b))))
    params, opt_state, values = mlp_case.params, tx.init(mlp_case.params), []
    for batch in batches(mlp_case, 4):
        updates, opt_state = update(grad(params, batch), opt_state, params, batch)
        params = jax.jit(optax.apply_updates)(params, updates)
        values.append(float(lm.metrics(opt_state)["alpha"]))
    _, _, expected = run(mlp_case, optax.adam(1e-2), [True] * 4)
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    assert np.isnan(values[0]) and np.all(np.isfinite(values[1:]))


@pytest.mark.parametrize("end", ["next", "Next_Batch", None, 1])
def test_bad_end_is_a_value_error(end: object) -> None:
    with pytest.raises(ValueError, match="end must be one of 'same_batch', 'next_batch'"):
        lm.Alpha(end=end)
