"""Short real trainings with a known pathology each, and healthy ones, for lm.diagnose.

Scikit-learn's digits (1797 8×8 images, pixels scaled to [0, 1]) and plain-pytree MLPs with
a per-sample cross-entropy, trained by ``lm.train`` with the economy preset plus what the
rules also read (per-layer gradient norms, the gradient noise scale, the top Hessian
eigenvalue every 4th step). Each run is small (a few hundred steps of a 64-32-10 network
at most) so that all of them take well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import lmd4ml as lm

BATCH = 32


def digits(shuffle_labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The digits, pixels in [0, 1]; labels permuted at random with ``shuffle_labels``."""
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float64), data.target.astype(np.int32)
    if shuffle_labels:
        y = np.random.default_rng(1).permutation(y)
    return x, y


def mlp(sizes: list[int], seed: int = 0, gain: float = 1.0) -> list[tuple[jax.Array, jax.Array]]:
    """Dense layers of ``sizes``, LeCun-normal weights times ``gain``, zero biases."""
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return [
        (gain * jax.random.normal(k, (m, n), jnp.float64) / np.sqrt(m), jnp.zeros(n, jnp.float64))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def loss_for(activation: Callable[[jax.Array], jax.Array]) -> Callable:
    """Per-sample cross-entropy of an MLP with ``activation`` between its layers."""

    def loss_fn(params, batch):
        x, y = batch
        for w, b in params[:-1]:
            x = activation(x @ w + b)
        w, b = params[-1]
        return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)

    return loss_fn


def batches(x: np.ndarray, y: np.ndarray, n: int, nan_at: int | None = None) -> list:
    """``n`` batches of ``BATCH`` samples drawn in order from a fixed permutation, cycling;
    batch ``nan_at`` (if any) has NaN pixels, as a corrupt record would."""
    order = np.random.default_rng(0).permutation(len(x))
    out = []
    for i in range(n):
        take = order[(np.arange(BATCH) + i * BATCH) % len(x)]
        xb = x[take].copy()
        if i == nan_at:
            xb[:, 10] = np.nan
        out.append((xb, y[take]))
    return out


def least_squares(params, batch):
    """Per-sample squared error of a linear model of the one-hot labels: a convex quadratic
    whose Hessian, E[x̃x̃ᵀ] ⊗ I with x̃ = (x, 1), is known, and so is the right learning rate."""
    (w, b), (x, y) = params, batch
    return 0.5 * jnp.sum((x @ w + b - jax.nn.one_hot(y, 10)) ** 2, axis=-1)


def sharpness() -> float:
    """λ_max of the least-squares loss's Hessian over all the digits: gradient descent on it
    is stable for learning rates below 2/λ_max."""
    x, _ = digits()
    xt = np.c_[x, np.ones(len(x))]
    return float(np.linalg.eigvalsh(xt.T @ xt / len(x))[-1])


def quantities(curvature: bool) -> list[lm.Quantity]:
    """The economy preset with per-layer gradient norms, the noise scale and, with
    ``curvature``, the top Hessian eigenvalue."""
    replace = {"grad_norm": lm.GradNorm(per_layer=True)}
    extra = [lm.HessMaxEV()] if curvature else []
    return [*(replace.get(q.key, q) for q in lm.presets.economy()), lm.NoiseScale(), *extra]


LAM = sharpness()
RELU = ([64, 32, 10], jax.nn.relu)
# name: (layers and activation, or None for least squares; weight gain; optimizer; steps;
#        shuffled labels; the batch with NaN pixels)
CASES = {
    "healthy_sgd": (RELU, 1.0, optax.sgd(0.1), 120, False, None),
    "healthy_adam": (RELU, 1.0, optax.adam(3e-3), 120, False, None),
    "healthy_least_squares": (None, 1.0, optax.sgd(1.0 / LAM), 60, False, None),
    "lr_too_large": (None, 1.0, optax.sgd(3.0 / LAM), 60, False, None),
    "lr_too_small": (None, 1.0, optax.sgd(1e-3 / LAM), 60, False, None),
    "noise": (RELU, 1.0, optax.sgd(0.1), 120, True, None),
    "vanishing": (([64, *[32] * 8, 10], jax.nn.sigmoid), 1.0, optax.sgd(0.1), 40, False, None),
    "exploding": (([64, *[32] * 6, 10], jax.nn.relu), 4.0, optax.sgd(1e-3), 40, False, None),
    "stalled": (RELU, 1.0, optax.sgd(0.0), 40, False, None),
    "nan_batch": (RELU, 1.0, optax.sgd(0.1), 40, False, 25),
}


