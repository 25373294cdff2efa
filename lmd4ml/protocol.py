"""The loss protocol: how the step calls a user's loss, and what it hands the quantities.

A loss is ``loss_fn(params, batch) -> losses``, one value per sample, shape (B,). What real
models need besides comes in as JAX users know it:

- **a PRNG key** (dropout in plain functions, linen's ``rngs=``, equinox's ``key=``): given
  a key at ``init``, the step calls ``loss_fn(params, batch, key=k)`` with a key of its own
  for each step, ``fold_in(key, step)``;
- **model state** (linen's mutable collections, equinox's ``State``, any running average):
  given ``model_state`` at ``init``, the step calls ``loss_fn(params, batch,
  model_state=s)``, which returns ``(losses, new_state)`` as linen's ``mutable=`` does; the
  new state from the step's own batched pass is carried to the next step;
- **auxiliary outputs**, with ``has_aux=True`` as in ``jax.grad``: the loss returns
  ``(losses, aux)``, or ``(losses, (new_state, aux))`` with model state.

Within one step every evaluation of the loss (the gradient, forward-mode passes, α at θ+u,
Hessian products, a line search, the per-sample passes) sees the same key and model state,
and the same random draws: per-sample passes replay the batched pass's draws sample by
sample (:mod:`lmd4ml.stats.randomness`). :func:`bind` turns all of this into the plain
per-sample loss that the statistics take, ``loss(params, inputs) -> (B,)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmd4ml import stats
from lmd4ml.stats import LossFn, PyTree, ggn, randomness
from lmd4ml.stats import jaxpr as jaxpr_tools
from lmd4ml.supervised import Supervised


class Extras(NamedTuple):
    """What the step passes to the loss besides params and batch (``None``: not passed)."""

    key: jax.Array | None = None
    model_state: PyTree = None


class Sampled(NamedTuple):
    """A batch with what belongs to each of its samples besides: the loss's per-sample random
    draws and the sample mask. Every leaf has the batch's leading axis, so chunks and shards
    of it carry their samples' draws and mask."""

    batch: PyTree
    draws: tuple = ()
    mask: jax.Array | None = None


def _protocol(extras: Extras, has_aux: bool) -> str:
    passed = ["params", "batch"]
    passed += ["key=key"] if extras.key is not None else []
    passed += ["model_state=model_state"] if extras.model_state is not None else []
    if extras.model_state is not None:
        returns = "(losses, (new_model_state, aux))" if has_aux else "(losses, new_model_state)"
    else:
        returns = "(losses, aux)" if has_aux else "losses"
    return f"loss_fn({', '.join(passed)}) -> {returns}"


def call(
    loss_fn: Callable[..., Any], has_aux: bool, params: PyTree, batch: PyTree, extras: Extras
) -> tuple[jax.Array, tuple[PyTree, PyTree]]:
    """``loss_fn`` called as the protocol says: ``(losses, (new_model_state, aux))``, with
    ``None`` for what the protocol does not have; a clear error for any other structure.

    Example:
      >>> def loss(w, x, *, model_state):  # a running count as model state
      ...     return (w * x) ** 2, model_state + 1
      >>> losses, (new_state, aux) = call(loss, False, 2.0, jnp.ones(3), Extras(None, 0))
      >>> losses.tolist(), int(new_state), aux
      ([4.0, 4.0, 4.0], 1, None)
    """
    kwargs: dict[str, Any] = {}
    if extras.key is not None:
        kwargs["key"] = extras.key
    if extras.model_state is not None:
        kwargs["model_state"] = extras.model_state
    try:
        out = loss_fn(params, batch, **kwargs)
    except Exception as error:
        if isinstance(error, TypeError) and any(f"'{k}'" in str(error) for k in kwargs):
            raise TypeError(
                f"the loss is called as {_protocol(extras, has_aux)}, and it does not take "
                f"{', '.join(f'{k}=' for k in kwargs)}: {error}"
            ) from error
        _raise_if_no_sample_axis(error, batch)
        raise
    paired = has_aux or extras.model_state is not None
    if not paired:
        return _losses(out, extras, has_aux), (None, None)
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(
            f"the loss must return a pair for its protocol, {_protocol(extras, has_aux)}; got "
            f"{_describe(out)}"
        )
    losses, rest = out
    if extras.model_state is not None and has_aux:
        if not isinstance(rest, tuple) or len(rest) != 2:
            raise TypeError(
                f"with model state and has_aux the loss returns {_protocol(extras, has_aux)}; "
                f"its second output is {_describe(rest)}, not a pair (new_model_state, aux)"
            )
        new_state, aux = rest
    elif extras.model_state is not None:
        new_state, aux = rest, None
    else:
        new_state, aux = None, rest
    if new_state is not None:
        new_state = _as_given(extras.model_state, new_state)
    return _losses(losses, extras, has_aux), (new_state, aux)


