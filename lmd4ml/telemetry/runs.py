"""Writing runs: what ``lm.train`` and ``lm.Recorder`` share.

Both loops record a run the same way, through :class:`Recording`: it serves the dashboard
when asked (:func:`serve_dashboard`), opens the run at its first record with its metadata
(:func:`base_metadata`) and layout, hands each step's values to the background writer of
:mod:`lmd4ml.telemetry.writer` (ring, store and sinks), and closes the run once. Around it
the loops share :class:`StopSignals` (Ctrl-C and SIGTERM between steps),
:func:`warn_if_nonfinite`, :func:`user_values` (numbers of the user's own, such as a
validation accuracy) and :func:`hyperparameters` (the learning rate from
``optax.inject_hyperparams`` state).

A run's layout (its fields) is fixed when it opens: the ring's record size, the store's
tables and the sinks' ``start`` all take it then. So the keys of user values are declared by
then: ``lm.train`` calls ``eval_fn`` at the first step of every call, and ``lm.Recorder``
takes the keys of the ``extra`` values logged before its run opens, and any named in its
``extra_keys``. Values for a key that was not declared are a clear error, never silently
lost.

Keys: an instrument reports under its key, a hyperparameter under ``hyper/<name>``, a user
value under the user's own name (:data:`USER_NAME`); the run's metadata describes each in
``quantities_by_key``, user values and hyperparameters as ``{"class": None, "kind":
"user"}`` and ``{"class": None, "kind": "hyperparameter"}``. Every value at step t
describes the parameters θₜ that step t's update starts from.
"""

from __future__ import annotations

import importlib.metadata
import numbers
import os
import platform
import re
import signal
import threading
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmd4ml.describing import json_safe
from lmd4ml.diagnosis import LiveDiagnosis, optimizer_facts
from lmd4ml.quantities.base import Quantity, describe_keys
from lmd4ml.telemetry.ring import RESERVED_FIELDS
from lmd4ml.telemetry.store import default_run_name, new_run_dir
from lmd4ml.telemetry.writer import Sink, Telemetry, check_sinks, writes_telemetry

HYPER = "hyper/"
"""The prefix of the keys under which hyperparameters are recorded: ``hyper/learning_rate``."""

USER_NAME = re.compile(r"[A-Za-z_][\w.\-]*(/[\w.\-]+)*")
"""What a user value's name looks like: an identifier, with ``.``, ``-`` and ``/``-separated
groups (``val_acc``, ``val/acc``), as TensorBoard, W&B and MLflow group their tags."""

