"""Exports read back: long CSV with the csv module, JSON with json, TensorBoard event files
with TensorBoard's own EventAccumulator (values, steps, wall times, bin edges, images)."""

import csv
import io
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lmd4ml as lm
from lmd4ml.telemetry.export import replay, to_csv, to_json, to_tensorboard
from lmd4ml.telemetry.sinks import heatmap
from lmd4ml.telemetry.store import Run, RunWriter, load_run

FIELDS = {
    "loss": ((), np.float32),
    "norm_test": ((), np.float64),
    "nan_seen": ((), np.bool_),
    "grad_hist_1d": ((5,), np.int64),
    "grad_hist_2d": ((3, 4), np.int64),
    "per_layer['w']": ((2, 2), np.float32),
    "hyper/learning_rate": ((), np.float64),
}
METADATA = {
    "config": {"lr": 0.1},
    "quantities_by_key": {
        "grad_hist_1d": {"class": "GradHist1d", "kind": "grad_hist_1d",
                         "args": {"nbins": 5, "maxval": 0.05}},
        "grad_hist_2d": {"class": "GradHist2d", "kind": "grad_hist_2d",
                         "args": {"bins": [3, 4], "range": [[-1, 1], [-2, 2]]}},
        "hyper/learning_rate": {"class": None, "kind": "hyperparameter"},
    },
}  # fmt: skip
N_STEPS = 200
START = 1.7e9


def _values(step: int) -> dict[str, np.ndarray]:
    values = {
        "loss": np.float32(1.0 / (step + 1)),
        "norm_test": np.nan if step == 3 else -step * 0.1,
        "nan_seen": step == 3,
        "per_layer['w']": np.float32([[0.1, -2], [step, 3e-8]]),
        "hyper/learning_rate": 0.1 * 0.99**step,
    }
    if step % 2 == 0:
        values["grad_hist_1d"] = np.arange(5) * step
    if step % 50 == 0:
        values["grad_hist_2d"] = np.arange(12).reshape(3, 4) * step
    return values


def _time(step: int) -> float:
    return START + 0.37 * step  # not the store's start time: the export must read the clock


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    path = tmp_path_factory.mktemp("runs") / "exported"
    with RunWriter(path, METADATA, FIELDS) as writer:
        for step in range(N_STEPS):
            writer.append(step, _values(step), wall_time=_time(step))
    return load_run(path)


def test_csv_is_long(run, tmp_path):
    to_csv(run, tmp_path / "run.csv")
    with open(tmp_path / "run.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "key", "value"]
    step_0 = [key for step, key, _ in rows[1:] if step == "0"]
    assert step_0 == [
        "loss", "norm_test", "nan_seen", *[f"grad_hist_1d[{i}]" for i in range(5)],
        *[f"grad_hist_2d[{i},{j}]" for i in range(3) for j in range(4)],
        *[f"per_layer['w'][{i},{j}]" for i in range(2) for j in range(2)],
        "hyper/learning_rate",
    ]  # fmt: skip
    assert [int(step) for step, _, _ in rows[1:]] == sorted(int(s) for s, _, _ in rows[1:])
    cells = {(int(step), key): value for step, key, value in rows[1:]}
    assert len(cells) == len(rows) - 1
    for key in ["loss", "norm_test", "nan_seen", "hyper/learning_rate"]:
        dtype = FIELDS[key][1]
        column = np.array([float(cells[s, key]) for s in range(N_STEPS)]).astype(dtype)
        np.testing.assert_array_equal(column, run[key][1])  # exact, NaN included
    assert (1, "grad_hist_1d[0]") not in cells  # not tracked at odd steps
    hist = [[int(cells[s, f"grad_hist_1d[{i}]"]) for i in range(5)] for s in range(0, N_STEPS, 2)]
    np.testing.assert_array_equal(hist, run["grad_hist_1d"][1])
    assert cells[0, "per_layer['w'][0,0]"] == "0.1"  # float32's shortest text, not 0.100000001
    assert cells[7, "per_layer['w'][1,0]"] == "7.0" and cells[3, "nan_seen"] == "1"


def test_json(run, tmp_path):
    to_json(run, tmp_path / "run.json")
    with open(tmp_path / "run.json") as f:
        document = json.load(f)
    assert document["metadata"] == run.metadata
    assert document["steps"] == list(range(N_STEPS))
    assert document["times"] == [_time(s) for s in range(N_STEPS)]
    assert list(document["fields"]) == run.keys
    for key, (shape, dtype) in FIELDS.items():
        field = document["fields"][key]
        steps, values = run[key]
        assert field["shape"] == list(shape) and np.dtype(field["dtype"]) == dtype
        assert field["steps"] == steps.tolist()
        np.testing.assert_array_equal(np.array(field["values"], dtype), values)


@pytest.fixture(scope="module")
def events(run, tmp_path_factory) -> EventAccumulator:
    logdir = tmp_path_factory.mktemp("tb")
    path = to_tensorboard(run, logdir)
    assert path == logdir / "exported"  # one directory per run, named after it
    (event_file,) = path.iterdir()
    assert event_file.name.startswith("events.out.tfevents.")
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0,
                                                             "images": 0})  # fmt: skip
    accumulator.Reload()
    return accumulator


