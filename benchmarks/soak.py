"""Soak: a long run of a tiny model with Cockpit's economy preset, every step tracked.

1. Training, ``lm.train(..., history=False)``: steps/s, the training process's resident
   memory (RSS) every ``--every`` steps (it must stay flat: the store keeps the values), and
   the run store's bytes per step.
2. The dashboard's server on the finished run, as ``benchmarks/dashboard.py`` times it
   (each including the JSON encoding Dash does): the first update of a page showing it
   (which reads the run from its store, once per run and server), a redraw (an option
   changed), a redraw with smoothing (the first, which reads every value of the run's
   scalars; one after changing the weight; then one with the same), a poll with nothing new
   and a poll bringing 10 new steps (goal: updates ≤ 100 ms).
3. Reading the run: ``lm.load_run``, then every field.

With ``--store-steps`` above ``--steps``, parts 2 and 3 also run on a run of that many
steps written through the store's writer (``RunWriter.append``, as the training's writer
thread calls it) with the trained run's fields and metadata and random values; a store's
bytes per step do not depend on the values.

    python benchmarks/soak.py [--steps 1000000] [--store-steps N] [--every 50000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from plotly.io.json import to_json_plotly

import lmd4ml as lm
from lmd4ml.dashboard import app
from lmd4ml.dashboard.data import RunCache
from lmd4ml.telemetry.store import DB_NAME, RESERVED_KEYS, RunWriter

N_BATCHES, BATCH = 100, 8


def rss_mib() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def store_mib(run_dir: Path) -> float:
    return sum(p.stat().st_size for p in run_dir.glob(f"{DB_NAME}*")) / 2**20


def tiny_learner() -> lm.Learner:
    """A 4-8-1 tanh MLP (49 parameters) on 100 fixed batches of 8, economy preset."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_BATCHES, BATCH, 4)).astype(np.float32)
    y = rng.normal(size=(N_BATCHES, BATCH)).astype(np.float32)
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(x, y, strict=True)]

    def loss_fn(p, batch):
        inputs, targets = batch
        return (jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] - targets) ** 2

    params = {"w1": jnp.full((4, 8), 0.1), "b1": jnp.zeros(8), "w2": jnp.full(8, 0.1)}
    return lm.Learner(params, loss_fn, batches, optax.sgd(0.01), lm.presets.economy())


def sample(learner: lm.Learner, every: int, store: Path, done: threading.Event) -> list:
    """``(step, seconds, RSS MiB)`` each time ``learner`` has taken another ``every`` steps,
    and once ``done``, from a thread of its own; printed as they come."""
    samples: list[tuple[int, float, float]] = []
    start, first, next_at = time.perf_counter(), learner.steps_done, every
    while True:
        finished = done.wait(0.1)
        step = learner.steps_done - first
        if step >= next_at or (finished and not (samples and samples[-1][0] == step)):
            seconds = time.perf_counter() - start
            samples.append((step, seconds, rss_mib()))
            print(
                f"  step {step:>9}  {seconds:7.0f} s  {step / seconds:6.0f} steps/s  "
                f"RSS {samples[-1][2]:7.1f} MiB  store {store_mib(store):8.1f} MiB",
                flush=True,
            )
            next_at = step - step % every + every
        if finished:
            return samples


