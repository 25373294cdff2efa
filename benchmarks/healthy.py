"""No false alarms: ``lm.diagnose`` on healthy trainings of the benchmark models.

Trains DeepOBS's 3c3d or the small decoder of ``models.py`` for a short while with the
economy preset, on data they can learn (fresh batches each step), at learning rates that
work, and prints what ``lm.diagnose`` finds: nothing at warning or error is the expected
result, and the exit status is 1 otherwise. The data: for 3c3d, one of 10 fixed random
patterns under as much Gaussian noise, labelled by the pattern; for the transformer,
sequences that count up from a random start by a random stride of 1 to 4 (mod the
vocabulary), so the next token follows from the two before it.

Usage (from the repository root, so that ``lmd4ml`` is this checkout's)::

    PYTHONPATH=. python benchmarks/healthy.py --model 3c3d --steps 80 --batch-size 32
    PYTHONPATH=. python benchmarks/healthy.py --model transformer --steps 80 --width 64 --layers 2
    PYTHONPATH=. python benchmarks/healthy.py --optimizer momentum --hess-every 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from models import cnn_3c3d, transformer

import lmd4ml as lm
from lmd4ml.diagnosis import format_finding


def class_images(n: int, batch_size: int, seed: int) -> list:
    """``n`` batches of 32×32×3 images: one of 10 fixed random patterns (the label) under
    as much Gaussian noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((10, 32, 32, 3)).astype(np.float32)
    out = []
    for _ in range(n):
        y = rng.integers(0, 10, batch_size)
        noise = rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32)
        out.append((patterns[y] + noise, y))
    return out


def counting_sequences(n: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list:
    """``n`` batches of sequences start, start + k, start + 2k, ... (mod ``vocab``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = rng.integers(0, vocab, (batch_size, 1))
        stride = rng.integers(1, 5, (batch_size, 1))
        out.append(((start + stride * np.arange(seq_len)) % vocab,))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["3c3d", "transformer"], default="3c3d")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--optimizer", choices=["adam", "momentum"], default="adam")
    parser.add_argument("--width", type=int, default=64, help="transformer width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--seq-len", type=int, default=32, help="transformer sequence length")
    parser.add_argument(
        "--hess-every",
        type=int,
        default=0,
        help="track the top Hessian eigenvalue every k steps too (the edge-of-stability rule, "
        "for --optimizer momentum); 0: not",
    )
    parser.add_argument("--runs-dir", default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args(argv)

    if args.model == "3c3d":
        problem = cnn_3c3d(batch_size=args.batch_size)
        data = class_images(args.steps, args.batch_size, seed=1)
        rates = {"adam": 1e-3, "momentum": 0.03}
    else:
        problem = transformer(
            batch_size=args.batch_size, width=args.width, layers=args.layers,
            seq_len=args.seq_len, vocab=256,
        )  # fmt: skip
        data = counting_sequences(args.steps, args.batch_size, args.seq_len, 256, seed=1)
        rates = {"adam": 3e-3, "momentum": 0.03}
    data = [jax.tree.map(jnp.asarray, batch) for batch in data]
    lr = rates[args.optimizer]
    tx = optax.adam(lr) if args.optimizer == "adam" else optax.sgd(lr, momentum=0.9)
    quantities = lm.presets.economy() + ([lm.HessMaxEV()] if args.hess_every else [])
    schedules = {"hess_max_ev": args.hess_every} if args.hess_every else {}
    learner = lm.Learner(problem.params, problem.loss_fn, data, tx, quantities)
    runs_dir = args.runs_dir or tempfile.mkdtemp()
    history = lm.train(learner, schedules=schedules, runs_dir=runs_dir, progress=False)
    findings = lm.diagnose(history)
    loss = history["loss"]
    print(
        f"{problem.name}, {args.optimizer} {lr}, B={args.batch_size}, {args.steps} steps: "
        f"loss {loss[:10].mean():.3g} -> {loss[-10:].mean():.3g}"
    )
    for finding in findings:
        print(format_finding(finding))
    for code, why in findings.skipped.items():
        print(f"skipped {code}: {why}")
    alarms = [f for f in findings if f.severity != "info"]
    print("no warning or error" if not alarms else f"{len(alarms)} false alarms")
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
