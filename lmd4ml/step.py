"""``instrument``: the optimizer update and every due quantity in one compiled program."""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def check_params(params: PyTree) -> None:
    """Raise a clear error unless ``params`` is a non-empty pytree of floating-point arrays.

    Example:
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
    keys = [q.key for q in quantities]
    if taken := RESERVED_KEYS.intersection(keys):
        raise ValueError(
            f"quantity key {sorted(taken)[0]!r} is reserved; choose another key "
            "(for a built-in quantity, pass name=...)"
        )
    if dupes := [k for k, n in collections.Counter(keys).items() if n > 1]:
        holders = "; ".join(
            f"{k!r}: " + ", ".join(repr(q) for q in quantities if q.key == k) for k in dupes
        )
        raise ValueError(
            f"two or more quantities share the key(s) {dupes} ({holders}); each key must be "
            "unique: give all but one of them a name= of its own, e.g. "
            f"lm.GradHist1d(maxval=0.1, name='narrow') (got keys {keys})"
        )


def check_losses(losses: jax.ShapeDtypeStruct, batch: PyTree) -> None:
    """Raise unless ``losses`` is a float vector with one entry per sample of ``batch``."""
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
    n = sizes.pop() if len(sizes) == 1 else None
    expected = "(B,)" if n is None else f"({n},)"
    if losses.ndim != 1 or not jnp.issubdtype(losses.dtype, jnp.floating):
        raise ValueError(
            "loss_fn(params, batch) must return per-sample losses, a float vector of shape "
            f"{expected}; got shape {tuple(losses.shape)} dtype {losses.dtype}. "
            "Return the unreduced loss (e.g. optax.softmax_cross_entropy_with_integer_labels "
            "without .mean())."
        )
    if n is not None and losses.shape[0] != n:
        raise ValueError(
            f"loss_fn returned shape {tuple(losses.shape)} but the batch has {n} samples: "
            f"one loss per sample, shape {expected}, is expected"
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


def linearize(
    loss_fn: LossFn, params: PyTree, batch: PyTree, quantities: Sequence[Quantity]
) -> Linearization:
    """Per-sample losses at ``params``, their VJP and the mean gradient; checks each quantity.

    Example:
      >>> lin = linearize(lambda w, x: (x * w) ** 2, jnp.array(1.0), jnp.array([1.0, 2.0]), [])
      >>> lin.losses.tolist(), float(lin.grads)
      ([1.0, 4.0], 5.0)
    """
    losses, vjp = jax.vjp(lambda p: loss_fn(p, batch), params)
    for q in quantities:
        q.check(losses.shape[0])
    (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
    return Linearization(losses, lambda c: vjp(c)[0], grads)


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
) -> tuple[Metrics, dict[str, PyTree], jax.Array]:
    """Every quantity's value at θₜ (``step`` = t) for the update taken from it, in one
    shared context.

    Returns the values by key, every quantity state (those of ``quantities`` advanced, the
    others as given) and the mean loss.
    """
    ctx = StepContext(
        loss_fn=loss_fn,
        batch=batch,
        params=params,
        losses=lin.losses,
        vjp=lin.vjp,
        grads=lin.grads,
        updates=updates,
        new_params=optax.apply_updates(params, updates),
        step=step,
        per_sample={s.name: s for q in quantities for s in q.per_sample},
        memory_budget=memory_budget,
        data=data,
    )
    metrics, new_states = {}, dict(states)
    for q in quantities:
        metrics[q.key], new_states[q.key] = q.compute(ctx, states[q.key])
    return metrics, new_states, ctx.loss


class InstrumentedStep:
    """A train step that also computes quantities; see :func:`instrument`."""

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: optax.GradientTransformation,
        quantities: Sequence[Quantity],
        memory_budget: int,
        donate: bool = False,
    ):
        quantities = tuple(quantities)
        check_quantities(quantities)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
            raise TypeError(
                f"optimizer must be an optax GradientTransformation, got {type(optimizer)}"
            )
        if memory_budget < 1:
            raise ValueError(
                f"memory_budget must be a positive number of bytes, got {memory_budget}"
            )
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.quantities = quantities
        self.memory_budget = int(memory_budget)
        self.keys = tuple(q.key for q in quantities)
        self.donate = donate
        self.trace_count: collections.Counter[frozenset[str]] = collections.Counter()
        self._jitted = jax.jit(
            self._step,
            static_argnames=("active", "data"),
            donate_argnames=("state",) if donate else (),
        )

    def init(self, params: PyTree) -> StepState:
        """The state before the first step; ``params`` become θ₀.

        With ``donate``, every leaf is a copy: the first step may then consume the state
        without touching ``params``, and leaves that would share a buffer (the params and
        Distance's θ₀) do not. With ``params`` placed on a mesh (replicated or split), leaves
        made anew (counters, estimates) are replicated over it: a state placed otherwise
        than the step gives it back would compile the second step again.
        """
        check_params(params)
        state = StepState(
            params=params,
            opt_state=self.optimizer.init(params),
            quantity_states={q.key: q.init(params) for q in self.quantities},
            step=jnp.zeros((), jnp.int32),
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
        self, state: StepState, batch: PyTree, track: bool | Collection[str] = True
    ) -> tuple[StepState, Metrics]:
        """One optimizer step; ``metrics`` holds the value of each tracked quantity.

        ``track``: ``True`` for every quantity, ``False`` for none (the bare update), or a
        collection of keys. Each distinct selection compiles once.
        """
        state, metrics, _ = self.step_with_loss(state, batch, track)
        return state, metrics

    def lower(
        self, state: StepState, batch: PyTree, track: bool | Collection[str] = True
    ) -> jax.stages.Lowered:
        """The variant ``track`` selects, lowered for ``state`` and ``batch`` (as ``jax.jit``'s).

        ``step.lower(state, batch).compile().memory_analysis()`` tells what it holds.
        """
        return self._jitted.lower(
            state, batch, active=self.active_keys(track), data=data_axis(batch)
        )

    def step_with_loss(
        self, state: StepState, batch: PyTree, track: bool | Collection[str] = True
    ) -> tuple[StepState, Metrics, jax.Array]:
        """As ``__call__``, also returning the mean loss, which every variant computes anyway."""
        return self._jitted(state, batch, active=self.active_keys(track), data=data_axis(batch))

    def _step(
        self, state: StepState, batch: PyTree, active: frozenset[str], data: DataAxis | None
    ) -> tuple[StepState, Metrics, jax.Array]:
        self.trace_count[active] += 1
        params = state.params
        check_losses(jax.eval_shape(self.loss_fn, params, batch), batch)
        due = [q for q in self.quantities if q.key in active]
        if not due:
            loss, grads = jax.value_and_grad(lambda p: jnp.mean(self.loss_fn(p, batch)))(params)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, params)
            new_state = state._replace(
                params=optax.apply_updates(params, updates),
                opt_state=opt_state,
                step=state.step + 1,
            )
            return new_state, {}, loss

        lin = linearize(self.loss_fn, params, batch, due)
        updates, opt_state = self.optimizer.update(lin.grads, state.opt_state, params)
        metrics, q_states, loss = measure(
            due,
            state.quantity_states,
            self.loss_fn,
            batch,
            params,
            lin,
            updates,
            state.step,
            self.memory_budget,
            data,
        )
        new_params = optax.apply_updates(params, updates)
        return StepState(new_params, opt_state, q_states, state.step + 1), metrics, loss


def instrument(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    quantities: Sequence[Quantity],
    *,
    memory_budget: int = 2**26,
    donate: bool = False,
) -> InstrumentedStep:
    """Wrap an optax optimizer and a per-sample loss into one jitted, instrumented step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-sample losses; the step minimises
        their mean.
      optimizer: any optax ``GradientTransformation``.
      quantities: what to compute at tracked steps, e.g. ``[lm.Loss(), lm.NormTest()]``.
      memory_budget: bytes of per-sample gradients held at once (per device) when a quantity
        needs them (histograms, norm test); the batch is processed in chunks that fit.
      donate: let each step reuse the memory of the state it is given for the state it
        returns (``jax.jit``'s ``donate_argnames``): the old state is deleted, so keep only
        the returned one. Saves a copy of everything in the state (the parameters, the
        optimizer's moments, Distance's θ₀) on devices short of memory.

    A batch split over devices (``jax.device_put(batch, NamedSharding(mesh, P("data")))``)
    goes through the same step: each device computes the per-sample statistics of its own
    samples and the results are reduced across devices (:mod:`lmd4ml.stats.sharding`).

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
    return InstrumentedStep(loss_fn, optimizer, quantities, memory_budget, donate)
