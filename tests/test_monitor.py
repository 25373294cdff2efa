"""``lm.monitor`` in the loops people already have: same values as ``lm.instrument``, no
recompiles, inside chains, ``MultiSteps``, ``nnx.Optimizer``, linen ``TrainState`` and equinox;
``lm.Recorder`` feeding a run; clear errors for bad wiring."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lmd4ml as lm

RTOL = 1e-10
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}


# Per optimizer: scalars, a stateful one (θ₀), per-sample ones, α and curvature; α and the
# update's size depend on the optimizer's direction, so both see each.
BY_OPTIMIZER = {
    "sgd": lambda: [
        lm.Loss(),
        lm.GradNorm(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.GradHist1d(nbins=20, maxval=0.5),
        lm.Alpha(),
        lm.HessTrace(method="exact"),
    ],
    "adam": lambda: [lm.Distance(), lm.UpdateSize(), lm.InnerTest(), lm.Alpha()],
}


def few() -> list[lm.Quantity]:
    return [lm.Loss(), lm.Distance(), lm.UpdateSize(), lm.NormTest()]


def plain_step(tx: optax.GradientTransformation, loss_fn: Callable, traces: list) -> Callable:
    """A user's own jitted optax step, with one extra keyword argument per update."""

    @jax.jit
    def step(params: Any, opt_state: Any, batch: Any, track: Any = None) -> tuple:
        traces.append(1)
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = tx.update(
            grads, opt_state, params, loss_fn=loss_fn, batch=batch, track=track
        )
        return optax.apply_updates(params, updates), opt_state

    return step


def instrumented(
    loss_fn: Callable, optimizer: Any, quantities: Sequence, params: Any, batches: Sequence
) -> list[tuple[Any, dict]]:
    """``lm.instrument``'s (params after, metrics) at each step: what the monitor must match."""
    step = lm.instrument(loss_fn, optimizer, quantities)
    state, out = step.init(params), []
    for batch in batches:
        state, m = step(state, batch)
        out.append((state.params, m))
    return out


def assert_close(a: Any, b: Any, rtol: float = RTOL) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-13)


def values(state: Any) -> dict:
    """``lm.metrics`` without the step, to compare with ``lm.instrument``'s metrics."""
    m = dict(lm.metrics(state))
    del m["step"]
    return m


# --------------------------------------------------------------- the same values, one compile


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_same_values_as_instrument(mlp_case: models.Case, opt: str) -> None:
    quantities = BY_OPTIMIZER[opt]()
    expected = instrumented(
        mlp_case.loss_fn, OPTIMIZERS[opt](), quantities, mlp_case.params, mlp_case.batches
    )
    tx = lm.monitor(OPTIMIZERS[opt](), quantities)
    traces: list = []
    step = plain_step(tx, mlp_case.loss_fn, traces)
    params, opt_state = mlp_case.params, tx.init(mlp_case.params)
    for t, (batch, (want_params, want)) in enumerate(zip(mlp_case.batches, expected, strict=True)):
        params, opt_state = step(params, opt_state, batch)
        assert int(lm.metrics(opt_state)["step"]) == t
        assert_close(values(opt_state), want)
        assert_close(params, want_params, rtol=1e-13)
    assert len(traces) == 1


def test_with_gradient_clipping(mlp_case: models.Case) -> None:
    """Clipped gradients reach the optimizer; the quantities still see g of the loss.

    The monitor wraps the whole chain, or is its last element: either way it sees the final
    update.
    """
    clip = optax.clip_by_global_norm(0.05)
    chain = optax.chain(clip, optax.adam(1e-2))
    expected = instrumented(mlp_case.loss_fn, chain, few(), mlp_case.params, mlp_case.batches)
    for tx in (
        lm.monitor(optax.chain(clip, optax.adam(1e-2)), few()),
        optax.chain(clip, lm.monitor(optax.adam(1e-2), few())),
    ):
        step = plain_step(tx, mlp_case.loss_fn, [])
        params, opt_state = mlp_case.params, tx.init(mlp_case.params)
        for batch, (want_params, want) in zip(mlp_case.batches, expected, strict=True):
            params, opt_state = step(params, opt_state, batch)
            assert_close(values(opt_state), want)
            assert_close(params, want_params, rtol=1e-13)


