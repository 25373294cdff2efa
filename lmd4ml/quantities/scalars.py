"""The seed's scalar quantities: loss, gradient norm, distance travelled, update size."""

from __future__ import annotations

import dataclasses

import jax
import optax

from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree


@dataclasses.dataclass(frozen=True)
class Loss(Quantity):
    """Mean batch loss L = mean(ℓ) at θₜ.

    Example:
      >>> import lmd4ml as lm
      >>> lm.Loss().key
      'loss'
    """

    key = "loss"

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return ctx.loss, state


@dataclasses.dataclass(frozen=True)
class GradNorm(Quantity):
    """‖g‖₂, the global L2 norm of the mean batch gradient."""

    key = "grad_norm"

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return optax.tree.norm(ctx.grads), state


@dataclasses.dataclass(frozen=True)
class Distance(Quantity):
    """‖θₜ − θ₀‖₂, how far the parameters are from those given to ``init`` (0 at step 0).

    Its state is θ₀.
    """

    key = "distance"

    def init(self, params: PyTree) -> PyTree:
        return params

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return optax.tree.norm(optax.tree.sub(ctx.params, state)), state


@dataclasses.dataclass(frozen=True)
class UpdateSize(Quantity):
    """‖θₜ₊₁ − θₜ‖₂, the size of the update this step applied."""

    key = "update_size"

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return optax.tree.norm(ctx.updates), state
