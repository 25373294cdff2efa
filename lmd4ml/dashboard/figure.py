"""The cockpit figure as a plain plotly dict, and the patches that stream new steps into it.

One figure holds every panel, so that the step axes can be linked (``matches``) and zoom
kept (``uirevision``) by plotly itself. Traces are SVG (``scatter``, ``bar``, ``heatmap``):
the page uses no WebGL context at all. Long series are thinned on the server
(:func:`~lmd4ml.dashboard.data.minmax_indices`); new steps are appended with a Dash
``Patch`` until a trace holds twice its budget, and then the figure is redrawn.

What it draws, after Cockpit (Schneider et al., 2021) and TensorBoard:

- a line per field, and with smoothing on, the raw series faint behind the smoothed one;
- value axes titled with what they show and its unit; heatmaps with a colour bar;
- a log-scale toggle in each panel that can take one (its annotation, named
  ``LOG_TOGGLE + panel title``, is what the page sends back when it is clicked);
- Cockpit's α gauge: each step's α placed on the parabola y = α² that its step length
  fits, all steps faint and the most recent 10% in colour, with their means;
- Cockpit's gradient-tests gauge: around the gradient (the cross at the origin), the norm
  test as a circle, the inner-product test as a band along g, the orthogonality test as a
  band across it (the latest values, axes in symmetric log scale; the dashed unit circle
  is where a test reads 1);
- several runs: a colour per run, named in the legend by name and the settings that differ;
  heatmaps and images once per run;
- the zones the diagnosis rules read (:mod:`lmd4ml.diagnosis`): α at −1, 0 and 1, the
  gradient tests at 1, the top eigenvalue where η·λ_max reaches the optimizer's stability
  limit (2 for plain SGD, known for plain and momentum SGD at a constant rate);
- each finding of a run's diagnosis as a band over its steps, in its severity's colour and
  named by its code, on the panels of the instruments it is read from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from lmd4ml.dashboard import tables
from lmd4ml.dashboard.data import RunData, minmax_indices, spread_indices
from lmd4ml.dashboard.findings import SEVERITY_COLORS
from lmd4ml.dashboard.inputs import LOG_TOGGLE
from lmd4ml.dashboard.panels import (
    BOTTOM,
    COLUMNS,
    TESTS,
    Panel,
    fields_of,
    grid,
    leaf_label,
    plan,
)
from lmd4ml.diagnosis import EVIDENCE, optimizer_facts

LINE_BUDGET = 1000  # points per line trace after thinning
HEATMAP_BUDGET = 200  # steps (columns) per heatmap
GAUGE_BUDGET = 500  # α values placed on the gauge's parabola, of all steps
ROW_PX = 240
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
DASHES = ("solid", "dot", "dash", "longdash", "dashdot")
DASH_GLYPHS = ("━", "┈", "╌", "─ ─", "-·-")  # each dash as a title names it
GREY = "#999999"
RAW_OPACITY = 0.25  # the raw series behind a smoothed one, as TensorBoard draws it
ALPHA_EDGE = 1.5  # the α gauge's half width: α beyond it sits at the edge, as a triangle
RECENT = 0.1  # the share of steps the α gauge shows as recent
SYMLOG_LINEAR = 0.1  # the gradient-tests gauge is linear within this, logarithmic beyond
TESTS_EDGE = 10.0  # and reaches this value: a test beyond it is drawn at the edge
PER_RUN = ("layers", "heatmap", "image")  # drawn once per run: they cannot be overlaid
EMPTY = "no values yet"
FINDING_OPACITY = 0.15  # a finding's band over its steps: the lines stay readable through it


@functools.lru_cache(maxsize=2)
def _template(dark: bool) -> dict:
    import plotly.io as pio

    return pio.templates["plotly_dark" if dark else "plotly_white"].to_plotly_json()


def _axis(run: RunData, field: str, dim: int, n: int) -> tuple[str, list[float]]:
    """Name and coordinates of dimension ``dim`` of a field's value, as its quantity recorded
    them (``Quantity.axes``: a histogram's bin centres); else ("bin", positions 0, 1, …)."""
    axes = list(run.metadata.get("axes", {}).get(field, {}).items())
    if dim < len(axes) and len(axes[dim][1]) == n:
        return axes[dim]
    return "bin", list(range(n))


def _title_of_axis(text: str) -> dict[str, Any]:
    return {"text": text, "standoff": 2}


def _counts(values: np.ndarray) -> np.ndarray:
    """Histogram counts are shown as log10(1 + count): the tails would be invisible else.
    Colours only, to 4 decimals: a quarter of the bytes of full precision to send."""
    return np.round(np.log10(1 + values), 4) if values.dtype.kind in "iu" else values


def _log10(values: np.ndarray) -> np.ndarray:
    """log10 of the positive values, NaN (a gap) elsewhere."""
    values = np.asarray(values, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _series(values: np.ndarray) -> list:
    """Values as JSON-ready (nested) lists; NaN and ±inf become null, drawn as gaps."""
    values = np.asarray(values, np.float64)
    return np.where(np.isfinite(values), values, None).tolist()


def symlog(values: np.ndarray | float) -> np.ndarray:
    """The gradient-tests gauge's symmetric log scale: linear within ``SYMLOG_LINEAR`` of 0,
    logarithmic beyond (sign(v) log10(1 + |v| / SYMLOG_LINEAR)).

    Example:
      >>> symlog(np.array([-10.0, 0.0, 0.1, 0.9])).round(3).tolist()
      [-2.004, 0.0, 0.301, 1.0]
    """
    values = np.asarray(values, np.float64)
    return np.sign(values) * np.log10(1 + np.abs(values) / SYMLOG_LINEAR)


_TESTS_RANGE = float(symlog(TESTS_EDGE)) * 1.06
_TICKS = (1.0, 10.0)


def circle(radius: float, n: int = 73) -> tuple[list[float], list[float]]:
    """A closed polygon of ``n`` points around the origin: the norm test's circle.

    Example:
      >>> x, y = circle(2.0, 5)
      >>> np.round(x, 6).tolist(), np.round(y, 6).tolist()
      ([2.0, 0.0, -2.0, -0.0, 2.0], [0.0, 2.0, 0.0, -2.0, -0.0])
    """
    angles = np.linspace(0, 2 * np.pi, n)
    return (radius * np.cos(angles)).tolist(), (radius * np.sin(angles)).tolist()


def band(half: float, reach: float, across: bool) -> tuple[list[float], list[float]]:
    """A closed rectangle |y| <= ``half`` for |x| <= ``reach`` (along g: the inner-product
    test), or with ``across``, |x| <= ``half`` for |y| <= ``reach`` (the orthogonality test).

    Example:
      >>> band(1.0, 3.0, across=False)
      ([-3.0, 3.0, 3.0, -3.0, -3.0], [-1.0, -1.0, 1.0, 1.0, -1.0])
    """
    xs, ys = [-reach, reach, reach, -reach, -reach], [-half, -half, half, half, -half]
    return (ys, xs) if across else (xs, ys)


def alpha_points(
    steps: np.ndarray, alphas: np.ndarray, recent: bool, budget: int = GAUGE_BUDGET
) -> tuple[list, list, list, list, float]:
    """One group of the α gauge's points: all steps, or the ``recent`` 10% of them, as
    ``(x, y, steps, α, mean α)``, at most ``budget`` spread over the group: α clipped to the
    gauge's edge ±``ALPHA_EDGE`` and placed on the parabola y = x². NaN α (no value at that
    step) is left out. Only the mean reads every value: a poll of a 10⁶-step run stays cheap.

    Example:
      >>> alphas = np.array([0.5] * 9 + [-3.0])
      >>> alpha_points(np.arange(10), alphas, recent=True)
      ([-1.5], [2.25], [9], [-3.0], -3.0)
      >>> x, y, steps, _, mean = alpha_points(np.arange(10), alphas, recent=False, budget=3)
      >>> x, steps, round(mean, 2)
      ([0.5, 0.5, -1.5], [0, 5, 9], 0.15)
    """
    if recent:
        start = len(steps) - math.ceil(RECENT * len(steps))
        steps, alphas = steps[start:], alphas[start:]
    finite = np.isfinite(alphas)
    mean = float(np.mean(alphas, where=finite, dtype=np.float64)) if finite.any() else math.nan
    pick = spread_indices(steps, budget)
    pick = pick[finite[pick]]
    a = alphas[pick].astype(np.float64)
    x = np.clip(a, -ALPHA_EDGE, ALPHA_EDGE)
    return x.tolist(), (x**2).tolist(), steps[pick].tolist(), a.tolist(), mean


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where a panel is drawn: its axes' suffix ("", "2", …), its domain in the figure
    (paper coordinates) and, for a gauge, the legend inside it."""

    suffix: str
    x0: float
    x1: float
    y0: float
    y1: float
    legend: str = ""

    @property
    def axes(self) -> dict[str, str]:
        return {"xaxis": f"x{self.suffix}", "yaxis": f"y{self.suffix}"}

    def colorbar(self, title: str) -> dict[str, Any]:
        """A colour bar just right of the panel, as tall as it."""
        return {
            "x": self.x1 + 0.004, "xanchor": "left", "y": (self.y0 + self.y1) / 2,
            "yanchor": "middle", "len": self.y1 - self.y0, "thickness": 8,
            "title": {"text": title, "side": "right", "font": {"size": 10}},
            "tickfont": {"size": 9},
        }  # fmt: skip


def _title(panel: Panel, many: bool, first_of_group: bool) -> str:
    """The panel's title; a few lines also name their entries in their colour (or dash, when
    colour tells runs apart), which a shared legend could not place beside their panel. The
    first panel of a bottom group names the group."""
    title = f"<b>{panel.title}</b>" + (f" · {panel.label}" if panel.label else "")
    if first_of_group and panel.group in BOTTOM:
        title = f"<span style='color:{GREY}'>{panel.group}</span>  {title}"
    if panel.kind != "lines" or not 1 < len(panel.fields) <= 4:
        return title
    names = entry_names(panel.fields)
    if many:
        keys = [f"{DASH_GLYPHS[e % len(DASHES)]} {f}" for e, f in enumerate(names)]
    else:
        keys = [
            f"<span style='color:{COLORS[e % len(COLORS)]}'>━ {f}</span>"
            for e, f in enumerate(names)
        ]
    return f"{title}  " + "  ".join(keys)


def entry_names(fields: Sequence[str]) -> list[str]:
    """Fields named in a panel's title, short: the leaves of one pytree quantity by their
    paths, others without the words they all begin with.

    Example:
      >>> entry_names(["hess_max_ev_iterations", "hess_max_ev_converged"])
      ['iterations', 'converged']
      >>> entry_names(["per_layer['a']", "per_layer['b']"])
      ['a', 'b']
      >>> entry_names(["norm_test", "inner_test"]), entry_names(["tic", "tic_trace"])
      (['norm_test', 'inner_test'], ['tic', 'tic_trace'])
    """
    keys = {re.split(r"[\[.]", f, maxsplit=1)[0] for f in fields}
    if len(keys) == 1 and all(f != next(iter(keys)) for f in fields):
        return [leaf_label(next(iter(keys)), f) for f in fields]
    words = [f.split("_") for f in fields]
    n = 0
    while all(len(w) > n + 1 and w[n] == words[0][n] for w in words):
        n += 1
    return ["_".join(w[n:]) for w in words]


def _log_toggle(panel: Panel, place: _Place, on: bool) -> dict[str, Any]:
    """The panel's log-scale switch: an annotation the page reports clicks on."""
    return {
        "text": "log ✓" if on else "log", "name": LOG_TOGGLE + panel.title,
        # Just right of the panel, on its title's line: the title keeps the panel's width.
        "captureevents": True, "x": place.x1, "xshift": 4, "y": place.y1, "xref": "paper",
        "yref": "paper", "xanchor": "left", "yanchor": "bottom", "showarrow": False,
        "font": {"size": 11},
        "bordercolor": GREY, "borderwidth": 1, "borderpad": 2,
        "bgcolor": "rgba(31,119,180,0.35)" if on else "rgba(0,0,0,0)",
        "hovertext": "switch the value axis between linear and log scale",
    }  # fmt: skip


def _gauge_axes(panel: Panel, suffix: str, xaxis: dict, yaxis: dict) -> list[dict]:
    """A gauge's fixed axes, and the shapes drawn on them (α's −1, 0 and 1)."""
    if panel.kind == "alpha":
        xaxis.update(range=[-1.6, 1.6], title=_title_of_axis("local step length α"))
        yaxis.update(range=[0, 2.4], title=_title_of_axis(panel.unit))
        return [
            {"type": "line", "xref": f"x{suffix}", "yref": f"y{suffix} domain", "x0": a,
             "x1": a, "y0": 0, "y1": 1, "layer": "below",
             "line": {"color": GREY, "width": 1, "dash": "dot"}}
            for a in (-1, 0, 1)
        ]  # fmt: skip
    ticks = [-t for t in reversed(_TICKS)] + [0.0, *_TICKS]
    scale = {
        "range": [-_TESTS_RANGE, _TESTS_RANGE], "tickvals": symlog(np.array(ticks)).tolist(),
        "ticktext": [f"{t:g}" for t in ticks], "zeroline": False,
    }  # fmt: skip
    xaxis.update(scale, title=_title_of_axis("across g (ortho)"))
    # One scale on both axes, so that the norm test's circle is round.
    yaxis.update(scale, title=_title_of_axis(panel.unit), scaleanchor=f"x{suffix}")
    return []


@functools.lru_cache(maxsize=32)
def _frame(
    panels: tuple[Panel, ...], dark: bool, log: frozenset[str], many: bool
) -> tuple[dict, tuple[_Place, ...]]:
    """The figure's layout and where each panel goes: fixed per structure."""
    places_in_grid, n_rows, n_cols = grid(panels)
    height = n_rows * ROW_PX + 110
    hgap, vgap = 0.085, 80 / height
    row_h = (1 - vgap * (n_rows - 1)) / n_rows
    col_w = (1 - hgap * (n_cols - 1)) / n_cols
    top = 100 if many else 70
    layout: dict[str, Any] = {
        "template": _template(dark),
        "height": height,
        "margin": {"l": 60, "r": 40, "t": top, "b": 40},
        # With several runs, the legend names each run's colour once, above the column
        # headers; the gauges have legends of their own.
        "showlegend": True,
        "legend": {
            "orientation": "h",
            "x": 1,
            "xanchor": "right",
            "yanchor": "bottom",
            "y": 1 + 56 / (height - top - 40),
        },
        "hovermode": "closest",
        "barmode": "overlay",
        "annotations": [],
        "shapes": [],
    }
    places = []
    first_steps = None
    groups_seen: set[str] = set()
    gauges = 0
    for i, (panel, (row, col, span)) in enumerate(zip(panels, places_in_grid, strict=True)):
        suffix = "" if i == 0 else str(i + 1)
        x0 = (col - 1) * (col_w + hgap)
        x1 = x0 + span * col_w + (span - 1) * hgap
        y1 = 1 - (row - 1) * (row_h + vgap)
        y0 = y1 - row_h
        # plotly takes domains within [0, 1], which rounding can leave by 1e-17
        x0, x1, y0, y1 = (min(max(round(v, 9), 0.0), 1.0) for v in (x0, x1, y0, y1))
        legend = ""
        if panel.kind in ("alpha", "tests"):
            gauges += 1
            legend = f"legend{gauges + 1}"
            # α's points keep to the parabola, low in the middle; the tests' plane is square
            # (one scale on both axes), in the middle of its wider panel.
            at = ((x0 + x1) / 2, "center") if panel.kind == "alpha" else (x1, "right")
            layout[legend] = {
                "x": at[0], "y": y1, "xanchor": at[1], "yanchor": "top",
                "bgcolor": "rgba(0,0,0,0)", "font": {"size": 10},
            }  # fmt: skip
        place = _Place(suffix, x0, x1, y0, y1, legend)
        places.append(place)
        xaxis: dict[str, Any] = {"domain": [x0, x1], "anchor": f"y{suffix}"}
        yaxis: dict[str, Any] = {"domain": [y0, y1], "anchor": f"x{suffix}"}
        if panel.over_steps:
            xaxis["title"] = _title_of_axis("step")
            if first_steps is None:
                first_steps = f"x{suffix}"
            else:
                xaxis["matches"] = first_steps
        if panel.kind == "lines":  # a layers panel's rows are labelled: no title
            yaxis["title"] = _title_of_axis(panel.unit)
        if panel.kind in ("lines", "bars") and panel.title in log:
            yaxis["type"] = "log"
        if panel.kind in ("alpha", "tests"):
            layout["shapes"] += _gauge_axes(panel, suffix, xaxis, yaxis)
        layout[f"xaxis{suffix}"], layout[f"yaxis{suffix}"] = xaxis, yaxis
        title = _title(panel, many, panel.group not in groups_seen)
        groups_seen.add(panel.group)
        layout["annotations"].append(
            {"text": title, "x": x0, "y": y1, "xref": "paper", "yref": "paper",
             "xanchor": "left", "yanchor": "bottom", "showarrow": False, "font": {"size": 13}}
        )  # fmt: skip
        if panel.loggable:
            layout["annotations"].append(_log_toggle(panel, place, panel.title in log))
    columns = [g for g in COLUMNS if any(p.group == g for p in panels)]
    for col, group in enumerate(columns):
        x = col * (col_w + hgap) + col_w / 2
        layout["annotations"].append(
            {"text": group, "x": x, "y": 1, "yshift": 30, "xref": "paper", "yref": "paper",
             "xanchor": "center", "yanchor": "bottom", "showarrow": False,
             "font": {"size": 15, "color": "#888"}}
        )  # fmt: skip
    return layout, tuple(places)


def kinds_of(run: RunData) -> dict[str, str]:
    """The kind of each of a run's quantity keys (its class's default key), as its metadata
    records it (``quantities_by_key``); ``{}`` for a run that records none."""
    described = run.metadata.get("quantities_by_key")
    if not isinstance(described, dict):
        return {}
    return {
        key: about["kind"]
        for key, about in described.items()
        if isinstance(about, dict) and isinstance(about.get("kind"), str)
    }


def run_labels(runs: Sequence[RunData]) -> list[str]:
    """Each run's name, with the settings that tell it from the others shown with it."""
    return tables.labels([{**run.metadata, "name": run.name} for run in runs])


def _leaves(run: RunData, key: str) -> list[str]:
    """A layers panel's rows in ``run``: the scalar leaves of pytree quantity ``key``."""
    return [f for f in fields_of(key, list(run.columns)) if not run.shapes[f]]


def _shows(panel: Panel, run: RunData) -> bool:
    if panel.kind == "layers":
        return bool(_leaves(run, panel.fields[0]))
    return panel.fields[0] in run.columns


def runs_plan(runs: Sequence[RunData]) -> tuple[Panel, ...]:
    """The panels for runs shown together: every quantity any of them tracks, first run first;
    a panel that shows one run's values (a heatmap, an image) once for each run that has them.
    """
    keys: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, str] = {}
    for run in runs:
        keys += [k for k in run.metadata.get("keys", []) if k not in keys]
        for field, shape in run.shapes.items():
            shapes.setdefault(field, shape)
        for key, kind in kinds_of(run).items():
            kinds.setdefault(key, kind)
    # The legend tells runs by their settings; a panel of one run names it.
    labels = [run.name if len(runs) > 1 else "" for run in runs]
    panels: list[Panel] = []
    for panel in plan(keys, shapes, kinds):
        if panel.kind not in PER_RUN:
            panels.append(panel)
            continue
        panels += [
            dataclasses.replace(panel, run=str(run.path), label=label)
            for run, label in zip(runs, labels, strict=True)
            if _shows(panel, run)
        ]
    return tuple(panels)


