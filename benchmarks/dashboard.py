"""Dashboard cost: the server's time per update, and what an open page costs training.

1. Server: a stored run with 10 quantities (9 scalars and a 100-bin gradient histogram)
   over 100 000 steps. Times (median) the first full figure of it, and one poll that brings
   10 new steps, each including the JSON encoding Dash does (goal: ≤ 100 ms).
2. Training: the digits MLP of ``examples/train_digits.py``, its steps/s with a Chromium
   page on the dashboard and without one, runs interleaved (goal: within 3 %).

    python benchmarks/dashboard.py [--steps 100000] [--screenshot docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optax
from flax import nnx
from plotly.io.json import to_json_plotly

import lmd4ml as lm
from lmd4ml.dashboard import app
from lmd4ml.dashboard.data import RunCache
from lmd4ml.telemetry.store import RunWriter, new_run_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import train_digits

SCALARS = ["loss", "grad_norm", "distance", "update_size", "norm_test", "alpha",
           "hess_max_ev", "hess_trace", "tic_trace"]  # fmt: skip
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def long_run(runs_dir: Path, n_steps: int) -> Path:
    fields = {k: ((), "float32") for k in SCALARS} | {"grad_hist_1d": ((100,), "int32")}
    path = new_run_dir(runs_dir, "long")
    rng = np.random.default_rng(0)
    scalars = rng.random((n_steps, len(SCALARS))).astype(np.float32)
    hist = rng.integers(0, 1000, (n_steps, 100)).astype(np.int32)
    with RunWriter(path, {"keys": [*SCALARS, "grad_hist_1d"]}, fields) as writer:
        for step in range(n_steps):
            values = dict(zip(SCALARS, scalars[step], strict=True))
            writer.append(step, values | {"grad_hist_1d": hist[step]})
    return path


def server_times(n_steps: int, reps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = long_run(Path(tmp), n_steps)
        cache, listing = RunCache(), app.Listing(tmp)
        start = time.perf_counter()
        run = cache.get(path)
        load = time.perf_counter() - start

        def timed(view, redraw):
            start = time.perf_counter()
            out = app.update(cache, listing, [], 0.0, (), False, view, redraw)
            to_json_plotly(out[0])  # how Dash encodes the response
            return time.perf_counter() - start, out[1]

        full = [timed(None, True) for _ in range(reps)]
        view = full[-1][1]
        polls = []
        for i in range(reps * 4):
            new = np.arange(10) + run.last_step + 1
            for column in run.columns.values():
                shape = column.values.shape[1:]
                column.extend(new, np.full((10, *shape), i % 7, column.values.dtype))
            seconds, view = timed(view, False)
            polls.append(seconds)
    print(f"server, 10 quantities over {n_steps} steps (median of {reps}, {4 * reps} polls):")
    print(f"  first read of the stored run  {1e3 * load:8.1f} ms (once per run and server)")
    print(f"  full figure                   {1e3 * statistics.median(t for t, _ in full):8.1f} ms")
    print(f"  poll with 10 new steps        {1e3 * statistics.median(polls):8.1f} ms")


def digits_learner() -> tuple[lm.Learner, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    quantities = [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize(), lm.NormTest(),
                  lm.GradHist1d(nbins=100, maxval=0.05)]  # fmt: skip
    batches = train_digits.Batches(x, digits.target, 64, 0)
    model = train_digits.MLP(nnx.Rngs(0))
    learner = lm.Learner(model, train_digits.loss_fn, batches, optax.adam(1e-3), quantities)
    return learner, len(batches)


def training_rates(train_steps: int, reps: int, screenshot: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    learner, per_epoch = digits_learner()
    epochs = max(1, train_steps // per_epoch)
    with tempfile.TemporaryDirectory() as runs, sync_playwright() as p:
        port = 8093
        server = subprocess.Popen(
            [sys.executable, "-m", "lmd4ml.dashboard", runs, "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            lm.train(learner, epochs=1, runs_dir=runs, progress=False)  # compiles
            rates: dict[str, list[float]] = {"closed": [], "open": []}
            for _ in range(reps):
                for mode in rates:
                    page.goto(f"http://127.0.0.1:{port}/" if mode == "open" else "about:blank")
                    if mode == "open":  # loading the page is not what a watched run pays
                        page.wait_for_selector("#cockpit .main-svg")
                    time.sleep(2)
                    start = time.perf_counter()
                    lm.train(learner, epochs=epochs, runs_dir=runs, progress=False)
                    rates[mode].append(epochs * per_epoch / (time.perf_counter() - start))
                    if mode == "open" and screenshot is not None:
                        time.sleep(3)
                        page.screenshot(path=screenshot, full_page=True)
                        screenshot = None
        finally:
            browser.close()
            server.kill()
            server.wait()
    closed, opened = (statistics.median(rates[m]) for m in ("closed", "open"))
    print(f"training, digits MLP, {epochs * per_epoch} steps per run, {reps} runs each:")
    print(
        f"  page closed  {closed:8.0f} steps/s   ({', '.join(f'{r:.0f}' for r in rates['closed'])})"
    )
    print(
        f"  page open    {opened:8.0f} steps/s   ({', '.join(f'{r:.0f}' for r in rates['open'])})"
    )
    print(f"  open/closed  {opened / closed:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=4400)
    parser.add_argument("--screenshot", type=Path, help="save the open page here (PNG)")
    args = parser.parse_args()
    server_times(args.steps, args.reps)
    training_rates(args.train_steps, args.reps, args.screenshot)


if __name__ == "__main__":
    main()
