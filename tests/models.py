"""A tiny float64 model zoo: every model kind lmd4ml must handle, each with its per-sample loss.

Every factory returns a :class:`Case`: a per-sample ``loss_fn(params, batch) -> (B,)``, float64
parameters as a pytree and a few batches. Models are kept tiny (a few hundred parameters) so
that compiling dominates and the suite stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmd4ml import stats

F64 = jnp.float64
BATCH = 9  # odd, so that chunk sizes 2 and 4 leave a remainder
N_CLASSES = 3


@dataclasses.dataclass(frozen=True)
class Case:
    """A model as lmd4ml sees it: a per-sample loss over a parameter pytree, and data."""

    name: str
    loss_fn: Callable[[Any, Any], jax.Array]
    params: Any
    batches: tuple[Any, ...]


def run_steps(step: Any, case: Case) -> list[tuple[Any, dict, Any]]:
    """(state before, metrics on the host, state after) of ``step`` (an ``lm.instrument``
    step) for one step per batch of ``case``, from its parameters."""
    state = step.init(case.params)
    out = []
    for batch in case.batches:
        new_state, metrics = step(state, batch)
        out.append((state, stats.to_host(metrics), new_state))
        state = new_state
    return out


def budget_for_chunk(params: Any, chunk: int) -> int:
    """The ``memory_budget`` (bytes of per-sample gradients) that holds ``chunk`` samples."""
    return chunk * sum(np.size(leaf) * 8 for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------- data


def classification_batch(seed: int, shape: tuple[int, ...], n: int = BATCH) -> tuple:
    """Random float64 inputs of ``shape`` per sample and integer labels in [0, N_CLASSES)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = rng.integers(0, N_CLASSES, size=n)
    return jnp.asarray(x, F64), jnp.asarray(y)


def regression_batch(seed: int, n: int = BATCH) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    return jnp.asarray(x, F64), jnp.asarray(y, F64)


def batches(make: Callable[[int], tuple], n: int = 3) -> tuple:
    return tuple(make(seed) for seed in range(n))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy, shape (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# ------------------------------------------------------------------ plain-function MLP (tanh)


@jax.jit  # a jitted helper inside the model: lmd4ml must see through it
def _dense(layer: dict, x: jax.Array) -> jax.Array:
    return x @ layer["w"] + layer["b"]


def init_mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 8, N_CLASSES)) -> dict:
    """A pytree of dicts of float64 numpy arrays (numpy on purpose: a user may pass those)."""
    rng = np.random.default_rng(seed)
    return {
        f"layer{i}": {
            "w": rng.normal(size=(m, n)) / np.sqrt(m),
            "b": 0.1 * rng.normal(size=n),
        }
        for i, (m, n) in enumerate(itertools.pairwise(sizes))
    }


def apply_mlp(params: dict, x: jax.Array) -> jax.Array:
    layers = [params[k] for k in sorted(params)]
    for layer in layers[:-1]:
        x = jnp.tanh(_dense(layer, x))
    return _dense(layers[-1], x)


