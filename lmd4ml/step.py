"""``instrument``: the optimizer update and every due quantity in one compiled program."""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lmd4ml import checks, protocol, stats
from lmd4ml.quantities import Quantity, StepContext
from lmd4ml.stats import DataAxis, LossFn, PyTree, data_axis, sharding

Metrics = dict[str, Any]
RESERVED_KEYS = frozenset({"step"})


class StepState(NamedTuple):
    """Everything the instrumented step carries from one call to the next."""

    params: PyTree
    opt_state: optax.OptState
    quantity_states: dict[str, PyTree]
    step: jax.Array
    model_state: PyTree = None  # the loss's model state (BatchNorm statistics), if it has one
    key: jax.Array | None = None  # the run's PRNG key; step t uses fold_in(key, t)


def check_params(params: PyTree) -> None:
    """Raise a clear error unless ``params`` is a non-empty pytree of floating-point arrays.

    Example:
      >>> import numpy as np
      >>> check_params({"w": np.zeros(3, np.int32)})
      Traceback (most recent call last):
      ...
      TypeError: params must be a pytree of floating-point arrays; leaf ['w'] has dtype int32
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(
            f"params has no float leaves (got {type(params).__name__} with no arrays); "
            "pass a pytree of floating-point arrays"
        )
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "params must be a pytree of floating-point arrays; leaf "
                f"{jax.tree_util.keystr(path)} has dtype {dtype or type(leaf).__name__}"
            )


def check_quantities(quantities: Sequence[Quantity]) -> None:
    """Raise a clear error for non-quantities, reserved keys or two quantities with one key."""
    for q in quantities:
        if not isinstance(q, Quantity):
            raise TypeError(
                f"expected lmd4ml quantities (e.g. lm.Loss(), lm.quantity(key, fn)); "
                f"got {q!r} of type {type(q).__name__}"
            )
    keys = [k for q in quantities for k in q.metric_keys]  # siblings' keys too
    if taken := RESERVED_KEYS.intersection(keys):
        raise ValueError(
            f"quantity key {sorted(taken)[0]!r} is reserved; choose another key "
            "(for a built-in quantity, pass name=...)"
        )
    if dupes := [k for k, n in collections.Counter(keys).items() if n > 1]:
        holders = "; ".join(
            f"{k!r}: " + ", ".join(repr(q) for q in quantities if k in q.metric_keys) for k in dupes
        )
        raise ValueError(
            f"two or more quantities share the key(s) {dupes} ({holders}); each key must be "
            "unique: give all but one of them a name= of its own, e.g. "
            f"lm.GradHist1d(maxval=0.1, name='narrow') (got keys {keys})"
        )


def strongly_typed(tree: PyTree) -> PyTree:
    """``tree`` with every leaf a strongly typed array.

    Weak-typed leaves (``jnp.array(1.0)``, a Python ``0.0`` from an init) come back strong
    from the first update; making them strong up front keeps that step from compiling twice.

    Example:
      >>> strongly_typed({"t": 0.0})["t"].weak_type
      False
    """
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree)


class Linearization(NamedTuple):
    """The loss at θₜ, linearized once: what every tracked step starts from."""

    losses: jax.Array  # per-sample losses ℓᵢ, shape (B,)
    vjp: Callable[[jax.Array], PyTree]  # c -> Σᵢ cᵢ ∇ℓᵢ
    grads: PyTree  # the mean gradient g = vjp(1/B)
    outputs: tuple[PyTree, PyTree] = (None, None)  # the loss's (new model state, aux)
    per_sample: Mapping[str, Any] | None = None  # the per-sample pass it came from, if any


def linearize(
    full: Callable[[PyTree], tuple[jax.Array, Any]],
    params: PyTree,
    quantities: Sequence[Quantity],
    mask: jax.Array | None = None,
) -> Linearization:
    """Per-sample losses at ``params``, their VJP and the mean gradient; checks each quantity.

    ``full(params) -> (losses, outputs)``: the batch's per-sample losses and what else the
    loss returns (:attr:`lmd4ml.protocol.Bound.full`), taken from this same pass. With a
    sample ``mask``, g is the mean over the real samples.

    Example:
      >>> x = jnp.array([1.0, 2.0])
      >>> lin = linearize(lambda w: ((x * w) ** 2, None), jnp.array(1.0), [])
      >>> lin.losses.tolist(), float(lin.grads)
      ([1.0, 4.0], 5.0)
    """
    losses, vjp, outputs = jax.vjp(full, params, has_aux=True)
    for q in quantities:
        q.check(losses.shape[0])
    if mask is None:
        (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
    else:
        (grads,) = vjp(jnp.where(mask, 1.0, 0.0).astype(losses.dtype) / jnp.sum(mask))
    return Linearization(losses, lambda c: vjp(c)[0], grads, outputs)


def linearize_in_pass(
    bound: protocol.Bound,
    params: PyTree,
    quantities: Sequence[Quantity],
    declared: Mapping[str, stats.PerSample],
    memory_budget: int,
    data: DataAxis | None = None,
    mask: jax.Array | None = None,
) -> Linearization:
    """:func:`linearize` from the per-sample pass that the ``declared`` statistics need.

    The pass's backward pass yields every per-sample gradient's factors, and with them the
    losses ℓᵢ and Σᵢ ∇ℓᵢ (:func:`lmd4ml.stats.per_sample_pass` with ``linearize``): the
    step's own backward pass would do that work a second time (on 3c3d, a fifth of the
    economy preset's step); the step takes it where the activations outweigh the parameters.
    Padded samples' losses are zero (:func:`lmd4ml.protocol.bind`), so the sum is over the
    real ones. The loss's other outputs (model state, aux) come from
    a forward pass of which XLA keeps only what they need; the VJP is built only if a
    quantity calls it.

    Example:
      >>> x = jnp.array([1.0, 2.0])
      >>> bound = protocol.bind(lambda w, b: (b * w) ** 2, False, jnp.array(1.0), x,
      ...                       protocol.Extras(None, None))
      >>> lin = linearize_in_pass(bound, jnp.array(1.0), [], {}, memory_budget=2**20)
      >>> lin.losses.tolist(), float(lin.grads)
      ([1.0, 4.0], 5.0)
    """
    out = stats.per_sample_pass(
        bound.loss, params, bound.inputs, declared, memory_budget, data, linearize=True
    )
    losses, total = out.pop(stats.per_sample.LOSSES), out.pop(stats.per_sample.GRAD_SUM)
    for q in quantities:
        q.check(losses.shape[0])
    n = losses.shape[0] if mask is None else jnp.sum(mask)
    grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), total)

    def vjp(c: jax.Array) -> PyTree:
        return jax.vjp(lambda p: bound.full(p)[0], params)[1](c)[0]

    return Linearization(losses, vjp, grads, bound.full(params)[1], out)


def measure(
    quantities: Sequence[Quantity],
    states: Mapping[str, PyTree],
    loss_fn: LossFn,
    batch: PyTree,
    params: PyTree,
    lin: Linearization,
    updates: PyTree,
    step: jax.Array,
    memory_budget: int,
    data: DataAxis | None = None,
    mask: jax.Array | None = None,
    split: stats.ggn.Split | None = None,
) -> tuple[Metrics, dict[str, PyTree], jax.Array]:
    """Every quantity's value at θₜ (``step`` = t) for the update taken from it, in one
    shared context.

    Returns the values by key (a quantity's siblings under keys of their own), every quantity
    state (those of ``quantities`` advanced, the others as given) and the mean loss. With a
    sample ``mask`` that leaves fewer than two real samples, quantities that need two (a
    sample variance) are NaN. ``split``: the model and output loss of a loss from
    ``lm.supervised`` (for the GGN).
    """
    ctx = StepContext(
        loss_fn=loss_fn,
        batch=batch,
        params=params,
        losses=lin.losses,
        vjp=lin.vjp,
        grads=lin.grads,
        per_sample_pass=lin.per_sample,
        updates=updates,
        new_params=optax.apply_updates(params, updates),
        step=step,
        per_sample={s.name: s for q in quantities for s in q.per_sample},
        memory_budget=memory_budget,
        data=data,
        mask=mask,
        split=split,
    )
    metrics, new_states = {}, dict(states)
    for q in quantities:
        value, new_states[q.key] = q.compute(ctx, states[q.key])
        values = q.by_key(value)  # its own value and its siblings'
        if mask is not None and _needs_two(q):
            values = jax.tree.map(lambda v: jnp.where(ctx.batch_size >= 2, v, jnp.nan), values)
        metrics.update(values)
    return metrics, new_states, ctx.loss


def _needs_two(q: Quantity) -> bool:
    """Whether ``q`` has no value for one sample (its :meth:`Quantity.check` says so)."""
    try:
        q.check(1)
    except ValueError:
        return True
    return False


class InstrumentedStep:
    """A train step that also computes quantities; see :func:`instrument`."""

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        quantities: Sequence[Quantity],
        memory_budget: int,
        donate: bool = False,
        has_aux: bool = False,
    ):
        quantities = tuple(quantities)
        check_quantities(quantities)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(
                f"optimizer must be an optax GradientTransformation, got {type(optimizer)}"
            )
        checks.check_int("memory_budget (bytes)", memory_budget, 1)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.quantities = quantities
        self.memory_budget = int(memory_budget)
        self.keys = tuple(q.key for q in quantities)
        self.metric_keys = tuple(k for q in quantities for k in q.metric_keys)
        self.donate = donate
        self.has_aux = bool(has_aux)
        self.hints: tuple = ()  # what may name a coupling's cause (a Learner's module)
        self.trace_count: collections.Counter[frozenset[str]] = collections.Counter()
        self._samples_checked = False
        self._deviation = jax.jit(self._sample_deviation)
        self._jitted = jax.jit(
            self._step,
            static_argnames=("active", "data"),
            donate_argnames=("state",) if donate else (),
        )

    def init(
        self, params: PyTree, *, model_state: PyTree = None, key: jax.Array | None = None
    ) -> StepState:
        """The state before the first step; ``params`` become θ₀.

        ``model_state``: the loss's model state (linen's mutable collections, equinox's
        ``State``); the loss is then called with ``model_state=`` and returns the new one
        (:mod:`lmd4ml.protocol`). ``key``: a PRNG key; the loss is then called with
        ``key=fold_in(key, t)`` at step t.

        With ``donate``, every leaf is a copy: the first step may then consume the state
        without touching ``params``, and leaves that would share a buffer (the params and
        Distance's θ₀) do not. With ``params`` placed on a mesh (replicated or split), leaves
        made anew (counters, estimates) are replicated over it: a state placed otherwise
        than the step gives it back would compile the second step again.
        """
        check_params(params)
        protocol.check_key(key)
        protocol.check_optimizer(self.optimizer, params)
        state = StepState(
            params=params,
            opt_state=self.optimizer.init(params),
            quantity_states={q.key: q.init(params) for q in self.quantities},
            step=jnp.zeros((), jnp.int32),
            model_state=model_state,
            key=key,
        )
        state = strongly_typed(state)
        state = sharding.on_mesh_of(params, state)
        return jax.tree.map(jnp.copy, state) if self.donate else state

    def active_keys(self, track: bool | Collection[str]) -> frozenset[str]:
        """The keys a ``track`` argument selects; unknown keys are an error."""
        if track is True:
            return frozenset(self.keys)
        if track is False or track is None:
            return frozenset()
        if isinstance(track, str):
            track = (track,)
        unknown = set(track) - set(self.keys)
        if unknown:
            raise KeyError(f"track names unknown quantities {sorted(unknown)}; known: {self.keys}")
        return frozenset(track)

    def __call__(
        self,
        state: StepState,
        batch: PyTree,
        track: bool | Collection[str] = True,
        *,
        mask: jax.Array | None = None,
    ) -> tuple[StepState, Metrics] | tuple[StepState, Metrics, PyTree]:
        """One optimizer step; ``metrics`` holds the value of each tracked quantity.

        ``track``: ``True`` for every quantity, ``False`` for none (the bare update), or a
        collection of keys. Each distinct selection compiles once. With ``has_aux``, the
        loss's auxiliary output on this batch comes third. ``mask``: which samples are real
        (a boolean (B,)); padded ones count for nothing, in the update and in every
        statistic, so a short batch padded to B runs the same program.
        """
        state, metrics, _, aux = self._run(state, batch, track, mask)
        return (state, metrics, aux) if self.has_aux else (state, metrics)

    def lower(
        self, state: StepState, batch: PyTree, track: bool | Collection[str] = True
    ) -> jax.stages.Lowered:
        """The variant ``track`` selects, lowered for ``state`` and ``batch`` (as ``jax.jit``'s).

        ``step.lower(state, batch).compile().memory_analysis()`` tells what it holds.
        """
        return self._jitted.lower(
            state, batch, None, active=self.active_keys(track), data=data_axis(batch)
        )

    def step_with_loss(
        self,
        state: StepState,
        batch: PyTree,
        track: bool | Collection[str] = True,
        *,
        mask: jax.Array | None = None,
    ) -> tuple[StepState, Metrics, jax.Array]:
        """As ``__call__``, also returning the mean loss, which every variant computes anyway."""
        return self._run(state, batch, track, mask)[:3]

    def _run(
        self,
        state: StepState,
        batch: PyTree,
        track: bool | Collection[str],
        mask: jax.Array | None,
    ) -> tuple[StepState, Metrics, jax.Array, PyTree]:
        active = self.active_keys(track)
        protocol.check_batch(batch)
        mask = protocol.check_mask(mask, batch)
        if (
            not self._samples_checked
            and any(q.uses_samples for q in self.quantities if q.key in active)
            # not while the step is traced (an eval_shape of it): the check needs values
            and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state))
        ):
            self.check_samples(state, batch, mask)
        return self._jitted(state, batch, mask, active=active, data=data_axis(batch))

    def check_samples(self, state: StepState, batch: PyTree, mask: jax.Array | None = None) -> None:
        """Raise a clear error if the loss's samples interact (ℓᵢ on the batch differs from ℓᵢ
        computed alone), where per-sample instruments are undefined. Run once, before the
        first step that tracks a per-sample quantity; naming BatchNorm where the model, its
        parameters or state show one (:func:`lmd4ml.protocol.batchnorm_in`)."""
        found = self.sample_deviation(state, batch, mask)
        if found is not None:
            hints = (*self.hints, state.params, state.model_state)
            raise protocol.coupling_error(protocol.batchnorm_in(*hints), found)
        self._samples_checked = True

    def sample_deviation(
        self, state: StepState, batch: PyTree, mask: jax.Array | None = None
    ) -> float | None:
        """How far ℓᵢ on ``batch`` and ℓᵢ computed alone differ (relative), or None within
        rounding: where samples do not interact (:mod:`lmd4ml.stats.coupling`)."""
        found = float(self._deviation(state, batch, mask))
        dtype = jnp.result_type(*jax.tree.leaves(state.params))
        return None if found <= stats.coupling.tolerance(dtype) else found

    @property
    def samples_checked(self) -> bool:
        """Whether the samples were found not to interact (:meth:`check_samples`)."""
        return self._samples_checked

    def _extras(self, state: StepState) -> protocol.Extras:
        return protocol.Extras(protocol.step_key(state.key, state.step), state.model_state)

    def _bind(self, state: StepState, batch: PyTree, mask: jax.Array | None) -> protocol.Bound:
        extras = self._extras(state)
        return protocol.bind(self.loss_fn, self.has_aux, state.params, batch, extras, mask)

    def _sample_deviation(
        self, state: StepState, batch: PyTree, mask: jax.Array | None
    ) -> jax.Array:
        bound = self._bind(state, batch, mask)
        protocol.check_losses(jax.eval_shape(bound.loss, state.params, bound.inputs), batch)
        return stats.coupling.deviation(bound.loss, state.params, bound.inputs)

    def _step(
        self,
        state: StepState,
        batch: PyTree,
        mask: jax.Array | None,
        active: frozenset[str],
        data: DataAxis | None,
    ) -> tuple[StepState, Metrics, jax.Array, PyTree]:
        self.trace_count[active] += 1
        params = state.params
        bound = self._bind(state, batch, mask)
        protocol.check_losses(jax.eval_shape(bound.loss, params, bound.inputs), batch)

        due = [q for q in self.quantities if q.key in active]
        if not due:

            def mean_loss(p: PyTree) -> tuple[jax.Array, tuple]:
                losses, outputs = bound.full(p)
                return stats.sample_mean(losses, mask), outputs

            (loss, (model_state, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
            updates, opt_state = protocol.optimizer_update(
                self.optimizer,
                grads,
                state.opt_state,
                params,
                value=loss,
                grad=grads,
                value_fn=bound.mean,
            )
            new_state = state._replace(
                params=optax.apply_updates(params, updates),
                opt_state=opt_state,
                step=state.step + 1,
                model_state=model_state,
            )
            return new_state, {}, loss, aux

        declared = {s.name: s for q in due for s in q.per_sample}
        # Where the parameters outweigh the activations (a wide MLP), the step's own backward
        # pass costs little beyond its weight gradients, and XLA streams g from it into the
        # forward-mode passes; taken from the per-sample pass, g was held whole (10 M MLP:
        # +33 MiB). Where activations outweigh them (convolutions, transformers), the pass
        # saves a whole backward pass and the memory of its activations.
        if declared and stats.per_sample.activations_outweigh(bound.loss, params, bound.inputs):
            lin = linearize_in_pass(bound, params, due, declared, self.memory_budget, data, mask)
        else:
            lin = linearize(bound.full, params, due, mask)
        updates, opt_state = protocol.optimizer_update(
            self.optimizer,
            lin.grads,
            state.opt_state,
            params,
            value=stats.sample_mean(lin.losses, mask),
            grad=lin.grads,
            value_fn=bound.mean,
        )
        metrics, q_states, loss = measure(
            due,
            state.quantity_states,
            bound.loss,
            bound.inputs,
            params,
            lin,
            updates,
            state.step,
            self.memory_budget,
            data,
            mask,
            protocol.bind_split(self.loss_fn, params, batch, self._extras(state)),
        )
        model_state, aux = lin.outputs
        new_state = StepState(
            optax.apply_updates(params, updates),
            opt_state,
            q_states,
            state.step + 1,
            model_state,
            state.key,
        )
        return new_state, metrics, loss, aux


def instrument(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    quantities: Sequence[Quantity],
    *,
    memory_budget: int = 2**26,
    donate: bool = False,
    has_aux: bool = False,
) -> InstrumentedStep:
    """Wrap an optax optimizer and a per-sample loss into one jitted, instrumented step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-sample losses; the step minimises
        their mean. With a key or model state given to ``init``, it also takes ``key=`` or
        ``model_state=`` (and returns the new model state beside the losses): see
        :mod:`lmd4ml.protocol` and ``docs/your-model.md``.
      optimizer: any optax ``GradientTransformation``; those that take optax's extra
        arguments (``optax.lbfgs()``, ``optax.polyak_sgd()``, line searches) get ``value``,
        ``grad`` and ``value_fn`` (the mean loss on this batch, key and model state held).
      quantities: what to compute at tracked steps, e.g. ``[lm.Loss(), lm.NormTest()]``.
      memory_budget: bytes of per-sample gradients held at once (per device) when a quantity
        needs them (histograms, norm test); the batch is processed in chunks that fit.
      donate: let each step reuse the memory of the state it is given for the state it
        returns (``jax.jit``'s ``donate_argnames``): the old state is deleted, so keep only
        the returned one. Saves a copy of everything in the state (the parameters, the
        optimizer's moments, Distance's θ₀) on devices short of memory.
      has_aux: the loss returns ``(losses, aux)`` (as ``jax.grad``'s ``has_aux``); the step
        then returns ``(state, metrics, aux)``.

    A batch split over devices (``jax.device_put(batch, NamedSharding(mesh, P("data")))``)
    goes through the same step: each device computes the per-sample statistics of its own
    samples and the results are reduced across devices (:mod:`lmd4ml.stats.sharding`).

    Where the loss's samples interact (BatchNorm in training mode), per-sample quantities
    are undefined: the first step that tracks one raises a clear error instead
    (:meth:`InstrumentedStep.check_samples`).

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return (x @ w - y) ** 2
      >>> step = lm.instrument(loss_fn, optax.sgd(0.1), [lm.Loss(), lm.NormTest()])
      >>> state = step.init(jnp.zeros(2))
      >>> batch = (jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([1.0, 2.0]))
      >>> state, metrics = step(state, batch)
      >>> round(float(metrics["loss"]), 3)
      2.5
    """
    return InstrumentedStep(loss_fn, optimizer, quantities, memory_budget, donate, has_aux)
