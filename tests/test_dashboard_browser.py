"""The dashboard end to end: a real training process, the server, headless Chromium.

Screenshots land in ``$LMD4ML_ARTIFACTS`` (default ``test-artifacts/`` in the repository).
Needs Chromium (``apt-get install chromium``; ``.ci/run`` installs it) and playwright.
"""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_dashboard import STORED_FINDINGS, cockpit_run

import lmd4ml as lm
from lmd4ml.dashboard import inputs
from lmd4ml.dashboard.data import minmax_indices, spread_indices
from lmd4ml.dashboard.figure import HEATMAP_BUDGET, LINE_BUDGET, RAW_OPACITY

playwright = pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(os.environ.get("LMD4ML_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
# Processes started here import the lmd4ml under test, wherever it is installed from.
HERE = {**os.environ, "PYTHONPATH": str(Path(lm.__file__).parents[1])}
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
    lm.train(learner, epochs=int(sys.argv[2]), runs_dir="runs", run_name=sys.argv[3],
             dashboard=int(sys.argv[1]), progress=False)
    """
)
FIELDS = {
    "loss": "lines", "grad_norm": "lines", "distance": "lines", "update_size": "lines",
    "norm_test": ("lines", "norm_circle"), "per_layer['a']": "lines",
    "per_layer['b']": "lines", "grad_hist_1d": ("heatmap", "bars"), "grad_b": "heatmap",
    "grad_a": "image",
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
    """(run, field, kind) -> points drawn, from the page's plotly figure (a gauge's static
    parts left out)."""
    found = page.evaluate(
        """() => {
        const gd = document.querySelector('#cockpit .js-plotly-plot');
        return gd && gd.data ? gd.data.filter(t => t.meta.kind !== 'static').map(t => [t.meta.run,
            t.meta.field, t.meta.kind, t.type === 'bar' ? t.y.length : t.x ? t.x.length
            : t.z.length]) : [];
        }"""
    )
    return {(run, field, kind): n for run, field, kind, n in found}


def layout(page, expression: str):
    """``expression`` of the page's figure, ``gd`` (its ``data``, ``_fullLayout``, …)."""
    return page.evaluate(
        f"() => {{ const gd = document.querySelector('#cockpit .js-plotly-plot'); "
        f"return {expression}; }}"
    )


def newest(page) -> dict[tuple[str, str, str], int]:
    """(run, field, kind) -> the last step drawn, for the traces over steps."""
    found = page.evaluate(
        """() => document.querySelector('#cockpit .js-plotly-plot').data
            .filter(t => t.meta.kind === 'lines' || t.meta.kind === 'heatmap')
            .map(t => [t.meta.run, t.meta.field, t.meta.kind, t.x[t.x.length - 1]])"""
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
    """(field, kind) -> the number of points a panel should hold: every stored step, or as
    many as the server thins them to."""
    run = lm.load_run(run_dir)
    out = {}
    for field, kinds in FIELDS.items():
        steps, values = run[field]
        for kind in (kinds,) if isinstance(kinds, str) else kinds:
            if kind == "bars":
                out[field, kind] = 20
            elif kind == "heatmap":
                out[field, kind] = len(spread_indices(steps, HEATMAP_BUDGET))
            elif kind == "image":
                out[field, kind] = 3  # a 2×3 matrix: its latest value, 3 columns
            elif kind == "norm_circle":
                out[field, kind] = 73  # the gauge's circle, of the latest value
            else:
                out[field, kind] = len(minmax_indices(values.astype(float), LINE_BUDGET))
    return out


def test_live_run_grows_keeps_zoom_and_survives_its_training_being_killed(browser, tmp_path):
    port = free_port()
    (tmp_path / "train.py").write_text(TRAIN)
    # Its live ring is named after it: one of its own, whatever else runs beside the test.
    name = f"live-{os.getpid()}"
    run_dir = tmp_path / "runs" / name
    train = subprocess.Popen(
        [sys.executable, "train.py", str(port), "1000", name], stdout=subprocess.PIPE, text=True,
        env=HERE,
    )  # fmt: skip
    server = None
    try:
        line = train.stdout.readline()
        match = re.search(r"(http://\S+) \(server pid (\d+)\)", line)
        assert match, f"no dashboard URL printed: {line!r}"
        url, server = match[1], int(match[2])
        wait_for(lambda: lm.list_runs("runs"), 60, "the run to start")
        page, errors = wait_for(lambda: _try_open(browser, url), 30, "the server")
        wait_for(lambda: "LIVE" in status(page), 30, "the page to show the run live")
        wait_for(lambda: len(traces(page)) == len(expected(run_dir)), 30,
                 "every panel")  # fmt: skip
        # The run opens before its first step has finished (compiling it, checking that
        # samples do not interact): panels may stand empty for a poll or two.
        wait_for(lambda: None not in newest(page).values(), 30, "the first values")
        first = traces(page)
        first_steps = newest(page)
        assert {(f, k) for _, f, k in first} == set(expected(run_dir))
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
        want = expected(run_dir)
        drawn = wait_for(
            lambda: traces(page) if len(traces(page)) == len(want) else None, 10, "redraw"
        )
        assert {(f, k): n for (_, f, k), n in drawn.items()} == want
        page.screenshot(path=ARTIFACTS / "dashboard-killed.png", full_page=True)
        assert not errors
    finally:
        kill(train)
        if server is not None:
            kill(server)


def test_the_page_reads_like_cockpits_overlays_runs_and_downloads_them(browser, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    # With a token, which the page's every request (layout, callbacks, download) must carry
    # in the cookie that the printed URL sets.
    server = subprocess.Popen(
        [sys.executable, "-m", "lmd4ml.dashboard", "runs", "--port", str(port),
         "--token", "browser-test-token"],
        stdout=subprocess.PIPE, text=True, env=HERE,
    )  # fmt: skip
    try:
        url = server.stdout.readline().split(": ", 1)[1].strip()
        assert url == f"http://127.0.0.1:{port}/?token=browser-test-token"
        page, errors = wait_for(lambda: _try_open(browser, url), 30, "the server")
        # nothing to show: a message, not empty axes
        wait_for(lambda: "no runs yet" in page.text_content("#cockpit"), 10, "the empty state")
        assert layout(page, "gd.querySelectorAll('.xtick, .ytick').length") == 0
        page.screenshot(path=ARTIFACTS / "dashboard-empty.png", full_page=True)

        # runs as lm.train records them; the newest (still running) is shown by itself
        cockpit_run(runs, "a", 60, lr=0.01)
        cockpit_run(runs, "b", 40, lr=0.003, status="interrupted")
        newest_run = cockpit_run(runs, "c", 30, lr=0.001, status="running", total_steps=120)
        newest_run.note({"findings": STORED_FINDINGS})  # as its live diagnosis notes them
        wait_for(lambda: "step 29 of 120 (25%)" in status(page), 20, "the newest run")
        assert page.locator("#status progress").get_attribute("value") == "30"
        drawn = traces(page)
        assert {run for run, _, _ in drawn} == {"c"}
        # value axes titled with their units, a colour bar for each heatmap
        titles = layout(page, "Object.entries(gd._fullLayout).filter(([k]) => /^yaxis/.test(k))"
                              ".map(([, a]) => a.title.text)")  # fmt: skip
        assert {"loss (batch mean)", "α (step on the fitted parabola)", "gradient",
                "learning_rate", "val_acc"} <= set(titles)  # fmt: skip
        assert layout(page, "gd.querySelectorAll('.colorbar').length") == 2  # layers, histogram
        # the layers × steps heatmap's rows are the layers
        rows = layout(page, "gd.data.find(t => t.meta.kind === 'layers').y")
        assert rows == ["total", *(f"layers/{i}/{w}" for i in range(3) for w in ("kernel", "bias"))]
        # Cockpit's gauges: the last 10% of α apart from the rest, the tests in the plane
        assert drawn["c", "alpha", "alpha_recent"] == math.ceil(30 / 10)
        assert drawn["c", "alpha", "alpha_all"] == 30
        legends = layout(page, "Array.from(gd.querySelectorAll('.legend3text'))"
                               ".map(e => e.textContent)")  # fmt: skip
        assert legends == ["norm_test 0.79", "inner_test 0.2", "ortho_test 20"]

        # its findings: a strip above the figure, worst first, each linking to its
        # instrument's docs page in a new tab; bands on the panels they are read from, and
        # the rules' zones (α at -1, 0, 1; the tests at 1)
        wait_for(lambda: page.locator("#status .finding").count() == 2, 10, "the findings")
        strip = page.locator("#status .finding")
        assert strip.nth(0).inner_text().startswith("error\nstalled\nsteps 30–39")
        assert "<b>and</b>" in strip.nth(1).inner_text()  # shown as text, not as markup
        link = strip.nth(1).locator("a")
        assert link.get_attribute("href") == "http://127.0.0.1:8000/instruments/alpha/"
        assert link.get_attribute("target") == "_blank"
        shapes = layout(page, "gd.layout.shapes.map(s => s.name || '')")
        assert shapes.count("finding lr_too_small") == 2  # the α and the loss lines
        assert sum(s.startswith("zone α") for s in shapes) == 3 and "zone 1: noise" in shapes
        band = layout(page, "gd.querySelectorAll('.shapelayer path').length")
        assert band >= len(shapes)  # drawn, not only in the layout

        # smoothing: the raw series faint behind each smoothed line
        page.focus("#smoothing .dash-slider-thumb")
        page.keyboard.press("End")
        for _ in range(9):
            page.keyboard.press("ArrowLeft")
        wait_for(lambda: ("c", "loss", "raw") in traces(page), 10, "the raw series")
        lines = layout(page, "gd.data.filter(t => t.meta.kind === 'lines').length")
        opacities = layout(page, "gd.data.filter(t => t.meta.kind === 'raw').map(t => t.opacity)")
        assert opacities == [RAW_OPACITY] * lines

        # log scale on the loss's panel alone: α's values below 0 stay on a linear axis
        names = layout(page, "gd.layout.annotations.map(a => a.name || '')")
        toggle = names.index(inputs.LOG_TOGGLE + "mini-batch loss")
        page.locator(f"#cockpit g.annotation[data-index='{toggle}']").click()

        def axis_type(kind: str, field: str) -> str:
            trace = f"gd.data.find(t => t.meta.kind === '{kind}' && t.meta.field === '{field}')"
            return layout(page, f"gd._fullLayout[{trace}.yaxis.replace('y', 'yaxis')].type")

        wait_for(lambda: axis_type("lines", "loss") == "log", 10, "the loss in log scale")
        assert axis_type("lines", "alpha") == "linear"
        assert min(layout(page, "gd.data.find(t => t.meta.kind === 'raw' && "
                                "t.meta.field === 'alpha').y")) < 0  # fmt: skip
        page.screenshot(path=ARTIFACTS / "dashboard-cockpit.png", full_page=True)

        # an overlay from the runs table: runs named by the setting that differs, each run's
        # heatmaps, no stray legend entries
        rows = page.locator("#runs label")
        assert [rows.nth(i).inner_text().split("\n")[0] for i in range(3)] == ["c", "b", "a"]
        rows.nth(1).click()
        rows.nth(2).click()
        wait_for(lambda: {r for r, _, _ in traces(page)} == {"a", "b"}, 20, "the overlay")
        entries = layout(page, "Array.from(gd.querySelectorAll('.legendtext'))"
                               ".map(e => e.textContent)")  # fmt: skip
        assert entries == ["b (lr=0.003)", "a (lr=0.01)"]
        drawn = traces(page)
        assert drawn["a", "grad_hist_1d", "heatmap"] == 60
        assert drawn["b", "grad_hist_1d", "heatmap"] == 40
        assert drawn["a", "grad_norm", "layers"] == 60 and drawn["b", "grad_norm", "layers"] == 40
        page.get_by_text("dark").click()
        wait_for(lambda: layout(page, "gd._fullLayout.paper_bgcolor") == "rgb(17,17,17)", 10,
                 "the dark theme")  # fmt: skip
        page.screenshot(path=ARTIFACTS / "dashboard-overlay-dark.png", full_page=True)

        # the CSV: every value of both runs, one row each
        with page.expect_download() as download:
            page.click("#csv")
        lines = Path(download.value.path()).read_text().splitlines()
        assert lines[0] == "step,run,key,value"
        values = sum(len(run[key][0]) * math.prod(run.shapes[key]) for name in ("a", "b")
                     for run in [lm.load_run(runs / name)] for key in run.keys)  # fmt: skip
        assert len(lines) == 1 + values and {line.split(",")[1] for line in lines[1:]} == {"a", "b"}
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
