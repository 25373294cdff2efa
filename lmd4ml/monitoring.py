"""``monitor``: the same quantities as ``instrument``, as an optax transformation for any loop.

``tx = lm.monitor(optax.adam(1e-3), quantities)`` wraps an optimizer; the user's own train
step passes the per-sample loss and the batch as extra arguments of ``tx.update`` and reads
the values back from the optimizer state with :func:`metrics`, as optax's own ``monitor``
and ``snapshot`` do. :class:`Recorder` sends them to a run (store and live ring), as
``lm.train`` does.

The monitor builds the step context with :func:`lmd4ml.step.linearize` and
:func:`lmd4ml.step.measure`, exactly as ``lm.instrument`` does, so every quantity has the same
value. The per-sample losses and the mean gradient g it linearizes are the ones the user's step
already computes: inside one ``jax.jit`` XLA merges the two computations into one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from lmd4ml import checks, protocol, stats
from lmd4ml.quantities import Quantity
from lmd4ml.stats import DataAxis, PyTree, sharding
from lmd4ml.step import (
    Metrics,
    check_params,
    check_quantities,
    linearize,
    measure,
    strongly_typed,
)
from lmd4ml.supervised import supervised
from lmd4ml.telemetry.runs import (
    Recording,
    StopSignals,
    Terminated,
    base_metadata,
    check_config,
    check_user_name,
    check_user_values,
    hyperparameters,
    warn_if_nonfinite,
)
from lmd4ml.telemetry.store import STATUSES
from lmd4ml.telemetry.writer import Sink, writes_telemetry

PROBE_BATCH = 8
"""Samples in the stand-in batch that ``init`` traces the quantities on to learn their shapes."""

USAGE = "tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch)"

SAMPLES_CHECKED = 2
"""Samples of each tracked batch whose loss the monitor also computes alone, to tell whether
the loss's samples interact (:mod:`lmd4ml.stats.coupling`)."""


class MonitorState(NamedTuple):
    """The monitor's part of an optimizer state: the inner state and the last values."""

    inner_state: optax.OptState
    quantity_states: dict[str, PyTree]
    metrics: dict[str, PyTree]  # the values at update ``tracked_step``; NaN (or 0) before
    count: jax.Array  # updates taken so far
    tracked_step: jax.Array  # the update that ``metrics`` describe, -1 before the first
    samples: jax.Array  # -1 unchecked, 0 independent, 1 interacting, 2 interacting (BatchNorm)


def _probe_values(
    quantities: Sequence[Quantity], params: PyTree, states: dict, memory_budget: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shape and dtype of every quantity's value, traced on a stand-in loss and batch."""

    def values(params: PyTree, states: dict) -> Metrics:
        # A model linear in every leaf, split as lm.supervised splits one, so that every
        # curvature method (the GGN's too) is traced as on a real loss.
        def apply_fn(p: PyTree, x: jax.Array) -> jax.Array:
            return x[:, None] * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(p))

        loss_fn = supervised(apply_fn, optax.squared_error)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        batch = (jnp.ones(PROBE_BATCH, dtype), jnp.zeros((PROBE_BATCH, 1), dtype))
        lin = linearize(lambda p: (loss_fn(p, batch), None), params, quantities)
        step = jnp.zeros((), jnp.int32)
        split = protocol.bind_split(loss_fn, params, batch, protocol.Extras())
        args = (loss_fn, batch, params, lin, lin.grads, step, memory_budget)
        return measure(quantities, states, *args, split=split)[0]

    return jax.eval_shape(values, params, states)


def _missing(value: jax.ShapeDtypeStruct) -> jax.Array:
    fill = jnp.nan if jnp.issubdtype(value.dtype, jnp.inexact) else 0
    return jnp.full(value.shape, fill, value.dtype)


