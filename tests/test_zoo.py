"""A model zoo: architectures as each framework writes them, trained a few steps through the
entry point a user of that framework would take, with the economy preset where per-sample
statistics apply, and batch-level instruments plus the clear error where samples interact
(train-mode BatchNorm). Values are checked against brute force: per-sample gradients are rows
``jax.grad`` of entry i of the batched loss vector, one Python loop iteration per sample, so
with the batched pass's own dropout masks; training against each framework's own loop.

1. flax nnx ResNet-style CNN with BatchNorm, through ``lm.Learner``;
2. flax nnx transformer block with dropout, through ``lm.Learner``;
3. flax linen CNN with dropout and BatchNorm, through ``lm.monitor`` in a user's jitted loop;
4. equinox MLP with dropout (a key per sample), through ``lm.instrument(..., key=)``;
5. equinox BatchNorm model with ``eqx.nn.State``, through ``lm.instrument(..., model_state=)``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import lmd4ml as lm

F64 = jnp.float64
B = 8  # samples per batch
STEPS = 3
N_CLASSES = 3
KEY = jax.random.key(11)
RTOL = 1e-8  # brute force against the library, float64
STATE_RTOL = 1e-10  # the library's training against the framework's own loop

# What stays defined where samples interact (train-mode BatchNorm).
BATCH_LEVEL = (lm.Loss, lm.GradNorm, lm.Distance, lm.UpdateSize)


def adam() -> optax.GradientTransformation:
    return optax.adam(2e-2)


def batch_level() -> list[lm.Quantity]:
    return [make() for make in BATCH_LEVEL]


def image_batches(seed: int, size: int = 6, channels: int = 2) -> list[tuple]:
    """``STEPS`` batches of B images (B, size, size, channels) and integer labels."""
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(B, size, size, channels)), F64),
            jnp.asarray(rng.integers(0, N_CLASSES, size=B)),
        )
        for _ in range(STEPS)
    ]


def vector_batches(seed: int, features: int = 5) -> list[tuple]:
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(B, features)), F64),
            jnp.asarray(rng.integers(0, N_CLASSES, size=B)),
        )
        for _ in range(STEPS)
    ]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def assert_trees_close(ours: Any, theirs: Any, rtol: float = STATE_RTOL) -> None:
    ours, theirs = jax.tree.leaves(ours), jax.tree.leaves(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-12)


def check_distances(history: dict, thetas: list[np.ndarray]) -> None:
    """Distance ‖θₜ − θ₀‖ and update size ‖θₜ₊₁ − θₜ‖ against the parameters θ₀ … θ_T of a
    run (flattened)."""
    distance = [np.linalg.norm(theta - thetas[0]) for theta in thetas[:-1]]
    update = [np.linalg.norm(b - a) for a, b in itertools.pairwise(thetas)]
    np.testing.assert_allclose(history["distance"], distance, rtol=STATE_RTOL, atol=1e-14)
    np.testing.assert_allclose(history["update_size"], update, rtol=STATE_RTOL)


def assert_finite(history: dict) -> None:
    for key, values in history.items():
        for leaf in jax.tree.leaves(values):
            assert np.all(np.isfinite(np.asarray(leaf, float))), key


# ------------------------------------------------------- 1. nnx ResNet-style CNN, BatchNorm


def batchnorm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """nnx.BatchNorm with float64 running statistics (nnx makes them float32 whatever the
    param_dtype)."""
    bn = nnx.BatchNorm(channels, momentum=0.8, param_dtype=F64, rngs=rngs)
    bn.mean = nnx.BatchStat(jnp.zeros(channels, F64))
    bn.var = nnx.BatchStat(jnp.ones(channels, F64))
    return bn


class ResBlock(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        conv = dict(kernel_size=(3, 3), param_dtype=F64, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, **conv)
        self.bn1 = batchnorm(channels, rngs)
        self.conv2 = nnx.Conv(channels, channels, **conv)
        self.bn2 = batchnorm(channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(h)))  # the residual add


class ResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, channels: int = 3):
        self.stem = nnx.Conv(2, channels, kernel_size=(3, 3), param_dtype=F64, rngs=rngs)
        self.bn = batchnorm(channels, rngs)
        self.block = ResBlock(channels, rngs)
        self.head = nnx.Linear(channels, N_CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.block(nnx.relu(self.bn(self.stem(x))))
        h = nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2))  # (B, 3, 3, C)
        return self.head(h.mean(axis=(1, 2)))


def module_loss(model: nnx.Module, batch: tuple) -> jax.Array:
    x, y = batch
    return cross_entropy(model(x), y)


def test_nnx_resnet_with_batchnorm_through_learner() -> None:
    batches = image_batches(0)
    model = ResNet(nnx.Rngs(0))
    learner = lm.Learner(model, module_loss, batches, adam(), batch_level())
    history = lm.train(learner, epochs=1, progress=False, runs_dir=None)
    assert_finite(history)

    # nnx's own training loop: same module, optimizer and batches.
    plain = ResNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(plain, adam(), wrt=nnx.Param)

    @nnx.jit
    def plain_step(model: ResNet, optimizer: nnx.Optimizer, batch: tuple) -> tuple:
        loss, grads = nnx.value_and_grad(lambda m: module_loss(m, batch).mean())(model)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(grads)

    thetas, losses, norms = [reference.flatten(nnx.state(plain, nnx.Param))], [], []
    for batch in batches:
        loss, norm = plain_step(plain, optimizer, batch)
        thetas.append(reference.flatten(nnx.state(plain, nnx.Param)))
        losses.append(loss)
        norms.append(norm)
    np.testing.assert_allclose(history["loss"], losses, rtol=STATE_RTOL)
    np.testing.assert_allclose(history["grad_norm"], norms, rtol=STATE_RTOL)
    check_distances(history, thetas)

    trained = learner.model  # the module, updated in place
    assert trained is model
    assert_trees_close(nnx.state(trained, nnx.BatchStat), nnx.state(plain, nnx.BatchStat))
    assert_trees_close(nnx.state(trained, nnx.Param), nnx.state(plain, nnx.Param))
    assert float(jnp.max(jnp.abs(trained.block.bn2.mean[...]))) > 1e-3  # the statistics moved

    # A per-sample instrument: refused before the first step, naming the cause.
    learner = lm.Learner(ResNet(nnx.Rngs(0)), module_loss, batches, adam(), [lm.NormTest()])
    with pytest.raises(ValueError, match="BatchNorm"):
        lm.train(learner, progress=False, runs_dir=None)
    assert learner.steps_done == 0


# --------------------------------------------------- 2. nnx transformer block with dropout

VOCAB, LENGTH, WIDTH = 11, 5, 8


def token_batches(seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.integers(0, VOCAB, size=(B, LENGTH))),
            jnp.asarray(rng.integers(0, N_CLASSES, size=B)),
        )
        for _ in range(STEPS)
    ]


class Transformer(nnx.Module):
    """Embedding, one self-attention block (attention dropout drawn once for the batch,
    broadcast over samples; dropout after it drawn per sample), LayerNorm, mean pool, dense."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, param_dtype=F64, rngs=rngs)
        self.position = nnx.Param(0.1 * jax.random.normal(rngs.params(), (LENGTH, WIDTH), F64))
        self.attention = nnx.MultiHeadAttention(
            num_heads=2,
            in_features=WIDTH,
            dropout_rate=0.2,
            decode=False,
            param_dtype=F64,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.norm = nnx.LayerNorm(WIDTH, param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(WIDTH, N_CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens) + self.position
        h = self.norm(h + self.dropout(self.attention(h)))
        return self.head(h.mean(axis=1))


def transformer() -> Transformer:
    model = Transformer(nnx.Rngs(0, dropout=1))
    model.train()  # dropout on
    return model


@functools.cache
def transformer_graph() -> Any:
    return nnx.graphdef(transformer())


def transformer_losses(params: nnx.State, rest: nnx.State, batch: tuple) -> jax.Array:
    """ℓ of the batch for the transformer merged from ``params`` and the rest of its state.
    (The rest copied in this trace: nnx mutates RNG counts only of Variables made in the
    trace that calls the module.)"""
    rest = jax.tree.map(lambda x: x, rest)
    return module_loss(nnx.merge(transformer_graph(), params, rest), batch)


def test_nnx_transformer_with_dropout_through_learner() -> None:
    batches = token_batches(1)
    learner = lm.Learner(transformer(), module_loss, [], optax.sgd(0.1), lm.presets.economy())
    for t, batch in enumerate(batches):
        before = learner.state
        learner.batches = [batch]
        history = lm.train(learner, epochs=1, progress=False, runs_dir=None)
        assert history["step"][-1] == t

        # The module as the step saw it, RNG counts included: the same masks as its pass.
        grads = reference.batched_grads(
            transformer_losses, before.params, before.model_state, batch
        )
        losses = transformer_losses(before.params, before.model_state, batch)
        np.testing.assert_allclose(history["loss"][-1], losses.mean(), RTOL)
        np.testing.assert_allclose(
            history["grad_norm"][-1], np.linalg.norm(grads.mean(axis=0)), rtol=RTOL
        )
        np.testing.assert_allclose(history["norm_test"][-1], reference.norm_test(grads), RTOL)
        np.testing.assert_allclose(history["inner_test"][-1], reference.inner_test(grads), RTOL)
        np.testing.assert_allclose(history["ortho_test"][-1], reference.ortho_test(grads), RTOL)
        # SGD: the update is −lr · g, with g the mean of the loop's rows.
        np.testing.assert_allclose(
            reference.flatten(learner.state.params) - reference.flatten(before.params),
            -0.1 * grads.mean(axis=0),
            rtol=RTOL,
            atol=1e-14,
        )
    assert_finite(history)
    assert len(history["step"]) == STEPS
    # Dropout was on: at θ₀ the masks moved the loss away from the deterministic one.
    start = transformer()
    start.eval()  # dropout off
    assert abs(float(module_loss(start, batches[0]).mean()) - history["loss"][0]) > 1e-3


# -------------------------------- 3. linen CNN with dropout and BatchNorm, in a user's loop


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = nn.Conv(4, (3, 3), param_dtype=F64)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.8, param_dtype=F64)(h)
        h = nn.Dropout(0.3, deterministic=not train)(nn.relu(h))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))  # (B, 3, 3, 4)
        return nn.Dense(N_CLASSES, param_dtype=F64)(h.reshape(h.shape[0], -1))


