"""Random draws of a loss, recorded once and replayed, so every evaluation sees the same ones.

Dropout inside a loss makes ℓᵢ depend on the random bits drawn for sample i. The optimizer's
gradient comes from the batched pass, whose draws have the batch's shape (B, ...); a
per-sample pass evaluates the loss on batches of one, where the same layer would draw a
different (1, ...) mask from the same key. So that the per-sample gradients are those whose
mean the optimizer applies, every ``random_bits`` equation of the loss's jaxpr is
classified once per batch shape:

- *per sample*: its shape follows the batch, (n, ...) for a batch of n; its draws travel
  with the batch as an extra leading-axis array (chunked, sliced and sharded with it), and
  a batch of one sees row i of the batched draw;
- *shared*: its shape does not depend on the batch (a mask broadcast over samples); it is
  drawn once and every evaluation sees all of it.

:func:`record` evaluates only the draws (XLA drops the rest of the loss), :func:`replay`
evaluates the loss with each draw replaced by the recorded one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from lmd4ml.stats import jaxpr as jaxpr_tools
from lmd4ml.stats._types import PyTree
from lmd4ml.stats.per_sample import leading_size

Fn = Callable[..., Any]


def _is_draw(eqn: Any) -> bool:
    return eqn.primitive.name == "random_bits"


def _traced(fn: Fn, args: Sequence[PyTree]) -> tuple[Any, Any]:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    return closed, jax.tree.structure(out_shape)


def draw_shapes(fn: Fn, *args: PyTree) -> list[jax.ShapeDtypeStruct]:
    """The shape and dtype of every random draw of ``fn(*args)``, in evaluation order.

    Draws that :func:`replay` cannot reach (inside a loop, a cond or a custom derivative
    rule) are an error: they could not be replayed.

    Example:
      >>> import jax.numpy as jnp
      >>> def noisy(key, x):
      ...     return x * jax.random.bernoulli(key, 0.5, x.shape)
      >>> [d.shape for d in draw_shapes(noisy, jax.random.key(0), jnp.ones((4, 3)))]
      [(4, 3)]
    """
    closed, _ = _traced(fn, args)
    shapes = []
    for eqn, reached in jaxpr_tools.equations(closed.jaxpr):
        if not _is_draw(eqn):
            continue
        if not reached:
            raise ValueError(
                "the loss draws random numbers inside a loop, a cond or a custom derivative "
                f"rule ({eqn.primitive.name} of shape {eqn.outvars[0].aval.shape}); per-sample "
                "statistics replay the batch's draws sample by sample and cannot reach those. "
                "Draw them outside the loop (e.g. dropout masks made before a scan), or track "
                "only batch-level quantities (loss, gradient norm, distance, update size, "
                "Hessian trace and top eigenvalue)"
            )
        aval = eqn.outvars[0].aval
        shapes.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
    return shapes


class Plan(NamedTuple):
    """Which draws of a loss follow the batch (``per_sample[k]``) and which are shared."""

    per_sample: tuple[bool, ...]


def plan(fn: Fn, params: PyTree, batch: PyTree, extra: PyTree = ()) -> Plan | None:
    """Classify the draws of ``fn(params, batch, extra)``; ``None`` when it draws nothing.

    The loss is traced at the batch's size n and at another size m: a draw of shape
    (n, ...) there and (m, ...) here is per sample, one of the same shape at both is shared,
    and anything else is an error (the draw could not be split by sample).

    Example:
      >>> import jax.numpy as jnp
      >>> def loss(w, x, key):
      ...     keep = jax.random.bernoulli(key, 0.5, x.shape)       # one mask per sample
      ...     scale = jax.random.uniform(jax.random.fold_in(key, 1))  # one for the batch
      ...     return (x * keep) @ w * scale
      >>> plan(loss, jnp.ones(3), jnp.ones((4, 3)), jax.random.key(0))
      Plan(per_sample=(True, False))
    """
    n = leading_size(batch)
    at_n = draw_shapes(fn, params, batch, extra)
    if not at_n:
        return None
    if n is None:
        return Plan((False,) * len(at_n))
    m = 1 if n != 1 else 2
    resized = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m, *np.shape(x)[1:]), x.dtype), batch)
    at_m = draw_shapes(fn, params, resized, extra)
    if len(at_m) != len(at_n):
        raise ValueError(
            f"the loss draws {len(at_n)} random arrays on a batch of {n} but {len(at_m)} on a "
            f"batch of {m}; per-sample statistics need the same draws whatever the batch size"
        )
    kinds = []
    for a, b in zip(at_n, at_m, strict=True):
        if a.shape == b.shape:
            kinds.append(False)
        elif a.shape[:1] == (n,) and b.shape[:1] == (m,) and a.shape[1:] == b.shape[1:]:
            kinds.append(True)
        else:
            raise ValueError(
                f"the loss draws random bits of shape {a.shape} on a batch of {n} samples and "
                f"{b.shape} on a batch of {m}: neither one draw per sample along the first "
                "axis nor one draw for the whole batch, so per-sample statistics cannot give "
                "each sample its own part of it. Draw per-sample randomness with the batch "
                "axis first (as dropout does)"
            )
    return Plan(tuple(kinds))


def _flat_args(args: Sequence[PyTree]) -> list:
    return jax.tree.leaves(list(args))


def record(fn: Fn, *args: PyTree) -> list[jax.Array]:
    """The random draws of ``fn(*args)``, in evaluation order; only they are computed.

    Example:
      >>> import jax.numpy as jnp
      >>> noisy = lambda key, x: x * jax.random.bernoulli(key, 0.5, x.shape)
      >>> [d.shape for d in record(noisy, jax.random.key(0), jnp.ones(3))]
      [(3,)]
    """
    closed, _ = _traced(fn, args)
    drawn: list[jax.Array] = []

    def keep(eqn: Any, inputs: list, in_origins: list, outputs: list) -> list:
        if _is_draw(eqn):
            drawn.append(outputs[0])
        return outputs

    jaxpr_tools.walk(closed, _flat_args(args), [None] * len(closed.jaxpr.invars), keep)
    return drawn


def replay(fn: Fn, draws: Sequence[jax.Array], *args: PyTree) -> Any:
    """``fn(*args)`` with its k-th random draw replaced by ``draws[k]``.

    Example:
      >>> import jax.numpy as jnp
      >>> noisy = lambda key, x: x * jax.random.bernoulli(key, 0.5, x.shape)
      >>> ones = jnp.ones(3)
      >>> drawn = record(noisy, jax.random.key(0), ones)
      >>> again = replay(noisy, drawn, jax.random.key(7), ones)  # key 7's own draws unused
      >>> bool(jnp.all(again == noisy(jax.random.key(0), ones)))
      True
    """
    closed, out_tree = _traced(fn, args)
    queue = list(draws)

    def substitute(eqn: Any, inputs: list, in_origins: list, outputs: list) -> list:
        if not _is_draw(eqn):
            return outputs
        if not queue:
            raise ValueError("the loss drew more random arrays than were recorded for it")
        drawn = queue.pop(0)
        want = eqn.outvars[0].aval
        if drawn.shape != want.shape or drawn.dtype != want.dtype:
            raise ValueError(
                f"a recorded random draw has shape {drawn.shape} {drawn.dtype}, but the loss "
                f"now draws {want.shape} {want.dtype}"
            )
        return [drawn]

    outputs = jaxpr_tools.walk(
        closed, _flat_args(args), [None] * len(closed.jaxpr.invars), substitute
    )
    return jax.tree.unflatten(out_tree, outputs)


def split(p: Plan, draws: Sequence[jax.Array]) -> tuple[tuple, tuple]:
    """``draws`` as (per-sample draws, shared draws), in their order within each group."""
    per = tuple(d for d, s in zip(draws, p.per_sample, strict=True) if s)
    shared = tuple(d for d, s in zip(draws, p.per_sample, strict=True) if not s)
    return per, shared


def merge(p: Plan, per_sample: Sequence[jax.Array], shared: Sequence[jax.Array]) -> list:
    """The inverse of :func:`split`: every draw in evaluation order."""
    per, rest = iter(per_sample), iter(shared)
    return [next(per) if s else next(rest) for s in p.per_sample]
