"""The GGN and the curvature defaults against brute force: explicit Jᵢᵀ Hᵢ Jᵢ per sample and
the full float64 Hessian, on the model kinds people write (plain functions, flax linen and
nnx, equinox) with ``lm.supervised``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import lmd4ml as lm
from lmd4ml.stats import ggn

F64 = jnp.float64
B = 7
RTOL = 1e-9
CURVATURE = [lm.HessTrace(), lm.TICDiag(), lm.TICTrace()]


def per_sample(output_loss: Callable) -> Callable[[jax.Array, Any], jax.Array]:
    """One sample's loss on its own outputs, as lm.supervised reduces it."""
    return lambda f, y: jnp.mean(jnp.asarray(output_loss(f[None], jnp.asarray(y)[None])))


def tic_values(grads: np.ndarray, diag: np.ndarray) -> tuple[float, float]:
    """TICDiag and TICTrace from per-sample gradients and a curvature diagonal (ε = 1e-7)."""
    second = np.mean(grads**2, axis=0)
    return float(np.sum(second / (diag + 1e-7))), float(
        np.mean(np.sum(grads**2, 1)) / (diag.sum() + 1e-7)
    )


def check_step(
    apply: Callable, output_loss: Callable, params: Any, batch: tuple, expected_diag: np.ndarray
) -> dict:
    """One lm.instrument step with the default curvature instruments on lm.supervised: its
    values against the given diagonal and brute-force per-sample gradients."""
    loss = lm.supervised(apply, output_loss)
    quantities = [lm.HessTrace(), lm.TICDiag(), lm.TICTrace()]
    step = lm.instrument(loss, optax.sgd(0.1), quantities)
    _, metrics = step(step.init(params), batch)
    grads = reference.per_sample_grads(loss, params, batch).grads
    tic_diag, tic_trace = tic_values(grads, expected_diag)
    np.testing.assert_allclose(float(metrics["hess_trace"]), expected_diag.sum(), rtol=RTOL)
    np.testing.assert_allclose(float(metrics["tic_diag"]), tic_diag, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["tic_trace"]), tic_trace, rtol=RTOL)
    return {q.key: q.resolved["method"] for q in quantities}


def classification(shape: tuple[int, ...], classes: int = 3, seed: int = 0) -> tuple:
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, *shape), F64), jax.random.randint(ky, (B,), 0, classes)


# ---------------------------------------------------------------- output-loss square roots


@pytest.mark.parametrize(
    ("out_loss", "logits", "targets"),
    [
        (optax.softmax_cross_entropy_with_integer_labels, [[0.3, -1.2, 2.0, 0.1]], [2]),
        (optax.softmax_cross_entropy_with_integer_labels, [[40.0, 0.0, -3.0]], [0]),  # p ≈ e₀
        (optax.softmax_cross_entropy_with_integer_labels, [[0.0, 0.0]], [1]),  # uniform, C = 2
        (optax.softmax_cross_entropy_with_integer_labels, [[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]],
         [0, 1]),  # two positions, the loss their mean
        (optax.softmax_cross_entropy, [[0.5, -0.5, 1.5]], [[0.2, 0.0, 0.6]]),  # weight 0.8
    ],
)  # fmt: skip
def test_softmax_square_root_is_exact_with_one_row_fewer(out_loss, logits, targets) -> None:
    """SᵀS = ∇²_f ℓ (float64 jax.hessian), C − 1 rows per position, confident or not."""
    f, y = jnp.asarray(logits, F64), jnp.asarray(targets)
    curvature = lm.supervised(lambda p, x: x, out_loss).curvature
    rows = curvature.sqrt(f, y)
    assert rows.shape == (curvature.directions(f.shape), *f.shape) == (f.size - len(f), *f.shape)
    flat = rows.reshape(rows.shape[0], -1)
    hessian = jax.hessian(lambda v: per_sample(out_loss)(v.reshape(f.shape), y))(f.ravel())
    np.testing.assert_allclose(flat.T @ flat, hessian, atol=1e-14)


# ------------------------------------------------------------ piecewise linear: the Hessian


