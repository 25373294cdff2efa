"""The dashboard end to end: a real training process, the server, headless Chromium.

Screenshots land in ``$LMD4ML_ARTIFACTS`` (default ``test-artifacts/`` in the repository).
Needs Chromium (``apt-get install chromium``; ``.ci/run`` installs it) and playwright.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_telemetry import child_env

import lmd4ml as lm
from lmd4ml.dashboard.data import minmax_indices, spread_indices
from lmd4ml.dashboard.figure import HEATMAP_BUDGET, LINE_BUDGET

playwright = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(os.environ.get("LMD4ML_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

# Trains a small pytree model slowly (batches come every 20 ms) with Cockpit quantities and
# custom ones of every shape, and serves the dashboard itself: lm.train(dashboard=port).
TRAIN = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp, optax
    import lmd4ml as lm

    class Slow:
        def __init__(self):
            self.data = [(jnp.linspace(-1, 1, 16).reshape(8, 2) * (i + 1), jnp.arange(8.0) / 8)
                         for i in range(4)]
        def __len__(self):
            return 4
        def __iter__(self):
            for batch in self.data:
                time.sleep(0.02)
                yield batch

    def loss_fn(w, batch):
        x, y = batch
        return (jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2

    quantities = [
        lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize(), lm.NormTest(),
        lm.GradHist1d(nbins=20, maxval=0.5),
        lm.quantity("per_layer", lambda c: {"a": optax.tree.norm(c.grads["a"]),
                                            "b": optax.tree.norm(c.grads["b"])}),
        lm.quantity("grad_b", lambda c: c.grads["b"]),
        lm.quantity("grad_a", lambda c: c.grads["a"]),
    ]
    params = {"a": jnp.full((2, 3), 0.5), "b": jnp.full(3, 0.1)}
    learner = lm.Learner(params, loss_fn, Slow(), optax.adam(0.05), quantities)
    lm.train(learner, epochs=int(sys.argv[2]), runs_dir="runs", run_name="live",
             dashboard=int(sys.argv[1]), progress=False)
    """
)
FIELDS = {
    "loss": "scatter", "grad_norm": "scatter", "distance": "scatter", "update_size": "scatter",
    "norm_test": "scatter", "per_layer['a']": "scatter", "per_layer['b']": "scatter",
    "grad_hist_1d": ("heatmap", "bar"), "grad_b": "heatmap", "grad_a": "heatmap",
}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def kill(proc: subprocess.Popen | int) -> None:
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if isinstance(proc, subprocess.Popen):
        proc.wait()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def traces(page) -> dict[tuple[str, str, str], int]:
    """(run, field, trace type) -> points drawn, from the page's plotly figure."""
    found = page.evaluate(
        """() => {
        const gd = document.querySelector('#cockpit .js-plotly-plot');
        return gd && gd.data ? gd.data.map(t => [t.meta.run, t.meta.field, t.type,
            t.type === 'bar' ? t.y.length : t.x ? t.x.length : t.z.length]) : [];
        }"""
    )
    return {(run, field, kind): n for run, field, kind, n in found}


def newest(page) -> dict[tuple[str, str, str], int]:
    """(run, field, trace type) -> the last step drawn, for the traces over steps."""
    found = page.evaluate(
        """() => document.querySelector('#cockpit .js-plotly-plot').data
            .filter(t => t.type === 'scatter' || (t.type === 'heatmap' && t.transpose))
            .map(t => [t.meta.run, t.meta.field, t.type, t.x[t.x.length - 1]])"""
    )
    return {(run, field, kind): last for run, field, kind, last in found}


def status(page) -> str:
    return page.inner_text("#status")


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#cockpit .main-svg", timeout=30_000)
    return page, errors


def expected(run_dir: Path) -> dict[tuple[str, str], int]:
    """(field, trace type) -> the number of points a panel should hold: every stored step,
    or as many as the server thins them to."""
    run = lm.load_run(run_dir)
    out = {}
    for field, kinds in FIELDS.items():
        steps, values = run[field]
        for kind in (kinds,) if isinstance(kinds, str) else kinds:
            if kind == "bar":
                out[field, kind] = 20
            elif kind == "heatmap":
                out[field, kind] = len(spread_indices(steps, HEATMAP_BUDGET))
            else:
                out[field, kind] = len(minmax_indices(values.astype(float), LINE_BUDGET))
    out["grad_a", "heatmap"] = 3  # a 2×3 matrix: its latest value as an image, 3 columns
    return out