LINEN_CNN = LinenCNN()


def linen_loss(params: dict, batch: tuple, *, key: jax.Array, model_state: dict) -> tuple:
    """The protocol's loss for linen: ``rngs=`` from the key, ``mutable=`` for the state."""
    x, y = batch
    logits, new_state = LINEN_CNN.apply(
        {"params": params, **model_state},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": key},
    )
    return cross_entropy(logits, y), new_state


def linen_train_step(tx: optax.GradientTransformation, monitored: bool) -> Callable:
    """A user's own jitted linen step; ``monitored``: it passes the loss, batch, key and
    model state on to ``tx.update``."""

    @jax.jit
    def train_step(params: dict, stats: dict, opt_state: Any, batch: tuple, key: jax.Array):
        def mean_loss(p: dict) -> tuple:
            losses, new_stats = linen_loss(p, batch, key=key, model_state=stats)
            return losses.mean(), new_stats

        (loss, new_stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        extra = dict(loss_fn=linen_loss, batch=batch, key=key, model_state=stats)
        updates, opt_state = tx.update(grads, opt_state, params, **(extra if monitored else {}))
        return optax.apply_updates(params, updates), new_stats, opt_state, loss, grads

    return train_step


def test_linen_cnn_with_dropout_and_batchnorm_through_monitor(tmp_path: Any) -> None:
    batches = image_batches(2)
    variables = LINEN_CNN.init(jax.random.key(0), batches[0][0], train=False)
    params0 = variables["params"]
    stats0 = {"batch_stats": variables["batch_stats"]}

    def run(tx: optax.GradientTransformation, monitored: bool, check: Callable | None = None):
        train_step = linen_train_step(tx, monitored)
        params, stats, opt_state = params0, stats0, tx.init(params0)
        for t, batch in enumerate(batches):
            theta = reference.flatten(params)
            params, stats, opt_state, loss, grads = train_step(
                params, stats, opt_state, batch, jax.random.fold_in(KEY, t)
            )
            if check is not None:
                check(t, opt_state, loss, grads, theta, reference.flatten(params))
        return params, stats

    theta0 = reference.flatten(params0)

    def check(t: int, opt_state: Any, loss: Any, grads: Any, theta: Any, theta_next: Any):
        m = lm.metrics(opt_state)
        assert int(m["step"]) == t
        np.testing.assert_allclose(m["loss"], loss, rtol=STATE_RTOL)
        np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=STATE_RTOL)
        np.testing.assert_allclose(m["distance"], np.linalg.norm(theta - theta0), atol=1e-12)
        np.testing.assert_allclose(m["update_size"], np.linalg.norm(theta_next - theta), RTOL)

    tx = lm.monitor(adam(), batch_level())
    params, stats = run(tx, monitored=True, check=check)
    # The monitor changes nothing of training: the plain optimizer's run, state and all.
    plain_params, plain_stats = run(adam(), monitored=False)
    assert_trees_close(params, plain_params)
    assert_trees_close(stats, plain_stats)
    assert float(jnp.max(jnp.abs(stats["batch_stats"]["BatchNorm_0"]["mean"]))) > 1e-3

    # A per-sample instrument: the first tracked update finds the samples interacting.
    quantities = [lm.Loss(), lm.NormTest()]
    tx = lm.monitor(adam(), quantities)
    train_step = linen_train_step(tx, monitored=True)
    opt_state = tx.init(params0)
    _, _, opt_state, _, _ = train_step(params0, stats0, opt_state, batches[0], KEY)
    jax.block_until_ready(opt_state)
    with pytest.raises(ValueError, match="BatchNorm"):
        lm.metrics(opt_state)
    with (
        pytest.raises(ValueError, match="BatchNorm"),
        lm.Recorder(tmp_path, "linen", quantities=quantities) as recorder,
    ):
        recorder.log(opt_state)
        recorder.log(opt_state)  # records the first, which raises