def _raise_if_no_sample_axis(error: Exception, batch: PyTree) -> None:
    """Raise ``ValueError`` from the loss's ``error`` if ``batch`` has no common sample axis
    (arrays of different leading sizes, a 0-d array, no arrays at all): the likely cause.

    Example:
      >>> _raise_if_no_sample_axis(TypeError("incompatible shapes"), (np.ones((8, 3)),
      ...                                                             np.ones(7)))
      Traceback (most recent call last):
      ...
      ValueError: loss_fn failed on a batch whose arrays do not share a leading (sample) ...
    """
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(
            f"loss_fn failed on a batch with no arrays: {str(error).rstrip('.')}; {BATCH_RULE}"
        ) from error
    shapes = [(jax.tree_util.keystr(path), np.shape(leaf)) for path, leaf in leaves]
    if len({shape[:1] for _, shape in shapes}) == 1 and all(shape for _, shape in shapes):
        return
    listed = ", ".join(f"{path}: {shape}" for path, shape in shapes[:8])
    more = f" and {len(shapes) - 8} more" if len(shapes) > 8 else ""
    raise ValueError(
        f"loss_fn failed on a batch whose arrays do not share a leading (sample) axis "
        f"(shapes {listed}{more}): {str(error).rstrip('.')}; {BATCH_RULE}"
    ) from error


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return f"a tuple of {len(out)}"
    return f"{type(out).__name__} of shape {getattr(out, 'shape', '?')}"


def _losses(losses: Any, extras: Extras, has_aux: bool) -> jax.Array:
    if not hasattr(losses, "shape") or not hasattr(losses, "dtype"):
        raise TypeError(
            f"the loss is called as {_protocol(extras, has_aux)}; its losses are "
            f"{_describe(losses)}, not an array"
            + (
                " (a tuple: pass has_aux=True if the loss returns (losses, aux))"
                if isinstance(losses, tuple)
                else ""
            )
        )
    return losses


def _as_given(old: PyTree, new: PyTree) -> PyTree:
    """The new model state in the old one's dtypes (linen computes BatchNorm statistics in the
    activations' dtype): a state that changed dtype would compile the next step again."""
    # Shapes as lists: containers such as equinox's State compare by identity, not content.
    old_shapes = [np.shape(x) for x in jax.tree.leaves(old)]
    new_shapes = [np.shape(x) for x in jax.tree.leaves(new)]
    if jax.tree.structure(old) != jax.tree.structure(new) or old_shapes != new_shapes:
        raise ValueError(
            "the loss's new model state must have the structure and shapes of the model state "
            f"it was given; given {old_shapes}, returned {new_shapes}"
        )
    return jax.tree.map(lambda o, n: jnp.asarray(n, jnp.result_type(o)), old, new)


def check_losses(losses: jax.ShapeDtypeStruct, batch: PyTree) -> None:
    """Raise unless ``losses`` is a float vector with one entry per sample of ``batch``."""
    n = stats.leading_size(batch)
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


BATCH_RULE = (
    "a batch is a pytree (dicts, tuples, lists; None for nothing) of numeric or boolean "
    "arrays whose leading axis holds the samples"
)


