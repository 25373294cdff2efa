"""What ``lm.monitor`` costs inside a user's own jitted step, against ``lm.instrument``.

For each model (``models.py``: the MLP and DeepOBS's 3c3d) and each set of quantities this
times, interleaved in one run (``overhead.py``'s runners, calibration and tables):

* ``bare``: the user's ``jax.jit`` step, ``value_and_grad`` of the mean loss, optax update;
* ``instrument``: ``lm.instrument`` with the quantities, tracked every step, or every 4th
  (``/4``: the bare variant in between);
* ``monitor``: the bare step's optimizer wrapped in ``lm.monitor(optimizer, quantities)``,
  ``loss_fn`` and ``batch`` passed to ``tx.update``; every step, or ``every=4`` (one program,
  ``lax.cond`` on a counter in the state);
* ``monitor .../4 static``: every 4th step chosen by the user's loop, ``track`` a static
  argument of its ``jit`` (two programs, as ``lm.instrument`` compiles).

The first table gives each configuration over the bare step (see ``overhead.py``); the second
the monitor's median time over ``instrument``'s for the same quantities and schedule, with the
quartiles of that ratio taken per repeat.

Usage::

    python benchmarks/monitor.py [--model mlp|3c3d|all] [--repeats R] [--min-block SECONDS]
        [--markdown]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import PROBLEMS, Problem
from overhead import (
    Runner,
    _timed_compile,
    bare_runner,
    lm_runner,
    markdown_table,
    rows_over_bare,
    text_table,
    time_interleaved,
)

import lmd4ml as lm

SCHEDULES = (1, 4)


def quantity_sets() -> dict[str, list[lm.Quantity]]:
    scalars = [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize()]
    return {
        "scalars": scalars,
        "norm_test": [lm.NormTest()],
        "all6": [*scalars, lm.NormTest(), lm.GradHist1d()],
    }


def monitor_runner(
    name: str,
    problem: Problem,
    optimizer: optax.GradientTransformation,
    quantities: list[lm.Quantity],
    every: int,
    static: bool = False,
) -> Runner:
    """The bare user step with its optimizer wrapped in ``lm.monitor``: tracked every
    ``every`` steps by the monitor's counter, or (``static``) by the loop's static ``track``."""
    tx = lm.monitor(optimizer, quantities, every=1 if static else every)
    loss_fn = problem.loss_fn

    @functools.partial(jax.jit, static_argnames="track")
    def train_step(params, opt_state, batch, track=None):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = tx.update(
            grads, opt_state, params, loss_fn=loss_fn, batch=batch, track=track
        )
        return optax.apply_updates(params, updates), opt_state, loss

    params, batch = problem.params, problem.batch
    opt_state = tx.init(params)
    first = True if static else None
    memory, compile_s = _timed_compile(train_step.lower(params, opt_state, batch, first))

    def run(n: int) -> float:
        p, s = params, opt_state
        t0 = time.perf_counter()
        for i in range(n):
            p, s, loss = train_step(p, s, batch, (i % every == 0) if static else None)
        jax.block_until_ready((p, s, loss))
        return time.perf_counter() - t0

    return Runner(name, run, memory, compile_s, every)


def benchmark(problem: Problem, repeats: int, min_block_s: float) -> tuple[list, list]:
    optimizer = optax.sgd(0.01, momentum=0.9)
    runners = [bare_runner(problem, optimizer)]
    for name, quantities in quantity_sets().items():
        for every in SCHEDULES:
            label = name if every == 1 else f"{name}/{every}"
            runners.append(lm_runner(f"instrument {label}", problem, optimizer, quantities, every))
            runners.append(
                monitor_runner(f"monitor {label}", problem, optimizer, quantities, every)
            )
            if every > 1:
                runners.append(
                    monitor_runner(
                        f"monitor {label} static", problem, optimizer, quantities, every, True
                    )
                )
    time_interleaved(runners, repeats, min_block_s)
    rows = rows_over_bare(problem.name, runners)
    by_name = {r.name: r for r in runners}
    pairs = []
    for r in runners[1:]:
        if r.name.startswith("monitor "):
            label = r.name.removeprefix("monitor ")
            base = by_name[f"instrument {label.removesuffix(' static')}"]
            per_repeat = np.array(r.seconds) / np.array(base.seconds)
            pairs.append(
                (
                    problem.name,
                    label,
                    statistics.median(r.seconds) / statistics.median(base.seconds),
                    float(np.percentile(per_repeat, 25)),
                    float(np.percentile(per_repeat, 75)),
                    r.memory_bytes / base.memory_bytes,
                )
            )
    return rows, pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*PROBLEMS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per configuration")
    parser.add_argument(
        "--min-block", type=float, default=0.2, help="seconds each timed block lasts at least"
    )
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, lmd4ml {lm.__version__}; backend "
        f"{jax.default_backend()} ({device.device_kind}); optax.sgd(0.01, momentum=0.9); "
        f"repeats {args.repeats}, blocks >= {args.min_block} s",
        flush=True,
    )
    rows, pairs = [], []
    for name in list(PROBLEMS) if args.model == "all" else [args.model]:
        problem = PROBLEMS[name]()
        print(f"{name}: {problem.num_params:,} parameters", flush=True)
        model_rows, model_pairs = benchmark(problem, args.repeats, args.min_block)
        rows += model_rows
        pairs += model_pairs
    print()
    print(text_table(rows))
    print("\nmonitor over instrument (same quantities and schedule)")
    header = "| model | tracked | × instrument | p25–p75 | memory × instrument |"
    lines = [header, "|---|---|---:|---:|---:|"]
    lines += [
        f"| {m} | {c} | {r:.2f} | {a:.2f}–{b:.2f} | {mem:.2f} |" for m, c, r, a, b, mem in pairs
    ]
    print("\n".join(lines))
    if args.markdown:
        print()
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
