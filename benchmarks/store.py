"""What the run store costs: time per ``RunWriter.append`` and time to read a long run.

The layout is the six default quantities: five float32 scalars and ``grad_hist_1d`` as
int32[100]. Values are numpy arrays already on the host (what the writer receives after the
device-to-host copy).

* ``append``: each of N appends is timed alone, with commits batched every ``commit_every``
  seconds (1 s, as in training), so the commits fall inside the appends that trigger them.
  Reported: the median, the mean (which spreads the commits over every append) and the
  slowest append (a commit).
* ``read``: a run of 100,000 steps written beforehand; the median over R reads of
  ``load_run(path)["loss"]`` and of ``["grad_hist_1d"]``, each from a fresh ``load_run``.

Usage::

    python benchmarks/store.py [--appends N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from lmd4ml.telemetry.store import RunWriter, load_run

FIELDS = {
    **{key: ((), np.float32) for key in ["loss", "grad_norm", "distance", "update_size"]},
    "norm_test": ((), np.float32),
    "grad_hist_1d": ((100,), np.int32),
}


def _values(step: int) -> dict[str, np.ndarray]:
    values = {key: np.float32(step) for key in FIELDS if key != "grad_hist_1d"}
    values["grad_hist_1d"] = np.full(100, step, np.int32)
    return values


def bench_append(runs_dir: str, n: int) -> list[float]:
    """Seconds taken by each of ``n`` appends."""
    times = []
    with RunWriter(f"{runs_dir}/append", {}, FIELDS, commit_every=1.0) as writer:
        for step in range(n):
            values = _values(step)
            start = time.perf_counter()
            writer.append(step, values)
            times.append(time.perf_counter() - start)
    return times


def bench_read(runs_dir: str, n_steps: int, repeats: int) -> dict[str, float]:
    """Median seconds to read each field of an ``n_steps``-step run."""
    path = f"{runs_dir}/read"
    values = _values(0)
    with RunWriter(path, {}, FIELDS, commit_every=1.0) as writer:
        for step in range(n_steps):
            writer.append(step, values)
    medians = {}
    for key in ["loss", "grad_hist_1d"]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            steps, _ = load_run(path)[key]
            times.append(time.perf_counter() - start)
            assert len(steps) == n_steps
        medians[key] = statistics.median(times)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs_dir:
        times = np.array(bench_append(runs_dir, args.appends)) * 1e6
        print(
            f"append ({args.appends} steps, 5 float32 + int32[100], commit every 1 s): "
            f"median {np.median(times):.1f} µs, mean {times.mean():.1f} µs, "
            f"max {times.max():.0f} µs"
        )
        n_steps = 100_000
        for key, seconds in bench_read(runs_dir, n_steps, args.repeats).items():
            print(f'read {n_steps} steps of run["{key}"]: median {seconds * 1e3:.1f} ms')


if __name__ == "__main__":
    main()