def _line_points(run: RunData, field: str, smoothing: float, start: int, thin: bool) -> tuple:
    column = run.columns[field]
    values = column.smoothed(smoothing) if smoothing else column.values
    steps = column.steps
    if thin:
        keep = minmax_indices(values, LINE_BUDGET)
        return steps[keep], values[keep]
    return steps[start:], values[start:]


def _layer_rows(run: RunData, leaves: Sequence[str], start: int, log: bool) -> tuple:
    """Steps from row ``start`` on and the values of ``leaves`` at them, one row per step
    (a leaf without a value at a step: NaN), coloured by log10 when ``log``."""
    steps = run.columns[leaves[0]].steps[start:]
    rows = np.full((len(steps), len(leaves)), np.nan)
    for j, leaf in enumerate(leaves):
        column = run.columns[leaf]
        at = np.searchsorted(column.steps, steps)
        found = at < column.n
        found[found] = column.steps[at[found]] == steps[found]
        rows[found, j] = column.values[at[found]]
    return steps, (_log10(rows) if log else rows)


def view_key(
    paths: Sequence[str],
    smoothing: float,
    log: Collection[str],
    dark: bool,
    findings: Sequence[Sequence[Any]] = (),
) -> str:
    """What a drawn figure depends on besides the data (``findings``: each run's, as
    :class:`~lmd4ml.diagnosis.Finding` s): another key means a redraw."""
    marks = [[(f.code, f.severity, f.first_step, f.last_step) for f in fs] for fs in findings]
    return json.dumps([list(paths), smoothing, sorted(log), dark, marks])