def test_no_recompiles_whichever_way_tracking_is_chosen(mlp_case: models.Case) -> None:
    """``every=2``, a traced ``track`` and a static ``track=False``: one program each."""
    tx = lm.monitor(optax.sgd(0.1), few(), every=2)
    traces: list = []
    step = plain_step(tx, mlp_case.loss_fn, traces)
    static = jax.jit(step.__wrapped__, static_argnames="track")
    tracks = [None, None, None, True, False, True, "static False", "static False", None]
    batches = [mlp_case.batches[t % 3] for t in range(len(tracks))]
    expected = instrumented(mlp_case.loss_fn, optax.sgd(0.1), few(), mlp_case.params, batches)
    params, opt_state = mlp_case.params, tx.init(mlp_case.params)
    tracked_at = []
    for track, batch in zip(tracks, batches, strict=True):
        if track == "static False":
            params, opt_state = static(params, opt_state, batch, track=False)
        elif track is None:
            params, opt_state = step(params, opt_state, batch)
        else:
            params, opt_state = step(params, opt_state, batch, jnp.array(track))
        tracked_at.append(int(lm.metrics(opt_state)["step"]))
        assert_close(values(opt_state), expected[tracked_at[-1]][1])
    assert tracked_at == [0, 0, 2, 3, 3, 5, 5, 5, 8]
    assert_close(params, expected[-1][0], rtol=1e-13)
    assert len(traces) == 3


def test_multisteps_tracks_each_optimizer_step(mlp_case: models.Case) -> None:
    """Inside MultiSteps a step is an optimizer update: k micro-batches, values on the last."""
    inner = lm.monitor(optax.sgd(0.1), few())
    # MultiSteps accumulates in float32 unless told; the test compares in float64.
    tx = optax.MultiSteps(inner, every_k_schedule=2, accumulator_dtype=jnp.float64)
    step = plain_step(tx, mlp_case.loss_fn, [])
    expected = instrumented(
        mlp_case.loss_fn, optax.sgd(0.1), few(), mlp_case.params, mlp_case.batches
    )
    params, opt_state = mlp_case.params, tx.init(mlp_case.params)
    for t, (batch, (want_params, want)) in enumerate(zip(mlp_case.batches, expected, strict=True)):
        # The same micro-batch twice: the accumulated gradient is that batch's.
        params, opt_state = step(params, opt_state, batch)
        assert int(lm.metrics(opt_state)["step"]) == t - 1
        params, opt_state = step(params, opt_state, batch)
        assert int(lm.metrics(opt_state)["step"]) == t
        assert_close(values(opt_state), want)
        assert_close(params, want_params, rtol=1e-13)


# --------------------------------------------------------------------- the frameworks' loops


def test_nnx_optimizer_under_nnx_jit(tmp_path: Any) -> None:
    model = models.NnxMLP(nnx.Rngs(1))
    case = models.nnx_mlp()
    expected = instrumented(case.loss_fn, optax.adam(1e-2), few(), case.params, case.batches)
    optimizer = nnx.Optimizer(model, lm.monitor(optax.adam(1e-2), few()), wrt=nnx.Param)
    traces: list = []

    @nnx.jit
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: tuple) -> None:
        traces.append(1)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params: Any, batch: tuple) -> jax.Array:
            return models.module_loss(nnx.merge(graphdef, params, rest), batch)

        grads = nnx.grad(lambda m: models.module_loss(m, batch).mean())(model)
        optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)

    with lm.Recorder(tmp_path, "nnx", quantities=few()) as recorder:
        for batch, (_, want) in zip(case.batches, expected, strict=True):
            train_step(model, optimizer, batch)
            recorder.log(optimizer)
            assert_close(values(optimizer), want)
            assert_close(values(optimizer.opt_state), want)
    assert len(traces) == 1
    run = lm.load_run(tmp_path / "nnx")
    steps, losses = run["loss"]
    assert steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(losses, [float(m["loss"]) for _, m in expected], rtol=RTOL)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))
        return nn.Dense(models.N_CLASSES, param_dtype=jnp.float64)(h)


