"""The cockpit figure as a plain plotly dict, and the patches that stream new steps into it.

One figure holds every panel, so that the step axes can be linked (``matches``) and zoom
kept (``uirevision``) by plotly itself. Traces are SVG (``scatter``, ``bar``, ``heatmap``):
the page uses no WebGL context at all. Long series are thinned on the server
(:func:`~lmd4ml.dashboard.data.minmax_indices`); new steps are appended with a Dash
``Patch`` until a trace holds twice its budget, and then the figure is redrawn.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.io as pio
from dash import Patch

from lmd4ml.dashboard.data import RunData, minmax_indices, spread_indices
from lmd4ml.dashboard.panels import COLUMNS, Panel, grid, plan

LINE_BUDGET = 1000  # points per line trace after thinning
HEATMAP_BUDGET = 200  # steps (columns) per heatmap
ROW_PX = 230
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
DASHES = ("solid", "dot", "dash", "longdash", "dashdot")


@functools.lru_cache(maxsize=2)
def _template(dark: bool) -> dict:
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
    """Histogram counts are shown as log10(1 + count): the tails would be invisible else."""
    return np.log10(1 + values) if values.dtype.kind in "iu" else values


def _series(values: np.ndarray) -> list:
    """Values as JSON-ready (nested) lists; NaN and ±inf become null, drawn as gaps."""
    values = np.asarray(values, np.float64)
    return np.where(np.isfinite(values), values, None).tolist()


def _title(panel: Panel, many: bool) -> str:
    """The panel's title; a few lines also name their entries in their colour (or dash, when
    colour tells runs apart), which a shared legend could not place beside their panel."""
    title = f"<b>{panel.title}</b>"
    if panel.kind != "lines" or not 1 < len(panel.fields) <= 4:
        return title
    if many:
        keys = [f"{f} ({DASHES[e % len(DASHES)]})" for e, f in enumerate(panel.fields)]
    else:
        keys = [
            f"<span style='color:{COLORS[e % len(COLORS)]}'>━ {f}</span>"
            for e, f in enumerate(panel.fields)
        ]
    return f"{title}  " + "  ".join(keys)


@functools.lru_cache(maxsize=32)
def _frame(
    panels: tuple[Panel, ...], dark: bool, logy: bool, many: bool
) -> tuple[dict, tuple[str, ...]]:
    """The figure's layout and each panel's axis suffix ("", "2", …): fixed per structure."""
    places, n_rows, n_cols = grid(panels)
    height = n_rows * ROW_PX + 110
    hgap, vgap = 0.07, 75 / height
    row_h = (1 - vgap * (n_rows - 1)) / n_rows
    col_w = (1 - hgap * (n_cols - 1)) / n_cols
    layout: dict[str, Any] = {
        "template": _template(dark),
        "height": height,
        "margin": {"l": 60, "r": 20, "t": 70, "b": 40},
        # With several runs, the legend names each run's colour once.
        "showlegend": many,
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1, "yanchor": "bottom"},
        "hovermode": "closest",
        "annotations": [],
    }
    suffixes = []
    first_steps = None
    for i, (panel, (row, col, span)) in enumerate(zip(panels, places, strict=True)):
        suffix = "" if i == 0 else str(i + 1)
        suffixes.append(suffix)
        x0 = (col - 1) * (col_w + hgap)
        x1 = x0 + span * col_w + (span - 1) * hgap
        y1 = 1 - (row - 1) * (row_h + vgap)
        y0 = y1 - row_h
        xaxis: dict[str, Any] = {"domain": [x0, x1], "anchor": f"y{suffix}"}
        yaxis: dict[str, Any] = {"domain": [y0, y1], "anchor": f"x{suffix}"}
        if panel.over_steps:
            xaxis["title"] = _title_of_axis("step")
            if first_steps is None:
                first_steps = f"x{suffix}"
            else:
                xaxis["matches"] = first_steps
        if panel.kind in ("lines", "bars") and logy:
            yaxis["type"] = "log"
        layout[f"xaxis{suffix}"], layout[f"yaxis{suffix}"] = xaxis, yaxis
        layout["annotations"].append(
            {"text": _title(panel, many), "x": (x0 + x1) / 2, "y": y1, "xref": "paper",
             "yref": "paper", "xanchor": "center", "yanchor": "bottom", "showarrow": False,
             "font": {"size": 13}}
        )  # fmt: skip
    columns = [g for g in COLUMNS if any(p.group == g for p in panels)]
    for col, group in enumerate(columns):
        x = col * (col_w + hgap) + col_w / 2
        layout["annotations"].append(
            {"text": group, "x": x, "y": 1, "yshift": 28, "xref": "paper", "yref": "paper",
             "xanchor": "center", "yanchor": "bottom", "showarrow": False,
             "font": {"size": 15, "color": "#888"}}
        )  # fmt: skip
    return layout, tuple(suffixes)


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


def runs_plan(runs: Sequence[RunData]) -> tuple[Panel, ...]:
    """The panels for runs shown together: every quantity any of them tracks, first run first."""
    keys: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, str] = {}
    for run in runs:
        keys += [k for k in run.metadata.get("keys", []) if k not in keys]
        for field, shape in run.shapes.items():
            shapes.setdefault(field, shape)
        for key, kind in kinds_of(run).items():
            kinds.setdefault(key, kind)
    return tuple(plan(keys, shapes, kinds))


def _line_points(run: RunData, field: str, smoothing: float, start: int, thin: bool) -> tuple:
    column = run.columns[field]
    values = column.smoothed(smoothing) if smoothing else column.values
    steps = column.steps
    if thin:
        keep = minmax_indices(values, LINE_BUDGET)
        return steps[keep], values[keep]
    return steps[start:], values[start:]


def view_key(paths: Sequence[str], smoothing: float, logy: bool, dark: bool) -> str:
    """What a drawn figure depends on besides the data: another key means a redraw."""
    return json.dumps([list(paths), smoothing, logy, dark])


def figure(
    runs: Sequence[RunData], smoothing: float = 0.0, logy: bool = False, dark: bool = False
) -> tuple[dict, dict]:
    """The full figure for ``runs`` (the first is the one heatmaps and images show), and the
    view: what each trace holds, for :func:`extend` to add to it later."""
    panels = runs_plan(runs)
    many = len(runs) > 1
    layout, suffixes = _frame(panels, dark, logy, many)
    key = view_key([str(r.path) for r in runs], smoothing, logy, dark)
    data, traces = [], []
    shown: set[str] = set()  # runs already in the legend
    for panel, suffix in zip(panels, suffixes, strict=True):
        axes = {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}
        if panel.kind == "lines":
            for r, run in enumerate(runs):
                for e, field in enumerate(panel.fields):
                    if field not in run.columns:
                        continue
                    x, y = _line_points(run, field, smoothing, 0, thin=True)
                    data.append(
                        {"type": "scatter", "mode": "lines", "x": x.tolist(), "y": _series(y),
                         "name": run.name if many else field, "legendgroup": run.name,
                         "showlegend": many and run.name not in shown,
                         "hovertemplate": f"{run.name}<br>{field}: %{{y:.4g}}<br>step %{{x}}"
                                          "<extra></extra>",
                         "line": {"color": COLORS[(r if many else e) % len(COLORS)], "width": 1.5,
                                  "dash": DASHES[e % len(DASHES)] if many else "solid"},
                         "meta": {"panel": panel.title, "field": field, "run": run.name}, **axes}
                    )  # fmt: skip
                    traces.append(_trace(run, field, "lines", x))
                    shown.add(run.name)
            continue
        field = panel.fields[0]
        run = next((r for r in runs if field in r.columns), None)
        if run is None:
            continue
        column = run.columns[field]
        meta = {"panel": panel.title, "field": field, "run": run.name}
        shape = column.values.shape[1:]
        name, bins = _axis(run, field, 0, int(np.prod(shape)))
        what = "log10(1 + count)" if column.values.dtype.kind in "iu" else field
        if panel.kind in ("heatmap", "bars"):
            value_axis = "yaxis" if panel.kind == "heatmap" else "xaxis"
            layout[f"{value_axis}{suffix}"]["title"] = _title_of_axis(name)
        if panel.kind == "heatmap":
            keep = spread_indices(column.steps, HEATMAP_BUDGET)
            z = _counts(column.values[keep].reshape(len(keep), len(bins)))
            data.append(
                {"type": "heatmap", "transpose": True, "x": column.steps[keep].tolist(),
                 "y": bins, "z": _series(z), "colorscale": "Viridis", "showscale": False,
                 "zsmooth": "fast",
                 "hovertemplate": f"step %{{x}}<br>{name} %{{y:.4g}}<br>{what} %{{z:.3g}}"
                                  "<extra></extra>",
                 "meta": meta, **axes}
            )  # fmt: skip
            traces.append(_trace(run, field, "heatmap", column.steps[keep]))
        elif panel.kind == "bars":
            counts = "count" if column.values.dtype.kind in "iu" else field
            layout[f"yaxis{suffix}"]["title"] = _title_of_axis(counts)
            latest = column.values[-1] if column.n else np.zeros(len(bins))
            data.append(
                {"type": "bar", "x": bins, "y": _series(latest), "marker": {"color": COLORS[0]},
                 "meta": meta, **axes}
            )  # fmt: skip
            traces.append(_trace(run, field, "bars", column.steps))
        else:
            latest = column.values[-1] if column.n else np.zeros(shape)
            (y_name, y), (x_name, x) = (_axis(run, field, d, shape[d]) for d in (0, 1))
            layout[f"xaxis{suffix}"]["title"] = _title_of_axis(x_name)
            layout[f"yaxis{suffix}"]["title"] = _title_of_axis(y_name)
            data.append(
                {"type": "heatmap", "x": x, "y": y, "z": _series(_counts(latest)),
                 "colorscale": "Viridis", "showscale": False,
                 "hovertemplate": f"{x_name} %{{x:.4g}}<br>{y_name} %{{y:.4g}}<br>{what} "
                                  "%{z:.3g}<extra></extra>",
                 "meta": meta, **axes}
            )  # fmt: skip
            traces.append(_trace(run, field, "image", column.steps))
    return {"data": data, "layout": {**layout, "uirevision": key}}, {
        "key": key,
        "versions": {str(r.path): r.version for r in runs},
        "traces": traces,
    }


def _trace(run: RunData, field: str, kind: str, steps: np.ndarray) -> dict:
    return {
        "run": str(run.path),
        "field": field,
        "kind": kind,
        "n": len(steps),
        "last": int(steps[-1]) if len(steps) else -1,
    }


def extend(
    runs: Sequence[RunData], view: dict, smoothing: float = 0.0
) -> tuple[Patch | None, dict] | None:
    """A Patch adding each trace's new steps (None when there are none: the page need not
    replot), and the view after it; None if the figure must be redrawn instead (a run was
    re-read, a trace would outgrow its budget, or ``view`` does not fit ``runs``: it comes
    back from the page, :func:`lmd4ml.dashboard.inputs.view` checked only its shape)."""
    by_path = {str(r.path): r for r in runs}
    if view.get("versions") != {p: r.version for p, r in by_path.items()}:
        return None
    patch = Patch()
    traces = []
    for i, trace in enumerate(view["traces"]):
        run = by_path.get(trace["run"])
        column = None if run is None else run.columns.get(trace["field"])
        # A line is drawn from a series of scalars: smoothing could not take another.
        if column is None or (trace["kind"] == "lines" and column.values.ndim != 1):
            return None
        start = int(np.searchsorted(column.steps, trace["last"], side="right"))
        new = column.n - start
        trace = dict(trace)
        traces.append(trace)
        if new == 0:
            continue
        trace["last"] = int(column.steps[-1])
        kind = trace["kind"]
        if kind == "lines":
            if trace["n"] + new > 2 * LINE_BUDGET:
                return None
            x, y = _line_points(run, trace["field"], smoothing, start, thin=False)
            patch["data"][i]["x"].extend(x.tolist())
            patch["data"][i]["y"].extend(_series(y))
        elif kind == "heatmap":
            if trace["n"] + new > 2 * HEATMAP_BUDGET:
                return None
            rows = _counts(column.values[start:].reshape(new, column.values[0].size))
            patch["data"][i]["x"].extend(column.steps[start:].tolist())
            patch["data"][i]["z"].extend(_series(rows))
        elif kind == "bars":
            patch["data"][i]["y"] = _series(column.values[-1])
        else:
            patch["data"][i]["z"] = _series(_counts(column.values[-1]))
        trace["n"] += new
    changed = any(t["n"] != old["n"] for t, old in zip(traces, view["traces"], strict=True))
    return (patch if changed else None), {**view, "traces": traces}
