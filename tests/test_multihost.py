"""Several hosts under ``jax.distributed``: 2 processes on loopback, 2 CPU devices each.

Both processes train on a global batch split over the 4 devices and get every quantity's
single-device value; process 0 alone writes the run. The file is also the worker:
``python test_multihost.py <process id> <port> <out dir>``.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import models
import numpy as np
import optax
import pytest

import lmd4ml as lm

N_PROCESSES, LOCAL_DEVICES = 2, 2
N = 12  # 3 samples per device
TIMEOUT = 240  # seconds for both workers together
RTOL = 1e-10


def quantities() -> list[lm.Quantity]:
    return [*lm.presets.economy(), lm.NoiseScale(), lm.HessTrace()]


def case() -> models.Case:
    """The zoo's MLP on three global batches of N samples."""
    data = tuple(models.classification_batch(seed, (5,), n=N) for seed in range(3))
    return models.Case("mlp", models.mlp_loss, models.init_mlp(), data)


def worker(process_id: int, port: int, out: Path) -> None:
    """One host: join the cluster, train on its half of each global batch, save the history."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in JAX 0.10
    jax.distributed.initialize(f"127.0.0.1:{port}", N_PROCESSES, process_id)
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))  # Auto axes: ordinary models' gradients
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rows = slice(process_id * N // N_PROCESSES, (process_id + 1) * N // N_PROCESSES)
    c = case()
    batches = [
        jax.tree.map(lambda x: jax.make_array_from_process_local_data(split, x[rows]), b)
        for b in c.batches
    ]
    params = jax.device_put(c.params, replicated)  # init places the rest of the state alike
    learner = lm.Learner(params, c.loss_fn, batches, optax.sgd(0.1), quantities())
    assert all(
        x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(learner.state)
    )
    history = lm.train(learner, runs_dir=out / "runs")
    with open(out / f"{process_id}.pkl", "wb") as f:
        pickle.dump({"pid": os.getpid(), "history": dict(history)}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(out: Path) -> list[subprocess.Popen]:
    """Every worker, started; each writes stdout and stderr to ``out/<process id>.log``."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"}
    env["JAX_PLATFORMS"] = "cpu"
    port, procs = free_port(), []
    for i in range(N_PROCESSES):
        cmd = [sys.executable, __file__, str(i), str(port), str(out)]
        with open(out / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def finish_workers(procs: list[subprocess.Popen], out: Path) -> list[str]:
    """Wait for every worker; their output, or a failure that shows all of it."""
    failed = None
    try:
        for i, proc in enumerate(procs):
            if proc.wait(timeout=TIMEOUT) != 0:
                failed = f"process {i} exited with {proc.returncode}"
                break
    except subprocess.TimeoutExpired:
        failed = f"timed out after {TIMEOUT} s"
    finally:
        for proc in procs:  # a worker left waiting on a collective of a failed one
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = [(out / f"{i}.log").read_text() for i in range(len(procs))]
    if failed:
        shown = "\n".join(f"--- process {i} ---\n{t[-6000:]}" for i, t in enumerate(texts))
        pytest.fail(f"jax.distributed workers failed: {failed}\n{shown}")
    return texts


def test_two_processes_match_one_device_and_process_0_alone_writes(tmp_path):
    procs = start_workers(tmp_path)
    try:  # the single-device reference, while the workers run
        c = case()
        step = lm.instrument(c.loss_fn, optax.sgd(0.1), quantities())
        expected = [metrics for _, metrics, _ in models.run_steps(step, c)]
    finally:
        texts = finish_workers(procs, tmp_path)
    results = [pickle.loads((tmp_path / f"{i}.pkl").read_bytes()) for i in range(N_PROCESSES)]

    for i, result in enumerate(results):
        history = result["history"]
        np.testing.assert_array_equal(history["step"], np.arange(len(c.batches)))
        assert set(history) == {"step", *step.keys}
        for key in step.keys:
            want = np.stack([m[key] for m in expected])
            np.testing.assert_allclose(history[key], want, rtol=RTOL, err_msg=f"{key}, {i}")

    [info] = lm.list_runs(tmp_path / "runs")
    run = lm.load_run(info["path"])
    assert run.metadata["pid"] == results[0]["pid"]
    np.testing.assert_array_equal(run.steps(), np.arange(len(c.batches)))
    np.testing.assert_allclose(run["loss"][1], results[0]["history"]["loss"], rtol=0)
    bar = f"{len(c.batches)}/{len(c.batches)} ["
    assert bar in texts[0] and bar not in texts[1]  # a progress bar on process 0 only


def test_other_processes_write_and_serve_nothing(tmp_path, monkeypatch, regression_case):
    """On process 1, train and Recorder neither write a run nor start a dashboard."""
    import lmd4ml.dashboard.launch

    def no_dashboard(*args: object) -> None:
        raise AssertionError("a process other than 0 started the dashboard")

    monkeypatch.setattr(lmd4ml.dashboard.launch, "open_dashboard", no_dashboard)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    c = regression_case
    learner = lm.Learner(c.params, c.loss_fn, c.batches, optax.sgd(0.1), [lm.Loss()])
    history = lm.train(learner, runs_dir=tmp_path, dashboard=True)
    assert len(history["loss"]) == len(c.batches)

    tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
    opt_state = tx.init(c.params)
    with lm.Recorder(tmp_path, quantities=[lm.Loss()], dashboard=True) as recorder:
        for batch in c.batches:
            _, opt_state = tx.update(c.params, opt_state, c.params, loss_fn=c.loss_fn, batch=batch)
            recorder.log(opt_state)
    assert recorder.run_dir is None
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
