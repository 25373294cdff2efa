"""Gradient tests: is the batch gradient dominated by per-sample noise?

Cockpit's three tests (norm, inner product, orthogonality) compare the spread of per-sample
gradients with the mean gradient g, each in its own way; all need B ≥ 2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lmd4ml import stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree


def check_variance_batch(name: str, batch_size: int) -> None:
    """Raise ``ValueError`` unless a sample variance exists: ``batch_size`` ≥ 2.

    Example:
      >>> check_variance_batch("NormTest", 1)
      Traceback (most recent call last):
      ...
      ValueError: NormTest needs batches of at least 2 samples (a sample variance); got 1
    """
    if batch_size < 2:
        raise ValueError(
            f"{name} needs batches of at least 2 samples (a sample variance); got {batch_size}"
        )


def relative(values: jax.Array, grad_sq_norm: jax.Array) -> jax.Array:
    """Per-sample ``values`` quadratic in the gradients (‖∇ℓᵢ‖², pᵢ = ∇ℓᵢ·g) over ‖g‖².

    Scaling the loss by s scales both by s², so the ratios are free of the loss's scale.
    The tests square and sum only these, never pᵢ² or ‖g‖⁴: those scale by s⁴ and leave
    float32's range (1e±38) for s beyond about 1e±9 when ‖g‖ is about 1.

    Example:
      >>> import jax.numpy as jnp
      >>> relative(jnp.array([2e24, 6e24], jnp.float32), jnp.float32(4e24)).tolist()
      [0.5, 1.5]
    """
    return values / grad_sq_norm


@dataclasses.dataclass(frozen=True)
class NormTest(Quantity):
    """Norm test 1/(B(B−1)) · (Σᵢ‖∇ℓᵢ‖² / ‖g‖² − B), the square of Cockpit's norm-test θ.

    Large values mean the mean gradient is small against the spread of per-sample gradients
    (noise dominates: a larger batch would help); near 0 means samples agree. Needs B ≥ 2.
    """

    key = "norm_test"
    per_sample = (stats.SQ_NORMS,)

    def check(self, batch_size: int) -> None:
        check_variance_batch("NormTest", batch_size)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        b = ctx.batch_size
        ratio = ctx.sq_norms.sum() / ctx.grad_sq_norm
        return (ratio - b) / (b * (b - 1)), state


@dataclasses.dataclass(frozen=True)
class InnerTest(Quantity):
    """Inner-product test √((Σᵢpᵢ² − B‖g‖⁴) / ((B−1)·B·‖g‖⁴)), pᵢ = ∇ℓᵢ·g.

    The standard error of the per-sample projections onto g, relative to ‖g‖²: whether the
    batch gradient is a descent direction for most samples (Bollapragada et al. 2018). Below
    1 (Cockpit's default threshold θ = 1), the batch is large enough. Needs B ≥ 2.

    Example:
      >>> import lmd4ml as lm
      >>> lm.InnerTest().key
      'inner_test'
    """

    key = "inner_test"

    def check(self, batch_size: int) -> None:
        check_variance_batch("InnerTest", batch_size)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        b = ctx.batch_size
        # (Σᵢpᵢ² − B‖g‖⁴)/‖g‖⁴ as Σᵢqᵢ² − B, qᵢ = pᵢ/‖g‖²: free of the loss's scale, where
        # ‖g‖⁴ leaves float32's range (:func:`relative`).
        q = relative(ctx.projections, ctx.grad_sq_norm)
        variance = (jnp.sum(jnp.square(q)) - b) / ((b - 1) * b)
        # Non-negative by Cauchy–Schwarz; rounding can push an exact 0 below it.
        return jnp.sqrt(jnp.maximum(variance, 0.0)), state


@dataclasses.dataclass(frozen=True)
class OrthoTest(Quantity):
    """Orthogonality test √(1/(B(B−1)) · Σᵢ[‖∇ℓᵢ‖²/‖g‖² − pᵢ²/‖g‖⁴]), pᵢ = ∇ℓᵢ·g.

    The spread of the per-sample gradients' components orthogonal to g, relative to ‖g‖
    (Bollapragada et al. 2018): large values mean the batch gradient's direction is noisy.
    Needs B ≥ 2.

    Example:
      >>> import lmd4ml as lm
      >>> lm.OrthoTest().key
      'ortho_test'
    """

    key = "ortho_test"
    per_sample = (stats.SQ_NORMS,)

    def check(self, batch_size: int) -> None:
        check_variance_batch("OrthoTest", batch_size)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        b = ctx.batch_size
        # ‖∇ℓᵢ‖²/‖g‖² − pᵢ²/‖g‖⁴ as rᵢ − qᵢ², both ratios free of the loss's scale, where
        # pᵢ² and ‖g‖⁴ leave float32's range (:func:`relative`).
        r = relative(ctx.sq_norms, ctx.grad_sq_norm)
        q = relative(ctx.projections, ctx.grad_sq_norm)
        orthogonal = jnp.sum(r - jnp.square(q))
        # Each term is ‖∇ℓᵢ − (pᵢ/‖g‖²)g‖²/‖g‖² ≥ 0; rounding can push an exact 0 below it.
        return jnp.sqrt(jnp.maximum(orthogonal / (b * (b - 1)), 0.0)), state
