"""A non-finite step does not poison carried state: HessMaxEV's warm start, NoiseScale's
moving average and Alpha's carried start are reset, later finite steps have finite values,
and each quantity says so once, from inside the compiled step."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import reference

import lmd4ml as lm

DECAY = 0.9
NAN_STEP, INF_STEP, N_STEPS = 1, 3, 6


def poisoned_batches() -> list[tuple]:
    """Regression batches, with a NaN input at NAN_STEP and an infinite target at INF_STEP."""
    batches = [models.regression_batch(seed) for seed in range(N_STEPS)]
    x, y = batches[NAN_STEP]
    batches[NAN_STEP] = (x.at[0, 0].set(jnp.nan), y)
    x, y = batches[INF_STEP]
    batches[INF_STEP] = (x, y.at[2, 1].set(jnp.inf))
    return batches


def optimizer() -> optax.GradientTransformation:
    """SGD that skips non-finite updates, so that θ stays finite through a bad batch."""
    return optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)


def reset_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "is reset to its initial state" in str(w.message)]


def test_carried_state_is_reset_and_said_once(regression_case: models.Case) -> None:
    loss_fn = regression_case.loss_fn
    quantities = [lm.HessMaxEV(), lm.NoiseScale(decay=DECAY), lm.Alpha(end="next_batch")]
    step = lm.instrument(loss_fn, optimizer(), quantities)
    batches = poisoned_batches()
    state, out = step.init(regression_case.params), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in batches:
            new_state, metrics = step(state, batch)
            out.append((state, lm.stats.to_host(metrics), new_state))
            state = new_state
        jax.effects_barrier()  # the warnings come from host callbacks of the steps
    said = reset_warnings(caught)
    assert len(said) == 3, said  # one per quantity, though two steps were non-finite
    for what in ("HessMaxEV ('hess_max_ev')", "NoiseScale ('noise_scale')", "Alpha ('alpha')"):
        assert sum(what in message and f"step {NAN_STEP}" in message for message in said) == 1
    assert step.trace_count == {frozenset({"hess_max_ev", "noise_scale", "alpha"}): 1}

    for t, (before, metrics, after) in enumerate(out):
        bad = t in (NAN_STEP, INF_STEP)
        where = f"step {t}"
        lanczos, averages, start = (after.quantity_states[q.key] for q in quantities)
        resets = (t >= NAN_STEP) + (t >= INF_STEP)
        assert int(lanczos.resets) == int(averages.resets) == int(start.resets) == resets, where
        assert np.all(np.isfinite(lanczos.vector)) and np.isfinite(averages.trace_cov), where
        if bad:
            assert np.isnan(metrics["hess_max_ev"]) and np.isnan(metrics["noise_scale"]), where
            assert not metrics["hess_max_ev_converged"], where
            assert int(metrics["hess_max_ev_iterations"]) == 1, where  # not max_iters
            assert int(averages.count) == 0, where  # the average starts over
            continue
        top = np.linalg.eigvalsh(reference.hessian(loss_fn, before.params, batches[t]))
        assert abs(metrics["hess_max_ev"] - top[-1]) <= 1e-3 * np.abs(top).max(), where
        assert metrics["hess_max_ev_converged"], where
        # The average restarted after each bad step: B_simple averages the steps since.
        last_bad = max((b for b in (NAN_STEP, INF_STEP) if b < t), default=-1)
        estimates = [
            reference.noise_scale_estimates(
                reference.per_sample_grads(loss_fn, out[u][0].params, batches[u]).grads
            )
            for u in range(last_bad + 1, t + 1)
        ]
        want = reference.noise_scale(estimates, DECAY)[-1]
        np.testing.assert_allclose(metrics["noise_scale"], want, rtol=1e-10, err_msg=where)
        # α of the step before: missing where that step was bad, or is the first.
        follows_bad = t == 0 or t - 1 in (NAN_STEP, INF_STEP)
        assert np.isnan(metrics["alpha"]) == follows_bad, where
    thetas = [before.params for before, _, _ in out]
    alphas = reference.alpha_next_batch(loss_fn, thetas[4:6], batches[4:6])  # α of step 4
    np.testing.assert_allclose(out[5][1]["alpha"], alphas[0], rtol=1e-8)


def test_monitor_resets_inside_its_lax_cond(regression_case: models.Case) -> None:
    """Tracking decided at run time (a lax.cond): the reset and its one warning still happen,
    in one compiled program."""
    loss_fn = regression_case.loss_fn
    tx = lm.monitor(optimizer(), [lm.NoiseScale(decay=DECAY)])
    traces = []

    @jax.jit
    def train_step(params, opt_state, batch, track):
        traces.append(1)
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = tx.update(
            grads, opt_state, params, loss_fn=loss_fn, batch=batch, track=track
        )
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = regression_case.params, tx.init(regression_case.params)
    values = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, batch in enumerate(poisoned_batches()):
            theta = params
            params, opt_state = train_step(params, opt_state, batch, jnp.asarray(t != 2))
            values.append((theta, float(lm.metrics(opt_state)["noise_scale"])))
        jax.effects_barrier()
    said = reset_warnings(caught)
    assert len(said) == 1 and "NoiseScale ('noise_scale')" in said[0], said
    assert len(traces) == 1
    assert np.isnan(values[NAN_STEP][1]) and np.isnan(values[INF_STEP][1])
    # Step 2 untracked, step 3 bad: the average at step 4 restarts, at step 5 it goes on.
    batches = poisoned_batches()
    estimates = [
        reference.noise_scale_estimates(reference.per_sample_grads(loss_fn, theta, b).grads)
        for (theta, _), b in zip(values[4:], batches[4:], strict=True)
    ]
    want = reference.noise_scale(estimates, DECAY)
    np.testing.assert_allclose([v for _, v in values[4:]], want, rtol=1e-10)
    assert np.isnan(values[2][1])  # untracked: step 1's value is kept


def test_one_real_sample_keeps_the_state_and_says_nothing(regression_case: models.Case) -> None:
    """A padded batch with one real sample: NoiseScale and Alpha have no value there (NaN by
    design), and their state is kept as it was, not reset."""
    loss_fn, params = regression_case.loss_fn, regression_case.params
    quantities = [lm.NoiseScale(decay=DECAY), lm.Alpha(end="next_batch")]
    step = lm.instrument(loss_fn, optax.sgd(0.1), quantities)
    batches = list(regression_case.batches)
    full, one = jnp.ones(models.BATCH, bool), jnp.arange(models.BATCH) < 1
    batches[1] = jax.tree.map(lambda x: x[np.zeros(models.BATCH, int)], batches[1])
    state, out = step.init(params), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch, mask in zip(batches, [full, one, full], strict=True):
            new_state, metrics = step(state, batch, mask=mask)
            out.append((state, lm.stats.to_host(metrics), new_state))
            state = new_state
        jax.effects_barrier()
    assert reset_warnings(caught) == []
    (s0, m0, a0), (_, m1, a1), (s2, m2, _) = out
    assert np.isnan(m1["noise_scale"]) and np.isnan(m1["alpha"]) and np.isnan(m2["alpha"])
    for key in ("noise_scale", "alpha"):  # step 1 left the state as step 0 made it
        jax.tree.map(
            np.testing.assert_array_equal, a1.quantity_states[key], a0.quantity_states[key]
        )
    estimates = [
        reference.noise_scale_estimates(reference.per_sample_grads(loss_fn, s.params, b).grads)
        for s, b in ((s0, batches[0]), (s2, batches[2]))
    ]
    want = reference.noise_scale(estimates, DECAY)
    np.testing.assert_allclose([m0["noise_scale"], m2["noise_scale"]], want, rtol=1e-10)
    assert step.trace_count == {frozenset({"noise_scale", "alpha"}): 1}