def mlp_loss(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    return cross_entropy(apply_mlp(params, x), y)


def mlp() -> Case:
    return Case("mlp", mlp_loss, init_mlp(), batches(lambda s: classification_batch(s, (5,))))


# ---------------------------------------------------------------------------- flax nnx models


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sizes: tuple[int, ...] = (5, 8, N_CLASSES)):
        self.hidden = nnx.Linear(sizes[0], sizes[1], param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(sizes[1], sizes[2], param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.gelu(self.hidden(x)))


class NnxConvNet(nnx.Module):
    """Conv 3×3 (SAME) → ReLU → 2×2 max-pool → dense head, on 6×6×1 images."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), param_dtype=F64, rngs=rngs)
        self.head = nnx.Linear(3 * 3 * 3, N_CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.max_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.head(h.reshape(h.shape[0], -1))


def module_loss(model: nnx.Module, batch: tuple) -> jax.Array:
    """The per-sample loss that :class:`lmd4ml.Learner` calls with the module itself."""
    x, y = batch
    return cross_entropy(model(x), y)


def split_module(module: nnx.Module) -> tuple[Callable, Any]:
    """An nnx module as a pytree for ``lm.instrument``: a loss over its state, and the state."""
    graphdef, state = nnx.split(module)

    def loss_fn(params: Any, batch: tuple) -> jax.Array:
        return module_loss(nnx.merge(graphdef, params), batch)

    return loss_fn, state


def nnx_mlp() -> Case:
    loss_fn, params = split_module(NnxMLP(nnx.Rngs(1)))
    return Case("nnx_mlp", loss_fn, params, batches(lambda s: classification_batch(s, (5,))))


def nnx_conv() -> Case:
    loss_fn, params = split_module(NnxConvNet(nnx.Rngs(2)))
    return Case("nnx_conv", loss_fn, params, batches(lambda s: classification_batch(s, (6, 6, 1))))


# --------------------------------------------------------------------------- flax linen models


class LinenConvNet(nn.Module):
    """Conv 3×3 (VALID) → ReLU → 2×2 average pool → conv 2×2 (SAME) → ReLU → Dense, on 6×6×1
    images. The second conv has fewer positions than weights: its kernel is factored."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(4, (3, 3), padding="VALID", dtype=F64, param_dtype=F64)(x)
        h = nn.avg_pool(nn.relu(h), (2, 2), strides=(2, 2))
        h = nn.relu(nn.Conv(8, (2, 2), dtype=F64, param_dtype=F64)(h))
        return nn.Dense(N_CLASSES, dtype=F64, param_dtype=F64)(h.reshape(h.shape[0], -1))


class LinenAttention(nn.Module):
    """Embed → self-attention (2 heads) with a residual → LayerNorm → mean-pool → Dense."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(8, dtype=F64, param_dtype=F64)(x)
        a = nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, dtype=F64, param_dtype=F64, deterministic=True
        )(h)
        h = nn.LayerNorm(dtype=F64, param_dtype=F64)(h + a)
        return nn.Dense(N_CLASSES, dtype=F64, param_dtype=F64)(h.mean(axis=1))


def linen_case(name: str, module: nn.Module, sample_shape: tuple[int, ...], seed: int) -> Case:
    data = batches(lambda s: classification_batch(s, sample_shape))
    params = module.init(jax.random.key(seed), data[0][0])

    def loss_fn(params: Any, batch: tuple) -> jax.Array:
        x, y = batch
        return cross_entropy(module.apply(params, x), y)

    return Case(name, loss_fn, params, data)


def linen_conv() -> Case:
    return linen_case("linen_conv", LinenConvNet(), (6, 6, 1), seed=3)


def linen_attention() -> Case:
    return linen_case("linen_attention", LinenAttention(), (4, 3), seed=4)


# ----------------------------------------------------------------- regression, squared error


def init_regression(seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w_in": jnp.asarray(rng.normal(size=(6, 4)) / 2, F64),  # used as W @ xᵀ: W on the left
        "b_in": jnp.asarray(0.1 * rng.normal(size=6), F64),
        "w_out": jnp.asarray(rng.normal(size=(6, 2)) / np.sqrt(6), F64),
    }


def regression_loss(params: dict, batch: tuple) -> jax.Array:
    """Per-sample 0.5‖f(x) − y‖² for a one-hidden-layer tanh network."""
    x, y = batch
    h = jnp.tanh((params["w_in"] @ x.T).T + params["b_in"])
    return 0.5 * jnp.sum(jnp.square(h @ params["w_out"] - y), axis=1)


def regression() -> Case:
    return Case("regression", regression_loss, init_regression(), batches(regression_batch))


ZOO: dict[str, Callable[[], Case]] = {
    "mlp": mlp,
    "nnx_mlp": nnx_mlp,
    "nnx_conv": nnx_conv,
    "linen_conv": linen_conv,
    "linen_attention": linen_attention,
    "regression": regression,
}
"""Every model kind, by name."""


@functools.cache
def get(name: str) -> Case:
    """The case ``name`` of the zoo, built once per session and shared (treat it as read-only)."""
    return ZOO[name]()