@dataclasses.dataclass
class _Drawing:
    """What a figure is being drawn with, and what it has so far."""

    runs: Sequence[RunData]
    labels: list[str]
    smoothing: float
    log: frozenset[str]
    layout: dict
    data: list = dataclasses.field(default_factory=list)
    traces: list = dataclasses.field(default_factory=list)

    @property
    def many(self) -> bool:
        return len(self.runs) > 1

    def add(self, trace: dict, run: RunData | None, field: str, kind: str, steps) -> None:
        """One trace, and what :func:`extend` needs to know of it (``run`` None: static).
        Its ``meta`` says what it draws (panel, field, run) and as what (``kind``)."""
        trace["meta"] = {**trace["meta"], "kind": kind}
        self.data.append(trace)
        if run is None:
            self.traces.append({"run": "", "field": field, "kind": "static", "n": 0, "last": -1})
        else:
            self.traces.append(_trace(run, field, kind, steps))


def _draw_lines(d: _Drawing, panel: Panel, place: _Place) -> None:
    shown = {t["legendgroup"] for t in d.data if t["showlegend"] and "legend" not in t}
    for r, run in enumerate(d.runs):
        for e, field in enumerate(panel.fields):
            if field not in run.columns:
                continue
            color = COLORS[(r if d.many else e) % len(COLORS)]
            dash = DASHES[e % len(DASHES)] if d.many else "solid"
            line = {"color": color, "width": 1.5, "dash": dash}
            meta = {"panel": panel.title, "field": field, "run": run.name}
            if d.smoothing:
                x, y = _line_points(run, field, 0.0, 0, thin=True)
                d.add(
                    {"type": "scatter", "mode": "lines", "x": x.tolist(), "y": _series(y),
                     "name": f"{field} (raw)", "showlegend": False, "hoverinfo": "skip",
                     "opacity": RAW_OPACITY, "line": {**line, "width": 1}, "meta": meta,
                     **place.axes},
                    run, field, "raw", x,
                )  # fmt: skip
            x, y = _line_points(run, field, d.smoothing, 0, thin=True)
            legend = d.many and run.name not in shown
            shown.add(run.name)
            d.add(
                {"type": "scatter", "mode": "lines", "x": x.tolist(), "y": _series(y),
                 "name": d.labels[r] if d.many else field, "legendgroup": run.name,
                 "showlegend": legend,
                 "hovertemplate": f"{d.labels[r]}<br>{field}: %{{y:.4g}}<br>step %{{x}}"
                                  "<extra></extra>",
                 "line": line, "meta": meta, **place.axes},
                run, field, "lines", x,
            )  # fmt: skip