class ReluCNN(nn.Module):
    """Conv → ReLU → max-pool → dense → ReLU → dense: piecewise linear in each layer."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", param_dtype=F64)(x))
        h = nn.max_pool(h, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(12, param_dtype=F64)(h))
        return nn.Dense(3, param_dtype=F64)(h)


def test_defaults_equal_the_hessian_on_a_piecewise_linear_cnn() -> None:
    """HessTrace(), TICDiag(), TICTrace() with no arguments on a ReLU CNN read the exact
    Hessian's values (Cockpit's), through the GGN, on a model too large for products."""
    model = ReluCNN()
    x, y = classification((8, 8, 2))
    params = model.init(jax.random.key(1), x)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) > 500
    loss = lm.supervised(model.apply, optax.softmax_cross_entropy_with_integer_labels)
    hess = reference.hessian(loss, params, (x, y))
    methods = check_step(
        model.apply,
        optax.softmax_cross_entropy_with_integer_labels,
        params,
        (x, y),
        np.diag(hess),
    )
    assert methods == {"hess_trace": "ggn", "tic_diag": "ggn", "tic_trace": "ggn"}
    flat = reference.flatten(params)
    ggn_ref = reference.ggn_diag(
        lambda v: model.apply(reference.unflatten_like(v, params), x),
        per_sample(optax.softmax_cross_entropy_with_integer_labels),
        flat,
        y,
    )
    np.testing.assert_allclose(ggn_ref, np.diag(hess), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- smooth models: the GGN's


def tanh_mlp(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def test_plain_function_smooth_mlp_reports_the_ggn_and_says_so() -> None:
    k = jax.random.split(jax.random.key(2), 2)
    params = {
        "w1": jax.random.normal(k[0], (4, 6), F64),
        "b1": jnp.full(6, 0.1, F64),
        "w2": jax.random.normal(k[1], (6, 3), F64),
        "b2": jnp.zeros(3, F64),
    }
    x, y = classification((4,))
    out_loss = optax.softmax_cross_entropy_with_integer_labels
    expected = reference.ggn_diag(
        lambda v: tanh_mlp(reference.unflatten_like(v, params), x),
        per_sample(out_loss),
        reference.flatten(params),
        y,
    )
    loss = lm.supervised(tanh_mlp, out_loss)
    hess = np.diag(reference.hessian(loss, params, (x, y)))
    assert np.max(np.abs(hess - expected)) > 1e-3 * np.max(np.abs(hess))  # a real difference
    # Small enough for products: HessTrace() takes the Hessian's, TIC the GGN's.
    quantities = [lm.HessTrace(), lm.TICDiag(), lm.HessTrace(exact_max_params=10, name="big")]
    step = lm.instrument(loss, optax.sgd(0.1), quantities)
    with pytest.warns(UserWarning, match="big: .*not piecewise linear.*GGN's"):
        _, metrics = step(step.init(params), (x, y))
    np.testing.assert_allclose(float(metrics["hess_trace"]), hess.sum(), rtol=RTOL)
    np.testing.assert_allclose(float(metrics["big"]), expected.sum(), rtol=RTOL)
    grads = reference.per_sample_grads(loss, params, (x, y)).grads
    np.testing.assert_allclose(
        float(metrics["tic_diag"]), tic_values(grads, expected)[0], rtol=RTOL
    )
    assert [q.resolved["method"] for q in quantities] == ["exact", "ggn", "ggn"]


class Attention(nn.Module):
    """Dense → self-attention with a residual → LayerNorm → mean-pool → Dense, regression."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(6, param_dtype=F64)(x)
        a = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=6, param_dtype=F64, deterministic=True
        )(h)
        h = nn.LayerNorm(param_dtype=F64)(h + a)
        return nn.Dense(2, param_dtype=F64)(h.mean(axis=1))


@pytest.mark.parametrize("out_loss", [optax.squared_error, optax.l2_loss])
def test_linen_attention_layernorm_with_squared_errors(out_loss: Callable) -> None:
    model = Attention()
    kx, ky = jax.random.split(jax.random.key(3))
    x, y = jax.random.normal(kx, (B, 4, 3), F64), jax.random.normal(ky, (B, 2), F64)
    params = model.init(jax.random.key(4), x)
    expected = reference.ggn_diag(
        lambda v: model.apply(reference.unflatten_like(v, params), x),
        per_sample(out_loss),
        reference.flatten(params),
        y,
    )
    loss = lm.supervised(model.apply, out_loss)
    step = lm.instrument(loss, optax.sgd(0.1), [lm.TICDiag(), lm.HessTrace(method="ggn")])
    _, metrics = step(step.init(params), (x, y))
    np.testing.assert_allclose(float(metrics["hess_trace"]), expected.sum(), rtol=RTOL)
    grads = reference.per_sample_grads(loss, params, (x, y)).grads
    np.testing.assert_allclose(
        float(metrics["tic_diag"]), tic_values(grads, expected)[0], rtol=RTOL
    )


