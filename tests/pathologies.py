"""Short real trainings with a known pathology each, and healthy ones, for lm.diagnose.

Scikit-learn's digits (1797 8×8 images, pixels scaled to [0, 1]) and plain-pytree MLPs with
a per-sample cross-entropy, trained by ``lm.train`` with the economy preset plus what the
rules also read (per-layer gradient norms, the gradient noise scale, the top Hessian
eigenvalue every 4th step). Each run is small (a few hundred steps of a 64-32-10 network
at most) so that all of them take well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import lmd4ml as lm

BATCH = 32


def digits(shuffle_labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The digits, pixels in [0, 1]; labels permuted at random with ``shuffle_labels``."""
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float64), data.target.astype(np.int32)
    if shuffle_labels:
        y = np.random.default_rng(1).permutation(y)
    return x, y


def mlp(sizes: list[int], seed: int = 0, gain: float = 1.0) -> list[tuple[jax.Array, jax.Array]]:
    """Dense layers of ``sizes``, LeCun-normal weights times ``gain``, zero biases."""
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return [
        (gain * jax.random.normal(k, (m, n), jnp.float64) / np.sqrt(m), jnp.zeros(n, jnp.float64))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def loss_for(activation: Callable[[jax.Array], jax.Array]) -> Callable:
    """Per-sample cross-entropy of an MLP with ``activation`` between its layers."""

    def loss_fn(params, batch):
        x, y = batch
        for w, b in params[:-1]:
            x = activation(x @ w + b)
        w, b = params[-1]
        return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)

    return loss_fn


def batches(x: np.ndarray, y: np.ndarray, n: int, nan_at: int | None = None) -> list:
    """``n`` batches of ``BATCH`` samples drawn in order from a fixed permutation, cycling;
    batch ``nan_at`` (if any) has NaN pixels, as a corrupt record would."""
    order = np.random.default_rng(0).permutation(len(x))
    out = []
    for i in range(n):
        take = order[(np.arange(BATCH) + i * BATCH) % len(x)]
        xb = x[take].copy()
        if i == nan_at:
            xb[:, 10] = np.nan
        out.append((xb, y[take]))
    return out


def least_squares(params, batch):
    """Per-sample squared error of a linear model of the one-hot labels: a convex quadratic
    whose Hessian, E[x̃x̃ᵀ] ⊗ I with x̃ = (x, 1), is known, and so is the right learning rate."""
    (w, b), (x, y) = params, batch
    return 0.5 * jnp.sum((x @ w + b - jax.nn.one_hot(y, 10)) ** 2, axis=-1)


def sharpness() -> float:
    """λ_max of the least-squares loss's Hessian over all the digits: gradient descent on it
    is stable for learning rates below 2/λ_max."""
    x, _ = digits()
    xt = np.c_[x, np.ones(len(x))]
    return float(np.linalg.eigvalsh(xt.T @ xt / len(x))[-1])


def quantities(curvature: bool) -> list[lm.Quantity]:
    """The economy preset with per-layer gradient norms, the noise scale and, with
    ``curvature``, the top Hessian eigenvalue."""
    replace = {"grad_norm": lm.GradNorm(per_layer=True)}
    extra = [lm.HessMaxEV()] if curvature else []
    return [*(replace.get(q.key, q) for q in lm.presets.economy()), lm.NoiseScale(), *extra]


LAM = sharpness()
RELU = ([64, 32, 10], jax.nn.relu)
# name: (layers and activation, or None for least squares; weight gain; optimizer; steps;
#        shuffled labels; the batch with NaN pixels)
CASES = {
    "healthy_sgd": (RELU, 1.0, optax.sgd(0.1), 120, False, None),
    "healthy_adam": (RELU, 1.0, optax.adam(3e-3), 120, False, None),
    "healthy_least_squares": (None, 1.0, optax.sgd(1.0 / LAM), 60, False, None),
    "lr_too_large": (None, 1.0, optax.sgd(3.0 / LAM), 60, False, None),
    "lr_too_small": (None, 1.0, optax.sgd(1e-3 / LAM), 60, False, None),
    "noise": (RELU, 1.0, optax.sgd(0.1), 120, True, None),
    "vanishing": (([64, *[32] * 8, 10], jax.nn.sigmoid), 1.0, optax.sgd(0.1), 40, False, None),
    "exploding": (([64, *[32] * 6, 10], jax.nn.relu), 4.0, optax.sgd(1e-3), 40, False, None),
    "stalled": (RELU, 1.0, optax.sgd(0.0), 40, False, None),
    "nan_batch": (RELU, 1.0, optax.sgd(0.1), 40, False, 25),
}


def train(name: str, runs_dir: str | Path | None, **kwargs) -> lm.History:
    """Train the case ``name`` (a run ``runs_dir/<name>`` unless ``runs_dir`` is None)."""
    net, gain, tx, steps, shuffled, nan_at = CASES[name]
    x, y = digits(shuffled)
    if net is None:
        params, loss_fn = mlp([64, 10], gain=0.0), least_squares
        params = params[0]
    else:
        params, loss_fn = mlp(net[0], gain=gain), loss_for(net[1])
    learner = lm.Learner(
        params, loss_fn, batches(x, y, steps, nan_at), tx, quantities(curvature=net is None)
    )
    schedules = {"hess_max_ev": 2} if net is None else {}
    return lm.train(
        learner, schedules=schedules, runs_dir=runs_dir, run_name=name, progress=False, **kwargs
    )
