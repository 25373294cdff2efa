"""``Learner`` and ``train``: the seed's ``train!`` loop around an instrumented step."""

from __future__ import annotations

import collections
import importlib.metadata
import os
import platform
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lmd4ml import protocol, stats
from lmd4ml.quantities import Quantity
from lmd4ml.quantities.base import describe_keys
from lmd4ml.schedules import Schedule, as_schedule
from lmd4ml.stats import LossFn, PyTree
from lmd4ml.step import InstrumentedStep, Metrics, instrument
from lmd4ml.telemetry.store import Run, RunStoreError, load_run, new_run_dir
from lmd4ml.telemetry.writer import Telemetry, writes_telemetry


class History(dict):
    """Tracked values as numpy arrays, keyed like ``metrics``, plus ``"step"``.

    ``history[key]`` stacks a quantity's values over the steps it was tracked at (a pytree
    value keeps its structure, each leaf stacked); ``history["step"]`` lists every step at
    which any quantity was tracked, and ``history.steps(key)`` those of one quantity, the same
    unless quantities have schedules of their own.
    """

    def __init__(self, values: dict[str, Any], steps: dict[str, np.ndarray]):
        super().__init__(values)
        self._steps = steps

    def steps(self, key: str) -> np.ndarray:
        """The steps at which ``key`` was tracked, int64."""
        if key not in self._steps:
            raise KeyError(f"{key!r} was never tracked; tracked: {sorted(self._steps)}")
        return self._steps[key]


