"""The generalised Gauss-Newton matrix of a model and a loss on its outputs.

For a per-sample loss ℓᵢ(θ) = ℓ(f(θ, xᵢ), yᵢ), split into a model f (outputs fᵢ) and an output
loss ℓ, the Hessian of the mean loss L is

    ∇²L = (1/B) Σᵢ Jᵢᵀ Hᵢ Jᵢ  +  (1/B) Σᵢ Σₖ (∂ℓ/∂fᵢₖ) ∇²fᵢₖ,

with Jᵢ = ∂fᵢ/∂θ and Hᵢ = ∇²_f ℓ. The first term is the generalised Gauss-Newton matrix G
(Schraudolph 2002). With Hᵢ = Σ_c sᵢ_c sᵢ_cᵀ (a square root, :class:`OutputCurvature`),
diag(G) = (1/B) Σᵢ Σ_c (Jᵢᵀ sᵢ_c)²: squared per-sample, per-direction gradients of the
pseudo-losses sᵢ_cᵀ fᵢ (BackPACK's ``DiagGGNExact``). With one random sᵢ per sample,
E[sᵢ sᵢᵀ] = Hᵢ, the same formula is an unbiased Monte-Carlo estimate (``DiagGGNMC``).

The second term vanishes on G's diagonal blocks wherever f is piecewise linear in each
parameter leaf alone (dense and convolution layers, ReLU, max-pooling: :func:`piecewise_linear`),
so there diag(G) = diag(∇²L) almost everywhere; the cross-layer blocks still differ.

:func:`diag` makes one pass over the batch in chunks, with the per-sample machinery of
:mod:`~lmd4ml.stats.ghost`: one forward pass per sample, its backward pass batched over the
directions, and for a dense layer that sees one position per sample no per-sample weight
gradient at all, Σᵢ (aᵢ ⊙ aᵢ) ⊗ Σ_c (δᵢ_c ⊙ δᵢ_c).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import primitives

from lmd4ml.stats import ghost, sharding
from lmd4ml.stats import jaxpr as jaxpr_tools
from lmd4ml.stats._types import PyTree
from lmd4ml.stats.per_sample import _chunked, _nbytes, backward_bytes, batch_size, chunk_size
from lmd4ml.stats.precision import widen
from lmd4ml.stats.sharding import DataAxis

Forward = Callable[[PyTree, PyTree], jax.Array]
"""``forward(params, inputs) -> outputs``, shape (B, ...): the model on a batch."""


class OutputCurvature(NamedTuple):
    """How one sample's loss curves in the model's outputs f.

    ``sqrt(f, y)`` gives S, rows s_c shaped like f, with Σ_c s_c s_cᵀ = ∇²_f ℓ(f, y);
    ``sample(f, y, key)`` gives one s with E[s sᵀ] = ∇²_f ℓ(f, y); ``directions(shape)`` is
    the number of rows of S for outputs of that (per-sample) shape. ``closed_form``: whether
    S is exact by formula (else from ``jax.hessian`` and ``eigh``).
    """

    name: str
    sqrt: Callable[[jax.Array, Any], jax.Array]
    sample: Callable[[jax.Array, Any, jax.Array], jax.Array]
    directions: Callable[[tuple[int, ...]], int]
    closed_form: bool = True


def _softmax_sqrt(f: jax.Array, weight: jax.Array) -> jax.Array:
    """C − 1 rows of a square root of weight · (diag p − p pᵀ) at every position of f (..., C),
    p = softmax(f), zero at the other positions.

    With q = √p (a unit vector), diag p − ppᵀ = D (I − qqᵀ) D, D = diag q. The Householder
    reflection R = I − 2uuᵀ/‖u‖², u = q − e_k, maps e_k to q, so its other C − 1 columns are
    an orthonormal basis of q⊥ and sum (as rank-one terms) to I − qqᵀ: the rows are
    √w q ⊙ R e_j, j ≠ k (one fewer than the C rows √(w p_c)(e_c − p), and so one fewer
    backward pass per sample). k = argmin q keeps ‖u‖² = 2(1 − q_k) ≥ 2 − 2/√C away from 0.
    """
    classes = f.shape[-1]
    p = jax.nn.softmax(f.reshape(-1, classes).astype(jnp.promote_types(f.dtype, jnp.float32)))
    n = p.shape[0]
    if classes == 1:  # one class: the loss is constant
        return jnp.zeros((n, *f.shape), p.dtype)
    q = jnp.sqrt(p)
    k = jnp.argmin(q, axis=-1)
    u = q - jax.nn.one_hot(k, classes, dtype=q.dtype)
    reflection = jnp.eye(classes, dtype=q.dtype) - 2 * (
        u[:, :, None] * u[:, None, :] / jnp.sum(u * u, axis=-1)[:, None, None]
    )
    kept = jnp.arange(classes - 1)[None, :] + (jnp.arange(classes - 1)[None, :] >= k[:, None])
    columns = jnp.take_along_axis(reflection, kept[:, :, None], axis=1)  # R symmetric
    w = jnp.reshape(weight, (-1, 1, 1))
    blocks = jnp.sqrt(w) * q[:, None, :] * columns  # (n, C − 1, C)
    rows = jnp.einsum("tu,tcd->tcud", jnp.eye(n, dtype=p.dtype), blocks)
    return rows.reshape(n * (classes - 1), *f.shape)


def _softmax_directions(shape: tuple[int, ...]) -> int:
    """C − 1 directions at each position of outputs shaped (..., C) (one for C = 1)."""
    return math.prod(shape[:-1]) * max(shape[-1] - 1, 1)


def _softmax_sample(f: jax.Array, weight: jax.Array, key: jax.Array) -> jax.Array:
    """√w (p − e_ŷ) with ŷ ~ softmax(f) at every position: E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag p − ppᵀ
    (the gradient of the loss at a label drawn from the model, as BackPACK's MC)."""
    p = jax.nn.softmax(f.astype(jnp.promote_types(f.dtype, jnp.float32)), axis=-1)
    drawn = jax.random.categorical(key, jnp.log(p), axis=-1)
    s = p - jax.nn.one_hot(drawn, f.shape[-1], dtype=p.dtype)
    return jnp.sqrt(jnp.asarray(weight, p.dtype))[..., None] * s


def _mean_scale(f: jax.Array, per_entry: int) -> float:
    """1/M for a per-sample loss that is the mean of M = (entries of f) / per_entry values."""
    return per_entry / f.size


def _softmax(name: str, weight: Callable[[jax.Array, Any], jax.Array]) -> OutputCurvature:
    """A softmax cross-entropy whose Hessian at each position is w · (diag p − ppᵀ), w from
    ``weight(f, y)`` (shape f.shape[:-1])."""

    def sqrt(f: jax.Array, y: Any) -> jax.Array:
        return _softmax_sqrt(f, weight(f, y))

    def sample(f: jax.Array, y: Any, key: jax.Array) -> jax.Array:
        return _softmax_sample(f, weight(f, y), key)

    return OutputCurvature(name, sqrt, sample, _softmax_directions)


def _integer_labels() -> OutputCurvature:
    def weight(f: jax.Array, y: Any) -> jax.Array:
        return jnp.full(f.shape[:-1], _mean_scale(f, f.shape[-1]))

    return _softmax("softmax_cross_entropy_with_integer_labels", weight)


def _label_distributions() -> OutputCurvature:
    # −Σ_c y_c log softmax(f)_c has Hessian (Σ_c y_c)(diag p − ppᵀ): one-hot labels weigh 1.
    def weight(f: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum(y, axis=-1) * _mean_scale(f, f.shape[-1])

    return _softmax("softmax_cross_entropy", weight)


def _squares(name: str, curvature: float) -> OutputCurvature:
    # mean over M entries of c·(f − y)²/2·2: the Hessian is (curvature/M)·I.
    def scale(f: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.asarray(curvature / f.size, jnp.promote_types(f.dtype, jnp.float32)))

    def sqrt(f: jax.Array, y: Any) -> jax.Array:
        eye = jnp.eye(f.size, dtype=scale(f).dtype)
        return scale(f) * eye.reshape(f.size, *f.shape)

    def sample(f: jax.Array, y: Any, key: jax.Array) -> jax.Array:
        return scale(f) * jax.random.rademacher(key, f.shape, scale(f).dtype)

    return OutputCurvature(name, sqrt, sample, math.prod)


CLOSED_FORMS: dict[Callable, Callable[[], OutputCurvature]] = {
    optax.losses.softmax_cross_entropy_with_integer_labels: _integer_labels,
    optax.losses.softmax_cross_entropy: _label_distributions,
    optax.losses.squared_error: lambda: _squares("squared_error", 2.0),
    optax.losses.l2_loss: lambda: _squares("l2_loss", 1.0),
}
"""Output losses whose Hessian square root is known in closed form, by identity."""


def _psd_warning(min_eig: Any, max_eig: Any) -> None:
    warnings.warn(
        f"the output loss's Hessian ∇²_f ℓ has a negative eigenvalue ({float(min_eig):.3g}, "
        f"largest {float(max_eig):.3g}): the output loss is not convex in the outputs here, and "
        "the GGN uses its positive part (the negative eigenvalues clipped to 0)",
        stacklevel=2,
    )


def from_hessian(per_sample_loss: Callable[[jax.Array, Any], jax.Array]) -> OutputCurvature:
    """The curvature of any output loss ``per_sample_loss(f, y) -> scalar``, from its (M×M)
    Hessian in f by ``eigh``: S = (V √λ₊)ᵀ. A Hessian that is not positive semi-definite is
    clipped to its positive part (so G stays PSD), with one warning.

    Example:
      >>> import jax.numpy as jnp
      >>> c = from_hessian(lambda f, y: jnp.sum((f - y) ** 4))  # ∇² = diag(12 (f − y)²)
      >>> s = c.sqrt(jnp.array([1.0, 2.0]), jnp.zeros(2))
      >>> (s.T @ s).round(4).tolist()
      [[12.0, 0.0], [0.0, 48.0]]
    """
    warned: list[bool] = []

    def warn_once(min_eig: Any, max_eig: Any) -> None:
        min_eig, max_eig = np.min(min_eig), np.max(max_eig)
        if min_eig < -1e-6 * max(max_eig, 0.0) - 1e-30 and not warned:
            warned.append(True)
            _psd_warning(min_eig, max_eig)

    def sqrt(f: jax.Array, y: Any) -> jax.Array:
        wide = f.astype(jnp.promote_types(f.dtype, jnp.float32))
        flat_loss = lambda v: per_sample_loss(v.reshape(f.shape), y)  # noqa: E731
        hess = jax.hessian(flat_loss)(wide.ravel())
        values, vectors = jnp.linalg.eigh((hess + hess.T) / 2)
        jax.debug.callback(warn_once, values[0], values[-1])
        rows = (vectors * jnp.sqrt(jnp.maximum(values, 0))).T
        return rows.reshape(f.size, *f.shape)

    def sample(f: jax.Array, y: Any, key: jax.Array) -> jax.Array:
        rows = sqrt(f, y)
        z = jax.random.rademacher(key, (rows.shape[0],), rows.dtype)
        return jnp.tensordot(z, rows, 1)

    return OutputCurvature("hessian", sqrt, sample, math.prod, closed_form=False)


class Split(NamedTuple):
    """A loss split into a model and a loss on its outputs, bound to one step's batch."""

    forward: Forward  # the model's outputs on (a chunk of) ``inputs``, shape (B, ...)
    inputs: PyTree  # the batch as ``forward`` takes it
    curvature: OutputCurvature  # how the output loss curves in the outputs
    targets: Callable[[PyTree], PyTree]  # one sample of ``inputs`` -> its targets


# --- where the GGN is the Hessian -----------------------------------------------------------

_PIECEWISE_LINEAR = frozenset(
    {
        "add",
        "add_any",
        "sub",
        "neg",
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "concatenate",
        "pad",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "max",
        "min",
        "abs",
        "select_n",
        "convert_element_type",
        "copy",
        "copy_p",
        "gather",
        "scatter-add",
        "scatter_add",
        "rev",
        "cumsum",
        "cummax",
        "cummin",
        "reduce_precision",
        "clamp",
        "reduce_window_sum",
        "reduce_window_max",
        "reduce_window_min",
        "psum",
        "all_gather",
        "pbroadcast",
    }
)
"""Primitives (by name) piecewise linear in all their float inputs together (their second
derivative is zero almost everywhere): sums, moves, selections, max and min."""

_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
"""Primitives linear in each operand: quadratic only in what both operands depend on."""


class _Degree(NamedTuple):
    """Which leaves a value depends on, and on which of them not piecewise linearly."""

    leaves: frozenset
    curved: frozenset


_CONSTANT = _Degree(frozenset(), frozenset())


def _degree_rule(eqn: Any, ins: list[_Degree]) -> list[_Degree]:
    constant = all(not jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars)
    if constant or eqn.primitive.name == "stop_gradient":
        return [_CONSTANT] * len(eqn.outvars)  # integers, booleans: piecewise constant
    leaves = frozenset().union(*(d.leaves for d in ins))
    curved = frozenset().union(*(d.curved for d in ins))
    name = eqn.primitive.name
    if name in _PIECEWISE_LINEAR:
        pass
    elif name in _BILINEAR:
        curved = curved | (ins[0].leaves & ins[1].leaves)
    elif name == "div":
        curved = curved | ins[1].leaves
    else:
        curved = leaves
    return [_Degree(leaves, curved)] * len(eqn.outvars)


def piecewise_linear(forward: Forward, params: PyTree, inputs: PyTree) -> bool:
    """Whether the model's outputs are piecewise linear in each parameter leaf alone (the
    others held), read from ``forward``'s jaxpr: then its second derivatives within each leaf
    vanish almost everywhere, and the GGN's diagonal blocks are the Hessian's.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
      >>> relu_net = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
      >>> tanh_net = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> x = jnp.ones((5, 3))
      >>> piecewise_linear(relu_net, params, x), piecewise_linear(tanh_net, params, x)
      (True, False)
    """
    closed = jax.make_jaxpr(forward)(params, inputs)
    n = len(jax.tree.leaves(params))
    n_inputs = len(closed.jaxpr.invars) - n
    tags = [_Degree(frozenset({k}), frozenset()) for k in range(n)] + [_CONSTANT] * n_inputs
    outs = jaxpr_tools.propagate(closed.jaxpr, tags, _degree_rule, _CONSTANT)
    return all(not d.curved for d in outs)


# --- the pass -------------------------------------------------------------------------------

Curvature = Callable[[jax.Array, PyTree, jax.Array], jax.Array]
"""``curvature(f, sample, key) -> S``: one sample's directions (rows shaped like its outputs
f), from its outputs, its inputs (one sample of the pass's ``inputs``) and a PRNG key."""


def _one_position(product: ghost.Product) -> bool:
    """A plain dense product that sees one position per sample (its other operand's free
    axes hold one element): its per-sample gradient is an outer product a ⊗ δ, whose square
    is a² ⊗ δ²."""
    if product.primitive is not primitives.dot_general_p:
        return False
    (contract_lhs, contract_rhs), _ = product.params["dimension_numbers"]
    contract = contract_rhs if product.param_is_lhs else contract_lhs
    shape = product.other.shape
    return math.prod(shape[d] for d in range(len(shape)) if d not in contract) == 1


def _from_matrix(matrix: jax.Array, product: ghost.Product) -> jax.Array:
    """A (contracted features × output features) matrix, as :func:`ghost.as_matrices` orders
    them, in the shape of the product's parameter leaf."""
    (contract_lhs, contract_rhs), _ = product.params["dimension_numbers"]
    contract = contract_lhs if product.param_is_lhs else contract_rhs
    shape = product.param_shape
    order = [*contract, *(d for d in range(len(shape)) if d not in contract)]
    return matrix.reshape([shape[d] for d in order]).transpose(np.argsort(order))


def diag(
    forward: Forward,
    curvature: Curvature,
    params: PyTree,
    inputs: PyTree,
    directions: int,
    weights: jax.Array | None = None,
    keys: jax.Array | None = None,
    memory_budget: int = 2**26,
    data: DataAxis | None = None,
) -> PyTree:
    """Σᵢ wᵢ Σ_c (Jᵢᵀ sᵢ_c)², a pytree like ``params`` (float32 or wider): B times diag(G)
    for the directions ``curvature`` gives (``directions`` rows per sample).

    ``weights`` (B,) scale each sample's directions by √wᵢ (a sample mask: padded samples
    count for nothing); ``keys`` (B, 2) raw PRNG key data, one per sample, for a Monte-Carlo
    ``curvature``. Samples go in chunks that fit ``memory_budget`` bytes; with ``data``, each
    device goes through its own samples and the sums are added across devices.

    Example:
      >>> import jax.numpy as jnp
      >>> forward = lambda w, x: x @ w  # one output, ℓ = (f − y)²: H = 2, G = 2 Σᵢ xᵢxᵢᵀ
      >>> rows = lambda f, sample, key: jnp.sqrt(2.0) * jnp.ones((1, *f.shape))
      >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
      >>> diag(forward, rows, jnp.zeros((2, 1)), x, directions=1).ravel().round(4).tolist()
      [20.0, 8.0]
    """
    n = batch_size(inputs)
    weights = jnp.ones(n) if weights is None else weights
    keys = jnp.zeros((n, 2), jnp.uint32) if keys is None else keys
    xs = (inputs, weights, keys)
    if data is not None:
        local = partial(
            _local_diag, forward, curvature, directions=directions, memory_budget=memory_budget
        )
        return sharding.over_samples(lambda p, b: {"diag": local(p, b)}, {"diag": "sum"}, data)(
            params, xs
        )["diag"]
    return _local_diag(forward, curvature, params, xs, directions, memory_budget)


def _local_diag(
    forward: Forward,
    curvature: Curvature,
    params: PyTree,
    xs: tuple,
    directions: int,
    memory_budget: int,
) -> PyTree:
    inputs = xs[0]
    leaves, treedef = jax.tree.flatten(params)
    closed = ghost.single_sample_jaxpr(forward, params, inputs)
    # Every convolution's kernel is factored: its per-sample, per-direction gradients are then
    # products of patches and cotangents (a batched matmul) instead of a convolution grouped
    # by sample and direction, which XLA runs slowly.
    products = ghost.find_products(closed, len(leaves), every_conv=True)
    cheap = {k for k, p in products.items() if _one_position(p)}
    convs = {k for k, p in products.items() if p.primitive is primitives.conv_general_dilated_p}
    rest = [k for k in range(len(leaves)) if k not in products]
    # Per sample: each direction's gradient of the unfactored leaves and of factored leaves
    # with several positions, and each direction's cotangent of every factored product.
    held = [leaves[k] for k in range(len(leaves)) if k not in cheap]
    held += [p.out for p in products.values()]
    extra = (directions - 1) * _nbytes(held) + backward_bytes(forward, params, inputs)
    chunk = chunk_size(held, memory_budget, batch_size(inputs), extra)
    fn = ghost.tapped(closed, leaves, products)
    taps = ghost.zero_taps(products)

    def one(sample: tuple) -> tuple[dict, dict]:
        sample_inputs, weight, key = sample
        sample_leaves = jax.tree.leaves(sample_inputs)
        f, pullback, factors = jax.vjp(
            lambda r, t: fn(r, t, sample_leaves), [leaves[k] for k in rest], taps, has_aux=True
        )
        rows = curvature(f, sample_inputs, jax.random.wrap_key_data(key))
        rows = rows * jnp.sqrt(weight).astype(rows.dtype)
        rest_grads, cotangents = jax.vmap(pullback)(rows.astype(f.dtype))
        squares = {
            k: jnp.sum(jnp.square(widen(g)), axis=0) for k, g in zip(rest, rest_grads, strict=True)
        }
        for k in products.keys() - cheap - convs:
            grad = partial(ghost.leaf_grad, factors[k], leaf=leaves[k], product=products[k])
            squares[k] = jnp.sum(jnp.square(widen(jax.vmap(grad)(cotangents[k]))), axis=0)
        for k in convs:  # Σ_c (PᵀΔ_c)², P the sample's patches, once for every direction
            patches = widen(ghost.conv_patches(factors[k], products[k]))
            deltas = jax.vmap(partial(ghost.by_position, product=products[k]))(cotangents[k])
            grads = jnp.einsum("tp,cto->cpo", patches, widen(deltas))
            squares[k] = ghost.conv_kernel(jnp.sum(jnp.square(grads), axis=0), products[k])
        outer = {}  # a² and Σ_c δ_c², whose outer product is Σ_c (a ⊗ δ_c)²
        for k in cheap:
            x = ghost.as_matrices(factors[k], cotangents[k][0], products[k])[0][0]
            as_rows = partial(ghost.as_matrices, factors[k], product=products[k])
            deltas = jax.vmap(lambda d, f=as_rows: f(d)[1][0])(cotangents[k])
            outer[k] = (jnp.square(widen(x)), jnp.sum(jnp.square(widen(deltas)), axis=0))
        return squares, outer

    def on_chunk(part: tuple) -> dict[str, jax.Array]:
        squares, outer = jax.vmap(one)(part)
        out = {str(k): jnp.sum(v, axis=0) for k, v in squares.items()}
        for k, (x, d) in outer.items():
            out[str(k)] = _from_matrix(x.T @ d, products[k])
        return out

    combine = {str(k): "sum" for k in range(len(leaves))}
    sums = _chunked(on_chunk, xs, chunk, combine)
    return jax.tree.unflatten(treedef, [sums[str(k)] for k in range(len(leaves))])
