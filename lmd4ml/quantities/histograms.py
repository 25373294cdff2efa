"""Histograms of per-sample gradient elements."""

from __future__ import annotations

import dataclasses
import numbers
from functools import partial

import jax

from lmd4ml import stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PerSample, PyTree


def _hist_1d(grads: PyTree, params: PyTree, nbins: int, maxval: float) -> jax.Array:
    del params
    return sum(stats.histogram(g, nbins, -maxval, maxval) for g in jax.tree.leaves(grads))


@dataclasses.dataclass(frozen=True)
class GradHist1d(Quantity):
    """Counts of every element of every per-sample gradient ∇ℓᵢ in ``nbins`` equal bins.

    Bins cover [−maxval, maxval]; elements outside are clamped into the edge bins and NaN
    elements are left out. Counts are int32 and sum to B·P for a finite gradient.

    Example:
      >>> import lmd4ml as lm
      >>> lm.GradHist1d(nbins=20, maxval=0.1).key
      'grad_hist_1d'
    """

    nbins: int = 100
    maxval: float = 0.05
    key = "grad_hist_1d"

    def __post_init__(self):
        if not isinstance(self.nbins, numbers.Integral) or self.nbins < 1:
            raise ValueError(f"GradHist1d: nbins must be an integer >= 1, got {self.nbins!r}")
        if not self.maxval > 0:
            raise ValueError(f"GradHist1d: maxval must be > 0, got {self.maxval!r}")

    @property
    def per_sample(self) -> tuple[PerSample, ...]:  # type: ignore[override]
        fn = partial(_hist_1d, nbins=self.nbins, maxval=float(self.maxval))
        return (PerSample(f"grad_hist_1d[{self.nbins},{self.maxval}]", fn, "sum"),)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        return ctx.per_sample(self.per_sample[0]), state