def _as_stored(values: Metrics, stored: Metrics) -> Metrics:
    """``values`` in the shapes and dtypes ``init`` gave them; a different shape is an error."""
    for key, value in values.items():
        got = jax.tree.map(np.shape, value)
        want = jax.tree.map(np.shape, stored[key])
        if jax.tree.structure(value) != jax.tree.structure(stored[key]) or got != want:
            raise ValueError(
                f"lm.monitor: quantity {key!r} has value shape {got} on this batch but {want} "
                "on init's stand-in batch; the monitor keeps values in the optimizer state, so "
                "their shapes must not depend on the batch (use lm.instrument for this quantity)"
            )
    return jax.tree.map(lambda v, s: jnp.asarray(v, s.dtype), values, stored)


def _resolve_track(track: Any, every: int, count: jax.Array) -> bool | jax.Array:
    """``track`` as a Python bool (one variant traced) or a scalar bool array (``lax.cond``)."""
    if track is None:
        return True if every == 1 else count % every == 0
    if isinstance(track, bool | np.bool_):
        return bool(track)
    shape, dtype = np.shape(track), getattr(track, "dtype", type(track))
    if shape != () or dtype != jnp.bool_:
        raise TypeError(
            "lm.monitor: track must be a Python bool or a scalar boolean array (e.g. "
            f"step % 10 == 0), got {type(track).__name__} of shape {shape} and dtype {dtype}"
        )
    return track


def _data_axis(batch_sharding: Any) -> DataAxis | None:
    """The mesh axes ``batch_sharding`` splits samples over; a clear error for anything else."""
    if batch_sharding is None:
        return None
    if sharding.sample_axis_names(batch_sharding) is None:
        raise ValueError(
            "lm.monitor: batch_sharding must be a NamedSharding that splits the batch's first "
            f"(sample) axis over mesh axes, e.g. NamedSharding(mesh, P('data')); got "
            f"{batch_sharding!r}"
        )
    return sharding.sharding_axis(batch_sharding)


def _check_wiring(loss_fn: Any, batch: Any, params: Any) -> None:
    missing = [
        name
        for name, value in (("loss_fn", loss_fn), ("batch", batch), ("params", params))
        if value is None
    ]
    if missing:
        raise TypeError(
            f"lm.monitor: update needs {' and '.join(missing)} to compute its quantities; call "
            f"{USAGE}, where loss_fn(params, batch) returns per-sample losses of shape (B,) "
            "(or pass track=False for a step without quantities)"
        )
    if not callable(loss_fn):
        raise TypeError(
            f"lm.monitor: loss_fn must be a function (params, batch) -> per-sample losses (B,), "
            f"got {type(loss_fn).__name__}"
        )


