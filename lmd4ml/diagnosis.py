"""Diagnosis: what the recorded instruments say is wrong with a training run.

``lm.diagnose(source)`` reads a run's recorded series (an ``lm.train`` history, a
:class:`~lmd4ml.telemetry.store.Run`, or a run directory; one adapter, :class:`Recorded`)
and applies one small pure rule per code (:data:`RULES`), each grounded in its
instruments' theory (see ``docs/diagnosis.md``). It returns a :class:`Diagnosis`: a list of
:class:`Finding` (code, severity, first and last step, a message with the evidence and what
to try, the evidence as numbers) that also says which rules were skipped and why (an
instrument not tracked, too few steps, an optimizer the rule cannot reason about).

Robust to mini-batch noise: a rule reads medians over windows of ``window`` tracked values,
and most call a condition only when it holds for ``persist`` windows in a row; a run with
fewer than ``min_windows`` windows of an instrument has that rule skipped, never guessed.
Every threshold is a field of :class:`Thresholds`, overridable by keyword.

While ``lm.train`` or ``lm.Recorder`` record, :class:`LiveDiagnosis` (a sink on the
telemetry writer thread) runs the same rules as steps arrive, warns once about each new
finding, and the run's store keeps the final findings (``run.metadata["findings"]``).

Example:
  >>> import numpy as np
  >>> steps = np.arange(40)
  >>> loss = np.r_[np.linspace(2.3, 2.0, 20), np.full(20, np.nan)]
  >>> recorded = Recorded({"loss": (steps, loss)}, {})
  >>> findings = diagnose(recorded)
  >>> [(f.code, f.severity, f.first_step, f.last_step) for f in findings]
  [('nonfinite', 'error', 20, 39)]
  >>> findings.skipped["stalled"]
  'needs update_size or distance, which were not tracked'
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SEVERITIES = ("info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Finding:
    """What one rule sees in a run: ``code`` (see :data:`RULES`), ``severity`` ("info",
    "warning" or "error"), the tracked steps ``first_step`` … ``last_step`` where it holds, a
    ``message`` (what is seen, the values, what to try), and the ``evidence`` as numbers."""

    code: str
    severity: str
    first_step: int
    last_step: int
    message: str
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The finding as JSON holds it (the run store, ``lmd4ml diagnose --json``)."""
        return {
            "code": self.code,
            "severity": self.severity,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "message": self.message,
            "evidence": {k: _plain(v) for k, v in self.evidence.items()},
            "docs": self.docs,
        }

    @property
    def docs(self) -> str:
        """The page of the instrument the finding is read from, within the repository's
        ``docs/`` (:data:`INSTRUMENT_PAGE`); ``docs/diagnosis.md`` explains the rule."""
        return f"instruments/{INSTRUMENT_PAGE.get(self.code, 'README')}.md"


