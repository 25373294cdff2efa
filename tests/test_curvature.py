"""Curvature quantities against the full float64 Hessian from ``jax.hessian``."""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm
from lmd4ml.stats import hessian

EXACT_RTOL = 1e-9
# Plain dense, nnx conv and linen attention, with both optimizers. (Each model costs seconds
# of compilation; the rest of the zoo adds no new kind of layer. The squared-error model is
# checked by the Hutchinson test.)
MODEL_OPTIMIZERS = {"mlp": "sgd", "nnx_conv": "adam", "linen_attention": "sgd"}
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}
CURVATURE = ("hess_trace", "tic_diag", "tic_trace", "hess_max_ev")


def leaf_slices(params: Any) -> dict[str, slice]:
    """Where each leaf sits in :func:`reference.flatten`, keyed like per-layer values."""
    out, start = {}, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        out[name] = slice(start, start + np.size(leaf))
        start += np.size(leaf)
    return out


# ------------------------------------------------------------------- against brute force


@pytest.mark.parametrize("name", sorted(MODEL_OPTIMIZERS))
def test_exact_curvature_matches_full_hessian(name: str) -> None:
    """Every step: exact diag, trace, per-layer traces, both TICs and λ_max vs jax.hessian."""
    case = models.get(name)
    quantities = [
        lm.HessTrace(method="exact", per_layer=True),
        lm.TICDiag(method="exact"),
        lm.TICTrace(method="exact"),
        lm.HessMaxEV(),
    ]
    step = lm.instrument(case.loss_fn, OPTIMIZERS[MODEL_OPTIMIZERS[name]](), quantities)
    steps = models.run_steps(step, case)
    assert step.trace_count == collections.Counter({frozenset(CURVATURE): 1})
    for t, (before, metrics, after) in enumerate(steps):
        where = f"{name} step {t}"
        siblings = {"hess_max_ev_converged", "hess_max_ev_iterations"}
        assert set(metrics) == set(CURVATURE) | siblings, where
        h = reference.hessian(case.loss_fn, before.params, case.batches[t])
        np.testing.assert_allclose(h, h.T, rtol=1e-12, atol=1e-14)
        ps = reference.per_sample_grads(case.loss_fn, before.params, case.batches[t])
        diag = np.diag(h)

        traces = metrics["hess_trace"]
        np.testing.assert_allclose(traces["total"], diag.sum(), rtol=EXACT_RTOL, err_msg=where)
        slices = leaf_slices(before.params)
        assert set(traces) == {"total", *slices}, where
        for leaf, where_in_flat in slices.items():
            np.testing.assert_allclose(
                traces[leaf], diag[where_in_flat].sum(), rtol=EXACT_RTOL, atol=1e-13, err_msg=leaf
            )

        second_moment = np.mean(ps.grads**2, axis=0)
        tic_diag = np.sum(second_moment / (diag + 1e-7))
        np.testing.assert_allclose(metrics["tic_diag"], tic_diag, rtol=1e-8, err_msg=where)
        tic_trace = np.mean(np.sum(ps.grads**2, axis=1)) / (diag.sum() + 1e-7)
        np.testing.assert_allclose(metrics["tic_trace"], tic_trace, rtol=EXACT_RTOL, err_msg=where)

        eigenvalues = np.linalg.eigvalsh(h)
        radius = np.abs(eigenvalues).max()
        assert abs(metrics["hess_max_ev"] - eigenvalues[-1]) <= 1e-3 * radius, where
        lanczos = after.quantity_states["hess_max_ev"]
        assert 1 <= int(lanczos.iterations) <= 100, where
        np.testing.assert_allclose(np.linalg.norm(lanczos.vector), 1.0, rtol=1e-12)


def test_exact_diag_in_chunks_with_a_remainder(mlp_case: models.Case) -> None:
    """75 parameters, 7 unit vectors per chunk: 10 chunks in a scan and a remainder of 5."""
    params, batch = mlp_case.params, mlp_case.batches[0]
    d = reference.flatten(params).size
    assert d % 7 == 5

    @jax.jit
    def diag(params: Any) -> Any:
        hvp = hessian.hvp(mlp_case.loss_fn, params, batch)
        return hessian.exact_diag(hvp, params, memory_budget=7 * d * 8)

    expected = np.diag(reference.hessian(mlp_case.loss_fn, params, batch))
    np.testing.assert_allclose(reference.flatten(diag(params)), expected, rtol=EXACT_RTOL)


# ------------------------------------------------------- largest algebraic, not magnitude


