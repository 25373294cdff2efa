"""Histograms of per-sample gradient elements."""

from __future__ import annotations

import dataclasses
import operator
from functools import partial, reduce

import jax

from lmd4ml import checks, stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PerSample, PyTree


def _hist_1d(grads: PyTree, params: PyTree, nbins: int, maxval: float) -> stats.Counts:
    del params
    leaves = jax.tree.leaves(grads)
    return reduce(operator.add, (stats.histogram(g, nbins, -maxval, maxval) for g in leaves))


def check_bins_in_float32(what: str, lo: float, hi: float, n: int) -> None:
    """Raise ``ValueError`` unless ``n`` bins on [lo, hi] can be found in float32, where
    gradients are binned: edges (lo·(n − k) + hi·k)/n finite (|lo|·n and |hi|·n at most
    float32's largest number) and a width (hi − lo)/n that is a normal number. ``what``
    names the argument that set them.

    Example:
      >>> check_bins_in_float32("GradHist1d: maxval", -1e37, 1e37, 100)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: GradHist1d: maxval must keep 100 bins on [-1e+37, 1e+37] within float32, ...
    """
    reach, width = max(abs(lo), abs(hi)) * n, (hi - lo) / n
    if not (reach <= checks.FLOAT32_MAX and width >= checks.FLOAT32_TINY):
        raise ValueError(
            f"{what} must keep {n} bins on [{lo}, {hi}] within float32, where gradients are "
            f"binned (edges times bins at most {checks.FLOAT32_MAX:.3g}, a bin width at least "
            f"{checks.FLOAT32_TINY:.3g}); got edges times bins {reach:.3g}, width {width:.3g}"
        )


@dataclasses.dataclass(frozen=True)
class GradHist1d(Quantity):
    """Counts of every element of every per-sample gradient ∇ℓᵢ in ``nbins`` equal bins.

    Bins cover [−maxval, maxval]; elements outside are clamped into the edge bins and NaN
    elements are left out. Counts sum to B·P for a finite gradient and are exact at any size
    with ``jax_enable_x64`` off: :class:`~lmd4ml.stats.Counts` in the step's metrics
    (``np.asarray`` makes them int64), int64 in the history, the run store and the dashboard.

    Example:
      >>> import lmd4ml as lm
      >>> lm.GradHist1d(nbins=20, maxval=0.1).key
      'grad_hist_1d'
    """

    nbins: int = 100
    maxval: float = 0.05
    key = "grad_hist_1d"

    def __post_init__(self):
        checks.check_int("GradHist1d: nbins", self.nbins, 1, checks.INT32_MAX)
        rule = "a finite number > 0 (bins cover [-maxval, maxval])"
        checks.check_real("GradHist1d: maxval", self.maxval, rule, lambda m: m > 0)
        check_bins_in_float32("GradHist1d: maxval", -self.maxval, self.maxval, self.nbins)

    @property
    def per_sample(self) -> tuple[PerSample, ...]:  # type: ignore[override]
        fn = partial(_hist_1d, nbins=self.nbins, maxval=float(self.maxval))
        return (PerSample(f"grad_hist_1d[{self.nbins},{self.maxval}]", fn, "sum"),)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[stats.Counts, PyTree]:
        return ctx.per_sample(self.per_sample[0]), state

    def axes(self) -> dict[str, list[float]]:
        """Bin centres of the gradient axis.

        Example:
          >>> import lmd4ml as lm
          >>> lm.GradHist1d(nbins=4, maxval=1.0).axes()
          {'gradient': [-0.75, -0.25, 0.25, 0.75]}
        """
        return {"gradient": bin_centres(-self.maxval, self.maxval, self.nbins)}


def bin_centres(lo: float, hi: float, n: int) -> list[float]:
    """Centres of ``n`` equal bins over [lo, hi]."""
    width = (float(hi) - float(lo)) / n
    return [float(lo) + width * (i + 0.5) for i in range(n)]


def _hist_2d(
    grads: PyTree,
    params: PyTree,
    bins: tuple[int, int],
    range: tuple[tuple[float, float], tuple[float, float]],
) -> stats.Counts:
    pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True)
    return reduce(operator.add, (stats.histogram2d(g, p, bins, range) for g, p in pairs))


def _is_interval(pair: object) -> bool:
    """Whether ``pair`` is (lo, hi), two finite numbers with lo < hi."""
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        return False
    lo, hi = pair
    return checks.is_real(lo) and checks.is_real(hi) and lo < hi


@dataclasses.dataclass(frozen=True)
class GradHist2d(Quantity):
    """Counts of (per-sample gradient element, parameter value) pairs on a 2-D grid.

    Every element (∇ℓᵢ)_j of every per-sample gradient is paired with its parameter θₜ,j;
    ``bins`` = (gradient bins, parameter bins) of equal width over ``range`` =
    ((g_lo, g_hi), (θ_lo, θ_hi)). Values outside clamp into the edge bins; pairs with a NaN
    are left out. Counts have shape ``bins``, sum to B·D for a finite gradient and are exact
    as :class:`GradHist1d`'s are.

    Example:
      >>> import lmd4ml as lm
      >>> lm.GradHist2d(bins=(20, 30), range=((-0.1, 0.1), (-1.0, 1.0))).key
      'grad_hist_2d'
    """

    bins: tuple[int, int] = (40, 50)
    range: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-2.0, 2.0))
    key = "grad_hist_2d"

    def __post_init__(self):
        bins_ok = (
            isinstance(self.bins, tuple | list)
            and len(self.bins) == 2
            and all(checks.is_integer(n) and 1 <= n <= checks.INT32_MAX for n in self.bins)
        )
        if not bins_ok:
            raise ValueError(
                f"GradHist2d: bins must be two integers >= 1 (gradient bins, parameter bins); "
                f"got {self.bins!r}"
            )
        range_ok = (
            isinstance(self.range, tuple | list)
            and len(self.range) == 2
            and all(_is_interval(pair) for pair in self.range)
        )
        if not range_ok:
            raise ValueError(
                "GradHist2d: range must be two (lo, hi) pairs with lo < hi, finite numbers, "
                f"((gradient lo, hi), (parameter lo, hi)); got {self.range!r}"
            )
        for (lo, hi), n in zip(self.range, self.bins, strict=True):
            check_bins_in_float32("GradHist2d: range", lo, hi, n)

    @property
    def per_sample(self) -> tuple[PerSample, ...]:  # type: ignore[override]
        bins = (int(self.bins[0]), int(self.bins[1]))
        ranges = tuple((float(lo), float(hi)) for lo, hi in self.range)
        fn = partial(_hist_2d, bins=bins, range=ranges)
        return (PerSample(f"grad_hist_2d[{bins},{ranges}]", fn, "sum"),)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[stats.Counts, PyTree]:
        return ctx.per_sample(self.per_sample[0]), state

    def axes(self) -> dict[str, list[float]]:
        """Bin centres of the gradient axis (rows) and the parameter axis (columns)."""
        (g_lo, g_hi), (p_lo, p_hi) = self.range
        return {
            "gradient": bin_centres(g_lo, g_hi, self.bins[0]),
            "parameter": bin_centres(p_lo, p_hi, self.bins[1]),
        }