# ------------------------------------------- 4. equinox MLP with dropout, a key per sample


class EqxDropoutMLP(eqx.Module):
    hidden: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array, features: int = 5, width: int = 8):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(features, width, key=k1, dtype=F64)
        self.dropout = eqx.nn.Dropout(0.3)
        self.out = eqx.nn.Linear(width, N_CLASSES, key=k2, dtype=F64)

    def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
        return self.out(self.dropout(jnp.tanh(self.hidden(x)), key=key))


EQX_MLP_PARAMS, EQX_MLP_STATIC = eqx.partition(
    EqxDropoutMLP(jax.random.key(0)), eqx.is_inexact_array
)


def eqx_dropout_loss(params: EqxDropoutMLP, batch: tuple, *, key: jax.Array) -> jax.Array:
    """The model vmapped over samples, each with a key of its own from the step's key."""
    x, y = batch
    model = eqx.combine(params, EQX_MLP_STATIC)
    logits = jax.vmap(model)(x, jax.random.split(key, x.shape[0]))
    return cross_entropy(logits, y)


def eqx_dropout_losses(params: EqxDropoutMLP, batch: tuple, key: jax.Array) -> jax.Array:
    return eqx_dropout_loss(params, batch, key=key)


SUM_GRADS = lm.PerSample(
    "sum_grads",
    lambda grads, params: jnp.concatenate(
        [jnp.sum(g, axis=0).ravel() for g in jax.tree.leaves(grads)]
    ),
    "sum",
)
"""Σᵢ ∇ℓᵢ from the library's own per-sample pass, flattened in ``jax.tree.leaves`` order."""

