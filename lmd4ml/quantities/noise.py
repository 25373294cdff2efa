"""Gradient noise: signal-to-noise ratios, early stopping, batch-size rules (CABS, B_simple).

All of these compare the mean gradient g with the spread of the per-sample gradients ∇ℓᵢ,
either per coordinate (from :attr:`StepContext.second_moment`, one per-sample pass shared
with every quantity that reads it) or globally (from the per-sample squared norms).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmd4ml import checks, stats
from lmd4ml.quantities.base import Quantity, StepContext, reset_if_nonfinite
from lmd4ml.quantities.gradient_tests import check_variance_batch
from lmd4ml.stats import PyTree


def _mean_over_coordinates(tree: PyTree) -> jax.Array:
    """The mean of every element of every leaf: a mean over the D parameters."""
    return optax.tree.sum(tree) / optax.tree.size(tree)


def _sq_grads(ctx: StepContext) -> PyTree:
    return jax.tree.map(jnp.square, ctx.grads)


@dataclasses.dataclass(frozen=True)
class MeanGSNR(Quantity):
    """Mean gradient signal-to-noise ratio, mean_j g_j² / ((1/B)Σᵢ(∇ℓᵢ)_j² − g_j² + ε).

    Per coordinate j, the squared mean gradient over the (biased) variance of the per-sample
    gradients, averaged over the D parameters; ``eps`` is ε, 1e-5 as in Cockpit (Liu et al.
    2020). High values: the samples agree on where to go.

    Example:
      >>> import lmd4ml as lm
      >>> lm.MeanGSNR().key, lm.MeanGSNR().eps
      ('mean_gsnr', 1e-05)
    """

    eps: float = 1e-5
    key = "mean_gsnr"
    per_sample = (stats.SQ_GRADS,)

    def __post_init__(self) -> None:
        checks.check_eps("MeanGSNR", self.eps)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        ratios = jax.tree.map(
            lambda m, g2: g2 / (m - g2 + self.eps), ctx.second_moment, _sq_grads(ctx)
        )
        return _mean_over_coordinates(ratios), state


@dataclasses.dataclass(frozen=True)
class EarlyStopping(Quantity):
    """Evidence-based early-stopping criterion 1 − B · mean_j[g_j² / (σ_j² + ε)].

    σ_j² = (Σᵢ(∇ℓᵢ)_j² − B g_j²)/(B−1) is the unbiased per-coordinate variance of the
    per-sample gradients and ε is ``eps``, 1e-5 as in Cockpit (Mahsereci et al. 2017). Above
    0, the batch gradient is indistinguishable from the noise of a zero-mean gradient: stop.
    Needs B ≥ 2.

    Example:
      >>> import lmd4ml as lm
      >>> lm.EarlyStopping().key
      'early_stopping'
    """

    eps: float = 1e-5
    key = "early_stopping"
    per_sample = (stats.SQ_GRADS,)

    def __post_init__(self) -> None:
        checks.check_eps("EarlyStopping", self.eps)

    def check(self, batch_size: int) -> None:
        check_variance_batch("EarlyStopping", batch_size)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        b = ctx.batch_size
        snr = jax.tree.map(
            lambda m, g2: g2 / (b / (b - 1) * (m - g2) + self.eps),
            ctx.second_moment,
            _sq_grads(ctx),
        )
        return 1.0 - b * _mean_over_coordinates(snr), state


def _trace_cov_biased(ctx: StepContext) -> jax.Array:
    """(1/B)Σᵢ‖∇ℓᵢ − g‖² = (1/B)Σᵢ‖∇ℓᵢ‖² − ‖g‖²."""
    return ctx.sample_mean(ctx.sq_norms) - ctx.grad_sq_norm


@dataclasses.dataclass(frozen=True)
class CABS(Quantity):
    """CABS batch size η · (1/B)Σᵢ‖∇ℓᵢ − g‖² / L (Balles et al. 2017).

    The batch size that Balles et al.'s rule couples to the learning rate η. With ``lr``
    given, η = ``lr``; without, η = ‖θₜ₊₁ − θₜ‖/‖g‖, the learning rate of the SGD step as
    long as the update applied. For plain SGD both are the learning rate; for adaptive or
    momentum optimizers the second is the step actually taken (see docs/instruments/cabs.md).

    Example:
      >>> import lmd4ml as lm
      >>> lm.CABS(lr=0.1).key
      'cabs'
    """

    lr: float | None = None
    key = "cabs"
    per_sample = (stats.SQ_NORMS,)

    def __post_init__(self):
        if self.lr is not None:
            rule = (
                "a positive number (the SGD learning rate) or None for the effective step "
                "‖update‖/‖g‖"
            )
            checks.check_real("CABS: lr", self.lr, rule, lambda lr: lr > 0)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        if self.lr is None:
            lr = optax.tree.norm(ctx.updates) / jnp.sqrt(ctx.grad_sq_norm)
        else:
            lr = self.lr
        return lr * _trace_cov_biased(ctx) / ctx.loss, state


class NoiseScaleState(NamedTuple):
    """Exponential moving averages (not bias-corrected) of NoiseScale's two estimates."""

    trace_cov: jax.Array  # EMA of S, the estimate of tr(Σ)
    grad_sq_norm: jax.Array  # EMA of the estimate of |G|²
    count: jax.Array  # steps averaged so far
    resets: jax.Array  # how many times a non-finite average was started over


