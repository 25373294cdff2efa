"""Benchmark problems as plain JAX: a params pytree, a per-sample loss and a random batch.

* ``mlp``: 64-128-128-10 with ReLU, batch 128, 64-dim inputs, 10 classes (26,122 parameters).
* ``3c3d``: DeepOBS's CIFAR-10 net ``_3c3d`` (conv 64 5×5 valid, conv 96 3×3 valid,
  conv 128 3×3 same, each ReLU then 3×3 max-pool stride 2 'same'; dense 512, 256 with ReLU;
  dense 10) on 32×32×3 inputs, batch 64 (895,210 parameters). Initialisation as DeepOBS:
  Glorot normal conv kernels, Glorot uniform dense kernels, zero biases.

Every loss function returns the per-sample cross-entropy, shape (B,), as ``lm.instrument``
expects; the bare step takes its mean. Inputs and labels are random with a fixed seed, float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class Problem(NamedTuple):
    """A model, its initial parameters and one fixed batch ``(x, y)``."""

    name: str
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    params: PyTree
    batch: tuple[jax.Array, jax.Array]

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))


def _dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    w = jax.nn.initializers.glorot_uniform()(key, (n_in, n_out), jnp.float32)
    return {"w": w, "b": jnp.zeros(n_out, jnp.float32)}


def _conv_init(key: jax.Array, size: int, c_in: int, c_out: int) -> dict[str, jax.Array]:
    w = jax.nn.initializers.glorot_normal()(key, (size, size, c_in, c_out), jnp.float32)
    return {"w": w, "b": jnp.zeros(c_out, jnp.float32)}


def _dense(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def _conv(p: dict[str, jax.Array], x: jax.Array, padding: str) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, p["w"], (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["b"]


def _max_pool(x: jax.Array) -> jax.Array:
    """3×3 max-pool, stride 2, 'same' padding (padded cells never win), as TF's max_pooling2d."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mlp(seed: int = 0, batch_size: int = 128) -> Problem:
    """MLP 64-128-128-10 with ReLU on random 64-dim inputs."""
    sizes = (64, 128, 128, 10)
    k_params, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    keys = jax.random.split(k_params, len(sizes) - 1)
    params = [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        for layer in params[:-1]:
            x = jax.nn.relu(_dense(layer, x))
        return _cross_entropy(_dense(params[-1], x), y)

    x = jax.random.normal(k_x, (batch_size, sizes[0]), jnp.float32)
    y = jax.random.randint(k_y, (batch_size,), 0, sizes[-1])
    return Problem("mlp", loss_fn, params, (x, y))


def cnn_3c3d(seed: int = 0, batch_size: int = 64) -> Problem:
    """DeepOBS 3c3d on random 32×32×3 images, 10 classes."""
    k = jax.random.split(jax.random.key(seed), 8)
    params = {
        "conv1": _conv_init(k[0], 5, 3, 64),
        "conv2": _conv_init(k[1], 3, 64, 96),
        "conv3": _conv_init(k[2], 3, 96, 128),
        "fc1": _dense_init(k[3], 3 * 3 * 128, 512),
        "fc2": _dense_init(k[4], 512, 256),
        "fc3": _dense_init(k[5], 256, 10),
    }

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        x = _max_pool(jax.nn.relu(_conv(params["conv1"], x, "VALID")))  # 28 → 14
        x = _max_pool(jax.nn.relu(_conv(params["conv2"], x, "VALID")))  # 12 → 6
        x = _max_pool(jax.nn.relu(_conv(params["conv3"], x, "SAME")))  # 6 → 3
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(_dense(params["fc1"], x))
        x = jax.nn.relu(_dense(params["fc2"], x))
        return _cross_entropy(_dense(params["fc3"], x), y)

    x = jax.random.normal(k[6], (batch_size, 32, 32, 3), jnp.float32)
    y = jax.random.randint(k[7], (batch_size,), 0, 10)
    return Problem("3c3d", loss_fn, params, (x, y))


PROBLEMS: dict[str, Callable[[], Problem]] = {"mlp": mlp, "3c3d": cnn_3c3d}
