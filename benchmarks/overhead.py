"""What lmd4ml's quantities cost: time per step and compiled memory over a bare optax step.

For each model (``models.py``: an MLP and DeepOBS's 3c3d CNN) this compares

* ``bare``: the step a typical user writes, ``jax.jit`` of ``value_and_grad`` of the mean
  loss, ``optimizer.update`` and ``optax.apply_updates``;
* ``untracked``: ``lm.instrument(...)`` called with ``track=False`` (the same update through
  lmd4ml's wrapper, no quantities; should match ``bare``);
* ``scalars``: Loss, GradNorm, Distance, UpdateSize (no per-sample work);
* ``norm_test`` and ``grad_hist_1d`` alone, to attribute the per-sample cost;
* ``all6``: the scalars plus NormTest and GradHist1d (one shared per-sample pass);
* with ``--suite presets``: Cockpit's presets ``economy``, ``business`` and ``full``
  (``lm.presets``), each tracked every 1, 4 and 16 steps (``full/4``: the full preset every
  4th step, the bare update in between; blocks are whole multiples of 4 steps), and
  ``business_mc/1``: business with the curvature from the Monte-Carlo GGN
  (``method="ggn_mc"``) every step.

The optimizer is SGD with learning rate 0.01 and momentum 0.9 everywhere; the same loss
function, initial parameters and batch are used by every configuration, and each timed block
continues training from where the configuration's last block stopped, so stateful instruments
run as they do in training (``HessMaxEV`` warm-starts from the last step's vector).
Everything is compiled and run once before timing. Timing interleaves the configurations:
for each of R repeats, every configuration runs a block of N steps (N chosen per
configuration so that a block lasts at least ``--min-block`` seconds), ending in
``jax.block_until_ready``; the order rotates from one repeat to the next. Data and state stay
on the device; the instrumented steps' metrics are not copied to the host.

How to read the table:

* ``ms/step``: median over the R blocks of the block's time per step.
* ``× bare``: that median over the bare step's median. ``p25–p75``: the quartiles of the same
  ratio taken per repeat (each repeat's block against the bare block of that repeat), a guide
  to noise; numbers from a busy machine spread more.
* ``memory MiB``: bytes of the compiled program's buffers from XLA's ``memory_analysis()``,
  arguments + outputs + temporaries (the instrumented state also holds θ₀ for Distance);
  ``× bare mem`` is its ratio over the bare program's. The process's peak RSS is printed once.
* ``compile s``: wall time of ``lower().compile()`` for that program; ``N``: steps per block.

Usage::

    python benchmarks/overhead.py [--model mlp|3c3d|all] [--suite core|presets|all]
        [--repeats R] [--markdown] [--min-block SECONDS] [--memory-budget BYTES]
        [--presets economy,business,full]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import PROBLEMS, Problem

import lmd4ml as lm

MiB = 2**20


Configuration = tuple[list[lm.Quantity] | None, int]  # quantities, tracked every k steps


PRESETS = ("economy", "business", "full")


def configurations(suite: str, presets: tuple[str, ...] = PRESETS) -> dict[str, Configuration]:
    """The instrumented configurations; ``None`` is the lmd4ml step with ``track=False``."""
    scalars = [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize()]
    core = {
        "untracked": (None, 1),
        "scalars": (scalars, 1),
        "norm_test": ([lm.NormTest()], 1),
        "grad_hist_1d": ([lm.GradHist1d()], 1),
        "all6": ([*scalars, lm.NormTest(), lm.GradHist1d()], 1),
    }
    if suite == "core":
        return core
    chosen = {
        f"{name}/{every}": (getattr(lm.presets, name)(), every)
        for name in presets
        for every in (1, 4, 16)
    }
    if "business" in presets:  # the curvature by its one-sample Monte-Carlo GGN
        mc = [lm.TICDiag(method="ggn_mc"), lm.HessTrace(method="ggn_mc")]
        chosen["business_mc/1"] = ([*lm.presets.economy(), *mc], 1)
    return chosen if suite == "presets" else {**core, **chosen}


@dataclass
class Runner:
    """One configuration: how to run n steps from the initial state, and what it compiled to."""

    name: str
    run: Callable[[int], float]  # n steps from the initial state, returns seconds
    memory_bytes: int
    compile_s: float
    every: int = 1  # blocks are whole multiples of this many steps
    steps_per_block: int = 1
    seconds: list[float] = field(default_factory=list)  # per repeat, per step


def _memory_bytes(compiled: jax.stages.Compiled) -> int:
    m = compiled.memory_analysis()
    # Outputs that reuse donated arguments' buffers are counted once.
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def _timed_compile(lowered: jax.stages.Lowered) -> tuple[int, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return _memory_bytes(compiled), time.perf_counter() - t0


def bare_runner(problem: Problem, optimizer: optax.GradientTransformation) -> Runner:
    """The typical user's jitted optax step."""
    loss_fn = problem.loss_fn

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, batch = problem.params, problem.batch
    opt_state = optimizer.init(params)
    memory, compile_s = _timed_compile(train_step.lower(params, opt_state, batch))

    carried = [(params, opt_state)]  # each block goes on from the last one

    def run(n: int) -> float:
        p, s = carried[0]
        t0 = time.perf_counter()
        for _ in range(n):
            p, s, loss = train_step(p, s, batch)
        jax.block_until_ready((p, s, loss))
        carried[0] = (p, s)
        return time.perf_counter() - t0

    return Runner("bare", run, memory, compile_s)


