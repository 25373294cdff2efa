"""Writing runs (lmd4ml.telemetry.runs): the user's own values, hyperparameters, settings
described readably, sinks, from lm.train and lm.Recorder alike."""

from __future__ import annotations

import ast
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmd4ml as lm
from lmd4ml.telemetry.ring import RingReader
from lmd4ml.telemetry.writer import live_ring

DATA = [(jnp.linspace(-1, 1, 16).reshape(8, 2) * (i + 1), jnp.arange(8.0) / 8) for i in range(4)]
SCHEDULE = optax.linear_schedule(0.2, 0.02, transition_steps=6)


def loss_fn(w, batch):
    x, y = batch
    return (jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2


def params() -> dict:
    return {"a": jnp.full((2, 3), 0.5), "b": jnp.full(3, 0.1)}


def quantities() -> list[lm.Quantity]:
    return [lm.Loss(), lm.Distance(), lm.GradHist1d(nbins=4, maxval=0.5)]


def learner(optimizer: optax.GradientTransformation | None = None) -> lm.Learner:
    optimizer = optimizer or optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE)
    return lm.Learner(params(), loss_fn, DATA, optimizer, quantities())


def distance(learner: lm.Learner) -> dict[str, Any]:
    """What lm.Distance reads at the step whose parameters these are, and the step."""
    moved = jax.tree.map(jnp.subtract, learner.params, params())
    return {"dist": optax.tree.norm(moved), "seen": learner.steps_done}


