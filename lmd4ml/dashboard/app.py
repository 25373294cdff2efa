"""The Dash app: one page showing the runs of a runs directory, live while they train.

Every callback's work is a plain function of its inputs (:func:`update`, :func:`run_table`,
:func:`toggle_log`, :func:`csv_download`, :func:`toggle_pause`), so tests call them without a
browser. What the
browser sends is checked first (:mod:`lmd4ml.dashboard.inputs`): a request not shaped as one
of the page's callbacks gets a 400, and the values a callback gets are made valid or refused.
The runs they read are only those the app listed in its runs directory: a chosen run comes
from the browser, and anything else, whatever it names, is refused unread
(:meth:`Listing.find`). A ``dcc.Interval`` polls every 2 seconds: new steps arrive as a
``Patch`` to the one figure; the figure is redrawn only when the choice of runs or options
changes, a run is re-read (it ended, or its ring lapped the reader) or a trace outgrows its
point budget.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flask
from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from lmd4ml.dashboard import findings, inputs, tables
from lmd4ml.dashboard.auth import is_loopback, require_local_host, require_token
from lmd4ml.dashboard.data import RunCache, RunData
from lmd4ml.dashboard.figure import extend, figure, message, view_key
from lmd4ml.diagnosis import SEVERITIES
from lmd4ml.telemetry.store import DB_NAME, RunStoreError, inside, list_runs, load_run

# Each update replots the whole figure, 0.2-0.4 s of CPU in headless Chromium on 2 cores:
# a poll every 2 s keeps what a watching page takes from training small.
POLL_MS = 2000
LIST_TTL_S = 2.0
# One answer for every run refused, so that it says nothing about what the path names.
REFUSED = "refused: a chosen run is not one listed in this dashboard's runs directory"

_PAGE = """<!DOCTYPE html>
<html>
<head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}
<style>
body { margin: 0; font-family: system-ui, sans-serif; }
.page { min-height: 100vh; padding: 8px 16px; }
body.dark { background: #111; color: #ddd; color-scheme: dark;
  --Dash-Text-Primary: rgba(230, 235, 255, 0.87); --Dash-Text-Strong: rgba(240, 242, 255, 0.95);
  --Dash-Text-Weak: rgba(220, 225, 255, 0.65); --Dash-Fill-Inverse-Strong: #1d1f24;
  --Dash-Stroke-Strong: rgba(200, 210, 255, 0.45); --Dash-Stroke-Weak: rgba(200, 210, 255, 0.2);
  --Dash-Fill-Interactive-Weak: rgba(200, 210, 255, 0.08);
  --Dash-Fill-Disabled: rgba(200, 210, 255, 0.25);
  --Dash-Text-Disabled: rgba(220, 225, 255, 0.45); }