def test_tensorboard_scalars_grouped_at_their_wall_times(run, events):
    tags = events.Tags()
    assert sorted(tags["scalars"]) == sorted(
        ["loss", "norm_test", "nan_seen", "hyper/learning_rate"]
        + [f"per_layer/w/{i}_{j}" for i in (0, 1) for j in (0, 1)]
    )
    for key in ["loss", "norm_test", "nan_seen", "hyper/learning_rate"]:
        steps, values = run[key]
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == steps.tolist()
        np.testing.assert_array_equal([s.value for s in scalars], values.astype(np.float32))
        assert [s.wall_time for s in scalars] == [_time(s) for s in steps.tolist()]
    assert [s.value for s in events.Scalars("per_layer/w/1_0")] == list(range(N_STEPS))


def test_tensorboard_histograms_have_their_real_edges(run, events):
    assert events.Tags()["histograms"] == ["grad_hist_1d"]
    edges = np.linspace(-0.05, 0.05, 6)
    steps, counts = run["grad_hist_1d"]
    histograms = events.Histograms("grad_hist_1d")
    assert [h.step for h in histograms] == steps.tolist()
    assert [h.wall_time for h in histograms] == [_time(s) for s in steps.tolist()]
    for h, row in zip(histograms, counts, strict=True):
        value = h.histogram_value
        np.testing.assert_array_equal(value.bucket, row)
        np.testing.assert_allclose(value.bucket_limit, edges[1:])
        assert value.num == row.sum()
        assert value.sum == pytest.approx(row @ (edges[:-1] + edges[1:]) / 2)
    # bin 0 is empty from step 2 on: the lower end is the first non-empty bin's edge
    assert (histograms[1].histogram_value.min, histograms[1].histogram_value.max) == (
        pytest.approx(-0.03),
        pytest.approx(0.05),
    )


def test_tensorboard_2d_histograms_are_images(run, events):
    from PIL import Image

    assert events.Tags()["images"] == ["grad_hist_2d"]
    steps, counts = run["grad_hist_2d"]
    images = events.Images("grad_hist_2d")
    assert [i.step for i in images] == steps.tolist() == [0, 50, 100, 150]
    for image, row in zip(images, counts, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
        np.testing.assert_array_equal(pixels, heatmap(row))
    assert images[1].width == 256 and images[1].height == 192  # bins as squares, 4 x 3


def test_tensorboard_refuses_to_mix_two_exports(run, tmp_path):
    to_tensorboard(run, tmp_path)
    with pytest.raises(FileExistsError, match="already holds TensorBoard event files"):
        to_tensorboard(run, tmp_path)


def test_replay_sends_every_step_at_its_wall_time(run, tmp_path):
    """Each step with the fields tracked there, at its time; a run of the store's first
    format kept no clock: every step at the run's start."""

    class Recording:
        def start(self, metadata, fields):
            self.metadata, self.fields, self.rows = metadata, fields, []

        def write(self, step, wall_time, values):
            self.rows.append((step, wall_time, sorted(values)))

        def close(self, status):
            self.status = status

    sink = Recording()
    replay(run, sink)
    assert sink.metadata["name"] == "exported" and sink.metadata["run_dir"] == str(run.path)
    assert sink.fields["grad_hist_2d"] == ((3, 4), np.dtype(np.int64))
    assert [r[:2] for r in sink.rows] == [(s, _time(s)) for s in range(N_STEPS)]
    assert sink.rows[1][2] == sorted(_values(1)) and sink.status == "finished"

    from test_store import _as_version_1  # a version-1 file, built as the store's test does

    with RunWriter(tmp_path / "old", {}, {"x": ((), "int64")}) as writer:
        for step in range(3):
            writer.append(step, {"x": step}, wall_time=START + step)
    _as_version_1(tmp_path / "old" / "run.sqlite")
    old = lm.load_run(tmp_path / "old")
    replay(old, sink)
    assert [r[1] for r in sink.rows] == [old.metadata["start_time"]] * 3


def test_a_failing_sink_is_closed_as_failed(run):
    class Failing:
        closed = None

        def start(self, metadata, fields):
            pass

        def write(self, step, wall_time, values):
            if step == 5:
                raise OSError("no room")

        def close(self, status):
            self.closed = status

    sink = Failing()
    with pytest.raises(OSError, match="no room"):
        replay(run, sink)
    assert sink.closed == "failed"
