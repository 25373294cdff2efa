"""Cockpit's presets: their membership, and the whole `full` panel in one step vs brute force.

Each instrument is checked on its own elsewhere; here all thirteen share one compiled step
(shared per-sample passes, one Hessian diagonal, Lanczos), which must not change any value.
"""

from __future__ import annotations

import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm

# cockpit.utils.configuration.quantities_cls_for_configuration, by key.
ECONOMY = {
    "alpha",
    "distance",
    "grad_hist_1d",
    "grad_norm",
    "inner_test",
    "loss",
    "norm_test",
    "ortho_test",
    "update_size",
}
BUSINESS = ECONOMY | {"tic_diag", "hess_trace"}
FULL = BUSINESS | {"hess_max_ev", "grad_hist_2d"}


@pytest.mark.parametrize(
    ("preset", "keys"),
    [(lm.presets.economy, ECONOMY), (lm.presets.business, BUSINESS), (lm.presets.full, FULL)],
)
def test_membership_is_cockpits(preset, keys: set[str]) -> None:
    quantities = preset()
    assert {q.key for q in quantities} == keys
    assert len(quantities) == len(keys)
    assert preset() is not quantities  # a fresh list: callers may append their own


def test_full_preset_in_one_step_matches_brute_force(mlp_case: models.Case) -> None:
    """Adam, two steps (so distance and Lanczos' warm start are exercised) on the float64 MLP."""
    nbins, maxval = 20, 0.5
    bins, ranges = (6, 7), ((-0.5, 0.5), (-1.0, 1.0))
    quantities = [
        lm.GradHist1d(nbins=nbins, maxval=maxval) if q.key == "grad_hist_1d" else q
        for q in lm.presets.full()
    ]
    quantities = [
        lm.GradHist2d(bins=bins, range=ranges) if q.key == "grad_hist_2d" else q for q in quantities
    ]
    step = lm.instrument(mlp_case.loss_fn, optax.adam(1e-2), quantities)
    state = step.init(mlp_case.params)
    theta0 = reference.flatten(mlp_case.params)
    for n, batch in enumerate(mlp_case.batches[:2]):
        new_state, metrics = step(state, batch)
        metrics = lm.stats.to_host(metrics)
        assert set(metrics) == FULL | {"hess_max_ev_converged", "hess_max_ev_iterations"}
        assert metrics["hess_max_ev_converged"] and metrics["hess_max_ev_iterations"] <= 100
        theta, theta_next = reference.flatten(state.params), reference.flatten(new_state.params)
        ps = reference.per_sample_grads(mlp_case.loss_fn, state.params, batch)
        nxt = reference.per_sample_grads(mlp_case.loss_fn, new_state.params, batch)
        want = reference.quantities(ps, theta, theta0, theta_next, nbins, maxval)
        hess = reference.hessian(mlp_case.loss_fn, state.params, batch)
        h = np.diag(hess)
        want |= {
            "inner_test": reference.inner_test(ps.grads),
            "ortho_test": reference.ortho_test(ps.grads),
            "alpha": reference.alpha(
                ps.losses, ps.grads, nxt.losses, nxt.grads, theta_next - theta
            ),
            "hess_trace": h.sum(),
            "tic_diag": np.sum(np.mean(ps.grads**2, axis=0) / (h + 1e-7)),
            "hess_max_ev": np.linalg.eigvalsh(hess)[-1],
            "grad_hist_2d": reference.grad_hist_2d(ps.grads, theta, bins, ranges),
        }
        for key, value in want.items():
            if key.startswith("grad_hist"):
                np.testing.assert_array_equal(metrics[key], value, err_msg=f"step {n}: {key}")
            else:
                rtol = 1e-3 if key == "hess_max_ev" else 1e-8  # Lanczos stops at rtol=1e-3
                np.testing.assert_allclose(
                    metrics[key], value, rtol=rtol, atol=1e-10, err_msg=f"step {n}: {key}"
                )
        state = new_state
