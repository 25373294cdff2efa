"""Telemetry end to end: what lm.train writes, and what survives a failure, a full disk, a
store deleted under it, SIGTERM, Ctrl-C or a kill."""

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_store import disk_full_after

import lmd4ml as lm
from lmd4ml.telemetry import store as run_store
from lmd4ml.telemetry import writer
from lmd4ml.telemetry.ring import RingReader, RingWriter, ring_name
from lmd4ml.telemetry.writer import Telemetry, live_ring

DATA = [(jnp.linspace(-1, 1, 16).reshape(8, 2) * (i + 1), jnp.arange(8.0) / 8) for i in range(4)]


def loss_fn(w, batch):
    x, y = batch
    return (jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2


def per_layer(ctx):
    return {"a": optax.tree.norm(ctx.grads["a"]), "b": optax.tree.norm(ctx.grads["b"])}


def learner() -> lm.Learner:
    params = {"a": jnp.full((2, 3), 0.5), "b": jnp.full(3, 0.1)}
    quantities = [
        lm.Loss(),
        lm.GradNorm(),
        lm.NormTest(),
        lm.GradHist1d(nbins=8, maxval=0.5),
        lm.quantity("per_layer", per_layer),
    ]
    return lm.Learner(params, loss_fn, DATA, optax.adam(0.05), quantities)


def shm_left(name: str) -> bool:
    return Path("/dev/shm", name).exists()


def child_env() -> dict[str, str]:
    """The environment for a child process that imports the lmd4ml under test, wherever the
    working directory is (an installed lmd4ml may be another checkout)."""
    paths = [str(Path(lm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_train_writes_a_run_equal_to_its_history(tmp_path):
    history = lm.train(
        learner(), epochs=3, track_every=2, runs_dir=tmp_path, run_name="r1", progress=False
    )
    run = lm.load_run(tmp_path / "r1")
    for key in ("loss", "grad_norm", "norm_test", "grad_hist_1d"):
        steps, values = run[key]
        np.testing.assert_array_equal(steps, history["step"])
        np.testing.assert_array_equal(values, history[key])
    steps, values = run["per_layer['a']"]
    np.testing.assert_array_equal(values, history["per_layer"]["a"])
    assert run.metadata["status"] == "finished"
    assert run.metadata["keys"] == ["loss", "grad_norm", "norm_test", "grad_hist_1d", "per_layer"]
    assert run.metadata["model"]["n_params"] == 9
    assert run.metadata["config"]["track_every"] == 2
    assert "jax" in run.metadata["versions"]
    assert not (tmp_path / "r1" / "live.json").exists()
    assert [r["name"] for r in lm.list_runs(tmp_path)] == ["r1"]


def test_each_call_is_a_run_and_none_writes_nothing(tmp_path):
    it = learner()
    lm.train(it, epochs=1, runs_dir=tmp_path / "runs", progress=False)
    lm.train(it, epochs=1, runs_dir=tmp_path / "runs", progress=False)
    lm.train(it, epochs=1, runs_dir=None, progress=False)
    runs = lm.list_runs(tmp_path / "runs")
    assert len(runs) == 2
    assert lm.load_run(runs[1]["path"])["loss"][0].tolist() == [4, 5, 6, 7]


def test_a_reader_follows_the_run_live(tmp_path):
    seen = []

    def read_live(epoch, history):
        # The writer thread publishes a moment after the step: wait for it, as a dashboard would.
        deadline = time.monotonic() + 10
        with RingReader(live_ring(tmp_path / "live")) as reader:
            while (batch := reader.read()).next < len(history["step"]):
                assert time.monotonic() < deadline, f"ring stuck at {batch.next} records"
                time.sleep(0.01)
        np.testing.assert_array_equal(batch.steps, history["step"])
        np.testing.assert_array_equal(batch.values["grad_hist_1d"], history["grad_hist_1d"])
        np.testing.assert_array_equal(batch.values["per_layer['b']"], history["per_layer"]["b"])
        seen.append(len(batch.steps))

    lm.train(learner(), epochs=2, runs_dir=tmp_path, run_name="live", on_epoch=read_live,
             progress=False)  # fmt: skip
    assert seen == [4, 8]
    assert live_ring(tmp_path / "live") is None


def test_runs_of_one_name_in_two_directories_each_get_a_ring(tmp_path):
    """Shared memory is one namespace for the machine: the ring's name comes from the run
    directory's full path, not from the run's name alone."""
    shapes = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}
    first = Telemetry(tmp_path / "a" / "run", {}, shapes)
    second = Telemetry(tmp_path / "b" / "run", {}, shapes)
    try:
        rings = [live_ring(tmp_path / d / "run") for d in ("a", "b")]
        assert None not in rings and rings[0] != rings[1], rings
    finally:
        first.close()
        second.close()


class SlowSink:
    """A sink far slower than training: each step takes it 20 ms."""

    def __init__(self):
        self.steps = []

    def start(self, metadata, fields):
        pass

    def write(self, step, wall_time, values):
        time.sleep(0.02)
        self.steps.append(step)

    def close(self, status):
        pass


def test_a_slow_sink_holds_training_back_rather_than_queue_without_bound(tmp_path):
    shapes = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}
    sink = SlowSink()
    telemetry = Telemetry(tmp_path / "slow", {}, shapes, sinks=[sink], max_queued=3)
    queued = []
    for step in range(15):
        telemetry.submit(step, {"loss": np.float32(step)})
        queued.append(telemetry._queue.qsize())
    telemetry.close()
    assert max(queued) <= 3, queued
    assert sink.steps == list(range(15))  # nothing dropped
    np.testing.assert_array_equal(lm.load_run(tmp_path / "slow")["loss"][0], np.arange(15))
    with pytest.raises(ValueError, match="max_queued"):
        Telemetry(tmp_path / "bad", {}, shapes, max_queued=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stopped_writer_drops_steps_with_one_warning_and_never_hangs(tmp_path, monkeypatch):
    def broken(self, step, metrics, wall_time):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(Telemetry, "_write", broken)
    shapes = {"loss": jax.ShapeDtypeStruct((), jnp.float32)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        telemetry = Telemetry(tmp_path / "dead", {}, shapes, max_queued=2)
        start = time.monotonic()
        for step in range(10):
            telemetry.submit(step, {"loss": np.float32(step)})
        telemetry.close()
    assert time.monotonic() - start < 30
    said = [str(w.message) for w in caught if "writer of the run" in str(w.message)]
    assert len(said) == 1 and "training goes on" in said[0], said


def test_a_ring_that_cannot_be_made_costs_the_live_view_only(tmp_path):
    taken = ring_name("taken", str((tmp_path / "taken").resolve()))
    with (
        RingWriter(taken, {"x": ((), np.float32)}),
        pytest.warns(RuntimeWarning, match="live ring failed at the start"),
    ):
        history = lm.train(learner(), runs_dir=tmp_path, run_name="taken", progress=False)
    np.testing.assert_array_equal(lm.load_run(tmp_path / "taken")["loss"][1], history["loss"])


def test_a_failing_sink_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(self, step, values, wall_time=None):
        raise OSError("disk full")

    monkeypatch.setattr(run_store.RunWriter, "append", broken)
    it = learner()
    with pytest.warns(RuntimeWarning, match="run store failed at step 0.*disk full") as caught:
        history = lm.train(it, epochs=2, runs_dir=tmp_path, progress=False)
    assert len([w for w in caught if "telemetry" in str(w.message)]) == 1
    assert history["step"].tolist() == list(range(8))


KILLED = textwrap.dedent(
    """
    import sys, jax.numpy as jnp, optax, lmd4ml as lm
    data = [(jnp.ones((8, 2)) * (i + 1) / 4, jnp.zeros(8)) for i in range(4)]
    learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1] - 1) ** 2, data,
                         optax.sgd(0.01), [lm.Loss(), lm.NormTest()])
    lm.train(learner, epochs=10**6, runs_dir=sys.argv[1], run_name="killed", progress=False)
    """
)


def test_sigkill_keeps_the_run_and_leaves_no_shared_memory(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], env=child_env())
    live = tmp_path / "killed" / "live.json"
    try:
        deadline = time.monotonic() + 60
        while not live.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        ring = json.loads(live.read_text())["ring"]
        time.sleep(2.5)  # several commit intervals of steps
        assert shm_left(ring)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    run = lm.load_run(tmp_path / "killed")
    steps, losses = run["loss"]
    assert len(steps) > 10
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    assert np.all(np.isfinite(losses))
    deadline = time.monotonic() + 10
    while shm_left(ring) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shm_left(ring)


def test_history_false_keeps_the_values_in_the_store_only(tmp_path):
    it = learner()
    run = lm.train(it, epochs=2, runs_dir=tmp_path, run_name="r", history=False, progress=False)
    assert isinstance(run, lm.Run) and run.path == tmp_path / "r"
    assert run.metadata["status"] == "finished" and dict(it.history) == {}
    expected = lm.train(learner(), epochs=2, runs_dir=None, progress=False)
    for key in ("loss", "grad_hist_1d"):
        steps, values = run[key]
        np.testing.assert_array_equal(steps, expected["step"])
        np.testing.assert_array_equal(values, expected[key])
    untracked = lm.train(
        it, track_every=lambda step: False, runs_dir=tmp_path, history=False, progress=False
    )
    assert untracked is None  # nothing tracked: no run
    with pytest.raises(ValueError, match="give a runs_dir"):
        lm.train(it, runs_dir=None, history=False)


def test_the_history_holds_arrays_of_its_own():
    it = learner()
    lm.train(it, runs_dir=None, progress=False)
    rows = [row for key in ("loss", "per_layer") for row in it.history[key]]
    assert all(leaf.base is None for leaf in jax.tree.leaves(rows))  # not views of XLA's


def telemetry_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "lmd4ml telemetry" in str(w.message)]


def train_noting_the_ring(run_dir: Path, rings: list, **kwargs) -> dict:
    """``lm.train`` of :func:`learner` into ``run_dir``, noting its ring's name after epoch 1."""

    def note(epoch, history):
        if epoch == 1:
            rings.append(live_ring(run_dir))

    return lm.train(
        learner(),
        runs_dir=run_dir.parent,
        run_name=run_dir.name,
        on_epoch=note,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("how", ["sqlite_full", "enospc"])
def test_a_full_disk_stops_recording_with_one_warning_and_training_goes_on(
    tmp_path, monkeypatch, how
):
    if how == "sqlite_full":  # SQLite's own error, committing every step until the file is full
        disk_full_after(monkeypatch, 0)
        monkeypatch.setattr(
            writer, "RunWriter", functools.partial(run_store.RunWriter, commit_every=0)
        )
        cause = "OperationalError: database or disk is full"
    else:  # the OS refuses every write of the store (its first commit is the last flush)

        def no_space(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(run_store.RunWriter, "flush", no_space)
        cause = f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    rings = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train_noting_the_ring(tmp_path / "full", rings, epochs=40)
    (message,) = telemetry_warnings(caught)
    assert "run store failed at" in message and cause in message and "training goes on" in message
    assert history["step"].tolist() == list(range(160))
    run = lm.load_run(tmp_path / "full")
    steps, losses = run["loss"]
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    np.testing.assert_array_equal(losses, history["loss"][: len(steps)])
    assert (0 < len(steps) < 160) if how == "sqlite_full" else len(steps) == 0
    assert run.metadata["status"] == "incomplete"
    assert (
        run.metadata["error"].startswith("recording stopped at") and cause in run.metadata["error"]
    )
    assert not shm_left(rings[0]) and live_ring(tmp_path / "full") is None


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_a_live_run(tmp_path, how):
    with run_store.RunWriter(tmp_path / "other", {}, {"x": ((), "float32")}) as other:
        other.append(0, {"x": 1.0})
    replacement = (tmp_path / "other" / "run.sqlite").read_bytes()
    run_dir = tmp_path / "runs" / "live"
    rings = []

    def tamper(epoch, history):
        if epoch == 1:
            rings.append(live_ring(run_dir))
            if how == "deleted":
                shutil.rmtree(run_dir)
            else:
                os.replace(tmp_path / "other" / "run.sqlite", run_dir / "run.sqlite")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lm.train(
            learner(),
            epochs=3,
            runs_dir=run_dir.parent,
            run_name="live",
            on_epoch=tamper,
            progress=False,
        )
    (message,) = telemetry_warnings(caught)
    assert "deleted or replaced while the run was writing it" in message
    assert history["step"].tolist() == list(range(12))
    if how == "deleted":
        assert not run_dir.exists()
    else:  # the file put there is read as it is, and left as it was
        assert (run_dir / "run.sqlite").read_bytes() == replacement
        assert lm.load_run(run_dir).keys == ["x"]
    assert not shm_left(rings[0])


STOPPED = textwrap.dedent(
    """
    import signal, sys, jax.numpy as jnp, optax, lmd4ml as lm
    # Ctrl-C raises KeyboardInterrupt as at a terminal, even in a child started in the background.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    data = [(jnp.ones((8, 2)) * (i + 1) / 4, jnp.zeros(8)) for i in range(4)]
    learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1] - 1) ** 2, data,
                         optax.sgd(0.01), [lm.Loss(), lm.NormTest()])
    report = lambda epoch, history: print(learner.steps_done, flush=True)
    lm.train(learner, epochs=10**6, runs_dir=sys.argv[1], on_epoch=report, progress=False,
             history=False)
    """
)


def test_sigterm_and_ctrl_c_stop_two_runs_of_one_directory_cleanly(tmp_path):
    """Two trainings started together in one runs directory, one stopped by SIGTERM, the
    other by Ctrl-C (SIGINT): each closes its own run as interrupted with every step it
    reported, warns once, releases its shared memory and exits as the signal asks."""
    signals = (signal.SIGTERM, signal.SIGINT)
    procs = {
        sig: subprocess.Popen(
            [sys.executable, "-c", STOPPED, str(tmp_path)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        for sig in signals
    }
    try:
        reported = {}
        for sig, proc in procs.items():
            reported[sig] = next(n for line in proc.stdout if (n := int(line)) >= 40)
        lives = {p.parent: json.loads(p.read_text()) for p in tmp_path.glob("*/live.json")}
        run_of = {
            sig: next(run for run, live in lives.items() if live["pid"] == proc.pid)
            for sig, proc in procs.items()
        }
        for sig, proc in procs.items():
            os.kill(proc.pid, sig)
        errors = {sig: proc.communicate(timeout=60)[1] for sig, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    assert procs[signal.SIGTERM].returncode == 128 + signal.SIGTERM
    assert procs[signal.SIGINT].returncode == -signal.SIGINT  # how Python ends on Ctrl-C
    assert "KeyboardInterrupt" in errors[signal.SIGINT]
    assert "Traceback" not in errors[signal.SIGTERM]
    assert len({run_of[sig] for sig in signals}) == 2
    for sig, name in zip(signals, ["SIGTERM", "Ctrl-C"], strict=True):
        assert errors[sig].count(f"lm.train stopped by {name} at step") == 1
        run = lm.load_run(run_of[sig])
        assert run.metadata["status"] == "interrupted"
        steps = run.steps()
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        assert len(steps) >= reported[sig]
        assert not (run_of[sig] / "live.json").exists()
    assert not any(shm_left(live["ring"]) for live in lives.values())


def loss_fn_1d(w, batch):
    x, y = batch
    return (x @ w - y) ** 2


@pytest.mark.parametrize(
    "signum, default, stopping",
    [
        (signal.SIGTERM, signal.SIG_DFL, SystemExit),
        (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
    ],
)
def test_a_signal_in_a_recorder_block_stops_at_the_next_log(tmp_path, signum, default, stopping):
    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    w, batch = jnp.zeros(2), (jnp.ones((3, 2)), jnp.arange(3.0))
    state = tx.init(w)
    previous = signal.signal(signum, default)  # as in a plain process
    try:
        with (
            pytest.raises(stopping) as stop,
            lm.Recorder(tmp_path, "r", quantities=[lm.Loss()]) as recorder,
        ):
            for step in range(10):
                _, state = tx.update(w, state, w, loss_fn=loss_fn_1d, batch=batch)
                recorder.log(state)
                if step == 4:
                    # Else the signal below would end the test run.
                    assert signal.getsignal(signum) is not default
                    os.kill(os.getpid(), signum)
        assert stopping is KeyboardInterrupt or stop.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signum) is default
    finally:
        signal.signal(signum, previous)
    run = lm.load_run(tmp_path / "r")
    assert run.metadata["status"] == "interrupted"
    assert run.steps().tolist() == [0, 1, 2, 3, 4, 5]  # the step under way is recorded
