"""Train an MLP on scikit-learn's handwritten digits with Cockpit's full instrument panel.

The data ships with scikit-learn (1797 8×8 images), so nothing is downloaded. It tracks
``lm.presets.full()``, the trace form of the TIC and the gradient noise scale: the
first-order instruments every step, the curvature instruments and the 2-D histogram, which
cost tens of gradients each, every 4th step. Each epoch prints a few of them read together:
loss, gradient norm, distance from the start, update size, the norm test, α, the top Hessian
eigenvalue and where the per-sample gradients sit in the histogram. The test accuracy
(``eval_fn``) and the learning rate (``optax.inject_hyperparams``) are recorded beside them.

    python examples/train_digits.py --epochs 30
    python examples/train_digits.py --dashboard     # and watch it live at http://127.0.0.1:8050
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import lmd4ml as lm


class MLP(nnx.Module):
    """64-128-128-10 with ReLU, the size of the core benchmark."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(64, 128, rngs=rngs),
                nnx.Linear(128, 128, rngs=rngs),
                nnx.Linear(128, 10, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


# The model and the loss on its logits, split: the curvature instruments then read the
# exact Hessian trace and TIC through the generalised Gauss-Newton matrix (a ReLU network is
# piecewise linear in each layer, so its GGN diagonal is the Hessian's).
loss_fn = lm.supervised(lambda model, x: model(x), optax.softmax_cross_entropy_with_integer_labels)


class Batches:
    """Fixed-size batches, reshuffled each epoch; the remainder is dropped so shapes never
    change (a new batch shape would compile a new step)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, size: int, seed: int):
        self.x, self.y, self.size = x, y, size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.x) // self.size

    def __iter__(self):
        order = self.rng.permutation(len(self.x))
        for i in range(len(self)):
            take = order[i * self.size : (i + 1) * self.size]
            yield self.x[take], self.y[take]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--track-every", type=int, default=1)
    parser.add_argument(
        "--curvature-every", type=int, default=4, help="steps between curvature measurements"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default="runs", help="where the run is kept")
    parser.add_argument(
        "--dashboard",
        nargs="?",
        const=8050,
        type=int,
        metavar="PORT",
        help="watch training live in the browser (default port 8050)",
    )
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    model = MLP(nnx.Rngs(args.seed))
    replace = {
        # Gradient elements sit within ±0.05 here; θ within ±0.5 (LeCun-normal init, fan-in 64).
        "grad_hist_2d": lm.GradHist2d(range=((-0.05, 0.05), (-0.5, 0.5))),
    }
    quantities = [replace.get(q.key, q) for q in lm.presets.full()]
    quantities += [lm.TICTrace(), lm.NoiseScale()]
    expensive = ("hess_trace", "tic_diag", "tic_trace", "hess_max_ev", "grad_hist_2d")
    learner = lm.Learner(
        model,
        loss_fn,
        Batches(x_train, y_train, args.batch_size, args.seed),
        optax.inject_hyperparams(optax.adam)(learning_rate=args.lr),
        quantities,
    )

    def evaluate(learner: lm.Learner) -> dict[str, float]:
        """Accuracy on the held-out images, at the start and after every epoch."""
        return {"test_acc": float(jnp.mean(jnp.argmax(learner.model(x_test), -1) == y_test))}

    steps_per_epoch = len(learner.batches)
    print(f"digits: {len(x_train)} train / {len(x_test)} test, {steps_per_epoch} steps per epoch")
    print(
        f"{'epoch':>5} {'loss':>8} {'grad_norm':>9} {'distance':>8} {'update':>8} "
        f"{'norm_test':>9} {'alpha':>6} {'λ_max':>7} {'|g|<1e-3':>9} {'clamped':>8} "
        f"{'test acc':>8}"
    )

    def report(epoch: int, history: lm.History) -> None:
        last = {k: v[-1] for k, v in history.items()}
        counts = last["grad_hist_1d"]
        centre = counts[49:51].sum() / counts.sum()
        clamped = (counts[0] + counts[-1]) / counts.sum()
        accuracy = history["test_acc"][-1]
        tqdm.write(
            f"{epoch:>5} {last['loss']:>8.4f} {last['grad_norm']:>9.4f} "
            f"{last['distance']:>8.3f} {last['update_size']:>8.4f} {last['norm_test']:>9.4f} "
            f"{last['alpha']:>6.2f} {history['hess_max_ev'][-1]:>7.3f} {centre:>9.1%} "
            f"{clamped:>8.1%} {accuracy:>8.1%}"
        )

    lm.train(
        learner,
        epochs=args.epochs,
        track_every=args.track_every,
        schedules={key: args.curvature_every for key in expensive},
        runs_dir=args.runs_dir,
        dashboard=args.dashboard or False,
        on_epoch=report,
        eval_fn=evaluate,
        config={"batch_size": args.batch_size, "seed": args.seed, "data": "sklearn digits"},
    )
    run = lm.list_runs(args.runs_dir)[-1]
    print(
        f"run kept in {run['path']} ({run['n_steps']} steps recorded): "
        f"lm.load_run({str(run['path'])!r})"
    )


if __name__ == "__main__":
    main()
