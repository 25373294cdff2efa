"""What the Hessian diagonal costs: one curvature quantity's step over the bare optax step.

``lm.HessTrace(method=...)`` alone (or ``TICDiag``/``TICTrace``), tracked every step, against
the bare jitted step on the same problem (``models.py``; ``cnn_small`` is small enough for
the exact diagonal), with ``optax.sgd(0.01, momentum=0.9)``. Timing, memory and the table
are ``overhead.py``'s: both steps compiled and run first, then ``--repeats`` interleaved
blocks of at least ``--min-block`` seconds each; medians per step.

Usage (from the repository root, so that ``lmd4ml`` is this checkout's)::

    PYTHONPATH=. python benchmarks/curvature.py --model 3c3d --method hutchinson
    PYTHONPATH=. python benchmarks/curvature.py --model cnn_small --method exact
"""

from __future__ import annotations

import argparse

import jax
import optax
from models import PROBLEMS, cnn_small
from overhead import bare_runner, lm_runner, rows_over_bare, text_table, time_interleaved

import lmd4ml as lm

MODELS = {**PROBLEMS, "cnn_small": cnn_small}
QUANTITIES = {"hess_trace": lm.HessTrace, "tic_diag": lm.TICDiag, "tic_trace": lm.TICTrace}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="3c3d")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--quantity", choices=list(QUANTITIES), default="hess_trace")
    parser.add_argument(
        "--method", choices=["auto", "exact", "ggn", "ggn_mc", "hutchinson"], default="auto"
    )
    parser.add_argument("--probes", type=int, default=32, help="Hutchinson's products")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per step")
    parser.add_argument(
        "--min-block", type=float, default=0.2, help="seconds each timed block lasts at least"
    )
    parser.add_argument(
        "--memory-budget", type=int, default=None, help="lm.instrument's (default: its own)"
    )
    args = parser.parse_args(argv)

    size = {} if args.batch_size is None else {"batch_size": args.batch_size}
    problem = MODELS[args.model](**size)
    quantity = QUANTITIES[args.quantity](method=args.method, probes=args.probes)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}; {problem.name}: "
        f"{problem.num_params:,} parameters, batch {problem.batch[0].shape[0]}; {quantity!r}; "
        f"memory_budget {args.memory_budget or 'default'}; repeats {args.repeats}",
        flush=True,
    )
    optimizer = optax.sgd(0.01, momentum=0.9)
    runners = [
        bare_runner(problem, optimizer),
        lm_runner(args.quantity, problem, optimizer, [quantity], 1, args.memory_budget),
    ]
    time_interleaved(runners, args.repeats, args.min_block)
    print(text_table(rows_over_bare(problem.name, runners)))


if __name__ == "__main__":
    main()