def _run_of(d: _Drawing, panel: Panel) -> RunData:
    return next(r for r in d.runs if str(r.path) == panel.run)


def _draw_layers(d: _Drawing, panel: Panel, place: _Place) -> None:
    run, key = _run_of(d, panel), panel.fields[0]
    leaves = _leaves(run, key)
    log = panel.title in d.log
    steps, rows = _layer_rows(run, leaves, 0, log)
    keep = spread_indices(steps, HEATMAP_BUDGET)
    what = f"log₁₀ {panel.unit}" if log else panel.unit
    d.add(
        {"type": "heatmap", "transpose": True, "x": steps[keep].tolist(),
         "y": [leaf_label(key, f) for f in leaves], "z": _series(rows[keep]), "name": run.name,
         "colorscale": "Viridis", "colorbar": place.colorbar(what), "showlegend": False,
         "hovertemplate": f"step %{{x}}<br>%{{y}}<br>{what} %{{z:.4g}}<extra></extra>",
         "meta": {"panel": panel.title, "field": key, "run": run.name}, **place.axes},
        run, key, "layers_log" if log else "layers", steps[keep],
    )  # fmt: skip


def _draw_heatmap(d: _Drawing, panel: Panel, place: _Place) -> None:
    run, field = _run_of(d, panel), panel.fields[0]
    column = run.columns[field]
    name, bins = _axis(run, field, 0, int(np.prod(column.values.shape[1:])))
    d.layout[f"yaxis{place.suffix}"]["title"] = _title_of_axis(name)
    what = "log₁₀(1 + count)" if column.values.dtype.kind in "iu" else panel.unit
    keep = spread_indices(column.steps, HEATMAP_BUDGET)
    z = _counts(column.values[keep].reshape(len(keep), len(bins)))
    d.add(
        {"type": "heatmap", "transpose": True, "x": column.steps[keep].tolist(), "y": bins,
         "z": _series(z), "name": run.name, "colorscale": "Viridis",
         "colorbar": place.colorbar(what),
         "zsmooth": "fast", "showlegend": False,
         "hovertemplate": f"step %{{x}}<br>{name} %{{y:.4g}}<br>{what} %{{z:.3g}}"
                          "<extra></extra>",
         "meta": {"panel": panel.title, "field": field, "run": run.name}, **place.axes},
        run, field, "heatmap", column.steps[keep],
    )  # fmt: skip


