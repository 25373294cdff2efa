"""lmd4ml: Cockpit's training diagnostics for any JAX model, inside one compiled optax step."""

from lmd4ml import stats
from lmd4ml.learner import History, Learner, train
from lmd4ml.quantities import (
    Distance,
    GradHist1d,
    GradNorm,
    Loss,
    NormTest,
    Quantity,
    StepContext,
    UpdateSize,
    quantity,
)
from lmd4ml.stats import PerSample
from lmd4ml.step import InstrumentedStep, StepState, instrument

__version__ = "0.1.0"

__all__ = [
    "Distance",
    "GradHist1d",
    "GradNorm",
    "History",
    "InstrumentedStep",
    "Learner",
    "Loss",
    "NormTest",
    "PerSample",
    "Quantity",
    "StepContext",
    "StepState",
    "UpdateSize",
    "instrument",
    "quantity",
    "stats",
    "train",
]