body.dark button { background: #2a2d33; color: #ddd; border: 1px solid #555; }
.bar { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; }
.bar h1 { font-size: 18px; margin: 0 8px 0 0; }
.table { flex: 1 1 520px; max-width: 900px; font-size: 13px; }
/* A row is the checkbox, then the cells of its label (a span of spans), in the header's grid. */
.table .head { display: grid; grid-template-columns: 24px var(--cols); gap: 0 10px;
  font-weight: 600; color: #888; border-bottom: 1px solid #8884; }
.runs label { display: grid; grid-template-columns: 24px 1fr; gap: 0 10px; align-items: center;
  cursor: pointer; padding: 1px 0; }
.runs label > span:last-child > span { display: grid; grid-template-columns: var(--cols);
  gap: 0 10px; width: 100%; }
.table span span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.table .head span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.runs { display: block; max-height: 132px; overflow-y: auto; }
.runs label { width: 100%; box-sizing: border-box; }
.runs label:hover { background: #8881; }
.status { margin: 6px 0; font-size: 14px; }
.status progress { width: 120px; height: 10px; margin: 0 6px; vertical-align: middle; }
.status .live { color: #2ca02c; font-weight: 600; }
.status .ended { color: #888; font-weight: 600; }
.status .dead { color: #d62728; font-weight: 600; }
.smooth { width: 220px; }
.findings { margin: 4px 0 6px; font-size: 13px; max-height: 140px; overflow-y: auto; }
.finding { display: flex; gap: 10px; align-items: baseline; padding: 2px 8px;
  border-left: 4px solid; margin: 2px 0; background: #8881; }
.finding .severity { font-weight: 600; min-width: 72px; }
.finding .steps { color: #888; white-space: nowrap; }
.finding .message { flex: 1; }
.finding a { white-space: nowrap; }
button { padding: 3px 10px; }
</style>
</head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body>
</html>"""


class Listing:
    """The runs in ``runs_dir`` (none whose store lies elsewhere), re-read at most every
    ``LIST_TTL_S`` (it opens every run)."""

    def __init__(self, runs_dir: str | os.PathLike):
        self.runs_dir = Path(runs_dir)
        self._lock = threading.Lock()
        self._at = -LIST_TTL_S
        self._runs: list[dict] = []

    def __call__(self) -> list[dict]:
        with self._lock:
            if time.monotonic() - self._at >= LIST_TTL_S:
                self._runs = list_runs(self.runs_dir, confined=True)
                self._at = time.monotonic()
            return self._runs

    def find(self, value: object) -> Path | None:
        """The listed run whose path is ``value``, or None.

        Only the listing is looked at, never the path ``value`` names, so a refusal says
        nothing of what lies there. A listed run is checked again for still lying inside
        the runs directory: one replaced by a symlink since the listing is refused too.
        """
        for run in self():
            if run["path"] == value:
                path = Path(value)
                return path if inside(path / DB_NAME, self.runs_dir) else None
        return None


def run_table(listing: Listing) -> tuple[list[dict], html.Div, str]:
    """The runs table: the chooser's options (newest first; damaged runs listed but
    disabled), each a row of cells (name, status, steps of total, start, the settings that
    differ between runs), its header, and the CSS grid columns of both."""
    runs = listing()
    columns = tables.differing(runs)
    head = [*tables.HEADER, *columns]
    options = []
    for run in reversed(runs):
        cells = tables.row(run, columns)
        options.append({
            "label": html.Span([html.Span(c, title=c) for c in cells]), "value": run["path"],
            "disabled": run["status"] == "damaged",
        })  # fmt: skip
    widths = " ".join(["minmax(160px, 2fr)", "100px", "90px", "90px", *["1fr"] * len(columns)])
    return options, html.Div([html.Span(), *(html.Span(h) for h in head)], className="head"), widths


def chosen(listing: Listing, selected: object) -> tuple[list[Path], str | None]:
    """The runs to show, those chosen or else the newest readable run, and why a choice was
    refused, if one was (``selected`` comes from the browser: anything at all)."""
    values = inputs.run_choice(selected)
    if values is None:
        return [], inputs.TOO_MANY
    if not values:
        readable = [r["path"] for r in listing() if r["status"] != "damaged"]
        values = readable[-1:]
    found = [listing.find(value) for value in values]
    paths = list(dict.fromkeys(path for path in found if path is not None))  # once each
    return paths, (REFUSED if None in found else None)


def describe(run: RunData) -> html.Span:
    """One run's state for the status line: live with its progress (step of the total it
    expects, a bar, speed and time left), ended, or killed."""
    step = run.last_step
    state = run.state
    total = tables.total_steps(run.metadata)
    if state in ("live", "starting"):
        rate = run.steps_per_second()
        speed = f" · {rate:.0f} steps/s" if rate is not None else ""
        done = tables.progress(step, total, rate)
        bar = [html.Progress(value=str(max(step + 1, 0)), max=str(total))] if total else []
        badge = "● LIVE" if state == "live" else "◌ STARTING"
        text = f" {run.name} · " + (done if done else f"step {step}") + speed
        return html.Span([html.Span(badge, className="live"), *bar, text])
    if state == "killed":
        pid = run.metadata.get("pid")
        return html.Span(
            [
                html.Span("✖ TRAINING PROCESS GONE", className="dead"),
                f" {run.name}: process {pid} ended without closing the run (killed?); "
                f"showing its {_n(run)} stored steps, last step {step}",
            ]
        )
    of = f" of {total} expected" if total and state != "finished" else ""
    return html.Span(
        [html.Span(f"■ {state.upper()}", className="ended"), f" {run.name} · {_n(run)} steps{of}"]
    )


def findings_strip(runs: list[RunData], docs: str) -> html.Div | None:
    """The findings strip: a line per finding of each run (its name too when several are
    shown), worst first: severity, code, steps, message, and a link to its instrument's
    docs page under ``docs`` in a new tab; None without findings. The findings were
    checked when read (:func:`lmd4ml.dashboard.findings.checked`), and Dash escapes text."""
    rows = []
    for run in runs:
        for f in sorted(run.findings, key=lambda f: -SEVERITIES.index(f.severity)):
            color = findings.SEVERITY_COLORS[f.severity]
            page = f.docs.removeprefix("instruments/").removesuffix(".md")
            rows.append(html.Div(
                [
                    html.Span(f.severity, className="severity", style={"color": color}),
                    html.B(f.code),
                    html.Span(findings.steps_text(f), className="steps"),
                    *([html.Span(run.name, className="steps")] if len(runs) > 1 else []),
                    html.Span(f.message, className="message"),
                    html.A(f"{page} docs ↗", href=findings.page_url(f, docs), target="_blank",
                           rel="noopener noreferrer", title="the instrument's docs page"),
                ],
                className=f"finding {f.severity}", style={"borderLeftColor": color},
            ))  # fmt: skip
    return html.Div(rows, className="findings") if rows else None


def _n(run: RunData) -> int:
    return max((c.count for c in run.columns.values()), default=0)


def update(
    cache: RunCache,
    listing: Listing,
    selected: object,
    smoothing: float,
    log: frozenset[str],
    dark: bool,
    view: dict | None,
    redraw: bool,
    docs: str = findings.DOCS_URL,
) -> tuple[Any, dict | None, list]:
    """One poll or option change: ``(figure or Patch, view, status line)``.

    ``log`` names the panels shown in log scale. ``redraw`` asks for the full figure (an
    option changed); otherwise new steps are sent as a Patch when the drawn figure can take
    them (a change in the runs' findings redraws). With no run, or none with a value yet,
    the figure is a message, not empty axes. The status line ends with the findings strip
    (:func:`findings_strip`, its links under ``docs``).
    """
    with cache.lock:
        paths, refused = chosen(listing, selected)
        runs, status = [], [html.Div(refused, className="dead")] if refused else []
        for path in paths:
            try:
                run = cache.get(path)
            except RunStoreError as error:
                status.append(html.Div(f"cannot show {path.name}: {error}", className="dead"))
                continue
            runs.append(run)
            status.append(html.Div(describe(run)))
        if (strip := findings_strip(runs, docs)) is not None:
            status.append(strip)
        if not runs:
            text = "" if refused else f"no runs yet in {listing.runs_dir}: waiting for lm.train"
            waiting = [html.Div(text)] if text else []
            return message(text or "nothing to show", dark), None, [*status, *waiting]
        if not any(c.n for run in runs for c in run.columns.values()):
            names = ", ".join(run.name for run in runs)
            text = f"{names}: no steps recorded yet (the first one compiles)"
            return message(text, dark), None, status
        key = view_key(
            [str(r.path) for r in runs], smoothing, log, dark, [r.findings for r in runs]
        )
        if not redraw and view is not None and view.get("key") == key:
            patched = extend(runs, view, smoothing)
            if patched is not None:
                patch, new_view = patched
                return (no_update if patch is None else patch), new_view, status
        fig, new_view = figure(runs, smoothing, log, dark)
        return fig, new_view, status


def toggle_log(title: str | None, logged: frozenset[str]) -> list[str] | Any:
    """The panels in log scale after a click on the log toggle of panel ``title`` (None: not
    a toggle, nothing changes)."""
    if title is None:
        return no_update
    return sorted(logged ^ {title})


def toggle_pause(clicks: int | None) -> tuple[bool, str, str]:
    """The poll's ``disabled``, the button's label and the pause badge after ``clicks``."""
    paused = bool(clicks and clicks % 2)
    return paused, ("▶ resume" if paused else "❚❚ pause"), ("❚❚ PAUSED" if paused else "")


def csv_download(listing: Listing, selected: object) -> dict:
    """Every value of the shown runs (those chosen, or the newest) as CSV in long format,
    ``step, run, key, value`` (:func:`lmd4ml.dashboard.tables.long_csv`), for
    ``dcc.Download``."""
    paths, refused = chosen(listing, selected)
    if refused:
        return {"content": refused + "\n", "filename": "refused.txt"}
    if not paths:
        return no_update
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except RunStoreError as error:  # damaged or removed since it was listed
            return {"content": f"cannot read {path.name}: {error}\n", "filename": "error.txt"}
    name = paths[0].name if len(paths) == 1 else f"{len(paths)}-runs"
    return {"content": tables.long_csv(runs), "filename": f"{name}.csv"}


def create_app(
    runs_dir: str | os.PathLike,
    token: str | None = None,
    host: str = "127.0.0.1",
    docs_url: str = findings.DOCS_URL,
) -> Dash:
    """The dashboard for ``runs_dir`` (which need not have runs yet), to be served at
    ``host``; with ``token``, every request must carry it, and on loopback every request
    must be addressed to it there (:mod:`lmd4ml.dashboard.auth`). The findings strip links
    to the instruments' pages of the docs site at ``docs_url`` (by default where
    ``mkdocs serve`` serves it)."""
    docs = findings.docs_url(docs_url)
    cache, listing = RunCache(), Listing(runs_dir)
    app = Dash(__name__, title="lmd4ml", update_title=None)
    app.server.config["MAX_CONTENT_LENGTH"] = inputs.MAX_REQUEST_BYTES
    if is_loopback(host):
        require_local_host(app.server, host)
    if token is not None:
        require_token(app.server, token)
    app.index_string = _PAGE
    options, head, widths = run_table(listing)
    controls = [
        html.H1("lmd4ml"),
        html.Div(
            id="table", className="table", style={"--cols": widths},
            title="none ticked: the newest run; tick several to overlay them",
            children=[
                html.Div(head, id="runs-head"),
                dcc.Checklist(id="runs", options=options, value=[], className="runs"),
            ],
        ),
        html.Span("smoothing"),
        html.Div(
            dcc.Slider(id="smoothing", min=0, max=inputs.SMOOTHING_MAX, step=0.01, value=0,
                       marks={0: "0", 0.5: "0.5", inputs.SMOOTHING_MAX: "0.99"}),
            className="smooth",
        ),
        dcc.RadioItems(id="theme", options=["light", "dark"], value="light", inline=True),
        html.Button("❚❚ pause", id="pause"),
        html.Button("CSV", id="csv"),
        dcc.Download(id="download"),
    ]  # fmt: skip
    app.layout = html.Div(
        id="page",
        className="page",
        children=[
            html.Div(controls, className="bar"),
            html.Div([html.Span(id="paused", className="dead"), html.Div(id="status")],
                     className="status"),
            dcc.Graph(id="cockpit", config={"displaylogo": False}),
            dcc.Interval(id="tick", interval=POLL_MS),
            dcc.Interval(id="list-tick", interval=3 * POLL_MS),
            dcc.Store(id="view"),
            dcc.Store(id="logged", data=[]),
        ],
    )  # fmt: skip

    @app.callback(
        Output("cockpit", "figure"),
        Output("view", "data"),
        Output("status", "children"),
        Input("tick", "n_intervals"),
        Input("runs", "value"),
        Input("smoothing", "value"),
        Input("logged", "data"),
        Input("theme", "value"),
        State("view", "data"),
    )
    def _update(_, selected, smoothing, logged, theme, view):
        redraw = ctx.triggered_id not in ("tick", None)
        return update(
            cache, listing, selected, inputs.smoothing(smoothing), inputs.logged(logged),
            inputs.dark(theme), inputs.view(view), redraw, docs,
        )  # fmt: skip

    @app.callback(
        Output("logged", "data"),
        Input("cockpit", "clickAnnotationData"),
        State("logged", "data"),
        prevent_initial_call=True,
    )
    def _log(click, logged):
        return toggle_log(inputs.log_click(click), inputs.logged(logged))

    @app.callback(
        Output("runs", "options"),
        Output("runs-head", "children"),
        Output("table", "style"),
        Input("list-tick", "n_intervals"),
    )
    def _table(_):
        options, head, widths = run_table(listing)
        return options, head, {"--cols": widths}

    @app.callback(
        Output("tick", "disabled"),
        Output("pause", "children"),
        Output("paused", "children"),
        Input("pause", "n_clicks"),
    )
    def _pause(clicks):
        return toggle_pause(inputs.clicks(clicks))

    # On the body, so that the whole page (its runs table included) follows the theme.
    app.clientside_callback(
        "(theme) => { document.body.className = theme; return window.dash_clientside.no_update; }",
        Output("page", "title"),
        Input("theme", "value"),
    )

    @app.callback(
        Output("download", "data"),
        Input("csv", "n_clicks"),
        State("runs", "value"),
        prevent_initial_call=True,
    )
    def _csv(_, selected):
        return csv_download(listing, selected)

    app.server.before_request(_callback_check(app))
    return app


def _callback_check(app: Dash) -> Callable[[], flask.Response | None]:
    """A hook answering 400 to a callback request not shaped as one of ``app``'s callbacks
    (:func:`lmd4ml.dashboard.inputs.callback_problem`), before Dash reads it."""
    route = app.config.routes_pathname_prefix + "_dash-update-component"

    def check() -> flask.Response | None:
        if flask.request.method != "POST" or flask.request.path != route:
            return None
        try:
            body = flask.request.get_json(silent=True)  # None if not JSON
        except RecursionError:  # nested deeper than Python parses
            body = None
        problem = inputs.callback_problem(body, app.callback_map)
        if problem is None:
            return None
        return flask.Response(f"400 Bad Request: {problem}\n", 400, mimetype="text/plain")

    return check
