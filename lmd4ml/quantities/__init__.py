"""Quantities: pure functions of the step context, one module per family."""

from lmd4ml.quantities.base import Quantity, Report, StepContext, quantity
from lmd4ml.quantities.curvature import HessTrace, TICDiag, TICTrace
from lmd4ml.quantities.eigenvalue import HessMaxEV
from lmd4ml.quantities.gradient_tests import InnerTest, NormTest, OrthoTest
from lmd4ml.quantities.histograms import GradHist1d, GradHist2d
from lmd4ml.quantities.noise import CABS, EarlyStopping, MeanGSNR, NoiseScale
from lmd4ml.quantities.scalars import Distance, GradNorm, Loss, UpdateSize
from lmd4ml.quantities.step_length import Alpha

__all__ = [
    "CABS",
    "Alpha",
    "Distance",
    "EarlyStopping",
    "GradHist1d",
    "GradHist2d",
    "GradNorm",
    "HessMaxEV",
    "HessTrace",
    "InnerTest",
    "Loss",
    "MeanGSNR",
    "NoiseScale",
    "NormTest",
    "OrthoTest",
    "Quantity",
    "Report",
    "StepContext",
    "TICDiag",
    "TICTrace",
    "UpdateSize",
    "quantity",
]