def lm_runner(
    name: str,
    problem: Problem,
    optimizer: optax.GradientTransformation,
    quantities: list[lm.Quantity] | None,
    every: int = 1,
    memory_budget: int | None = None,
    donate: bool = False,
) -> Runner:
    """``lm.instrument`` with ``quantities`` tracked every ``every`` steps (``None``: an empty
    step called with track=False). Memory and compile time are the tracked program's."""
    options = {"donate": donate} | (
        {} if memory_budget is None else {"memory_budget": memory_budget}
    )
    step = lm.instrument(problem.loss_fn, optimizer, quantities or [], **options)
    track = quantities is not None
    batch = problem.batch
    state0 = step.init(problem.params)
    lowered = step.lower(state0, batch, track)
    memory, compile_s = _timed_compile(lowered)

    carried = [state0]  # each block goes on from the last one

    def run(n: int) -> float:
        state, metrics = carried[0], {}
        t0 = time.perf_counter()
        for i in range(n):
            state, metrics = step(state, batch, track=track and i % every == 0)
        jax.block_until_ready((state, metrics))
        carried[0] = state
        return time.perf_counter() - t0

    if track and every > 1:
        step.lower(state0, batch, False).compile()  # the untracked variant, before timing
        run(every)
    return Runner(name, run, memory, compile_s, every)


def calibrate(runner: Runner, min_block_s: float) -> None:
    """Warm up (the first call compiles), then pick N so that a block lasts ≥ ``min_block_s``."""
    runner.run(2 * runner.every)
    n = runner.every
    while True:
        elapsed = runner.run(n)
        if elapsed >= min_block_s:
            break
        n = max(n + 1, math.ceil(n * 1.2 * min_block_s / max(elapsed, 1e-6)))
        n += -n % runner.every
    runner.steps_per_block = n


def benchmark(
    problem: Problem,
    suite: str,
    repeats: int,
    min_block_s: float,
    memory_budget: int | None = None,
    presets: tuple[str, ...] = PRESETS,
) -> list[dict]:
    optimizer = optax.sgd(0.01, momentum=0.9)
    runners = [bare_runner(problem, optimizer)]
    runners += [
        lm_runner(name, problem, optimizer, quantities, every, memory_budget)
        for name, (quantities, every) in configurations(suite, presets).items()
    ]
    time_interleaved(runners, repeats, min_block_s)
    return rows_over_bare(problem.name, runners)


