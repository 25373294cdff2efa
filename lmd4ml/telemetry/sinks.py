"""Live sinks: a run's values in TensorBoard, Weights & Biases or MLflow as it trains.

A sink gets what the run store gets, from the telemetry writer's thread: ``start(metadata,
fields)`` once (the run's metadata with its ``name`` and ``run_dir``; each field's shape and
dtype), ``write(step, wall_time, values)`` for every tracked step (host arrays of any subset of
the fields; ``wall_time`` in Unix seconds, when the step's values were fetched), and
``close(status)`` at the end. ``lm.train(..., sinks=[...])`` and ``lm.Recorder(...,
sinks=[...])`` take them; :func:`lmd4ml.telemetry.export.replay` sends a stored run through one
after the fact (``lm.to_tensorboard`` does so with :class:`TensorBoardSink`).

How each field is written, decided once at the start for all three tools (:func:`plan`):

* its name becomes a tag grouped by ``/``, as these tools group series: ``grad_norm['b1']``
  becomes ``grad_norm/b1`` (:func:`tag`); user values (``val_acc``) and hyperparameters
  (``hyper/learning_rate``) keep their names;
* a scalar (float, integer or bool as 0/1) is a scalar series;
* the counts of a :class:`~lmd4ml.GradHist1d` (what the run's ``quantities_by_key`` says the
  field is) are a histogram over the quantity's real bins, ``linspace(-maxval, maxval,
  nbins + 1)``;
* the counts of a :class:`~lmd4ml.GradHist2d` are an image, :func:`heatmap` (gradient bins
  as rows, parameter bins as columns), as Cockpit draws them: the joint distribution is the
  point of the instrument, and per-row histograms would split it into one series per
  parameter bin, each a marginal;
* any other array is one scalar series per element, ``<tag>/<i>`` (``<tag>/<i>_<j>``, …).

Names a tool rejects are mapped where a mapping keeps them apart (MLflow's characters,
W&B's histogram length) and reported clearly at the start otherwise: two fields under one
name, a name W&B keeps for itself. Each tool is an extra (``pip install
"lmd4ml[tensorboard]"``, ``[wandb]``, ``[mlflow]``), imported when a sink starts, never by
``import lmd4ml``; a missing one is an ``ImportError`` naming the extra.

Example:
  >>> tag("grad_norm['b1']"), tag("per_layer['conv'][0]"), tag("hyper/learning_rate")
  ('grad_norm/b1', 'per_layer/conv/0', 'hyper/learning_rate')
  >>> about = {"grad_hist_1d": {"kind": "grad_hist_1d", "args": {"nbins": 4, "maxval": 1.0}}}
  >>> fields = {"loss": ((), "float32"), "grad_hist_1d": ((4,), "int64"), "w": ((2,), "f4")}
  >>> for s in plan({"quantities_by_key": about}, fields):
  ...     print(s.field, s.kind, s.tags, s.edges)
  loss scalars ('loss',) None
  grad_hist_1d histogram ('grad_hist_1d',) [-1.  -0.5  0.   0.5  1. ]
  w scalars ('w/0', 'w/1') None
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from lmd4ml.telemetry.store import new_run_dir, plain_name

Fields = Mapping[str, tuple[tuple[int, ...], Any]]

# One part of a leaf's path as jax.tree_util.keystr writes it: ['key'], ["key"], [0], .attr
_PATH_PART = re.compile(r"""\[(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([^\]]*))\]|\.([^.\[]+)""")


def tag(name: str) -> str:
    """The tag of a stored field: its key and the parts of its leaf's path, joined by ``/``;
    a name that is not a key and a path (``hyper/learning_rate``) stays as it is.

    Example:
      >>> tag("grad_norm['b1']['w']"), tag("tic_diag[0]"), tag('x["it\\'s"]'), tag("loss")
      ('grad_norm/b1/w', 'tic_diag/0', "x/it's", 'loss')
    """
    key = re.match(r"[^\[.]*", name).group()
    parts, end = [key], len(key)
    for match in _PATH_PART.finditer(name, len(key)):
        if match.start() != end:
            return name
        parts.append(next(group for group in match.groups() if group is not None))
        end = match.end()
    return "/".join(parts) if end == len(name) else name


@dataclasses.dataclass(frozen=True)
class Series:
    """How one stored field is written: ``kind`` "scalars" (``tags``: one per element, in C
    order), "histogram" (one tag; ``edges``: its ``nbins + 1`` bin edges) or "image" (one
    tag; a 2-D histogram drawn by :func:`heatmap`)."""

    field: str
    kind: Literal["scalars", "histogram", "image"]
    tags: tuple[str, ...]
    edges: np.ndarray | None = None


def _description(metadata: Mapping[str, Any], name: str) -> tuple[str | None, dict]:
    """The kind and settings the run's metadata gives field ``name`` (a quantity's key), as
    far as they are readable: the metadata may come from a file."""
    described = metadata.get("quantities_by_key")
    about = described.get(name) if isinstance(described, dict) else None
    if not isinstance(about, dict):
        return None, {}
    args = about.get("args")
    return about.get("kind"), args if isinstance(args, dict) else {}


# The characters each tool takes in a name, as regex classes: tensorboardX replaces any other
# with "_" (silently merging names), MLflow rejects them.
TENSORBOARD_CHARACTERS = r"\w\-./"
MLFLOW_CHARACTERS = r"\w\-. /"


def clean(name: str, allowed: str) -> str:
    """``name`` with every character outside the regex class ``allowed`` replaced by ``_``,
    and so every empty, ``.`` or ``..`` part between slashes (MLflow rejects names that are
    not their own normalised path; tensorboardX strips a leading slash).

    Example:
      >>> clean("x/a:b//..", MLFLOW_CHARACTERS), clean("optimizer.b1", MLFLOW_CHARACTERS)
      ('x/a_b/_/_', 'optimizer.b1')
    """
    parts = re.sub(f"[^{allowed}]", "_", name).split("/")
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)


def clean_tag(name: str, allowed: str) -> str:
    """:func:`clean` of the :func:`tag` of a stored field's name.

    Example:
      >>> clean_tag("grad_norm['conv 1']", TENSORBOARD_CHARACTERS)
      'grad_norm/conv_1'
    """
    return clean(tag(name), allowed)


def _is_count(value: Any, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == n


def _histogram_edges(metadata: Mapping[str, Any], name: str, shape: tuple[int, ...]):
    """Bin edges of a GradHist1d's counts, or None if the metadata does not describe ``name``
    as one of this shape."""
    kind, args = _description(metadata, name)
    maxval = args.get("maxval")
    if (
        kind == "grad_hist_1d"
        and len(shape) == 1
        and _is_count(args.get("nbins"), shape[0])
        and isinstance(maxval, int | float)
        and 0 < maxval < math.inf
    ):
        return np.linspace(-maxval, maxval, shape[0] + 1)
    return None


def _is_2d_histogram(metadata: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> bool:
    kind, args = _description(metadata, name)
    bins = args.get("bins")
    return (
        kind == "grad_hist_2d"
        and len(shape) == 2
        and isinstance(bins, list | tuple)
        and len(bins) == 2
        and all(_is_count(b, n) for b, n in zip(bins, shape, strict=True))
    )


def _element_suffixes(shape: tuple[int, ...]) -> list[str]:
    """``""`` for a scalar, else ``/i`` or ``/i_j``… for each element in C order."""
    if not shape:
        return [""]
    return ["/" + "_".join(map(str, index)) for index in np.ndindex(*shape)]


def plan(
    metadata: Mapping[str, Any], fields: Fields, name: Callable[[str], str] = tag
) -> list[Series]:
    """How each of ``fields`` is written (see the module's docstring), its tags made by
    ``name`` from the field's name (and, for an array's elements, index suffixes after it).

    Raises ``ValueError`` naming both fields when two would be written under one tag.
    """
    series, owner = [], {}
    for field, (shape, dtype) in fields.items():
        shape = tuple(int(n) for n in shape)
        counts = np.dtype(dtype).kind in "iu"
        edges = _histogram_edges(metadata, field, shape) if counts else None
        if edges is not None:
            entry = Series(field, "histogram", (name(field),), edges)
        elif counts and _is_2d_histogram(metadata, field, shape):
            entry = Series(field, "image", (name(field),))
        else:
            tags = tuple(name(field) + suffix for suffix in _element_suffixes(shape))
            entry = Series(field, "scalars", tags)
        for t in entry.tags:
            if t in owner:
                raise ValueError(
                    f"fields {owner[t]!r} and {field!r} would both be written as {t!r}; "
                    "rename one (a quantity's name=, a user value's key)"
                )
            owner[t] = field
        series.append(entry)
    return series


def histogram_summary(counts: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """What TensorBoard's histogram keeps of per-bin ``counts`` over ``edges``: ``min``/``max``
    are the outer edges of the non-empty bins (all of them if none is), ``sum`` and
    ``sum_squares`` take each count at its bin's centre, ``bucket_limits`` are the bins' upper
    edges.

    Example:
      >>> s = histogram_summary(np.array([0, 2, 1]), np.array([-3.0, -1.0, 1.0, 3.0]))
      >>> s["min"], s["max"], s["num"], s["sum"], s["sum_squares"], s["bucket_limits"]
      (-1.0, 3.0, 3, 2.0, 4.0, [-1.0, 1.0, 3.0])
    """
    nonempty = np.flatnonzero(counts)
    low, high = (edges[nonempty[0]], edges[nonempty[-1] + 1]) if nonempty.size else edges[[0, -1]]
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    return {
        "min": float(low),
        "max": float(high),
        "num": int(counts.sum()),
        "sum": float(weights @ centres),
        "sum_squares": float(weights @ centres**2),
        "bucket_limits": edges[1:].tolist(),
        "bucket_counts": weights.tolist(),
    }


# Viridis at 0, 1/4, 1/2, 3/4 and 1: dark for few counts, bright for many, readable in grey.
_COLOURS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64
)


def heatmap(counts: np.ndarray, min_pixels: int = 256) -> np.ndarray:
    """A 2-D histogram's ``counts`` (gradient bins, parameter bins) as an RGB image, uint8 of
    shape (height, width, 3): colour by log(1 + count) relative to the largest bin (counts
    span orders of magnitude), viridis from dark (empty) to yellow (the largest); gradient
    bins as rows with the most negative at the bottom, parameter bins as columns from the most
    negative at the left, as a plot's axes run; each bin a square of pixels, enough for the
    longer side to reach ``min_pixels``.

    Example:
      >>> counts = np.array([[0, 9], [0, 0]])  # 9 in the lowest gradient bin, rightmost column
      >>> image = heatmap(counts, min_pixels=4)
      >>> image.shape, image[3, 3].tolist(), image[0, 0].tolist()
      ((4, 4, 3), [253, 231, 37], [68, 1, 84])
    """
    level = np.log1p(np.asarray(counts, np.float64).clip(min=0))
    if level.max() > 0:
        level = level / level.max()
    position = level * (len(_COLOURS) - 1)
    low = np.minimum(position.astype(np.int64), len(_COLOURS) - 2)
    frac = (position - low)[..., None]
    rgb = _COLOURS[low] * (1 - frac) + _COLOURS[low + 1] * frac
    scale = max(1, -(-min_pixels // max(counts.shape)))
    image = np.rint(rgb).astype(np.uint8)[::-1]  # row 0 of the counts at the bottom
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def coarser(counts: np.ndarray, edges: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``most`` bins: every k adjacent bins summed into one (the last may take fewer),
    k as small as that allows; counts and edges as they were if they fit.

    Example:
      >>> counts, edges = coarser(np.arange(5), np.linspace(0, 5, 6), 2)
      >>> counts.tolist(), edges.tolist()
      ([3, 7], [0.0, 3.0, 5.0])
    """
    k = -(-len(counts) // most)
    if k <= 1:
        return counts, edges
    n = -(-len(counts) // k)
    merged = np.pad(counts, (0, n * k - len(counts))).reshape(n, k).sum(axis=1)
    return merged, np.append(edges[:-1:k], edges[-1])


def _require(module: str, extra: str, sink: str) -> ModuleType:
    """Import ``module``, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f'{sink} needs the {module} package: pip install "lmd4ml[{extra}]" ({error})'
        ) from error


def _scalars(entry: Series, value: np.ndarray) -> Iterator[tuple[str, float]]:
    """(tag, value) of each element of a "scalars" field."""
    return zip(entry.tags, np.asarray(value, np.float64).reshape(-1).tolist(), strict=True)


def run_name(metadata: Mapping[str, Any]) -> str | None:
    """The run's name from its metadata, checked to be a plain directory name (it may come
    from a file); None for a run without one (kept in no store).

    Example:
      >>> run_name({"name": "baseline"}), run_name({})
      ('baseline', None)
    """
    name = metadata.get("name")
    if name is not None and not plain_name(name):
        raise ValueError(f"the run's name {name!r} is not a plain directory name")
    return name


class TensorBoardSink:
    """Write a run as TensorBoard event files in ``logdir/<run name>`` (a new time-stamped
    directory for a run without a name), through tensorboardX (the ``tensorboard`` extra:
    tensorboardX and Pillow; no TensorFlow).

    Scalars, histograms with their real bin edges and 2-D histograms as images (see the
    module's docstring); one event per step, holding every value written at that step, at
    the wall time ``write`` is given. Names take only what tensorboardX keeps
    (:func:`clean_tag`). ``tensorboard --logdir logdir`` shows every run written there side
    by side. A run directory that already holds event files is refused (TensorBoard would
    show both as one run). Events reach the file at least every ``flush_secs`` seconds, and
    at ``close``.

    Example:
      >>> import tempfile
      >>> sink = TensorBoardSink(tempfile.mkdtemp())
      >>> sink.start({"name": "demo"}, {"loss": ((), "float32")})
      >>> sink.write(0, 1700000000.0, {"loss": np.float32(0.5)})
      >>> sink.close("finished")
      >>> sink.path.name, [p.name.startswith("events.out.tfevents") for p in sink.path.iterdir()]
      ('demo', [True])
    """

    def __init__(self, logdir: str | os.PathLike, flush_secs: float = 5.0):
        self.logdir = Path(logdir)
        self.flush_secs = flush_secs
        self.path: Path | None = None  # logdir/<run name>, once started
        self._writer: Any = None
        self._series: list[Series] = []

    def start(self, metadata: Mapping[str, Any], fields: Fields) -> None:
        """Plan the fields' series and open the run's event file."""
        tensorboardx = _require("tensorboardX", "tensorboard", "TensorBoardSink")
        from tensorboardX import summary
        from tensorboardX.proto.summary_pb2 import Summary

        self._summary, self._proto = summary, Summary
        self._series = plan(metadata, fields, partial(clean_tag, allowed=TENSORBOARD_CHARACTERS))
        if any(entry.kind == "image" for entry in self._series):
            _require("PIL", "tensorboard", "TensorBoardSink")  # tensorboardX encodes with it
        name = run_name(metadata)
        path = self.logdir / name if name is not None else new_run_dir(self.logdir)
        if path.is_dir() and any(path.glob("events.out.tfevents.*")):
            raise FileExistsError(
                f"TensorBoardSink: {path} already holds TensorBoard event files, which it "
                "would show as one run with these; remove them or choose another logdir"
            )
        self._writer = tensorboardx.FileWriter(str(path), flush_secs=self.flush_secs)
        self.path = path

    def write(self, step: int, wall_time: float, values: Mapping[str, np.ndarray]) -> None:
        """Add one step's values as one event at ``wall_time``."""
        entries = []
        for entry in self._series:
            if entry.field not in values:
                continue
            value, name = np.asarray(values[entry.field]), entry.tags[0]
            if entry.kind == "histogram":
                summary = histogram_summary(value, entry.edges)
                entries += self._summary.histogram_raw(name, **summary).value
            elif entry.kind == "image":
                entries += self._summary.image(name, heatmap(value), dataformats="HWC").value
            else:
                # Made here rather than by tensorboardX's scalar(), which logs a warning for
                # every NaN: a value these instruments may have at every step.
                entries += [
                    self._proto.Value(tag=t, simple_value=v) for t, v in _scalars(entry, value)
                ]
        if entries:
            self._writer.add_summary(self._proto(value=entries), step, wall_time)

    def close(self, status: str) -> None:
        """Write what is pending and close the event file (``status`` is not recorded)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# What W&B keeps for itself in a history row.
_WANDB_KEYS = ("_step", "_runtime", "_timestamp")
# W&B's histograms hold at most this many bins (wandb.Histogram.MAX_LENGTH).
_WANDB_MAX_BINS = 512


def _split_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's run configuration: the user's ``config`` at the top, the rest of what lmd4ml
    records about the run (quantities, model, optimizer, versions, where it is stored) under
    ``lmd4ml``."""
    config = metadata.get("config")
    config = dict(config) if isinstance(config, dict) else {}
    if "lmd4ml" in config:
        raise ValueError("the run's config has a key 'lmd4ml', which holds lmd4ml's own settings")
    about = ("quantities", "keys", "model", "optimizer", "versions", "run_dir", "total_steps")
    config["lmd4ml"] = {key: metadata[key] for key in about if key in metadata}
    return config


class WandbSink:
    """Log a run to Weights & Biases: ``wandb.init(project=..., name=<run name>,
    config=...)`` at the start, one ``run.log(row, step=step)`` per tracked step, ``finish`` at
    the end (exit code 0 for a finished run, 1 otherwise; lmd4ml's status in the summary as
    ``lmd4ml/status``). The ``wandb`` extra.

    The config is the run's ``config`` with lmd4ml's own description of the run under
    ``lmd4ml``. Scalars, histograms (``wandb.Histogram``, adjacent bins summed down to W&B's 512
    at most) and 2-D histograms as images (``wandb.Image``); each row carries the step's wall
    time as ``_timestamp``, the key W&B stamps rows with. ``init_kwargs`` go to ``wandb.init``
    (``entity``, ``mode="offline"``, ``dir``, ``settings``, …); the run is one of its own
    (``reinit="create_new"``), so it neither finishes nor replaces a ``wandb.run`` of the
    caller's.
    """

    def __init__(self, project: str | None = None, **init_kwargs: Any):
        self.project = project
        self.init_kwargs = init_kwargs
        self.run: Any = None  # the wandb run, once started
        self._series: list[Series] = []

    def start(self, metadata: Mapping[str, Any], fields: Fields) -> None:
        """Plan the fields' series and start the W&B run."""
        self._wandb = _require("wandb", "wandb", "WandbSink")
        self._series = plan(metadata, fields)
        if any(entry.kind == "image" for entry in self._series):
            _require("PIL", "wandb", "WandbSink")  # wandb.Image encodes with it
        taken = sorted({t for entry in self._series for t in entry.tags}.intersection(_WANDB_KEYS))
        if taken:
            raise ValueError(f"WandbSink: W&B keeps the keys {taken} for itself; rename them")
        kwargs = {
            "project": self.project,
            "name": metadata.get("name"),
            "config": _split_config(metadata),
            "reinit": "create_new",
            **self.init_kwargs,
        }
        self.run = self._wandb.init(**kwargs)

    def write(self, step: int, wall_time: float, values: Mapping[str, np.ndarray]) -> None:
        """Log one step's values as one row."""
        row: dict[str, Any] = {"_timestamp": wall_time}
        for entry in self._series:
            if entry.field not in values:
                continue
            value = np.asarray(values[entry.field])
            if entry.kind == "histogram":
                counts, edges = coarser(value, entry.edges, _WANDB_MAX_BINS)
                row[entry.tags[0]] = self._wandb.Histogram(np_histogram=(counts, edges))
            elif entry.kind == "image":
                row[entry.tags[0]] = self._wandb.Image(heatmap(value))
            else:
                row.update(_scalars(entry, value))
        self.run.log(row, step=step)

    def close(self, status: str) -> None:
        """Finish the W&B run, its exit code 0 if ``status`` is "finished", else 1."""
        if self.run is not None:
            self.run.summary["lmd4ml/status"] = status
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None


# MLflow's run status for each of lmd4ml's.
_MLFLOW_STATUS = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "incomplete": "FAILED",
}


def _mlflow_params(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(name, text) of every leaf of a nested config: names joined by ``.``, text as JSON
    except for strings."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _mlflow_params(value, f"{name}.")
        else:
            yield name, value if isinstance(value, str) else json.dumps(value, default=repr)


class MLflowSink:
    """Log a run to MLflow, in ``experiment`` (made if missing) on ``tracking_uri`` (MLflow's
    default if None; ``sqlite:///path.db`` for a local file, which needs SQLAlchemy and
    alembic: the ``mlflow`` extra has them). The run is named after the lmd4ml run, its
    parameters are the run's config (nested keys joined by ``.``), its tags ``lmd4ml.run_dir``
    (for a stored run) and, at the end, ``lmd4ml.status``; its MLflow status is FINISHED,
    FAILED or KILLED (interrupted).

    Every scalar and array element is a metric at its step, stamped with the step's wall
    time; names are mapped to what MLflow accepts (:func:`clean_tag`). MLflow has no
    histograms: the 1-D and 2-D histograms are left out (TensorBoard and W&B show them). Its
    SQL stores keep ±inf as ±1.8e308. Metrics are sent in batches, at least every
    ``flush_secs`` seconds and at ``close``: one call per step would cost a transaction of
    tens of milliseconds, and a fast loop would leave the sink ever further behind.
    """

    def __init__(
        self, tracking_uri: str | None = None, experiment: str = "lmd4ml", flush_secs: float = 5.0
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.flush_secs = flush_secs
        self.run_id: str | None = None  # MLflow's, once started
        self._series: list[Series] = []
        self._pending: list[Any] = []  # mlflow.entities.Metric, not sent yet
        self._flushed = time.monotonic()

    def start(self, metadata: Mapping[str, Any], fields: Fields) -> None:
        """Plan the fields' series, make the MLflow run and log its parameters."""
        _require("mlflow", "mlflow", "MLflowSink")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        series = plan(metadata, fields, partial(clean_tag, allowed=MLFLOW_CHARACTERS))
        self._series = [entry for entry in series if entry.kind == "scalars"]
        long = [t for entry in self._series for t in entry.tags if len(t) > MAX_ENTITY_KEY_LENGTH]
        if long:
            raise ValueError(
                f"MLflowSink: MLflow takes names of at most {MAX_ENTITY_KEY_LENGTH} characters; "
                f"{long[0]!r} has {len(long[0])}"
            )
        params: dict[str, Param] = {}
        for name, text in _mlflow_params(metadata.get("config") or {}):
            mapped = clean(name, MLFLOW_CHARACTERS)
            if mapped in params:
                raise ValueError(f"MLflowSink: config keys {name!r} and another map to {mapped!r}")
            params[mapped] = Param(mapped, text)
        self._client = client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(self.experiment)
        )
        run_dir = metadata.get("run_dir")  # None: a run kept in no store
        tags = {} if run_dir is None else {"lmd4ml.run_dir": str(run_dir)}
        run = client.create_run(experiment_id, tags=tags, run_name=run_name(metadata))
        self.run_id = run.info.run_id
        entries = list(params.values())
        for first in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=entries[first : first + MAX_PARAMS_TAGS_PER_BATCH])

    def write(self, step: int, wall_time: float, values: Mapping[str, np.ndarray]) -> None:
        """Log every scalar of one step, at its wall time (milliseconds, as MLflow keeps it):
        queued, and sent once ``flush_secs`` have passed since the last batch."""
        from mlflow.entities import Metric

        stamp = round(wall_time * 1000)
        self._pending += [
            Metric(name, value, stamp, step)
            for entry in self._series
            if entry.field in values
            for name, value in _scalars(entry, values[entry.field])
        ]
        if time.monotonic() - self._flushed >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Send the queued metrics, as many a call as MLflow takes."""
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        for first in range(0, len(self._pending), MAX_METRICS_PER_BATCH):
            batch = self._pending[first : first + MAX_METRICS_PER_BATCH]
            self._client.log_batch(self.run_id, metrics=batch)
        self._pending.clear()
        self._flushed = time.monotonic()

    def close(self, status: str) -> None:
        """Send what is queued and end the MLflow run with the status matching ``status``."""
        if status not in _MLFLOW_STATUS:
            raise ValueError(f"MLflowSink: status must be one of {list(_MLFLOW_STATUS)}")
        if self.run_id is not None:
            self.flush()
            self._client.set_tag(self.run_id, "lmd4ml.status", status)
            self._client.set_terminated(self.run_id, _MLFLOW_STATUS[status])
            self.run_id = None
