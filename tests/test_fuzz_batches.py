"""Fuzzing the batches and masks a step is given: nested dicts, tuples and lists of arrays of
every dtype, with None, scalars, strings, ragged or empty sample axes. Each either works or
fails with a clear error saying what was wrong and what a batch is, never a raw JAX one.

The step is traced (``jax.eval_shape``), not compiled: refusals come before tracing or
while the loss is first traced, and what passes has been traced whole. A few batches of
each kind that works also run, in ``lm.train``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lmd4ml as lm

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RULE = "a batch is a pytree"
REFUSALS = {
    "not numbers": (TypeError, rf"(leaf \S+|the batch itself) (is a|has dtype) .*; {RULE}"),
    "no samples": (ValueError, r"the batch has 0 samples .* at least one sample"),
    "no arrays": (ValueError, rf"loss_fn failed on a batch with no arrays: .*; {RULE}"),
    "no common sample axis": (
        ValueError,
        rf"loss_fn failed on a batch whose arrays do not share a leading \(sample\) axis "
        rf"\(shapes .*\): .*; {RULE}",
    ),
    "one sample": (ValueError, "NormTest needs batches of at least 2 samples"),
}


def features_loss(w: jax.Array, batch: object) -> jax.Array:
    """ℓᵢ = (w·fᵢ)², fᵢ the sum over the batch's arrays of the mean of sample i's entries."""
    means = [
        jnp.reshape(x, (jnp.shape(x)[0], -1)).astype(w.dtype).mean(axis=1)
        for x in jax.tree.leaves(batch)
    ]
    return (w * jnp.stack(means).sum(axis=0)) ** 2


STEP = lm.instrument(features_loss, optax.sgd(0.1), [lm.Loss(), lm.NormTest()])
STATE = STEP.init(jnp.ones(()))


def trace(batch: object, track: object = True, mask: object = None) -> dict:
    """The metrics' shapes of one step on ``batch``, traced, not compiled."""
    return jax.eval_shape(lambda state: STEP(state, batch, track=track, mask=mask)[1], STATE)


def expected_refusal(batch: object, track: object) -> str | None:
    """What is wrong with ``batch`` for the step, in the order the step finds it."""
    leaves = jax.tree.leaves(batch)
    if any(isinstance(x, str) or np.asarray(x).dtype.kind in "OSU" for x in leaves):
        return "not numbers"
    shapes = [np.shape(x) for x in leaves]
    leading = {shape[0] for shape in shapes if shape}
    if leading == {0}:
        return "no samples"
    if not leaves:
        return "no arrays"
    if len(leading) != 1 or () in shapes:
        return "no common sample axis"
    if leading == {1} and track is True:
        return "one sample"
    return None


def array(n: int, trailing: tuple[int, ...], dtype: str) -> np.ndarray:
    values = np.arange(n * int(np.prod(trailing))).reshape(n, *trailing)
    if dtype == "object":
        return values.astype(object)
    return (values % 2 if dtype == "bool" else values).astype(dtype)


@st.composite
def batches(draw: st.DrawFn) -> object:
    n = draw(st.sampled_from([0, 1, 2, 3]))
    numeric = st.builds(
        array,
        # the batch's own sample count, or now and then another: a ragged batch
        st.integers(0, 6).flatmap(
            lambda i: st.sampled_from([0, 1, 2, 3]) if i == 0 else st.just(n)
        ),
        st.sampled_from([(), (2,), (1, 3)]),
        st.sampled_from(["float32", "float64", "int32", "int8", "uint8", "bool"]),
    )
    odd = st.one_of(
        st.sampled_from([None, [], {}, 1.5, 2, True, np.float32(0.5), np.zeros(()), "text"]),
        st.builds(array, st.just(n), st.just((2,)), st.just("object")),
        st.just(np.array(["a"] * max(n, 1))),
    )
    leaf = st.integers(0, 9).flatmap(lambda i: odd if i == 0 else numeric)
    return draw(
        st.recursive(
            leaf,
            lambda inner: st.one_of(
                st.lists(inner, min_size=1, max_size=3),
                st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, min_size=1, max_size=3),
                st.tuples(inner, inner),
            ),
            max_leaves=4,
        )
    )