@dataclasses.dataclass(frozen=True)
class NoiseScale(Quantity):
    """Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, appendix A).

    Each step gives unbiased estimates from batches of 1 and of B samples,
    |G|² ≈ (B‖g‖² − (1/B)Σᵢ‖∇ℓᵢ‖²)/(B−1) and tr(Σ) ≈ S = ((1/B)Σᵢ‖∇ℓᵢ‖² − ‖g‖²)·B/(B−1).
    Both are noisy (|G|² can come out negative), so each is averaged on its own with decay
    β, debiased as Adam's moments are, and the value is their ratio. Needs B ≥ 2. An average
    that comes out NaN or infinite (a non-finite step) starts over from the next step, with a
    warning the first time.

    Example:
      >>> import lmd4ml as lm
      >>> lm.NoiseScale(decay=0.9).key
      'noise_scale'
    """

    decay: float = 0.99
    key = "noise_scale"
    per_sample = (stats.SQ_NORMS,)

    def __post_init__(self):
        # Below 1 in float32 too: a decay that rounds to 1 leaves 1 − decayⁿ = 0 to divide by.
        rule = "a number in [0, 1) (0: no averaging), below 1 in float32 (at most 1 - 2**-24)"
        checks.check_real("NoiseScale: decay", self.decay, rule, lambda d: 0 <= d <= 1 - 2**-24)

    def check(self, batch_size: int) -> None:
        check_variance_batch("NoiseScale", batch_size)

    def init(self, params: PyTree) -> NoiseScaleState:
        zero = jnp.zeros((), stats.wide_dtype(jnp.result_type(*jax.tree.leaves(params))))
        count = jnp.zeros((), jnp.int32)
        return NoiseScaleState(zero, zero, count, count)

    @staticmethod
    def estimates(ctx: StepContext) -> tuple[jax.Array, jax.Array]:
        """This step's unbiased estimates (S, |G|²) of tr(Σ) and |G|²."""
        b = ctx.batch_size
        small = ctx.sample_mean(ctx.sq_norms)  # E‖G_est‖² for batches of 1
        big = ctx.grad_sq_norm  # ... and of B
        return (small - big) * b / (b - 1), (b * big - small) / (b - 1)

    def averages(self, state: NoiseScaleState) -> tuple[jax.Array, jax.Array]:
        """The debiased averages (S, |G|²) in ``state``, each EMA over 1 − decayⁿ.

        Example:
          >>> import jax.numpy as jnp
          >>> q = NoiseScale(decay=0.5)
          >>> state = NoiseScaleState(jnp.array(0.5), jnp.array(0.25), jnp.array(1), jnp.array(0))
          >>> [float(x) for x in q.averages(state)]
          [1.0, 0.5]
        """
        count = state.count.astype(state.trace_cov.dtype)
        return optax.tree.bias_correction((state.trace_cov, state.grad_sq_norm), self.decay, count)

    def compute(
        self, ctx: StepContext, state: NoiseScaleState
    ) -> tuple[jax.Array, NoiseScaleState]:
        dtype = state.trace_cov.dtype
        estimates = tuple(x.astype(dtype) for x in self.estimates(ctx))
        moments = optax.tree.update_moment(
            estimates, (state.trace_cov, state.grad_sq_norm), self.decay, order=1
        )
        carried = (*moments, state.count + 1)
        trace_cov, grad_sq_norm = self.averages(NoiseScaleState(*carried, state.resets))
        # A padded batch with fewer than two real samples has no estimate (its value is NaN
        # by design): the averages stay as they were, rather than being reset.
        carried = optax.tree.where(ctx.batch_size >= 2, carried, state[:3])
        (*moments, count), resets = reset_if_nonfinite(
            carried,
            lambda: tuple(self.init(ctx.params)[:3]),
            state.resets,
            ctx.step,
            f"NoiseScale ({self.key!r}): the moving average",
        )
        return trace_cov / grad_sq_norm, NoiseScaleState(*moments, count, resets)
