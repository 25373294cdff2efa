"""Quantities: pure functions of the step context, one module per family."""

from lmd4ml.quantities.base import Quantity, StepContext, quantity
from lmd4ml.quantities.gradient_tests import NormTest
from lmd4ml.quantities.histograms import GradHist1d
from lmd4ml.quantities.scalars import Distance, GradNorm, Loss, UpdateSize

__all__ = [
    "Distance",
    "GradHist1d",
    "GradNorm",
    "Loss",
    "NormTest",
    "Quantity",
    "StepContext",
    "UpdateSize",
    "quantity",
]