USER_KIND = {"class": None, "kind": "user"}
HYPER_KIND = {"class": None, "kind": "hyperparameter"}

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def base_metadata(
    quantities: Sequence[Quantity],
    keys: Sequence[str],
    config: Mapping[str, Any],
    *,
    hyper: Sequence[str] = (),
    user: Sequence[str] = (),
    total_steps: int | None = None,
    batch_size: int | None = None,
    optimizer: Any = None,
) -> dict[str, Any]:
    """What every run records about itself: quantities, keys, config, versions and process,
    and what ``lm.diagnose`` reads beside the instruments: the batch size and the optimizer.

    ``quantities_by_key`` says for each key what it is (its class, the kind that readers
    such as the dashboard treat it as, and its settings:
    :func:`lmd4ml.quantities.base.describe_keys`, siblings too), so that a quantity given a
    ``name=`` of its own is still read as what it is; ``hyper`` and ``user`` keys are
    described as hyperparameters and user values. ``config`` is kept readably
    (:func:`lmd4ml.describing.json_safe`). ``total_steps``: the step the run is expected to
    end before (its last step + 1), or None. ``batch_size``: samples per step, or None.
    ``optimizer``: the optax transformation (or its description), kept readably with its
    ``optimizer_kind`` ("sgd", "adaptive" or "unknown": :func:`lmd4ml.diagnosis.optimizer_facts`);
    None records neither.

    Example:
      >>> import lmd4ml as lm
      >>> meta = base_metadata([lm.Loss()], ["loss"], {"lr": 0.1}, user=["val_acc"])
      >>> meta["keys"], meta["config"]["lr"], "jax" in meta["versions"]
      (['loss', 'val_acc'], 0.1, True)
      >>> meta["quantities_by_key"]["val_acc"]
      {'class': None, 'kind': 'user'}
      >>> narrow = lm.GradHist1d(nbins=20, maxval=0.1, name="narrow")
      >>> base_metadata([narrow], ["narrow"], {})["quantities_by_key"]["narrow"]
      {'class': 'GradHist1d', 'kind': 'grad_hist_1d', 'args': {'nbins': 20, 'maxval': 0.1}}
    """
    described = {k: d for q in quantities for k, d in describe_keys(q).items()}
    described.update({key: dict(HYPER_KIND) for key in hyper})
    described.update({key: dict(USER_KIND) for key in user})
    about_optimizer = {}
    if optimizer is not None:
        description = json_safe(optimizer)
        about_optimizer = {
            "optimizer": description,
            "optimizer_kind": optimizer_facts(description).kind,
        }
    return {
        "quantities": [repr(q) for q in quantities],
        "quantities_by_key": described,
        "axes": {q.key: q.axes() for q in quantities if q.axes()},
        "keys": [*keys, *hyper, *user],
        "config": json_safe(dict(config)),
        "total_steps": total_steps,
        "batch_size": batch_size,
        **about_optimizer,
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("lmd4ml", "jax", "jaxlib", "flax", "optax", "numpy")
        },
        "python": platform.python_version(),
        "pid": os.getpid(),
    }