def _draw_bars(d: _Drawing, panel: Panel, place: _Place) -> None:
    field = panel.fields[0]
    for r, run in enumerate(d.runs):
        if field not in run.columns:
            continue
        column = run.columns[field]
        name, bins = _axis(run, field, 0, int(np.prod(column.values.shape[1:])))
        d.layout[f"xaxis{place.suffix}"]["title"] = _title_of_axis(name)
        counts = "count" if column.values.dtype.kind in "iu" else panel.unit
        d.layout[f"yaxis{place.suffix}"]["title"] = _title_of_axis(counts)
        latest = column.values[-1] if column.n else []
        d.add(
            {"type": "bar", "x": bins, "y": _series(latest), "name": d.labels[r] or field,
             "marker": {"color": COLORS[r % len(COLORS)]}, "opacity": 0.6 if d.many else 1,
             "showlegend": False,
             "hovertemplate": f"{d.labels[r]}<br>{name} %{{x:.4g}}<br>{counts} %{{y:.4g}}"
                              "<extra></extra>",
             "meta": {"panel": panel.title, "field": field, "run": run.name}, **place.axes},
            run, field, "bars", column.steps,
        )  # fmt: skip


def _draw_image(d: _Drawing, panel: Panel, place: _Place) -> None:
    run, field = _run_of(d, panel), panel.fields[0]
    column = run.columns[field]
    shape = column.values.shape[1:]
    (y_name, y), (x_name, x) = (_axis(run, field, dim, shape[dim]) for dim in (0, 1))
    d.layout[f"xaxis{place.suffix}"]["title"] = _title_of_axis(x_name)
    d.layout[f"yaxis{place.suffix}"]["title"] = _title_of_axis(y_name)
    what = "log₁₀(1 + count)" if column.values.dtype.kind in "iu" else panel.unit
    latest = _counts(column.values[-1]) if column.n else []
    d.add(
        {"type": "heatmap", "x": x, "y": y, "z": _series(latest), "name": run.name,
         "colorscale": "Viridis",
         "colorbar": place.colorbar(what), "showlegend": False,
         "hovertemplate": f"{x_name} %{{x:.4g}}<br>{y_name} %{{y:.4g}}<br>{what} %{{z:.3g}}"
                          "<extra></extra>",
         "meta": {"panel": panel.title, "field": field, "run": run.name}, **place.axes},
        run, field, "image", column.steps,
    )  # fmt: skip


