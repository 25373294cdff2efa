"""Which panels a run gets, after Cockpit's layout, from its quantity keys and field shapes.

Known keys go into Cockpit's columns (STEP SIZE, GRADIENTS, CURVATURE), with its two gauges:
α on its parabola and the gradient tests in the plane. Below them comes Cockpit's bottom row:
the optimizer's hyperparameters over steps (keys of kind "hyperparameter", such as
``hyper/learning_rate``) and the performance (the mini-batch loss, then the values logged
beside the instruments, of kind "user"). Any other quantity gets a panel from the shape of
its value: a scalar is a line, a vector a heatmap over steps, a dict of up to
``MAX_LINES`` scalars a line per entry (more: a layers × steps heatmap), a matrix an image of
its latest value. A quantity given a ``name=`` of its own goes by its kind, the key its class
reports under by default, which the run's metadata records (``quantities_by_key``); a sibling
value (``hess_max_ev_iterations``) goes by its quantity's kind and its suffix.

Example:
  >>> shapes = {"loss": (), "grad_norm": (), "grad_hist_1d": (20,), "mine['a']": (),
  ...           "mine['b']": ()}
  >>> for p in plan(["loss", "grad_norm", "grad_hist_1d", "mine"], shapes):
  ...     print(p.group, p.kind, p.title, list(p.fields))
  STEP SIZE lines gradient norm ['grad_norm']
  GRADIENTS heatmap gradient histogram ['grad_hist_1d']
  GRADIENTS bars gradient histogram, latest ['grad_hist_1d']
  PERFORMANCE lines mini-batch loss ['loss']
  MORE lines mine ["mine['a']", "mine['b']"]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

COLUMNS = ("STEP SIZE", "GRADIENTS", "CURVATURE")
# Cockpit's bottom row, below the columns: they share rows, the last panel of a row spans
# what the row has left.
BOTTOM = ("HYPERPARAMETERS", "PERFORMANCE")
# A pytree quantity with more leaves than this is drawn as a layers × steps heatmap: more
# lines in one panel could not be told apart.
MAX_LINES = 4
# The kinds of values logged beside the instruments (lm.train's eval_fn, a Recorder's extra)
# and of the optimizer's hyperparameters, as the run's metadata records them.
USER, HYPERPARAMETER = "user", "hyperparameter"
HYPER_PREFIX = "hyper/"

# (group, title, keys, unit): a panel draws those of its keys that a run tracks; ``unit``
# titles its value axis. g is the batch gradient, θ the parameters, L the loss.
COCKPIT: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("STEP SIZE", "α (alpha)", ("alpha",), "α (step on the fitted parabola)"),
    ("STEP SIZE", "distance and update size", ("distance", "update_size"), "L2 norm (θ units)"),
    ("STEP SIZE", "gradient norm", ("grad_norm",), "‖g‖₂ (loss / θ)"),
    (
        "GRADIENTS",
        "gradient tests",
        ("norm_test", "inner_test", "ortho_test"),
        "test value (> 1: noise dominates)",
    ),
    ("GRADIENTS", "gradient histogram", ("grad_hist_1d",), "count"),
    ("GRADIENTS", "2-D gradient histogram", ("grad_hist_2d",), "count"),
    ("GRADIENTS", "mean GSNR", ("mean_gsnr",), "mean g² / Var (ratio)"),
    ("GRADIENTS", "suggested batch sizes", ("cabs", "noise_scale"), "batch size (samples)"),
    ("GRADIENTS", "early stopping", ("early_stopping",), "criterion (> 0: stop)"),
    ("CURVATURE", "top Hessian eigenvalue", ("hess_max_ev",), "λ_max (loss / θ²)"),
    # HessMaxEV's siblings: Hessian-vector products spent, and 1/0 for converged or not.
    (
        "CURVATURE",
        "Lanczos products, converged",
        ("hess_max_ev_iterations", "hess_max_ev_converged"),
        "products; converged (1/0)",
    ),
    ("CURVATURE", "Hessian trace", ("hess_trace",), "tr ∇²L (loss / θ²)"),
    ("CURVATURE", "TIC", ("tic_diag", "tic_trace"), "TIC (ratio)"),
    ("PERFORMANCE", "mini-batch loss", ("loss",), "loss (batch mean)"),
)
TESTS = ("norm_test", "inner_test", "ortho_test")  # the gauge's circle and its two bands


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot.

    ``kind`` is "lines" (a trace per field), "layers" (the scalar leaves of one pytree
    quantity, whose key is its one field, as a layers × steps heatmap), "heatmap" (a vector
    field over steps), "bars" (a vector field's latest value), "image" (a matrix field's
    latest), "alpha" (α on Cockpit's parabola) or "tests" (Cockpit's gradient-tests gauge:
    ``fields`` are the norm, inner and ortho tests, "" for one not tracked). ``unit`` titles
    the value axis; ``run`` is the path of the one run a panel shows when several are
    (heatmaps and images cannot be overlaid), and ``label`` that run's name on the page.
    """

    group: str
    title: str
    kind: str
    fields: tuple[str, ...]
    unit: str = ""
    run: str = ""
    label: str = ""

    @property
    def over_steps(self) -> bool:
        """Whether its x axis is the step (and so linked with the other such panels)."""
        return self.kind in ("lines", "layers", "heatmap")

    @property
    def loggable(self) -> bool:
        """Whether it has a log-scale toggle: its values on a log y axis (lines, bars) or
        coloured by their log10 (layers). A histogram's heatmap is log-coloured always."""
        return self.kind in ("lines", "bars", "layers")


