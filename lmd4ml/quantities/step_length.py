"""Alpha: where the update landed on a quadratic fitted along it, on the step's own batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.quantities.gradient_tests import check_variance_batch
from lmd4ml.stats import PyTree

ALPHA_VAR_FLOOR = 1e-10
"""A zero sample variance is replaced by this (Cockpit's), so its observation keeps a weight."""


def fit_quadratic(
    t: jax.Array, values: jax.Array, slopes: jax.Array, value_vars: jax.Array, slope_vars: jax.Array
) -> jax.Array:
    """Coefficients (c₀, c₁, c₂) of q(s) = c₀ + c₁s + c₂s² fitted to noisy observations.

    ``values`` are q(0), q(t), ``slopes`` q′(0), q′(t); each observation is weighted by the
    inverse of its variance (weighted least squares, the Gaussian maximum-likelihood fit).

    Example:
      >>> import jax.numpy as jnp
      >>> fit_quadratic(  # q(s) = 1 − 2s + s²
      ...     jnp.array(2.0), jnp.array([1.0, 1.0]), jnp.array([-2.0, 2.0]),
      ...     jnp.ones(2), jnp.ones(2)).round(6).tolist()
      [1.0, -2.0, 1.0]
    """
    zero, one = jnp.zeros_like(t), jnp.ones_like(t)
    design = jnp.stack(
        [
            jnp.stack([one, zero, zero]),  # q(0)
            jnp.stack([one, t, t**2]),  # q(t)
            jnp.stack([zero, one, zero]),  # q′(0)
            jnp.stack([zero, one, 2 * t]),  # q′(t)
        ]
    )
    scale = 1 / jnp.sqrt(jnp.concatenate([value_vars, slope_vars]))
    observed = jnp.concatenate([values, slopes])
    # Least squares on the whitened system: no normal matrix, whose condition number would be
    # the square of this one's (variances of losses and slopes differ by orders of magnitude).
    coefficients, *_ = jnp.linalg.lstsq(design * scale[:, None], observed * scale)
    return coefficients


@dataclasses.dataclass(frozen=True)
class Alpha(Quantity):
    """Normalised step length α of the update on a quadratic fitted along it (Cockpit's α).

    Along the update u = θₜ₊₁ − θₜ, of length t = ‖u‖, the batch loss and its slope in the
    unit direction u/t are observed at both ends of the step on the same batch: mean and
    sample variance of ℓᵢ and of ∇ℓᵢ·u/t at θₜ and θₜ₊₁. A quadratic q(s) = c₀ + c₁s + c₂s²
    is fitted to the four means, each weighted by the inverse of its variance, and
    α = 2t/s̄ − 1 with s̄ = −c₁/c₂, where q returns to q(0). −1: no progress (also when q is
    concave or t = 0); 0: the step lands at the minimum; 1: on the other side at equal
    height; above 1: uphill. Works for any optimizer: u is the update applied. Needs B ≥ 2.

    Example:
      >>> import lmd4ml as lm
      >>> lm.Alpha().key
      'alpha'
    """

    key = "alpha"

    def check(self, batch_size: int) -> None:
        check_variance_batch("Alpha", batch_size)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        t = optax.tree.norm(ctx.updates)

        def along_update(params: PyTree) -> tuple[jax.Array, jax.Array]:
            return jax.jvp(lambda p: ctx.loss_fn(p, ctx.batch), (params,), (ctx.updates,))

        _, start_slopes = along_update(ctx.params)
        end_losses, end_slopes = along_update(ctx.new_params)
        losses = jnp.stack([ctx.losses, end_losses])
        slopes = jnp.stack([start_slopes, end_slopes]) / t
        floor = jnp.asarray(ALPHA_VAR_FLOOR, losses.dtype)
        loss_vars, slope_vars = (
            jnp.where(v == 0, floor, v)
            for v in (jnp.var(losses, axis=1, ddof=1), jnp.var(slopes, axis=1, ddof=1))
        )
        c = fit_quadratic(t, losses.mean(axis=1), slopes.mean(axis=1), loss_vars, slope_vars)
        alpha = 2 * t / (-c[1] / c[2]) - 1
        return jnp.where((t == 0) | (c[2] < 0), -1.0, alpha).astype(losses.dtype), state