def _alpha_trace(kind: str, run: RunData, field: str) -> dict:
    """The values of one of the α gauge's traces: its points and, in its name, their mean."""
    column = run.columns[field]
    x, y, steps, alphas, mean = alpha_points(column.steps, column.values, kind == "alpha_recent")
    what = "all" if kind == "alpha_all" else f"last {RECENT:.0%}"
    symbols = ["circle" if abs(a) <= ALPHA_EDGE else f"triangle-{'right' if a > 0 else 'left'}"
               for a in alphas]  # fmt: skip
    return {"x": x, "y": y, "customdata": list(zip(steps, alphas, strict=True)),
            "name": f"{what}: mean {mean:.2f}" if len(x) else what,
            "marker": {"symbol": symbols}}  # fmt: skip


def _draw_alpha(d: _Drawing, panel: Panel, place: _Place) -> None:
    x = np.linspace(-ALPHA_EDGE, ALPHA_EDGE, 61)
    d.add(
        {"type": "scatter", "mode": "lines", "x": x.tolist(), "y": (x**2).tolist(),
         "line": {"color": GREY, "width": 1.5}, "hoverinfo": "skip", "showlegend": False,
         "name": "y = α²",
         "meta": {"panel": panel.title, "field": "parabola", "run": ""}, **place.axes},
        None, "parabola", "static", [],
    )  # fmt: skip
    for r, run in enumerate(d.runs):
        for e, field in enumerate(panel.fields):
            if field not in run.columns:
                continue
            color = COLORS[(r if d.many else e) % len(COLORS)]
            for kind, look in (
                ("alpha_all", {"color": color if d.many else GREY, "size": 5, "opacity": 0.35}),
                ("alpha_recent", {"color": color, "size": 8, "opacity": 0.9}),
            ):
                values = _alpha_trace(kind, run, field)
                values["marker"] |= look
                d.add(
                    {"type": "scatter", "mode": "markers", **values, "showlegend": True,
                     "legend": place.legend,
                     "hovertemplate": f"{d.labels[r]}<br>step %{{customdata[0]}}<br>"
                                      "α %{customdata[1]:.3g}<extra></extra>",
                     "meta": {"panel": panel.title, "field": field, "run": run.name},
                     **place.axes},
                    run, field, kind, run.columns[field].steps,
                )  # fmt: skip


_TEST_SHAPES: dict[str, Callable[[float], tuple[list[float], list[float]]]] = {
    "norm_circle": circle,
    "inner_band": lambda w: band(w, _TESTS_RANGE, across=False),
    "ortho_band": lambda w: band(w, _TESTS_RANGE, across=True),
}


def _tests_trace(kind: str, run: RunData, field: str) -> dict:
    """The values of one of the gradient-tests gauge's shapes: the test's latest value (at
    most ``TESTS_EDGE``) as its size, and the value itself in its name."""
    column = run.columns[field]
    finite = np.isfinite(column.values)
    latest = float(column.values[finite][-1]) if finite.any() else math.nan
    size = float(symlog(min(abs(latest), TESTS_EDGE))) if finite.any() else 0.0
    x, y = _TEST_SHAPES[kind](size)
    return {"x": x, "y": y, "name": f"{field} {latest:.3g}"}


def _draw_tests(d: _Drawing, panel: Panel, place: _Place) -> None:
    x, y = circle(float(symlog(1.0)))
    d.add(
        {"type": "scatter", "mode": "lines", "x": x, "y": y, "showlegend": False,
         "name": "1", "line": {"color": GREY, "width": 1, "dash": "dash"}, "hoverinfo": "skip",
         "meta": {"panel": panel.title, "field": "unit circle", "run": ""}, **place.axes},
        None, "unit circle", "static", [],
    )  # fmt: skip
    d.add(
        {"type": "scatter", "mode": "markers", "x": [0], "y": [0], "showlegend": False, "name": "g",
         "marker": {"symbol": "cross-thin", "size": 16, "line": {"width": 3, "color": GREY}},
         "hovertemplate": "the gradient g<extra></extra>",
         "meta": {"panel": panel.title, "field": "origin", "run": ""}, **place.axes},
        None, "origin", "static", [],
    )  # fmt: skip
    for r, run in enumerate(d.runs):
        for t, (kind, field) in enumerate(zip(_TEST_SHAPES, panel.fields, strict=True)):
            if not field or field not in run.columns:
                continue
            color = COLORS[(r if d.many else t) % len(COLORS)]
            d.add(
                {"type": "scatter", "mode": "lines", **_tests_trace(kind, run, field),
                 "fill": "toself",
                 "opacity": 0.45, "line": {"color": color, "width": 1.5,
                                           "dash": DASHES[t] if d.many else "solid"},
                 "showlegend": True, "legend": place.legend, "hoveron": "points+fills",
                 "hovertemplate": f"{d.labels[r]}<br>%{{fullData.name}}<extra></extra>",
                 "meta": {"panel": panel.title, "field": field, "run": run.name}, **place.axes},
                run, field, kind, run.columns[field].steps,
            )  # fmt: skip


