"""Shared per-sample statistics: the expensive parts that quantities build on.

Everything here is a pure, jittable function of a per-sample loss function ``loss_fn(params,
batch) -> (B,)``, the parameters and the batch. Quantities never call these directly: they
read them from :class:`lmd4ml.quantities.StepContext`, which builds each one at most once per
step and only when some quantity asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmd4ml.stats import ghost
from lmd4ml.stats._types import LossFn, PyTree


class PerSample(NamedTuple):
    """A statistic of the per-sample gradients ∇ℓᵢ, computed chunk by chunk.

    ``fn(grads, params)`` receives the per-sample gradients of one chunk (a pytree like
    ``params`` with a leading axis of the chunk's length) and returns an array. ``combine``
    says how chunks join: ``"concat"`` along axis 0 (one entry per sample) or ``"sum"``.
    Statistics are matched by ``name``, so two quantities asking for the same one share it.

    Example:
      >>> import jax.numpy as jnp
      >>> n_nonzero = PerSample(
      ...     "n_nonzero",
      ...     lambda grads, params: sum(jnp.sum(g != 0) for g in jax.tree.leaves(grads)),
      ...     "sum")
    """

    name: str
    fn: Callable[[PyTree, PyTree], jax.Array]
    combine: Literal["concat", "sum"]


def _sq_norms(grads: PyTree, params: PyTree) -> jax.Array:
    del params
    return sum(
        jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads)
    )


SQ_NORMS = PerSample("sq_norms", _sq_norms, "concat")
"""Per-sample squared gradient norms ‖∇ℓᵢ‖², shape (B,)."""


def batch_size(batch: PyTree) -> int:
    """The common leading dimension of every array in ``batch``.

    Example:
      >>> batch_size((np.zeros((8, 3)), np.zeros(8)))
      8
    """
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
        raise ValueError(
            "per-sample statistics need every array in the batch to have the same leading "
            f"(sample) axis; got shapes {shapes}"
        )
    return sizes.pop()


def chunk_size(per_sample: PyTree, memory_budget: int, batch: int) -> int:
    """How many samples fit in ``memory_budget`` bytes when each holds arrays like ``per_sample``
    (at least 1, at most ``batch``); for full per-sample gradients, ``per_sample`` is the params.

    Example:
      >>> chunk_size({"w": np.zeros((1000,), np.float32)}, memory_budget=40_000, batch=64)
      10
    """
    nbytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(per_sample))
    return int(min(batch, max(1, memory_budget // max(nbytes, 1))))


def per_sample_pass(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    stats: Mapping[str, PerSample],
    memory_budget: int,
) -> dict[str, jax.Array]:
    """Every statistic in ``stats`` from one pass over the batch in chunks.

    A chunk holds as many samples as fit in ``memory_budget`` bytes of what the pass
    materialises: every per-sample gradient when some statistic needs them, otherwise (only
    squared norms) the factors and unfactored leaves of :mod:`lmd4ml.stats.ghost`, which form
    no per-sample gradient of dense parameters at all. Full chunks run in a ``lax.scan``, a
    shorter last chunk once after it.
    """
    n = batch_size(batch)
    needs_grads = any(name != SQ_NORMS.name for name in stats)
    footprint = (
        params
        if needs_grads
        else ghost.sq_norm_footprint(params, ghost.analyse(loss_fn, params, batch))
    )
    chunk = chunk_size(footprint, memory_budget, n)
    n_full, rest = divmod(n, chunk)

    def on_chunk(chunk_batch: PyTree) -> dict[str, jax.Array]:
        f = ghost.factors(loss_fn, params, chunk_batch)
        out = {SQ_NORMS.name: ghost.sq_norms(f)} if SQ_NORMS.name in stats else {}
        if needs_grads:
            others = {name: s for name, s in stats.items() if name != SQ_NORMS.name}
            grads = ghost.grads(f, params)
            out.update({name: s.fn(grads, params) for name, s in others.items()})
        return out

    def body(carry: dict, chunk_batch: PyTree) -> tuple[dict, dict]:
        out = on_chunk(chunk_batch)
        sums = {k: carry[k] + out[k] for k in carry}
        return sums, {k: v for k, v in out.items() if stats[k].combine == "concat"}

    head = jax.tree.map(lambda x: x[: n_full * chunk].reshape(n_full, chunk, *x.shape[1:]), batch)
    if n_full == 1:
        first = on_chunk(jax.tree.map(lambda x: x[0], head))
        sums = {k: v for k, v in first.items() if stats[k].combine == "sum"}
        parts = {k: [v] for k, v in first.items() if stats[k].combine == "concat"}
    else:
        zeros = jax.eval_shape(on_chunk, jax.tree.map(lambda x: x[0], head))
        init = {
            k: jnp.zeros(v.shape, v.dtype) for k, v in zeros.items() if stats[k].combine == "sum"
        }
        sums, stacked = jax.lax.scan(body, init, head)
        parts = {k: [v.reshape(-1, *v.shape[2:])] for k, v in stacked.items()}
    if rest:
        last = on_chunk(jax.tree.map(lambda x: x[n_full * chunk :], batch))
        sums = {k: v + last[k] for k, v in sums.items()}
        parts = {k: [*v, last[k]] for k, v in parts.items()}
    return {**sums, **{k: jnp.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}}


def projections(loss_fn: LossFn, params: PyTree, batch: PyTree, direction: PyTree) -> jax.Array:
    """pᵢ = ∇ℓᵢ · v for every sample, from one forward-mode pass along ``direction`` v.

    Exact and free of per-sample gradients: the JVP of the loss vector is J v.
    """
    return jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))[1]
