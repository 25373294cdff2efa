"""``Learner`` and ``train``: training plain pytrees and nnx modules, schedules, history, NaN."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import lmd4ml as lm

NBINS = 21


def quantities() -> list[lm.Quantity]:
    return [
        lm.Loss(),
        lm.GradNorm(),
        lm.Distance(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.GradHist1d(nbins=NBINS, maxval=0.2),
    ]


def learnable_batches(n_batches: int = 4, shape: tuple[int, ...] = (5,)) -> list[tuple]:
    """A tiny task a small net can learn: labels from a fixed linear map of the inputs."""
    rng = np.random.default_rng(42)
    w_true = rng.normal(size=(int(np.prod(shape)), models.N_CLASSES))
    out = []
    for _ in range(n_batches):
        x = rng.normal(size=(models.BATCH, *shape))
        y = np.argmax(x.reshape(models.BATCH, -1) @ w_true, axis=1)
        out.append((jnp.asarray(x), jnp.asarray(y)))
    return out


def epoch_means(values: np.ndarray, per_epoch: int) -> np.ndarray:
    return values.reshape(-1, per_epoch).mean(axis=1)


def full_loss(loss_fn: Callable, params: Any, batches: list) -> float:
    return float(np.mean([np.mean(loss_fn(params, batch)) for batch in batches]))


def linear_loss(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    return (x @ params["w"] + params["b"] - y) ** 2


def linear_params() -> dict:
    return {"w": jnp.zeros(2), "b": jnp.zeros(())}


def linear_batches(n: int = 4) -> list[tuple]:
    rng = np.random.default_rng(0)
    return [(jnp.asarray(rng.normal(size=(4, 2))), jnp.arange(4.0)) for _ in range(n)]


def replay(batches: list, tracked: Callable[[int], bool]) -> list[tuple[int, dict]]:
    """(step, metrics) of every tracked step of the linear model, calling the step by hand."""
    step = lm.instrument(linear_loss, optax.adam(1e-2), quantities())
    state, out = step.init(linear_params()), []
    for t, batch in enumerate(batches):
        state, metrics = step(state, batch, track=tracked(t))
        if metrics:
            out.append((t, lm.stats.to_host(metrics)))
    return out


# ---------------------------------------------------------------------------- training


def test_train_plain_params_learns(mlp_case: models.Case) -> None:
    batches = learnable_batches()
    learner = lm.Learner(mlp_case.params, mlp_case.loss_fn, batches, optax.adam(5e-2), quantities())
    before = full_loss(mlp_case.loss_fn, mlp_case.params, batches)
    history = lm.train(learner, epochs=5, progress=False)
    after = full_loss(mlp_case.loss_fn, learner.params, batches)
    assert after < 0.7 * before
    losses = epoch_means(history["loss"], len(batches))
    assert np.all(np.diff(losses) < 0), losses
    # learner.model of a pytree is its parameters
    assert jax.tree.structure(learner.model) == jax.tree.structure(mlp_case.params)
    np.testing.assert_array_equal(
        reference.flatten(learner.model), reference.flatten(learner.params)
    )


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: models.NnxMLP(nnx.Rngs(7)), (5,)),
        (lambda: models.NnxConvNet(nnx.Rngs(8)), (6, 6, 1)),
    ],
    ids=["nnx_mlp", "nnx_conv"],
)
def test_train_nnx_module_updates_it_in_place(make: Callable, shape: tuple) -> None:
    module = make()
    batches = learnable_batches(shape=shape)
    graphdef, initial = nnx.split(module)
    initial = jax.tree.map(jnp.copy, initial)

    def loss_at(state: Any) -> float:
        return full_loss(lambda s, b: models.module_loss(nnx.merge(graphdef, s), b), state, batches)

    learner = lm.Learner(module, models.module_loss, batches, optax.adam(5e-2), quantities())
    history = lm.train(learner, epochs=5, progress=False)
    model = learner.model
    assert model is module  # the module itself, updated in place
    _, trained = nnx.split(model)
    np.testing.assert_array_equal(reference.flatten(trained), reference.flatten(learner.params))
    assert not np.allclose(reference.flatten(trained), reference.flatten(initial))
    # The module computes with the trained parameters.
    assert full_loss(models.module_loss, model, batches) == pytest.approx(loss_at(trained))
    assert loss_at(trained) < 0.7 * loss_at(initial)
    assert np.all(np.diff(epoch_means(history["loss"], len(batches))) < 0)
    assert set(history) == {"step", *learner.step.keys}


def test_donating_learner_trains_the_same_and_hands_out_lasting_copies() -> None:
    batches = learnable_batches(shape=(5,))
    histories, modules = [], []
    for donate in (False, True):
        module = models.NnxMLP(nnx.Rngs(7))
        learner = lm.Learner(
            module, models.module_loss, batches, optax.adam(5e-2), quantities(), donate=donate
        )
        lm.train(learner, epochs=1, progress=False, runs_dir=None)
        params, model = learner.params, learner.model
        histories.append(lm.train(learner, epochs=1, progress=False, runs_dir=None))
        # What was handed out before the second epoch is still readable after it.
        reference.flatten(params)
        reference.flatten(nnx.split(model)[1])
        modules.append(learner.model)
    for key in histories[0]:
        np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=1e-12)
    np.testing.assert_allclose(
        reference.flatten(nnx.split(modules[1])[1]),
        reference.flatten(nnx.split(modules[0])[1]),
        rtol=1e-12,
    )


# ----------------------------------------------------------------- schedules and history

SCHEDULES = {
    "every step": (1, [0, 1, 2, 3, 4, 5, 6, 7]),
    "every 3rd": (3, [0, 3, 6]),
    "callable": (lambda step: step in (1, 2, 5), [1, 2, 5]),
    "never": (lambda step: False, []),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_history_has_one_row_per_tracked_step(name: str) -> None:
    track_every, expected_steps = SCHEDULES[name]
    batches = linear_batches(4)  # 4 batches × 2 epochs = 8 steps
    learner = lm.Learner(linear_params(), linear_loss, batches, optax.adam(1e-2), quantities())
    history = lm.train(learner, epochs=2, track_every=track_every, progress=False)
    assert learner.steps_done == 8
    np.testing.assert_array_equal(history["step"], expected_steps)
    assert history["step"].dtype.kind == "i"
    if not expected_steps:
        assert set(history) == {"step"}
        return
    assert set(history) == {"step", *learner.step.keys}
    for key in learner.step.keys:
        assert len(history[key]) == len(expected_steps), key
    assert history["grad_hist_1d"].shape == (len(expected_steps), NBINS)
    # The same values as calling the instrumented step by hand on the same sequence.
    tracked = set(expected_steps).__contains__
    by_hand = replay(batches * 2, tracked)
    assert [t for t, _ in by_hand] == expected_steps
    for row, (_, metrics) in enumerate(by_hand):
        for key, value in metrics.items():
            np.testing.assert_allclose(history[key][row], value, rtol=1e-14, err_msg=key)


def test_quantities_on_schedules_of_their_own() -> None:
    batches = linear_batches(4)
    learner = lm.Learner(linear_params(), linear_loss, batches, optax.adam(1e-2), quantities())
    schedules = {"norm_test": 3, "grad_hist_1d": lm.schedules.logarithmic(0, 1, steps=3)}
    history = lm.train(learner, epochs=3, schedules=schedules, runs_dir=".", run_name="r",
                       progress=False)  # fmt: skip
    expected = {"norm_test": [0, 3, 6, 9], "grad_hist_1d": [0, 1, 3, 10], "loss": list(range(12))}
    for key, steps in expected.items():
        np.testing.assert_array_equal(history.steps(key), steps)
        assert len(history[key]) == len(steps)
        np.testing.assert_array_equal(lm.load_run("r")[key][0], steps)
    np.testing.assert_array_equal(history["step"], range(12))
    # Tracking never changes training: values equal tracking everything at every step.
    by_hand = dict(replay(batches * 3, lambda t: True))
    for key, steps in expected.items():
        for row, t in enumerate(steps):
            np.testing.assert_allclose(history[key][row], by_hand[t][key], rtol=1e-12, err_msg=key)
    # One compilation per distinct set of quantities due together, none after.
    assert set(learner.step.trace_count.values()) == {1}
    # Due sets: everything (steps 0, 3); all but the histogram (6, 9); all but the norm test
    # (1, 10); neither (the rest).
    assert len(learner.step.trace_count) == 4
    lm.train(learner, epochs=2, schedules=schedules, runs_dir=None, progress=False)
    assert set(learner.step.trace_count.values()) == {1}


def test_schedules_must_name_tracked_quantities() -> None:
    learner = lm.Learner(
        linear_params(), linear_loss, linear_batches(), optax.sgd(0.1), [lm.Loss()]
    )
    with pytest.raises(KeyError, match=r"unknown quantities \['hess_trace'\]; known: \['loss'\]"):
        lm.train(learner, schedules={"hess_trace": 4}, progress=False)
    with pytest.raises(ValueError, match=r"schedules\['loss'\] must be an integer >= 1.*0"):
        lm.train(learner, schedules={"loss": 0}, progress=False)


def test_train_continues_where_it_stopped() -> None:
    batches = linear_batches(3)
    learner = lm.Learner(linear_params(), linear_loss, batches, optax.adam(1e-2), quantities())
    first = lm.train(learner, epochs=1, track_every=2, progress=False)
    np.testing.assert_array_equal(first["step"], [0, 2])
    history = lm.train(learner, epochs=1, track_every=2, progress=False)
    np.testing.assert_array_equal(history["step"], [0, 2, 4])  # the schedule counts on
    assert int(learner.state.step) == learner.steps_done == 6
    by_hand = replay(batches * 2, lambda t: t % 2 == 0)
    for row, (_, metrics) in enumerate(by_hand):
        for key, value in metrics.items():
            np.testing.assert_allclose(history[key][row], value, rtol=1e-14, err_msg=key)


# --------------------------------------------------------------------------- NaN and Inf


def train_recording_warnings(learner: lm.Learner, **kwargs: Any) -> tuple[dict, list[str]]:
    """Train; return the history and the message of every RuntimeWarning raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lm.train(learner, progress=False, **kwargs)
    return history, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def first_nonfinite_row(history: dict) -> int:
    bad = [
        row
        for row in range(len(history["step"]))
        if not all(np.all(np.isfinite(history[k][row])) for k in history if k != "step")
    ]
    return bad[0]