_DRAW: dict[str, Callable[[_Drawing, Panel, _Place], None]] = {
    "lines": _draw_lines,
    "layers": _draw_layers,
    "heatmap": _draw_heatmap,
    "bars": _draw_bars,
    "image": _draw_image,
    "alpha": _draw_alpha,
    "tests": _draw_tests,
}


def _kinds_shown(panel: Panel, runs: Sequence[RunData]) -> set[str]:
    """The kinds of the quantities a panel over steps draws (none for other panels)."""
    if not panel.over_steps:
        return set()
    kinds: dict[str, str] = {}
    for run in runs:
        for key, kind in kinds_of(run).items():
            kinds.setdefault(key, kind)
    keys = {re.split(r"[\[.]", field, maxsplit=1)[0] for field in panel.fields}
    return {kinds.get(key, key) for key in keys}


def _hline(place: _Place, y: float, text: str, color: str = GREY) -> dict[str, Any]:
    return {
        "type": "line", "name": f"zone {text}", "xref": f"x{place.suffix} domain",
        "yref": f"y{place.suffix}", "x0": 0, "x1": 1, "y0": y, "y1": y, "layer": "below",
        "line": {"color": color, "width": 1, "dash": "dot"},
        "label": {"text": text, "textposition": "end", "yanchor": "bottom",
                  "font": {"size": 9, "color": color}},
    }  # fmt: skip


