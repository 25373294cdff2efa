"""Shared statistics that quantities build on, each computed once per step when needed.

- :mod:`~lmd4ml.stats.per_sample`: per-sample reductions in bounded chunks, projections.
- :mod:`~lmd4ml.stats.ghost`: per-sample gradients of dense parameters as factors (ghost norms).
- :mod:`~lmd4ml.stats.histogram`: exact histograms by scatter-add.
- :mod:`~lmd4ml.stats.hessian`: Hessian-vector products, Hessian diagonal, top eigenvalue.
- :mod:`~lmd4ml.stats.sharding`: the per-sample pass on a batch split over devices.
"""

from lmd4ml.stats import hessian, sharding
from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.ghost import factored_leaves
from lmd4ml.stats.histogram import bin_index, histogram, histogram2d
from lmd4ml.stats.per_sample import (
    SQ_GRADS,
    SQ_NORMS,
    PerSample,
    batch_size,
    chunk_size,
    per_sample_pass,
    projections,
)
from lmd4ml.stats.sharding import DataAxis, data_axis

__all__ = [
    "SQ_GRADS",
    "SQ_NORMS",
    "DataAxis",
    "LossFn",
    "PerSample",
    "PyTree",
    "batch_size",
    "bin_index",
    "chunk_size",
    "data_axis",
    "factored_leaves",
    "hessian",
    "histogram",
    "histogram2d",
    "per_sample_pass",
    "projections",
    "sharding",
]
