"""Alpha: where the update landed on a quadratic fitted along it (Cockpit's α)."""

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

ALPHA_ENDS = ("same_batch", "next_batch")
"""Where ``Alpha`` observes the end point θₜ₊₁: on batch t, or on batch t + 1 (Cockpit's)."""


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


class Observation(NamedTuple):
    """The batch loss and its slope at one end of a step, each a mean with its variance."""

    value: jax.Array  # mean of ℓᵢ
    value_var: jax.Array  # their sample variance
    slope: jax.Array  # mean of ∇ℓᵢ·u/‖u‖
    slope_var: jax.Array  # their sample variance


def _mean_and_var(
    samples: jax.Array, mask: jax.Array | None, var_floor: float
) -> tuple[jax.Array, jax.Array]:
    """Mean and sample variance (ddof 1) over the real samples, a zero variance replaced by
    ``var_floor``."""
    if mask is None:
        mean, var = samples.mean(), jnp.var(samples, ddof=1)
    else:
        n = jnp.sum(mask).astype(samples.dtype)
        mean = stats.sample_mean(samples, mask)
        var = jnp.sum(jnp.where(mask, jnp.square(samples - mean), 0)) / (n - 1)
    return mean, jnp.where(var == 0, jnp.asarray(var_floor, var.dtype), var)


def observe(
    losses: jax.Array, slopes: jax.Array, mask: jax.Array | None = None, var_floor: float = 1e-10
) -> Observation:
    """The observation of per-sample ``losses`` and directional ``slopes``, both shape (B,),
    over the samples ``mask`` marks real (all, without one); a zero variance becomes
    ``var_floor``, so that its observation keeps a finite weight.

    Example:
      >>> import jax.numpy as jnp
      >>> obs = observe(jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0]), var_floor=0.5)
      >>> [float(x) for x in obs]  # mean and variance of the losses, then of the slopes
      [2.0, 2.0, 2.0, 0.5]
    """
    return Observation(
        *_mean_and_var(losses, mask, var_floor), *_mean_and_var(slopes, mask, var_floor)
    )


def losses_and_slopes(
    ctx: StepContext, params: PyTree, direction: PyTree
) -> tuple[jax.Array, jax.Array]:
    """ℓᵢ and ∇ℓᵢ·d/‖d‖ at ``params`` on the step's batch, from one forward-mode pass."""
    losses, slopes = ctx.directional(params, direction)
    return losses, slopes / optax.tree.norm(direction)


def step_alpha(t: jax.Array, start: Observation, end: Observation) -> jax.Array:
    """α = 2t/s̄ − 1 of the quadratic fitted to the observations at 0 and t (−1: no progress)."""
    c = fit_quadratic(
        t,
        jnp.stack([start.value, end.value]),
        jnp.stack([start.slope, end.slope]),
        jnp.stack([start.value_var, end.value_var]),
        jnp.stack([start.slope_var, end.slope_var]),
    )
    alpha = 2 * t / (-c[1] / c[2]) - 1
    return jnp.where((t == 0) | (c[2] < 0), -1.0, alpha).astype(start.value.dtype)


class AlphaStart(NamedTuple):
    """What ``Alpha(end="next_batch")`` carries from a tracked step to the next: its start."""

    direction: PyTree  # the update u = θₜ₊₁ − θₜ of the last tracked step t
    start: Observation  # at θₜ on batch t, along u
    step: jax.Array  # t, or -2 before any tracked step (so no step follows it)
    resets: jax.Array  # how many times a non-finite start was dropped