def zones(panel: Panel, place: _Place, runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """The levels the diagnosis rules read, as dotted lines across a lines panel: α at −1
    (the step covers 1 % of the way or less, or the fit is concave), 0 (the minimum along
    the step) and 1 (uphill); a gradient test at 1 (its value for pure noise); λ_max at
    limit / η, where η·λ_max reaches the optimizer's stability limit (per run, for plain or
    momentum SGD at a constant learning rate: a schedule or an adaptive optimizer has none
    to draw)."""
    if panel.kind != "lines":
        return []
    kinds = _kinds_shown(panel, runs)
    lines = []
    if "alpha" in kinds:
        lines += [_hline(place, a, f"α = {a}") for a in (-1, 0, 1)]
    if kinds & set(TESTS):
        lines.append(_hline(place, 1.0, "1: noise"))
    if "hess_max_ev" in kinds:
        for r, run in enumerate(runs):
            facts = optimizer_facts(run.metadata.get("optimizer"))
            if facts.kind == "sgd" and facts.learning_rate:
                limit = facts.stability_limit()
                color = COLORS[r % len(COLORS)] if len(runs) > 1 else GREY
                y = limit / facts.learning_rate
                lines.append(_hline(place, y, f"η·λ_max = {limit:.3g}", color))
    return lines


def finding_bands(panel: Panel, place: _Place, runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Each finding of ``runs`` (of the panel's own run, for a panel of one run) as a band
    over its steps on a panel over steps that draws one of the instruments it is read from
    (:data:`lmd4ml.diagnosis.EVIDENCE`), in its severity's colour, labelled by its code."""
    kinds = _kinds_shown(panel, runs)
    bands = []
    for run in runs:
        if panel.run and panel.run != str(run.path):
            continue
        for f in run.findings:
            if not kinds & set(EVIDENCE[f.code]):
                continue
            color = SEVERITY_COLORS[f.severity]
            label = f.code if len(runs) == 1 else f"{f.code} ({run.name})"
            bands.append({
                "type": "rect", "name": f"finding {f.code}", "xref": f"x{place.suffix}",
                "yref": f"y{place.suffix} domain", "x0": f.first_step - 0.5,
                "x1": f.last_step + 0.5, "y0": 0, "y1": 1, "layer": "above",
                "fillcolor": color, "opacity": FINDING_OPACITY,
                "line": {"color": color, "width": 1},
                "label": {"text": label, "textposition": "top left",
                          "font": {"size": 10, "color": color}},
            })  # fmt: skip
    return bands


def _copy(layout: dict) -> dict:
    """A cached layout, with the parts a figure changes (axes, annotations, shapes) its own."""
    return {
        k: (dict(v) if k.startswith(("xaxis", "yaxis")) else list(v) if isinstance(v, list) else v)
        for k, v in layout.items()
    }


def message(text: str, dark: bool = False) -> dict:
    """A figure saying ``text``, without axes: what the page shows with nothing to plot."""
    return {
        "data": [],
        "layout": {
            "template": _template(dark), "height": 260,
            "xaxis": {"visible": False}, "yaxis": {"visible": False},
            "annotations": [{"text": text, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                             "showarrow": False, "font": {"size": 16, "color": GREY}}],
        },
    }  # fmt: skip


def figure(
    runs: Sequence[RunData],
    smoothing: float = 0.0,
    log: Collection[str] = (),
    dark: bool = False,
) -> tuple[dict, dict]:
    """The full figure for ``runs``, and the view: what each trace holds, for :func:`extend`
    to add to it later. ``log`` names the panels (by title) whose values are shown in log
    scale; a panel that has no values yet says so instead of drawing empty axes."""
    panels = runs_plan(runs)
    log = frozenset(log) & {p.title for p in panels if p.loggable}
    layout, places = _frame(panels, dark, log, len(runs) > 1)
    key = view_key([str(r.path) for r in runs], smoothing, log, dark, [r.findings for r in runs])
    d = _Drawing(runs, run_labels(runs), smoothing, log, _copy(layout))
    for panel in panels:  # first: a line of such a field is then drawn from every row too
        for run in runs:
            for field in _read_whole(run, panel):
                run.columns[field].whole()
    for panel, place in zip(panels, places, strict=True):
        before = len(d.traces)
        _DRAW[panel.kind](d, panel, place)
        d.layout["shapes"] += zones(panel, place, runs) + finding_bands(panel, place, runs)
        if not any(t["n"] for t in d.traces[before:] if t["kind"] != "static"):
            for axis in ("xaxis", "yaxis"):
                d.layout[f"{axis}{place.suffix}"]["visible"] = False
            d.layout["annotations"].append(
                {"text": EMPTY, "x": (place.x0 + place.x1) / 2, "y": (place.y0 + place.y1) / 2,
                 "xref": "paper", "yref": "paper", "showarrow": False,
                 "font": {"size": 12, "color": GREY}}
            )  # fmt: skip
    return {"data": d.data, "layout": {**d.layout, "uirevision": key}}, {
        "key": key,
        "versions": {str(r.path): r.version for r in runs},
        "traces": d.traces,
    }


def _read_whole(run: RunData, panel: Panel) -> list[str]:
    """The fields of ``run`` that ``panel`` draws from every row, where a long field is held
    as its outline (``Run.outline``): the α gauge's (its mean is of every step), a layer
    heatmap's leaves (a row per step), and a tests gauge's whose last value is not finite
    (the latest finite one may be one an outline left out)."""
    if panel.kind == "alpha":
        return [f for f in panel.fields if f in run.columns]
    if panel.kind == "layers" and panel.run == str(run.path):
        return _leaves(run, panel.fields[0])
    if panel.kind == "tests":
        return [f for f in panel.fields if f in run.columns and not _last_finite(run.columns[f])]
    return []


def _last_finite(column) -> bool:
    """Whether a column's last value is finite (or it has none)."""
    return not column.n or bool(np.isfinite(column.values[-1]))


def _trace(run: RunData, field: str, kind: str, steps) -> dict:
    return {
        "run": str(run.path),
        "field": field,
        "kind": kind,
        "n": len(steps),
        "last": int(steps[-1]) if len(steps) else -1,
    }


def _column_of(run: RunData, trace: dict):
    """The column a view's trace grows with (a layers trace: its first leaf), or None if
    ``run`` has no such column or it does not fit the trace's kind."""
    if trace["kind"] in ("layers", "layers_log"):
        leaves = _leaves(run, trace["field"])
        return run.columns[leaves[0]] if leaves else None
    column = run.columns.get(trace["field"])
    scalar = trace["kind"] in ("lines", "raw", "alpha_all", "alpha_recent", *_TEST_SHAPES)
    # A line is drawn from a series of scalars: smoothing could not take another.
    if column is None or (scalar and column.values.ndim != 1):
        return None
    if trace["kind"] in ("heatmap", "bars") and column.values.ndim != 2:
        return None
    if trace["kind"] == "image" and column.values.ndim != 3:
        return None
    return column


def extend(runs: Sequence[RunData], view: dict, smoothing: float = 0.0) -> tuple[Any, dict] | None:
    """A Patch adding each trace's new steps (None when there are none: the page need not
    replot), and the view after it; None if the figure must be redrawn instead (a run was
    re-read, a trace would outgrow its budget or gets its first values, or ``view`` does not
    fit ``runs``: it comes back from the page, :func:`lmd4ml.dashboard.inputs.view` checked
    only its shape)."""
    from dash import Patch

    by_path = {str(r.path): r for r in runs}
    if view.get("versions") != {p: r.version for p, r in by_path.items()}:
        return None
    patch = Patch()
    traces = []
    for i, trace in enumerate(view["traces"]):
        trace = dict(trace)
        traces.append(trace)
        kind = trace["kind"]
        if kind == "static":
            continue
        run = by_path.get(trace["run"])
        column = None if run is None else _column_of(run, trace)
        if column is None:
            return None
        start = int(np.searchsorted(column.steps, trace["last"], side="right"))
        new = column.n - start
        if new == 0:
            continue
        if trace["n"] == 0:  # its panel says it has no values yet
            return None
        trace["last"] = int(column.steps[-1])
        if kind in ("lines", "raw"):
            if trace["n"] + new > 2 * LINE_BUDGET:
                return None
            x, y = _line_points(run, trace["field"], smoothing if kind == "lines" else 0.0,
                                start, thin=False)  # fmt: skip
            patch["data"][i]["x"].extend(x.tolist())
            patch["data"][i]["y"].extend(_series(y))
        elif kind in ("heatmap", "layers", "layers_log"):
            if trace["n"] + new > 2 * HEATMAP_BUDGET:
                return None
            if kind == "heatmap":
                rows = _counts(column.values[start:].reshape(new, column.values[0].size))
            else:
                leaves = _leaves(run, trace["field"])
                _, rows = _layer_rows(run, leaves, start, kind == "layers_log")
            patch["data"][i]["x"].extend(column.steps[start:].tolist())
            patch["data"][i]["z"].extend(_series(rows))
        elif kind == "bars":
            patch["data"][i]["y"] = _series(column.values[-1])
        elif kind == "image":
            patch["data"][i]["z"] = _series(_counts(column.values[-1]))
        else:  # a gauge's points or shape: drawn again from all values
            if column.outlined and not _last_finite(column):
                return None  # its latest finite value needs every row: read, and redrawn
            draw = _alpha_trace if kind.startswith("alpha") else _tests_trace
            for name, value in draw(kind, run, trace["field"]).items():
                if name == "marker":
                    patch["data"][i]["marker"]["symbol"] = value["symbol"]
                else:
                    patch["data"][i][name] = value
        trace["n"] += new
    changed = any(t["n"] != old["n"] for t, old in zip(traces, view["traces"], strict=True))
    return (patch if changed else None), {**view, "traces": traces}