@FUZZ
@given(batch=batches(), track=st.sampled_from([True, {"loss"}, False]))
def test_a_batch_works_or_is_refused_clearly(batch: object, track: object) -> None:
    refusal = expected_refusal(batch, track)
    event(refusal or "works")
    try:
        metrics = trace(batch, track)
    except (TypeError, ValueError) as error:
        assert refusal is not None, f"refused {batch!r}: {error}"
        kind, pattern = REFUSALS[refusal]
        assert isinstance(error, kind) and re.search(pattern, str(error)), (refusal, error)
        return
    assert refusal is None, f"{batch!r} was taken, expected: {refusal}"
    assert set(metrics) == STEP.active_keys(track)


BATCH = {"x": np.ones((3, 2)), "y": np.arange(3.0)}
masks = st.one_of(
    st.none(),
    st.lists(st.booleans(), min_size=2, max_size=4),
    st.lists(st.integers(0, 2), min_size=3, max_size=3),
    st.lists(st.floats(0, 1), min_size=3, max_size=3),
    st.sampled_from([np.ones((3, 1), bool), np.array(["a", "b", "c"]), "abc", np.float32(1)]),
    st.lists(st.booleans(), min_size=3, max_size=3).map(jnp.asarray),
)


@FUZZ
@given(mask=masks)
def test_a_mask_works_or_is_refused_clearly(mask: object) -> None:
    dtype, shape = np.asarray(mask).dtype, np.shape(mask)
    try:
        trace(BATCH, {"loss"}, mask)
    except TypeError as error:
        assert dtype.kind not in "biu", error
        assert re.search(r"mask must be boolean .* got dtype", str(error)), error
        return
    except ValueError as error:
        assert dtype.kind in "biu" and shape != (3,), error
        assert re.search(r"mask must have one entry per sample, shape \(3,\)", str(error))
        return
    assert mask is None or (dtype.kind in "biu" and shape == (3,))


# ------------------------------------------------------------------- through lm.train


def learner(batches: object) -> lm.Learner:
    return lm.Learner(jnp.ones(()), features_loss, batches, optax.sgd(0.1), [lm.NormTest()])


REFUSED_BY_TRAIN = {
    "one batch as a dict": (BATCH, TypeError, r"iterable of batches .* keys; .* \[batch\]"),
    "no samples": ([{"x": np.ones((0, 2))}], ValueError, "the batch has 0 samples"),
    "a string": ([{**BATCH, "name": "b"}], TypeError, r"leaf \['name'\] is a str"),
    "ragged": ([{"x": np.ones((3, 2)), "y": np.ones(2)}], ValueError, "same leading"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_BY_TRAIN))
def test_train_refuses_before_any_step(kind: str) -> None:
    batches, error, pattern = REFUSED_BY_TRAIN[kind]
    with pytest.raises(error, match=pattern):
        lm.train(learner(batches), progress=False, runs_dir=None)


def test_nested_integer_boolean_and_empty_leaves_train() -> None:
    """Dicts in tuples with None, int and bool arrays; a short last batch is padded."""
    rng = np.random.default_rng(0)

    def batch(n: int) -> tuple:
        x = rng.normal(size=(n, 2)).astype(np.float32)
        return ({"x": x, "none": None}, (rng.integers(0, 5, n), rng.normal(size=n) > 0))

    history = lm.train(learner([batch(4), batch(4), batch(3)]), progress=False, runs_dir=None)
    assert history["step"].tolist() == [0, 1, 2]
    assert np.all(np.isfinite(history["norm_test"]))


def test_a_batch_of_one_sample_runs_without_per_sample_quantities() -> None:
    step = lm.instrument(features_loss, optax.sgd(0.1), [lm.Loss(), lm.GradNorm()])
    state, metrics = step(step.init(jnp.ones(())), {"x": np.full((1, 2), 2.0)})
    assert float(metrics["loss"]) == 4.0 and float(metrics["grad_norm"]) == 8.0
    assert float(state.params) == pytest.approx(1 - 0.1 * 8.0)
