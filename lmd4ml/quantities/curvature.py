"""Curvature: Hessian trace, Takeuchi information criterion, largest Hessian eigenvalue.

Everything here reads Hessian-vector products of the mean loss L from the step context
(:mod:`lmd4ml.stats.hessian`). HessTrace, TICDiag and TICTrace with the same ``method``,
``probes`` and ``seed`` share one Hessian diagonal per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

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


class LanczosState(NamedTuple):
    """HessMaxEV's state: the warm start for the next step, and what this step spent."""

    vector: jax.Array  # unit vector, raveled like the params (jax.flatten_util.ravel_pytree)
    iterations: jax.Array  # Hessian-vector products the last computation used


UNROLL_ON_CPU_CONV = 8
"""Lanczos products run outside a loop for convolutional models on CPU: enough for a warm
start on DeepOBS 3c3d (7–8 products a step), each ~10× faster than inside the loop."""


@dataclasses.dataclass(frozen=True)
class HessMaxEV(Quantity):
    """The largest eigenvalue of ∇²L (algebraic, not largest in magnitude), by Lanczos.

    Restarted Lanczos (:func:`lmd4ml.stats.hessian.max_eigenvalue`) on Hessian-vector
    products, warm-started from the previous step's eigenvector, which the state carries;
    the first step starts from a random vector drawn with ``seed``. It stops when the Ritz
    residual is at most ``rtol`` times the spectral radius, or after ``max_iters`` products.
    For a convolutional model on CPU the first ``unroll`` products (default
    ``UNROLL_ON_CPU_CONV``) run outside any loop, where XLA's convolutions are ~10× faster.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # ∇²L = 2 xᵀx / B: eigenvalues 3 ± √5
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.HessMaxEV()])
      >>> _, metrics = step(step.init(jnp.zeros(2)), jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> round(float(metrics["hess_max_ev"]), 4)
      5.2361
    """

    key = "hess_max_ev"
    uses_samples = False
    rtol: float = 1e-3
    max_iters: int = 100
    krylov_dim: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.rtol < 1:
            raise ValueError(f"HessMaxEV: rtol must be in (0, 1), got {self.rtol!r}")
        for name in ("max_iters", "krylov_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HessMaxEV: {name} must be a positive int, got {value!r}")

    def init(self, params: PyTree) -> LanczosState:
        flat = ravel_pytree(stats.widen(params))[0]
        start = jax.random.normal(jax.random.PRNGKey(self.seed), flat.shape, flat.dtype)
        return LanczosState(start, jnp.zeros((), jnp.int32))

    def compute(self, ctx: StepContext, state: LanczosState) -> tuple[jax.Array, LanczosState]:
        matvec, _ = stats.hessian.flat_matvec(ctx.hvp, ctx.params)
        unrolled = stats.hessian.needs_unrolling(ctx.loss_fn, ctx.params, ctx.batch)
        out = stats.hessian.max_eigenvalue(
            matvec,
            state.vector,
            rtol=self.rtol,
            max_iters=self.max_iters,
            krylov_dim=self.krylov_dim,
            unroll=UNROLL_ON_CPU_CONV if unrolled else 0,
        )
        return out.value, LanczosState(out.vector, out.iterations)
