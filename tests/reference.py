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


@functools.cache
def _row_grad(losses_of: Callable[..., jax.Array]) -> Callable[..., Any]:
    # Jitted once per loss (i and the rest are arguments), so the loop compiles once.
    return jax.jit(jax.grad(lambda p, i, *args: losses_of(p, *args)[i]))


def batched_grads(losses_of: Callable[..., jax.Array], params: Any, *args: Any) -> np.ndarray:
    """Row i = ∇ℓᵢ, the gradient of entry i of the batched loss vector
    ``losses_of(params, *args)``, one ``jax.grad`` per sample in a Python loop (B×P, float64,
    in :func:`flatten` order). Unlike :func:`per_sample_grads`, the loss runs on the whole
    batch, so sample i keeps what the batched pass gave it (its dropout mask)."""
    grad_i = _row_grad(losses_of)
    n = losses_of(params, *args).shape[0]
    return np.stack([flatten(grad_i(params, i, *args)) for i in range(n)])


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


@functools.cache
def _mean_loss_hessian(loss_fn: Callable, treedef: Any, shapes: tuple) -> Callable:
    """Jitted ∇²L of a flat parameter vector, for parameters of this structure."""
    bounds = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]

    def mean_loss(flat: jax.Array, batch: Any) -> jax.Array:
        pieces = [
            piece.reshape(shape)
            for piece, shape in zip(jax.numpy.split(flat, bounds), shapes, strict=True)
        ]
        return jax.numpy.mean(loss_fn(jax.tree.unflatten(treedef, pieces), batch))

    return jax.jit(jax.hessian(mean_loss))


def hessian(loss_fn: Callable, params: Any, batch: Any) -> np.ndarray:
    """∇²L of L = mean(ℓ) over the flattened parameters (D×D, :func:`flatten` order), by
    ``jax.hessian`` of a function of one flat vector."""
    leaves, treedef = jax.tree.flatten(params)
    hess = _mean_loss_hessian(loss_fn, treedef, tuple(np.shape(leaf) for leaf in leaves))
    return np.asarray(hess(jax.numpy.asarray(flatten(params)), batch))


# ------------------------------------------------- further Cockpit quantities (QUANTITIES.md)


def inner_test(grads: np.ndarray) -> float:
    """√((Σᵢpᵢ² − B‖g‖⁴) / ((B−1)·B·‖g‖⁴))."""
    b = grads.shape[0]
    g = mean_grad(grads)
    g4 = (g @ g) ** 2
    return float(np.sqrt((np.sum(projections(grads) ** 2) - b * g4) / ((b - 1) * b * g4)))


def ortho_test(grads: np.ndarray) -> float:
    """√(1/(B(B−1)) · Σᵢ[‖∇ℓᵢ‖²/‖g‖² − pᵢ²/‖g‖⁴])."""
    b = grads.shape[0]
    g2 = mean_grad(grads) @ mean_grad(grads)
    terms = np.sum(grads**2, axis=1) / g2 - projections(grads) ** 2 / g2**2
    return float(np.sqrt(terms.sum() / (b * (b - 1))))


GSNR_EPS = 1e-5


def mean_gsnr(grads: np.ndarray) -> float:
    """mean_j g_j² / ((1/B)Σᵢ(∇ℓᵢ)_j² − g_j² + ε)."""
    g = mean_grad(grads)
    return float(np.mean(g**2 / (np.mean(grads**2, axis=0) - g**2 + GSNR_EPS)))


def early_stopping(grads: np.ndarray) -> float:
    """1 − B · mean_j[g_j² / (σ_j² + ε)], σ_j² the unbiased variance of (∇ℓᵢ)_j."""
    b = grads.shape[0]
    g = mean_grad(grads)
    var = np.var(grads, axis=0, ddof=1)
    return float(1 - b * np.mean(g**2 / (var + GSNR_EPS)))


def cabs(grads: np.ndarray, losses: np.ndarray, lr: float) -> float:
    """lr · (1/B)Σᵢ‖∇ℓᵢ − g‖² / L."""
    spread = np.mean(np.sum((grads - mean_grad(grads)) ** 2, axis=1))
    return float(lr * spread / losses.mean())


def noise_scale_estimates(grads: np.ndarray) -> tuple[float, float]:
    """(S, |G|²) from batch sizes 1 and B (McCandlish et al. 2018, eqs. A.1, A.2)."""
    b = grads.shape[0]
    small = np.mean(np.sum(grads**2, axis=1))  # |G_1|², averaged over the B batches of one
    g = mean_grad(grads)
    big = g @ g  # |G_B|²
    return float((small - big) / (1 - 1 / b)), float((b * big - small) / (b - 1))


def noise_scale(estimates: list[tuple[float, float]], decay: float) -> list[float]:
    """B_simple after each step: bias-corrected EMAs of S and of |G|², then their ratio."""
    values, s_avg, g_avg = [], 0.0, 0.0
    for n, (s, g2) in enumerate(estimates, start=1):
        s_avg = decay * s_avg + (1 - decay) * s
        g_avg = decay * g_avg + (1 - decay) * g2
        values.append((s_avg / (1 - decay**n)) / (g_avg / (1 - decay**n)))
    return values


