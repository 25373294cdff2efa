"""Which panels a run gets, after Cockpit's layout, from its quantity keys and field shapes.

Known keys go into Cockpit's groups (STEP SIZE, GRADIENTS, CURVATURE, then the loss); any
other quantity gets a panel from the shape of its value: a scalar is a line, a vector a
heatmap over steps, a dict of scalars a line per entry, a matrix an image of its latest value.
A quantity given a ``name=`` of its own goes by its kind, the key its class reports under
by default, which the run's metadata records (``quantities_by_key``); a sibling value
(``hess_max_ev_iterations``) goes by its quantity's kind and its suffix.

Example:
  >>> shapes = {"loss": (), "grad_norm": (), "grad_hist_1d": (20,), "mine['a']": (),
  ...           "mine['b']": ()}
  >>> for p in plan(["loss", "grad_norm", "grad_hist_1d", "mine"], shapes):
  ...     print(p.group, p.kind, p.title, list(p.fields))
  STEP SIZE lines gradient norm ['grad_norm']
  GRADIENTS heatmap gradient histogram ['grad_hist_1d']
  GRADIENTS bars gradient histogram, latest ['grad_hist_1d']
  LOSS lines mini-batch loss ['loss']
  MORE lines mine ["mine['a']", "mine['b']"]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

COLUMNS = ("STEP SIZE", "GRADIENTS", "CURVATURE")
# (group, title, keys): a panel draws those of its keys that a run tracks.
COCKPIT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("STEP SIZE", "α (alpha)", ("alpha",)),
    ("STEP SIZE", "distance and update size", ("distance", "update_size")),
    ("STEP SIZE", "gradient norm", ("grad_norm",)),
    ("GRADIENTS", "gradient tests", ("norm_test", "inner_test", "ortho_test")),
    ("GRADIENTS", "gradient histogram", ("grad_hist_1d",)),
    ("GRADIENTS", "2-D gradient histogram", ("grad_hist_2d",)),
    ("GRADIENTS", "mean GSNR", ("mean_gsnr",)),
    ("GRADIENTS", "suggested batch sizes", ("cabs", "noise_scale")),
    ("GRADIENTS", "early stopping", ("early_stopping",)),
    ("CURVATURE", "top Hessian eigenvalue", ("hess_max_ev",)),
    # HessMaxEV's siblings: Hessian-vector products spent, and 1/0 for converged or not.
    (
        "CURVATURE",
        "Lanczos products, converged",
        ("hess_max_ev_iterations", "hess_max_ev_converged"),
    ),
    ("CURVATURE", "Hessian trace", ("hess_trace",)),
    ("CURVATURE", "TIC", ("tic_diag", "tic_trace")),
    ("LOSS", "mini-batch loss", ("loss",)),
)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot: ``kind`` is "lines" (a trace per field), "heatmap" (a vector field over
    steps), "bars" (a vector field's latest value) or "image" (a matrix field's latest)."""

    group: str
    title: str
    kind: str
    fields: tuple[str, ...]

    @property
    def over_steps(self) -> bool:
        """Whether its x axis is the step (and so linked with the other such panels)."""
        return self.kind in ("lines", "heatmap")


def fields_of(key: str, names: Sequence[str]) -> list[str]:
    """The flat fields of quantity ``key``: the key itself, or its pytree leaves.

    Example:
      >>> fields_of("grad", ["grad", "grad_norm", "gradx['a']"])
      ['grad']
      >>> fields_of("per_layer", ["loss", "per_layer['a']", "per_layer['b']"])
      ["per_layer['a']", "per_layer['b']"]
    """
    return [n for n in names if n == key or (n.startswith(key) and n[len(key)] in "[.")]