MEAN_PER_SAMPLE_GRAD = lm.quantity(
    "mean_per_sample_grad",
    lambda ctx: ctx.per_sample(SUM_GRADS) / ctx.batch_size,
    per_sample=[SUM_GRADS],
)


def test_equinox_dropout_mlp_through_instrument_with_a_key() -> None:
    lr, batches = 0.1, vector_batches(3)
    step = lm.instrument(
        eqx_dropout_loss, optax.sgd(lr), [*lm.presets.economy(), MEAN_PER_SAMPLE_GRAD]
    )
    state = step.init(EQX_MLP_PARAMS, key=KEY)
    for t, batch in enumerate(batches):
        before = state
        state, m = step(state, batch)
        key_t = jax.random.fold_in(KEY, t)  # the step's key
        grads = reference.batched_grads(eqx_dropout_losses, before.params, batch, key_t)
        assert all(np.all(np.isfinite(np.asarray(v, float))) for v in jax.tree.leaves(m))
        losses = eqx_dropout_loss(before.params, batch, key=key_t)
        np.testing.assert_allclose(m["loss"], losses.mean(), rtol=RTOL)
        g = grads.mean(axis=0)
        np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(g), rtol=RTOL)
        np.testing.assert_allclose(m["norm_test"], reference.norm_test(grads), rtol=RTOL)
        # The library's per-sample gradients average to the loop's g, and g is what SGD took.
        np.testing.assert_allclose(m["mean_per_sample_grad"], g, rtol=RTOL, atol=1e-14)
        step_taken = reference.flatten(state.params) - reference.flatten(before.params)
        np.testing.assert_allclose(step_taken, -lr * g, rtol=RTOL, atol=1e-14)
    # The masks were those of fold_in(KEY, t): another key gives another loss.
    other = eqx_dropout_loss(before.params, batch, key=jax.random.fold_in(KEY, 99)).mean()
    assert abs(float(other) - float(m["loss"])) > 1e-3


