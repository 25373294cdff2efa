"""Exports read back: CSV with the csv module, JSON with json, events with TensorBoard."""

import csv
import json

import numpy as np
import pytest

from lmd4ml.telemetry.export import to_csv, to_json, to_tensorboard
from lmd4ml.telemetry.store import Run, RunWriter, load_run

FIELDS = {
    "loss": ((), np.float32),
    "norm_test": ((), np.float64),
    "nan_seen": ((), np.bool_),
    "grad_hist_1d": ((5,), np.int32),
    "per_layer/['w']": ((2, 2), np.float32),
}
N_STEPS = 200  # steps past 127 take two bytes as varints


def _values(step: int) -> dict[str, np.ndarray]:
    values = {
        "loss": np.float32(1.0 / (step + 1)),
        "norm_test": np.nan if step == 3 else -step * 0.1,
        "nan_seen": step == 3,
        "per_layer/['w']": np.float32([[0.1, -2], [step, 3e-8]]),
    }
    if step % 2 == 0:
        values["grad_hist_1d"] = np.arange(5, dtype=np.int32) * step
    return values


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    path = tmp_path_factory.mktemp("run")
    with RunWriter(path, {"config": {"lr": 0.1}}, FIELDS) as writer:
        for step in range(N_STEPS):
            writer.append(step, _values(step))
    return load_run(path)


def test_csv(run, tmp_path):
    to_csv(run, tmp_path / "run.csv")
    with open(tmp_path / "run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "step",
        "loss",
        "norm_test",
        "nan_seen",
        *[f"grad_hist_1d[{i}]" for i in range(5)],
        *[f"per_layer/['w'][{i},{j}]" for i in range(2) for j in range(2)],
    ]
    assert [int(row["step"]) for row in rows] == list(range(N_STEPS))
    for key in ["loss", "norm_test", "nan_seen"]:
        dtype = FIELDS[key][1]
        column = np.array([float(row[key]) for row in rows]).astype(dtype)
        np.testing.assert_array_equal(column, run[key][1])  # exact, NaN included
    assert rows[1]["grad_hist_1d[0]"] == ""  # not tracked at odd steps
    hist = [[int(row[f"grad_hist_1d[{i}]"]) for i in range(5)] for row in rows[::2]]
    np.testing.assert_array_equal(hist, run["grad_hist_1d"][1])
    w = [
        [float(row[f"per_layer/['w'][{i},{j}]"]) for i in range(2) for j in range(2)]
        for row in rows
    ]
    np.testing.assert_array_equal(np.float32(w).reshape(-1, 2, 2), run["per_layer/['w']"][1])
    assert rows[0]["per_layer/['w'][0,0]"] == "0.1"  # float32's shortest text, not 0.100000001


def test_json(run, tmp_path):
    to_json(run, tmp_path / "run.json")
    with open(tmp_path / "run.json") as f:
        document = json.load(f)
    assert document["metadata"] == run.metadata
    assert list(document["fields"]) == run.keys
    for key, (shape, dtype) in FIELDS.items():
        field = document["fields"][key]
        steps, values = run[key]
        assert field["shape"] == list(shape) and np.dtype(field["dtype"]) == dtype
        assert field["steps"] == steps.tolist()
        np.testing.assert_array_equal(np.array(field["values"], dtype), values)


def _accumulate(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard(run, tmp_path):
    path = to_tensorboard(run, tmp_path / "tb")
    assert path.parent == tmp_path / "tb" and "tfevents" in path.name
    events = _accumulate(tmp_path / "tb")
    tags = events.Tags()
    assert sorted(tags["scalars"]) == sorted(
        ["loss", "norm_test", "nan_seen"]
        + [f"per_layer/['w'][{i},{j}]" for i in (0, 1) for j in (0, 1)]
    )
    assert tags["histograms"] == ["grad_hist_1d"]

    for key in ["loss", "norm_test", "nan_seen"]:
        steps, values = run[key]
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == steps.tolist()
        np.testing.assert_array_equal([s.value for s in scalars], values.astype(np.float32))
        assert {s.wall_time for s in scalars} == {run.metadata["start_time"]}
    assert [s.value for s in events.Scalars("per_layer/['w'][1,0]")] == list(range(N_STEPS))

    steps, counts = run["grad_hist_1d"]
    histograms = events.Histograms("grad_hist_1d")
    assert [h.step for h in histograms] == steps.tolist()
    for h, row in zip(histograms, counts, strict=True):
        value = h.histogram_value
        np.testing.assert_array_equal(value.bucket, row)
        assert value.bucket_limit == [1, 2, 3, 4, 5] and value.num == row.sum()
        assert value.sum == pytest.approx(row @ (np.arange(5) + 0.5))
    assert (histograms[2].histogram_value.min, histograms[2].histogram_value.max) == (1, 5)


def test_tensorboard_bin_edges(run, tmp_path):
    edges = np.linspace(-0.05, 0.05, 6)
    to_tensorboard(run, tmp_path, bin_edges={"grad_hist_1d": edges})
    to_tensorboard(run, tmp_path, bin_edges={"grad_hist_1d": edges})  # replaces, not appends
    histograms = _accumulate(tmp_path).Histograms("grad_hist_1d")
    assert len(histograms) == N_STEPS // 2
    np.testing.assert_allclose(histograms[1].histogram_value.bucket_limit, edges[1:])
    assert histograms[1].histogram_value.min == pytest.approx(-0.03)  # bin 0 is empty
    with pytest.raises(ValueError, match="has 5 bins but"):
        to_tensorboard(run, tmp_path, bin_edges={"grad_hist_1d": edges[1:]})
    with pytest.raises(ValueError, match=r"bin_edges for \['loss'\], not histogram"):
        to_tensorboard(run, tmp_path, bin_edges={"loss": edges})
