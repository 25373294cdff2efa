"""Shared per-sample statistics: the expensive parts that quantities build on.

Everything here is a pure, jittable function of a per-sample loss function ``loss_fn(params,
batch) -> (B,)``, the parameters and the batch. Quantities never call these directly: they
read them from :class:`lmd4ml.quantities.StepContext`, which builds each one at most once per
step and only when some quantity asks for it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmd4ml.stats import ghost, sharding
from lmd4ml.stats import jaxpr as jaxpr_tools
from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.histogram import Counts
from lmd4ml.stats.precision import cast_like, widen
from lmd4ml.stats.sharding import DataAxis


class PerSample(NamedTuple):
    """A statistic of the per-sample gradients ∇ℓᵢ, computed chunk by chunk.

    ``fn(grads, params)`` receives the per-sample gradients of one chunk (a pytree like
    ``params`` with a leading axis of the chunk's length) and returns an array, or
    :class:`~lmd4ml.stats.histogram.Counts` (summed exactly). ``combine`` says how chunks
    join: ``"concat"`` along axis 0 (one entry per sample) or ``"sum"``.
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

LOSSES, GRAD_SUM = "losses", "grad_sum"
"""Keys of what :func:`per_sample_pass` gives with ``linearize``: ℓᵢ and Σᵢ ∇ℓᵢ."""


def _add(a: PyTree, b: PyTree) -> PyTree:
    """Two chunks' sums added, leaf by leaf (:class:`Counts` exactly, as one leaf)."""
    return jax.tree.map(operator.add, a, b, is_leaf=lambda x: isinstance(x, Counts))


def _sq_grads(grads: PyTree, params: PyTree) -> jax.Array:
    del params
    return jnp.concatenate([jnp.sum(jnp.square(g), axis=0).ravel() for g in jax.tree.leaves(grads)])


SQ_GRADS = PerSample("sq_grads", _sq_grads, "sum")
"""Σᵢ(∇ℓᵢ)² per coordinate, raveled in ``jax.flatten_util.ravel_pytree`` order, shape (D,)."""


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


def leading_size(batch: PyTree) -> int | None:
    """The batch's number of samples: the leading dimension its arrays share, or None when
    they share none (or it has none).

    Example:
      >>> leading_size((np.zeros((8, 3)), np.zeros(8))), leading_size(np.zeros(()))
      (8, None)
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
    return sizes.pop() if len(sizes) == 1 else None


def sample_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """mean(values) over the samples, or with a sample ``mask`` (or 0/1 weights) over the
    real ones: Σᵢ mᵢxᵢ / Σᵢ mᵢ, padded values (NaN included) left out.

    Example:
      >>> sample_mean(jnp.array([1.0, 3.0, 9.0]), jnp.array([True, True, False])).item()
      2.0
    """
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(jnp.where(mask > 0, mask * values, 0)) / jnp.sum(mask)


def chunk_size(per_sample: PyTree, memory_budget: int, batch: int, extra_bytes: int = 0) -> int:
    """How many samples fit in ``memory_budget`` bytes when each holds arrays like ``per_sample``
    and ``extra_bytes`` more (at least 1, at most ``batch``); for full per-sample gradients,
    ``per_sample`` is the params.

    Example:
      >>> chunk_size({"w": np.zeros((1000,), np.float32)}, memory_budget=40_000, batch=64)
      10
    """
    nbytes = _nbytes(per_sample)
    return int(min(batch, max(1, memory_budget // max(nbytes + extra_bytes, 1))))


def _nbytes(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def backward_bytes(loss_fn: LossFn, params: PyTree, batch: PyTree) -> int:
    """Bytes that one more sample adds to what a backward pass keeps of its forward pass.

    Example:
      >>> loss = lambda w, x: jnp.tanh(x @ w).sum(axis=1)
      >>> w, x = jnp.ones((3, 100), jnp.float32), jnp.ones((8, 3), jnp.float32)
      >>> backward_bytes(loss, w, x)  # 4 bytes for each of x's 3 and tanh's 2 × 100 numbers
      812
    """

    def kept(n: int) -> int:
        part = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), batch)
        return _nbytes(
            jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss_fn(q, b), p)[1], params, part)
        )

    return max(kept(2) - kept(1), 0)


def activations_outweigh(loss_fn: LossFn, params: PyTree, batch: PyTree, floor: int = 0) -> bool:
    """Whether a backward pass over the whole ``batch`` keeps more bytes of its forward pass
    (B × :func:`backward_bytes`) than the parameters take, and than ``floor``.

    Example:
      >>> loss = lambda w, x: jnp.tanh(x @ w).sum(axis=1)
      >>> w = jnp.ones((3, 100), jnp.float32)  # 1,200 bytes; a sample keeps 812
      >>> [activations_outweigh(loss, w, jnp.ones((n, 3), jnp.float32)) for n in (8, 1)]
      [True, False]
    """
    activations = batch_size(batch) * backward_bytes(loss_fn, params, batch)
    return activations > max(_nbytes(params), floor)


# Per-sample gradients are formed from factors a tile at a time: tiles that fit in cache are
# fast, and a tile is a scan input, so XLA materialises the factors instead of fusing the
# computation of each cotangent into every element of the outer products built from it (3×
# slower on the MLP benchmark).
_GRADS_TILE_BYTES = 2**22


def _chunked(
    fn: Callable[[PyTree], dict[str, jax.Array]],
    xs: PyTree,
    chunk: int,
    combine: Mapping[str, Literal["concat", "sum"]],
) -> dict[str, jax.Array]:
    """``fn`` over ``xs`` (leading axis n) in chunks, outputs joined as ``combine`` says.

    Chunks hold at most ``chunk`` elements and are as equal as can be: full chunks run in a
    ``lax.scan`` (its body with :func:`~lmd4ml.stats.jaxpr.canonical_convolutions`), a
    shorter last chunk once after it.
    """
    n = batch_size(xs)
    # Equal chunks keep the work in the loop: 32 samples in chunks of 17 would run as two
    # calls outside it, which XLA may schedule to hold both at once (measured: 2.3× the
    # memory of the economy preset's step on the width-128 transformer).
    chunk = -(-n // -(-n // min(chunk, n)))
    n_full, rest = divmod(n, chunk)
    head = jax.tree.map(lambda x: x[: n_full * chunk].reshape(n_full, chunk, *x.shape[1:]), xs)

    def body(carry: dict, part: PyTree) -> tuple[dict, dict]:
        out = fn(part)
        sums = {k: _add(carry[k], out[k]) for k in carry}
        return sums, {k: v for k, v in out.items() if combine[k] == "concat"}

    if n_full == 1:
        first = fn(jax.tree.map(lambda x: x[0], head))
        sums = {k: v for k, v in first.items() if combine[k] == "sum"}
        parts = {k: [v] for k, v in first.items() if combine[k] == "concat"}
    else:
        shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], head))
        init = {
            k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)  # Counts are two arrays
            for k, v in shapes.items()
            if combine[k] == "sum"
        }
        sums, stacked = jax.lax.scan(jaxpr_tools.canonical_convolutions(body), init, head)
        parts = {k: [v.reshape(-1, *v.shape[2:])] for k, v in stacked.items()}
    if rest:
        last = fn(jax.tree.map(lambda x: x[n_full * chunk :], xs))
        sums = {k: _add(v, last[k]) for k, v in sums.items()}
        parts = {k: [*v, last[k]] for k, v in parts.items()}
    return {**sums, **{k: jnp.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}}


def per_sample_pass(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    stats: Mapping[str, PerSample],
    memory_budget: int,
    data: DataAxis | None = None,
    linearize: bool = False,
) -> dict[str, jax.Array]:
    """Every statistic in ``stats`` from one pass over the batch in chunks.

    Each chunk's factors and unfactored per-sample gradients (:mod:`lmd4ml.stats.ghost`)
    come from one batched backward pass, and a chunk holds as many samples as fit in
    ``memory_budget`` bytes of them and of the activations that pass keeps. Squared norms
    come from the factors directly; other statistics see full per-sample gradients, formed a
    cache-sized tile of samples at a time (never more than ``memory_budget`` bytes), so B×P
    is never held for large models.

    With ``linearize``, the pass also gives what a train step's own forward and backward
    pass would: the per-sample losses ℓᵢ under :data:`LOSSES` and Σᵢ ∇ℓᵢ (a pytree like
    ``params``) under :data:`GRAD_SUM`, from the same backward pass
    (:func:`lmd4ml.stats.ghost.grad_sum`), so that a step with per-sample statistics needs
    no other.

    With ``data``, each device makes this pass over its own samples, within its own
    ``memory_budget`` (:func:`lmd4ml.stats.sharding.over_samples`).
    """
    combine = {name: s.combine for name, s in stats.items()}
    if linearize:
        combine |= {LOSSES: "concat", GRAD_SUM: "sum"}
    if data is not None:
        local = partial(
            per_sample_pass, loss_fn, stats=stats, memory_budget=memory_budget, linearize=linearize
        )
        return sharding.over_samples(local, combine, data)(params, batch)
    reductions = {name: s for name, s in stats.items() if name != SQ_NORMS.name}
    footprint = ghost.sq_norm_footprint(params, ghost.analyse(loss_fn, params, batch))
    # The chunk's backward pass keeps its activations beside the factors.
    activations = backward_bytes(loss_fn, params, batch)
    chunk = chunk_size(footprint, memory_budget, batch_size(batch), activations)
    tile = chunk_size(params, min(memory_budget, _GRADS_TILE_BYTES), chunk)

    def on_chunk(chunk_batch: PyTree) -> dict[str, jax.Array]:
        f = ghost.factors(loss_fn, params, chunk_batch)
        out = {SQ_NORMS.name: ghost.sq_norms(f)} if SQ_NORMS.name in stats else {}
        if linearize:
            out |= {LOSSES: f.losses, GRAD_SUM: ghost.grad_sum(f, params)}

        def on_tile(arrays: tuple) -> dict[str, jax.Array]:
            inputs, cotangents, grads = arrays
            tile_grads = widen(
                ghost.grads(f._replace(inputs=inputs, cotangents=cotangents, grads=grads), params)
            )
            return {name: s.fn(tile_grads, params) for name, s in reductions.items()}

        if reductions:
            out.update(_chunked(on_tile, (f.inputs, f.cotangents, f.grads), tile, combine))
        return out

    return _chunked(on_chunk, batch, chunk, combine)


def directional(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    direction: PyTree,
    after: PyTree = (),
    memory_budget: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """ℓᵢ and ∇ℓᵢ · v for every sample, from one forward-mode pass along ``direction`` v.

    Exact and free of per-sample gradients: the JVP of the loss vector is J v. Both come
    back in float32 or wider, whatever the dtypes of ``params`` (:mod:`.precision`).

    The pass recomputes the batch's activations where those that the step's own forward pass
    keeps outweigh both the parameters and ``memory_budget`` (below); it then also waits for
    ``after``, an earlier pass's slopes, say, so that such passes run one after another.

    Example:
      >>> import jax.numpy as jnp
      >>> losses, slopes = directional(lambda w, x: x * w, jnp.array(2.0), jnp.arange(3.0),
      ...                              jnp.array(1.0))
      >>> losses.tolist(), slopes.tolist()
      ([0.0, 2.0, 4.0], [0.0, 1.0, 2.0])
    """
    # XLA shares this pass's primal values with the step's own forward pass at the same
    # params, where the step has one (with per-sample statistics its gradient comes from
    # the per-sample pass instead, whose forward is per sample, and this pass makes its own).
    # That keeps the forward's activations alive until the direction is known, and
    # lets the terms of the direction's leaves be taken as the backward pass yields them, so
    # the direction is never held whole: right when activations are the smaller (an MLP).
    # Where they are the larger (a transformer), and more than the budget allows, a zero
    # taken from the direction makes the values distinct: the pass starts once the direction
    # exists and recomputes them (10–25% more time on the transformer and 3c3d benchmarks).
    if activations_outweigh(loss_fn, params, batch, memory_budget):
        firsts = [jnp.real(x.ravel()[0]) for x in jax.tree.leaves((direction, after))]
        zero = 0 * jnp.nan_to_num(sum(firsts))
        params, batch = _distinct(loss_fn, params, batch, zero)
    tangent = cast_like(direction, params)
    return widen(jax.jvp(lambda p: loss_fn(p, batch), (params,), (tangent,)))


def entry_leaves(loss_fn: LossFn, params: PyTree, batch: PyTree) -> set[int]:
    """Flat indices of the parameter leaves that meet the batch first: an equation of the
    loss takes them (or values made from them alone) together with values made from the
    batch alone. Every value that depends on both depends on one of these. All leaves when
    none is found.

    Example:
      >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": jnp.ones(4)}
      >>> loss = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> sorted(entry_leaves(loss, params, jnp.ones((2, 3))))  # w1 (flat order: b1, w1, w2)
      [1]
    """
    closed = jax.make_jaxpr(loss_fn)(params, batch)
    n_params = len(jax.tree.leaves(params))
    found: set[int] = set()
    data = frozenset({"data"})

    def rule(eqn: Any, ins: list) -> list:
        # A tag is the set of leaves a value is made from alone, ``data`` for the batch's
        # values, or None for values made from both (or from constants only: empty).
        meets = any(t == data for t in ins) and any(t and t != data for t in ins)
        if meets:
            found.update(k for t in ins if t and t != data for k in t)
        if meets or None in ins:
            tag = None
        elif any(t == data for t in ins):
            tag = data
        else:
            tag = frozenset().union(*ins)
        return [tag] * len(eqn.outvars)

    n_data = len(closed.jaxpr.invars) - n_params
    tags = [frozenset({k}) for k in range(n_params)] + [data] * n_data
    jaxpr_tools.propagate(closed.jaxpr, tags, rule, frozenset())
    return found or set(range(n_params))


def _distinct(
    loss_fn: LossFn, params: PyTree, batch: PyTree, zero: jax.Array
) -> tuple[PyTree, PyTree]:
    """``params`` and ``batch`` with ``zero`` added where it changes every value that depends
    on both, at the least cost: to a float batch, or to :func:`entry_leaves`."""
    leaves, treedef = jax.tree.flatten(params)
    entry = entry_leaves(loss_fn, params, batch)
    data = jax.tree.leaves(batch)
    floating = all(jnp.issubdtype(x.dtype, jnp.floating) for x in data)
    if floating and _nbytes([leaves[k] for k in entry]) > _nbytes(data):
        return params, jax.tree.map(lambda x: x + zero.astype(x.dtype), batch)
    leaves = [x + zero.astype(x.dtype) if k in entry else x for k, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves), batch
