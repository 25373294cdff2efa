"""Telemetry: writing runs, the live ring in shared memory, the durable run store, sinks,
export.

- :mod:`~lmd4ml.telemetry.runs`: what ``lm.train`` and ``lm.Recorder`` share to write a run.
- :mod:`~lmd4ml.telemetry.ring`: one writer, many readers, in shared memory (live).
- :mod:`~lmd4ml.telemetry.store`: every tracked step of a run in SQLite (durable).
- :mod:`~lmd4ml.telemetry.writer`: the background thread that feeds the ring, the store and
  the sinks.
- :mod:`~lmd4ml.telemetry.sinks`: TensorBoard, Weights & Biases and MLflow, live.
- :mod:`~lmd4ml.telemetry.export`: CSV, JSON, and a stored run through any sink (TensorBoard).
"""
