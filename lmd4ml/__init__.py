"""lmd4ml: Cockpit's training diagnostics for any JAX model, inside one compiled optax step."""

from lmd4ml import schedules, stats
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
from lmd4ml.telemetry.export import to_csv, to_json, to_tensorboard
from lmd4ml.telemetry.store import Run, RunStoreError, list_runs, load_run

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
    "Run",
    "RunStoreError",
    "StepContext",
    "StepState",
    "UpdateSize",
    "instrument",
    "list_runs",
    "load_run",
    "quantity",
    "schedules",
    "stats",
    "to_csv",
    "to_json",
    "to_tensorboard",
    "train",
]
