"""The instrumented step: one compile per selection, the optax update, custom quantities."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from jax.flatten_util import ravel_pytree

import lmd4ml as lm

ALL = frozenset({"loss", "grad_norm", "distance", "update_size", "norm_test", "grad_hist_1d"})


def seed_quantities() -> list[lm.Quantity]:
    return [
        lm.Loss(),
        lm.GradNorm(),
        lm.Distance(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.GradHist1d(nbins=20, maxval=0.5),
    ]


class CountingLoss:
    """A loss function that counts its calls: under ``jit`` a call happens only when tracing."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn
        self.calls = 0

    def __call__(self, params: Any, batch: Any) -> jax.Array:
        self.calls += 1
        return self.loss_fn(params, batch)


def plain_optax_steps(loss_fn: Callable, optimizer: Any, params: Any, batches: list) -> Any:
    """The reference training loop: a jitted value_and_grad of the mean loss and optax."""

    @jax.jit
    def step(params: Any, opt_state: Any, batch: Any) -> tuple:
        _, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for batch in batches:
        params, opt_state = step(params, opt_state, batch)
    return params


def assert_trees_close(a: Any, b: Any, rtol: float) -> None:
    np.testing.assert_allclose(reference.flatten(a), reference.flatten(b), rtol=rtol, atol=1e-15)


# ------------------------------------------------------------------------ no recompilation

TRACKS = [True, False, {"loss"}, True, False, ["loss"], ("loss",), "loss", None, sorted(ALL)]


def test_each_selection_compiles_exactly_once(mlp_case: models.Case) -> None:
    """Params given as numpy arrays on the first call, jax arrays later: still one trace each."""
    loss_fn = CountingLoss(mlp_case.loss_fn)
    step = lm.instrument(loss_fn, optax.adam(1e-2), seed_quantities())
    state = step.init(mlp_case.params)
    batches = [mlp_case.batches[i % 3] for i in range(len(TRACKS))]
    calls_after_first_round = None
    for i, (track, batch) in enumerate(zip(TRACKS, batches, strict=True)):
        state, metrics = step(state, batch, track=track)
        expected_keys = step.active_keys(track)
        assert set(metrics) == set(expected_keys)
        if i == 2:  # every selection has been seen once
            calls_after_first_round = loss_fn.calls
    assert step.trace_count == collections.Counter({ALL: 1, frozenset(): 1, frozenset({"loss"}): 1})
    # Independent of lmd4ml's own counter: later steps never call (trace) the loss again.
    assert loss_fn.calls == calls_after_first_round
    assert int(state.step) == len(TRACKS)


def test_weak_typed_scalar_param_does_not_recompile() -> None:
    """``jnp.array(1.0)`` is weak-typed; the update makes it strong, which must not retrace.

    A scalar parameter (a temperature, a scale) is naturally created this way.
    """

    def loss_fn(params: dict, batch: tuple) -> jax.Array:
        x, y = batch
        return (params["scale"] * (x @ params["w"]) - y) ** 2

    params = {"w": jnp.zeros(2), "scale": jnp.array(1.0)}
    batch = (jnp.ones((4, 2)), jnp.arange(4.0))
    step = lm.instrument(loss_fn, optax.adam(1e-2), [lm.Loss()])
    state = step.init(params)
    for track in [True, True, True, False, False]:
        state, _ = step(state, batch, track=track)
    assert step.trace_count == collections.Counter({frozenset({"loss"}): 1, frozenset(): 1})


def test_stateful_quantity_with_python_scalar_init_does_not_recompile() -> None:
    """``init=lambda params: 0.0`` is the obvious way to start a running average."""

    def ema(ctx: lm.StepContext, average: Any) -> tuple:
        average = 0.9 * average + 0.1 * ctx.loss
        return average, average

    def loss_fn(w: jax.Array, batch: tuple) -> jax.Array:
        x, y = batch
        return (x @ w - y) ** 2

    step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.quantity("ema", ema, init=lambda p: 0.0)])
    state = step.init(jnp.zeros(2))
    batch = (jnp.ones((4, 2)), jnp.arange(4.0))
    for _ in range(3):
        state, _ = step(state, batch)
    assert step.trace_count == collections.Counter({frozenset({"ema"}): 1})


# ----------------------------------------------------------------------------- donation


def test_donated_state_gives_the_same_steps_and_reuses_its_buffers(mlp_case: models.Case):
    quantities = [*seed_quantities(), lm.Alpha()]
    plain = lm.instrument(mlp_case.loss_fn, optax.adam(1e-2), quantities)
    donating = lm.instrument(mlp_case.loss_fn, optax.adam(1e-2), quantities, donate=True)
    params = jax.tree.map(jnp.asarray, mlp_case.params)
    want, got = plain.init(params), donating.init(params)
    for i, track in enumerate([True, False, True, True]):
        before = got
        want, want_metrics = plain(want, mlp_case.batches[i % 3], track=track)
        got, metrics = donating(got, mlp_case.batches[i % 3], track=track)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(before))
        assert_trees_close(metrics, want_metrics, rtol=1e-12)
        assert_trees_close(got, want, rtol=1e-12)
    # The caller's parameters are copied at init, never consumed.
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    assert donating.trace_count == collections.Counter(
        {frozenset(ALL | {"alpha"}): 1, frozenset(): 1}
    )
    memory = donating.lower(got, mlp_case.batches[0]).compile().memory_analysis()
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(got))
    assert memory.alias_size_in_bytes == state_bytes