class NnxNormNet(nnx.Module):
    """Dense → LayerNorm → GELU → Dense, an nnx module trained by lm.Learner."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
        self.norm = nnx.LayerNorm(6, param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(6, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.gelu(self.norm(self.hidden(x))))


def test_nnx_learner_with_label_distributions() -> None:
    x, labels = classification((4,), seed=5)
    y = jax.nn.one_hot(labels, 3, dtype=F64) * 0.9 + 0.1 / 3  # smoothed labels
    module = NnxNormNet(nnx.Rngs(0))
    graphdef, params = nnx.split(module, nnx.Param)
    out_loss = optax.softmax_cross_entropy

    def apply(p: Any, inputs: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p)(inputs)

    expected = reference.ggn_diag(
        lambda v: apply(reference.unflatten_like(v, params), x),
        per_sample(out_loss),
        reference.flatten(params),
        y,
    )
    loss = lm.supervised(lambda model, inputs: model(inputs), out_loss)
    learner = lm.Learner(module, loss, [(x, y)], optax.adam(1e-2), [lm.TICTrace(), lm.TICDiag()])
    history = lm.train(learner, runs_dir=None, progress=False)
    grads = reference.per_sample_grads(lm.supervised(apply, out_loss), params, (x, y)).grads
    tic_diag, tic_trace = tic_values(grads, expected)
    np.testing.assert_allclose(history["tic_trace"][0], tic_trace, rtol=RTOL)
    np.testing.assert_allclose(history["tic_diag"][0], tic_diag, rtol=RTOL)


class EqxMLP(eqx.Module):
    layers: list

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.layers = [
            eqx.nn.Linear(3, 5, key=k1, dtype=F64),
            eqx.nn.Linear(5, 2, key=k2, dtype=F64),
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers[1](jax.nn.softplus(self.layers[0](x)))


def log_cosh(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """A custom output loss (convex, no closed form here): Σ log cosh(f − y) per sample."""
    return jnp.sum(jnp.log(jnp.cosh(outputs - targets)), axis=-1)


def test_equinox_with_a_custom_output_loss() -> None:
    model = EqxMLP(jax.random.key(6))
    params, static = eqx.partition(model, eqx.is_array)
    kx, ky = jax.random.split(jax.random.key(7))
    x, y = jax.random.normal(kx, (B, 3), F64), jax.random.normal(ky, (B, 2), F64)

    def apply(p: Any, inputs: jax.Array) -> jax.Array:
        return jax.vmap(eqx.combine(p, static))(inputs)

    expected = reference.ggn_diag(
        lambda v: apply(reference.unflatten_like(v, params), x),
        per_sample(log_cosh),
        reference.flatten(params),
        y,
    )
    loss = lm.supervised(apply, log_cosh)
    assert not loss.curvature.closed_form
    step = lm.instrument(loss, optax.sgd(0.1), [lm.HessTrace(method="ggn"), lm.TICDiag()])
    _, metrics = step(step.init(params), (x, y))
    np.testing.assert_allclose(float(metrics["hess_trace"]), expected.sum(), rtol=RTOL)


def test_a_custom_output_loss_that_is_not_convex_is_clipped_with_a_warning() -> None:
    def wavy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(outputs - targets), axis=-1)  # ∇² = −sin: negative where sin > 0

    curvature = lm.supervised(tanh_mlp, wavy).curvature
    f, y = jnp.array([1.0, -1.0]), jnp.zeros(2)
    with pytest.warns(UserWarning, match="negative eigenvalue"):
        rows = jax.block_until_ready(jax.jit(curvature.sqrt)(f, y))
    np.testing.assert_allclose(rows.T @ rows, np.diag([0.0, np.sin(1.0)]), atol=1e-12)


# ------------------------------------------------------------------- randomness and masks


def dropout_mlp(params: dict, x: jax.Array, *, key: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["w1"])
    keep = jax.random.bernoulli(key, 0.7, h.shape)
    return (jnp.where(keep, h / 0.7, 0.0)) @ params["w2"]


def dropout_params() -> dict:
    k = jax.random.split(jax.random.key(8), 2)
    return {"w1": jax.random.normal(k[0], (4, 8), F64), "w2": jax.random.normal(k[1], (8, 3), F64)}


def relu_loss() -> lm.Supervised:
    """A ReLU MLP on dropout_params(), split, with integer labels."""
    return lm.supervised(
        lambda p, v: jax.nn.relu(v @ p["w1"]) @ p["w2"],
        optax.softmax_cross_entropy_with_integer_labels,
    )


def test_dropout_sees_the_batched_pass_draws() -> None:
    """The GGN's per-sample passes replay the draws of the step's batched pass: equal to the
    Jacobians of the batched model with the step's key."""
    params, key = dropout_params(), jax.random.key(9)
    x, y = classification((4,), seed=10)
    out_loss = optax.softmax_cross_entropy_with_integer_labels
    step_key = jax.random.fold_in(key, 0)  # the key of step 0
    expected = reference.ggn_diag(
        lambda v: dropout_mlp(reference.unflatten_like(v, params), x, key=step_key),
        per_sample(out_loss),
        reference.flatten(params),
        y,
    )
    step = lm.instrument(lm.supervised(dropout_mlp, out_loss), optax.sgd(0.1), [lm.HessTrace()])
    _, metrics = step(step.init(params, key=key), (x, y))
    np.testing.assert_allclose(float(metrics["hess_trace"]), expected.sum(), rtol=RTOL)