def check_config(config: Any, own: Collection[str] = ()) -> dict[str, Any]:
    """``config`` (a mapping from name to value, or None) as a dict; a clear error for
    anything else, or for a name in ``own`` (what the loop records itself).

    Example:
      >>> check_config({"epochs": 3}, own=["epochs"])
      Traceback (most recent call last):
      ...
      ValueError: config names ['epochs'], which lm.train records itself; choose other names
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a mapping from name to value, e.g. {{'batch_size': 32}}; got "
            f"{type(config).__name__}"
        )
    bad = [k for k in config if not isinstance(k, str)]
    if bad:
        raise TypeError(f"config's names must be strings, got {bad!r}")
    clash = sorted(set(config) & set(own))
    if clash:
        raise ValueError(f"config names {clash}, which lm.train records itself; choose other names")
    return dict(config)


def check_user_name(name: Any, taken: Collection[str], what: str) -> str:
    """``name`` if it can name a user value: a string like :data:`USER_NAME` that is not
    an instrument's key (``taken``), a field the run's records keep for themselves, nor a
    hyperparameter's key.

    Example:
      >>> check_user_name("loss", taken=["loss"], what="eval_fn's result")
      Traceback (most recent call last):
      ...
      ValueError: eval_fn's result: 'loss' is the key of an instrument or of the run's own ...
    """
    if not isinstance(name, str):
        raise TypeError(f"{what}: names must be strings, got {type(name).__name__} {name!r}")
    reserved = {*taken, *RESERVED_FIELDS}
    if name in reserved:
        raise ValueError(
            f"{what}: {name!r} is the key of an instrument or of the run's own records "
            f"({sorted(reserved)}); name the value otherwise"
        )
    if name.startswith(HYPER):
        raise ValueError(
            f"{what}: {name!r} starts with {HYPER!r}, which names the optimizer's "
            "hyperparameters (recorded from optax.inject_hyperparams); name the value otherwise"
        )
    if not USER_NAME.fullmatch(name):
        raise ValueError(
            f"{what}: {name!r} is not a valid name: letters, digits, '_', '.' and '-', in "
            "groups separated by '/' (e.g. 'val_acc', 'val/acc'), starting with a letter or '_'"
        )
    return name


def _check_scalar(value: Any, where: str) -> None:
    """Raise unless ``value`` is one real number: a Python, numpy or JAX scalar (a 0-d
    array of an integer or float dtype), not a bool. A JAX scalar is not fetched."""
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        real = jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)
        if value.shape == () and real:  # bfloat16 too
            return
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    shape = f" of shape {value.shape}" if hasattr(value, "shape") else ""
    dtype = f" and dtype {value.dtype}" if hasattr(value, "dtype") else ""
    raise TypeError(
        f"{where} must be one real number (a Python, numpy or JAX scalar, not a bool), got "
        f"{type(value).__name__}{shape}{dtype}"
    )


def check_user_values(values: Any, taken: Collection[str], what: str) -> dict[str, Any]:
    """Numbers of the user's own (``{"val_acc": 0.93}``), checked and left as they are (a
    JAX scalar is not fetched): names as :func:`check_user_name` wants them, each value one
    real number. NaN and ±inf are fine (they are warned about where they are recorded).

    Example:
      >>> check_user_values({"val_acc": [0.5]}, taken=[], what="extra")
      Traceback (most recent call last):
      ...
      TypeError: extra['val_acc'] must be one real number (a Python, ..., not a bool), got list
    """
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what} must be a mapping from name to number, e.g. {{'val_acc': 0.93}}; got "
            f"{type(values).__name__}"
        )
    for name, value in values.items():
        check_user_name(name, taken, what)
        _check_scalar(value, f"{what}[{name!r}]")
    return dict(values)


def user_values(values: Any, taken: Collection[str], what: str) -> dict[str, np.float64]:
    """:func:`check_user_values`, as the float64 numbers a run records.

    Example:
      >>> user_values({"val_acc": np.float32(0.5), "epoch": 3}, taken=["loss"], what="extra")
      {'val_acc': np.float64(0.5), 'epoch': np.float64(3.0)}
    """
    return {k: np.float64(v) for k, v in check_user_values(values, taken, what).items()}


def hyperparameters(opt_state: Any) -> dict[str, Any]:
    """The hyperparameters in every ``optax.inject_hyperparams`` state within ``opt_state``,
    keyed ``hyper/<name>``: the values the last update used (after update t, a schedule's
    value at t; before any, at 0). A name that a state before had already taken gets the
    state's index: ``hyper/<name>/<i>``. Values are what the state holds (device arrays).

    Example:
      >>> import optax
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lambda t: 0.5 / (1 + t))
      >>> {k: float(v) for k, v in hyperparameters(tx.init(np.zeros(2))).items()}
      {'hyper/learning_rate': 0.5}
    """
    is_injected = lambda x: isinstance(x, _INJECTED)  # noqa: E731
    states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(x)]
    found: dict[str, Any] = {}
    for i, state in enumerate(states):
        for name, value in state.hyperparams.items():
            key = HYPER + name
            found[f"{key}/{i}" if key in found else key] = value
    return found


def warn_if_nonfinite(
    step: int, values: Mapping[str, Any], stacklevel: int, quantities: Sequence[Quantity] = ()
) -> bool:
    """Warn if a run's recorded ``values`` hold NaN or Inf; whether they did. The NaN that a
    quantity reports by design (:attr:`Quantity.nan_is_missing`) is no cause.

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warn_if_nonfinite(3, {"loss": np.nan, "grad_norm": 1.0}, stacklevel=1)
      True
      >>> print(str(caught[0].message).split(";")[0])
      non-finite values (NaN or Inf) first at step 3 in ['loss']
      >>> import lmd4ml as lm  # next_batch α is NaN at step 0: nothing has ended yet
      >>> warn_if_nonfinite(0, {"alpha": np.nan}, 1, [lm.Alpha(end="next_batch")])
      False
    """
    missing = {k for q in quantities if q.nan_is_missing for k in q.metric_keys}
    bad = [
        key
        for key, value in values.items()
        if key not in missing
        and not all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree.leaves(value))
    ]
    if bad:
        warnings.warn(
            f"non-finite values (NaN or Inf) first at step {step} in {bad}; they are recorded "
            "as they are and tracking goes on",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    return bool(bad)


class Terminated(SystemExit):
    """SIGTERM (a scheduler's stop, ``kill``) arrived while a run recorded: it stops between
    steps, is closed as "interrupted", and, uncaught, the process exits with status 143
    (128 + SIGTERM), as the signal would have ended it."""


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM, while a loop records a run, acted on between its steps.

    Raised by Python's own handler, ``KeyboardInterrupt`` lands wherever the main thread is:
    halfway through recording a step, or in JAX's garbage-collection callback, which
    swallows it (jax-ml/jax#18246). Here the handlers only note the signal, and
    :meth:`check`, called between steps, raises ``KeyboardInterrupt`` or :class:`Terminated`.
    The first signal puts the previous handlers back, so that a second one acts at once
    (on a step or a data loader that does not end). Only in the main thread, and only for
    signals whose handler is Python's default; a handler of the user's own is left alone.
    Not under ``jax.distributed``: a process that stopped a step after another would wait for
    it in that step's collectives forever.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
            for signum, default in defaults.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def check(self) -> None:
        """Raise for the signal received since the last call, if any."""
        signum, self.received = self.received, None
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGTERM:
            raise Terminated(128 + signum)

    def __exit__(self, *exc: object) -> None:
        self._restore()


def serve_dashboard(runs_dir: str | os.PathLike | None, dashboard: bool | int) -> str | None:
    """Serve the dashboard of ``runs_dir`` from a process of its own (``True``: port 8050, or
    this port; a busy one is replaced by a free one), print its URL and return it; ``None``
    for ``dashboard=False``, and under ``jax.distributed`` on every process but 0, which
    serves it."""
    if dashboard is False:
        return None
    if runs_dir is None:
        raise ValueError("dashboard=True shows the runs in runs_dir, which is None")
    if not writes_telemetry():
        return None
    from lmd4ml.dashboard.launch import open_dashboard

    port = 8050 if dashboard is True else int(dashboard)
    url, server = open_dashboard(runs_dir, port)
    print(f"lmd4ml dashboard: {url} (server pid {server.pid})", flush=True)
    return url


def live_diagnosis(diagnose: Any) -> LiveDiagnosis | None:
    """The live diagnosis ``diagnose`` asks for: ``True`` the defaults, a mapping the keyword
    arguments of :class:`~lmd4ml.diagnosis.LiveDiagnosis`, ``False`` none.

    Example:
      >>> live_diagnosis({"silence": ["stalled"], "window": 20}).thresholds.window
      20
      >>> live_diagnosis("yes")
      Traceback (most recent call last):
      ...
      TypeError: diagnose must be True, False or a mapping of lm.diagnose's keyword ...
    """
    if diagnose is True:
        return LiveDiagnosis()
    if diagnose is False:
        return None
    if not isinstance(diagnose, Mapping):
        raise TypeError(
            "diagnose must be True, False or a mapping of lm.diagnose's keyword arguments "
            f"(silence=, thresholds by name), got {type(diagnose).__name__}"
        )
    return LiveDiagnosis(**diagnose)


class Recording:
    """One run as a training loop records it: opened once, fed step by step, closed once.

    ``runs_dir`` (``None``: no store, no ring) and ``sinks`` say where the run goes; with
    neither, or on a process of ``jax.distributed`` other than 0, nothing is written and
    :attr:`wanted` is False. ``dashboard`` is served at once (:func:`serve_dashboard`; its
    URL in :attr:`dashboard_url`).

    A step's values may come in pieces (a user value before the step's instruments, which
    are fetched later): :meth:`record` merges the pieces of one step and hands the step to
    the writer when it is ``complete``, or when a later step comes, or at :meth:`close`.
    Steps go to the writer in increasing order.

    ``diagnose`` (True, or the keyword arguments of
    :class:`~lmd4ml.diagnosis.LiveDiagnosis`: ``silence``, thresholds) diagnoses the run as it
    is written, on the writer thread: each new finding is warned about once, and the store
    keeps the findings (``run.metadata["findings"]``); ``False`` turns it off. A run that is
    not written (no ``runs_dir``, no sinks) is not diagnosed live: ``lm.diagnose(history)``.

    Example:
      >>> import tempfile
      >>> recording = Recording(tempfile.mkdtemp(), "demo")
      >>> recording.open({}, {"loss": np.zeros(()), "val_acc": np.zeros(())})
      >>> recording.record(0, {"val_acc": 0.5}, complete=False)  # before step 0's update
      >>> recording.record(0, {"loss": 1.0}, complete=True)
      >>> recording.close("finished")
      >>> from lmd4ml.telemetry.store import load_run
      >>> run = load_run(recording.run_dir)
      >>> run.steps().tolist(), run["val_acc"][1].tolist(), run["loss"][1].tolist()
      ([0], [0.5], [1.0])
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike | None,
        run_name: str | None = None,
        *,
        sinks: Sequence[Sink] = (),
        dashboard: bool | int = False,
        diagnose: bool | Mapping[str, Any] = True,
    ):
        sinks = check_sinks(sinks)
        self.live = live_diagnosis(diagnose)
        self.dashboard_url = serve_dashboard(runs_dir, dashboard)
        writes = writes_telemetry()
        self.runs_dir = runs_dir if writes else None
        self.sinks = sinks if writes else ()
        self.run_name = run_name
        self.telemetry: Telemetry | None = None
        self._held: tuple[int, dict[str, Any]] | None = None

    @property
    def wanted(self) -> bool:
        """Whether this process writes the run: it has a runs directory or a sink."""
        return self.runs_dir is not None or bool(self.sinks)

    @property
    def run_dir(self) -> Path | None:
        """The run's directory, once it is open (None without a ``runs_dir``)."""
        return None if self.telemetry is None else self.telemetry.run_dir

    def open(self, metadata: Mapping[str, Any], shapes: Mapping[str, Any]) -> None:
        """Open the run: its directory, with ``metadata``, and the layout of ``shapes`` (key
        to value, or its ``jax.eval_shape``), which fixes the keys it can record."""
        run_dir = None if self.runs_dir is None else new_run_dir(self.runs_dir, self.run_name)
        name = run_dir.name if run_dir is not None else self.run_name or default_run_name()
        live = () if self.live is None else (self.live,)
        notes = None if self.live is None else self.live.notes
        self.telemetry = Telemetry(
            run_dir, metadata, shapes, (*self.sinks, *live), name, notes=notes
        )

    def record(self, step: int, values: Mapping[str, Any], *, complete: bool) -> None:
        """Add ``values`` (host or device arrays, by key) to step ``step``'s record; hand the
        record to the writer if ``complete`` (nothing more comes for that step)."""
        if self.telemetry is None or not values:
            return
        if self._held is not None and self._held[0] != step:
            if step < self._held[0]:
                raise ValueError(
                    f"run {self.telemetry.name}: step {step} recorded after step "
                    f"{self._held[0]}; steps must increase"
                )
            self._submit()
        held = {} if self._held is None else self._held[1]
        self._held = (step, {**held, **values})
        if complete:
            self._submit()

    def _submit(self) -> None:
        assert self.telemetry is not None and self._held is not None
        self.telemetry.submit(*self._held)
        self._held = None

    def close(self, status: str) -> None:
        """Hand over what is held, then close the run as ``status``. Idempotent."""
        if self.telemetry is None:
            return
        if self._held is not None:
            self._submit()
        self.telemetry.close(status)