class Learner:
    """A model, its per-sample loss, the data, an optax optimizer and the quantities to track.

    ``model`` is a pytree of float arrays or a flax ``nnx.Module``; for a module, ``loss_fn``
    receives the module (rebuilt from the current parameters and state) in place of a
    pytree, and what it changes in the module (BatchNorm's statistics, dropout's RNG counts)
    is carried to the next step, as in nnx's own training loop. A pytree model's loss takes
    the protocol of :func:`lmd4ml.instrument`: with ``model_state`` it is called with
    ``model_state=`` and returns ``(losses, new_state)``, with ``key`` it gets ``key=``.
    Training state persists across calls of :func:`train`. With ``donate`` each step reuses the
    memory of the state before it (:func:`lmd4ml.instrument`); ``params`` and ``model`` then
    hand out copies, which later steps leave intact.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> data = [(jnp.ones((4, 2)), jnp.ones(4))] * 3
      >>> learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1]) ** 2, data,
      ...                      optax.sgd(0.1), [lm.Loss()])
      >>> history = lm.train(learner, epochs=2, progress=False)
      >>> history["step"].tolist()
      [0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        model: PyTree | nnx.Module,
        loss_fn: LossFn,
        batches: Iterable[PyTree],
        optimizer: optax.GradientTransformation,
        quantities: Sequence[Quantity],
        *,
        model_state: PyTree = None,
        key: jax.Array | None = None,
        memory_budget: int = 2**26,
        donate: bool = False,
    ):
        if isinstance(model, nnx.Module):
            if model_state is not None or key is not None:
                raise ValueError(
                    "an nnx.Module carries its own state (BatchNorm statistics) and randomness "
                    "(nnx.Rngs); model_state= and key= are for pytree models"
                )
            graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
            self._module = model
            step_loss = protocol.nnx_loss(loss_fn, graphdef)
        else:
            params, self._module, step_loss = model, None, loss_fn
        if not isinstance(batches, Iterable):
            raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
        if isinstance(batches, Mapping):  # one batch as a dict: iterating it gives its keys
            raise TypeError(
                "batches must be an iterable of batches (a list, a generator, a data loader), "
                f"got one {type(batches).__name__}, which iterates over its keys; for a single "
                "batch, pass [batch]"
            )
        self.batches = batches
        self.step: InstrumentedStep = instrument(
            step_loss, optimizer, quantities, memory_budget=memory_budget, donate=donate
        )
        if self._module is not None:
            self.step.hints = (self._module,)
        self.state = self.step.init(params, model_state=model_state, key=key)
        self.history: dict[str, list] = collections.defaultdict(list)
        self.tracked_steps: dict[str, list[int]] = collections.defaultdict(list)
        self.first_nonfinite: int | None = None
        self.steps_done = 0

    def _own(self, tree: PyTree) -> PyTree:
        if self.step.donate:  # the next step deletes the state's own arrays
            return jax.tree.map(jnp.copy, tree)
        return tree

    @property
    def params(self) -> PyTree:
        """The current parameters (a pytree, or the module's ``nnx.Param`` state)."""
        return self._own(self.state.params)

    @property
    def model_state(self) -> PyTree:
        """The current model state: what the loss returned at the last step (a module's
        non-parameter state, e.g. BatchNorm's running statistics), or ``None``."""
        return self._own(self.state.model_state)

    @property
    def model(self) -> PyTree | nnx.Module:
        """The trained model: the module updated in place (parameters and state, e.g.
        BatchNorm's running statistics), or the parameter pytree."""
        if self._module is None:
            return self.params
        nnx.update(self._module, self.params, self.model_state)
        return self._module


class BatchShaper:
    """Brings every batch to the size of the first: a shorter one is padded (repeating its
    own samples, so padded inputs are valid ones) with a sample mask, or dropped. Padding,
    every batch gets a mask, so that one compiled program serves them all."""

    def __init__(self, learner: Learner, last_batch: str):
        self.learner = learner
        self.last_batch = last_batch
        self.size: int | None = None
        self.full: jax.Array | None = None  # the mask of a full batch, made once
        self.independent: bool | None = None  # whether the samples do not interact
        self.warned = False

    def __call__(self, batch: PyTree) -> tuple[PyTree | None, jax.Array | None]:
        protocol.check_batch(batch)  # before its size is read: no samples, a string leaf
        n = stats.batch_size(batch)
        if self.size is None:
            self.size, self.full = n, jnp.ones(n, bool)
        if self.last_batch == "drop":
            return (batch, None) if n >= self.size else (None, None)
        if n >= self.size:
            # A mask on full batches too: the same program then serves a padded one.
            return batch, self.full if n == self.size else jnp.ones(n, bool)
        index = np.arange(self.size) % n
        padded = jax.tree.map(lambda x: x[index], batch)
        mask = jnp.asarray(np.arange(self.size) < n)
        step = self.learner.step
        if self.independent is None:
            self.independent = step.samples_checked or (
                step.sample_deviation(self.learner.state, padded, mask) is None
            )
        if not self.independent:
            if not self.warned:
                warnings.warn(
                    f"a batch of {n} samples (the first had {self.size}) was dropped: the "
                    "loss's samples interact (BatchNorm in training mode, say), so padding "
                    "it would change the real samples' losses. Pass last_batch='drop' to "
                    "drop such batches without this warning",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.warned = True
            return None, None
        return padded, mask


def _due_keys(
    learner: Learner, track_every: Schedule, schedules: Mapping[str, Schedule]
) -> Callable[[int], frozenset[str]]:
    """``step -> keys due there``, from the default schedule and each quantity's own."""
    unknown = sorted(set(schedules) - set(learner.step.keys))
    if unknown:
        raise KeyError(
            f"schedules names unknown quantities {unknown}; known: {list(learner.step.keys)}"
        )
    default = as_schedule(track_every, "track_every")
    by_key = {
        key: as_schedule(schedules[key], f"schedules[{key!r}]") if key in schedules else default
        for key in learner.step.keys
    }
    return lambda step: frozenset(key for key, due in by_key.items() if due(step))


def warn_if_nonfinite(
    step: int, values: dict[str, Any], stacklevel: int, quantities: Sequence[Quantity] = ()
) -> bool:
    """Warn if a run's recorded ``values`` hold NaN or Inf; whether they did. The NaN that a
    quantity reports by design (:attr:`Quantity.nan_is_missing`) is no cause.

    Example:
      >>> import warnings, numpy as np
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


def _record(learner: Learner, step: int, metrics: Metrics, keep: bool) -> Metrics:
    """Bring one tracked step's metrics to the host, append them to the history if ``keep``,
    return them."""
    values = stats.to_host(metrics)
    if keep:
        learner.history["step"].append(step)
        for key, value in values.items():
            learner.history[key].append(value)
            learner.tracked_steps[key].append(step)
    if learner.first_nonfinite is None and warn_if_nonfinite(
        step, values, stacklevel=4, quantities=learner.step.quantities
    ):
        learner.first_nonfinite = step
    return values


def as_history(learner: Learner) -> History:
    """The learner's history so far (see :class:`History`)."""
    values: dict[str, Any] = {"step": np.asarray(learner.history["step"], dtype=np.int64)}
    steps = {}
    for key in learner.step.metric_keys:
        if rows := learner.history.get(key):
            values[key] = jax.tree.map(lambda *leaf_rows: np.stack(leaf_rows), *rows)
            steps[key] = np.asarray(learner.tracked_steps[key], dtype=np.int64)
    return History(values, steps)


def base_metadata(
    quantities: Sequence[Quantity], keys: Sequence[str], config: Mapping[str, Any]
) -> dict[str, Any]:
    """What every run records about itself: quantities, keys, config, versions and process.

    ``quantities_by_key`` says for each key what it is (its class, the kind that readers
    such as the dashboard treat it as, and its settings:
    :func:`lmd4ml.quantities.base.describe_keys`, siblings too), so that a quantity given a
    ``name=`` of its own is still read as what it is.

    Example:
      >>> import lmd4ml as lm
      >>> meta = base_metadata([lm.Loss()], ["loss"], {"lr": 0.1, "tx": object})
      >>> meta["keys"], meta["config"]["lr"], "jax" in meta["versions"]
      (['loss'], 0.1, True)
      >>> narrow = lm.GradHist1d(nbins=20, maxval=0.1, name="narrow")
      >>> base_metadata([narrow], ["narrow"], {})["quantities_by_key"]["narrow"]
      {'class': 'GradHist1d', 'kind': 'grad_hist_1d', 'args': {'nbins': 20, 'maxval': 0.1}}
    """
    return {
        "quantities": [repr(q) for q in quantities],
        "quantities_by_key": {k: d for q in quantities for k, d in describe_keys(q).items()},
        "axes": {q.key: q.axes() for q in quantities if q.axes()},
        "keys": list(keys),
        "config": {
            k: v if isinstance(v, int | float | str | bool) else repr(v) for k, v in config.items()
        },
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("lmd4ml", "jax", "jaxlib", "flax", "optax", "numpy")
        },
        "python": platform.python_version(),
        "pid": os.getpid(),
    }


def run_metadata(learner: Learner, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run of ``train`` records: :func:`base_metadata`, the model and the optimizer."""
    params = learner.state.params
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {
        **base_metadata(learner.step.quantities, learner.step.metric_keys, config),
        "model": {
            "kind": "nnx.Module" if learner._module else type(params).__name__,
            "class": type(learner._module).__name__ if learner._module else None,
            "n_params": int(sum(np.size(x) for _, x in leaves)),
            "shapes": {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in leaves},
        },
        "optimizer": repr(learner.step.optimizer),
    }


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


def serve_dashboard(runs_dir: str | os.PathLike | None, dashboard: bool | int) -> None:
    """Serve the dashboard of ``runs_dir`` from a process of its own (``True``: port 8050);
    under ``jax.distributed``, from process 0 only."""
    if dashboard is False:
        return
    if runs_dir is None:
        raise ValueError("dashboard=True shows the runs in runs_dir, which is None")
    if not writes_telemetry():
        return
    from lmd4ml.dashboard.launch import open_dashboard

    port = 8050 if dashboard is True else int(dashboard)
    url, server = open_dashboard(runs_dir, port)
    print(f"lmd4ml dashboard: {url} (server pid {server.pid})", flush=True)


def _open_telemetry(
    learner: Learner,
    batch: PyTree,
    runs_dir: str | os.PathLike,
    run_name: str | None,
    config: Mapping[str, Any],
    mask: jax.Array | None,
) -> Telemetry:
    # Traced as the step is called (with its mask), so that the trace is the step's own.
    shapes = jax.eval_shape(
        lambda s, b, m: learner.step(s, b, track=True, mask=m)[1], learner.state, batch, mask
    )
    shapes = stats.host_shapes(shapes)
    run_dir = new_run_dir(runs_dir, run_name)
    return Telemetry(run_dir, run_metadata(learner, config), shapes)


def train(
    learner: Learner,
    epochs: int = 1,
    track_every: Schedule = 1,
    *,
    schedules: Mapping[str, Schedule] | None = None,
    runs_dir: str | os.PathLike | None = "runs",
    run_name: str | None = None,
    on_epoch: Callable[[int, History], None] | None = None,
    progress: bool = True,
    dashboard: bool | int = False,
    last_batch: Literal["pad", "drop"] = "pad",
    history: bool = True,
) -> History | Run | None:
    """Train ``learner`` for ``epochs`` passes over its batches, tracking its quantities.

    Args:
      learner: what to train; its state carries over to the next call.
      epochs: passes over ``learner.batches`` (at least 1).
      track_every: compute quantities every k-th step (k >= 1), or a callable
        ``step -> bool`` (see :mod:`lmd4ml.schedules`). Steps with nothing due run the bare
        optimizer update.
      schedules: a schedule of its own for some quantities, by key, in place of
        ``track_every``, e.g. ``{"hess_max_ev": 16, "grad_hist_2d": lm.schedules.every(64)}``.
      runs_dir: each call writes one run, ``runs_dir/<run>/``, with every tracked value (see
        :func:`lmd4ml.load_run`) and a live ring for dashboards; ``None`` writes nothing.
      run_name: the run's directory name (default: a sortable timestamp).
      on_epoch: called after each epoch with the epoch (from 1) and the history so far.
      progress: show a progress bar with the loss and steps/s.
      dashboard: serve the live dashboard of ``runs_dir`` (``True``: on port 8050, or this
        port) from a process of its own and print its URL; it outlives training, then stops
        5 minutes after this process has exited and no page is open (see
        :mod:`lmd4ml.dashboard.launch`). Needs the ``dashboard`` extra.
      last_batch: what to do with a batch shorter than the first (a DataLoader's last):
        ``"pad"`` it to the first's size with a sample mask, so that one compiled program
        serves every batch and the padding counts for nothing; or ``"drop"`` it. Where the
        loss's samples interact (train-mode BatchNorm), padding would change the real
        samples' losses: such a batch is dropped, with a warning.
      history: keep every tracked value in memory too, and return them. ``False`` keeps them
        in the run store only, so that the process's memory stays flat however long it
        trains (needs ``runs_dir``; ``on_epoch`` then gets a history without this call's
        values).

    Ctrl-C and SIGTERM stop training cleanly at the end of the step under way
    (:class:`StopSignals`; a second one stops at once): every step so far is recorded, the run
    is closed as "interrupted" and its shared memory released, with one warning; then Ctrl-C's
    ``KeyboardInterrupt`` goes on up, and SIGTERM's :class:`Terminated` (a ``SystemExit``)
    ends the process with status 143 unless caught. Under ``jax.distributed`` both keep
    their default action.

    Under ``jax.distributed`` every process calls ``train`` on its share of each global batch
    and gets the same history; only process 0 writes the run, serves the dashboard and shows
    progress (see ``docs/scale-out.md``).

    Returns:
      Every tracked value so far as numpy arrays keyed like ``metrics`` (one row per tracked
      step), with ``history["step"]`` the steps they were taken at (counted from 0). With
      ``history=False``, the run written (:func:`lmd4ml.load_run`'s :class:`Run`, which
      reads its values from the store), or ``None`` if there is none: nothing was tracked,
      its store was lost, or another process of ``jax.distributed`` writes it.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if last_batch not in ("pad", "drop"):
        raise ValueError(f"last_batch must be 'pad' or 'drop', got {last_batch!r}")
    if schedules is not None and not isinstance(schedules, Mapping):
        raise TypeError(
            "schedules must be a mapping from quantity key to schedule, e.g. "
            f"{{'hess_max_ev': 16}}; got {type(schedules).__name__}"
        )
    if not history and runs_dir is None:
        raise ValueError("history=False keeps the values in the run store only: give a runs_dir")
    shaper = BatchShaper(learner, last_batch)
    due = _due_keys(learner, track_every, schedules or {})
    total = len(learner.batches) * epochs if hasattr(learner.batches, "__len__") else None
    if total == 0:
        raise ValueError("batches is empty: there is nothing to train on")
    serve_dashboard(runs_dir, dashboard)
    if not writes_telemetry():  # several processes: process 0 alone writes and reports
        runs_dir, progress = None, False
    config = {
        "epochs": epochs,
        "track_every": track_every,
        "schedules": dict(schedules or {}),
        "memory_budget": learner.step.memory_budget,
        "last_batch": last_batch,
    }
    bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True)
    pending: tuple[int, Metrics] | None = None
    telemetry: Telemetry | None = None
    last_loss, shown = None, time.monotonic()
    status = "failed"

    def record_pending() -> None:
        nonlocal pending
        if pending is not None:
            values = _record(learner, *pending, keep=history)
            if telemetry is not None:
                telemetry.submit(pending[0], values)
            pending = None

    stopped_by = None
    try:
        with StopSignals() as stop:
            for epoch in range(epochs):
                n_batches = 0
                for batch in learner.batches:
                    stop.check()
                    batch, mask = shaper(batch)
                    if batch is None:  # a short batch, dropped
                        continue
                    step = learner.steps_done
                    track = due(step)
                    if track and telemetry is None and runs_dir is not None:
                        telemetry = _open_telemetry(
                            learner, batch, runs_dir, run_name, config, mask
                        )
                    learner.state, metrics, loss = learner.step.step_with_loss(
                        learner.state, batch, track=track, mask=mask
                    )
                    # Fetch the previous tracked step only now, so the host never waits on the
                    # step it just dispatched.
                    record_pending()
                    pending = (step, metrics) if metrics else None
                    if last_loss is not None and time.monotonic() - shown > 0.25:
                        bar.set_postfix(loss=f"{float(last_loss):.4g}", refresh=False)
                        shown = time.monotonic()
                    last_loss = loss
                    learner.steps_done += 1
                    n_batches += 1
                    bar.update()
                if n_batches == 0:
                    where = (
                        "in epoch 1" if epoch == 0 else f"in epoch {epoch + 1}: it was exhausted"
                    )
                    raise ValueError(
                        f"batches yielded nothing {where}; pass a re-iterable such as a list, or "
                        "an object whose __iter__ starts over"
                    )
                if on_epoch is not None:
                    record_pending()
                    on_epoch(epoch + 1, as_history(learner))
            stop.check()  # a signal after the last step is not lost
        status = "finished"
    except (KeyboardInterrupt, Terminated) as stop:
        status = "interrupted"
        stopped_by = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        raise
    finally:
        record_pending()
        if telemetry is not None:
            telemetry.close(status)
        if last_loss is not None:
            bar.set_postfix(loss=f"{float(last_loss):.4g}", refresh=False)
        bar.close()
        if stopped_by is not None:
            message = f"lm.train stopped by {stopped_by} at step {learner.steps_done}"
            if telemetry is not None:
                message += (
                    f": the run {telemetry.run_dir} is closed as interrupted, with the steps "
                    "tracked until then"
                )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    if history:
        return as_history(learner)
    return _stored(telemetry)


def _stored(telemetry: Telemetry | None) -> Run | None:
    """The run ``telemetry`` wrote, or None where it has none (its store was lost)."""
    if telemetry is None:
        return None
    try:
        return load_run(telemetry.run_dir)
    except RunStoreError:
        return None