class ListSink:
    """Keeps everything it is given, and the thread that gave it."""

    def __init__(self) -> None:
        self.started: tuple | None = None
        self.writes: list[tuple[int, float, dict]] = []
        self.closed: str | None = None
        self.threads: set[str] = set()

    def start(self, metadata, fields) -> None:
        self.started = (metadata, fields)
        self.threads.add(__import__("threading").current_thread().name)

    def write(self, step, wall_time, values) -> None:
        self.writes.append((step, wall_time, dict(values)))

    def close(self, status) -> None:
        self.closed = status

    def field(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [(step, values[name]) for step, _, values in self.writes if name in values]
        return np.array([s for s, _ in rows]), np.array([v for _, v in rows])


class BrokenSink(ListSink):
    """Fails at its third write."""

    def write(self, step, wall_time, values) -> None:
        if len(self.writes) == 2:
            raise OSError("the server went away")
        super().write(step, wall_time, values)


class LockedSink(ListSink):
    """Fails to start."""

    def start(self, metadata, fields) -> None:
        raise PermissionError("not logged in")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """One run of lm.train with all of it: eval_fn, a scheduled learning rate, config, sinks
    (one of which breaks), read back from its store."""
    runs = tmp_path_factory.mktemp("runs")
    sink, broken, it = ListSink(), BrokenSink(), learner()
    tensorboard = lm.TensorBoardSink(runs / "tb")
    before = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lm.train(
            it,
            epochs=2,
            track_every=lm.schedules.every(1),
            schedules={"grad_hist_1d": 3},
            runs_dir=runs,
            run_name="all",
            eval_fn=distance,
            config={"batch_size": 8, "decay": optax.cosine_decay_schedule(0.1, 100)},
            sinks=[sink, broken, tensorboard],
            progress=False,
        )
    after = time.time()
    return {
        "history": history,
        "learner": it,
        "run": lm.load_run(runs / "all"),
        "sink": sink,
        "broken": broken,
        "warnings": [str(w.message) for w in caught],
        "times": (before, after),
        "tensorboard": runs / "tb" / "all",
    }


# ------------------------------------------------------------------------ your own numbers


def test_eval_values_describe_the_parameters_of_their_step(trained):
    history = trained["history"]
    # By default at the first step and after each epoch, the last at the step after the last.
    np.testing.assert_array_equal(history.steps("dist"), [0, 4, 8])
    np.testing.assert_array_equal(history["seen"], [0, 4, 8])
    # eval_fn's distance at step t is lm.Distance's at step t: both read θₜ.
    np.testing.assert_allclose(history["dist"][:2], history["distance"][[0, 4]], rtol=1e-12)
    np.testing.assert_array_equal(history["step"], np.arange(8))  # the instruments' steps
    np.testing.assert_allclose(history["dist"][2], distance(trained["learner"])["dist"])


def test_the_store_holds_the_user_values_and_their_description(trained):
    history, run = trained["history"], trained["run"]
    for key in ("dist", "seen"):
        steps, values = run[key]
        np.testing.assert_array_equal(steps, history.steps(key))
        np.testing.assert_array_equal(values, history[key])
        assert run.metadata["quantities_by_key"][key] == {"class": None, "kind": "user"}
    np.testing.assert_array_equal(run.steps(), np.arange(9))  # step 8: the last eval alone
    assert run.metadata["keys"][-3:] == ["hyper/learning_rate", "dist", "seen"]
    assert run.metadata["total_steps"] == 8


def test_the_learning_rate_is_recorded_at_every_tracked_step(trained):
    history, run = trained["history"], trained["run"]
    steps = history.steps("hyper/learning_rate")
    np.testing.assert_array_equal(steps, np.arange(8))
    expected = np.asarray([SCHEDULE(t) for t in steps], np.float64)
    np.testing.assert_allclose(history["hyper/learning_rate"], expected, rtol=1e-6)
    np.testing.assert_array_equal(run["hyper/learning_rate"][1], history["hyper/learning_rate"])
    about = run.metadata["quantities_by_key"]["hyper/learning_rate"]
    assert about == {"class": None, "kind": "hyperparameter"}


def test_settings_are_recorded_readably(trained):
    meta = trained["run"].metadata
    config = meta["config"]
    assert config["batch_size"] == 8
    assert config["decay"] == {
        "function": "optax.cosine_decay_schedule",
        "alpha": 0.0,
        "decay_steps": 100,
        "exponent": 1.0,
        "init_value": 0.1,
    }
    assert config["track_every"] == {"function": "lmd4ml.schedules.every", "k": 1, "start": 0}
    assert config["schedules"] == {"grad_hist_1d": 3}
    assert config["eval_fn"] == "test_runs.distance" and config["eval_every"] is None
    optimizer = meta["optimizer"]
    assert optimizer["function"] == "optax.inject_hyperparams(optax.sgd)"
    assert optimizer["learning_rate"] == {  # optax.linear_schedule is a polynomial one
        "function": "optax.polynomial_schedule",
        "end_value": 0.02,
        "init_value": 0.2,
        "power": 1,
        "transition_begin": 0,
        "transition_steps": 6,
    }
    assert optimizer["momentum"] is None


def test_sinks_get_what_the_store_holds_from_the_writer_thread(trained):
    run, sink = trained["run"], trained["sink"]
    metadata, fields = sink.started
    assert metadata["name"] == "all" and metadata["run_dir"] == str(run.path)
    assert metadata["config"] == run.metadata["config"]
    assert metadata["quantities_by_key"] == run.metadata["quantities_by_key"]
    assert {name: shape for name, (shape, _) in fields.items()} == run.shapes
    for name in run.keys:
        steps, values = sink.field(name)
        stored_steps, stored = run[name]
        np.testing.assert_array_equal(steps, stored_steps, err_msg=name)
        np.testing.assert_array_equal(values, stored, err_msg=name)
        assert values.dtype == stored.dtype == fields[name][1], name
    assert [step for step, _, _ in sink.writes] == run.steps().tolist()
    times = [t for _, t, _ in sink.writes]
    before, after = trained["times"]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    assert sink.closed == "finished" and sink.threads == {"lmd4ml-telemetry"}


def test_a_failing_sink_warns_once_and_the_others_go_on(trained):
    failed = [m for m in trained["warnings"] if "the sink" in m]
    assert len(failed) == 1, trained["warnings"]
    assert "the sink BrokenSink failed at step 2" in failed[0] and "went away" in failed[0]
    broken = trained["broken"]
    assert [step for step, _, _ in broken.writes] == [0, 1] and broken.closed is None
    assert len(trained["sink"].writes) == 9 and trained["run"].metadata["status"] == "finished"


def test_sinks_without_a_run_directory_and_eval_every():
    sink, locked = ListSink(), LockedSink()
    with pytest.warns(RuntimeWarning, match="the sink LockedSink failed at the start .*logged"):
        history = lm.train(learner(optax.sgd(0.1)), epochs=2, runs_dir=None, run_name="mine",
                           eval_fn=distance, eval_every=3, sinks=[sink, locked],
                           progress=False)  # fmt: skip
    # Always at the first step, then at every third, and at the step after the last.
    np.testing.assert_array_equal(history.steps("seen"), [0, 3, 6])
    metadata, _ = sink.started
    assert metadata["name"] == "mine" and metadata["run_dir"] is None
    steps, values = sink.field("loss")
    np.testing.assert_array_equal(steps, history["step"])
    np.testing.assert_array_equal(values, history["loss"])
    np.testing.assert_array_equal(sink.field("seen")[1], [0, 3, 6])
    assert "hyper/learning_rate" not in history  # a plain optax.sgd has none
    assert locked.writes == [] and locked.closed is None


def test_the_live_ring_carries_the_user_values(tmp_path):
    seen = []

    def read_live(epoch, history):
        deadline = time.monotonic() + 10
        with RingReader(live_ring(tmp_path / "live")) as reader:
            while (batch := reader.read()).next < 4 * epoch:
                assert time.monotonic() < deadline, f"ring stuck at {batch.next} records"
                time.sleep(0.01)
        present = batch.present["seen"]
        seen.append((batch.steps[present].tolist(), batch.values["seen"][present].tolist()))

    lm.train(learner(), epochs=2, runs_dir=tmp_path, run_name="live", eval_fn=distance,
             on_epoch=read_live, progress=False)  # fmt: skip
    # The eval after an epoch goes with the next step's instruments, after the callback.
    assert seen == [([0], [0.0]), ([0, 4], [0.0, 4.0])]


def test_nonfinite_user_values_are_recorded_with_one_warning():
    def evaluate(learner):
        return {"val": np.nan if learner.steps_done >= 4 else 1.0}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lm.train(learner(), epochs=2, eval_fn=evaluate, runs_dir=None, progress=False)
    nonfinite = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite) == 1 and "step 4 in ['val']" in str(nonfinite[0].message)
    assert nonfinite[0].filename == __file__  # points at the caller of lm.train
    np.testing.assert_array_equal(history["val"], [1.0, np.nan, np.nan])


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        ({"loss": 1.0}, ValueError, "'loss' is the key of an instrument"),
        ({"step": 1.0}, ValueError, "'step' is the key of an instrument"),
        ({"hyper/lr": 1.0}, ValueError, "names the optimizer's hyperparameters"),
        ({"val acc": 1.0}, ValueError, "'val acc' is not a valid name"),
        ({3: 1.0}, TypeError, "names must be strings, got int 3"),
        ({"acc": True}, TypeError, r"\['acc'\] must be one real number .* got bool"),
        ({"acc": jnp.ones(2)}, TypeError, r"got ArrayImpl of shape \(2,\)"),
        ({"acc": 1 + 2j}, TypeError, "got complex"),
        ([0.5], TypeError, "eval_fn's result must be a mapping from name to number"),
    ],
)
def test_bad_user_values_are_named(returned, error, match):
    with pytest.raises(error, match=match):
        lm.train(learner(), eval_fn=lambda _: returned, runs_dir=None, progress=False)


