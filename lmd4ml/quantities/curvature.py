"""Curvature from a diagonal: the Hessian's trace and the Takeuchi information criterion.

The diagonal comes from the step context, by the method each instrument resolves
(``METHODS``): Hessian-vector products of the mean loss L (:mod:`lmd4ml.stats.hessian`) or
the generalised Gauss-Newton matrix of a loss from ``lm.supervised``
(:mod:`lmd4ml.stats.ggn`). Instruments that resolve to the same method and ``seed`` share
one diagonal per step.

Defaults (``method="auto"``):

- ``HessTrace``: the Hessian's trace, exact. Through the GGN where the model is piecewise
  linear in each layer's parameters (dense, convolution, ReLU, max-pooling; the GGN's
  diagonal is then the Hessian's, as in Cockpit's values); else by one Hessian-vector product
  per parameter up to ``exact_max_params``; else the GGN's trace, with a warning that it is
  the GGN's. Without ``lm.supervised``, a model above ``exact_max_params`` is an error that
  says so: Hutchinson's estimate only when asked for.
- ``TICDiag``, ``TICTrace``: the GGN's diagonal wherever the loss is split (positive
  semi-definite, never a noisy or negative denominator; Cockpit's value on piecewise-linear
  models, a documented departure on smooth ones), else the Hessian's up to
  ``exact_max_params``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from lmd4ml import checks, stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree
from lmd4ml.stats.hessian import DiagEstimator

METHODS = ("auto", "exact", "ggn", "ggn_mc", "hutchinson")
"""How a diagonal is had: ``"exact"``, the Hessian's by one Hessian-vector product per
parameter; ``"ggn"``, the generalised Gauss-Newton matrix's, exact, from a split loss
(``lm.supervised``); ``"ggn_mc"``, its one-sample Monte-Carlo estimate; ``"hutchinson"``,
the Hessian's, estimated from random probes; ``"auto"``: the instrument's default."""


def _message(key: str, text: str) -> str:
    return f"{key}: {text}"


@dataclasses.dataclass(frozen=True)
class _DiagQuantity(Quantity):
    """A quantity built on a curvature diagonal; its state is the key of random draws.

    ``method`` (see ``METHODS``); ``probes``: Hutchinson's number of Hessian-vector products;
    ``seed``: the stream of random draws (quantities with the same seed share draws);
    ``exact_max_params``: the largest model (in parameters) for which ``"auto"`` takes the
    Hessian's diagonal by products; ``max_directions``: the most output directions per
    sample for which the GGN is exact (more outputs, a vocabulary × positions, and the
    Monte-Carlo form is used, with a warning). The method each instrument used is recorded in
    the run's metadata (``resolved``).
    """

    method: str = "auto"
    probes: int = 32
    seed: int = 0
    exact_max_params: int = 2048
    max_directions: int = 128
    resolved: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    curvature_of: ClassVar[str] = "the Hessian"
    """Whose diagonal ``"auto"`` is after: the Hessian's (HessTrace) or the GGN's (TIC)."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"{owner}: method must be one of {METHODS}, got {self.method!r}")
        # Hutchinson's probes are an array axis; the others are only compared with sizes.
        checks.check_int(f"{owner}: probes", self.probes, 1, checks.INT32_MAX)
        for name in ("exact_max_params", "max_directions"):
            checks.check_int(f"{owner}: {name}", getattr(self, name), 1)
        checks.check_seed(owner, self.seed)

    @property
    def uses_samples(self) -> bool:  # type: ignore[override]
        """Hessian-vector products are of the mean loss; the GGN is a sum over samples."""
        return self.method not in ("exact", "hutchinson")

    def init(self, params: PyTree) -> PyTree:
        return jax.random.PRNGKey(self.seed)

    def _warn(self, text: str) -> None:
        if text not in self.resolved.setdefault("warned", []):
            self.resolved["warned"].append(text)
            warnings.warn(_message(self.key, text), stacklevel=4)

    def _ggn(self, ctx: StepContext) -> str:
        """``"ggn"``, or ``"ggn_mc"`` (said so) where the outputs are too many directions."""
        directions = ctx.output_directions
        if directions <= self.max_directions:
            return "ggn"
        self._warn(
            f"the exact GGN needs {directions} output directions per sample (more than "
            f"max_directions={self.max_directions}); using its one-sample Monte-Carlo estimate "
            "(method='ggn_mc')"
        )
        return "ggn_mc"

    def resolve(self, ctx: StepContext) -> str:
        """The method this step uses, recorded in ``resolved["method"]``."""
        method = self.method
        if method in ("ggn", "ggn_mc") and ctx.split is None:
            ctx.require_split(f"{type(self).__name__}(method={method!r})")
        if method == "ggn":
            method = self._ggn(ctx)
        elif method == "auto":
            method = self._auto(ctx)
        self.resolved["method"] = method
        return method

    def _auto(self, ctx: StepContext) -> str:
        small = optax.tree.size(ctx.params) <= self.exact_max_params
        if ctx.split is not None and (self.curvature_of == "the GGN" or ctx.piecewise_linear):
            return self._ggn(ctx)  # the Hessian's diagonal itself where piecewise linear
        if small:
            return "exact"
        if ctx.split is not None:
            self._warn(
                "the model is not piecewise linear in each layer's parameters, so the "
                "Hessian's diagonal differs from the GGN's; reporting the GGN's (as Cockpit's "
                "diag_ggn_exact option). For the Hessian's, pass method='exact' "
                f"({optax.tree.size(ctx.params)} Hessian-vector products a step) or "
                "method='hutchinson' (an estimate)"
            )
            return self._ggn(ctx)
        raise ValueError(
            _message(
                self.key,
                f"exact values on a model of {optax.tree.size(ctx.params)} parameters (more "
                f"than exact_max_params={self.exact_max_params}) need the loss split into a "
                "model and a loss on its outputs: lm.supervised(apply_fn, output_loss), e.g. "
                "lm.supervised(model.apply, optax.softmax_cross_entropy_with_integer_labels). "
                "Or pass method='hutchinson' for an estimate, or method='exact' for one "
                "Hessian-vector product per parameter",
            )
        )

    def _diag(self, ctx: StepContext, state: PyTree) -> tuple[PyTree, PyTree]:
        """The diagonal at this step, by the resolved method, and the next state."""
        method = self.resolve(ctx)
        state, key = jax.random.split(state)
        if method == "exact":
            return ctx.hessian_diag(DiagEstimator("exact")), state
        if method == "hutchinson":
            return ctx.hessian_diag(DiagEstimator("hutchinson", self.probes, self.seed), key), state
        if method == "ggn":
            return ctx.ggn_diag(), state
        return ctx.ggn_diag(self.seed, key), state


