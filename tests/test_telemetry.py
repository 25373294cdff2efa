"""Telemetry end to end: what lm.train writes, and what survives a failure or a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmd4ml as lm
from lmd4ml.telemetry import store as run_store
from lmd4ml.telemetry.ring import RingReader, RingWriter, ring_name
from lmd4ml.telemetry.writer import live_ring

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


def test_a_ring_that_cannot_be_made_costs_the_live_view_only(tmp_path):
    with (
        RingWriter(ring_name("taken"), {"x": ((), np.float32)}),
        pytest.warns(RuntimeWarning, match="live ring failed at the start"),
    ):
        history = lm.train(learner(), runs_dir=tmp_path, run_name="taken", progress=False)
    np.testing.assert_array_equal(lm.load_run(tmp_path / "taken")["loss"][1], history["loss"])


def test_a_failing_sink_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(self, step, values):
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
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)])
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