def train(name: str, runs_dir: str | Path | None, **kwargs) -> lm.History:
    """Train the case ``name`` (a run ``runs_dir/<name>`` unless ``runs_dir`` is None)."""
    net, gain, tx, steps, shuffled, nan_at = CASES[name]
    x, y = digits(shuffled)
    if net is None:
        params, loss_fn = mlp([64, 10], gain=0.0), least_squares
        params = params[0]
    else:
        params, loss_fn = mlp(net[0], gain=gain), loss_for(net[1])
    learner = lm.Learner(
        params, loss_fn, batches(x, y, steps, nan_at), tx, quantities(curvature=net is None)
    )
    schedules = {"hess_max_ev": 2} if net is None else {}
    return lm.train(
        learner, schedules=schedules, runs_dir=runs_dir, run_name=name, progress=False, **kwargs
    )


def svg_plot(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str,
    lines: dict[str, float] | None = None,
    span: tuple[int, int] | None = None,
    log: bool = False,
    size: tuple[int, int] = (520, 220),
) -> str:
    """A small SVG line plot of ``series`` (label: (steps, values)), with dashed horizontal
    ``lines`` (label: value; a rule's zone) and the steps ``span`` of a finding shaded.
    Non-finite values are left out (a gap)."""
    width, height, pad = *size, 44
    values = [v for _, v in series.values()] + [np.array(list((lines or {}).values()))]
    finite = np.concatenate([v[np.isfinite(v) & ((v > 0) if log else True)] for v in values])
    lo, hi = float(finite.min()), float(finite.max())
    tf = np.log10 if log else (lambda v: v)
    lo, hi = tf(lo), tf(hi)
    hi = hi if hi > lo else lo + 1
    first = min(int(s[0]) for s, _ in series.values())
    last = max(int(s[-1]) for s, _ in series.values())

    def xy(step: float, value: float) -> tuple[float, float]:
        x = pad + (step - first) / max(last - first, 1) * (width - 2 * pad)
        y = height - pad + (tf(value) - lo) / (hi - lo) * (2 * pad - height)
        return round(x, 1), round(y, 1)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{pad}" y="16" font-size="13">{title}</text>',
    ]
    if span is not None:
        (x0, _), (x1, _) = xy(span[0], 10**lo if log else lo), xy(span[1], 10**lo if log else lo)
        out.append(
            f'<rect x="{x0}" y="{pad - 14}" width="{max(x1 - x0, 2)}" '
            f'height="{height - 2 * pad + 14}" fill="#ffdd99" opacity="0.6"/>'
        )
    for label, value in (lines or {}).items():
        (x0, y), (x1, _) = xy(first, value), xy(last, value)
        out.append(
            f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#555" stroke-dasharray="4 3"/>'
        )
        out.append(f'<text x="{x1 + 3}" y="{y + 4}" fill="#555">{label}</text>')
    for i, (label, (steps, vals)) in enumerate(series.items()):
        keep = np.isfinite(vals) & ((vals > 0) if log else True)
        points = " ".join(
            f"{x},{y}" for x, y in (xy(s, v) for s, v in zip(steps[keep], vals[keep], strict=True))
        )
        colour = colours[i % len(colours)]
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
        )
        out.append(
            f'<text x="{width - pad - 150}" y="{30 + 13 * i}" fill="{colour}">{label}</text>'
        )
    axis = lambda v: f"{10**v:.3g}" if log else f"{v:.3g}"  # noqa: E731
    out += [
        f'<text x="2" y="{height - pad + 4}">{axis(lo)}</text>',
        f'<text x="2" y="{pad + 4}">{axis(hi)}</text>',
        f'<text x="{pad}" y="{height - pad + 16}">step {first}</text>',
        f'<text x="{width - pad - 40}" y="{height - pad + 16}">step {last}</text>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"


def plots(out_dir: Path) -> None:
    """The example plots of docs/diagnosis.md: one pathology run per code, the instrument
    its rule reads, the rule's zone and the finding's steps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, lm.History] = {}

    def run(name: str) -> lm.History:
        if name not in runs:
            runs[name] = train(name, None, diagnose=False)
        return runs[name]

    def span(history: lm.History, code: str) -> tuple[int, int]:
        f = next(f for f in lm.diagnose(history) if f.code == code)
        return f.first_step, f.last_step

    def key(history: lm.History, name: str) -> tuple[np.ndarray, np.ndarray]:
        value = history[name]
        return history.steps(name), np.asarray(value["total"] if isinstance(value, dict) else value)

    h = run("nan_batch")
    figures = {
        "nonfinite": svg_plot(
            {"loss": key(h, "loss")},
            title="nan_batch: loss (NaN from step 25)",
            span=span(h, "nonfinite"),
        )
    }
    h = run("lr_too_large")
    figures["lr_too_large"] = svg_plot(
        {"loss": key(h, "loss")},
        title="lr_too_large: loss, η = 3/λ_max",
        span=span(h, "lr_too_large"),
        log=True,
    )
    steps, lam = key(h, "hess_max_ev")
    figures["edge_of_stability"] = svg_plot(
        {"η·λ_max": (steps, 3.0 / LAM * lam)},
        title="lr_too_large: η·λ_max",
        lines={"2": 2.0, "0.9·2": 1.8},
        span=span(h, "edge_of_stability"),
    )
    h = run("lr_too_small")
    steps, alpha = key(h, "alpha")
    figures["lr_too_small"] = svg_plot(
        {"α + 1": (steps, alpha + 1)},
        title="lr_too_small: α + 1, η = 0.001/λ_max",
        lines={"α −0.99": 0.01, "α 0": 1.0},
        span=span(h, "lr_too_small"),
        log=True,
    )
    h = run("noise")
    figures["noise_dominated"] = svg_plot(
        {"norm test": key(h, "norm_test")},
        title="noise (labels shuffled): norm test",
        lines={"1": 1.0, "0.9": 0.9},
        span=span(h, "noise_dominated"),
    )
    h = run("vanishing")
    layers = {
        f"layer {i}": (h.steps("grad_norm"), np.asarray(h["grad_norm"][f"{i}/0"]))
        for i in (0, 4, 8)
    }
    figures["vanishing_gradients"] = svg_plot(
        layers,
        title="vanishing (9 sigmoid layers): gradient norm per layer",
        span=span(h, "vanishing_gradients"),
        log=True,
    )
    h = run("exploding")
    figures["exploding_gradients"] = svg_plot(
        {"grad_norm": key(h, "grad_norm")},
        title="exploding (weights ×4): gradient norm",
        lines={"100": 100.0},
        span=span(h, "exploding_gradients"),
        log=True,
    )
    h = run("stalled")
    figures["stalled"] = svg_plot(
        {"distance": key(h, "distance"), "update size": key(h, "update_size")},
        title="stalled (η = 0): distance and update size",
        span=span(h, "stalled"),
    )
    h = run("healthy_sgd")
    figures["healthy_sgd"] = svg_plot(
        {"norm test": key(h, "norm_test"), "loss": key(h, "loss")},
        title="healthy SGD: norm test and loss, no finding",
        lines={"1": 1.0},
    )
    for code, svg in figures.items():
        (out_dir / f"{code}.svg").write_text(svg)


if __name__ == "__main__":
    import sys

    jax.config.update("jax_enable_x64", True)
    plots(Path(sys.argv[1]))
