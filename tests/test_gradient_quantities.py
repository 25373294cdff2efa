"""Cockpit's further gradient quantities, on every model kind, against the brute-force reference.

inner_test, ortho_test, mean_gsnr, early_stopping, cabs, noise_scale, alpha, grad_hist_2d and
the per-layer breakdowns of grad_norm, distance and update_size, each checked at every step
against tests/reference.py (per-sample ``jax.grad`` in a Python loop, numpy, float64).
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

RTOL = 1e-9
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}
LR_SGD = 0.1
# Adam runs the per-sample pass in chunks (2 of 4 samples in a scan + 1) to test their sums.
CHUNK = {"sgd": models.BATCH, "adam": 4}
DECAY = 0.7
BINS = (7, 9)  # odd: 0, where many gradient elements sit, is mid-bin
SCALARS = ("inner_test", "ortho_test", "mean_gsnr", "early_stopping", "cabs", "alpha")
PER_LAYER = ("grad_norm", "distance", "update_size")


def hist_ranges(case: models.Case) -> tuple[tuple[float, float], tuple[float, float]]:
    """Ranges a few times the typical gradient element and parameter at θ₀: some clamping."""
    ps = reference.per_sample_grads(case.loss_fn, case.params, case.batches[0])
    g_max = reference.spread_maxval(ps.grads)
    theta_max = float(f"{np.quantile(np.abs(reference.flatten(case.params)), 0.9):.2g}")
    return (-g_max, g_max), (-theta_max, theta_max)


def quantities(ranges: tuple) -> list[lm.Quantity]:
    return [
        lm.InnerTest(),
        lm.OrthoTest(),
        lm.MeanGSNR(),
        lm.EarlyStopping(),
        lm.CABS(),
        lm.Alpha(),
        lm.NoiseScale(decay=DECAY),
        lm.GradHist2d(bins=BINS, range=ranges),
        lm.GradNorm(per_layer=True),
        lm.Distance(per_layer=True),
        lm.UpdateSize(per_layer=True),
    ]


def run(case: models.Case, optimizer: optax.GradientTransformation, qs: list, budget: int) -> list:
    """(state before, metrics on the host, state after) for one step per batch of the case."""
    step = lm.instrument(case.loss_fn, optimizer, qs, memory_budget=budget)
    state = step.init(case.params)
    out = []
    for batch in case.batches:
        new_state, metrics = step(state, batch)
        out.append((state, lm.stats.to_host(metrics), jax.device_get(new_state)))
        state = new_state
    return out


def assert_close(value: object, expected: float, where: str) -> None:
    assert np.shape(value) == (), f"{where} is not a scalar"
    np.testing.assert_allclose(value, expected, rtol=RTOL, err_msg=where)


# Every model kind once, each optimizer on dense, conv and (adam) attention models: compiling
# all these quantities into one step takes seconds per model, so not every pair is run.
COMBOS = [
    ("mlp", "sgd"),
    ("mlp", "adam"),
    ("nnx_mlp", "sgd"),
    ("nnx_conv", "adam"),
    ("linen_conv", "sgd"),
    ("linen_attention", "adam"),
    ("regression", "sgd"),
]


@pytest.mark.parametrize(("model", "opt_name"), COMBOS)
def test_quantities_match_reference(model: str, opt_name: str) -> None:
    """Every quantity at every step t equals its definition evaluated at θₜ (and θₜ₊₁)."""
    case = models.get(model)
    ranges = hist_ranges(case)
    budget = models.budget_for_chunk(case.params, CHUNK[opt_name])
    steps = run(case, OPTIMIZERS[opt_name](), quantities(ranges), budget)
    theta0 = reference.flatten(case.params)
    estimates = []
    for t, (before, metrics, after) in enumerate(steps):
        where = f"{case.name}/{opt_name} step {t}"
        batch = case.batches[t]
        ps = reference.per_sample_grads(case.loss_fn, before.params, batch)
        nxt = reference.per_sample_grads(case.loss_fn, after.params, batch)
        theta, theta_next = reference.flatten(before.params), reference.flatten(after.params)
        g_norm = np.linalg.norm(reference.mean_grad(ps.grads))
        # CABS() without lr uses the effective step ‖θₜ₊₁ − θₜ‖/‖g‖: SGD's learning rate.
        lr = np.linalg.norm(theta_next - theta) / g_norm
        if opt_name == "sgd":
            np.testing.assert_allclose(lr, LR_SGD, rtol=1e-12)
        expected = {
            "inner_test": reference.inner_test(ps.grads),
            "ortho_test": reference.ortho_test(ps.grads),
            "mean_gsnr": reference.mean_gsnr(ps.grads),
            "early_stopping": reference.early_stopping(ps.grads),
            "cabs": reference.cabs(ps.grads, ps.losses, lr),
            "alpha": reference.alpha(
                ps.losses, ps.grads, nxt.losses, nxt.grads, theta_next - theta
            ),
        }
        for key in SCALARS:
            assert np.isfinite(expected[key]), f"{where}: reference {key} not finite"
            assert_close(metrics[key], expected[key], f"{where}: {key}")

        estimates.append(reference.noise_scale_estimates(ps.grads))
        assert_close(
            metrics["noise_scale"], reference.noise_scale(estimates, DECAY)[-1], f"{where}: B"
        )
        s_state = after.quantity_states["noise_scale"]
        assert int(s_state.count) == t + 1, where

        hist = np.asarray(metrics["grad_hist_2d"])
        assert hist.shape == BINS and np.issubdtype(hist.dtype, np.integer), where
        np.testing.assert_array_equal(
            hist, reference.grad_hist_2d(ps.grads, theta, BINS, ranges), err_msg=where
        )
        assert hist.sum() == ps.grads.size, where
        assert np.count_nonzero(hist) >= 8, f"{where}: histogram not spread"

        diffs = {
            "grad_norm": reference.mean_grad(ps.grads),
            "distance": theta - theta0,
            "update_size": theta_next - theta,
        }
        for key in PER_LAYER:
            want = reference.leaf_norms(diffs[key], case.params)
            assert metrics[key].keys() == want.keys(), f"{where}: {key}"
            # Leaves with an exactly zero true gradient (attention's key bias: softmax ignores
            # it) carry rounding noise, so leaves are compared relative to the total.
            atol = 1e-12 * want["total"]
            for name, value in want.items():
                got = metrics[key][name]
                np.testing.assert_allclose(
                    got, value, RTOL, atol, err_msg=f"{where}: {key}[{name}]"
                )


def test_noise_scale_state_is_a_debiased_ema(mlp_case: models.Case) -> None:
    """The state holds the plain EMAs of (S, |G|²); ``averages`` divides out 1 − βⁿ."""
    q = lm.NoiseScale(decay=DECAY)
    steps = run(mlp_case, optax.adam(1e-2), [q], 2**30)
    s_avg = g_avg = 0.0
    for n, (before, metrics, after) in enumerate(steps, start=1):
        ps = reference.per_sample_grads(mlp_case.loss_fn, before.params, mlp_case.batches[n - 1])
        s, g2 = reference.noise_scale_estimates(ps.grads)
        s_avg, g_avg = DECAY * s_avg + (1 - DECAY) * s, DECAY * g_avg + (1 - DECAY) * g2
        state = after.quantity_states["noise_scale"]
        np.testing.assert_allclose([state.trace_cov, state.grad_sq_norm], [s_avg, g_avg], RTOL)
        debiased = np.asarray(q.averages(state))
        np.testing.assert_allclose(debiased, np.array([s_avg, g_avg]) / (1 - DECAY**n), RTOL)
        assert_close(metrics["noise_scale"], debiased[0] / debiased[1], f"step {n}")
    # The first value is that step's own estimate, unaveraged.
    ps0 = reference.per_sample_grads(mlp_case.loss_fn, mlp_case.params, mlp_case.batches[0])
    s0, g0 = reference.noise_scale_estimates(ps0.grads)
    assert_close(steps[0][1]["noise_scale"], s0 / g0, "step 0")


def test_cabs_with_lr_uses_it_whatever_the_optimizer(mlp_case: models.Case) -> None:
    for optimizer, lr in ((optax.sgd(LR_SGD), LR_SGD), (optax.adam(1e-2), 0.5)):
        (before, metrics, _), *_ = run(mlp_case, optimizer, [lm.CABS(lr=lr)], 2**30)
        ps = reference.per_sample_grads(mlp_case.loss_fn, before.params, mlp_case.batches[0])
        assert_close(metrics["cabs"], reference.cabs(ps.grads, ps.losses, lr), f"lr={lr}")


# ---------------------------------------------------------------------------- alpha semantics


def quadratic_loss(w: jax.Array, x: jax.Array) -> jax.Array:
    """ℓᵢ = ½‖w − xᵢ‖²: L is an exact quadratic with Hessian I, minimum at the mean of x."""
    return 0.5 * jnp.sum(jnp.square(w - x), axis=1)


def alpha_of(loss_fn, optimizer: optax.GradientTransformation) -> float:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float64)
    step = lm.instrument(loss_fn, optimizer, [lm.Alpha()])
    _, metrics = step(step.init(jnp.full(3, 2.0, jnp.float64)), x)
    return float(metrics["alpha"])


@pytest.mark.parametrize(("lr", "expected"), [(0.5, -0.5), (1.0, 0.0), (2.0, 1.0), (3.0, 2.0)])
def test_alpha_on_an_exact_quadratic(lr: float, expected: float) -> None:
    """On L = ½ mean‖w − xᵢ‖², SGD with rate lr goes lr of the way to the minimum and back."""
    np.testing.assert_allclose(alpha_of(quadratic_loss, optax.sgd(lr)), expected, atol=1e-9)


def test_alpha_is_minus_one_without_progress() -> None:
    """A zero update (t = 0) and a concave fit both read −1, as in Cockpit."""
    assert alpha_of(quadratic_loss, optax.sgd(0.0)) == -1.0
    concave = lambda w, x: -quadratic_loss(w, x)  # noqa: E731
    assert alpha_of(concave, optax.sgd(0.1)) == -1.0


# ----------------------------------------------------------------------- grad_hist_2d semantics


def test_grad_hist_2d_clamps_outliers_and_drops_nan() -> None:
    """∇ℓᵢ = xᵢ for ℓᵢ = xᵢ·w, so the pairs are (x_ij, w_j) exactly."""
    grads = np.array([[-5.0, 0.3, np.nan, 0.9], [0.0, np.inf, -0.2, 1.0]])
    w = np.array([0.5, -9.0, 0.1, np.nan])
    bins, ranges = (4, 3), ((-1.0, 1.0), (-1.5, 1.5))
    step = lm.instrument(lambda w, x: x @ w, optax.sgd(0.0), [lm.GradHist2d(bins, ranges)])
    _, metrics = step(step.init(jnp.asarray(w)), jnp.asarray(grads))
    expected = reference.grad_hist_2d(grads, w, bins, ranges)
    np.testing.assert_array_equal(metrics["grad_hist_2d"], expected)
    assert expected.sum() == 5  # 8 pairs less the NaN gradient element and NaN θ₃ column


def test_values_below_the_range_land_in_the_first_bin() -> None:
    """XLA may compute the lowest edge lo·n/n as lo·n·(1/n), a hair above lo; a value clamped
    to lo must still count in bin 0 (it was dropped for, e.g., 7 bins on [−0.43, 0.43])."""
    grads = np.array([[-1.0, -0.43, 0.0], [0.2, -0.5, 0.43]])
    w = np.array([-1.0, 0.0, 1.0])
    ranges = ((-0.43, 0.43), (-0.43, 0.43))
    qs = [lm.GradHist1d(nbins=7, maxval=0.43), lm.GradHist2d((7, 7), ranges)]
    step = lm.instrument(lambda w, x: x @ w, optax.sgd(0.0), qs)
    metrics = lm.stats.to_host(step(step.init(jnp.asarray(w)), jnp.asarray(grads))[1])
    np.testing.assert_array_equal(metrics["grad_hist_1d"], reference.grad_hist_1d(grads, 7, 0.43))
    np.testing.assert_array_equal(
        metrics["grad_hist_2d"], reference.grad_hist_2d(grads, w, (7, 7), ranges)
    )
    assert metrics["grad_hist_1d"][0] == 3 and metrics["grad_hist_2d"].sum() == 6


# ------------------------------------------------------------------------------- errors, API


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lm.CABS(lr=-1.0), "lr must be a positive number"),
        (lambda: lm.CABS(lr="0.1"), "lr must be a positive number"),
        (lambda: lm.NoiseScale(decay=1.0), r"decay must be a number in \[0, 1\)"),
        (lambda: lm.GradHist2d(bins=(0, 3)), "bins must be two integers >= 1"),
        (lambda: lm.GradHist2d(bins=10), "bins must be two integers >= 1"),
        (lambda: lm.GradHist2d(range=((1, -1), (0, 1))), r"two \(lo, hi\) pairs with lo < hi"),
        (lambda: lm.GradNorm(per_layer="yes"), "per_layer must be True or False"),
    ],
)
def test_bad_arguments_are_value_errors(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "q", [lm.InnerTest(), lm.OrthoTest(), lm.EarlyStopping(), lm.NoiseScale(), lm.Alpha()]
)
def test_one_sample_batches_are_rejected(q: lm.Quantity) -> None:
    step = lm.instrument(lambda w, x: x @ w, optax.sgd(0.1), [q])
    with pytest.raises(ValueError, match=f"{type(q).__name__} needs batches of at least 2"):
        step(step.init(jnp.zeros(2)), jnp.ones((1, 2)))


def test_second_moment_is_one_shared_statistic() -> None:
    """MeanGSNR, EarlyStopping and TICDiag read the one pass that ctx.second_moment declares."""
    for q in (lm.MeanGSNR(), lm.EarlyStopping(), lm.TICDiag()):
        assert q.per_sample == (lm.stats.SQ_GRADS,)


def test_per_layer_off_is_a_scalar(mlp_case: models.Case) -> None:
    qs = [lm.GradNorm(), lm.Distance(), lm.UpdateSize()]
    (_, metrics, _), *_ = run(mlp_case, optax.sgd(0.1), qs, 2**30)
    assert all(np.shape(metrics[key]) == () for key in PER_LAYER)