def alpha(
    losses: np.ndarray,
    grads: np.ndarray,
    losses_next: np.ndarray,
    grads_next: np.ndarray,
    d: np.ndarray,
) -> float:
    """Cockpit's α for the step d = θₜ₊₁ − θₜ, both ends observed on the same batch.

    Slopes are per-sample projections ∇ℓᵢ·d/‖d‖; the quadratic is the maximum-likelihood
    fit μ = (ΦΛ⁻¹Φᵀ)⁻¹ΦΛ⁻¹y with Λ the diagonal of sample variances (ddof=1), a zero
    variance replaced by 1e-10; α = 2t/ᾱ − 1 with ᾱ = −μ₁/μ₂, and −1 for a concave fit.
    """
    t = float(np.linalg.norm(d))
    fs = [losses.mean(), losses_next.mean()]
    slopes = [grads @ d / t, grads_next @ d / t]
    dfs = [s.mean() for s in slopes]
    variances = [np.var(x, ddof=1) for x in (losses, losses_next, *slopes)]
    variances = [v if v != 0 else 1e-10 for v in variances]
    phi = np.array([[1, 0, 0], [1, t, t**2], [0, 1, 0], [0, 1, 2 * t]]).T
    lambda_inv = np.linalg.inv(np.diag(variances))
    mu = np.linalg.inv(phi @ lambda_inv @ phi.T) @ phi @ lambda_inv @ np.array(fs + dfs)
    if mu[2] < 0:
        return -1.0
    return float(2 * t / (-mu[1] / mu[2]) - 1)


def grad_hist_2d(
    grads: np.ndarray, theta: np.ndarray, bins: tuple[int, int], ranges: tuple
) -> np.ndarray:
    """np.histogram2d of (∇ℓᵢ)_j against θ_j, both clamped into ``ranges``, NaN pairs left out."""
    x = grads.ravel()
    y = np.broadcast_to(theta, grads.shape).ravel()
    keep = ~(np.isnan(x) | np.isnan(y))
    (x_lo, x_hi), (y_lo, y_hi) = ranges
    x, y = np.clip(x[keep], x_lo, x_hi), np.clip(y[keep], y_lo, y_hi)
    return np.histogram2d(x, y, bins=bins, range=ranges)[0].astype(np.int64)


def leaf_norms(flat: np.ndarray, tree: Any) -> dict[str, float]:
    """‖·‖ of ``flat`` (in :func:`flatten` order) in total and per leaf of ``tree``, by path."""
    pieces = jax.tree_util.tree_leaves_with_path(unflatten_like(flat, tree))
    out = {"total": float(np.linalg.norm(flat))}
    for path, piece in pieces:
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = float(np.linalg.norm(piece))
    return out


def alpha_next_batch(loss_fn: Callable, thetas: list[Any], batches: list[Any]) -> list[float]:
    """Cockpit's α of each step t = 0 … n−2 of a run θ₀ … θₙ on batches 0 … n−1.

    The start is observed at θₜ on batch t and the end at θₜ₊₁ on batch t + 1 (Cockpit's
    SAVE_SHIFT = 1), both projected on the step's own update θₜ₊₁ − θₜ; the fit is
    :func:`alpha`'s.
    """
    values = []
    for t in range(len(batches) - 1):
        start = per_sample_grads(loss_fn, thetas[t], batches[t])
        end = per_sample_grads(loss_fn, thetas[t + 1], batches[t + 1])
        d = flatten(thetas[t + 1]) - flatten(thetas[t])
        values.append(alpha(start.losses, start.grads, end.losses, end.grads, d))
    return values


def ggn_diag(
    outputs_of: Callable[[np.ndarray], jax.Array],
    output_loss: Callable[[jax.Array, Any], jax.Array],
    flat: np.ndarray,
    targets: Any,
) -> np.ndarray:
    """(1/B) Σᵢ diag(Jᵢᵀ Hᵢ Jᵢ) by an explicit loop over the samples: Jᵢ the Jacobian of
    sample i's outputs (row i of ``outputs_of(flat)``, the batched model as a function of the
    flat params) and Hᵢ = ``jax.hessian`` of ``output_loss(fᵢ, yᵢ)`` (one sample's loss on
    its own outputs) in fᵢ. Both full matrices, nothing factored."""
    outputs = np.asarray(outputs_of(flat))
    jac = np.asarray(jax.jacobian(outputs_of)(flat))  # (B, *output, P)
    total = np.zeros(flat.shape[0])
    for i in range(outputs.shape[0]):
        f = outputs[i]
        y = jax.tree.map(lambda t, i=i: t[i], targets)
        hess = jax.hessian(lambda v, y=y, f=f: output_loss(v.reshape(f.shape), y))(f.ravel())
        j = jac[i].reshape(f.size, -1)
        total += np.einsum("kd,kl,ld->d", j, np.asarray(hess), j)
    return total / outputs.shape[0]
