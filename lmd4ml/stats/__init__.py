"""Shared statistics that quantities build on, each computed once per step when needed.

- :mod:`~lmd4ml.stats.per_sample`: per-sample reductions in bounded chunks, directional
  derivatives ∇ℓᵢ · v.
- :mod:`~lmd4ml.stats.ghost`: per-sample gradients of dense parameters as factors (ghost norms).
- :mod:`~lmd4ml.stats.histogram`: exact histograms by scatter-add, in counts that cannot wrap.
- :mod:`~lmd4ml.stats.hessian`: Hessian-vector products, Hessian diagonal, top eigenvalue.
- :mod:`~lmd4ml.stats.sharding`: the per-sample pass on a batch split over devices.
- :mod:`~lmd4ml.stats.precision`: statistics in float32 or wider under mixed precision.
- :mod:`~lmd4ml.stats.jaxpr`: the one evaluator of a loss's jaxpr that the others share.
- :mod:`~lmd4ml.stats.randomness`: a loss's random draws, recorded and replayed per sample.
- :mod:`~lmd4ml.stats.coupling`: whether a loss's samples interact (BatchNorm in training).
"""

from lmd4ml.stats import coupling, hessian, jaxpr, precision, randomness, sharding
from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.ghost import factored_leaves
from lmd4ml.stats.histogram import Counts, bin_index, histogram, histogram2d, host_shapes, to_host
from lmd4ml.stats.per_sample import (
    SQ_GRADS,
    SQ_NORMS,
    PerSample,
    batch_size,
    chunk_size,
    directional,
    leading_size,
    per_sample_pass,
    sample_mean,
)
from lmd4ml.stats.precision import cast_like, wide_dtype, widen
from lmd4ml.stats.sharding import DataAxis, data_axis

__all__ = [
    "SQ_GRADS",
    "SQ_NORMS",
    "Counts",
    "DataAxis",
    "LossFn",
    "PerSample",
    "PyTree",
    "batch_size",
    "bin_index",
    "cast_like",
    "chunk_size",
    "coupling",
    "data_axis",
    "directional",
    "factored_leaves",
    "hessian",
    "histogram",
    "histogram2d",
    "host_shapes",
    "jaxpr",
    "leading_size",
    "per_sample_pass",
    "precision",
    "randomness",
    "sample_mean",
    "sharding",
    "to_host",
    "wide_dtype",
    "widen",
]
