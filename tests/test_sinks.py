"""Live sinks called as the telemetry writer calls them (start, write, close), read back from
what each tool stores: W&B's offline run file, MLflow's SQLite tracking store. TensorBoard's
files are read back in test_export.py, through the export that replays a run into the sink."""

import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_telemetry import child_env

import lmd4ml as lm
from lmd4ml.telemetry import sinks
from lmd4ml.telemetry.sinks import MLflowSink, TensorBoardSink, WandbSink, plan

BINS = 600  # more than W&B's 512: summed two by two
METADATA = {
    "name": "live",
    "run_dir": "/runs/live",
    "config": {"lr": 0.1, "optimizer": {"name": "adam", "betas": [0.9, 0.999]}, "tag": "a b"},
    "keys": ["loss", "grad_norm", "grad_hist_1d", "grad_hist_2d"],
    "quantities_by_key": {
        "grad_hist_1d": {"class": "GradHist1d", "kind": "grad_hist_1d",
                         "args": {"nbins": BINS, "maxval": 0.5}},
        "grad_hist_2d": {"class": "GradHist2d", "kind": "grad_hist_2d",
                         "args": {"bins": [3, 4], "range": [[-1, 1], [-2, 2]]}},
        "val_acc": {"class": None, "kind": "user"},
        "hyper/learning_rate": {"class": None, "kind": "hyperparameter"},
    },
}  # fmt: skip
FIELDS = {
    "loss": ((), np.dtype(np.float32)),
    "grad_norm['b1']": ((), np.dtype(np.float32)),
    "grad_norm['conv 1']": ((), np.dtype(np.float32)),  # a space: MLflow's name keeps it
    "grad_hist_1d": ((BINS,), np.dtype(np.int64)),
    "grad_hist_2d": ((3, 4), np.dtype(np.int64)),
    "per_layer['w']": ((2,), np.dtype(np.float64)),
    "converged": ((), np.dtype(np.bool_)),
    "val_acc": ((), np.dtype(np.float64)),
    "hyper/learning_rate": ((), np.dtype(np.float64)),
}
STEPS = [0, 2, 4, 6]


def _values(step: int) -> dict[str, np.ndarray]:
    values = {
        "loss": np.float32(1 / (step + 1)),
        "grad_norm['b1']": np.float32(np.nan if step == 4 else step),
        "grad_norm['conv 1']": np.float32(-step),
        "grad_hist_1d": np.arange(BINS) * step,
        "grad_hist_2d": np.arange(12).reshape(3, 4) + step,
        "per_layer['w']": np.array([step, -step / 3]),
        "converged": np.bool_(step > 2),
        "hyper/learning_rate": np.float64(0.1 * 0.5**step),
    }
    if step % 4 == 0:  # a user value every other tracked step
        values["val_acc"] = np.float64(0.5 + step / 100)
    return values


def _time(step: int) -> float:
    return 1.7e9 + step * 1.25 + 0.123456


def _feed(sink, status: str = "finished", metadata=METADATA) -> None:
    sink.start(metadata, FIELDS)
    for step in STEPS:
        sink.write(step, _time(step), _values(step))
    sink.close(status)


# ----------------------------------------------------------------------------- the shared plan


def test_plan_tags_histograms_and_images():
    planned = {s.field: s for s in plan(METADATA, FIELDS)}
    assert planned["grad_norm['b1']"].tags == ("grad_norm/b1",)
    assert planned["per_layer['w']"].tags == ("per_layer/w/0", "per_layer/w/1")
    assert planned["hyper/learning_rate"].tags == ("hyper/learning_rate",)
    assert planned["val_acc"].kind == "scalars" and planned["converged"].kind == "scalars"
    assert planned["grad_hist_1d"].kind == "histogram"
    np.testing.assert_array_equal(planned["grad_hist_1d"].edges, np.linspace(-0.5, 0.5, BINS + 1))
    assert planned["grad_hist_2d"].kind == "image"


@pytest.mark.parametrize(
    "about",
    [
        {"kind": "grad_hist_1d", "args": {"nbins": 3, "maxval": 0.5}},  # another shape
        {"kind": "grad_hist_1d", "args": {"nbins": BINS, "maxval": -1}},
        {"kind": "grad_hist_1d", "args": {"nbins": BINS, "maxval": "0.5"}},
        {"kind": "grad_hist_1d", "args": "nbins"},
        {"kind": "quantity", "args": {"nbins": BINS, "maxval": 0.5}},
        "GradHist1d",
    ],
)
def test_a_histogram_only_as_its_metadata_describes_it(about):
    """Metadata from a file is not trusted: what does not describe these counts leaves them
    per-element scalars."""
    (entry,) = plan({"quantities_by_key": {"h": about}}, {"h": ((BINS,), np.int64)})
    assert entry.kind == "scalars" and len(entry.tags) == BINS and entry.tags[1] == "h/1"


