"""The largest Hessian eigenvalue, by warm-started Lanczos on Hessian-vector products."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lmd4ml import checks, stats
from lmd4ml.quantities.base import Quantity, Report, StepContext, reset_if_nonfinite
from lmd4ml.stats import PyTree


class LanczosState(NamedTuple):
    """HessMaxEV's state: the warm start for the next step, and what this step spent."""

    vector: jax.Array  # unit vector, raveled like the params (jax.flatten_util.ravel_pytree)
    iterations: jax.Array  # Hessian-vector products the last computation used
    resets: jax.Array  # how many non-finite warm starts were replaced so far


@dataclasses.dataclass(frozen=True)
class HessMaxEV(Quantity):
    """The largest eigenvalue of ∇²L (algebraic, not largest in magnitude), by Lanczos.

    Restarted Lanczos (:func:`lmd4ml.stats.hessian.max_eigenvalue`) on Hessian-vector
    products, warm-started from the previous step's eigenvector, which the state carries;
    the first step starts from a random vector drawn with ``seed``. It stops when the Ritz
    residual is at most ``rtol`` times the spectral radius, after ``max_iters`` products, or
    at the first non-finite product (a NaN loss: the value is then NaN).
    Two sibling values say how it went: ``hess_max_ev_converged`` (whether the tolerance was
    met; False when it stopped at ``max_iters``) and ``hess_max_ev_iterations`` (the
    products used). A warm start that comes out NaN or infinite (a non-finite step) is
    replaced by a fresh random one, with a warning the first time.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # ∇²L = 2 xᵀx / B: eigenvalues 3 ± √5
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.HessMaxEV()])
      >>> _, metrics = step(step.init(jnp.zeros(2)), jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> round(float(metrics["hess_max_ev"]), 4), bool(metrics["hess_max_ev_converged"])
      (5.2361, True)
      >>> int(metrics["hess_max_ev_iterations"])  # two dimensions: exact after two products
      2
    """

    key = "hess_max_ev"
    siblings = ("converged", "iterations")
    uses_samples = False
    rtol: float = 1e-3
    max_iters: int = 100
    krylov_dim: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        checks.check_real("HessMaxEV: rtol", self.rtol, "a number in (0, 1)", lambda r: 0 < r < 1)
        # Counts of Hessian-vector products: int32 loop counters in the compiled step.
        for name in ("max_iters", "krylov_dim"):
            checks.check_int(f"HessMaxEV: {name}", getattr(self, name), 1, checks.INT32_MAX)
        checks.check_seed("HessMaxEV", self.seed)

    def init(self, params: PyTree) -> LanczosState:
        flat = ravel_pytree(stats.widen(params))[0]
        start = jax.random.normal(jax.random.PRNGKey(self.seed), flat.shape, flat.dtype)
        return LanczosState(start, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def compute(self, ctx: StepContext, state: LanczosState) -> tuple[Report, LanczosState]:
        matvec, _ = stats.hessian.flat_matvec(ctx.hvp, ctx.params)
        out = stats.hessian.max_eigenvalue(
            matvec,
            state.vector,
            rtol=self.rtol,
            max_iters=self.max_iters,
            krylov_dim=self.krylov_dim,
        )
        vector, resets = reset_if_nonfinite(
            out.vector,
            lambda: self.init(ctx.params).vector,
            state.resets,
            ctx.step,
            f"HessMaxEV ({self.key!r}): the warm-start vector",
        )
        value = Report(out.value, {"converged": out.converged, "iterations": out.iterations})
        return value, LanczosState(vector, out.iterations, resets)