def _plain(value: Any) -> Any:
    """A number or a list of them as JSON writes it (NaN and ±inf as text)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else repr(value)


class Diagnosis(list):
    """The findings of :func:`diagnose`, in :data:`RULES` order, and ``skipped``: the rules
    that could not be applied, by code, with why."""

    def __init__(self, findings: Sequence[Finding], skipped: Mapping[str, str]):
        super().__init__(findings)
        self.skipped = dict(skipped)

    @property
    def worst(self) -> str | None:
        """The highest severity among the findings, or None for none."""
        return max((f.severity for f in self), key=SEVERITIES.index, default=None)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The knobs of the rules, with their defaults (each explained in ``docs/diagnosis.md``).

    Windows and persistence:
      window: tracked values per window; rules read each window's median.
      min_windows: a rule needs at least this many windows of its instruments, else skipped.
      persist: windows in a row a condition must hold for a warning.

    Learning rate (``alpha``, ``loss``, ``update_size``):
      alpha_high: window median of α above this: steps overshoot (1: uphill).
      alpha_low: window median of α, concave fits (α exactly −1) left out, at or below
        this: steps cover under 1 % of the way to the minimum along them.
      loss_flat: relative change of the loss's window medians over the windows looked at
        below which the loss counts as barely moving.
      loss_rise: relative rise of the loss's window median over ``persist`` windows that
        counts as rising.
      diverge: last window's loss median this many times the first's (or non-finite after
        finite values): diverging, an error.

    Noise (``norm_test``, ``noise_scale``):
      norm_test_close: the norm test's median over the second half of the run at or above
        this counts as close to its pure-noise value 1 (with the loss barely moving).
      norm_test_target: the norm test's value a suggested batch size aims at.
      critical_factor: B_simple's median over the last window this many times the batch
        size: the batch is far below the critical batch size.

    Gradient scale (``grad_norm``, per layer, ``grad_hist_1d``):
      layer_ratio: a layer's median gradient norm below this fraction of the largest
        layer's: vanishing in that layer.
      central_mass: the histogram's two central bins holding at least this fraction of the
        per-sample gradient elements: collapsed.
      grad_scale: the gradient norm's median in the first window above this: exploding
        from initialisation (for losses of order one: a mean cross-entropy, a squared
        error on standardised targets; scale it with your loss).
      spike: a window median this many times the one before it: a spike.
      edge_mass: the histogram's two edge bins holding at least this fraction: piled up.

    Edge of stability (``hess_max_ev`` and the learning rate):
      eos_near: η·λ_max at or above this fraction of the optimizer's stability limit:
        at the edge (info).
      eos_beyond: above this multiple of the limit: beyond it (warning).

    Stalled (``update_size``, ``distance``):
      stall_size: update sizes and changes of the distance at or below this: not moving.
    """

    window: int = 10
    min_windows: int = 3
    persist: int = 3
    alpha_high: float = 1.0
    alpha_low: float = -0.99
    loss_flat: float = 0.05
    loss_rise: float = 0.05
    diverge: float = 10.0
    norm_test_close: float = 0.9
    norm_test_target: float = 0.5
    critical_factor: float = 10.0
    layer_ratio: float = 1e-3
    central_mass: float = 0.99
    grad_scale: float = 100.0
    spike: float = 100.0
    edge_mass: float = 0.5
    eos_near: float = 0.9
    eos_beyond: float = 1.1
    stall_size: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("window", "min_windows", "persist"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Thresholds: {name} must be an integer >= 1, got {value!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "float" and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"Thresholds: {field.name} must be a finite number, got {value!r}")


class Skip(Exception):
    """Raised inside a rule: it cannot be applied to this run, and why."""


# ---------------------------------------------------------------------------------------
# The recorded series: one adapter for histories, runs and run directories.


def _base(field: str) -> str:
    return field.split("[", 1)[0]


def _leaf(field: str) -> str | None:
    """The part of a flat field name inside its brackets: ``grad_norm['0/w']`` → ``0/w``."""
    if "[" not in field:
        return None
    return field[len(_base(field)) :].strip("[]").strip("'\"")


class Recorded:
    """A run's recorded series: flat field name → ``(steps, values)`` numpy arrays (as the
    run store names fields: ``loss``, ``grad_norm['total']``), with the run's ``metadata``
    (``quantities_by_key`` says what a renamed quantity is; ``optimizer``, ``config`` and
    ``batch_size`` what the rules need besides the instruments).

    Example:
      >>> r = Recorded({"grad_norm['total']": ([0, 1], [1.0, 2.0])}, {})
      >>> r.scalar("grad_norm")[1].tolist(), r.layers("grad_norm")
      ([1.0, 2.0], {})
    """

    def __init__(self, fields: Mapping[str, tuple[Any, Any]], metadata: Mapping[str, Any]):
        self.fields = {
            name: (np.asarray(steps, np.int64), np.asarray(values, np.float64))
            for name, (steps, values) in fields.items()
        }
        self.metadata = dict(metadata)
        described = self.metadata.get("quantities_by_key")
        described = described if isinstance(described, Mapping) else {}
        self._kinds: dict[str, list[str]] = {}
        for name in self.fields:
            about = described.get(_base(name))
            kind = about.get("kind") if isinstance(about, Mapping) else None
            self._kinds.setdefault(kind if isinstance(kind, str) else _base(name), []).append(name)

    def n_steps(self) -> int:
        """How many distinct steps hold any value."""
        steps = [s for s, _ in self.fields.values()]
        return len(np.unique(np.concatenate(steps))) if steps else 0

    def has(self, kind: str) -> bool:
        return kind in self._kinds

    def scalar(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """The scalar series of the instrument of ``kind`` (a per-layer one's ``total``)."""
        names = self._kinds.get(kind, [])
        for name in names:
            if _leaf(name) in (None, "total") and self.fields[name][1].ndim == 1:
                return self.fields[name]
        raise Skip(f"needs {kind}, which was not tracked")

    def layers(self, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The per-layer series of ``kind`` (``per_layer=True``), by layer path; {} if none."""
        return {
            _leaf(name): self.fields[name]
            for name in self._kinds.get(kind, [])
            if _leaf(name) not in (None, "total")
        }

    def array(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """An array-valued instrument's series: values of shape (steps, ...)."""
        for name in self._kinds.get(kind, []):
            if self.fields[name][1].ndim >= 2:
                return self.fields[name]
        raise Skip(f"needs {kind}, which was not tracked")

    @classmethod
    def from_history(cls, history: Mapping[str, Any], metadata: Mapping[str, Any]) -> Recorded:
        """A history of ``lm.train`` (a pytree value, e.g. per-layer norms, one field a leaf)."""
        fields = {}
        for key, value in history.items():
            if key == "step":
                continue
            steps = history.steps(key)
            if isinstance(value, Mapping):
                for leaf, rows in value.items():
                    fields[f"{key}[{leaf!r}]"] = (steps, rows)
            else:
                fields[key] = (steps, value)
        return cls(fields, metadata)

    @classmethod
    def from_run(cls, run: Any) -> Recorded:
        """A stored run (:class:`~lmd4ml.telemetry.store.Run`): the fields the rules read."""
        wanted = [name for name in run.keys if read_by_rules(name, run.metadata)]
        return cls({name: run[name] for name in wanted}, run.metadata)


READ = frozenset(
    {"loss", "grad_norm", "update_size", "distance", "alpha", "norm_test", "noise_scale",
     "grad_hist_1d", "hess_max_ev"}
)  # fmt: skip
"""The instrument kinds the rules read."""


def read_by_rules(field: str, metadata: Mapping[str, Any]) -> bool:
    """Whether a rule reads the run's flat ``field``: an instrument of a kind in
    :data:`READ` (by ``metadata["quantities_by_key"]``, else by its key), or a
    hyperparameter.

    Example:
      >>> read_by_rules("grad_norm['0/w']", {}), read_by_rules("val_acc", {})
      (True, False)
    """
    described = metadata.get("quantities_by_key")
    about = described.get(_base(field)) if isinstance(described, Mapping) else None
    kind = about.get("kind") if isinstance(about, Mapping) else _base(field)
    return kind in READ or field.startswith("hyper/")


class Thinned:
    """A series kept in at most ``capacity`` values: when full, every other value is
    dropped and from then on only every other one appended is kept (the stride doubles),
    so that a live diagnosis of a run of any length holds bounded memory and its windows
    still span the whole run.

    Example:
      >>> kept = Thinned((), capacity=4)
      >>> for step in range(10):
      ...     kept.append(step, float(step))
      >>> kept.steps().tolist(), kept.stride
      ([0, 4, 8], 4)
    """

    def __init__(self, shape: tuple[int, ...], capacity: int = 4096):
        self.stride, self._seen, self._n = 1, 0, 0
        self._steps = np.zeros(capacity, np.int64)
        self._values = np.zeros((capacity, *shape), np.float64)

    def append(self, step: int, value: Any) -> None:
        # The j-th value appended (from 0) is kept while j is a multiple of the stride:
        # halving keeps exactly those of the doubled stride.
        seen, self._seen = self._seen, self._seen + 1
        if seen % self.stride:
            return
        self._steps[self._n], self._values[self._n] = step, value
        self._n += 1
        if self._n == len(self._steps):
            half = self._n // 2
            self._steps[:half], self._values[:half] = self._steps[::2], self._values[::2]
            self._n, self.stride = half, 2 * self.stride

    def steps(self) -> np.ndarray:
        return self._steps[: self._n].copy()

    def values(self) -> np.ndarray:
        return self._values[: self._n].copy()


# ---------------------------------------------------------------------------------------
# Windows and persistence.


@dataclasses.dataclass(frozen=True)
class Windows:
    """Consecutive windows of a series: each one's first and last step and median."""

    first: np.ndarray
    last: np.ndarray
    median: np.ndarray


def windows(
    steps: np.ndarray,
    values: np.ndarray,
    t: Thresholds,
    *,
    what: str = "values",
    keep_exact: float | None = None,
) -> Windows:
    """Medians of ``window`` consecutive finite values (NaN and ±inf left out; values equal
    to ``keep_exact`` too, if given); ``Skip`` for fewer than ``min_windows`` windows,
    naming the series ``what``.

    Example:
      >>> w = windows(np.arange(30), np.arange(30.0), Thresholds())
      >>> w.first.tolist(), w.median.tolist()
      ([0, 10, 20], [4.5, 14.5, 24.5])
    """
    keep = np.isfinite(values)
    if keep_exact is not None:
        keep &= values != keep_exact
    steps, values = steps[keep], values[keep]
    n = len(values) // t.window
    if n < t.min_windows:
        raise Skip(
            f"too few steps of {what}: {len(values)} usable values, {t.min_windows} windows "
            f"of {t.window} needed"
        )
    cut = n * t.window
    # The last values form the last window: the end of a run matters most.
    steps, values = steps[-cut:].reshape(n, -1), values[-cut:].reshape(n, -1)
    return Windows(steps[:, 0], steps[:, -1], np.median(values, axis=1))


def persistent(flags: np.ndarray, k: int) -> tuple[int, int] | None:
    """The first and last index of the flagged windows, from the first run of ``k`` in a
    row on; None without such a run.

    Example:
      >>> persistent(np.array([1, 0, 1, 1, 1, 0, 1], bool), 3)
      (2, 6)
    """
    run = 0
    for i, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run == k:
            start = i - k + 1
            return start, start + int(np.flatnonzero(flags[start:])[-1])
    return None


def _relative_change(before: float, after: float) -> float:
    return abs(after - before) / max(abs(before), np.finfo(float).tiny)


# ---------------------------------------------------------------------------------------
# What the rules need besides the instruments: the optimizer and the batch size.


ADAPTIVE = tuple(
    [
        "adam",
        "rms",
        "adagrad",
        "adadelta",
        "adafactor",
        "lamb",
        "lars",
        "lion",
        "yogi",
        "novograd",
        "sm3",
        "fromage",
        "belief",
        "amsgrad",
        "nadam",
        "radam",
        "prodigy",
        "sign",
        "muon",
        "adan",
        "adamax",
        "sophia",
        "polyak",
        "lbfgs",
        "schedule_free",
    ]
)
"""Parts of the names of optax's adaptive (preconditioned) optimizers and their pieces."""
_PLAIN = ("optax.identity", "optax.scale", "optax.trace", "optax.scale_by_schedule")
"""The pieces of plain and momentum SGD (``optax.scale`` or ``optax.scale_by_schedule``, the
learning rate, among them)."""


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What the rules know of the optimizer: ``kind`` ("sgd": plain or heavy-ball momentum
    SGD, "adaptive", "unknown"), a constant ``learning_rate`` (None when it is scheduled or
    unknown: then ``hyper/learning_rate`` says it), ``momentum`` β and ``nesterov``."""

    kind: str = "unknown"
    learning_rate: float | None = None
    momentum: float = 0.0
    nesterov: bool = False

    def stability_limit(self) -> float:
        """The largest η·λ_max at which its iteration on a quadratic is stable: 2 for plain
        gradient descent, 2 + 2β with heavy-ball momentum, (2 + 2β)/(1 + 2β) with Nesterov's
        (Cohen et al. 2021, appendix; Goh 2017)."""
        b = self.momentum
        return (2 + 2 * b) / (1 + 2 * b) if self.nesterov else 2 + 2 * b


def _functions(desc: Any) -> list[Mapping[str, Any] | str]:
    """Every transformation in a description (:func:`lmd4ml.describing.json_safe` of an
    optax optimizer), chains flattened."""
    if isinstance(desc, Mapping) and desc.get("function") == "optax.chain":
        return [f for inner in desc.get("update_fns", []) for f in _functions(inner)]
    return [desc]


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def optimizer_facts(desc: Any) -> Optimizer:
    """What a run's optimizer description says (``metadata["optimizer"]``).

    Example:
      >>> import optax
      >>> from lmd4ml.describing import json_safe
      >>> optimizer_facts(json_safe(optax.sgd(0.1, momentum=0.9)))
      Optimizer(kind='sgd', learning_rate=0.1, momentum=0.9, nesterov=False)
      >>> optimizer_facts(json_safe(optax.adam(1e-3))).kind
      'adaptive'
      >>> optimizer_facts(json_safe(optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)))
      Optimizer(kind='sgd', learning_rate=0.5, momentum=0.0, nesterov=False)
    """
    parts = _functions(desc)
    names = [p.get("function") if isinstance(p, Mapping) else p for p in parts]
    if not names or not all(isinstance(n, str) for n in names):
        return Optimizer()
    if any(a in n.rsplit(".", 1)[-1] for n in names for a in ADAPTIVE):
        return Optimizer("adaptive")
    if len(parts) == 1 and isinstance(parts[0], Mapping) and "inject_hyperparams" in names[0]:
        inner = names[0].partition("(")[2].rstrip(")")
        if inner != "optax.sgd":
            return Optimizer()
        p = parts[0]
        momentum = _number(p.get("momentum")) or 0.0
        return Optimizer(
            "sgd", _number(p.get("learning_rate")), momentum, p.get("nesterov") is True
        )
    rated = {"optax.scale", "optax.scale_by_schedule"} & set(names)
    if not rated or not all(n in _PLAIN for n in names):
        return Optimizer()
    lr, momentum, nesterov = None, 0.0, False
    for p in parts:
        if not isinstance(p, Mapping):
            continue
        if p["function"] == "optax.scale":
            size = _number(p.get("step_size"))
            lr = None if size is None else -size
        elif p["function"] == "optax.trace":
            momentum, nesterov = _number(p.get("decay")) or 0.0, p.get("nesterov") is True
    return Optimizer("sgd", lr, momentum, nesterov)


def batch_size(metadata: Mapping[str, Any]) -> int | None:
    """The run's batch size: recorded by ``lm.train`` / ``lm.Recorder``, else the user's
    ``config["batch_size"]``; None when neither says."""
    config = metadata.get("config")
    config = config if isinstance(config, Mapping) else {}
    for value in (metadata.get("batch_size"), config.get("batch_size")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------
# The rules: each a pure function (recorded series, thresholds) -> findings, or Skip.


def _finding(
    code: str, severity: str, w: Windows, span: tuple[int, int], message: str, **evidence: Any
) -> Finding:
    """A finding that holds over the windows ``span`` (first and last index) of ``w``."""
    return Finding(code, severity, int(w.first[span[0]]), int(w.last[span[1]]), message, evidence)


def _g(x: float) -> str:
    return f"{x:.3g}"


def rule_nonfinite(r: Recorded, t: Thresholds) -> list[Finding]:
    """NaN or ±inf in the loss or the gradient norm at any step: an error, from one step on
    (a non-finite value is no noise), usually a bad batch or a diverged update."""
    found = []
    for kind in ("loss", "grad_norm"):
        if r.has(kind):
            steps, values = r.scalar(kind)
            bad = ~np.isfinite(values)
            if bad.any():
                found.append((kind, steps[bad]))
    if not any(r.has(k) for k in ("loss", "grad_norm")):
        raise Skip("needs loss or grad_norm, which were not tracked")
    if not found:
        return []
    bad_steps = np.concatenate([s for _, s in found])
    first, last = int(bad_steps.min()), int(bad_steps.max())
    where = ", ".join(f"{k} ({len(s)} steps)" for k, s in found)
    return [
        Finding(
            "nonfinite",
            "error",
            first,
            last,
            f"NaN or Inf in {where}, first at step {first}. Look at the batch of step "
            f"{first} (a corrupt record, a log of 0) and the loss's arithmetic; if the values "
            "grew before, lower the learning rate or clip the gradient "
            "(optax.clip_by_global_norm); optax.apply_if_finite skips such updates.",
            {"first_nonfinite": first, "n_steps": len(np.unique(bad_steps))},
        )
    ]


def rule_lr_too_large(r: Recorded, t: Thresholds) -> list[Finding]:
    """Steps overshoot: α's window median above ``alpha_high`` for ``persist`` windows
    (uphill along the update: Cockpit's reading), or the loss's window median rising by
    ``loss_rise`` over ``persist`` windows while updates do not shrink; an error when the
    loss diverges (its last window ``diverge`` times its first, or non-finite after finite
    values that grew so)."""
    steps, loss = r.scalar("loss")
    lw = windows(steps, loss, t, what="loss")
    finite = np.isfinite(loss)
    bad = np.flatnonzero(~finite)
    before = loss[: bad[0]] if bad.size else loss[:0]
    # Non-finite after a loss that grew: the divergence ran out of floating point.
    grew = before.size >= 2 * t.window and np.max(before[-t.window :]) >= t.diverge * np.median(
        before[: t.window]
    )
    ratio = lw.median[-1] / max(lw.median[0], np.finfo(float).tiny)
    if ratio >= t.diverge or grew:
        return [
            _finding(
                "lr_too_large",
                "error",
                lw,
                (0, len(lw.median) - 1),
                f"the loss diverges: its median went from {_g(lw.median[0])} to "
                f"{_g(lw.median[-1])}"
                + (" and then became non-finite" if grew else "")
                + ". Lower the learning rate (by 10x to start with) or add warm-up.",
                loss_first=lw.median[0],
                loss_last=lw.median[-1],
            )
        ]
    if r.has("alpha"):
        aw = windows(*r.scalar("alpha"), t, what="alpha")
        span = persistent(aw.median > t.alpha_high, t.persist)
        if span is not None:
            peak = float(np.max(aw.median[span[0] : span[1] + 1]))
            return [
                _finding(
                    "lr_too_large",
                    "warning",
                    aw,
                    span,
                    f"the steps overshoot: α's median stays above {_g(t.alpha_high)} (up to "
                    f"{_g(peak)}; 1 means landing uphill at the starting height). Lower the "
                    "learning rate (by 2-10x).",
                    alpha_median_max=peak,
                )
            ]
    rises = np.r_[False, lw.median[1:] > lw.median[:-1]]
    span = persistent(rises, t.persist)
    if span is not None and r.has("update_size"):
        start, end = lw.median[max(span[0] - 1, 0)], lw.median[span[1]]
        uw = windows(*r.scalar("update_size"), t, what="update_size")
        shrinking = uw.median[-1] < 0.5 * uw.median[0]
        if _relative_change(start, end) >= t.loss_rise and end > start and not shrinking:
            return [
                _finding(
                    "lr_too_large",
                    "warning",
                    lw,
                    span,
                    f"the loss rises over {span[1] - span[0] + 1} windows (median "
                    f"{_g(start)} to {_g(end)}) while the updates stay large (median "
                    f"{_g(uw.median[-1])}). Lower the learning rate.",
                    loss_from=start,
                    loss_to=end,
                )
            ]
    return []


def rule_lr_too_small(r: Recorded, t: Thresholds) -> list[Finding]:
    """Steps far too short: α's window median, fits with α exactly −1 left out, at or below
    ``alpha_low`` for ``persist`` windows, and the loss barely moving (``loss_flat``).
    α = −1 exactly is what a concave fit (or a zero step) reports, as in Cockpit: those
    steps say nothing about the length and are not counted; a run where they are most of
    α's values is reported as skipped."""
    steps, alpha = r.scalar("alpha")
    concave = float(np.mean(alpha[np.isfinite(alpha)] == -1.0)) if np.isfinite(alpha).any() else 0
    try:
        aw = windows(steps, alpha, t, what="alpha", keep_exact=-1.0)
    except Skip as why:
        if concave > 0.5:
            raise Skip(
                f"α is exactly -1 at {concave:.0%} of its steps: concave fits or zero "
                "steps, which tell nothing of the step's length"
            ) from why
        raise
    lw = windows(*r.scalar("loss"), t, what="loss")
    span = persistent(aw.median <= t.alpha_low, t.persist)
    change = _relative_change(lw.median[0], lw.median[-1])
    if span is None or change >= t.loss_flat:
        return []
    return [
        _finding(
            "lr_too_small",
            "warning",
            aw,
            span,
            f"the steps are far too short: α's median is {_g(np.median(aw.median))} (−1 is "
            f"no progress; concave fits, α exactly −1, left out) and the loss moved by "
            f"{change:.1%} ({_g(lw.median[0])} to {_g(lw.median[-1])}). Raise the learning "
            "rate (by 10x to start with).",
            alpha_median=float(np.median(aw.median)),
            loss_change=change,
        )
    ]


def rule_noise_dominated(r: Recorded, t: Thresholds) -> list[Finding]:
    """The batch gradient is no better than noise. The norm test estimates
    Var[∇ℓᵢ]/(B‖g‖²), whose expected value is 1 when the true gradient is zero, so its
    median over the second half of the run at or above ``norm_test_close`` with the loss
    barely moving there (``loss_flat``) means the steps follow noise; or the critical batch
    size B_simple (``noise_scale``) over its last window ``critical_factor`` times the batch
    size or more. The batch size the statistics suggest: the norm test scales as 1/B, so
    B·median/``norm_test_target`` brings it to the target; or B_simple."""
    b = batch_size(r.metadata)
    findings = []
    if r.has("norm_test"):
        nw = windows(*r.scalar("norm_test"), t, what="norm_test")
        lw = windows(*r.scalar("loss"), t, what="loss")
        half = len(nw.median) // 2
        level = float(np.median(nw.median[half:]))
        lhalf = lw.median[len(lw.median) // 2 :]
        change = _relative_change(lhalf[0], lhalf[-1])
        if level >= t.norm_test_close and change < t.loss_flat:
            wanted = math.ceil(b * level / t.norm_test_target) if b else None
            suggest = f" (about {wanted} samples)" if b else ""
            findings.append(
                _finding(
                    "noise_dominated",
                    "warning",
                    nw,
                    (half, len(nw.median) - 1),
                    f"the batch gradient is no better than noise: the norm test's median is "
                    f"{_g(level)} (about 1 when the true gradient is zero) and the loss moved "
                    f"by {change:.1%}. Check the labels and inputs line up; if they do, a "
                    f"larger batch{suggest} or a smaller learning rate.",
                    norm_test_median=level,
                    loss_change=change,
                    **({"suggested_batch_size": wanted} if b else {}),
                )
            )
    elif not r.has("noise_scale"):
        raise Skip("needs norm_test or noise_scale, which were not tracked")
    if not findings and r.has("noise_scale"):
        if b is None:
            if not r.has("norm_test"):
                raise Skip("needs the batch size for noise_scale, which the run does not record")
            return findings
        sw = windows(*r.scalar("noise_scale"), t, what="noise_scale")
        if sw.median[-1] >= t.critical_factor * b:
            findings.append(
                _finding(
                    "noise_dominated",
                    "warning",
                    sw,
                    (len(sw.median) - 1, len(sw.median) - 1),
                    f"the batch is far below the critical batch size: B_simple's median is "
                    f"{_g(sw.median[-1])} against a batch of {b}. Each step is mostly noise: "
                    f"a larger batch (up to about {math.ceil(sw.median[-1])}) or a smaller "
                    "learning rate.",
                    b_simple=sw.median[-1],
                    batch_size=b,
                    suggested_batch_size=math.ceil(sw.median[-1]),
                )
            )
    return findings


def _central_and_edge(r: Recorded, t: Thresholds) -> tuple[Windows, Windows] | None:
    """Window medians of the fractions of per-sample gradient elements in the histogram's
    two central bins and in its two edge bins; None without ``grad_hist_1d``, or with fewer
    than 4 bins (where centre and edges overlap)."""
    if not r.has("grad_hist_1d"):
        return None
    steps, counts = r.array("grad_hist_1d")
    if counts.shape[1] < 4:
        return None
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = counts / np.where(total > 0, total, np.nan)[:, None]
    mid = counts.shape[1] // 2
    central = frac[:, mid - 1 : mid + 1].sum(axis=1) if counts.shape[1] % 2 == 0 else frac[:, mid]
    edge = frac[:, 0] + frac[:, -1]
    return windows(steps, central, t, what="grad_hist_1d"), windows(
        steps, edge, t, what="grad_hist_1d"
    )


def rule_vanishing_gradients(r: Recorded, t: Thresholds) -> list[Finding]:
    """Gradients orders of magnitude too small: with per-layer gradient norms, layers whose
    window median stays below ``layer_ratio`` times the largest layer's for ``persist``
    windows (they have stopped learning: saturated activations, dead units); or the
    per-sample gradient histogram collapsed, ``central_mass`` of its elements in the two
    central bins for ``persist`` windows."""
    layers = r.layers("grad_norm")
    hist = _central_and_edge(r, t)
    if not layers and hist is None:
        raise Skip("needs grad_norm per layer (per_layer=True) or grad_hist_1d, not tracked")
    if layers:
        by_layer = {
            name: windows(*series, t, what=f"grad_norm[{name!r}]")
            for name, series in layers.items()
        }
        top = np.max([w.median for w in by_layer.values()], axis=0)
        small = {
            name: span
            for name, w in by_layer.items()
            if (span := persistent(w.median < t.layer_ratio * top, t.persist)) is not None
        }
        if small:
            w = next(iter(by_layer.values()))
            first = min(s[0] for s in small.values())
            last = max(s[1] for s in small.values())
            ratios = {n: float(by_layer[n].median[-1] / top[-1]) for n in small}
            worst = min(ratios, key=ratios.get)
            return [
                _finding(
                    "vanishing_gradients",
                    "warning",
                    w,
                    (first, last),
                    f"the gradient vanishes in {len(small)} of {len(layers)} layers (e.g. "
                    f"{worst}: {_g(ratios[worst])} of the largest layer's norm; "
                    f"{', '.join(sorted(small))}). Use non-saturating activations (ReLU, GELU), "
                    "a better initialisation (He/LeCun), normalisation or residual "
                    "connections.",
                    layers=sorted(small),
                    smallest_ratio=ratios[worst],
                )
            ]
    if hist is not None:
        central, _ = hist
        span = persistent(central.median >= t.central_mass, t.persist)
        if span is not None:
            share = float(np.median(central.median[span[0] : span[1] + 1]))
            return [
                _finding(
                    "vanishing_gradients",
                    "warning",
                    central,
                    span,
                    f"the per-sample gradient histogram has collapsed: {share:.1%} of the "
                    "gradient elements lie in its two central bins. Check for saturated or "
                    "dead units (activations, initialisation); if the gradients are merely "
                    "small, narrow GradHist1d's maxval.",
                    central_mass=share,
                )
            ]
    return []


def rule_exploding_gradients(r: Recorded, t: Thresholds) -> list[Finding]:
    """Gradients orders of magnitude too large: the gradient norm's first window median
    above ``grad_scale`` (a badly scaled initialisation), a window median ``spike`` times
    the one before it, or ``edge_mass`` of the per-sample gradient histogram in its edge
    bins for ``persist`` windows."""
    gw = windows(*r.scalar("grad_norm"), t, what="grad_norm")
    if gw.median[0] > t.grad_scale:
        return [
            _finding(
                "exploding_gradients",
                "warning",
                gw,
                (0, int(np.flatnonzero(gw.median > t.grad_scale)[-1])),
                f"the gradient norm starts orders of magnitude too large: median "
                f"{_g(gw.median[0])} in the first steps (above {_g(t.grad_scale)}). Check the "
                "initialisation's scale (He/LeCun variance) and the inputs' scale; clip the "
                "gradient (optax.clip_by_global_norm) meanwhile.",
                grad_norm_first=gw.median[0],
            )
        ]
    jumps = gw.median[1:] / np.maximum(gw.median[:-1], np.finfo(float).tiny)
    if jumps.size and jumps.max() >= t.spike:
        i = int(np.argmax(jumps)) + 1
        return [
            _finding(
                "exploding_gradients",
                "warning",
                gw,
                (i, i),
                f"the gradient norm spiked {_g(jumps.max())}x above its recent level (median "
                f"{_g(gw.median[i - 1])} to {_g(gw.median[i])}). Clip the gradient "
                "(optax.clip_by_global_norm) or lower the learning rate.",
                jump=float(jumps.max()),
            )
        ]
    hist = _central_and_edge(r, t)
    if hist is not None:
        _, edge = hist
        span = persistent(edge.median >= t.edge_mass, t.persist)
        if span is not None:
            share = float(np.median(edge.median[span[0] : span[1] + 1]))
            return [
                _finding(
                    "exploding_gradients",
                    "warning",
                    edge,
                    span,
                    f"{share:.0%} of the per-sample gradient elements pile into the "
                    "histogram's edge bins: the gradients outgrow its range. If they are "
                    "meant to be this large, widen GradHist1d's maxval; else clip or lower "
                    "the learning rate.",
                    edge_mass=share,
                )
            ]
    return []


def _learning_rates(r: Recorded, opt: Optimizer, steps: np.ndarray) -> np.ndarray:
    """The learning rate at ``steps``: ``hyper/learning_rate`` where recorded (the nearest
    recorded step at or before), else the optimizer's constant; Skip without either."""
    if "hyper/learning_rate" in r.fields:
        lsteps, rates = r.fields["hyper/learning_rate"]
        at = np.clip(np.searchsorted(lsteps, steps, side="right") - 1, 0, len(lsteps) - 1)
        return rates[at]
    if opt.learning_rate is not None:
        return np.full(len(steps), opt.learning_rate)
    raise Skip("needs the learning rate: record it with optax.inject_hyperparams")


def rule_edge_of_stability(r: Recorded, t: Thresholds) -> list[Finding]:
    """The sharpness at the optimizer's stability limit: gradient descent with rate η is
    stable along the top Hessian direction only while η·λ_max < 2 (2 + 2β with heavy-ball
    momentum β; (2 + 2β)/(1 + 2β) with Nesterov's). η·λ_max's window median at or above
    ``eos_near`` of the limit for ``persist`` windows: info (training at the edge of
    stability, Cohen et al. 2021, which full-batch GD reaches by progressive sharpening);
    above ``eos_beyond`` of it: warning (the top direction oscillates and grows). Only for
    (momentum) SGD: an adaptive optimizer's limit is in its preconditioned sharpness, which
    is not recorded, so the rule is skipped for it."""
    opt = optimizer_facts(r.metadata.get("optimizer"))
    if opt.kind != "sgd":
        raise Skip(
            f"the optimizer is {opt.kind}: its stability limit needs the preconditioned "
            "sharpness, which is not recorded (known for plain and momentum SGD only)"
        )
    steps, lam = r.scalar("hess_max_ev")
    sharp = _learning_rates(r, opt, steps) * lam
    sw = windows(steps, sharp, t, what="hess_max_ev")
    limit = opt.stability_limit()
    for severity, factor, what in (
        ("warning", t.eos_beyond, "beyond"),
        ("info", t.eos_near, "at"),
    ):
        span = persistent(sw.median >= factor * limit, t.persist)
        if span is not None:
            peak = float(np.max(sw.median[span[0] : span[1] + 1]))
            advice = (
                f"The top direction is unstable: lower the learning rate below {_g(limit)}/λ_max."
                if severity == "warning"
                else "Training self-stabilises there (edge of stability); a loss that "
                "oscillates but falls is expected, a larger rate would overshoot."
            )
            return [
                _finding(
                    "edge_of_stability",
                    severity,
                    sw,
                    span,
                    f"η·λ_max is {what} the stability limit {_g(limit)} of this optimizer "
                    f"(median up to {_g(peak)}). {advice}",
                    sharpness_times_lr=peak,
                    limit=limit,
                )
            ]
    return []


def rule_stalled(r: Recorded, t: Thresholds) -> list[Finding]:
    """Parameters not moving: update sizes, and changes of the distance from θ₀, at or
    below ``stall_size`` over ``persist`` windows: an error (a zero learning rate, frozen
    parameters, an optimizer that was never applied)."""
    series = [k for k in ("update_size", "distance") if r.has(k)]
    if not series:
        raise Skip("needs update_size or distance, which were not tracked")
    ws = []
    for kind in series:
        steps, values = r.scalar(kind)
        if kind == "distance":
            steps, values = steps[1:], np.abs(np.diff(values))
        ws.append(windows(steps, values, t, what=kind))
    n = min(len(w.median) for w in ws)  # the last n windows of each: both end at the end
    flags = np.all([w.median[-n:] <= t.stall_size for w in ws], axis=0)
    w = Windows(ws[0].first[-n:], ws[0].last[-n:], ws[0].median[-n:])
    span = persistent(flags, t.persist)
    if span is None:
        return []
    return [
        _finding(
            "stalled",
            "error",
            w,
            (span[0], span[1]),
            f"the parameters are not moving: {' and '.join(series)} at or below "
            f"{_g(t.stall_size)}. Check the learning rate (is it 0?), that the optimizer's "
            "updates are applied, and which parameters are frozen.",
            stall_size=t.stall_size,
        )
    ]


RULES: dict[str, Callable[[Recorded, Thresholds], list[Finding]]] = {
    "nonfinite": rule_nonfinite,
    "lr_too_large": rule_lr_too_large,
    "lr_too_small": rule_lr_too_small,
    "noise_dominated": rule_noise_dominated,
    "vanishing_gradients": rule_vanishing_gradients,
    "exploding_gradients": rule_exploding_gradients,
    "edge_of_stability": rule_edge_of_stability,
    "stalled": rule_stalled,
}
"""Every code and its rule, in the order findings are listed."""

EVIDENCE: dict[str, tuple[str, ...]] = {
    "nonfinite": ("loss", "grad_norm"),
    "lr_too_large": ("alpha", "loss"),
    "lr_too_small": ("alpha", "loss"),
    "noise_dominated": ("norm_test", "noise_scale"),
    "vanishing_gradients": ("grad_norm", "grad_hist_1d"),
    "exploding_gradients": ("grad_norm", "grad_hist_1d"),
    "edge_of_stability": ("hess_max_ev",),
    "stalled": ("update_size", "distance"),
}
"""The instrument kinds each code is read from, the one whose page explains it first (the
dashboard marks a finding on the panels of these)."""

INSTRUMENT_PAGE = {code: kinds[0] for code, kinds in EVIDENCE.items()}
"""The instrument page (``docs/instruments/<name>.md``) that explains each code's evidence."""


# ---------------------------------------------------------------------------------------
# The entry point.


def as_recorded(source: Any) -> Recorded:
    """``source`` as recorded series: a :class:`Recorded`, an ``lm.train`` history, a
    :class:`~lmd4ml.telemetry.store.Run`, or a run directory (a path); a clear error for
    anything else, an empty history, or a path that is no run."""
    from lmd4ml.learner import History
    from lmd4ml.telemetry.store import Run, load_run

    if isinstance(source, Recorded):
        return source
    if isinstance(source, History):
        if len(source.get("step", ())) == 0:
            raise ValueError("lm.diagnose: the history is empty (no tracked steps)")
        return Recorded.from_history(source, source.metadata)
    if isinstance(source, str | os.PathLike):
        source = load_run(source)  # RunStoreError says what is wrong with the path
    if isinstance(source, Run):
        return Recorded.from_run(source)
    raise TypeError(
        "lm.diagnose: source must be lm.train's history, a run from lm.load_run or a run "
        f"directory; got {type(source).__name__}"
    )


def settings(
    silence: Sequence[str], thresholds: Thresholds | None, overrides: Mapping[str, Any]
) -> tuple[tuple[str, ...], Thresholds]:
    """``silence`` and the thresholds (``thresholds`` with ``overrides``), checked.

    Example:
      >>> settings(["stalled"], None, {"window": 5})[1].window
      5
      >>> settings(["stall"], None, {})
      Traceback (most recent call last):
      ...
      ValueError: silence: unknown codes ['stall']; the codes are ['nonfinite', ...]
    """
    if isinstance(silence, str) or not isinstance(silence, Sequence | set | frozenset):
        raise TypeError(f"silence must be a list of codes, got {silence!r}")
    unknown = sorted(set(silence) - set(RULES), key=str)
    if unknown:
        raise ValueError(f"silence: unknown codes {unknown}; the codes are {list(RULES)}")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
    names = {f.name for f in dataclasses.fields(Thresholds)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"unknown thresholds {bad}; they are {sorted(names)}")
    return tuple(silence), dataclasses.replace(thresholds or Thresholds(), **overrides)


def diagnose(
    source: Any,
    *,
    silence: Sequence[str] = (),
    thresholds: Thresholds | None = None,
    **overrides: Any,
) -> Diagnosis:
    """What the recorded instruments of ``source`` say is wrong, as :class:`Finding` s.

    Args:
      source: ``lm.train``'s history, a run from ``lm.load_run``, or a run directory.
      silence: codes not to report (their rules are not run).
      thresholds: a :class:`Thresholds` (default: its defaults).
      **overrides: single thresholds by name, e.g. ``window=20``.

    Returns:
      A :class:`Diagnosis`: the findings in :data:`RULES` order, and ``skipped``, each rule
      not applied with why. A rule that fails on values it cannot read (a damaged run's
      metadata or shapes) is reported as skipped with the error, never as a finding, so
      that the other rules still speak.
    """
    silence, t = settings(silence, thresholds, overrides)
    recorded = as_recorded(source)
    findings, skipped = [], {}
    for code, rule in RULES.items():
        if code in silence:
            skipped[code] = "silenced"
            continue
        try:
            findings += rule(recorded, t)
        except Skip as why:
            skipped[code] = str(why)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
            skipped[code] = f"failed on this run's values: {type(error).__name__}: {error}"
    return Diagnosis(findings, skipped)


def format_finding(f: Finding) -> str:
    """One line for a person: severity, code, steps, message.

    Example:
      >>> print(format_finding(Finding("stalled", "error", 0, 59, "not moving.")))
      error    stalled  steps 0-59: not moving.
    """
    steps = (
        f"step {f.first_step}"
        if f.first_step == f.last_step
        else (f"steps {f.first_step}-{f.last_step}")
    )
    return f"{f.severity:<8} {f.code}  {steps}: {f.message}"


SAID_BY_THE_LOOP = ("nonfinite",)
"""Codes the training loops warn about themselves, which a live diagnosis keeps unsaid."""


class LiveDiagnosis:
    """A sink (:class:`lmd4ml.telemetry.writer.Sink`) that diagnoses a run as it records,
    on the telemetry writer thread: it keeps the fields the rules read, runs
    :func:`diagnose` when the steps have grown by a tenth (at least ``window`` steps) since
    the last time and at the end, and warns once about each new finding (code and
    severity: a warning that becomes an error is said again). ``nonfinite`` is kept but not
    said: the loop itself warns of the first NaN or Inf as soon as it fetches it
    (:func:`lmd4ml.telemetry.runs.warn_if_nonfinite`). ``findings`` holds the last diagnosis;
    the run's store keeps it at the end (``run.metadata["findings"]``).

    Example:
      >>> import warnings
      >>> live = LiveDiagnosis(window=2, min_windows=1, persist=1)
      >>> live.start({}, {"update_size": ((), "float64")})
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     for step in range(6):  # checked at steps 2, 4 and 6, and at the end
      ...         live.write(step, 0.0, {"update_size": np.float64(0.0)})
      ...     live.close("finished")
      >>> [f.code for f in live.findings], len(caught)
      (['stalled'], 1)
    """

    def __init__(
        self,
        *,
        silence: Sequence[str] = (),
        thresholds: Thresholds | None = None,
        **overrides: Any,
    ):
        self.silence, self.thresholds = settings(silence, thresholds, overrides)
        self.findings: list[Finding] = []
        self._said: set[tuple[str, str]] = set()
        self._metadata: dict[str, Any] = {}
        self._kept: dict[str, Thinned] = {}
        self._steps = 0
        self._next = self.thresholds.window

    def start(self, metadata: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
        self._metadata = dict(metadata)
        self._kept = {
            name: Thinned(tuple(shape))
            for name, (shape, _) in fields.items()
            if read_by_rules(name, metadata)
        }

    def write(self, step: int, wall_time: float, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name in self._kept:
                self._kept[name].append(step, value)
        self._steps += 1
        if self._steps >= self._next:
            self._next = max(self._steps + self.thresholds.window, int(self._steps * 1.1))
            self.check()

    def check(self) -> None:
        """Diagnose what has been recorded so far; warn about what is new."""
        fields = {name: (k.steps(), k.values()) for name, k in self._kept.items() if k.steps().size}
        recorded = Recorded(fields, self._metadata)
        self.findings = list(diagnose(recorded, silence=self.silence, thresholds=self.thresholds))
        for f in self.findings:
            if f.code not in SAID_BY_THE_LOOP and (f.code, f.severity) not in self._said:
                self._said.add((f.code, f.severity))
                warnings.warn(f"lmd4ml diagnosis: {format_finding(f)}", RuntimeWarning, 2)

    def close(self, status: str) -> None:
        self.check()

    def notes(self) -> dict[str, Any]:
        """What the run's store keeps of it: the findings, as JSON."""
        return {"findings": [f.as_dict() for f in self.findings]}