def test_padded_samples_count_for_nothing() -> None:
    params = dropout_params()
    x, y = classification((4,), seed=11)
    loss = relu_loss()
    values = []
    for batch, mask in [((x[:5], y[:5]), None), ((x, y), jnp.arange(B) < 5)]:
        step = lm.instrument(loss, optax.sgd(0.1), [lm.HessTrace(), lm.TICTrace(), lm.TICDiag()])
        values.append(step(step.init(params), batch, mask=mask)[1])
    for key in values[0]:
        np.testing.assert_allclose(float(values[1][key]), float(values[0][key]), rtol=RTOL)


# ---------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize(
    "out_loss", [optax.softmax_cross_entropy_with_integer_labels, optax.squared_error, log_cosh]
)
def test_monte_carlo_is_unbiased(out_loss: Callable) -> None:
    params = {"w": jax.random.normal(jax.random.key(12), (4, 3), F64)}
    x, labels = classification((4,), seed=13)
    y = (
        labels
        if out_loss is optax.softmax_cross_entropy_with_integer_labels
        else jax.nn.one_hot(labels, 3, dtype=F64)
    )
    forward = lambda p, batch: jnp.tanh(batch[0] @ p["w"])  # noqa: E731
    curvature = lm.supervised(lambda p, v: forward(p, (v, None)), out_loss).curvature
    rows = lambda f, s, k: curvature.sqrt(f, s[1])  # noqa: E731
    exact = ggn.diag(forward, rows, params, (x, y), curvature.directions((3,)))["w"]

    def estimate(key: jax.Array) -> jax.Array:
        keys = jax.random.key_data(jax.random.split(key, B))
        rows = lambda f, s, k: curvature.sample(f, s[1], k)[None]  # noqa: E731
        return ggn.diag(forward, rows, params, (x, y), 1, keys=keys)["w"]

    draws = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(14), 4000))
    mean, sem = jnp.mean(draws, 0), jnp.std(draws, 0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(mean - exact) <= 5 * sem + 1e-12)
    assert float(jnp.max(sem)) < 0.05 * float(jnp.max(exact))  # the test has power


