"""The seed's scalar quantities: loss, gradient norm, distance travelled, update size.

``GradNorm``, ``Distance`` and ``UpdateSize`` take ``per_layer=True`` to also report the norm
of every parameter leaf (see :func:`norms`).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from lmd4ml import stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree


def norms(tree: PyTree, per_layer: bool) -> jax.Array | dict[str, jax.Array]:
    """The global L2 norm of ``tree``, or with ``per_layer`` a dict of it and each leaf's.

    The per-layer dict holds ``"total"``, the global norm, and one entry per leaf keyed by its
    path, ``jax.tree_util.keystr(path, simple=True, separator="/")``.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"dense": {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}}
      >>> {k: float(v) for k, v in norms(tree, per_layer=True).items()}
      {'total': 13.0, 'dense/b': 12.0, 'dense/w': 5.0}
    """
    total = optax.tree.norm(tree)
    if not per_layer:
        return total
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    named = {
        jax.tree_util.keystr(p, simple=True, separator="/"): optax.tree.norm(x) for p, x in leaves
    }
    if "total" in named:
        raise ValueError(
            "per_layer=True keys each leaf by its path, but a leaf's path is 'total', the key "
            "of the global norm; rename that parameter or use per_layer=False"
        )
    return {"total": total, **named}


@dataclasses.dataclass(frozen=True)
class Loss(Quantity):
    """Mean batch loss L = mean(ℓ) at θₜ.

    Example:
      >>> import lmd4ml as lm
      >>> lm.Loss().key
      'loss'
    """

    key = "loss"
    uses_samples = False

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return ctx.loss, state


@dataclasses.dataclass(frozen=True)
class _Norm(Quantity):
    """A norm of a pytree, optionally broken down by parameter leaf."""

    per_layer: bool = False

    def __post_init__(self):
        if not isinstance(self.per_layer, bool):
            raise ValueError(
                f"{type(self).__name__}: per_layer must be True or False, got {self.per_layer!r}"
            )


@dataclasses.dataclass(frozen=True)
class GradNorm(_Norm):
    """‖g‖₂, the global L2 norm of the mean batch gradient; per leaf too with ``per_layer``.

    Example:
      >>> import lmd4ml as lm
      >>> lm.GradNorm(per_layer=True).key
      'grad_norm'
    """

    key = "grad_norm"
    uses_samples = False

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[PyTree, PyTree]:
        return norms(ctx.grads, self.per_layer), state


@dataclasses.dataclass(frozen=True)
class Distance(_Norm):
    """‖θₜ − θ₀‖₂, how far the parameters are from those given to ``init`` (0 at step 0).

    Its state is θ₀. With ``per_layer``, each leaf's distance too.
    """

    key = "distance"
    uses_samples = False

    def init(self, params: PyTree) -> PyTree:
        return params

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[PyTree, PyTree]:
        return norms(optax.tree.sub(*stats.widen((ctx.params, state))), self.per_layer), state


@dataclasses.dataclass(frozen=True)
class UpdateSize(_Norm):
    """‖θₜ₊₁ − θₜ‖₂, the size of the update this step applied; per leaf too with ``per_layer``."""

    key = "update_size"
    uses_samples = False

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[PyTree, PyTree]:
        return norms(ctx.updates, self.per_layer), state
