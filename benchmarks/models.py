"""Benchmark problems as plain JAX: a params pytree, a per-sample loss and a random batch.

* ``mlp``: 64-128-128-10 with ReLU, batch 128, 64-dim inputs, 10 classes (26,122 parameters).
* ``3c3d``: DeepOBS's CIFAR-10 net ``_3c3d`` (conv 64 5×5 valid, conv 96 3×3 valid,
  conv 128 3×3 same, each ReLU then 3×3 max-pool stride 2 'same'; dense 512, 256 with ReLU;
  dense 10) on 32×32×3 inputs, batch 64 (895,210 parameters). Initialisation as DeepOBS:
  Glorot normal conv kernels, Glorot uniform dense kernels, zero biases.
* ``cnn_small`` (not in ``PROBLEMS``; for ``curvature.py``'s exact Hessian diagonal): conv 16
  3×3 'same', ReLU, 2×2 max-pool, twice, then dense 10, on 16×16×3 inputs, batch 16 (5,338
  parameters), initialised as 3c3d.

For ``scale.py`` (memory and time against batch size and parameter count), in
``SCALE_PROBLEMS``:

* ``mlp10m``: 784-2048-2048-2048-10 with ReLU on random 784-dim inputs, 10 classes
  (10,020,874 parameters; ``width`` scales the three hidden layers, 1024 gives 2,913,290).
* ``transformer``: a decoder-only language model, 6 pre-LayerNorm blocks of width 256, 4
  heads and an MLP of 1024 (GELU), causal self-attention, learned token and position
  embeddings, a final LayerNorm and an untied output layer; vocabulary 1000, sequences of
  64 random tokens, next-token cross-entropy averaged over the 63 predicted positions of each
  sequence (5,268,456 parameters; ``width`` 128 with MLP 512 gives 1,455,080).

Every loss function returns the per-sample cross-entropy, shape (B,), as ``lm.instrument``
expects; the bare step takes its mean. The MLP's and 3c3d's are split into the model and
the cross-entropy on its logits (``lm.supervised``), as the curvature instruments' exact
defaults need; the split changes nothing in the bare step's program. Inputs and labels are
random with a fixed seed, float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import lmd4ml as lm

PyTree = Any


class Problem(NamedTuple):
    """A model, its initial parameters and one fixed batch ``(x, y)``."""

    name: str
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    params: PyTree
    batch: tuple[jax.Array, ...]  # (x, y), or (tokens,) for the transformer

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


def _mlp(name: str, sizes: tuple[int, ...], seed: int, batch_size: int) -> Problem:
    """A ReLU MLP of layer ``sizes`` on random ``sizes[0]``-dim inputs, ``sizes[-1]`` classes."""
    k_params, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    keys = jax.random.split(k_params, len(sizes) - 1)
    params = [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        for layer in params[:-1]:
            x = jax.nn.relu(_dense(layer, x))
        return _dense(params[-1], x)

    loss_fn = lm.supervised(apply_fn, optax.softmax_cross_entropy_with_integer_labels)

    x = jax.random.normal(k_x, (batch_size, sizes[0]), jnp.float32)
    y = jax.random.randint(k_y, (batch_size,), 0, sizes[-1])
    return Problem(name, loss_fn, params, (x, y))


def mlp(seed: int = 0, batch_size: int = 128) -> Problem:
    """MLP 64-128-128-10 with ReLU on random 64-dim inputs."""
    return _mlp("mlp", (64, 128, 128, 10), seed, batch_size)


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

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        x = _max_pool(jax.nn.relu(_conv(params["conv1"], x, "VALID")))  # 28 → 14
        x = _max_pool(jax.nn.relu(_conv(params["conv2"], x, "VALID")))  # 12 → 6
        x = _max_pool(jax.nn.relu(_conv(params["conv3"], x, "SAME")))  # 6 → 3
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(_dense(params["fc1"], x))
        x = jax.nn.relu(_dense(params["fc2"], x))
        return _dense(params["fc3"], x)

    loss_fn = lm.supervised(apply_fn, optax.softmax_cross_entropy_with_integer_labels)

    x = jax.random.normal(k[6], (batch_size, 32, 32, 3), jnp.float32)
    y = jax.random.randint(k[7], (batch_size,), 0, 10)
    return Problem("3c3d", loss_fn, params, (x, y))


PROBLEMS: dict[str, Callable[[], Problem]] = {"mlp": mlp, "3c3d": cnn_3c3d}


def cnn_small(seed: int = 0, batch_size: int = 16) -> Problem:
    """A CNN small enough for the exact Hessian diagonal, on random 16×16×3 images."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        "conv1": _conv_init(k[0], 3, 3, 16),
        "conv2": _conv_init(k[1], 3, 16, 16),
        "fc": _dense_init(k[2], 4 * 4 * 16, 10),
    }

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        for name in ("conv1", "conv2"):  # 16 → 8 → 4
            x = jax.nn.relu(_conv(params[name], x, "SAME"))
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return _cross_entropy(_dense(params["fc"], x.reshape(x.shape[0], -1)), y)

    x = jax.random.normal(k[3], (batch_size, 16, 16, 3), jnp.float32)
    y = jax.random.randint(k[4], (batch_size,), 0, 10)
    return Problem("cnn_small", loss_fn, params, (x, y))