def test_nan_in_the_data_is_recorded_with_one_warning(regression_case: models.Case) -> None:
    batches = [models.regression_batch(seed) for seed in range(6)]
    x, y = batches[4]
    batches[4] = (x.at[2, 1].set(jnp.nan), y)  # step 4's loss is NaN, and θ after it
    learner = lm.Learner(
        regression_case.params, regression_case.loss_fn, batches, optax.sgd(0.1), quantities()
    )
    history, messages = train_recording_warnings(learner, epochs=1)
    assert len(messages) == 1, messages
    assert "step 4" in messages[0] and "loss" in messages[0]
    assert np.all(np.isfinite(history["loss"][:4]))
    assert np.all(np.isnan(history["loss"][4:]))
    assert np.all(np.isnan(history["grad_norm"][4:]))
    np.testing.assert_array_equal(history["step"], np.arange(6))
    # A later call on the same learner warns no more: the first such step was named.
    _, messages = train_recording_warnings(learner, epochs=1)
    assert messages == []
    assert len(history["step"]) == 6


def test_nan_params_warn_at_step_zero(regression_case: models.Case) -> None:
    params = dict(regression_case.params)
    params["b_in"] = params["b_in"].at[0].set(jnp.nan)
    learner = lm.Learner(
        params,
        regression_case.loss_fn,
        list(regression_case.batches),
        optax.adam(1e-2),
        quantities(),
    )
    history, messages = train_recording_warnings(learner, epochs=2)
    assert len(messages) == 1 and "step 0" in messages[0], messages
    assert np.all(np.isnan(history["loss"]))
    assert len(history["step"]) == 6