def fields_of(key: str, names: Sequence[str]) -> list[str]:
    """The flat fields of quantity ``key``: the key itself, or its pytree leaves.

    Example:
      >>> fields_of("grad", ["grad", "grad_norm", "gradx['a']"])
      ['grad']
      >>> fields_of("per_layer", ["loss", "per_layer['a']", "per_layer['b']"])
      ["per_layer['a']", "per_layer['b']"]
    """
    return [n for n in names if n == key or (n.startswith(key) and n[len(key)] in "[.")]


def leaf_label(key: str, field: str) -> str:
    """A pytree leaf's field named by its path alone, as a row label.

    Example:
      >>> leaf_label("grad_norm", "grad_norm['layers'][0]['kernel']")
      'layers/0/kernel'
      >>> leaf_label("w", "w.bias"), leaf_label("loss", "loss")
      ('bias', 'loss')
    """
    parts = re.findall(r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.(\w+)", field[len(key) :])
    return "/".join(next(p for p in part if p) for part in parts) or field


def _by_shape(
    group: str,
    title: str,
    unit: str,
    tracked: Mapping[str, Sequence[str]],
    shapes: Mapping[str, tuple[int, ...]],
    histograms: frozenset[str] = frozenset(),
) -> list[Panel]:
    """One lines panel for the scalar fields of the keys in ``tracked`` (key -> fields),
    then a panel per array field by its shape. A key of more than ``MAX_LINES`` scalar
    leaves gets a layers panel instead of lines; a histogram (a field in ``histograms``, or
    one with "hist" in its name) gets bars beside its heatmap."""
    fields = [f for key_fields in tracked.values() for f in key_fields]
    layered = {k: fs for k, fs in tracked.items() if sum(not shapes[f] for f in fs) > MAX_LINES}
    scalars = tuple(f for k, fs in tracked.items() if k not in layered for f in fs if not shapes[f])
    panels = [Panel(group, title, "lines", scalars, unit)] if scalars else []
    for key in layered:
        panels.append(Panel(group, f"{key} by layer", "layers", (key,), unit))
    for field in fields:
        shape = shapes[field]
        label = title if len(fields) == 1 else field
        if len(shape) == 2:
            panels.append(Panel(group, label, "image", (field,), unit))
        elif shape:
            panels.append(Panel(group, label, "heatmap", (field,), unit))
            if field in histograms or re.search("hist", field):
                panels.append(Panel(group, f"{label}, latest", "bars", (field,), unit))
    return panels


def _gauges(
    panel_keys: Sequence[str], here: Sequence[str], kinds: Mapping[str, str], scalars: Sequence[str]
) -> list[Panel]:
    """Cockpit's gauge beside the panel of ``panel_keys`` (its keys a run tracks: ``here``,
    their scalar fields: ``scalars``): α on its parabola, or the gradient tests in the plane
    (the first key of each test's kind)."""
    if panel_keys == ("alpha",) and scalars:
        return [Panel("STEP SIZE", "α gauge", "alpha", tuple(scalars), "standardised loss")]
    if panel_keys == TESTS and scalars:
        roles = tuple(next((k for k in here if kinds[k] == t and k in scalars), "") for t in TESTS)
        return [Panel("GRADIENTS", "gradient tests gauge", "tests", roles, "along g (inner)")]
    return []


def plan(
    keys: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    kinds: Mapping[str, str] | None = None,
) -> list[Panel]:
    """The panels for a run with quantity ``keys`` (in order) and flat field ``shapes``.

    Cockpit's panels come first, by group, with its gauges; then the hyperparameters (one
    panel each) and the performance (the loss, then each user value); then a "MORE" panel
    (or several) per other key. ``kinds`` maps a key to the kind of quantity it is (its
    class's default key, or "user" or "hyperparameter"), so that a renamed quantity joins
    its kind's panel; a key it does not name is its own kind.

    Example:
      >>> shapes = {"grad_hist_1d": (20,), "narrow": (20,)}
      >>> for p in plan(["grad_hist_1d", "narrow"], shapes, {"narrow": "grad_hist_1d"}):
      ...     print(p.group, p.kind, p.title, list(p.fields))
      GRADIENTS heatmap grad_hist_1d ['grad_hist_1d']
      GRADIENTS bars grad_hist_1d, latest ['grad_hist_1d']
      GRADIENTS heatmap narrow ['narrow']
      GRADIENTS bars narrow, latest ['narrow']
      >>> shapes = {"loss": (), "hyper/learning_rate": (), "val_acc": ()}
      >>> kinds = {"hyper/learning_rate": "hyperparameter", "val_acc": "user"}
      >>> for p in plan(list(shapes), shapes, kinds):
      ...     print(p.group, p.title, list(p.fields), p.unit)
      HYPERPARAMETERS learning_rate ['hyper/learning_rate'] learning_rate
      PERFORMANCE mini-batch loss ['loss'] loss (batch mean)
      PERFORMANCE val_acc ['val_acc'] val_acc
    """
    names = list(shapes)
    kind_of = {key: (kinds or {}).get(key, key) for key in keys}
    tracked = {key: fields_of(key, names) for key in keys}
    known = {k for _, _, ks, _ in COCKPIT for k in ks} | {USER, HYPERPARAMETER}
    histograms = frozenset(f for key in keys if "hist" in kind_of[key] for f in tracked[key])
    panels: list[Panel] = []
    for key in keys:
        if kind_of[key] == HYPERPARAMETER and tracked[key]:
            name = key.removeprefix(HYPER_PREFIX)
            panels += _by_shape("HYPERPARAMETERS", name, name, {key: tracked[key]}, shapes)
    for group, title, panel_keys, unit in COCKPIT:
        here = [key for k in panel_keys for key in keys if kind_of[key] == k and tracked[key]]
        if len(here) == 1 and here[0] != kind_of[here[0]]:
            title = f"{title} ({here[0]})"  # one renamed quantity: say which
        own = _by_shape(group, title, unit, {key: tracked[key] for key in here}, shapes, histograms)
        panels += own
        scalars = [f for p in own if p.kind == "lines" for f in p.fields]
        panels += _gauges(panel_keys, here, kind_of, scalars)
    for key in keys:
        if kind_of[key] == USER and tracked[key]:
            panels += _by_shape("PERFORMANCE", key, key, {key: tracked[key]}, shapes)
    for key in keys:
        if kind_of[key] not in known and tracked[key]:
            panels += _by_shape("MORE", key, key, {key: tracked[key]}, shapes, histograms)
    return panels


def grid(panels: Sequence[Panel]) -> tuple[list[tuple[int, int, int]], int, int]:
    """Where each panel goes: ``(row, col, colspan)`` from 1, and the grid's rows and columns.

    Cockpit's groups are columns side by side (those a run has); the hyperparameters and the
    performance fill the rows below them, the last panel of a row spanning what is left (the
    loss alone spans the whole row); other panels fill rows after that.

    Example:
      >>> ps = plan(["grad_norm", "distance", "norm_test", "loss"],
      ...           {"grad_norm": (), "distance": (), "norm_test": (), "loss": ()})
      >>> [p.kind for p in ps]
      ['lines', 'lines', 'lines', 'tests', 'lines']
      >>> grid(ps)
      ([(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (3, 1, 2)], 3, 2)
    """
    columns = [g for g in COLUMNS if any(p.group == g for p in panels)]
    bottom = [i for i, p in enumerate(panels) if p.group in BOTTOM]
    more = [i for i, p in enumerate(panels) if p.group not in (*COLUMNS, *BOTTOM)]
    n_cols = max(len(columns), min(3, len(more)), min(3, len(bottom)), 1)
    depth = max((sum(p.group == g for p in panels) for g in columns), default=0)
    places: dict[int, tuple[int, int, int]] = {}
    filled = dict.fromkeys(columns, 0)
    for i, p in enumerate(panels):
        if p.group in filled:
            filled[p.group] += 1
            places[i] = (filled[p.group], columns.index(p.group) + 1, 1)
    row = depth
    for start in range(0, len(bottom), n_cols):
        row += 1
        in_row = bottom[start : start + n_cols]
        for col, i in enumerate(in_row, 1):
            span = n_cols - col + 1 if i == in_row[-1] else 1
            places[i] = (row, col, span)
    for at, i in enumerate(more):
        if at % n_cols == 0:
            row += 1
        places[i] = (row, at % n_cols + 1, 1)
    return [places[i] for i in range(len(panels))], max(row, 1), n_cols