# ------------------------------------------- 5. equinox BatchNorm with eqx.nn.State


class EqxBatchNormNet(eqx.Module):
    hidden: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __init__(self, key: jax.Array, features: int = 5, width: int = 6):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(features, width, key=k1, dtype=F64)
        self.norm = eqx.nn.BatchNorm(
            width, axis_name="batch", momentum=0.8, mode="batch", dtype=F64
        )
        self.out = eqx.nn.Linear(width, N_CLASSES, key=k2, dtype=F64)

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.norm(self.hidden(x), state)
        return self.out(jax.nn.relu(h)), state


EQX_BN_MODEL, EQX_BN_STATE = eqx.nn.make_with_state(EqxBatchNormNet)(jax.random.key(1))
EQX_BN_PARAMS, EQX_BN_STATIC = eqx.partition(EQX_BN_MODEL, eqx.is_inexact_array)


def eqx_bn_loss(params: EqxBatchNormNet, batch: tuple, *, model_state: eqx.nn.State) -> tuple:
    """BatchNorm over the vmapped batch axis: ℓᵢ depends on every sample."""
    x, y = batch
    model = eqx.combine(params, EQX_BN_STATIC)
    logits, new_state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, model_state
    )
    return cross_entropy(logits, y), new_state


def test_equinox_batchnorm_state_through_instrument() -> None:
    batches = vector_batches(4)
    step = lm.instrument(eqx_bn_loss, adam(), batch_level())
    state = step.init(EQX_BN_PARAMS, model_state=EQX_BN_STATE)
    history = []
    for batch in batches:
        state, m = step(state, batch)
        history.append(m)

    # equinox's own loop: filter_value_and_grad with the state as aux, the same optimizer.
    @eqx.filter_jit
    def plain_step(params: Any, model_state: Any, opt_state: Any, batch: tuple) -> tuple:
        def mean_loss(p: Any) -> tuple:
            losses, new_state = eqx_bn_loss(p, batch, model_state=model_state)
            return losses.mean(), new_state

        (loss, new_state), grads = eqx.filter_value_and_grad(mean_loss, has_aux=True)(params)
        updates, opt_state = adam().update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), new_state, opt_state, loss, grads

    params, model_state, opt_state = EQX_BN_PARAMS, EQX_BN_STATE, adam().init(EQX_BN_PARAMS)
    thetas = [reference.flatten(params)]
    for batch, m in zip(batches, history, strict=True):
        params, model_state, opt_state, loss, grads = plain_step(
            params, model_state, opt_state, batch
        )
        thetas.append(reference.flatten(params))
        np.testing.assert_allclose(m["loss"], loss, rtol=STATE_RTOL)
        np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(grads), rtol=STATE_RTOL)
    check_distances({k: [m[k] for m in history] for k in history[0]}, thetas)
    assert_trees_close(state.model_state, model_state)
    assert_trees_close(state.params, params)
    running_mean = model_state.get(EQX_BN_MODEL.norm.batch_state_index)[0]
    assert float(jnp.max(jnp.abs(running_mean))) > 1e-3  # the statistics moved

    step = lm.instrument(eqx_bn_loss, adam(), [lm.Loss(), lm.GradHist1d()])
    with pytest.raises(ValueError, match="BatchNorm"):
        step(step.init(EQX_BN_PARAMS, model_state=EQX_BN_STATE), batches[0])
