"""``Learner`` and ``train``: the seed's ``train!`` loop around an instrumented step."""

from __future__ import annotations

import collections
import functools
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lmd4ml import protocol, stats
from lmd4ml.quantities import Quantity
from lmd4ml.schedules import Schedule, as_schedule
from lmd4ml.stats import LossFn, PyTree
from lmd4ml.step import InstrumentedStep, Metrics, instrument
from lmd4ml.telemetry.runs import (
    HYPER,
    Recording,
    StopSignals,
    Terminated,
    base_metadata,
    check_config,
    hyperparameters,
    user_values,
    warn_if_nonfinite,
)
from lmd4ml.telemetry.store import Run, RunStoreError, load_run
from lmd4ml.telemetry.writer import Sink, writes_telemetry


class History(dict):
    """Tracked values as numpy arrays, keyed like ``metrics``, plus ``"step"``.

    ``history[key]`` stacks a quantity's values over the steps it was tracked at (a pytree
    value keeps its structure, each leaf stacked); ``history["step"]`` lists every step at
    which any quantity was tracked, and ``history.steps(key)`` those of one key, the same
    unless quantities have schedules of their own. Hyperparameters (``hyper/<name>``) are
    kept at the steps of the instruments, ``eval_fn``'s values at the steps it was called
    at. ``dashboard_url`` is the URL the dashboard was served on, or None; ``metadata`` what
    the run records about itself (:func:`run_metadata`: quantities, config, optimizer, batch
    size), which ``lm.diagnose`` reads beside the values.
    """

    def __init__(
        self,
        values: dict[str, Any],
        steps: dict[str, np.ndarray],
        dashboard_url: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__(values)
        self._steps = steps
        self.dashboard_url = dashboard_url
        self.metadata = dict(metadata or {})

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


def _keep(learner: Learner, step: int, values: Metrics, keep: bool, instruments: bool) -> None:
    """Append one step's host ``values`` to the learner's history if ``keep`` (and the step
    to ``history["step"]`` if they are the ``instruments``'); warn at the learner's first
    non-finite value."""
    if keep:
        if instruments:
            learner.history["step"].append(step)
        for key, value in values.items():
            learner.history[key].append(value)
            learner.tracked_steps[key].append(step)
    if learner.first_nonfinite is None and warn_if_nonfinite(
        step, values, stacklevel=4, quantities=learner.step.quantities
    ):
        learner.first_nonfinite = step


def as_history(
    learner: Learner,
    dashboard_url: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> History:
    """The learner's history so far (see :class:`History`)."""
    values: dict[str, Any] = {"step": np.asarray(learner.history["step"], dtype=np.int64)}
    steps = {}
    # The instruments in their order, then hyperparameters and user values as they came.
    for key in dict.fromkeys([*learner.step.metric_keys, *learner.tracked_steps]):
        if rows := learner.history.get(key):
            values[key] = jax.tree.map(lambda *leaf_rows: np.stack(leaf_rows), *rows)
            steps[key] = np.asarray(learner.tracked_steps[key], dtype=np.int64)
    return History(values, steps, dashboard_url, metadata)


def run_metadata(
    learner: Learner,
    config: Mapping[str, Any],
    *,
    hyper: Sequence[str] = (),
    user: Sequence[str] = (),
    total_steps: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """What a run of ``train`` records: :func:`~lmd4ml.telemetry.runs.base_metadata`, the
    model, the optimizer (described readably: :func:`lmd4ml.describing.json_safe`; its
    ``optimizer_kind`` as :func:`lmd4ml.diagnosis.optimizer_facts` reads it) and the batch
    size (the first batch's; this process's share under ``jax.distributed``)."""
    params = learner.state.params
    leaves = jax.tree_util.tree_leaves_with_path(params)
    quantities, keys = learner.step.quantities, learner.step.metric_keys
    return {
        **base_metadata(
            quantities,
            keys,
            config,
            hyper=hyper,
            user=user,
            total_steps=total_steps,
            batch_size=batch_size,
            optimizer=learner.step.optimizer,
        ),
        "model": {
            "kind": "nnx.Module" if learner._module else type(params).__name__,
            "class": type(learner._module).__name__ if learner._module else None,
            "n_params": int(sum(np.size(x) for _, x in leaves)),
            "shapes": {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in leaves},
        },
    }


class Evaluator:
    """``eval_fn(learner)``, called at most once per step, its values checked
    (:func:`~lmd4ml.telemetry.runs.user_values`). Its first call fixes the keys, as the run's
    layout is fixed when it opens: later calls may return fewer, never new ones.

    Example:
      >>> evaluate = Evaluator(lambda learner: {"val_acc": 0.5}, None, taken=["loss"])
      >>> evaluate(None, 0), evaluate(None, 0), evaluate.keys
      ({'val_acc': np.float64(0.5)}, {}, ['val_acc'])
    """

    def __init__(
        self,
        eval_fn: Callable[[Learner], Mapping[str, Any]] | None,
        eval_every: Schedule | None,
        taken: Collection[str],
    ):
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(
                "eval_fn must be a function learner -> {name: number}, e.g. one returning "
                f"{{'val_acc': ...}}; got {type(eval_fn).__name__}"
            )
        if eval_fn is None and eval_every is not None:
            raise ValueError("eval_every says when to call eval_fn, which is None: pass both")
        self.fn = eval_fn
        self.due = None if eval_every is None else as_schedule(eval_every, "eval_every")
        self.taken = taken
        self.keys: list[str] | None = None
        self._last: int | None = None

    def due_at(self, step: int) -> bool:
        """Whether ``eval_fn`` is due at ``step`` by ``eval_every``, or as its first call."""
        if self.fn is None:
            return False
        return self.keys is None or (self.due is not None and bool(self.due(step)))

    def __call__(self, learner: Learner, step: int) -> dict[str, np.float64]:
        """The values of ``eval_fn`` for the parameters θ of ``step``; ``{}`` without one,
        or if this step was evaluated already."""
        if self.fn is None or self._last == step:
            return {}
        self._last = step
        values = user_values(self.fn(learner), self.taken, "eval_fn's result")
        if self.keys is None:
            self.keys = list(values)
        new = [key for key in values if key not in self.keys]
        if new:
            raise ValueError(
                f"eval_fn returned {new} at step {step}, which its first call did not (it "
                f"returned {self.keys}): a run's keys are fixed when it opens, so return every "
                "key from the first call on (NaN for one not known yet)"
            )
        return values


def _open_run(
    learner: Learner,
    recording: Recording,
    batch: PyTree,
    mask: jax.Array | None,
    metadata: Callable[..., dict[str, Any]],
    user: Sequence[str],
) -> None:
    # Traced as the step is called (with its mask), so that the trace is the step's own.
    shapes = jax.eval_shape(
        lambda s, b, m: learner.step(s, b, track=True, mask=m)[1], learner.state, batch, mask
    )
    hyper = hyperparameters(learner.state.opt_state)
    user_shapes = {key: jax.ShapeDtypeStruct((), np.float64) for key in user}
    recording.open(
        metadata(hyper=list(hyper), user=list(user), batch_size=stats.batch_size(batch)),
        {**stats.host_shapes(shapes), **hyper, **user_shapes},
    )


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
    eval_fn: Callable[[Learner], Mapping[str, Any]] | None = None,
    eval_every: Schedule | None = None,
    config: Mapping[str, Any] | None = None,
    sinks: Sequence[Sink] = (),
    diagnose: bool | Mapping[str, Any] = True,
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
        port; a busy one is replaced by a free one) from a process of its own and print its
        URL, which the returned history keeps as ``dashboard_url``; it outlives training,
        then stops 5 minutes after this process has exited and no page is open (see
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
      eval_fn: numbers of your own, ``eval_fn(learner) -> {name: number}`` (a validation
        accuracy, say), called on the host and recorded beside the instruments: in the
        history (``history.steps(name)`` says when), the run, its live ring and its sinks.
        Names are like ``val_acc`` or ``val/acc`` and no instrument's key; values are real
        scalars, NaN and Inf recorded with a warning. It is called with the parameters θₜ
        that step t's update starts from, and its values go to step t, where the
        instruments that describe θₜ are: by default at the first step and after every
        epoch (the last included, at the step after the last). Its first call fixes the
        keys of the run (every later call returns some of them).
      eval_every: when to call ``eval_fn`` instead: every k-th step, or a schedule
        ``step -> bool``, asked at every step and at the step after the last (step 0 is
        before any update), and always at the first step of the call.
      config: anything worth keeping with the run (batch size, a description), recorded
        readably beside what ``train`` records of itself (epochs, schedules...; a name of
        those is an error): schedules and optax objects by what made them
        (:func:`lmd4ml.describing.json_safe`). The optimizer is recorded too, and the values
        of ``optax.inject_hyperparams`` hyperparameters (the learning rate, even from a
        schedule) at every tracked step, as ``hyper/<name>``.
      sinks: other places each recorded step goes, from the writer thread
        (:class:`lmd4ml.telemetry.writer.Sink`: TensorBoard, W&B, MLflow); also with
        ``runs_dir=None``. One that raises is reported once and not called again.
      diagnose: read the instruments as they are recorded (:mod:`lmd4ml.diagnosis`), on the
        writer thread: each new finding (a learning rate too large, NaN, vanishing
        gradients...) is warned about once, with its steps and what to try, and kept in the
        run (``run.metadata["findings"]``). ``False`` turns it off; a mapping gives
        ``lm.diagnose``'s keyword arguments (``silence=[...]``, thresholds). Only a run that
        is written (a ``runs_dir`` or sinks) is diagnosed live; ``lm.diagnose(history)``
        diagnoses any afterwards.

    Ctrl-C and SIGTERM stop training cleanly at the end of the step under way
    (:class:`~lmd4ml.telemetry.runs.StopSignals`; a second one stops at once): every step so
    far is recorded, the run is closed as "interrupted" and its shared memory released, with
    one warning; then Ctrl-C's ``KeyboardInterrupt`` goes on up, and SIGTERM's
    :class:`~lmd4ml.telemetry.runs.Terminated` (a ``SystemExit``) ends the process with
    status 143 unless caught. Under ``jax.distributed`` both keep their default action.

    Under ``jax.distributed`` every process calls ``train`` on its share of each global batch
    and gets the same history; only process 0 writes the run, serves the dashboard and shows
    progress (see ``docs/scale-out.md``).

    Returns:
      Every tracked value so far as numpy arrays keyed like ``metrics`` (one row per tracked
      step), with ``history["step"]`` the steps they were taken at (counted from 0). With
      ``history=False``, the run written (:func:`lmd4ml.load_run`'s :class:`Run`, which
      reads its values from the store), or ``None`` if there is none: nothing was tracked,
      its store was lost, or another process of ``jax.distributed`` writes it.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> data = [(jnp.ones((4, 2)), jnp.ones(4))] * 3
      >>> learner = lm.Learner(jnp.zeros(2), lambda w, b: (b[0] @ w - b[1]) ** 2, data,
      ...                      optax.sgd(0.1), [lm.Loss()])
      >>> def evaluate(learner):
      ...     return {"w_sum": float(jnp.sum(learner.params))}
      >>> history = lm.train(learner, epochs=2, eval_fn=evaluate, runs_dir=None, progress=False)
      >>> history.steps("w_sum").tolist(), history["step"].tolist()
      ([0, 3, 6], [0, 1, 2, 3, 4, 5])
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
    evaluate = Evaluator(eval_fn, eval_every, taken=["step", *learner.step.metric_keys])
    total = len(learner.batches) * epochs if hasattr(learner.batches, "__len__") else None
    if total == 0:
        raise ValueError("batches is empty: there is nothing to train on")
    recorded = {
        "epochs": epochs,
        "track_every": track_every,
        "schedules": dict(schedules or {}),
        "memory_budget": learner.step.memory_budget,
        "last_batch": last_batch,
        "eval_fn": eval_fn,
        "eval_every": eval_every,
    }
    config = {**recorded, **check_config(config, own=recorded)}
    total_steps = None if total is None else learner.steps_done + total
    metadata = functools.partial(run_metadata, learner, config, total_steps=total_steps)

    def current_history() -> History:
        """The history so far, with the metadata a run of it records."""
        hyper = [key for key in learner.tracked_steps if key.startswith(HYPER)]
        about = metadata(hyper=hyper, user=evaluate.keys or [], batch_size=shaper.size)
        return as_history(learner, recording.dashboard_url, about)

    recording = Recording(runs_dir, run_name, sinks=sinks, dashboard=dashboard, diagnose=diagnose)
    progress = progress and writes_telemetry()  # several processes: process 0 alone reports
    bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True)
    pending: tuple[int, Metrics, Metrics] | None = None  # a tracked step's device values
    with_hyper = bool(hyperparameters(learner.state.opt_state))
    last_loss, shown = None, time.monotonic()
    status = "failed"

    def record_pending() -> None:
        nonlocal pending
        if pending is not None:
            step, metrics, hyper = pending
            pending = None
            values = stats.to_host({**metrics, **hyper})
            _keep(learner, step, values, history, instruments=True)
            recording.record(step, values, complete=True)

    def evaluated(step: int) -> dict[str, np.float64]:
        """eval_fn's values for θ of ``step``, kept; the steps before go to the run first."""
        record_pending()
        values = evaluate(learner, step)
        _keep(learner, step, values, history, instruments=False)
        return values

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
                    values = evaluated(step) if evaluate.due_at(step) else {}
                    if (track or values) and recording.wanted and recording.telemetry is None:
                        _open_run(learner, recording, batch, mask, metadata, evaluate.keys or [])
                    recording.record(step, values, complete=not track)
                    learner.state, metrics, loss = learner.step.step_with_loss(
                        learner.state, batch, track=track, mask=mask
                    )
                    # The values the update used. Copied where the next step reuses the
                    # state's memory; fetched, as the metrics, only after the next step is
                    # dispatched: the host never waits on the step it just dispatched.
                    hyper = {}
                    if metrics and with_hyper:
                        hyper = learner._own(hyperparameters(learner.state.opt_state))
                    record_pending()
                    pending = (step, metrics, hyper) if metrics else None
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
                if evaluate.due is None:  # by default after every epoch
                    step = learner.steps_done
                    recording.record(step, evaluated(step), complete=False)
                if on_epoch is not None:
                    record_pending()
                    on_epoch(epoch + 1, current_history())
            if evaluate.due is not None and evaluate.due(learner.steps_done):
                step = learner.steps_done
                recording.record(step, evaluated(step), complete=True)
            stop.check()  # a signal after the last step is not lost
        status = "finished"
    except (KeyboardInterrupt, Terminated) as stop:
        status = "interrupted"
        stopped_by = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        raise
    finally:
        record_pending()
        recording.close(status)
        if last_loss is not None:
            bar.set_postfix(loss=f"{float(last_loss):.4g}", refresh=False)
        bar.close()
        if stopped_by is not None:
            message = f"lm.train stopped by {stopped_by} at step {learner.steps_done}"
            if recording.run_dir is not None:
                message += (
                    f": the run {recording.run_dir} is closed as interrupted, with the steps "
                    "tracked until then"
                )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    if history:
        return current_history()
    return _stored(recording)


def _stored(recording: Recording) -> Run | None:
    """The run ``recording`` wrote, or None where it has none (its store was lost)."""
    if recording.run_dir is None:
        return None
    try:
        return load_run(recording.run_dir)
    except RunStoreError:
        return None