def test_live_run_grows_keeps_zoom_and_survives_its_training_being_killed(browser, tmp_path):
    port = free_port()
    (tmp_path / "train.py").write_text(TRAIN)
    train = subprocess.Popen(
        [sys.executable, "train.py", str(port), "1000"], stdout=subprocess.PIPE, text=True
    )
    server = None
    try:
        line = train.stdout.readline()
        match = re.search(r"(http://\S+) \(server pid (\d+)\)", line)
        assert match, f"no dashboard URL printed: {line!r}"
        url, server = match[1], int(match[2])
        wait_for(lambda: lm.list_runs("runs"), 60, "the run to start")
        page, errors = wait_for(lambda: _try_open(browser, url), 30, "the server")
        wait_for(lambda: "LIVE" in status(page), 30, "the page to show the run live")
        wait_for(lambda: len(traces(page)) == 11, 30, "every panel")
        # The run opens before its first step has finished (compiling it, checking that
        # samples do not interact): panels may stand empty for a poll or two.
        wait_for(lambda: None not in newest(page).values(), 30, "the first values")
        first = traces(page)
        first_steps = newest(page)
        assert {(f, k) for _, f, k in first} == set(expected(tmp_path / "runs/live"))
        wait_for(lambda: "steps/s" in status(page), 10, "the training speed")

        # zoom on one step axis: the linked ones follow, and polls keep it
        page.evaluate(
            "() => Plotly.relayout(document.querySelector('#cockpit .js-plotly-plot'),"
            " {'xaxis.range': [2, 30]})"
        )
        time.sleep(4.5)  # two polls
        grown = newest(page)
        for key, step in first_steps.items():  # thinning may shorten a trace, not its end
            assert grown[key] > step, f"{key} did not grow: last step {step} -> {grown[key]}"
        ranges = page.evaluate(
            """() => { const l = document.querySelector('#cockpit .js-plotly-plot')._fullLayout;
            return Object.keys(l).filter(k => /^xaxis\\d*$/.test(k) && l[k].title.text === 'step')
                .map(k => l[k].range); }"""
        )
        assert len(ranges) == 7 and all(r == [2, 30] for r in ranges), ranges
        assert page.evaluate("() => document.querySelectorAll('canvas.gl-canvas').length") == 0
        page.screenshot(path=ARTIFACTS / "dashboard-live.png", full_page=True)

        kill(train)
        wait_for(lambda: "TRAINING PROCESS GONE" in status(page), 20, "the page to say so")
        want = expected(tmp_path / "runs/live")
        drawn = wait_for(lambda: traces(page) if len(traces(page)) == 11 else None, 10, "redraw")
        assert {(f, k): n for (_, f, k), n in drawn.items()} == want
        page.screenshot(path=ARTIFACTS / "dashboard-killed.png", full_page=True)
        assert not errors
    finally:
        kill(train)
        if server is not None:
            kill(server)


def make_run(name: str, epochs: int, lr: float) -> None:
    def loss_fn(w, batch):
        x, y = batch
        return (x @ w - y) ** 2

    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(16, 3)), rng.normal(size=16)) for _ in range(5)]
    import optax

    quantities = [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize(), lm.NormTest()]
    learner = lm.Learner(np.zeros(3), loss_fn, data, optax.sgd(lr), quantities)
    lm.train(learner, epochs=epochs, runs_dir="runs", run_name=name, progress=False)


def test_replay_overlay_themes_and_csv(browser, tmp_path):
    make_run("first", 8, 0.05)
    make_run("second", 12, 0.02)
    port = free_port()
    # With a token, which the page's every request (layout, callbacks, download) must carry
    # in the cookie that the printed URL sets.
    server = subprocess.Popen(
        [sys.executable, "-m", "lmd4ml.dashboard", "runs", "--port", str(port),
         "--token", "browser-test-token"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        url = server.stdout.readline().split(": ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/?token=browser-test-token"
        page, errors = wait_for(lambda: _try_open(browser, url), 30, "the server")
        wait_for(lambda: "FINISHED" in status(page), 20, "the newest run")
        drawn = traces(page)
        assert {run for run, _, _ in drawn} == {"second"}
        assert set(drawn.values()) == {60}

        page.click("#runs")
        page.locator(".dash-dropdown-option", has_text="second (finished, 60 steps)").click()
        page.locator(".dash-dropdown-option", has_text="first (finished, 40 steps)").click()
        page.keyboard.press("Escape")
        wait_for(lambda: {r for r, _, _ in traces(page)} == {"first", "second"}, 20, "overlay")
        drawn = traces(page)
        assert drawn["first", "loss", "scatter"] == 40 and drawn["second", "loss", "scatter"] == 60
        page.get_by_text("dark").click()
        page.get_by_text("log y").click()
        wait_for(
            lambda: page.evaluate(
                "() => document.querySelector('#cockpit .js-plotly-plot')._fullLayout"
                ".yaxis.type === 'log'"
            ),
            10,
            "log scale",
        )
        page.screenshot(path=ARTIFACTS / "dashboard-overlay-dark.png", full_page=True)

        with page.expect_download() as download:
            page.click("#csv")
        text = Path(download.value.path()).read_text()
        # long form: a row for each of the 5 quantities at each of the 60 steps
        assert text.startswith("step,key,value") and len(text.splitlines()) == 1 + 60 * 5
        assert not errors
    finally:
        kill(server)


def _try_open(browser, url: str):
    """The page and its errors once the server answers, else None."""
    try:
        return open_page(browser, url)
    except playwright.Error:
        for page in browser.contexts[-1].pages if browser.contexts else []:
            if page.url in ("about:blank", "chrome-error://chromewebdata/"):
                page.close()
        return None