def _by_shape(
    group: str,
    title: str,
    fields: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    histograms: frozenset[str] = frozenset(),
) -> list[Panel]:
    """One lines panel for the scalar fields, then a panel per array field by its shape; a
    histogram (a field in ``histograms``, or one with "hist" in its name) gets bars too."""
    scalars = tuple(f for f in fields if not shapes[f])
    panels = [Panel(group, title, "lines", scalars)] if scalars else []
    for field in fields:
        shape = shapes[field]
        label = title if len(fields) == 1 else field
        if len(shape) == 2:
            panels.append(Panel(group, label, "image", (field,)))
        elif shape:
            panels.append(Panel(group, label, "heatmap", (field,)))
            if field in histograms or re.search("hist", field):
                panels.append(Panel(group, f"{label}, latest", "bars", (field,)))
    return panels


def plan(
    keys: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    kinds: Mapping[str, str] | None = None,
) -> list[Panel]:
    """The panels for a run with quantity ``keys`` (in order) and flat field ``shapes``.

    Cockpit's panels come first, by group, then a "MORE" panel (or several) per other key.
    ``kinds`` maps a key to the kind of quantity it is (its class's default key), so that a
    renamed quantity joins its kind's panel; a key it does not name is its own kind.

    Example:
      >>> shapes = {"grad_hist_1d": (20,), "narrow": (20,)}
      >>> for p in plan(["grad_hist_1d", "narrow"], shapes, {"narrow": "grad_hist_1d"}):
      ...     print(p.group, p.kind, p.title, list(p.fields))
      GRADIENTS heatmap grad_hist_1d ['grad_hist_1d']
      GRADIENTS bars grad_hist_1d, latest ['grad_hist_1d']
      GRADIENTS heatmap narrow ['narrow']
      GRADIENTS bars narrow, latest ['narrow']
    """
    names = list(shapes)
    kind_of = {key: (kinds or {}).get(key, key) for key in keys}
    tracked = {key: fields_of(key, names) for key in keys}
    known = {k for _, _, ks in COCKPIT for k in ks}
    histograms = frozenset(f for key in keys if "hist" in kind_of[key] for f in tracked[key])
    panels: list[Panel] = []
    for group, title, panel_keys in COCKPIT:
        here = [key for k in panel_keys for key in keys if kind_of[key] == k and tracked[key]]
        if len(here) == 1 and here[0] != kind_of[here[0]]:
            title = f"{title} ({here[0]})"  # one renamed quantity: say which
        fields = [f for key in here for f in tracked[key]]
        panels += _by_shape(group, title, fields, shapes, histograms)
    for key in keys:
        if kind_of[key] not in known and tracked[key]:
            panels += _by_shape("MORE", key, tracked[key], shapes, histograms)
    return panels


def grid(panels: Sequence[Panel]) -> tuple[list[tuple[int, int, int]], int, int]:
    """Where each panel goes: ``(row, col, colspan)`` from 1, and the grid's rows and columns.

    Cockpit's groups are columns side by side (those a run has), the loss spans the row
    below them, and other panels fill rows after that.

    Example:
      >>> ps = plan(["grad_norm", "distance", "norm_test", "loss"],
      ...           {"grad_norm": (), "distance": (), "norm_test": (), "loss": ()})
      >>> grid(ps)
      ([(1, 1, 1), (2, 1, 1), (1, 2, 1), (3, 1, 2)], 3, 2)
    """
    columns = [g for g in COLUMNS if any(p.group == g for p in panels)]
    more = [p for p in panels if p.group == "MORE"]
    n_cols = max(len(columns), min(3, len(more)), 1)
    depth = max((sum(p.group == g for p in panels) for g in columns), default=0)
    places: list[tuple[int, int, int]] = []
    filled = dict.fromkeys(columns, 0)
    row = depth
    more_at = 0
    for p in panels:
        if p.group in filled:
            filled[p.group] += 1
            places.append((filled[p.group], columns.index(p.group) + 1, 1))
        elif p.group == "LOSS":
            row += 1
            places.append((row, 1, n_cols))
        else:
            if more_at % n_cols == 0:
                row += 1
            places.append((row, more_at % n_cols + 1, 1))
            more_at += 1
    return places, max(row, 1), n_cols
