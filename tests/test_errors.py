"""Bad inputs fail early, before any compute, with a message naming the problem and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest

import lmd4ml as lm

B = models.BATCH


def squared_error(w: jax.Array, batch: tuple) -> jax.Array:
    x, y = batch
    return (x @ w - y) ** 2


def linear_batch(n: int = B) -> tuple:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, 3)))
    return x, jnp.arange(n, dtype=jnp.float64)


def step_for(loss_fn: Callable, quantities: list | None = None) -> tuple:
    step = lm.instrument(loss_fn, optax.sgd(0.1), quantities or [lm.Loss()])
    return step, step.init(jnp.zeros(3))


def learner_for(loss_fn: Callable = squared_error, batches: Any = None) -> lm.Learner:
    batches = [linear_batch()] * 2 if batches is None else batches
    return lm.Learner(jnp.zeros(3), loss_fn, batches, optax.sgd(0.1), [lm.Loss()])


def assert_untrained(learner: lm.Learner) -> None:
    assert learner.steps_done == 0
    assert int(learner.state.step) == 0
    np.testing.assert_array_equal(learner.params, np.zeros(3))


# ------------------------------------------------------------------- the loss function


WRONG_LOSSES = {
    "scalar": (lambda w, b: jnp.mean(squared_error(w, b)), r"got shape \(\)"),
    "column": (lambda w, b: squared_error(w, b)[:, None], rf"got shape \({B}, 1\)"),
    "one short": (lambda w, b: squared_error(w, b)[1:], rf"returned shape \({B - 1},\)"),
    "integer": (lambda w, b: squared_error(w, b).astype(jnp.int32), "dtype int32"),
}


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("kind", sorted(WRONG_LOSSES))
def test_loss_fn_must_return_one_float_loss_per_sample(kind: str, track: bool) -> None:
    loss_fn, what = WRONG_LOSSES[kind]
    step, state = step_for(loss_fn)
    expected = re.escape(f"({B},)")  # names the expected shape, with the batch's B
    with pytest.raises(ValueError, match=rf"(?s)(per.sample|one loss per sample).*{expected}"):
        step(state, linear_batch(), track=track)
    with pytest.raises(ValueError, match=what):
        step(state, linear_batch(), track=track)


def test_wrong_loss_shape_fails_in_train_before_any_step() -> None:
    learner = learner_for(lambda w, b: jnp.mean(squared_error(w, b)))
    with pytest.raises(ValueError, match=r"per-sample losses.*without \.mean\(\)"):
        lm.train(learner, epochs=1, progress=False)
    assert_untrained(learner)
    assert learner.history.get("loss", []) == []


# ------------------------------------------------------------------------- quantities


def test_norm_test_rejects_a_batch_of_one() -> None:
    step, state = step_for(squared_error, [lm.Loss(), lm.NormTest()])
    with pytest.raises(ValueError, match=r"NormTest needs batches of at least 2 samples.*got 1"):
        step(state, linear_batch(1))
    # Only the selections that include NormTest need two samples.
    _, metrics = step(state, linear_batch(1), track={"loss"})
    assert set(metrics) == {"loss"}
    _, metrics = step(state, linear_batch(1), track=False)
    assert metrics == {}


def test_norm_test_batch_of_one_fails_in_train_before_any_step() -> None:
    learner = lm.Learner(
        jnp.zeros(3), squared_error, [linear_batch(1)], optax.sgd(0.1), [lm.NormTest()]
    )
    with pytest.raises(ValueError, match="NormTest needs batches of at least 2 samples"):
        lm.train(learner, progress=False)
    assert_untrained(learner)


def test_per_sample_statistics_need_a_sample_axis_on_every_batch_leaf() -> None:
    """A scalar in the batch is fine for the loss but has no per-sample slices."""

    def scaled(w: jax.Array, batch: tuple) -> jax.Array:
        x, y, scale = batch
        return scale * squared_error(w, (x, y))

    step, state = step_for(scaled, [lm.Loss(), lm.NormTest()])
    batch = (*linear_batch(), jnp.asarray(2.0))
    with pytest.raises(ValueError, match=r"same leading \(sample\) axis; got shapes"):
        step(state, batch)
    _, metrics = step(state, batch, track={"loss"})
    assert set(metrics) == {"loss"}


@pytest.mark.parametrize("nbins", [0, -3, 2.5, "10", None])
def test_grad_hist_nbins_must_be_a_positive_integer(nbins: Any) -> None:
    with pytest.raises(ValueError, match=rf"nbins must be an integer >= 1.*, got {nbins!r}"):
        lm.GradHist1d(nbins=nbins)


@pytest.mark.parametrize("maxval", [0, 0.0, -0.05, float("nan")])
def test_grad_hist_maxval_must_be_positive(maxval: float) -> None:
    with pytest.raises(ValueError, match=rf"maxval must be a finite number > 0.*, got {maxval!r}"):
        lm.GradHist1d(maxval=maxval)


def test_two_quantities_with_one_key() -> None:
    twice = [lm.Loss(), lm.quantity("loss", lambda ctx: ctx.loss)]
    with pytest.raises(ValueError, match=r"share the key\(s\) \['loss'\].*unique"):
        lm.instrument(squared_error, optax.sgd(0.1), twice)
    with pytest.raises(ValueError, match="share the key"):
        lm.Learner(jnp.zeros(3), squared_error, [linear_batch()], optax.sgd(0.1), twice)


def test_step_is_a_reserved_key() -> None:
    with pytest.raises(ValueError, match="'step' is reserved"):
        lm.instrument(squared_error, optax.sgd(0.1), [lm.quantity("step", lambda ctx: 0.0)])


@pytest.mark.parametrize(
    "bad", [lm.Loss, "loss", lambda ctx: ctx.loss, optax.sgd(0.1)], ids=lambda b: type(b).__name__
)
def test_a_non_quantity_in_the_list(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"expected lmd4ml quantities.*got .* of type"):
        lm.instrument(squared_error, optax.sgd(0.1), [lm.Loss(), bad])


def test_tracking_an_unknown_key() -> None:
    step, state = step_for(squared_error)
    with pytest.raises(KeyError, match=r"unknown quantities \['grad_norm'\].*known: \('loss',\)"):
        step(state, linear_batch(), track={"grad_norm"})


@pytest.mark.parametrize("key", ["", None, 3, "max-loss", "2x"])
def test_custom_quantity_needs_an_identifier_key(key: Any) -> None:
    with pytest.raises(ValueError, match="key must be an identifier"):
        lm.quantity(key, lambda ctx: ctx.loss)


def test_custom_quantity_needs_a_callable() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        lm.quantity("loss2", 3.0)


# ------------------------------------------------------------------------ parameters


NO_FLOATS = {
    "empty dict": ({}, ValueError, "params has no float leaves"),
    "empty list": ([], ValueError, "params has no float leaves"),
    "int array": ({"w": np.zeros(3, np.int32)}, TypeError, r"leaf \['w'\] has dtype int32"),
    "int jax arrays": (
        {"w": jnp.zeros((2, 2), jnp.int64), "b": jnp.ones(2, jnp.int64)},
        TypeError,
        r"floating-point arrays; leaf \['b'\] has dtype int64",
    ),
    "bool array": (np.ones(3, bool), TypeError, "has dtype bool"),
}


@pytest.mark.parametrize("kind", sorted(NO_FLOATS))
def test_params_without_float_leaves(kind: str) -> None:
    params, error, match = NO_FLOATS[kind]
    step = lm.instrument(squared_error, optax.sgd(0.1), [lm.Loss()])
    with pytest.raises(error, match=match):
        step.init(params)
    with pytest.raises(error, match=match):
        lm.Learner(params, squared_error, [linear_batch()], optax.sgd(0.1), [lm.Loss()])


@pytest.mark.parametrize("budget", [0, -1, 2.5, "64MB"])
def test_memory_budget_must_be_a_positive_integer(budget: object) -> None:
    match = rf"memory_budget \(bytes\) must be an integer >= 1, got {budget!r}"
    with pytest.raises(ValueError, match=match):
        lm.instrument(squared_error, optax.sgd(0.1), [lm.Loss()], memory_budget=budget)
    with pytest.raises(ValueError, match=match):
        lm.monitor(optax.sgd(0.1), [lm.Loss()], memory_budget=budget)


# ------------------------------------------------------------------- the training loop


@pytest.mark.parametrize("track_every", [0, -1, 2.5, True, "3"])
def test_track_every_must_be_a_positive_integer_or_callable(track_every: Any) -> None:
    learner = learner_for()
    with pytest.raises(ValueError, match=rf"track_every must be an integer >= 1.*{track_every!r}"):
        lm.train(learner, track_every=track_every, progress=False)
    assert_untrained(learner)


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True])
def test_epochs_must_be_a_positive_integer(epochs: Any) -> None:
    learner = learner_for()
    with pytest.raises(ValueError, match=rf"epochs must be an integer >= 1, got {epochs!r}"):
        lm.train(learner, epochs=epochs, progress=False)
    assert_untrained(learner)


def test_empty_list_of_batches() -> None:
    learner = learner_for(batches=[])
    with pytest.raises(ValueError, match="batches is empty"):
        lm.train(learner, progress=False)
    assert_untrained(learner)


def test_empty_generator_of_batches() -> None:
    learner = learner_for(batches=iter([]))
    with pytest.raises(ValueError, match="batches yielded nothing in epoch 1"):
        lm.train(learner, progress=False)
    assert_untrained(learner)


def test_generator_exhausted_after_the_first_epoch() -> None:
    def generate() -> Iterator[tuple]:
        yield from [linear_batch()] * 3

    learner = learner_for(batches=generate())
    with pytest.raises(ValueError, match=r"nothing in epoch 2: it was exhausted.*re-iterable"):
        lm.train(learner, epochs=2, progress=False)
    assert learner.steps_done == 3
    # What epoch 1 tracked is kept.
    assert list(lm.learner.as_history(learner)["step"]) == [0, 1, 2]


def test_batches_must_be_iterable() -> None:
    with pytest.raises(TypeError, match="batches must be an iterable of batches, got int"):
        learner_for(batches=3)