def test_many_outputs_use_monte_carlo_and_say_so() -> None:
    params = dropout_params()
    x, y = classification((4,), seed=15)
    loss = relu_loss()
    quantity = lm.HessTrace(max_directions=1)
    step = lm.instrument(
        loss, optax.sgd(0.1), [quantity, lm.HessTrace(method="exact", name="exact")]
    )
    with pytest.warns(UserWarning, match="2 output directions.*ggn_mc"):
        state = step.init(params)
        estimates = []
        for _ in range(3):
            state, metrics = step(state, (x, y))
            estimates.append(float(metrics["hess_trace"]))
    assert quantity.resolved["method"] == "ggn_mc"
    assert len(set(estimates)) == 3 and all(np.isfinite(estimates))  # fresh draws each step
    assert step.trace_count[frozenset({"hess_trace", "exact"})] == 1  # and no recompiling


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_before_any_compute() -> None:
    params, x, y = dropout_params(), *classification((4,), seed=16)
    apply = lambda p, v: jax.nn.relu(v @ p["w1"]) @ p["w2"]  # noqa: E731
    ce = optax.softmax_cross_entropy_with_integer_labels

    def first_step(loss: Any, batch: Any, quantity: lm.Quantity | None = None) -> None:
        quantity = lm.HessTrace(method="ggn") if quantity is None else quantity
        step = lm.instrument(loss, optax.sgd(0.1), [quantity])
        step(step.init(params), batch)

    with pytest.raises(ValueError, match=r"integer class labels of shape outputs.shape\[:-1\]"):
        first_step(lm.supervised(apply, ce), (x, y[:, None]))
    with pytest.raises(ValueError, match="targets of the outputs' shape"):
        first_step(lm.supervised(apply, optax.squared_error), (x, y.astype(F64)))
    with pytest.raises(ValueError, match=r"one output per sample, shape \(B, ...\)"):
        first_step(lm.supervised(lambda p, v: apply(p, v).sum(0), ce), (x, y))
    with pytest.raises(TypeError, match=r"output_loss\(outputs, targets\) failed on outputs of"):
        first_step(lm.supervised(apply, lambda o, t: o @ t), (x, y))
    with pytest.raises(ValueError, match=r"must keep the sample axis.*returned shape \(\)"):
        first_step(lm.supervised(apply, lambda o, t: jnp.sum(o)), (x, y))
    with pytest.raises(TypeError, match=r"batches \(inputs, targets\), a pair"):
        first_step(lm.supervised(apply, ce), x)
    with pytest.raises(ValueError, match="method must be one of"):
        lm.TICDiag(method="gauss_newton")
    with pytest.raises(ValueError, match=r"needs the loss split.*lm.supervised"):
        first_step(lambda p, b: ce(apply(p, b[0]), b[1]), (x, y))
    with pytest.raises(ValueError, match=r"exact_max_params=10\) need the loss split"):
        first_step(lambda p, b: ce(apply(p, b[0]), b[1]), (x, y), lm.TICTrace(exact_max_params=10))
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        lm.supervised("model", ce)


# ---------------------------------------------------------------------- monitor, chunking


def test_monitor_and_chunks_agree_with_instrument() -> None:
    params = dropout_params()
    x, y = classification((4,), seed=17)
    loss = lm.supervised(
        lambda p, v: jnp.tanh(v @ p["w1"]) @ p["w2"],
        optax.softmax_cross_entropy_with_integer_labels,
    )
    quantities = lambda: [lm.HessTrace(method="ggn"), lm.TICDiag()]  # noqa: E731
    step = lm.instrument(loss, optax.sgd(0.1), quantities())
    _, expected = step(step.init(params), (x, y))
    chunked = lm.instrument(
        loss, optax.sgd(0.1), quantities(), memory_budget=models.budget_for_chunk(params, 2)
    )
    _, in_chunks = chunked(chunked.init(params), (x, y))
    tx = lm.monitor(optax.sgd(0.1), quantities())
    grads = jax.grad(lambda p: jnp.mean(loss(p, (x, y))))(params)
    _, state = tx.update(grads, tx.init(params), params, loss_fn=loss, batch=(x, y))
    for key, value in expected.items():
        np.testing.assert_allclose(float(in_chunks[key]), float(value), rtol=RTOL)
        np.testing.assert_allclose(float(lm.metrics(state)[key]), float(value), rtol=RTOL)


def test_the_run_records_the_method_each_instrument_used(tmp_path: Any) -> None:
    params = dropout_params()
    x, y = classification((4,), seed=18)
    loss = relu_loss()
    quantities = [lm.HessTrace(), lm.TICTrace(method="ggn_mc"), lm.TICDiag(method="exact")]
    learner = lm.Learner(params, loss, [(x, y)], optax.sgd(0.1), quantities)
    lm.train(learner, runs_dir=tmp_path, progress=False)
    about = lm.load_run(next(tmp_path.iterdir())).metadata["quantities_by_key"]
    assert {k: v["resolved"]["method"] for k, v in about.items()} == {
        "hess_trace": "ggn",
        "tic_trace": "ggn_mc",
        "tic_diag": "exact",
    }
    assert about["hess_trace"]["args"]["method"] == "auto"