@dataclasses.dataclass(frozen=True)
class Alpha(Quantity):
    """Normalised step length α of the update on a quadratic fitted along it (Cockpit's α).

    Along the update u = θₜ₊₁ − θₜ, of length t = ‖u‖, the batch loss and its slope in the
    unit direction u/t are observed at both ends of the step: mean and sample variance of ℓᵢ
    and of ∇ℓᵢ·u/t at θₜ (on batch t) and at θₜ₊₁. A quadratic q(s) = c₀ + c₁s + c₂s² is
    fitted to the four means, each weighted by the inverse of its variance, and
    α = 2t/s̄ − 1 with s̄ = −c₁/c₂, where q returns to q(0). −1: no progress (also when q is
    concave or t = 0); 0: the step lands at the minimum; 1: on the other side at equal
    height; above 1: uphill. Works for any optimizer: u is the update applied. Needs B ≥ 2.

    ``end`` says where θₜ₊₁ is observed:

    - ``"same_batch"`` (default): on batch t, in step t itself; the value describes this step.
    - ``"next_batch"``: on batch t + 1, as Cockpit does, so the values reproduce Cockpit's.
      The end is only seen at step t + 1: the value reported there is α of step t, NaN
      where step t was not tracked (at the first step, after an untracked step). Track it
      at consecutive steps; it carries u of the last tracked step (one params-sized state).
      A start that is NaN or infinite (a non-finite step) is dropped, with a warning the
      first time: the next step's value is then NaN, as after an untracked step.

    ``var_floor`` replaces a zero sample variance (1e-10, Cockpit's), so that an observation
    with no spread keeps a finite weight in the fit.

    Example: on ℓᵢ = ½‖w − xᵢ‖², SGD with rate 0.5 goes half way to the minimum (α = −0.5);
    with one batch over and over, both modes see the same, one step apart:

      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> def loss_fn(w, x):
      ...     return 0.5 * jnp.sum((w - x) ** 2, axis=1)
      >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
      >>> step = lm.instrument(loss_fn, optax.sgd(0.5), [lm.Alpha(end="next_batch")])
      >>> state, values = step.init(jnp.zeros(2)), []
      >>> for _ in range(3):
      ...     state, metrics = step(state, x)
      ...     values.append(round(float(metrics["alpha"]), 6))
      >>> values  # at step 0 no step has ended yet; at step k, α of step k − 1
      [nan, -0.5, -0.5]
    """

    end: str = "same_batch"
    var_floor: float = 1e-10
    key = "alpha"

    def __post_init__(self):
        if not (isinstance(self.end, str) and self.end in ALPHA_ENDS):
            raise ValueError(
                f"Alpha: end must be one of {', '.join(map(repr, ALPHA_ENDS))} (where the "
                f"step's end point is observed); got {self.end!r}"
            )
        # A floor that float32 flushes to 0 would replace a zero variance with 0.
        rule = (
            f"a number >= {checks.FLOAT32_TINY:.4g} (float32's smallest normal; it replaces "
            "a zero variance)"
        )
        checks.check_real(
            "Alpha: var_floor", self.var_floor, rule, lambda v: v >= checks.FLOAT32_TINY
        )

    def check(self, batch_size: int) -> None:
        check_variance_batch("Alpha", batch_size)

    @property
    def nan_is_missing(self) -> bool:
        return self.end == "next_batch"

    def init(self, params: PyTree) -> PyTree:
        if self.end == "same_batch":
            return ()
        zero = jnp.zeros((), stats.wide_dtype(jnp.result_type(*jax.tree.leaves(params))))
        return AlphaStart(
            direction=jax.tree.map(jnp.zeros_like, stats.widen(params)),
            start=Observation(zero, zero, zero, zero),
            step=jnp.full((), -2, jnp.int32),
            resets=jnp.zeros((), jnp.int32),
        )

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        if self.end == "same_batch":
            return self._same_batch(ctx), state
        return self._next_batch(ctx, state)

    def _same_batch(self, ctx: StepContext) -> jax.Array:
        u = ctx.updates
        _, start_slopes = losses_and_slopes(ctx, ctx.params, u)
        end_losses, end_slopes = losses_and_slopes(ctx, ctx.new_params, u)
        return step_alpha(
            optax.tree.norm(u),
            observe(ctx.losses, start_slopes, ctx.mask, self.var_floor),
            observe(end_losses, end_slopes, ctx.mask, self.var_floor),
        )

    def _next_batch(self, ctx: StepContext, state: AlphaStart) -> tuple[jax.Array, AlphaStart]:
        # This step's θ and batch are the previous step's end point: finish its fit.
        u = state.direction
        slopes = losses_and_slopes(ctx, ctx.params, u)[1]
        end = observe(ctx.losses, slopes, ctx.mask, self.var_floor)
        alpha = step_alpha(optax.tree.norm(u), state.start, end)
        follows = ctx.step == state.step + 1
        value = jnp.where(follows, alpha, jnp.nan)

        dtype = state.start.value.dtype
        slopes = losses_and_slopes(ctx, ctx.params, ctx.updates)[1]
        start = observe(ctx.losses, slopes, ctx.mask, self.var_floor)
        step = jnp.asarray(ctx.step, jnp.int32)
        carried = (ctx.updates, Observation(*(x.astype(dtype) for x in start)), step)
        # Fewer than two real samples (a padded batch) give no variance: the last start is
        # kept, so the next step has none to finish (NaN, as after an untracked step).
        carried = optax.tree.where(ctx.batch_size >= 2, carried, state[:3])
        carried, resets = reset_if_nonfinite(
            carried,
            lambda: tuple(self.init(ctx.params)[:3]),
            state.resets,
            step,
            f"Alpha ({self.key!r}): the start of the step carried to the next",
        )
        return value, AlphaStart(*carried, resets)