def test_bad_arguments_are_named():
    it = learner()
    with pytest.raises(ValueError, match="eval_every says when to call eval_fn"):
        lm.train(it, eval_every=2, runs_dir=None)
    with pytest.raises(TypeError, match="eval_fn must be a function"):
        lm.train(it, eval_fn="accuracy", runs_dir=None)
    with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
        lm.train(it, eval_fn=distance, eval_every=0, runs_dir=None)
    with pytest.raises(ValueError, match=r"config names \['epochs'\], which lm.train records"):
        lm.train(it, config={"epochs": 3}, runs_dir=None)
    with pytest.raises(TypeError, match="config must be a mapping"):
        lm.train(it, config=[("lr", 0.1)], runs_dir=None)
    with pytest.raises(TypeError, match=r"sinks\[0\] is a str, which lacks start, write, close"):
        lm.train(it, sinks=["tensorboard"], runs_dir=None)
    assert it.steps_done == 0


def test_eval_fn_may_not_bring_new_keys_later():
    def evaluate(learner):
        return {"a": 1.0, **({"b": 2.0} if learner.steps_done else {})}

    with pytest.raises(ValueError, match=r"eval_fn returned \['b'\] at step 4.*returned \['a'\]"):
        lm.train(learner(), eval_fn=evaluate, runs_dir=None, progress=False)


# ------------------------------------------------------------------------------ the recorder