def time_interleaved(runners: list[Runner], repeats: int, min_block_s: float) -> None:
    """Calibrate every runner, then time ``repeats`` blocks of each, interleaved."""
    for r in runners:
        calibrate(r, min_block_s)
    for i in range(repeats):
        # Rotate the order so that no configuration always runs in the same position, right
        # after the same neighbour (on 3c3d the first block of each round ran ~5% slow).
        for r in runners[i % len(runners) :] + runners[: i % len(runners)]:
            r.seconds.append(r.run(r.steps_per_block) / r.steps_per_block)


def rows_over_bare(model: str, runners: list[Runner]) -> list[dict]:
    """A table row per runner, timed against the first (the bare step)."""
    bare = runners[0]
    bare_median = statistics.median(bare.seconds)
    rows = []
    for r in runners:
        per_repeat = np.array(r.seconds) / np.array(bare.seconds)
        median = statistics.median(r.seconds)
        rows.append(
            {
                "model": model,
                "config": r.name,
                "ms": 1e3 * median,
                "ratio": median / bare_median,
                "p25": float(np.percentile(per_repeat, 25)),
                "p75": float(np.percentile(per_repeat, 75)),
                "mem_mib": r.memory_bytes / MiB,
                "mem_ratio": r.memory_bytes / bare.memory_bytes,
                "compile_s": r.compile_s,
                "n": r.steps_per_block,
            }
        )
    return rows


HEADER = (
    "model",
    "config",
    "ms/step",
    "× bare",
    "memory MiB",
    "× bare mem",
    "× bare p25–p75",
    "compile s",
    "N",
)


def _ms(ms: float) -> str:
    """Three significant digits, never scientific notation."""
    return f"{ms:.{max(0, 2 - math.floor(math.log10(max(ms, 1e-3))))}f}"


def _cells(row: dict) -> tuple[str, ...]:
    return (
        row["model"],
        row["config"],
        _ms(row["ms"]),
        f"{row['ratio']:.2f}",
        f"{row['mem_mib']:.2f}",
        f"{row['mem_ratio']:.2f}",
        f"{row['p25']:.2f}–{row['p75']:.2f}",
        f"{row['compile_s']:.2f}",
        str(row["n"]),
    )


def text_table(rows: list[dict]) -> str:
    cells = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for i, c in enumerate(cells):
        lines.append(
            "  ".join(
                s.ljust(w) if j < 2 else s.rjust(w)
                for j, (s, w) in enumerate(zip(c, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*PROBLEMS, "all"], default="all")
    parser.add_argument("--suite", choices=["core", "presets", "all"], default="core")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per configuration")
    parser.add_argument(
        "--min-block", type=float, default=0.2, help="seconds each timed block lasts at least"
    )
    parser.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        help="bytes passed as lm.instrument(memory_budget=...) (default: lmd4ml's own)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument(
        "--presets",
        default=",".join(PRESETS),
        help="comma-separated presets of the presets suite (default: all three)",
    )
    args = parser.parse_args(argv)
    presets = tuple(p for p in args.presets.split(",") if p)
    if unknown := set(presets) - set(PRESETS):
        parser.error(f"--presets: unknown {sorted(unknown)}; choose from {', '.join(PRESETS)}")

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, lmd4ml {lm.__version__}; "
        f"backend {jax.default_backend()}, device {device.device_kind} ({device}), "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    )
    print(
        f"optimizer: optax.sgd(0.01, momentum=0.9); repeats {args.repeats}, "
        f"blocks of N steps lasting >= {args.min_block} s; memory_budget "
        f"{'default' if args.memory_budget is None else args.memory_budget}"
    )
    rows = []
    names = list(PROBLEMS) if args.model == "all" else [args.model]
    for name in names:
        problem = PROBLEMS[name]()
        batch_size = problem.batch[0].shape[0]
        print(f"{name}: {problem.num_params:,} parameters, batch {batch_size}", flush=True)
        rows += benchmark(
            problem, args.suite, args.repeats, args.min_block, args.memory_budget, presets
        )
    print()
    print(text_table(rows))
    if args.markdown:
        print()
        print(markdown_table(rows))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"\npeak RSS of this process: {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
