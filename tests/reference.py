"""Brute-force reference values, straight from the definitions in QUANTITIES.md.

Per-sample gradients come from an explicit Python loop over the samples, each one ``jax.grad``
of the loss on a batch of one sample (no ``vmap``, no chunking, nothing from lmd4ml), flattened
into a B×P float64 numpy matrix. Every quantity is then plain numpy on that matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np


def flatten(tree: Any) -> np.ndarray:
    """All leaves of a pytree, raveled and concatenated in ``jax.tree.leaves`` order."""
    leaves = [np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def unflatten_like(flat: np.ndarray, tree: Any) -> Any:
    """The inverse of :func:`flatten`: a pytree like ``tree`` holding the entries of ``flat``."""
    leaves, treedef = jax.tree.flatten(tree)
    pieces = np.split(flat, np.cumsum([np.size(leaf) for leaf in leaves])[:-1])
    return jax.tree.unflatten(
        treedef,
        [np.reshape(piece, np.shape(leaf)) for piece, leaf in zip(pieces, leaves, strict=True)],
    )


def sample(batch: Any, i: int) -> Any:
    """Sample ``i`` of ``batch`` as a batch of one."""
    return jax.tree.map(lambda x: x[i : i + 1], batch)


def n_samples(batch: Any) -> int:
    return len(jax.tree.leaves(batch)[0])


@functools.cache
def _single_loss_and_grad(loss_fn: Callable) -> Callable:
    # Jitted only so the loop does not retrace per sample; it is one sample, one jax.grad.
    return jax.jit(jax.value_and_grad(lambda params, one: loss_fn(params, one)[0]))


class PerSampleGrads(NamedTuple):
    losses: np.ndarray  # (B,) ℓᵢ
    grads: np.ndarray  # (B, P) row i = ∇ℓᵢ flattened


def per_sample_grads(loss_fn: Callable, params: Any, batch: Any) -> PerSampleGrads:
    """ℓᵢ and ∇ℓᵢ for every sample, by a Python loop over batches of one."""
    value_and_grad = _single_loss_and_grad(loss_fn)
    losses, rows = [], []
    for i in range(n_samples(batch)):
        loss, grad = value_and_grad(params, sample(batch, i))
        losses.append(float(loss))
        rows.append(flatten(grad))
    return PerSampleGrads(np.asarray(losses), np.stack(rows))


def mean_grad(grads: np.ndarray) -> np.ndarray:
    """g = (1/B) Σᵢ ∇ℓᵢ."""
    return grads.mean(axis=0)


def norm_test(grads: np.ndarray) -> float:
    """1/(B(B−1)) · (Σᵢ‖∇ℓᵢ‖² / ‖g‖² − B)."""
    b = grads.shape[0]
    g = mean_grad(grads)
    return float((np.sum(grads**2) / (g @ g) - b) / (b * (b - 1)))


def projections(grads: np.ndarray) -> np.ndarray:
    """pᵢ = ∇ℓᵢ · g."""
    return grads @ mean_grad(grads)


def grad_hist_1d(grads: np.ndarray, nbins: int, maxval: float) -> np.ndarray:
    """np.histogram of every non-NaN element, clamped to [−maxval, maxval]."""
    values = grads.ravel()
    values = np.clip(values[~np.isnan(values)], -maxval, maxval)
    return np.histogram(values, bins=nbins, range=(-maxval, maxval))[0]


def quantities(
    ps: PerSampleGrads,
    theta: np.ndarray,
    theta0: np.ndarray,
    theta_next: np.ndarray,
    nbins: int,
    maxval: float,
) -> dict[str, Any]:
    """Every seed quantity at θₜ = ``theta``, keyed like lmd4ml's metrics."""
    return {
        "loss": float(ps.losses.mean()),
        "grad_norm": float(np.linalg.norm(mean_grad(ps.grads))),
        "distance": float(np.linalg.norm(theta - theta0)),
        "update_size": float(np.linalg.norm(theta_next - theta)),
        "norm_test": norm_test(ps.grads),
        "grad_hist_1d": grad_hist_1d(ps.grads, nbins, maxval),
    }


def spread_maxval(grads: np.ndarray) -> float:
    """A histogram range a few times the typical gradient element, rounded to 2 digits."""
    typical = np.quantile(np.abs(grads[np.isfinite(grads)]), 0.75)
    return float(f"{3 * typical:.2g}")