def plain_step(tx):
    @jax.jit
    def step(w, opt_state, batch):
        grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(w)
        updates, opt_state = tx.update(grads, opt_state, w, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(w, updates), opt_state

    return step


def test_recorder_records_extra_values_hyperparameters_and_sinks(tmp_path):
    tx = lm.monitor(optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE), quantities(),
                    every=2)  # fmt: skip
    step, w = plain_step(tx), params()
    opt_state, sink = tx.init(w), ListSink()
    config = {"optimizer": optax.adam(1e-3)}
    with lm.Recorder(tmp_path, "r", quantities=quantities(), config=config, sinks=[sink],
                     extra_keys=["late"], total_steps=6) as recorder:  # fmt: skip
        recorder.log(opt_state, extra={"val": jnp.float32(-1.0)})  # θ₀, before any update
        for t in range(6):
            w, opt_state = step(w, opt_state, DATA[t % 4])
            extra = {"val": float(t)} if t % 3 == 0 else {}
            recorder.log(opt_state, extra={**extra, **({"late": 7} if t == 5 else {})})
        with pytest.raises(ValueError, match=r"extra has \['new'\], which the run did not have"):
            recorder.log(opt_state, extra={"new": 1.0})
        with pytest.raises(ValueError, match="'loss' is the key of an instrument"):
            recorder.log(opt_state, extra={"loss": 1.0})
    run = lm.load_run(tmp_path / "r")
    # An extra value describes the parameters after the update logged: the next step's.
    assert run["val"][0].tolist() == [0, 1, 4] and run["val"][1].tolist() == [-1.0, 0.0, 3.0]
    assert run["late"][0].tolist() == [6] and run["late"][1].tolist() == [7.0]
    assert run["loss"][0].tolist() == [0, 2, 4]
    steps, rates = run["hyper/learning_rate"]
    np.testing.assert_array_equal(steps, [0, 2, 4])
    np.testing.assert_allclose(rates, [SCHEDULE(t) for t in steps], rtol=1e-6)
    meta = run.metadata
    assert meta["quantities_by_key"]["late"] == {"class": None, "kind": "user"}
    assert meta["config"]["optimizer"]["update_fns"][0]["function"] == "optax.scale_by_adam"
    assert meta["total_steps"] == 6 and recorder.dashboard_url is None
    assert [s for s, _, _ in sink.writes] == run.steps().tolist() == [0, 1, 2, 4, 6]
    np.testing.assert_array_equal(sink.field("val")[1], run["val"][1])
    assert sink.closed == "finished"


def test_recorder_extra_keys_may_not_be_instruments(tmp_path):
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    w, batch = params(), DATA[0]
    opt_state = tx.init(w)
    recorder = lm.Recorder(tmp_path, quantities=[lm.Loss()], extra_keys=["loss"])
    clash = pytest.raises(ValueError, match="extra_keys: 'loss' is the key of an instrument")
    with clash, recorder:
        _, opt_state = plain_step(tx)(w, opt_state, batch)
        recorder.log(opt_state)
        recorder.log(opt_state)  # records the first: the run opens
    with pytest.raises(TypeError, match="extra_keys must be a list of names"):
        lm.Recorder(tmp_path, extra_keys="val_acc")


def test_recorder_with_sinks_only():
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    step, w = plain_step(tx), params()
    opt_state, sink = tx.init(w), ListSink()
    with lm.Recorder(None, quantities=[lm.Loss()], sinks=[sink]) as recorder:
        for t in range(3):
            w, opt_state = step(w, opt_state, DATA[t])
            recorder.log(opt_state)
    assert recorder.run_dir is None and sink.started[0]["run_dir"] is None
    assert [s for s, _, _ in sink.writes] == [0, 1, 2] and sink.closed == "finished"


# ------------------------------------------------------------------------ a home of its own


def imported(module: str) -> set[str]:
    tree = ast.parse(Path(lm.__file__).with_name(module).read_text())
    return {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }


def test_the_loops_share_the_run_writing_and_neither_imports_the_other():
    assert "lmd4ml.monitoring" not in imported("learner.py")
    assert "lmd4ml.learner" not in imported("monitoring.py")
    assert "lmd4ml.telemetry.runs" in imported("learner.py") & imported("monitoring.py")


def test_a_live_tensorboard_sink_holds_what_the_store_holds(trained):
    """A real sink from lm.train: TensorBoard's own reader finds every step of the loss, the
    user's value and the learning rate, at the store's wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["tensorboard"]), size_guidance={"scalars": 0})
    events.Reload()
    run = trained["run"]
    clock = dict(zip(run.steps().tolist(), run.times().tolist(), strict=True))
    for key in ["loss", "dist", "hyper/learning_rate"]:
        steps, values = run[key]
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == steps.tolist()
        np.testing.assert_allclose([e.value for e in scalars], values, rtol=1e-6)
        np.testing.assert_allclose([e.wall_time for e in scalars], [clock[s] for s in steps])