def quadratic(eigenvalues: np.ndarray, seed: int = 0) -> tuple[Any, np.ndarray, jax.Array]:
    """ℓᵢ = ½ wᵀAw + xᵢ·w with A = Q diag(eigenvalues) Qᵀ: ∇²L = A whatever w and the batch."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)

    def loss_fn(w: jax.Array, x: jax.Array) -> jax.Array:
        return 0.5 * w @ a @ w + x @ w

    return loss_fn, np.asarray(a), jnp.asarray(rng.normal(size=(4, len(eigenvalues))))


@pytest.mark.parametrize(
    "eigenvalues",
    [
        np.concatenate([[-10.0, -7.0], np.linspace(0.1, 2.0, 28)]),  # |λ_min| ≫ λ_max
        -np.linspace(1.0, 5.0, 30),  # every eigenvalue negative
    ],
    ids=["dominant-negative", "all-negative"],
)
def test_max_ev_is_the_largest_algebraic_eigenvalue(eigenvalues: np.ndarray) -> None:
    """Power iteration would return −10 (or −5); Lanczos, restarted every 5 products, not.

    With a tight tolerance it gives the eigenvalue to many digits.
    """
    loss_fn, a, x = quadratic(eigenvalues)
    quantity = lm.HessMaxEV(krylov_dim=5, rtol=1e-10, max_iters=300)
    step = lm.instrument(loss_fn, optax.sgd(0.0), [quantity])
    state = step.init(jnp.zeros(len(eigenvalues)))
    state, metrics = step(state, x)
    expected = np.linalg.eigvalsh(a)[-1]
    np.testing.assert_allclose(metrics["hess_max_ev"], expected, rtol=1e-10)
    assert int(state.quantity_states["hess_max_ev"].iterations) > 5  # it did restart


def test_max_ev_on_a_tiny_space_stops_when_it_is_spanned() -> None:
    """D = 3 < krylov_dim: three products span the space, and the answer is exact."""
    loss_fn, _, x = quadratic(np.array([-4.0, 0.5, 1.5]))
    step = lm.instrument(loss_fn, optax.sgd(0.0), [lm.HessMaxEV(rtol=1e-12)])
    state, metrics = step(step.init(jnp.zeros(3)), x)
    np.testing.assert_allclose(metrics["hess_max_ev"], 1.5, rtol=1e-12)
    assert int(state.quantity_states["hess_max_ev"].iterations) <= 3


# ------------------------------------------------------------------------------ warm start


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_warm_start_takes_fewer_iterations(mlp_case: models.Case, opt_name: str) -> None:
    """At θ₂, Lanczos from step 1's vector needs fewer products than from a random one.

    One batch throughout, so the Hessian moves only with θ (on this model's 9-sample random
    batches the top eigenvector of one batch's Hessian is no better than a random start).
    """
    quantities = [lm.HessMaxEV()]
    optimizer = {"sgd": optax.sgd(1e-2), "adam": optax.adam(1e-3)}[opt_name]
    step = lm.instrument(mlp_case.loss_fn, optimizer, quantities)
    batch = mlp_case.batches[0]
    state = step.init(mlp_case.params)
    for _ in range(2):
        state, _ = step(state, batch)
    cold = state._replace(quantity_states={"hess_max_ev": quantities[0].init(state.params)})
    warm_state, warm = step(state, batch)
    cold_state, cold_metrics = step(cold, batch)
    warm_iters = int(warm_state.quantity_states["hess_max_ev"].iterations)
    cold_iters = int(cold_state.quantity_states["hess_max_ev"].iterations)
    assert warm_iters < cold_iters / 2, (warm_iters, cold_iters)
    expected = np.linalg.eigvalsh(reference.hessian(mlp_case.loss_fn, state.params, batch))[-1]
    for value in (warm["hess_max_ev"], cold_metrics["hess_max_ev"]):
        assert abs(value - expected) <= 1e-3 * abs(expected)
    assert step.trace_count == collections.Counter({frozenset({"hess_max_ev"}): 1})


# ------------------------------------------------------------------------------ Hutchinson


def test_hutchinson_is_unbiased(regression_case: models.Case) -> None:
    """With K probes the estimate of H_jj has std √(Σ_{k≠j} H_jk² / K); of tr(H) the std is
    √(2 Σ_{j≠k} H_jk² / K). With a fixed key every coordinate and the trace lie within 5σ.

    At most 300 probes at a time, in equal chunks: 6 of 286 in a scan and a remainder of 284.
    """
    case = regression_case
    params, batch = case.params, case.batches[0]
    h = reference.hessian(case.loss_fn, params, batch)
    off = h - np.diag(np.diag(h))
    probes = 2000

    @jax.jit
    def estimate(key: jax.Array) -> Any:
        hvp = hessian.hvp(case.loss_fn, params, batch)
        budget = 300 * reference.flatten(params).size * 8
        return hessian.hutchinson_diag(hvp, params, key, probes, memory_budget=budget)

    diag = reference.flatten(estimate(jax.random.key(0)))
    coordinate_std = np.sqrt(np.sum(off**2, axis=1) / probes)
    assert np.all(np.abs(diag - np.diag(h)) <= 5 * coordinate_std + 1e-12)
    trace_std = np.sqrt(2 * np.sum(off**2) / probes)
    assert abs(diag.sum() - np.trace(h)) <= 5 * trace_std
    # Not trivially exact: the estimate really is noisy.
    assert np.abs(diag - np.diag(h)).max() > 0.1 * coordinate_std.max()


def test_hutchinson_quantities_are_reproducible_and_vary_by_step(mlp_case: models.Case) -> None:
    """Same seed: same values run to run. Each tracked step draws new probes (lr 0: same θ
    and batch). Tracked and bare steps alternate without recompiling.

    Probes are shared: the TIC's trace is the trace's, and the traces of three steps match
    three independent estimates, unbiased within 5σ of their mean.
    """
    quantities = [
        lm.HessTrace(method="hutchinson", probes=8),
        lm.TICTrace(method="hutchinson", probes=8),
    ]
    step = lm.instrument(mlp_case.loss_fn, optax.sgd(0.0), quantities)
    batch = mlp_case.batches[0]

    def values() -> np.ndarray:
        state, out = step.init(mlp_case.params), []
        for track in [True, False, True, False, True]:
            state, metrics = step(state, batch, track=track)
            if track:
                out.append([metrics["hess_trace"], metrics["tic_trace"]])
        return np.asarray(out)

    first, again = values(), values()
    np.testing.assert_array_equal(first, again)
    assert len(set(first[:, 0])) == 3
    assert step.trace_count == collections.Counter({frozenset(step.keys): 1, frozenset(): 1})
    ps = reference.per_sample_grads(mlp_case.loss_fn, mlp_case.params, batch)
    mean_sq_norm = np.mean(np.sum(ps.grads**2, axis=1))
    np.testing.assert_allclose(first[:, 1] * (first[:, 0] + 1e-7), mean_sq_norm, rtol=1e-10)
    h = reference.hessian(mlp_case.loss_fn, mlp_case.params, batch)
    off = h - np.diag(np.diag(h))
    std_of_mean = np.sqrt(2 * np.sum(off**2) / (8 * 3))
    assert abs(first[:, 0].mean() - np.trace(h)) <= 5 * std_of_mean


# ---------------------------------------------------------------- sharing and compilation


def test_one_diagonal_per_estimator_per_step(
    mlp_case: models.Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three exact readers share one diagonal; Hutchinson readers share per (probes, seed).

    Counted while the step is traced (``lower`` traces without compiling).
    """
    calls = collections.Counter()

    def counted(name: str) -> Any:
        original = getattr(hessian, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in ("exact_diag", "hutchinson_diag"):
        monkeypatch.setattr(hessian, name, counted(name))

    def traced_calls(quantities: list) -> collections.Counter:
        calls.clear()
        step = lm.instrument(mlp_case.loss_fn, optax.sgd(0.1), quantities)
        step.lower(step.init(mlp_case.params), mlp_case.batches[0])
        return collections.Counter(calls)

    exact = [lm.HessTrace(method="exact"), lm.TICDiag(method="exact"), lm.TICTrace()]
    assert traced_calls(exact) == {"exact_diag": 1}  # TICTrace's auto is exact for 75 params
    hutchinson = [
        lm.HessTrace(method="hutchinson", probes=4),
        lm.TICDiag(method="hutchinson", probes=4),
        lm.TICTrace(method="hutchinson", probes=4, seed=1),
    ]
    assert traced_calls(hutchinson) == {"hutchinson_diag": 2}


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lm.HessTrace(method="diag"), "method must be one of"),
        (lambda: lm.TICDiag(probes=0), "probes must be an integer >= 1"),
        (lambda: lm.TICTrace(probes=2.5), "probes must be an integer >= 1"),
        (lambda: lm.HessMaxEV(rtol=0.0), "rtol must be a number in"),
        (lambda: lm.HessMaxEV(max_iters=0), "max_iters must be an integer >= 1"),
        (lambda: lm.HessMaxEV(krylov_dim=-1), "krylov_dim must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_rejected(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_per_layer_name_clash_is_rejected() -> None:
    def loss_fn(params: dict, x: jax.Array) -> jax.Array:
        return (x @ params["total"]) ** 2

    step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.HessTrace(per_layer=True)])
    with pytest.raises(ValueError, match="'total'"):
        step(step.init({"total": jnp.zeros(2)}), jnp.ones((3, 2)))