def check_batch(batch: PyTree) -> None:
    """Raise a clear error, before anything is traced, for a batch that no step can take: a
    leaf that is no numeric or boolean array (a string, an object array, a PRNG key) or no
    samples at all (a leading axis of length 0).

    Example:
      >>> check_batch(jax.random.key(0))
      Traceback (most recent call last):
      ...
      TypeError: the batch holds a PRNG key (the batch itself has dtype key<fry>); pass ...
      >>> check_batch({"x": np.zeros((0, 3)), "y": np.zeros(0)})  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: the batch has 0 samples (its arrays' leading axes are empty): ...
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        where = f"leaf {jax.tree_util.keystr(path)}" if path else "the batch itself"
        if isinstance(leaf, bool | int | float | complex):
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise TypeError(f"{where} is a {type(leaf).__name__}; {BATCH_RULE}")
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"the batch holds a PRNG key ({where} has dtype {dtype}); pass the key as "
                "init(params, key=key) (lm.Learner(..., key=key), tx.update(..., key=key) "
                "for lm.monitor) and the batch as the step's second argument"
            )
        if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.number)):
            raise TypeError(f"{where} has dtype {dtype}; {BATCH_RULE}")
    if stats.leading_size(batch) == 0:
        raise ValueError(
            "the batch has 0 samples (its arrays' leading axes are empty): a step needs at "
            "least one sample; skip empty batches"
        )


def check_key(key: Any) -> None:
    """Raise a clear error unless ``key`` is a PRNG key (or None)."""
    if key is None:
        return
    dtype = getattr(key, "dtype", None)
    raw = dtype == jnp.uint32 and np.shape(key) == (2,)
    if not raw and (dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key)):
        raise TypeError(
            f"key must be a PRNG key (jax.random.key(0)), got {type(key).__name__} of dtype "
            f"{dtype} and shape {np.shape(key)}"
        )
    if np.shape(key) != () and not raw:
        raise TypeError(f"key must be a single PRNG key, got shape {np.shape(key)}")


def step_key(key: jax.Array | None, step: jax.Array) -> jax.Array | None:
    """The key of step t: ``fold_in(key, t)``, the same whether or not the step is tracked."""
    return None if key is None else jax.random.fold_in(key, step)


class Bound(NamedTuple):
    """A loss bound to one step: its key, model state and random draws held fixed.

    ``loss(params, inputs)`` gives per-sample losses (B,) on ``inputs`` (the batch, with the
    per-sample draws when the loss draws any) or any chunk of it; ``full(params)`` gives
    ``(losses, (new_model_state, aux))`` on the whole batch.
    """

    loss: LossFn
    inputs: PyTree
    full: Callable[[PyTree], tuple[jax.Array, tuple[PyTree, PyTree]]]

    @property
    def inputs_mask(self) -> jax.Array | None:
        """The sample mask the loss applies, or None."""
        return self.inputs.mask if isinstance(self.inputs, Sampled) else None

    def mean(self, params: PyTree) -> jax.Array:
        """The mean loss over the real samples as a function of ``params``: optax's
        ``value_fn`` for line searches."""
        return stats.sample_mean(self.loss(params, self.inputs), self.inputs_mask)


def bind(
    loss_fn: Callable[..., Any],
    has_aux: bool,
    params: PyTree,
    batch: PyTree,
    extras: Extras,
    mask: jax.Array | None = None,
    pools_at_argmax: bool = True,
) -> Bound:
    """The step's loss with ``extras`` held fixed, its random draws replayed and, with a
    sample ``mask``, the losses of padded samples (mask False) zero, so that their gradients
    are zero and they count for nothing. With ``pools_at_argmax``, every derivative taken of
    it gathers at its max-pools' argmax (:func:`~lmd4ml.stats.jaxpr.argmax_pooling`); without,
    its forward pass is the loss's own, which XLA can share with a pass of the user's step.

    Example:
      >>> def loss(w, x, key):
      ...     keep = jax.random.bernoulli(key, 0.5, x.shape)
      ...     return ((x * keep) @ w) ** 2
      >>> w, x = jnp.ones(3), jnp.ones((4, 3))
      >>> bound = bind(loss, False, w, x, Extras(key=jax.random.key(0)))
      >>> alone = [bound.loss(w, jax.tree.map(lambda a: a[i : i + 1], bound.inputs))[0]
      ...          for i in range(4)]
      >>> bool(jnp.allclose(jnp.stack(alone), bound.full(w)[0]))
      True
    """

    def full(p: PyTree, b: PyTree, e: Extras) -> tuple[jax.Array, tuple[PyTree, PyTree]]:
        return call(loss_fn, has_aux, p, b, e)

    if pools_at_argmax:
        # Every derivative the step takes (its gradient, α's at θ + u, Hessian products, the
        # per-sample passes) gathers at the argmax instead of XLA's select-and-scatter.
        full = jaxpr_tools.argmax_pooling(full)

    draws_plan = randomness.plan(full, params, batch, extras)
    if draws_plan is None and mask is None:
        return Bound(lambda p, b: full(p, b, extras)[0], batch, lambda p: full(p, batch, extras))
    if draws_plan is None:
        per_sample, shared = (), ()
    else:
        drawn = randomness.record(full, params, batch, extras)
        per_sample, shared = randomness.split(draws_plan, drawn)

    def masked(p: PyTree, inputs: Sampled) -> tuple[jax.Array, tuple[PyTree, PyTree]]:
        if draws_plan is None:
            losses, outputs = full(p, inputs.batch, extras)
        else:
            draws = randomness.merge(draws_plan, inputs.draws, shared)
            losses, outputs = randomness.replay(full, draws, p, inputs.batch, extras)
        if inputs.mask is not None:
            check_losses(losses, inputs.batch)  # before a mask broadcasts a wrong shape
            losses = jnp.where(inputs.mask, losses, jnp.zeros_like(losses))
        return losses, outputs

    inputs = Sampled(batch, per_sample, mask)
    return Bound(lambda p, b: masked(p, b)[0], inputs, lambda p: masked(p, inputs))


def bind_split(
    loss_fn: Callable[..., Any], params: PyTree, batch: PyTree, extras: Extras
) -> ggn.Split | None:
    """The model and output loss of a loss from ``lm.supervised``, the model bound to the
    step as the loss is (:func:`bind`: same key, model state and replayed draws); None for
    any other loss."""
    if not isinstance(loss_fn, Supervised):
        return None
    bound = bind(loss_fn.forward, False, params, batch, extras)

    def targets(sample: PyTree) -> PyTree:
        return loss_fn.targets(sample.batch if isinstance(sample, Sampled) else sample)

    return ggn.Split(bound.loss, bound.inputs, loss_fn.curvature, targets)


def check_mask(mask: Any, batch: PyTree) -> jax.Array | None:
    """``mask`` as a boolean vector, one entry per sample of ``batch``; a clear error for
    anything else. Integers count as booleans (nonzero: a real sample); floats do not, as a
    weight of 0.5 or NaN has no meaning here.

    Example:
      >>> check_mask([1, 1, 0], jnp.zeros((3, 2))).tolist()
      [True, True, False]
      >>> check_mask([True, False], jnp.zeros((3, 2)))
      Traceback (most recent call last):
      ...
      ValueError: mask must have one entry per sample, shape (3,); got shape (2,)
    """
    if mask is None:
        return None
    if not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(
            f"mask must be boolean (True: a real sample) or integer (nonzero: a real sample), "
            f"got dtype {mask.dtype}"
        )
    mask = jnp.asarray(mask)
    n = stats.leading_size(batch)
    if mask.ndim != 1 or (n is not None and mask.shape[0] != n):
        raise ValueError(
            f"mask must have one entry per sample, shape ({n if n is not None else 'B'},); "
            f"got shape {mask.shape}"
        )
    return mask.astype(bool)


def nnx_loss(loss_fn: Callable[..., Any], graphdef: Any, has_aux: bool = False) -> Callable:
    """A protocol loss for an nnx module split into ``graphdef``, ``nnx.Param`` and the rest:
    ``loss_fn(module, batch)`` on the merged module, the rest (BatchNorm statistics, RNG
    counts) its model state, read back after the call. A loss from ``lm.supervised`` stays
    one, its ``apply_fn(module, inputs)`` wrapped the same way.
    """
    from flax import nnx

    if isinstance(loss_fn, Supervised) and not has_aux:
        return dataclasses.replace(loss_fn, apply_fn=nnx_loss(loss_fn.apply_fn, graphdef))

    def loss(params: PyTree, batch: PyTree, *, model_state: PyTree) -> tuple:
        # Variables made in this trace: nnx refuses to mutate ones from an enclosing trace
        # (the step's jit, when this runs inside a vmap or grad of it).
        params, model_state = jax.tree.map(lambda x: x, (params, model_state))
        module = nnx.merge(graphdef, params, model_state)
        out = loss_fn(module, batch)
        new_state = nnx.state(module, nnx.Not(nnx.Param))
        if has_aux:
            losses, aux = out
            return losses, (new_state, aux)
        return out, new_state

    return loss


def batchnorm_in(*objects: Any, jaxpr: Any = None) -> bool:
    """Whether any of ``objects`` (modules, parameter or state pytrees) or ``jaxpr`` shows a
    BatchNorm layer: an nnx or equinox ``BatchNorm`` node, a linen ``BatchNorm_k`` scope or
    ``batch_stats`` collection, or an equation made under a ``BatchNorm`` name.

    Example:
      >>> batchnorm_in({"batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2)}}})  # linen
      True
      >>> batchnorm_in({"w": jnp.zeros(2)})
      False
    """

    def named(x: Any) -> bool:
        return type(x).__name__ == "BatchNorm"

    for obj in objects:
        if obj is None:
            continue
        if _nnx_batchnorm(obj):
            return True
        nodes = jax.tree_util.tree_flatten_with_path(obj, is_leaf=named)[0]
        for path, leaf in nodes:
            if named(leaf) or any("BatchNorm" in str(k) or "batch_stats" in str(k) for k in path):
                return True
    if jaxpr is not None:
        for eqn, _ in jaxpr_tools.equations(jaxpr):
            if "BatchNorm" in str(eqn.source_info.name_stack):
                return True
    return False


def _nnx_batchnorm(obj: Any) -> bool:
    from flax import nnx

    if not isinstance(obj, nnx.Module):
        return False
    return any(
        isinstance(m, nnx.BatchNorm) and not m.use_running_average for _, m in nnx.iter_modules(obj)
    )


def coupling_error(batchnorm: bool, deviation: float | None = None) -> ValueError:
    """The error for per-sample instruments on a loss whose samples interact."""
    seen = "" if deviation is None else f" (ℓᵢ on the batch and alone differ by {deviation:.3g})"
    if batchnorm:
        cause = (
            "the model has BatchNorm in training mode: it normalises each sample with the "
            "batch's mean and variance, so ℓᵢ depends on the other samples of the batch"
        )
        fix = (
            "use GroupNorm or LayerNorm, BatchNorm with running averages "
            "(use_running_average=True / model.eval()), or track only batch-level "
            "instruments"
        )
    else:
        cause = "the per-sample losses depend on other samples of the batch"
        fix = "make ℓᵢ depend on sample i alone, or track only batch-level instruments"
    return ValueError(
        f"per-sample instruments are undefined here: {cause}{seen}. Per-sample gradients, "
        f"the gradient tests, histograms, GSNR, TIC, the noise scale, α and the GGN need each "
        f"sample's own gradient. To fix: {fix} (lm.Loss, lm.GradNorm, lm.Distance, "
        "lm.UpdateSize, lm.HessMaxEV and lm.HessTrace(method='exact' or 'hutchinson') stay "
        "valid)."
    )


def optimizer_update(
    optimizer: optax.GradientTransformation,
    grads: PyTree,
    opt_state: optax.OptState,
    params: PyTree,
    **extra: Any,
) -> tuple[PyTree, optax.OptState]:
    """``optimizer.update`` with extra arguments, such as optax's ``value`` (the mean loss),
    ``grad`` and ``value_fn`` (the mean loss on this batch as a function of the params),
    passing only those its update accepts; a clear error for optimizers that need something
    the step does not have.

    Example:
      >>> tx = optax.polyak_sgd()
      >>> w = jnp.ones(2)
      >>> u, _ = optimizer_update(tx, w, tx.init(w), w, value=1.0, value_fn=lambda p: p @ p)
      >>> u.tolist()
      [-0.5, -0.5]
    """
    accepted = _accepted(optimizer.update, extra)
    try:
        return optimizer.update(grads, opt_state, params, **accepted)
    except (TypeError, ValueError) as error:
        message = str(error)
        needs = next((n for n in ("obj_fn", "grad_fn") if n in message), None)
        if needs is None:
            raise
        what = {
            "obj_fn": "an objective for its Hessian estimates, as optax.contrib.sophia does",
            "grad_fn": "a gradient function, as SAM's opaque mode does",
        }[needs]
        raise TypeError(
            f"this optimizer's update needs {needs!r}, {what}; lmd4ml's step passes value, "
            "grad and value_fn only. Use lm.monitor in your own train step, where you pass "
            f"{needs} yourself."
        ) from error


def _accepted(update: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return offered
    names = {p.name for p in parameters}
    return {k: v for k, v in offered.items() if k in names}


def check_optimizer(optimizer: optax.GradientTransformation, params: PyTree) -> None:
    """Raise a clear error for optimizers whose update needs per-example gradients."""

    def private(x: Any) -> bool:
        return type(x).__name__ == "DifferentiallyPrivateAggregateState"

    state = jax.eval_shape(optimizer.init, params)
    for node in jax.tree.leaves(state, is_leaf=private):
        if private(node):
            raise TypeError(
                "optax.contrib.dpsgd needs per-example gradients (a leading batch axis on "
                "every gradient leaf), but the step hands optimizers the mean gradient; "
                "differentially private training is not supported"
            )
