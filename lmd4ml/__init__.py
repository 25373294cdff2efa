"""lmd4ml: Cockpit's training diagnostics for any JAX model, inside one compiled optax step."""

from lmd4ml import presets, schedules, stats
from lmd4ml.dashboard.plot import plot
from lmd4ml.diagnosis import Diagnosis, Finding, Thresholds, diagnose
from lmd4ml.learner import History, Learner, train
from lmd4ml.monitoring import Recorder, metrics, monitor
from lmd4ml.quantities import (
    CABS,
    Alpha,
    Distance,
    EarlyStopping,
    GradHist1d,
    GradHist2d,
    GradNorm,
    HessMaxEV,
    HessTrace,
    InnerTest,
    Loss,
    MeanGSNR,
    NoiseScale,
    NormTest,
    OrthoTest,
    Quantity,
    StepContext,
    TICDiag,
    TICTrace,
    UpdateSize,
    quantity,
)
from lmd4ml.stats import PerSample
from lmd4ml.step import InstrumentedStep, StepState, instrument
from lmd4ml.supervised import Supervised, supervised
from lmd4ml.telemetry.export import replay, to_csv, to_json, to_tensorboard
from lmd4ml.telemetry.sinks import MLflowSink, TensorBoardSink, WandbSink
from lmd4ml.telemetry.store import Run, RunStoreError, list_runs, load_run

__version__ = "0.1.0"

__all__ = [
    "CABS",
    "Alpha",
    "Diagnosis",
    "Distance",
    "EarlyStopping",
    "Finding",
    "GradHist1d",
    "GradHist2d",
    "GradNorm",
    "HessMaxEV",
    "HessTrace",
    "History",
    "InnerTest",
    "InstrumentedStep",
    "Learner",
    "Loss",
    "MLflowSink",
    "MeanGSNR",
    "NoiseScale",
    "NormTest",
    "OrthoTest",
    "PerSample",
    "Quantity",
    "Recorder",
    "Run",
    "RunStoreError",
    "StepContext",
    "StepState",
    "Supervised",
    "TICDiag",
    "TICTrace",
    "TensorBoardSink",
    "Thresholds",
    "UpdateSize",
    "WandbSink",
    "diagnose",
    "instrument",
    "list_runs",
    "load_run",
    "metrics",
    "monitor",
    "plot",
    "presets",
    "quantity",
    "replay",
    "schedules",
    "stats",
    "supervised",
    "to_csv",
    "to_json",
    "to_tensorboard",
    "train",
]
