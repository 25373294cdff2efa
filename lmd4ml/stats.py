"""Shared per-sample statistics: the expensive parts that quantities build on.

Everything here is a pure, jittable function of a per-sample loss function ``loss_fn(params,
batch) -> (B,)``, the parameters and the batch. Quantities never call these directly: they
read them from :class:`lmd4ml.quantities.StepContext`, which builds each one at most once per
step and only when some quantity asks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


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


def chunk_size(params: PyTree, memory_budget: int, batch: int) -> int:
    """How many samples' gradients fit in ``memory_budget`` bytes (at least 1, at most ``batch``).

    Example:
      >>> chunk_size({"w": np.zeros((1000,), np.float32)}, memory_budget=40_000, batch=64)
      10
    """
    per_sample = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return int(min(batch, max(1, memory_budget // max(per_sample, 1))))


def per_sample_grads(loss_fn: LossFn, params: PyTree, batch: PyTree) -> PyTree:
    """Per-sample gradients ∇ℓᵢ with a leading axis of length B (materialises B×P).

    Each sample's loss is evaluated on a batch of one, so a model must treat samples
    independently (no batch-norm statistics in training mode).
    """

    def one(p: PyTree, sample: PyTree) -> jax.Array:
        return loss_fn(p, jax.tree.map(lambda x: x[None], sample))[0]

    return jax.vmap(jax.grad(one), in_axes=(None, 0))(params, batch)


def per_sample_pass(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    stats: Mapping[str, PerSample],
    chunk: int,
) -> dict[str, jax.Array]:
    """Every statistic in ``stats`` from one pass over the batch in chunks of ``chunk`` samples.

    Peak memory holds one chunk's per-sample gradients (``chunk`` × P), never B×P unless
    ``chunk`` = B. Full chunks run in a ``lax.scan``; a shorter last chunk runs once after it.
    """
    n = batch_size(batch)
    n_full, rest = divmod(n, chunk)

    def on_chunk(chunk_batch: PyTree) -> dict[str, jax.Array]:
        grads = per_sample_grads(loss_fn, params, chunk_batch)
        return {name: s.fn(grads, params) for name, s in stats.items()}

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


def bin_index(values: jax.Array, nbins: int, lo: float, hi: float) -> jax.Array:
    """Bin of each value over ``nbins`` equal bins on [lo, hi]; outliers clamp to the edge bins.

    NaN gets index ``nbins`` (out of range) so that a scatter with ``mode="drop"`` skips it.

    Example:
      >>> bin_index(jnp.array([-9.0, 0.0, 0.99, 1.0, jnp.nan]), 4, -1.0, 1.0).tolist()
      [0, 2, 3, 3, 4]
    """
    scaled = (jnp.clip(values, lo, hi) - lo) * (nbins / (hi - lo))
    index = jnp.minimum(jnp.floor(scaled).astype(jnp.int32), nbins - 1)
    return jnp.where(jnp.isnan(values), nbins, index)


def histogram(values: jax.Array, nbins: int, lo: float, hi: float) -> jax.Array:
    """Counts (int32) of ``values`` in ``nbins`` equal bins on [lo, hi], outliers clamped.

    A scatter-add of bin indices: ``jnp.histogram`` searches sorted edges and is about 25×
    slower on CPU for the sizes per-sample gradients reach.

    Example:
      >>> histogram(jnp.array([-0.3, 0.1, 0.2, 7.0]), 2, -1.0, 1.0).tolist()
      [1, 3]
    """
    index = bin_index(values.ravel(), nbins, lo, hi)
    return jnp.zeros(nbins, jnp.int32).at[index].add(1, mode="drop")


__all__ = [
    "SQ_NORMS",
    "PerSample",
    "batch_size",
    "bin_index",
    "chunk_size",
    "histogram",
    "per_sample_grads",
    "per_sample_pass",
    "projections",
]
