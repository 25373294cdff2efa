"""Curvature from the Hessian's diagonal: its trace and the Takeuchi information criterion.

Everything here reads Hessian-vector products of the mean loss L from the step context
(:mod:`lmd4ml.stats.hessian`). HessTrace, TICDiag and TICTrace with the same ``method``,
``probes`` and ``seed`` share one Hessian diagonal per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lmd4ml import stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree
from lmd4ml.stats.hessian import DiagEstimator

TIC_EPS = 1e-7
"""ε in the TIC denominators (Cockpit's value): keeps flat directions from dividing by 0."""


def _tree_sum(tree: PyTree) -> jax.Array:
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class _HessianDiagQuantity(Quantity):
    """A quantity built on diag(∇²L). Its state is the key of Hutchinson's probes (if used).

    ``method``: ``"exact"`` (D Hessian-vector products), ``"hutchinson"`` (``probes``
    products, unbiased) or ``"auto"``: exact up to ``stats.hessian.EXACT_MAX_PARAMS``
    parameters, Hutchinson above.
    """

    method: str = "auto"
    probes: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in stats.hessian.METHODS:
            raise ValueError(
                f"{type(self).__name__}: method must be one of {stats.hessian.METHODS}, "
                f"got {self.method!r}"
            )
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(
                f"{type(self).__name__}: probes must be a positive int (Hutchinson's number of "
                f"Hessian-vector products), got {self.probes!r}"
            )

    def _estimator(self, params: PyTree) -> DiagEstimator:
        if stats.hessian.resolve_method(self.method, params) == "exact":
            return DiagEstimator("exact")
        return DiagEstimator("hutchinson", self.probes, self.seed)

    def init(self, params: PyTree) -> PyTree:
        if self._estimator(params).method == "exact":
            return ()
        return jax.random.PRNGKey(self.seed)

    def _diag(self, ctx: StepContext, state: PyTree) -> tuple[PyTree, PyTree]:
        """diag(∇²L) at this step, and the next state."""
        estimator = self._estimator(ctx.params)
        if estimator.method == "exact":
            return ctx.hessian_diag(estimator), state
        state, key = jax.random.split(state)
        return ctx.hessian_diag(estimator, key), state


@dataclasses.dataclass(frozen=True)
class HessTrace(_HessianDiagQuantity):
    """tr(∇²L), the sum of the Hessian diagonal (Cockpit's HessTrace).

    With ``per_layer=True`` the value is a dict: ``"total"`` and one trace per parameter
    leaf, named by its path (``jax.tree_util.keystr(path, simple=True, separator="/")``).

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # ∇²L = 2 xᵀx / B
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.HessTrace(method="exact")])
      >>> _, metrics = step(step.init(jnp.zeros(2)), jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> float(metrics["hess_trace"])
      6.0
    """

    key = "hess_trace"
    uses_samples = False
    per_layer: bool = False

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[Any, PyTree]:
        diag, state = self._diag(ctx, state)
        total = _tree_sum(diag)
        if not self.per_layer:
            return total, state
        layers = {
            jax.tree_util.keystr(path, simple=True, separator="/"): jnp.sum(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(diag)
        }
        if "total" in layers:
            raise ValueError(
                "HessTrace(per_layer=True) names the sum 'total', and a parameter leaf has "
                "that path too; rename the parameter or use per_layer=False"
            )
        return {"total": total, **layers}, state


@dataclasses.dataclass(frozen=True)
class TICDiag(_HessianDiagQuantity):
    """Σ_j [(1/B)Σᵢ(∇ℓᵢ)_j²] / (h_j + ε), h = diag(∇²L), ε = 1e-7 (Thomas et al. 2020).

    The Takeuchi information criterion with the Hessian replaced by its diagonal. Needs
    an accurate diagonal: Hutchinson's per-coordinate noise, divided by, makes it unreliable.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w - 1.0) ** 2
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.TICDiag(method="exact")])
      >>> _, metrics = step(step.init(jnp.zeros(1)), jnp.array([[1.0], [2.0]]))
      >>> round(float(metrics["tic_diag"]), 5)  # mean (2xᵢ)² = 10, h = mean 2xᵢ² = 5
      2.0
    """

    key = "tic_diag"
    per_sample = (stats.SQ_GRADS,)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        diag, state = self._diag(ctx, state)
        ratios = jax.tree.map(lambda m, h: m / (h + TIC_EPS), ctx.second_moment, diag)
        return _tree_sum(ratios), state


@dataclasses.dataclass(frozen=True)
class TICTrace(_HessianDiagQuantity):
    """[(1/B)Σᵢ‖∇ℓᵢ‖²] / (tr(∇²L) + ε), ε = 1e-7 (Thomas et al. 2020, trace form).

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w - 1.0) ** 2
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.TICTrace(method="exact")])
      >>> _, metrics = step(step.init(jnp.zeros(1)), jnp.array([[1.0], [2.0]]))
      >>> round(float(metrics["tic_trace"]), 5)
      2.0
    """

    key = "tic_trace"
    per_sample = (stats.SQ_NORMS,)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        diag, state = self._diag(ctx, state)
        return ctx.sample_mean(ctx.sq_norms) / (_tree_sum(diag) + TIC_EPS), state