def test_divergence_from_a_huge_learning_rate(regression_case: models.Case) -> None:
    """SGD with lr 1e150 overflows to Inf and then NaN a few steps in; training goes on."""
    learner = lm.Learner(
        regression_case.params,
        regression_case.loss_fn,
        list(regression_case.batches),
        optax.sgd(1e150),
        quantities(),
    )
    history, messages = train_recording_warnings(learner, epochs=3, track_every=1)
    first = first_nonfinite_row(history)
    assert first > 0
    assert len(messages) == 1, messages
    assert f"step {history['step'][first]}" in messages[0]
    assert len(history["step"]) == 9


def test_warning_names_the_first_tracked_nonfinite_step(regression_case: models.Case) -> None:
    batches = [models.regression_batch(seed) for seed in range(6)]
    x, y = batches[3]
    batches[3] = (x.at[0, 0].set(jnp.inf), y)  # NaN from step 3 on; step 3 is not tracked
    learner = lm.Learner(
        regression_case.params, regression_case.loss_fn, batches, optax.sgd(0.1), quantities()
    )
    history, messages = train_recording_warnings(learner, epochs=1, track_every=2)
    np.testing.assert_array_equal(history["step"], [0, 2, 4])
    assert len(messages) == 1 and "step 4" in messages[0], messages
    assert np.isfinite(history["loss"][1]) and not np.isfinite(history["loss"][2])


# ------------------------------------------------------------------------------ odds and ends


def test_progress_bar_shows_the_loss(capsys: pytest.CaptureFixture) -> None:
    batches = linear_batches(3)
    learner = lm.Learner(linear_params(), linear_loss, batches, optax.sgd(0.1), [lm.Loss()])
    history = lm.train(learner, epochs=2)  # progress=True is the default
    assert len(history["loss"]) == 6
    assert "loss=" in capsys.readouterr().err


def test_pytree_valued_quantity_through_train() -> None:
    """A per-layer quantity returns a pytree: step() gives it, and train must record it.

    History keeps the metric's structure with one row per tracked step in every leaf.
    """
    per_layer = lm.quantity("per_layer", lambda ctx: jax.tree.map(jnp.linalg.norm, ctx.grads))
    params, batches = linear_params(), linear_batches(3)
    learner = lm.Learner(params, linear_loss, batches, optax.sgd(0.1), [lm.Loss(), per_layer])
    history = lm.train(learner, epochs=1, progress=False)
    step = lm.instrument(linear_loss, optax.sgd(0.1), [lm.Loss(), per_layer])
    state = step.init(params)
    for row, batch in enumerate(batches):
        state, metrics = step(state, batch)
        for name in ("w", "b"):
            np.testing.assert_allclose(
                history["per_layer"][name][row], metrics["per_layer"][name], rtol=1e-14
            )