def monitor(
    inner: optax.GradientTransformation,
    quantities: Sequence[Quantity],
    *,
    every: int = 1,
    memory_budget: int = 2**26,
    batch_sharding: NamedSharding | None = None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Wrap an optimizer so that its ``update`` also computes ``quantities``.

    The wrapped ``update`` takes two extra keyword arguments, the same per-sample loss as
    ``lm.instrument`` and the batch the gradient was taken on:

        ``updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch)``

    ``loss_fn(params, batch)`` returns per-sample losses, shape (B,), for ``params`` as they
    reach ``update``. The quantities see θₜ (``params``), ℓᵢ and g = mean ∇ℓᵢ of ``loss_fn`` on
    ``batch`` (not ``grads``, which a chain may have clipped or accumulated), and the update the
    inner transformation returns: so the monitor must see the final update, as the whole
    optimizer or the last element of a chain. Values are kept in the state until the next
    tracked update; read them with :func:`metrics`.

    The loss protocol is ``lm.instrument``'s (:mod:`lmd4ml.protocol`): pass ``key=`` (the key
    your step's loss used) and ``model_state=`` (the state it started from) to ``update``
    and the loss is called with them, every evaluation within the update with the same key,
    state and random draws. The inner optimizer also gets optax's ``value``, ``grad`` and
    ``value_fn`` (for ``optax.lbfgs()``, ``optax.polyak_sgd()``) unless you pass them. Each
    tracked update checks, on its first samples, that the samples do not interact
    (train-mode BatchNorm); if they do, per-sample quantities are undefined and
    :func:`metrics` raises. ``mask=`` marks the real samples of a padded batch: padded ones
    count for nothing.

    When to track: ``every=k`` tracks updates 0, k, 2k, … (a counter in the state and one
    ``lax.cond``: one compiled program). An extra argument ``track`` overrides it for one call:
    a Python bool selects one of two programs while tracing (``track=False`` is the bare inner
    update, as ``lm.instrument``'s), a scalar boolean array is decided at run time.

    Args:
      inner: the optimizer to wrap, any optax transformation (extra arguments other than the
        monitor's own are passed on).
      quantities: what to compute, e.g. ``[lm.Loss(), lm.NormTest()]``; each value's shape
        must not depend on the batch (true of every built-in quantity).
      every: track every k-th update when ``track`` is not given.
      memory_budget: bytes of per-sample gradients held at once, as in ``lm.instrument``
        (per device, when the batch is split).
      batch_sharding: how the batch is placed, e.g. ``NamedSharding(mesh, P("data"))``. Inside
        a jitted step the monitor cannot see it; told, it runs the per-sample pass on each
        device's own samples, as ``lm.instrument`` does for a batch it sees placed so.
      has_aux: the loss returns ``(losses, aux)``, as with ``jax.grad``'s ``has_aux``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lmd4ml as lm
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return (x @ w - y) ** 2
      >>> tx = lm.monitor(optax.sgd(0.1), [lm.Loss(), lm.NormTest()])
      >>> w, batch = jnp.zeros(2), (jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([1.0, 2.0]))
      >>> opt_state = tx.init(w)
      >>> grads = jax.grad(lambda w: loss_fn(w, batch).mean())(w)
      >>> updates, opt_state = tx.update(grads, opt_state, w, loss_fn=loss_fn, batch=batch)
      >>> m = lm.metrics(opt_state)
      >>> int(m["step"]), round(float(m["loss"]), 3)
      (0, 2.5)
    """
    quantities = tuple(quantities)
    check_quantities(quantities)
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise TypeError(f"lm.monitor wraps an optax GradientTransformation, got {type(inner)}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"lm.monitor: every must be an integer >= 1, got {every!r}")
    checks.check_int("memory_budget (bytes)", memory_budget, 1)
    data = _data_axis(batch_sharding)
    inner = optax.with_extra_args_support(inner)
    uses_samples = any(q.uses_samples for q in quantities)

    def init(params: PyTree) -> MonitorState:
        check_params(params)
        q_states = {q.key: q.init(params) for q in quantities}
        shapes = _probe_values(quantities, params, q_states, memory_budget)
        state = MonitorState(
            inner_state=inner.init(params),
            quantity_states=q_states,
            metrics=jax.tree.map(_missing, shapes),
            count=jnp.zeros((), jnp.int32),
            tracked_step=jnp.full((), -1, jnp.int32),
            samples=jnp.full((), -1, jnp.int32),
        )
        return sharding.on_mesh_of(params, strongly_typed(state))

    def update(
        grads: optax.Updates,
        state: MonitorState,
        params: optax.Params | None = None,
        *,
        loss_fn: Callable[..., Any] | None = None,
        batch: PyTree = None,
        track: bool | jax.Array | None = None,
        key: jax.Array | None = None,
        model_state: PyTree = None,
        mask: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MonitorState]:
        if not isinstance(state, MonitorState):
            raise TypeError(
                f"lm.monitor: update got a {type(state).__name__} for its state; pass the state "
                "its own init returned (or the chain's, for a chain)"
            )
        track = _resolve_track(track, every, state.count)
        # The loss, batch, key and model state are the monitor's own arguments: a line search
        # inside takes value_fn instead, and refuses keywords it does not consume.
        extra = dict(extra_args)
        if track is False:
            if loss_fn is None or batch is None or params is None:
                updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
            else:
                # Line searches and Polyak steps get the loss; XLA drops it where unused.
                bound = _bind(loss_fn, params, batch, key, model_state, mask)
                extra = {**_loss_args(bound, grads, bound.mean(params)), **extra}
                updates, inner_state = protocol.optimizer_update(
                    inner, grads, state.inner_state, params, **extra
                )
            return updates, state._replace(inner_state=inner_state, count=state.count + 1)

        _check_wiring(loss_fn, batch, params)
        bound = _bind(loss_fn, params, batch, key, model_state, mask)
        protocol.check_losses(jax.eval_shape(bound.loss, params, bound.inputs), batch)
        # Outside any lax.cond below, so that XLA merges it with the user's own gradient
        # (inside one, on CPU, it ran as a second, slower pass).
        lin = linearize(bound.full, params, quantities, bound.inputs_mask)
        value = stats.sample_mean(lin.losses, bound.inputs_mask)
        extra = {**_loss_args(bound, grads, value), **extra}
        updates, inner_state = protocol.optimizer_update(
            inner, grads, state.inner_state, params, **extra
        )

        def tracked(q_states: dict, old: Metrics, samples: jax.Array) -> tuple:
            args = (bound.loss, bound.inputs, params, lin, updates, state.count, memory_budget)
            split = protocol.bind_split(loss_fn, params, batch, protocol.Extras(key, model_state))
            values, q_states, _ = measure(
                quantities, q_states, *args, data, bound.inputs_mask, split
            )
            if uses_samples:
                samples = jnp.maximum(samples, samples_flag())  # once interacting, always
            return q_states, _as_stored(values, old), samples

        def samples_flag() -> jax.Array:
            # ℓᵢ on the batch against ℓᵢ alone for its first samples, every tracked update:
            # a few one-sample forward passes (a check once, in a lax.cond, made XLA's CPU
            # convolutions of the whole step slower). 0 independent, 1 or 2 interacting.
            dtype = jnp.result_type(*jax.tree.leaves(params))
            found = stats.coupling.deviation(
                bound.loss, params, bound.inputs, lin.losses, first=SAMPLES_CHECKED
            )
            coupled = ~(found <= stats.coupling.tolerance(dtype))
            jaxpr = jax.make_jaxpr(bound.loss)(params, bound.inputs).jaxpr
            batchnorm = protocol.batchnorm_in(params, model_state, jaxpr=jaxpr)
            return jnp.where(coupled, 2 if batchnorm else 1, 0).astype(jnp.int32)

        def kept(q_states: dict, old: Metrics, samples: jax.Array) -> tuple:
            return q_states, old, samples

        carried = (state.quantity_states, state.metrics, state.samples)
        if track is True:
            q_states, values, samples = tracked(*carried)
            tracked_step = state.count
        else:
            # The branch is a computation of its own, left out of XLA's CPU convolution layout pass.
            tracked_branch = stats.jaxpr.canonical_convolutions(tracked)
            q_states, values, samples = jax.lax.cond(track, tracked_branch, kept, *carried)
            tracked_step = jnp.where(track, state.count, state.tracked_step)
        new_state = MonitorState(
            inner_state, q_states, values, state.count + 1, tracked_step, samples
        )
        return updates, new_state

    def _bind(
        loss_fn: Callable[..., Any],
        params: PyTree,
        batch: PyTree,
        key: Any,
        model_state: PyTree,
        mask: Any,
    ) -> protocol.Bound:
        protocol.check_batch(batch)
        protocol.check_key(key)
        mask = protocol.check_mask(mask, batch)
        extras = protocol.Extras(key, model_state)
        # The loss's own forward pass: XLA shares it with your step's, which made the gradient.
        return protocol.bind(loss_fn, has_aux, params, batch, extras, mask, pools_at_argmax=False)

    def _loss_args(bound: protocol.Bound, grads: PyTree, value: jax.Array) -> dict[str, Any]:
        """optax's extra arguments for the inner optimizer (yours, if given, win)."""
        return {"value": value, "grad": grads, "value_fn": bound.mean}

    return optax.GradientTransformationExtraArgs(init, update)


def _monitor_states(tree: Any) -> list[MonitorState]:
    is_state = lambda x: isinstance(x, MonitorState)  # noqa: E731
    return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def metrics(state: Any) -> Metrics:
    """The values of the last tracked update, from the state of an :func:`monitor`.

    ``state`` is the monitor's state or anything holding it: a chain's or ``MultiSteps``'
    state, an ``nnx.Optimizer`` or its ``opt_state``, a flax ``TrainState``. Returns device
    arrays keyed like ``lm.instrument``'s metrics, plus ``"step"``: the update they describe,
    counted from 0 (-1 before the first tracked update, when values are NaN). Reading them
    never waits for the device.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lm.monitor(optax.sgd(0.1), [lm.Loss()]))
      >>> m = lm.metrics(tx.init(jnp.zeros(2)))
      >>> int(m["step"]), bool(jnp.isnan(m["loss"]))
      (-1, True)
    """
    pure = _monitor_state(state)
    # The check is one flag of the tracked updates: read it once the update is done, so
    # that reading the values never waits for the device.
    if not isinstance(pure.samples, jax.Array) or pure.samples.is_ready():
        check_samples(pure.samples)
    return {"step": pure.tracked_step, **pure.metrics}


def _monitor_state(state: Any) -> MonitorState:
    """The one monitor state within ``state``, its leaves plain arrays."""
    found = _monitor_states(state)
    if len(found) != 1:
        what = "no lm.monitor state" if not found else f"{len(found)} lm.monitor states"
        raise ValueError(
            f"lm.metrics found {what} in the {type(state).__name__} it was given; pass the "
            "state of an optimizer wrapped once with lm.monitor, e.g. opt_state of "
            "tx = lm.monitor(optax.adam(1e-3), quantities) (or of a chain, MultiSteps, "
            "nnx.Optimizer or TrainState holding it)"
        )
    return nnx.as_pure(found[0])  # nnx.Optimizer wraps every leaf of its state in a Variable


def check_samples(samples: Any) -> None:
    """Raise the error of :func:`lmd4ml.protocol.coupling_error` if the monitor found that
    the loss's samples interact (its ``samples`` flag is 1 or 2)."""
    code = int(np.asarray(samples))
    if code > 0:
        raise protocol.coupling_error(batchnorm=code == 2)


class _Logged(NamedTuple):
    """What one ``Recorder.log`` took from its state, fetched at the next call."""

    state: MonitorState  # its values, tracked_step, count and samples flag
    hyper: dict[str, jax.Array]  # the hyperparameters the state's last update used
    extra: dict[str, Any]  # the user's values for the parameters after that update


class Recorder:
    """Sends the values of a monitored loop to a run, as ``lm.train`` does: store, live ring
    and sinks.

    ``log(state)`` after each step takes :func:`metrics` of ``state`` (anything holding a
    monitor's state) and hands each newly tracked update to the background writer of
    :mod:`lmd4ml.telemetry.writer`; values are fetched from the device one call late, so the
    loop never waits for the step it just dispatched. The run (``runs_dir/<run>``, see
    :func:`lmd4ml.load_run`) opens at the first value recorded; ``close`` (or leaving the
    ``with`` block) writes what is left and marks it finished, failed or interrupted. Within
    the block, Ctrl-C and SIGTERM stop the loop at the next ``log`` (a second one at once),
    as ``lm.train`` stops between steps (:class:`~lmd4ml.telemetry.runs.StopSignals`). The
    first NaN or Inf recorded raises one ``RuntimeWarning`` naming its step and keys. Under
    ``jax.distributed`` only process 0 records; on the others ``log`` does nothing.

    ``log(state, extra={"val_acc": ...})`` records numbers of your own too, for the
    parameters as they are after the update in ``state`` (the t-th, counted from 0): at step
    t + 1, where the instruments of the next update, which starts from them, go; as
    ``lm.train``'s ``eval_fn`` values go to the step whose parameters they describe. A JAX
    scalar is fetched one call late, as the instruments are. The run's keys are fixed when
    it opens: name in ``extra_keys`` those you log only later. The hyperparameters of
    ``optax.inject_hyperparams`` states in ``state`` (the learning rate) are recorded at
    each tracked update, as ``hyper/<name>``.

    Args:
      runs_dir: where the run's directory is made; ``None`` for none (the sinks only).
      run_name: its name (default: a sortable timestamp).
      quantities: the monitor's quantities, recorded with the run (the dashboard reads their
        options, e.g. a histogram's range).
      config: anything worth keeping with the run (learning rate, batch size, the optimizer),
        recorded readably (:func:`lmd4ml.describing.json_safe`).
      dashboard: serve the live dashboard of ``runs_dir`` (``True``: port 8050, or this port),
        as ``lm.train(dashboard=...)`` does; its URL is ``dashboard_url``.
      sinks: other places each recorded step goes, as in ``lm.train``
        (:class:`lmd4ml.telemetry.writer.Sink`).
      extra_keys: names of ``extra`` values first logged after the run has opened.
      total_steps: the updates the loop expects to take, for the dashboard's progress.
      batch_size: samples per step, for ``lm.diagnose`` (the batch size a noisy gradient
        calls for is read against it); recorded with the run.
      optimizer: the optax optimizer your loop uses (the one ``lm.monitor`` wraps), recorded
        readably with its kind, for ``lm.diagnose`` (the learning rate and momentum of the
        edge-of-stability rule).
      diagnose: diagnose the run as it is recorded, as in ``lm.train``: each new finding
        warned about once and kept in the run; ``False`` turns it off, a mapping gives
        ``lm.diagnose``'s keyword arguments.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, lmd4ml as lm
      >>> tx = lm.monitor(optax.sgd(0.1), [lm.Loss()])
      >>> w, batch = jnp.zeros(2), (jnp.ones((3, 2)), jnp.arange(3.0))
      >>> loss_fn = lambda w, b: (b[0] @ w - b[1]) ** 2
      >>> opt_state, runs = tx.init(w), tempfile.mkdtemp()
      >>> with lm.Recorder(runs, "demo", quantities=[lm.Loss()]) as recorder:
      ...     for t in range(3):
      ...         _, opt_state = tx.update(w, opt_state, w, loss_fn=loss_fn, batch=batch)
      ...         recorder.log(opt_state, extra={"val_loss": 2.0 - t})
      >>> run = lm.load_run(f"{runs}/demo")
      >>> run.steps().tolist(), run["val_loss"][0].tolist()
      ([0, 1, 2, 3], [1, 2, 3])
    """

    def __init__(
        self,
        runs_dir: str | os.PathLike | None = "runs",
        run_name: str | None = None,
        *,
        quantities: Sequence[Quantity] = (),
        config: Mapping[str, Any] | None = None,
        dashboard: bool | int = False,
        sinks: Sequence[Sink] = (),
        extra_keys: Sequence[str] = (),
        total_steps: int | None = None,
        batch_size: int | None = None,
        optimizer: optax.GradientTransformation | None = None,
        diagnose: bool | Mapping[str, Any] = True,
    ):
        if total_steps is not None:
            checks.check_int("lm.Recorder: total_steps", total_steps, 1)
        if batch_size is not None:
            checks.check_int("lm.Recorder: batch_size", batch_size, 1)
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "lm.Recorder: optimizer must be an optax optimizer (optax.sgd(0.1), say), got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(extra_keys, str):
            raise TypeError(f"extra_keys must be a list of names, got the string {extra_keys!r}")
        self.quantities = tuple(quantities)
        self.config = check_config(config)
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.optimizer = optimizer
        self._declared = [check_user_name(k, ["step"], "extra_keys") for k in extra_keys]
        self._recording = Recording(
            runs_dir, run_name, sinks=sinks, dashboard=dashboard, diagnose=diagnose
        )
        self.dashboard_url = self._recording.dashboard_url
        self._pending: _Logged | None = None
        self._last_step = -1
        self._warned_nonfinite = False
        self._writes = writes_telemetry()
        self._signals = StopSignals()

    @property
    def run_dir(self) -> Path | None:
        """The run's directory, once the first value has been recorded."""
        return self._recording.run_dir

    def log(self, state: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Record the monitor's values in ``state`` if they are from a newly tracked update,
        and ``extra``, your own numbers for the parameters after that update."""
        if self._writes:
            pure = _monitor_state(state)
            what = "lm.Recorder.log: extra"
            extra = check_user_values({} if extra is None else extra, ["step", *pure.metrics], what)
            self._declare(extra)
            self._flush()
            hyper = nnx.as_pure(hyperparameters(state))
            self._pending = _Logged(pure, hyper, extra)
        self._signals.check()

    def _declare(self, extra: Mapping[str, Any]) -> None:
        """Take the keys of ``extra`` into the run's layout, or check them against it once
        the run is open."""
        new = [key for key in extra if key not in self._declared]
        if not new:
            return
        if self._recording.telemetry is not None:
            raise ValueError(
                f"lm.Recorder.log: extra has {new}, which the run did not have when it opened "
                f"(it has {self._declared}): a run's keys are fixed then, for its ring, store "
                "and sinks; name them in lm.Recorder(..., extra_keys=[...]) or log them from "
                "the first step on"
            )
        self._declared += new

    def _flush(self) -> None:
        if self._pending is None:
            return
        logged, self._pending = self._pending, None
        check_samples(logged.state.samples)
        values = stats.to_host(logged.state.metrics)
        step, count = int(logged.state.tracked_step), int(logged.state.count)
        if step > self._last_step:  # tracked since the last call
            self._last_step = step
            if step == count - 1:  # the hyperparameters are the tracked update's
                values.update(stats.to_host(logged.hyper))
            self._record(logged, step, values, complete=True)
        extra = {key: np.float64(value) for key, value in logged.extra.items()}
        # The next update's instruments go to the same step.
        self._record(logged, count, extra, complete=False)

    def _record(self, logged: _Logged, step: int, values: dict[str, Any], complete: bool) -> None:
        if not values:
            return
        if self._recording.wanted and self._recording.telemetry is None:
            self._open(logged)
        self._recording.record(step, values, complete=complete)
        if not self._warned_nonfinite:
            self._warned_nonfinite = warn_if_nonfinite(step, values, 4, self.quantities)

    def _open(self, logged: _Logged) -> None:
        """Open the run with the layout of the monitor's values, the hyperparameters and
        the declared user keys."""
        metrics, hyper = logged.state.metrics, logged.hyper
        for key in self._declared:  # extra_keys were checked before the instruments were known
            check_user_name(key, ["step", *metrics], "lm.Recorder: extra_keys")
        user = {key: jax.ShapeDtypeStruct((), np.float64) for key in self._declared}
        metadata = base_metadata(
            self.quantities,
            list(metrics),
            self.config,
            hyper=list(hyper),
            user=self._declared,
            total_steps=self.total_steps,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
        )
        self._recording.open(metadata, {**stats.host_shapes(metrics), **hyper, **user})

    def close(self, status: str = "finished") -> None:
        """Record what is pending and close the run as ``status``. Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        try:
            self._flush()
        finally:
            self._recording.close(status)

    def __enter__(self) -> Recorder:
        self._signals.__enter__()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        self._signals.__exit__()  # a second signal while closing acts at once
        if kind is None:
            try:
                self._signals.check()  # one that came after the last log is not lost
            except (KeyboardInterrupt, Terminated):
                self.close("interrupted")
                raise
            self.close("finished")
        elif issubclass(kind, KeyboardInterrupt | Terminated):
            self.close("interrupted")
        else:
            self.close("failed")
