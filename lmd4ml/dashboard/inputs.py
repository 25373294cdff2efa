"""What a page's callback requests may carry, checked before any callback uses it.

A request comes from the browser, or from anyone who can reach the server: any JSON at all.
These small pure functions are the one place where it is checked (no Dash here).
:func:`callback_problem` refuses a request that is not shaped as one of the page's callbacks
(400, nothing runs); the values of its inputs and states, the only thing left free, then go
through the functions below, which turn any JSON value into one its callback can use:

- display options (smoothing, the panels in log scale, a click on a panel's log toggle,
  theme, the pause button's clicks) become the nearest valid value, or the default: a
  crafted value only changes what its sender sees;
- the view a page sends back is used only if it has the shape the server gave it, else the
  figure is redrawn, which makes a new one (:func:`view`);
- the run choice decides what is read, so it is refused with a message rather than guessed
  at (:func:`run_choice`, then :meth:`lmd4ml.dashboard.app.Listing.find`).

The poll counters (``n_intervals``) and the CSV button's clicks are read by no callback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SMOOTHING_MAX = 0.99  # the slider's end: the moving average needs a weight below 1
MAX_RUNS = 32
TOO_MANY = f"refused: at most {MAX_RUNS} runs are shown at once"
# A page's callback requests are a few kB (a view lists each trace): a body past this is
# answered 413 unread, so that no request makes the server parse megabytes of JSON.
MAX_REQUEST_BYTES = 1 << 20
# What a view's traces may be (lmd4ml.dashboard.figure draws them).
KINDS = (
    "lines", "raw", "layers", "layers_log", "heatmap", "bars", "image", "alpha_all",
    "alpha_recent", "norm_circle", "inner_band", "ortho_band", "static",
)  # fmt: skip
# A panel's log toggle is an annotation named this and the panel's title.
LOG_TOGGLE = "log:"
MAX_TITLE = 200  # characters of a panel title the page may name
MAX_LOGGED = 64  # panels in log scale at once
_STEPS = 2**63  # steps and counts are int64 on the server


def smoothing(value: object) -> float:
    """The smoothing slider's value: a number, clamped to [0, SMOOTHING_MAX]; else 0.

    Example:
      >>> smoothing(0.5), smoothing(7), smoothing(-1e400), smoothing(float("nan")), smoothing("1")
      (0.5, 0.99, 0.0, 0.0, 0.0)
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)
    # NaN is a float; a JSON integer may be too large for one: clamped before float().
    if not number or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(min(max(value, 0), SMOOTHING_MAX))


