"""Peak memory and time of Cockpit's economy preset against batch size B and parameter count P.

The problems (``models.py``, ``SCALE_PROBLEMS``) are an MLP 784-w-w-w-10 (w = 2048: 10 M
parameters; w = 1024: 2.9 M) and a 6-block pre-LayerNorm transformer (width 256: 5.3 M
parameters; width 128: 1.5 M), float32, ``optax.sgd(0.01, momentum=0.9)``. For each
(model, P, B) two programs are compared: ``bare``, the ``lm.instrument`` step called with
``track=False`` (the plain update), and ``economy``, the same step with
``lm.presets.economy()`` tracked (Loss, GradNorm, Distance, UpdateSize, the three gradient
tests, GradHist1d, Alpha). The goal is economy's peak memory within 1.3× of the bare step's.

Memory is XLA's buffer assignment of the compiled program (``compile().memory_analysis()``),
the figure ``overhead.py`` reports: arguments + outputs + temporaries, in MiB. On CPU that is
what a call holds at its peak: the caller's arguments (state and batch), the fresh output
buffers (the new state) and one preallocated block for every temporary. With ``--donate``
both steps donate their state (``lm.instrument(..., donate=True)``) and outputs written into
its buffers are counted once. (``peak_memory_in_bytes`` is not used: on CPU it is
arguments + outputs alone.)
``extra state`` is economy's arguments + outputs over the bare step's (quantity states such
as Distance's θ₀, which is both an argument and an output), ``extra temp`` its temporaries
over the bare step's. ``--attribute`` also compiles each economy quantity alone and prints
the same split for it, to say where the extra memory goes. The process's peak RSS is printed
once at the end (it includes compilation, so it is no per-program figure).

Time is the median over ``--repeats`` interleaved blocks of each step's time per step
(``overhead.py``'s runners, calibration and rotation); ``× bare`` is economy's median over the
bare median, ``p25–p75`` the quartiles of that ratio taken per repeat. On a shared 2-core
machine the medians are the numbers to quote. Each program compiles once: a temporary
persistent compilation cache lets the timed step reuse the executable compiled for memory.

Usage::

    python benchmarks/scale.py [--model mlp10m|transformer|all] [--quick] [--memory-only]
        [--attribute] [--donate] [--repeats R] [--min-block SECONDS] [--memory-budget BYTES]

``--quick``: the 10 M MLP at B = 16 and 64 and the width-128 transformer at B = 8, three
repeats (a few minutes); the full grid takes about half an hour on 2 cores, most of it the
transformer's compiles and economy steps.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from typing import NamedTuple

import jax
import optax
from models import SCALE_PROBLEMS, Problem
from overhead import MiB, _ms, lm_runner, rows_over_bare, time_interleaved

import lmd4ml as lm

GRID: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {  # model: (widths, batch sizes)
    "mlp10m": ((1024, 2048), (16, 64, 256)),
    "transformer": ((128, 256), (8, 32)),
}
QUICK_GRID: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mlp10m": ((2048,), (16, 64)),
    "transformer": ((128,), (8,)),
}
GOAL = 1.3  # economy's peak memory over the bare step's


class Memory(NamedTuple):
    """Bytes of a compiled program's buffers, from XLA's ``memory_analysis()``."""

    arguments: int
    outputs: int
    temps: int
    aliased: int  # outputs written into donated arguments' buffers

    @property
    def state(self) -> int:
        return self.arguments + self.outputs - self.aliased

    @property
    def total(self) -> int:
        return self.state + self.temps


def memory(lowered: jax.stages.Lowered) -> Memory:
    m = lowered.compile().memory_analysis()
    return Memory(
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.temp_size_in_bytes,
        m.alias_size_in_bytes,
    )


def step_memory(
    problem: Problem,
    optimizer: optax.GradientTransformation,
    quantities: list[lm.Quantity],
    memory_budget: int,
    donate: bool,
) -> Memory:
    """Memory of the ``lm.instrument`` step with ``quantities`` tracked (none: track=False)."""
    step = lm.instrument(
        problem.loss_fn, optimizer, quantities, memory_budget=memory_budget, donate=donate
    )
    return memory(step.lower(step.init(problem.params), problem.batch, bool(quantities)))


def measure_case(
    problem: Problem,
    optimizer: optax.GradientTransformation,
    memory_budget: int,
    donate: bool,
    repeats: int,
    min_block_s: float,
    timed: bool,
) -> dict:
    """Memory and (if ``timed``) time per step of the bare and the economy step."""
    bare = step_memory(problem, optimizer, [], memory_budget, donate)
    economy = step_memory(problem, optimizer, lm.presets.economy(), memory_budget, donate)
    row = {
        "model": problem.name,
        "P": problem.num_params,
        "B": problem.batch[0].shape[0],
        "bare": bare,
        "economy": economy,
    }
    if timed:
        runners = [
            lm_runner("bare", problem, optimizer, None, 1, memory_budget, donate),
            lm_runner(
                "economy", problem, optimizer, lm.presets.economy(), 1, memory_budget, donate
            ),
        ]
        time_interleaved(runners, repeats, min_block_s)
        bare_row, economy_row = rows_over_bare(problem.name, runners)
        row.update(
            bare_ms=bare_row["ms"],
            economy_ms=economy_row["ms"],
            ratio=economy_row["ratio"],
            p25=economy_row["p25"],
            p75=economy_row["p75"],
        )
    return row


def attribute(
    problem: Problem,
    optimizer: optax.GradientTransformation,
    memory_budget: int,
    donate: bool,
) -> list[tuple[str, Memory]]:
    """Each economy quantity tracked alone: its program's memory."""
    return [
        (q.key, step_memory(problem, optimizer, [q], memory_budget, donate))
        for q in lm.presets.economy()
    ]


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| model | P | B | bare ms | economy ms | × bare | p25–p75 | bare MiB | economy MiB "
        "| mem × bare | extra state MiB | extra temp MiB |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bare, economy = r["bare"], r["economy"]
        timing = ["–"] * 4
        if "ratio" in r:
            spread = f"{r['p25']:.1f}–{r['p75']:.1f}"
            timing = [_ms(r["bare_ms"]), _ms(r["economy_ms"]), f"{r['ratio']:.1f}", spread]
        cells = [
            r["model"],
            f"{r['P'] / 1e6:.2f} M",
            str(r["B"]),
            *timing,
            _mib(bare.total),
            _mib(economy.total),
            f"{economy.total / bare.total:.2f}",
            _mib(economy.state - bare.state),
            _mib(economy.temps - bare.temps),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attribution_table(rows: list[tuple[dict, list[tuple[str, Memory]]]]) -> str:
    lines = [
        "| model | B | tracked alone | MiB | mem × bare | extra state MiB | extra temp MiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row, parts in rows:
        bare = row["bare"]
        for key, m in [("(bare)", bare), *parts, ("economy", row["economy"])]:
            lines.append(
                f"| {row['model']} | {row['B']} | {key} | {_mib(m.total)} | "
                f"{m.total / bare.total:.2f} | {_mib(m.state - bare.state)} | "
                f"{_mib(m.temps - bare.temps)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*GRID, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="a small grid, 3 repeats")
    parser.add_argument("--memory-only", action="store_true", help="compile only, no timing")
    parser.add_argument(
        "--attribute", action="store_true", help="also each economy quantity's memory alone"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks (default 5)")
    parser.add_argument(
        "--min-block", type=float, default=0.3, help="seconds each timed block lasts at least"
    )
    parser.add_argument(
        "--memory-budget",
        type=int,
        default=2**26,
        help="bytes passed as lm.instrument(memory_budget=...) (default lmd4ml's, 64 MiB)",
    )
    parser.add_argument(
        "--donate",
        action="store_true",
        help="both steps donate their state (lm.instrument(donate=True)): outputs reuse it",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    grid = QUICK_GRID if args.quick else GRID
    names = list(grid) if args.model == "all" else [args.model]
    cases = [(n, w, b) for n in names for w in grid[n][0] for b in grid[n][1]]

    # Each program is compiled once for its memory and again inside lm_runner: a persistent
    # cache in a temporary directory makes the second a load.
    cache = tempfile.TemporaryDirectory(prefix="lmd4ml-scale-")
    jax.config.update("jax_compilation_cache_dir", cache.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, lmd4ml {lm.__version__}; backend "
        f"{jax.default_backend()} ({device.device_kind}), {os.cpu_count()} CPU cores; "
        f"optax.sgd(0.01, momentum=0.9); memory_budget {args.memory_budget}; "
        + ("state donated; " if args.donate else "")
        + (
            "memory only"
            if args.memory_only
            else f"repeats {repeats}, blocks >= {args.min_block} s"
        ),
        flush=True,
    )
    optimizer = optax.sgd(0.01, momentum=0.9)
    rows, attributions = [], []
    start = time.perf_counter()
    for i, (name, width, batch_size) in enumerate(cases, 1):
        problem = SCALE_PROBLEMS[name](batch_size=batch_size, width=width)
        print(
            f"[{i}/{len(cases)}, {time.perf_counter() - start:.0f} s] {problem.name}, "
            f"{problem.num_params:,} parameters, B={batch_size} ...",
            end=" ",
            flush=True,
        )
        row = measure_case(
            problem,
            optimizer,
            args.memory_budget,
            args.donate,
            repeats,
            args.min_block,
            not args.memory_only,
        )
        rows.append(row)
        ratio = row["economy"].total / row["bare"].total
        timing = f", time × {row['ratio']:.1f}" if "ratio" in row else ""
        print(f"memory × {ratio:.2f}{timing}", flush=True)
        if args.attribute:
            attributions.append(
                (row, attribute(problem, optimizer, args.memory_budget, args.donate))
            )
    print(f"\ndone in {time.perf_counter() - start:.0f} s\n")
    print(markdown_table(rows))
    within = sum(r["economy"].total <= GOAL * r["bare"].total for r in rows)
    print(f"\neconomy within {GOAL}× of the bare step's memory: {within} of {len(rows)}")
    if attributions:
        print("\neach economy quantity tracked alone\n")
        print(attribution_table(attributions))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"\npeak RSS of this process: {peak_kib / 1024:.0f} MiB")
    cache.cleanup()


if __name__ == "__main__":
    main()