def train(runs_dir: Path, steps: int, every: int, history: bool) -> Path:
    learner = tiny_learner()
    lm.train(learner, epochs=1, runs_dir=runs_dir, run_name="warmup", progress=False)
    path = runs_dir / "soak"
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        sampled = pool.submit(sample, learner, every, path, done)
        epochs = steps // N_BATCHES
        print(f"training {epochs * N_BATCHES} steps, history={history}:", flush=True)
        start = time.perf_counter()
        lm.train(
            learner,
            epochs=epochs,
            runs_dir=runs_dir,
            run_name="soak",
            progress=False,
            history=history,
        )
        seconds = time.perf_counter() - start
        done.set()
        samples = sampled.result()
    size = (path / DB_NAME).stat().st_size
    steps_done = epochs * N_BATCHES
    first = next(s for s in samples if s[0] >= steps_done // 10)  # past the warm-up
    last = samples[-1]
    slope = (last[2] - first[2]) / max(1, last[0] - first[0]) * 1e5
    print(
        f"  {steps_done / seconds:.0f} steps/s; store {size / 2**20:.1f} MiB, "
        f"{size / steps_done:.0f} bytes per step"
    )
    print(
        f"  RSS at step {first[0]}: {first[2]:.1f} MiB, at {last[0]}: {last[2]:.1f} MiB "
        f"({slope:+.2f} MiB per 10^5 steps); max {max(s[2] for s in samples):.1f} MiB"
    )
    return path


def synthetic(runs_dir: Path, like: Path, steps: int) -> Path:
    """A run of ``steps`` steps with the fields and metadata of ``like``, random values."""
    run = lm.load_run(like)
    layout = {key: (run.shapes[key], run.thin(key, 2)[1].dtype) for key in run.keys}
    metadata = {k: v for k, v in run.metadata.items() if k not in RESERVED_KEYS}
    rng = np.random.default_rng(0)
    rows = [
        {
            key: rng.integers(0, 1000, shape) if shape else rng.random()
            for key, shape in run.shapes.items()
        }
        for _ in range(1000)
    ]
    path = runs_dir / f"synthetic-{steps}"
    start = time.perf_counter()
    with RunWriter(path, metadata, layout) as writer:
        for step in range(steps):
            writer.append(step, rows[step % 1000])
    seconds = time.perf_counter() - start
    size = (path / DB_NAME).stat().st_size
    print(
        f"wrote {steps} steps through RunWriter.append in {seconds:.0f} s: "
        f"{size / 2**20:.1f} MiB, {size / steps:.0f} bytes per step"
    )
    return path


def page_times(path: Path, reps: int) -> None:
    cache, listing = RunCache(), app.Listing(path.parent)

    def timed(view: dict | None, redraw: bool, smoothing: float = 0.0) -> tuple[float, dict]:
        start = time.perf_counter()
        out = app.update(cache, listing, [str(path)], smoothing, (), False, view, redraw)
        to_json_plotly(out[0])  # how Dash encodes the response
        return time.perf_counter() - start, out[1]

    def median(times: list[float]) -> str:
        return f"{1e3 * statistics.median(times):8.1f} ms"

    first, view = timed(None, True)
    redraws = [timed(None, True)[0] for _ in range(reps)]
    smoothed_first = timed(None, True, 0.9)[0]
    reweighted = [timed(None, True, weight)[0] for weight in np.linspace(0.8, 0.7, reps)]
    smoothed = [timed(None, True, 0.7)[0] for _ in range(reps)]
    polls = [timed(view, False)[0] for _ in range(reps)]
    run = cache.get(path)
    n = max(c.count for c in run.columns.values())
    grown: dict[float, list[float]] = {0.0: [], 0.9: []}
    for smoothing, times in grown.items():
        _, view = timed(None, True, smoothing)
        for i in range(reps):
            new = np.arange(10) + run.last_step + 1
            for column in run.columns.values():
                shape = column.values.shape[1:]
                column.extend(new, np.full((10, *shape), i % 7, column.values.dtype))
            seconds, view = timed(view, False, smoothing)
            times.append(seconds)
    print(f"dashboard server, run of {n} steps (medians of {reps}):")
    print(f"  first update (reads the run)    {1e3 * first:8.1f} ms (once per run and server)")
    print(f"  redraw                          {median(redraws)}")
    print(
        f"  redraw, smoothing 0.9           {1e3 * smoothed_first:8.1f} ms first, another "
        f"weight {median(reweighted).strip()}, then {median(smoothed).strip()}"
    )
    print(f"  poll, nothing new               {median(polls)}")
    print(f"  poll, 10 new steps              {median(grown[0.0])}")
    print(f"  poll, 10 new steps, smoothing   {median(grown[0.9])}")


def read_times(path: Path) -> None:
    start = time.perf_counter()
    run = lm.load_run(path)
    opened = time.perf_counter() - start
    fields = {}
    for key in run.keys:
        start = time.perf_counter()
        run[key]
        fields[key] = time.perf_counter() - start
    print(
        f"lm.load_run of {len(run.steps())} steps: {1e3 * opened:.1f} ms; every field "
        f"{sum(fields.values()):.2f} s (slowest {max(fields, key=fields.get)!r} "
        f"{max(fields.values()):.2f} s, a scalar {statistics.median(fields.values()):.2f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10**6)
    parser.add_argument("--store-steps", type=int, default=0)
    parser.add_argument("--every", type=int, default=50_000, help="report every this many steps")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--history", action="store_true", help="keep the history (to compare)")
    args = parser.parse_args()
    if args.steps < max(N_BATCHES, args.every):
        parser.error(f"--steps must be at least --every and {N_BATCHES} (one epoch)")
    with tempfile.TemporaryDirectory() as tmp:
        trained = train(Path(tmp), args.steps, args.every, args.history)
        paths = [trained]
        if args.store_steps > args.steps:
            paths.append(synthetic(Path(tmp), trained, args.store_steps))
        for path in paths:
            page_times(path, args.reps)
            read_times(path)


if __name__ == "__main__":
    main()