def _title(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TITLE


def logged(value: object) -> frozenset[str]:
    """The panels in log scale, as the page keeps them: a list of panel titles. Other
    entries are dropped; past ``MAX_LOGGED``, the rest too (titles of panels not drawn just
    do nothing).

    Example:
      >>> sorted(logged(["loss", 3, "", "gradient norm"])), logged("loss")
      (['gradient norm', 'loss'], frozenset())
    """
    if not isinstance(value, list):
        return frozenset()
    return frozenset([v for v in value if _title(v)][:MAX_LOGGED])


def log_click(value: object) -> str | None:
    """The title of the panel whose log toggle was clicked (a graph's
    ``clickAnnotationData``), or None if the click was elsewhere or is malformed.

    Example:
      >>> log_click({"index": 3, "annotation": {"name": "log:gradient norm", "text": "log"}})
      'gradient norm'
      >>> log_click({"annotation": {"name": "title"}}), log_click([]), log_click(None)
      (None, None, None)
    """
    annotation = value.get("annotation") if isinstance(value, dict) else None
    name = annotation.get("name") if isinstance(annotation, dict) else None
    if not isinstance(name, str) or not name.startswith(LOG_TOGGLE):
        return None
    title = name[len(LOG_TOGGLE) :]
    return title if _title(title) else None


def dark(value: object) -> bool:
    """The theme's value: dark if it says "dark", light whatever else it says."""
    return value == "dark"


def clicks(value: object) -> int:
    """A button's ``n_clicks``: a count from 0; anything else counts as none.

    Example:
      >>> clicks(3), clicks(None), clicks(-2), clicks(True), clicks(1.5)
      (3, 0, 0, 0, 0)
    """
    return value if type(value) is int and value > 0 else 0


def run_choice(value: object) -> list[object] | None:
    """The run chooser's value as a list ([]: none chosen, show the newest run), or None when
    it names more than ``MAX_RUNS``: refused before any is looked up."""
    if not value:
        return []
    values = value if isinstance(value, list) else [value]
    return values if len(values) <= MAX_RUNS else None


def view(value: object) -> dict | None:
    """The view a page sends back (:func:`lmd4ml.dashboard.figure.figure` made it), if it
    still has that shape; else None, and the figure is redrawn.

    Its traces must still name runs and fields that are shown, which
    :func:`~lmd4ml.dashboard.figure.extend` checks; its ``versions`` are only compared.
    """
    if not isinstance(value, dict) or not isinstance(value.get("key"), str):
        return None
    traces = value.get("traces")
    if not isinstance(traces, list) or not all(_trace(t) for t in traces):
        return None
    # One trace per run, field and kind, as in a figure: a view asks for no more work than
    # the largest figure does.
    if len({(t["run"], t["field"], t["kind"]) for t in traces}) < len(traces):
        return None
    return value


def _trace(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("run"), str)
        and isinstance(value.get("field"), str)
        and value.get("kind") in KINDS
        and type(value.get("n")) is int
        and 0 <= value["n"] < _STEPS
        and type(value.get("last")) is int
        and -1 <= value["last"] < _STEPS
    )


def callback_problem(body: object, callbacks: Mapping[str, Mapping]) -> str | None:
    """Why ``body`` is not a request the page makes for one of ``callbacks`` (a Dash app's
    ``callback_map``), or None if it is one.

    All but the values of inputs and states must be as the callback declares them: its
    output, its outputs, its inputs and states (ids and properties, in order), and changed
    properties among its inputs. A callback run in the browser (clientside) has none here.
    """
    if not isinstance(body, dict):
        return "the request is not a JSON object"
    output = body.get("output")
    spec = callbacks.get(output) if isinstance(output, str) else None
    if spec is None or "callback" not in spec:
        return "no callback of this page has that output"
    declared = _outputs(output)
    outputs = body.get("outputs")
    if not _same(outputs if output.startswith("..") else [outputs], declared):
        return "its outputs are not the callback's"
    # Dash's page leaves "state" out for a callback without one.
    if not _same(body.get("inputs"), spec["inputs"]) or not _same(
        body.get("state", []), spec["state"]
    ):
        return "its inputs or states are not the callback's"
    changed = body.get("changedPropIds", [])
    inputs = {f"{i['id']}.{i['property']}" for i in spec["inputs"]}
    if not (
        isinstance(changed, list)
        and len(changed) <= len(inputs)
        and all(isinstance(c, str) and c in inputs for c in changed)
    ):
        return "its changed properties are not among the callback's inputs"
    return None


def _outputs(output: str) -> list[dict]:
    """The outputs a callback map's key names: "id.prop", or "..id.prop...id.prop.." for
    several (Dash's own notation; this page's ids hold no dots)."""
    return [
        dict(zip(("id", "property"), o.rsplit(".", 1), strict=True))
        for o in output.strip(".").split("...")
    ]


def _same(items: object, declared: list) -> bool:
    """Whether ``items`` are dicts naming the ``declared`` ids and properties, in order."""
    return (
        isinstance(items, list)
        and len(items) == len(declared)
        and all(
            isinstance(item, dict)
            and (item.get("id"), item.get("property")) == (d["id"], d["property"])
            for item, d in zip(items, declared, strict=True)
        )
    )