def test_linen_train_state() -> None:
    module, batches = LinenMLP(), models.mlp().batches

    def loss_fn(params: Any, batch: tuple) -> jax.Array:
        x, y = batch
        return models.cross_entropy(module.apply(params, x), y)

    params = module.init(jax.random.key(0), batches[0][0])
    expected = instrumented(loss_fn, optax.adam(1e-2), few(), params, batches)
    state = train_state.TrainState.create(
        apply_fn=module.apply, params=params, tx=lm.monitor(optax.adam(1e-2), few())
    )

    @jax.jit
    def train_step(state: train_state.TrainState, batch: tuple) -> train_state.TrainState:
        grads = jax.grad(lambda p: loss_fn(p, batch).mean())(state.params)
        # apply_gradients does not pass extra arguments to tx.update: do its two lines.
        updates, opt_state = state.tx.update(
            grads, state.opt_state, state.params, loss_fn=loss_fn, batch=batch
        )
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    for batch, (want_params, want) in zip(batches, expected, strict=True):
        state = train_step(state, batch)
        assert_close(values(state), want)
        assert_close(state.params, want_params, rtol=1e-13)


class EqxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(5, 8, key=k1, dtype=jnp.float64)
        self.out = eqx.nn.Linear(8, models.N_CLASSES, key=k2, dtype=jnp.float64)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def eqx_loss(model: EqxMLP, batch: tuple) -> jax.Array:
    x, y = batch
    return models.cross_entropy(jax.vmap(model)(x), y)


def test_equinox_filter_jit() -> None:
    model = EqxMLP(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params: EqxMLP, batch: tuple) -> jax.Array:
        return eqx_loss(eqx.combine(params, static), batch)

    batches = models.mlp().batches
    expected = instrumented(loss_fn, optax.adam(1e-2), few(), params, batches)
    tx = lm.monitor(optax.adam(1e-2), few())
    opt_state = tx.init(params)

    @eqx.filter_jit
    def train_step(model: EqxMLP, opt_state: Any, batch: tuple) -> tuple:
        grads = eqx.filter_grad(lambda m: eqx_loss(m, batch).mean())(model)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss_fn(params: EqxMLP, batch: tuple) -> jax.Array:
            return eqx_loss(eqx.combine(params, static), batch)

        updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch)
        return eqx.apply_updates(model, updates), opt_state

    for batch, (_, want) in zip(batches, expected, strict=True):
        model, opt_state = train_step(model, opt_state, batch)
        assert_close(values(opt_state), want)
    assert train_step._cached._cache_size() == 1


# ----------------------------------------------------------------------------- the recorder


def test_recorder_keeps_tracked_steps_and_marks_failures(mlp_case: models.Case, tmp_path) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss(), lm.GradHist1d(nbins=5)], every=2)
    step = plain_step(tx, mlp_case.loss_fn, [])
    params, opt_state = mlp_case.params, tx.init(mlp_case.params)
    recorder = lm.Recorder(tmp_path, "r", config={"lr": 0.1})
    with pytest.raises(RuntimeError, match="data ran out"), recorder:
        recorder.log(opt_state)  # nothing tracked yet: no run
        assert recorder.run_dir is None
        for t in range(5):
            params, opt_state = step(params, opt_state, mlp_case.batches[t % 3])
            recorder.log(opt_state)
        raise RuntimeError("data ran out")
    run = lm.load_run(tmp_path / "r")
    assert run.metadata["status"] == "failed"
    assert run.metadata["config"] == {"lr": 0.1}
    assert sorted(run.keys) == ["grad_hist_1d", "loss"]
    assert run["grad_hist_1d"][0].tolist() == [0, 2, 4]
    assert run["grad_hist_1d"][1].shape == (3, 5)
    assert not (tmp_path / "r" / "live.json").exists()