# ------------------------------------------------------------------ the bare update is optax


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_untracked_step_is_a_plain_optax_step(mlp_case: models.Case, optimizer: Any) -> None:
    step = lm.instrument(mlp_case.loss_fn, optimizer, seed_quantities())
    untracked = tracked = step.init(mlp_case.params)
    for batch in mlp_case.batches:
        untracked, metrics = step(untracked, batch, track=False)
        assert metrics == {}
        tracked, _ = step(tracked, batch, track=True)
    plain = plain_optax_steps(mlp_case.loss_fn, optimizer, mlp_case.params, mlp_case.batches)
    assert_trees_close(untracked.params, plain, rtol=1e-13)
    # Tracking changes nothing about the update.
    assert_trees_close(tracked.params, plain, rtol=1e-12)
    assert int(untracked.step) == int(tracked.step) == len(mlp_case.batches)


@pytest.mark.parametrize("wide", [False, True], ids=["activations_outweigh", "params_outweigh"])
def test_the_gradient_from_the_per_sample_pass_is_the_steps(wide: bool) -> None:
    """Where activations outweigh the parameters the tracked step takes ℓᵢ and g from the
    per-sample pass (``linearize_in_pass``), else from a backward pass of its own: either
    way the update is plain optax's, padded samples left out, in float64 to 1e-12."""
    rng = np.random.default_rng(0)
    # A weight-decayed table of 4,000 parameters that no activation depends on, or of 4.
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "v": jnp.asarray(rng.normal(size=4)),
              "r": jnp.asarray(rng.normal(size=4000 if wide else 4))}  # fmt: skip

    def loss_fn(p, b):
        return (jnp.tanh(b[0] @ p["w"]) @ p["v"] - b[1]) ** 2 + 1e-3 * jnp.sum(p["r"] ** 2)

    x, y = jnp.asarray(rng.normal(size=(16, 3))), jnp.asarray(rng.normal(size=16))
    assert lm.stats.per_sample.activations_outweigh(loss_fn, params, (x, y)) is not wide
    step = lm.instrument(loss_fn, optax.adam(1e-2), [lm.Loss(), lm.NormTest()])
    mask = jnp.arange(16) < 11
    state, metrics = step(step.init(params), (x, y), mask=mask)
    real = (x[:11], y[:11])
    assert_trees_close(state.params, plain_optax_steps(loss_fn, optax.adam(1e-2), params, [real]),
                       rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(metrics["loss"], jnp.mean(loss_fn(params, real)), rtol=1e-13)


# ------------------------------------------------------------------------ custom quantities


def max_abs_element(grads: Any, params: Any) -> jax.Array:
    """Per sample, the largest |element| of ∇ℓᵢ; shape (chunk,)."""
    del params
    leaves = [jnp.abs(g).reshape(g.shape[0], -1).max(axis=1) for g in jax.tree.leaves(grads)]
    return jnp.max(jnp.stack(leaves), axis=0)


def n_positive(grads: Any, params: Any) -> jax.Array:
    """How many elements of all ∇ℓᵢ in the chunk are > 0."""
    del params
    return sum(jnp.sum(g > 0) for g in jax.tree.leaves(grads))


LARGEST = lm.PerSample("largest_element", max_abs_element, "concat")
POSITIVE = lm.PerSample("n_positive", n_positive, "sum")
PROBE = 3  # the sample whose own gradient ctx.vjp recovers


def flat(tree: Any) -> jax.Array:
    return ravel_pytree(tree)[0]


def context_quantities() -> list[lm.Quantity]:
    """Custom quantities reading each part of the step context."""

    def one_hot(ctx: lm.StepContext) -> jax.Array:
        return jnp.zeros(ctx.batch_size).at[PROBE].set(1.0)

    return [
        lm.quantity("losses", lambda ctx: ctx.losses),
        lm.quantity("batch_size", lambda ctx: jnp.asarray(ctx.batch_size)),
        lm.quantity("grads", lambda ctx: flat(ctx.grads)),
        lm.quantity("params", lambda ctx: flat(ctx.params)),
        lm.quantity("new_params", lambda ctx: flat(ctx.new_params)),
        lm.quantity("updates", lambda ctx: flat(ctx.updates)),
        lm.quantity("probe_grad", lambda ctx: flat(ctx.vjp(one_hot(ctx)))),
        lm.quantity("projections", lambda ctx: ctx.projections),
        lm.quantity("sq_norms", lambda ctx: ctx.sq_norms),
        lm.quantity("grad_sq_norm", lambda ctx: ctx.grad_sq_norm),
        lm.quantity("largest", lambda ctx: ctx.per_sample(LARGEST), per_sample=[LARGEST]),
        lm.quantity("positive", lambda ctx: ctx.per_sample(POSITIVE)),  # not declared
    ]


@pytest.mark.parametrize(("name", "chunk"), [("mlp", models.BATCH), ("linen_conv", 2)])
def test_step_context_matches_reference(name: str, chunk: int) -> None:
    """Each part of ctx at θₜ; with chunk 2, per-sample reductions run in 4 chunks + 1."""
    case = models.get(name)
    budget = models.budget_for_chunk(case.params, chunk)
    step = lm.instrument(case.loss_fn, optax.adam(1e-2), context_quantities(), memory_budget=budget)
    state = step.init(case.params)
    for t, batch in enumerate(case.batches[:2]):
        new_state, m = step(state, batch)
        ps = reference.per_sample_grads(case.loss_fn, state.params, batch)
        g = reference.mean_grad(ps.grads)
        theta, theta_next = reference.flatten(state.params), reference.flatten(new_state.params)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-10, err_msg=f"step {t}")
        close(m["losses"], ps.losses)
        assert int(m["batch_size"]) == models.BATCH
        close(m["grads"], g, atol=1e-15)
        np.testing.assert_array_equal(m["params"], theta)
        np.testing.assert_array_equal(m["new_params"], theta_next)
        close(m["updates"], theta_next - theta, atol=1e-15)
        close(m["probe_grad"], ps.grads[PROBE], atol=1e-15)
        close(m["projections"], reference.projections(ps.grads))
        close(m["sq_norms"], np.sum(ps.grads**2, axis=1))
        close(m["grad_sq_norm"], g @ g)
        close(m["largest"], np.abs(ps.grads).max(axis=1))
        assert int(m["positive"]) == np.count_nonzero(ps.grads > 0)
        state = new_state