def mlp_10m(seed: int = 0, batch_size: int = 64, width: int = 2048) -> Problem:
    """MLP 784-width-width-width-10 with ReLU on random 784-dim inputs (10 M at width 2048)."""
    return _mlp(f"mlp10m w{width}", (784, width, width, width, 10), seed, batch_size)


def _layer_norm_init(width: int) -> dict[str, jax.Array]:
    return {"scale": jnp.ones(width, jnp.float32), "bias": jnp.zeros(width, jnp.float32)}


def _layer_norm(p: dict[str, jax.Array], x: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attention(p: PyTree, x: jax.Array, heads: int) -> jax.Array:
    """Causal multi-head self-attention on x of shape (B, T, width)."""
    b, t, width = x.shape
    split = lambda y: y.reshape(b, t, heads, width // heads)  # noqa: E731
    q, k, v = (split(_dense(p[name], x)) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(width // heads))
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, width)
    return _dense(p["o"], out)


def transformer(
    seed: int = 0,
    batch_size: int = 16,
    width: int = 256,
    layers: int = 6,
    heads: int = 4,
    vocab: int = 1000,
    seq_len: int = 64,
) -> Problem:
    """A small pre-LayerNorm decoder (GPT-style) on random token sequences, next-token loss.

    The MLP is 4 × ``width`` wide; weights are Glorot uniform, embeddings normal with
    standard deviation 0.02, biases zero, LayerNorm scales one.
    """
    k_params, k_tokens = jax.random.split(jax.random.key(seed))
    k = iter(jax.random.split(k_params, 6 * layers + 3))
    embed = jax.nn.initializers.normal(0.02)
    params = {
        "tokens": embed(next(k), (vocab, width), jnp.float32),
        "positions": embed(next(k), (seq_len, width), jnp.float32),
        "blocks": [
            {
                "ln1": _layer_norm_init(width),
                "attn": {n: _dense_init(next(k), width, width) for n in ("q", "k", "v", "o")},
                "ln2": _layer_norm_init(width),
                "mlp_in": _dense_init(next(k), width, 4 * width),
                "mlp_out": _dense_init(next(k), 4 * width, width),
            }
            for _ in range(layers)
        ],
        "ln_f": _layer_norm_init(width),
        "head": _dense_init(next(k), width, vocab),
    }

    def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
        (tokens,) = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = params["tokens"][inputs] + params["positions"][: inputs.shape[1]]
        for block in params["blocks"]:
            x = x + _attention(block["attn"], _layer_norm(block["ln1"], x), heads)
            h = jax.nn.gelu(_dense(block["mlp_in"], _layer_norm(block["ln2"], x)))
            x = x + _dense(block["mlp_out"], h)
        logits = _dense(params["head"], _layer_norm(params["ln_f"], x))
        return jnp.mean(_cross_entropy(logits, targets), axis=1)

    tokens = jax.random.randint(k_tokens, (batch_size, seq_len), 0, vocab)
    return Problem(f"transformer w{width}", loss_fn, params, (tokens,))


SCALE_PROBLEMS: dict[str, Callable[..., Problem]] = {"mlp10m": mlp_10m, "transformer": transformer}