def test_two_fields_under_one_name_are_reported():
    fields = {"hyper['lr']": ((), np.float32), "hyper/lr": ((), np.float32)}
    with pytest.raises(ValueError, match=r"and 'hyper/lr' would both be written as 'hyper/lr'"):
        plan({}, fields)
    # merged only by a tool's characters: reported all the same
    fields = {"x['a b']": ((), np.float32), "x['a_b']": ((), np.float32)}
    tensorboard = lambda name: sinks.clean_tag(name, sinks.TENSORBOARD_CHARACTERS)  # noqa: E731
    with pytest.raises(ValueError, match="would both be written as 'x/a_b'"):
        plan({}, fields, tensorboard)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "a\0", 3])
def test_a_run_name_must_be_a_plain_name(name, tmp_path):
    with pytest.raises(ValueError, match="not a plain directory name"):
        TensorBoardSink(tmp_path).start({"name": name}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_a_name_gets_a_directory_of_its_own(tmp_path):
    paths = []
    for _ in range(2):  # in the same second
        sink = TensorBoardSink(tmp_path)
        _feed(sink, metadata={**METADATA, "name": None})
        paths.append(sink.path)
    assert paths[0] != paths[1] and {p.parent for p in paths} == {tmp_path}
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", paths[0].name)


# ------------------------------------------------------------------------------------------ W&B


def _wandb_records(path) -> list:
    """Every record of a W&B run's ``.wandb`` file. wandb 0.2x+ keeps no Python reader of it
    (wandb-core writes it), so this reads its framing: a 7-byte header (":W&B", magic, version),
    then LevelDB's log format, 32 KiB blocks of chunks (CRC-32C, 2-byte length, type: 1 whole,
    2/3/4 first/middle/last part), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, parts, records = 7, [], []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            break
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def _wandb_run(directory):
    """(config, history rows, final summary, exit code) of the one offline run in
    ``directory``, from its ``.wandb`` file (wandb writes no files/wandb-summary.json
    offline). wandb-core writes the file's last block after ``finish`` returns: read once
    the exit record is there."""
    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while (records := _wandb_records(path))[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, "no exit record in the run's file after 30 s"
        time.sleep(0.05)
    config, rows, summary, exit_code = {}, [], {}, None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            rows.append({"/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item})  # fmt: skip
        elif kind == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                            for u in record.summary.update})  # fmt: skip
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return config, rows, summary, exit_code


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_wandb_offline_run_read_back(wandb_dir):
    import wandb

    sink = WandbSink(project="lmd4ml-tests", settings=wandb.Settings(console="off"))
    _feed(sink, "interrupted")
    config, rows, summary, exit_code = _wandb_run(wandb_dir)
    assert config["lr"] == 0.1 and config["optimizer"] == {"name": "adam", "betas": [0.9, 0.999]}
    assert config["lmd4ml"]["run_dir"] == "/runs/live" and config["lmd4ml"]["keys"][0] == "loss"
    assert [row["_step"] for row in rows] == STEPS
    assert [row["_timestamp"] for row in rows] == [_time(s) for s in STEPS]  # full precision
    for row, step in zip(rows, STEPS, strict=True):
        values = _values(step)
        assert row["loss"] == float(values["loss"])
        np.testing.assert_equal(row["grad_norm/b1"], np.nan if step == 4 else step)
        assert row["grad_norm/conv 1"] == -step
        assert [row["per_layer/w/0"], row["per_layer/w/1"]] == values["per_layer['w']"].tolist()
        assert row["converged"] == (step > 2) and row.get("val_acc") == values.get("val_acc")
        assert row["hyper/learning_rate"] == 0.1 * 0.5**step
        histogram = row["grad_hist_1d/values"], row["grad_hist_1d/bins"]
        assert histogram[0] == values["grad_hist_1d"].reshape(-1, 2).sum(1).tolist()
        np.testing.assert_allclose(histogram[1], np.linspace(-0.5, 0.5, BINS + 1)[::2])
        assert row["grad_hist_2d/_type"] == "image-file" and row["grad_hist_2d/width"] == 256
    assert summary["lmd4ml/status"] == "interrupted" and summary["loss"] == pytest.approx(1 / 7)
    assert exit_code == 1


def test_wandb_keys_of_its_own_are_refused(wandb_dir):
    with pytest.raises(ValueError, match=r"W&B keeps the keys \['_step'\]"):
        WandbSink().start({}, {"_step": ((), np.float32)})
    with pytest.raises(ValueError, match="config has a key 'lmd4ml'"):
        WandbSink().start({"config": {"lmd4ml": 1}}, {})
    assert not (wandb_dir / "wandb").exists()  # refused before a run was made


# --------------------------------------------------------------------------------------- MLflow


def test_mlflow_metrics_params_and_status(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sink = MLflowSink(tracking_uri=uri, experiment="lmd4ml-tests", flush_secs=3600)
    sink.start(METADATA, FIELDS)
    run_id, client = sink.run_id, MlflowClient(uri)

    def in_a_thread(*calls):  # as the telemetry writer calls, after start in the caller's
        writer = threading.Thread(target=lambda: [call() for call in calls])
        writer.start()
        writer.join()

    in_a_thread(*[lambda s=s: sink.write(s, _time(s), _values(s)) for s in STEPS])
    assert client.get_metric_history(run_id, "loss") == []  # batched: not sent yet
    in_a_thread(lambda: sink.close("failed"))
    run = client.get_run(run_id)
    assert run.info.run_name == "live" and run.info.status == "FAILED"
    assert run.data.tags["lmd4ml.run_dir"] == "/runs/live"
    assert run.data.tags["lmd4ml.status"] == "failed"
    assert run.data.params == {
        "lr": "0.1", "optimizer.name": "adam", "optimizer.betas": "[0.9, 0.999]", "tag": "a b"
    }  # fmt: skip
    assert sorted(run.data.metrics) == sorted(
        [
            "loss",
            "grad_norm/b1",
            "grad_norm/conv 1",
            "per_layer/w/0",
            "per_layer/w/1",
            "converged",
            "val_acc",
            "hyper/learning_rate",
        ]
    )  # fmt: skip  (histograms are left out)
    for name, field, index in [("loss", "loss", ()), ("per_layer/w/1", "per_layer['w']", (1,)),
                               ("grad_norm/b1", "grad_norm['b1']", ()),
                               ("converged", "converged", ())]:  # fmt: skip
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == STEPS
        assert [m.timestamp for m in history] == [round(_time(s) * 1000) for s in STEPS]
        expected = [float(_values(s)[field][index]) for s in STEPS]
        np.testing.assert_array_equal([m.value for m in history], expected)  # NaN included
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 4]

    # a second run, kept in no store, joins the same experiment
    second = MLflowSink(tracking_uri=uri, experiment="lmd4ml-tests")
    second.start({**METADATA, "name": None, "run_dir": None}, FIELDS)
    second_id = second.run_id
    second.close("finished")
    (experiment,) = [e for e in client.search_experiments() if e.name == "lmd4ml-tests"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    (finished,) = [r for r in runs if r.info.run_id == second_id]
    assert finished.info.status == "FINISHED" and "lmd4ml.run_dir" not in finished.data.tags


# ------------------------------------------------------------------------- packages and imports


@pytest.mark.parametrize(
    ("sink", "module", "extra"),
    [
        (TensorBoardSink("unused"), "tensorboardX", "tensorboard"),
        (WandbSink(), "wandb", "wandb"),
        (MLflowSink(), "mlflow", "mlflow"),
    ],
)
def test_a_missing_package_names_its_extra(sink, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(
        ImportError, match=rf'needs the {module} package: pip install "lmd4ml\[{extra}\]"'
    ):
        sink.start({"name": "r"}, {"loss": ((), np.float32)})


def test_importing_lmd4ml_imports_none_of_the_tools():
    code = (
        "import sys, lmd4ml, lmd4ml.telemetry.sinks, lmd4ml.telemetry.export\n"
        "print([m for m in ('tensorboardX', 'tensorboard', 'wandb', 'mlflow', 'PIL')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=child_env())  # fmt: skip
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------ the store's clock


def test_a_trained_run_keeps_the_time_of_each_step(tmp_path):
    learner = lm.Learner(jnp.zeros(2), lambda w, b: (b @ w - 1.0) ** 2, [jnp.ones((4, 2))] * 3,
                         optax.sgd(0.1), [lm.Loss()])  # fmt: skip
    before = time.time()
    lm.train(learner, epochs=2, runs_dir=tmp_path, run_name="clocked", progress=False)
    times = lm.load_run(tmp_path / "clocked").times()
    assert times.shape == (6,) and np.all(np.diff(times) >= 0)
    assert before <= times[0] and times[-1] <= time.time()
    assert os.path.isdir(tmp_path / "clocked")