@dataclasses.dataclass(frozen=True)
class HessTrace(_DiagQuantity):
    """tr(∇²L), the sum of the Hessian diagonal (Cockpit's HessTrace).

    Exact by default (the module's docstring says how); ``method``, ``probes``, ``seed``,
    ``exact_max_params`` and ``max_directions`` choose otherwise. With ``per_layer=True``
    the value is a dict: ``"total"`` and one trace per parameter leaf, named by its path
    (``jax.tree_util.keystr(path, simple=True, separator="/")``).

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # ∇²L = 2 xᵀx / B
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.HessTrace(method="exact")])
      >>> _, metrics = step(step.init(jnp.zeros(2)), jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> float(metrics["hess_trace"])
      6.0
    """

    key = "hess_trace"
    per_layer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"HessTrace: per_layer must be True or False, got {self.per_layer!r}")

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[Any, PyTree]:
        diag, state = self._diag(ctx, state)
        total = optax.tree.sum(diag)
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
class TICDiag(_DiagQuantity):
    """Σ_j [(1/B)Σᵢ(∇ℓᵢ)_j²] / (h_j + ε), h a curvature diagonal (Thomas et al. 2020).

    The Takeuchi information criterion with the Hessian replaced by a diagonal: by default
    the GGN's (``lm.supervised``), which is never negative, else the Hessian's on small
    models. ``eps``: ε, Cockpit's 1e-7, keeps flat directions from dividing by 0. Needs an
    accurate diagonal: Hutchinson's per-coordinate noise, divided by, makes it unreliable.

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
    curvature_of = "the GGN"
    eps: float = 1e-7

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_eps("TICDiag", self.eps, "each h_j")

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        diag, state = self._diag(ctx, state)
        ratios = jax.tree.map(lambda m, h: m / (h + self.eps), ctx.second_moment, diag)
        return optax.tree.sum(ratios), state


@dataclasses.dataclass(frozen=True)
class TICTrace(_DiagQuantity):
    """[(1/B)Σᵢ‖∇ℓᵢ‖²] / (tr(h) + ε), h a curvature diagonal as TICDiag's (Thomas et al.
    2020, trace form); ``eps``: ε, Cockpit's 1e-7.

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
    curvature_of = "the GGN"
    eps: float = 1e-7

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.check_eps("TICTrace", self.eps, "tr(h)")

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        diag, state = self._diag(ctx, state)
        return ctx.sample_mean(ctx.sq_norms) / (optax.tree.sum(diag) + self.eps), state