def test_recorder_warns_once_at_the_first_nonfinite_step(
    regression_case: models.Case, tmp_path
) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    step = plain_step(tx, regression_case.loss_fn, [])
    params, opt_state = regression_case.params, tx.init(regression_case.params)
    batches = [models.regression_batch(seed) for seed in range(5)]
    x, y = batches[2]
    batches[2] = (x.at[0, 0].set(jnp.nan), y)  # NaN loss at step 2, NaN θ after it
    with warnings.catch_warnings(record=True) as caught, lm.Recorder(tmp_path, "r") as recorder:
        warnings.simplefilter("always")
        for batch in batches:
            params, opt_state = step(params, opt_state, batch)
            recorder.log(opt_state)
    nonfinite = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1, [str(w.message) for w in caught]
    assert "step 2" in str(nonfinite[0].message) and "'loss'" in str(nonfinite[0].message)
    assert nonfinite[0].filename == __file__  # points at the caller's loop
    losses = lm.load_run(tmp_path / "r")["loss"][1]
    assert np.all(np.isfinite(losses[:2])) and np.all(np.isnan(losses[2:])), losses


# ----------------------------------------------------------------------------------- errors


def test_missing_extra_arguments_are_named(regression_case: models.Case) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    params, batch = regression_case.params, regression_case.batches[0]
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"needs loss_fn and batch .*loss_fn=loss_fn, batch=batch"):
        tx.update(params, state, params)
    with pytest.raises(TypeError, match="needs batch"):
        tx.update(params, state, params, loss_fn=regression_case.loss_fn)
    with pytest.raises(TypeError, match="needs params"):
        tx.update(params, state, loss_fn=regression_case.loss_fn, batch=batch)
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        tx.update(params, state, params, loss_fn=1.0, batch=batch)
    with pytest.raises(TypeError, match="track must be a Python bool or a scalar boolean"):
        tx.update(params, state, params, loss_fn=regression_case.loss_fn, batch=batch, track=1)
    # The bare update needs nothing more than the inner optimizer does.
    tx.update(params, state, params, track=False)


def test_reduced_loss_is_rejected(regression_case: models.Case) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    params, batch = regression_case.params, regression_case.batches[0]
    mean_loss = lambda p, b: regression_case.loss_fn(p, b).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"per-sample losses, a float vector of shape \(9,\)"):
        tx.update(params, tx.init(params), params, loss_fn=mean_loss, batch=batch)


def test_metrics_needs_exactly_one_monitor(regression_case: models.Case) -> None:
    params = regression_case.params
    with pytest.raises(ValueError, match=r"found no lm\.monitor state in the tuple"):
        lm.metrics(optax.adam(1e-2).init(params))
    two = optax.chain(lm.monitor(optax.sgd(0.1), [lm.Loss()]), lm.monitor(optax.sgd(1), []))
    with pytest.raises(ValueError, match=r"found 2 lm\.monitor states"):
        lm.metrics(two.init(params))


def test_value_whose_shape_follows_the_batch(regression_case: models.Case) -> None:
    tx = lm.monitor(optax.sgd(0.1), [lm.quantity("losses", lambda ctx: ctx.losses)])
    params, batch = regression_case.params, regression_case.batches[0]
    with pytest.raises(ValueError, match=r"'losses' has value shape \(9,\) .* must not depend"):
        tx.update(params, tx.init(params), params, loss_fn=regression_case.loss_fn, batch=batch)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        lm.monitor(optax.sgd(0.1), [], every=0)
    with pytest.raises(TypeError, match="expected lmd4ml quantities"):
        lm.monitor(optax.sgd(0.1), ["loss"])
    with pytest.raises(TypeError, match="wraps an optax GradientTransformation"):
        lm.monitor(0.1, [lm.Loss()])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    for bad in (P("data"), NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P())):
        with pytest.raises(ValueError, match="batch_sharding must be a NamedSharding that split"):
            lm.monitor(optax.sgd(0.1), [lm.Loss()], batch_sharding=bad)
    # One device on the data axis: nothing is split, the monitor runs as without.
    lm.monitor(optax.sgd(0.1), [lm.Loss()], batch_sharding=NamedSharding(mesh, P("data")))
