"""Does watching slow training? Steps/s of ``lm.train`` with telemetry on against off.

Same MLP, batch, optimizer and quantities (the four scalars and the norm test) on both
sides; "on" writes a run (ring + SQLite store, fed by the background thread) every call,
"off" passes ``runs_dir=None``. The two alternate, R repeats of one ``train`` call of N
steps each, after a warm-up of both; each run's set-up (layout, database, shared memory)
is inside the timing. Reported: median steps/s of each, the median of the R paired ratios
on/off (goal: within 3%, i.e. >= 0.97), and the writer thread's own CPU time per record
(what telemetry takes from the two cores, measured alone over 20,000 records).

    python benchmarks/telemetry.py [--repeats R] [--steps N] [--quantities scalars|all6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import optax
from models import mlp

import lmd4ml as lm
from lmd4ml.telemetry.store import new_run_dir
from lmd4ml.telemetry.writer import Telemetry

QUANTITY_SETS = {
    "scalars": lambda: [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize(), lm.NormTest()],
    "all6": lambda: [
        lm.Loss(),
        lm.GradNorm(),
        lm.Distance(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.GradHist1d(),
    ],
}


def steps_per_second(learner: lm.Learner, runs_dir: str | None) -> float:
    start = time.perf_counter()
    lm.train(learner, epochs=1, runs_dir=runs_dir, progress=False)
    jax.block_until_ready(learner.state)
    return len(learner.batches) / (time.perf_counter() - start)


def writer_cost(learner: lm.Learner, runs_dir: str, n: int = 20_000) -> float:
    """µs per record the writer thread takes for this learner's metrics, already on the host.

    Queueing takes this thread under a µs a record, the rest of the time is the writer's
    (the interval sleeps only happen on an empty queue, so it runs flat out).
    """
    record = {k: v[-1] for k, v in learner.history.items() if k != "step"}
    telemetry = Telemetry(new_run_dir(runs_dir), {}, jax.eval_shape(lambda: record))
    start = time.perf_counter()
    for step in range(n):
        telemetry.submit(step, record)
    telemetry.close()
    return 1e6 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quantities", choices=sorted(QUANTITY_SETS), default="scalars")
    args = parser.parse_args()
    problem = mlp()
    batches = [problem.batch] * args.steps

    def learner() -> lm.Learner:
        quantities = QUANTITY_SETS[args.quantities]()
        return lm.Learner(problem.params, problem.loss_fn, batches, optax.adam(1e-3), quantities)

    off, on = learner(), learner()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as runs_dir:
        steps_per_second(off, None)
        steps_per_second(on, runs_dir)
        for _ in range(args.repeats):
            rates["off"].append(steps_per_second(off, None))
            rates["on"].append(steps_per_second(on, runs_dir))
        cost = writer_cost(on, runs_dir)
    off_rate, on_rate = (statistics.median(rates[k]) for k in ("off", "on"))
    ratios = sorted(b / a for a, b in zip(rates["off"], rates["on"], strict=True))
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}; MLP {problem.num_params:,} "
        f"params, {args.quantities}, {args.steps} steps per call, {args.repeats} repeats"
    )
    print(f"telemetry off: {off_rate:8.1f} steps/s")
    print(f"telemetry on:  {on_rate:8.1f} steps/s")
    print(
        f"on / off:      {statistics.median(ratios):8.3f}  (median of paired ratios; quartiles "
        f"{ratios[len(ratios) // 4]:.3f}–{ratios[3 * len(ratios) // 4]:.3f})"
    )
    print(f"writer thread: {cost:8.1f} µs CPU per record (ring + store)")


if __name__ == "__main__":
    main()