def test_shared_statistic_is_consistent_and_built_once(mlp_case: models.Case) -> None:
    """Two quantities reading ctx.sq_norms see one pass: same values, no extra loss traces."""
    sum_sq = lm.quantity("sum_sq_norms", lambda ctx: jnp.sum(ctx.sq_norms))
    mean_sq = lm.quantity("mean_sq_norms", lambda ctx: jnp.mean(ctx.sq_norms))
    alone, shared = CountingLoss(mlp_case.loss_fn), CountingLoss(mlp_case.loss_fn)
    batch = mlp_case.batches[0]
    step_alone = lm.instrument(alone, optax.sgd(0.1), [lm.NormTest(), lm.GradNorm()])
    step_shared = lm.instrument(
        shared, optax.sgd(0.1), [lm.NormTest(), lm.GradNorm(), sum_sq, mean_sq]
    )
    _, m_alone = step_alone(step_alone.init(mlp_case.params), batch)
    _, m = step_shared(step_shared.init(mlp_case.params), batch)
    assert shared.calls == alone.calls, "the readers of sq_norms built a second pass"
    b = models.BATCH
    ps = reference.per_sample_grads(mlp_case.loss_fn, mlp_case.params, batch)
    np.testing.assert_allclose(m["sum_sq_norms"], np.sum(ps.grads**2), rtol=1e-12)
    assert m["mean_sq_norms"] * b == pytest.approx(float(m["sum_sq_norms"]), rel=1e-14)
    from_sum = (m["sum_sq_norms"] / m["grad_norm"] ** 2 - b) / (b * (b - 1))
    np.testing.assert_allclose(m["norm_test"], from_sum, rtol=1e-12)
    np.testing.assert_allclose(m["norm_test"], m_alone["norm_test"], rtol=1e-14)


def test_custom_quantities_through_train(mlp_case: models.Case) -> None:
    """A max-loss quantity and a stateful loss EMA, end to end through lm.train."""

    def ema(ctx: lm.StepContext, average: jax.Array) -> tuple:
        average = 0.9 * average + 0.1 * ctx.loss
        return average, average

    quantities = [
        lm.Loss(),
        lm.quantity("max_loss", lambda ctx: jnp.max(ctx.losses)),
        lm.quantity("loss_ema", ema, init=lambda params: jnp.zeros(())),
    ]
    batches = list(mlp_case.batches)
    learner = lm.Learner(mlp_case.params, mlp_case.loss_fn, batches, optax.adam(1e-2), quantities)
    history = lm.train(learner, epochs=2, progress=False)
    np.testing.assert_array_equal(history["step"], np.arange(6))
    # The EMA over the tracked losses, recomputed on the host.
    average, expected = 0.0, []
    for loss in history["loss"]:
        average = 0.9 * average + 0.1 * loss
        expected.append(average)
    np.testing.assert_allclose(history["loss_ema"], expected, rtol=1e-13)
    # max_loss at θₜ from the reference, replaying the same updates with a plain step.
    step = lm.instrument(mlp_case.loss_fn, optax.adam(1e-2), [])
    state = step.init(mlp_case.params)
    for t, batch in enumerate(batches * 2):
        ps = reference.per_sample_grads(mlp_case.loss_fn, state.params, batch)
        np.testing.assert_allclose(history["max_loss"][t], ps.losses.max(), rtol=1e-10)
        np.testing.assert_allclose(history["loss"][t], ps.losses.mean(), rtol=1e-10)
        state, _ = step(state, batch, track=False)
