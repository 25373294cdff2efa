"""Per-sample gradients of dense parameters as factors, from one batched backward pass.

A parameter W that the model uses once, as an operand of a ``dot_general`` y = x·W (a dense
layer, an attention projection, an einsum without batch axes), has the per-sample gradient
∇W ℓᵢ = XᵢᵀΔᵢ: Xᵢ is sample i's other operand and Δᵢ = ∂ℓᵢ/∂yᵢ the cotangent of the
product, each flattened to (positions, features). Its squared norm
‖XᵢᵀΔᵢ‖² = Σₜₜ′ (XᵢXᵢᵀ)ₜₜ′(ΔᵢΔᵢᵀ)ₜₜ′ needs neither the gradient itself nor per-sample
weight gradients ("ghost norms", Goodfellow 2015; Li et al. 2022).

An embedding table E (V rows) that the model uses once, as the operand of a row lookup
y = E[idx] (``jnp.take``, ``E[idx]``, flax's ``Embed``), has the per-sample gradient
∇E ℓᵢ = Σₜ e_{idxₜ}Δₜᵀ, and ‖∇E ℓᵢ‖² = Σₜₜ′ [idxₜ = idxₜ′] (ΔᵢΔᵢᵀ)ₜₜ′: the same form, with
the indices' equality matrix in place of XᵢXᵢᵀ, and positions × width instead of V × width
per sample. It is used when a sample looks up fewer positions than the table has rows.

A convolution kernel K (``conv_general_dilated``, flax's ``Conv``) has ∇K ℓᵢ = PᵢᵀΔᵢ, Pᵢ
sample i's input patches (output positions × patch size) and Δᵢ the output's cotangent, so
the same Gram form applies. It is used where it is the smaller: positions × (patch size +
output channels) at most patch size × output channels, as in the deep layers of image
models (7 × 7 positions, 3 × 3 × 512 patches, 512 channels: 25,000 numbers per sample
instead of 2.4 M); early layers with many positions keep plain per-sample gradients.

No model code is needed: the single-sample loss is traced to a jaxpr, calls to ``jax.jit``
functions are inlined, and each parameter leaf whose only use is such a product gets a zero
"tap" added to the product's output. One ``vmap`` of ``grad`` with respect to the taps gives
every Δᵢ. Leaves used any other way (biases, convolutions, normalisation scales) get plain
per-sample gradients from the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.extend.core import primitives

from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.jaxpr import bind_argmax_pool, walk
from lmd4ml.stats.precision import widen


class Product(NamedTuple):
    """How a factored leaf enters the model: one ``dot_general`` with the leaf as one operand,
    one row lookup (``gather``) with the leaf as the table, or one convolution with the leaf
    as the kernel."""

    param_is_lhs: bool
    params: dict[str, Any]  # the primitive's own parameters (dimension numbers, precision)
    out: jax.ShapeDtypeStruct  # the product's per-sample shape
    other: jax.ShapeDtypeStruct  # the other operand's per-sample shape (indices for a lookup)
    operand_dtype: Any  # the leaf's dtype inside the product (after any cast)
    primitive: Any = primitives.dot_general_p
    param_shape: tuple[int, ...] = ()  # the leaf's shape inside the product


class Factors(NamedTuple):
    """One chunk's per-sample gradient information, each array with a leading sample axis.

    ``inputs[k]`` and ``cotangents[k]`` are Xᵢ and Δᵢ for factored leaf k; ``grads[k]`` is the
    plain per-sample gradient of every other leaf k; ``losses`` the per-sample losses ℓᵢ
    that the same pass evaluated.
    """

    products: dict[int, Product]
    inputs: dict[int, jax.Array]
    cotangents: dict[int, jax.Array]
    grads: dict[int, jax.Array]
    losses: jax.Array | None = None


def single_sample_jaxpr(loss_fn: LossFn, params: PyTree, batch: PyTree) -> core.ClosedJaxpr:
    """``loss_fn`` on one sample of ``batch`` (its first output entry), as a jaxpr of the
    parameter leaves and the sample's leaves."""

    def single(p: PyTree, sample: PyTree) -> jax.Array:
        return loss_fn(p, jax.tree.map(lambda x: x[None], sample))[0]

    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    return jax.make_jaxpr(single)(params, sample)


def find_products(
    closed: core.ClosedJaxpr, n_leaves: int, every_conv: bool = False
) -> dict[int, Product]:
    """The leaves used exactly once, as one operand of a ``dot_general`` without batch axes,
    as the table of a row lookup, or as the kernel of an ungrouped convolution where its
    factors are the smaller (every such convolution with ``every_conv``)."""
    uses: dict[int, list] = {k: [] for k in range(n_leaves)}

    def count(eqn: Any, inputs: list, in_origins: list, outputs: list) -> list:
        for position, k in enumerate(in_origins):
            if k is not None:
                uses[k].append((eqn, position, in_origins))
        return outputs

    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    origins = [*range(n_leaves), *[None] * (len(args) - n_leaves)]
    jax.eval_shape(lambda *a: walk(closed, a, origins, count), *args)
    products = {}
    for k, found in uses.items():
        if len(found) != 1:
            continue
        eqn, position, in_origins = found[0]
        kind_ok = (
            _is_plain_product(eqn)
            or (position == 0 and _is_row_lookup(eqn))
            or (position == 1 and _is_conv(eqn) and (every_conv or _is_small_conv(eqn)))
        )
        if not kind_ok or in_origins[1 - position] is not None:
            continue
        out = eqn.outvars[0].aval
        shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
        dtype = eqn.invars[position].aval.dtype
        x = eqn.invars[1 - position].aval
        other = jax.ShapeDtypeStruct(x.shape, x.dtype)
        param_shape = tuple(eqn.invars[position].aval.shape)
        products[k] = Product(
            position == 0, dict(eqn.params), shape, other, dtype, eqn.primitive, param_shape
        )
    return products


def _is_plain_product(eqn: Any) -> bool:
    """A ``dot_general`` without batch axes."""
    if eqn.primitive is not primitives.dot_general_p:
        return False
    _, (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    return not batch_lhs and not batch_rhs


def _is_row_lookup(eqn: Any) -> bool:
    """A ``gather`` of whole rows of a 2-D table by one index per position, looking up
    fewer positions than the table has rows (else its plain gradient is the smaller)."""
    if eqn.primitive is not primitives.gather_p or len(eqn.invars) != 2:
        return False
    table, indices = (v.aval for v in eqn.invars)
    dims = eqn.params["dimension_numbers"]
    out_ndim = eqn.outvars[0].aval.ndim
    return (
        table.ndim == 2
        and indices.shape[-1:] == (1,)
        and tuple(dims.offset_dims) == (out_ndim - 1,)
        and tuple(dims.collapsed_slice_dims) == (0,)
        and tuple(dims.start_index_map) == (0,)
        and not dims.operand_batching_dims
        and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
        and math.prod(indices.shape[:-1]) < table.shape[0]
    )


def _is_conv(eqn: Any) -> bool:
    """An ungrouped convolution."""
    if eqn.primitive is not primitives.conv_general_dilated_p:
        return False
    return eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1


def _is_small_conv(eqn: Any) -> bool:
    """A convolution whose per-sample patches and cotangents are smaller than its kernel
    (positions × (patch size + output channels) ≤ patch size × output channels)."""
    params = eqn.params
    kernel = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    channels = kernel[params["dimension_numbers"].rhs_spec[0]]
    patch = math.prod(kernel) // channels
    positions = math.prod(out) // channels
    return positions * (patch + channels) <= patch * channels


def analyse(loss_fn: LossFn, params: PyTree, batch: PyTree) -> dict[int, Product]:
    """Which parameter leaves (by flat index) are factored, and through which product."""
    closed = single_sample_jaxpr(loss_fn, params, batch)
    return find_products(closed, len(jax.tree.leaves(params)))


def sq_norm_footprint(params: PyTree, products: dict[int, Product]) -> list:
    """One sample's arrays that per-sample squared norms hold beside the backward pass's
    activations: unfactored leaves' gradients and factored leaves' cotangents Δᵢ (the inputs
    Xᵢ are activations the pass keeps anyway)."""
    leaves = jax.tree.leaves(params)
    rest = [leaf for k, leaf in enumerate(leaves) if k not in products]
    return [*rest, *(p.out for p in products.values())]


def factored_leaves(loss_fn: LossFn, params: PyTree, batch: PyTree) -> list[str]:
    """Paths of the parameter leaves whose per-sample norms come from factors (ghost norms).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> loss = lambda p, batch: jnp.sum(batch @ p["w"] + p["b"], axis=1)
      >>> factored_leaves(loss, params, jnp.ones((4, 3)))
      ["['w']"]
    """
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return [paths[k] for k in sorted(analyse(loss_fn, params, batch))]


def _plain_grads(loss_fn: LossFn, params: PyTree, batch: PyTree) -> tuple[jax.Array, PyTree]:
    """Per-sample losses and gradients by ``vmap`` of ``value_and_grad`` of the loss on a
    batch of one sample."""

    def one(p: PyTree, sample: PyTree) -> jax.Array:
        return loss_fn(p, jax.tree.map(lambda x: x[None], sample))[0]

    return jax.vmap(jax.value_and_grad(one), in_axes=(None, 0))(params, batch)


def tapped(
    closed: core.ClosedJaxpr, leaves: list, products: dict[int, Product]
) -> Callable[[list, dict, list], tuple[Any, dict[int, jax.Array]]]:
    """The single-sample function ``(rest_leaves, taps, sample_leaves) -> (output, inputs)``
    of ``closed``: the unfactored leaves (in order) and the sample are its arguments, the
    factored leaves are held at ``leaves``, each factored product's output gets its tap added,
    and ``inputs[k]`` is the other operand Xᵢ of leaf k's product. Its derivative with
    respect to the taps is every product's cotangent Δᵢ. Max-pools are
    :func:`~lmd4ml.stats.jaxpr.max_pool`: their backward pass, for one direction or many,
    scatters at the argmax the forward pass found."""
    rest = [k for k in range(len(leaves)) if k not in products]

    def fn(rest_leaves: list, taps: dict, sample_leaves: list) -> tuple[Any, dict]:
        inputs = {}

        def tap(eqn: Any, args: list, in_origins: list, outputs: list) -> list:
            k = next((o for o in in_origins if o in products), None)
            if k is None or eqn.primitive is not products[k].primitive:
                return outputs
            inputs[k] = args[1] if products[k].param_is_lhs else args[0]
            return [outputs[0] + taps[k]]

        merged = list(leaves)
        for k, leaf in zip(rest, rest_leaves, strict=True):
            merged[k] = leaf
        origins = [*range(len(leaves)), *[None] * len(sample_leaves)]
        (output,) = walk(closed, [*merged, *sample_leaves], origins, tap, bind_argmax_pool)
        return output, inputs

    return fn


def zero_taps(products: dict[int, Product]) -> dict[int, jax.Array]:
    """A zero tap per factored product, shaped like its per-sample output."""
    return {k: jnp.zeros(p.out.shape, p.out.dtype) for k, p in products.items()}


def factors(loss_fn: LossFn, params: PyTree, batch: PyTree) -> Factors:
    """Per-sample factors (Xᵢ, Δᵢ) of factored leaves and gradients of the rest, one pass."""
    leaves = jax.tree.leaves(params)
    closed = single_sample_jaxpr(loss_fn, params, batch)
    products = find_products(closed, len(leaves))
    if not products:
        losses, plain = _plain_grads(loss_fn, params, batch)
        return Factors({}, {}, {}, dict(enumerate(jax.tree.leaves(plain))), losses)
    rest = [k for k in range(len(leaves)) if k not in products]
    fn = tapped(closed, leaves, products)
    per_sample = jax.vmap(
        jax.value_and_grad(fn, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0)
    )
    (losses, inputs), (rest_grads, cotangents) = per_sample(
        [leaves[k] for k in rest], zero_taps(products), jax.tree.leaves(batch)
    )
    return Factors(products, inputs, cotangents, dict(zip(rest, rest_grads, strict=True)), losses)


def as_matrices(x: jax.Array, delta: jax.Array, product: Product) -> tuple[jax.Array, jax.Array]:
    """One sample's X (positions × contracted features) and Δ (positions × output features)."""
    (contract_lhs, contract_rhs), _ = product.params["dimension_numbers"]
    contract = contract_rhs if product.param_is_lhs else contract_lhs
    free = [d for d in range(x.ndim) if d not in contract]
    positions = 1
    for d in free:
        positions *= x.shape[d]
    x_matrix = jnp.transpose(x, (*free, *contract)).reshape(positions, -1)
    # dot_general's output lists the lhs's free axes first, then the rhs's.
    n_param_free = delta.ndim - len(free)
    if product.param_is_lhs:
        delta = jnp.moveaxis(delta, tuple(range(n_param_free)), tuple(range(-n_param_free, 0)))
    return x_matrix, delta.reshape(positions, -1)


def _lookup_sq_norm(indices: jax.Array, delta: jax.Array, product: Product) -> jax.Array:
    """‖Σₜ e_{idxₜ}Δₜᵀ‖² of one sample's row lookups, rows chosen as the gather chooses them."""
    n_rows = product.param_shape[0]
    index = indices.reshape(-1)
    dm = widen(delta.reshape(index.shape[0], -1))
    if product.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
        dm = jnp.where(((index >= 0) & (index < n_rows))[:, None], dm, 0)
    else:  # CLIP, PROMISE_IN_BOUNDS: an index out of range reads (and gets) the edge row
        index = jnp.clip(index, 0, n_rows - 1)
    return jnp.sum(jnp.where(index[:, None] == index[None, :], dm @ dm.T, 0))


def conv_patches(x: jax.Array, product: Product) -> jax.Array:
    """One sample's input patches P (positions × patch), the patch axis ordered input
    channel first, then the kernel's spatial axes (``lax.conv_general_dilated_patches``)."""
    params = product.params
    dims = params["dimension_numbers"]
    patches = lax.conv_general_dilated_patches(
        x,
        [product.param_shape[d] for d in dims.rhs_spec[2:]],
        params["window_strides"],
        params["padding"],
        params["lhs_dilation"],
        params["rhs_dilation"],
        dims,
        # Patches are copies of inputs: the default precision may round them on accelerators.
        precision=lax.Precision.HIGHEST,
    )
    return by_position(patches, product)


def by_position(a: jax.Array, product: Product) -> jax.Array:
    """A convolution-output-shaped array as (positions × features)."""
    feature = product.params["dimension_numbers"].out_spec[1]
    return jnp.moveaxis(a, feature, -1).reshape(-1, a.shape[feature])


def conv_kernel(matrix: jax.Array, product: Product) -> jax.Array:
    """A (patch × output channels) matrix, as PᵀΔ orders it, in the kernel's shape."""
    spec = product.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes
    order = [spec[1], *spec[2:], spec[0]]
    shape = [product.param_shape[d] for d in order]
    return matrix.reshape(shape).transpose(np.argsort(order))


def _conv_matrices(x: jax.Array, delta: jax.Array, product: Product) -> tuple[jax.Array, jax.Array]:
    """One sample's input patches P (positions × patch) and Δ (positions × output channels)."""
    return conv_patches(x, product), by_position(delta, product)


def _ghost_sq_norm(x: jax.Array, delta: jax.Array, product: Product) -> jax.Array:
    if product.primitive is primitives.gather_p:
        return _lookup_sq_norm(x, delta, product)
    to_matrices = (
        _conv_matrices if product.primitive is primitives.conv_general_dilated_p else as_matrices
    )
    xm, dm = widen(to_matrices(x, delta, product))
    positions, features_in = xm.shape
    features_out = dm.shape[1]
    if positions * (features_in + features_out) <= features_in * features_out:
        return jnp.sum((xm @ xm.T) * (dm @ dm.T))
    return jnp.sum(jnp.square(xm.T @ dm))


def sq_norms(f: Factors) -> jax.Array:
    """‖∇ℓᵢ‖² per sample from factors, without forming factored leaves' gradients."""
    total = sum(
        jax.vmap(partial(_ghost_sq_norm, product=p))(f.inputs[k], f.cotangents[k])
        for k, p in f.products.items()
    )
    for g in widen(list(f.grads.values())):
        total = total + jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
    return total


def _product_with(w: jax.Array, x: jax.Array, product: Product) -> jax.Array:
    """One sample's product output from the leaf ``w`` and the other operand ``x``."""
    w = w.astype(product.operand_dtype)
    operands = (w, x) if product.param_is_lhs else (x, w)
    return product.primitive.bind(*operands, **product.params)


def leaf_grad(x: jax.Array, delta: jax.Array, leaf: jax.Array, product: Product) -> jax.Array:
    """One sample's gradient XᵢᵀΔᵢ of a factored leaf, the product's transpose at Δᵢ."""
    (grad,) = jax.linear_transpose(partial(_product_with, x=x, product=product), leaf)(delta)
    return grad


def _summed_leaf_grad(
    x: jax.Array, delta: jax.Array, leaf: jax.Array, product: Product
) -> jax.Array:
    """Σᵢ XᵢᵀΔᵢ over the leading sample axis of ``x`` and ``delta``."""
    over_samples = jax.vmap(partial(_product_with, product=product), (None, 0))
    (total,) = jax.linear_transpose(lambda w: over_samples(w, x), leaf)(delta)
    return total


def grad_sum(f: Factors, params: PyTree) -> PyTree:
    """Σᵢ ∇ℓᵢ over the chunk's samples, a pytree like ``params``, without per-sample gradients
    of factored leaves: the transpose of the product with every sample's Xᵢ, applied to all
    the Δᵢ, is the batch's own weight gradient (one ``dot_general`` or convolution over
    samples and positions together, as a plain backward pass makes it).

    Example:
      >>> w = jnp.ones((3, 2))
      >>> loss = lambda w, x: jnp.sum(x @ w, axis=1)
      >>> f = factors(loss, w, jnp.arange(6.0).reshape(2, 3))
      >>> grad_sum(f, w).tolist()  # Σᵢ xᵢ 1ᵀ
      [[3.0, 3.0], [5.0, 5.0], [7.0, 7.0]]
    """
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for k, leaf in enumerate(leaves):
        if k in f.products:
            out.append(_summed_leaf_grad(f.inputs[k], f.cotangents[k], leaf, f.products[k]))
        else:
            out.append(jnp.sum(f.grads[k], axis=0))
    return jax.tree.unflatten(treedef, out)


def grads(f: Factors, params: PyTree) -> PyTree:
    """Every per-sample gradient, a pytree like ``params`` with a leading sample axis."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for k, leaf in enumerate(leaves):
        if k in f.products:
            per = jax.vmap(partial(leaf_grad, leaf=leaf, product=f.products[k]))
            out.append(per(f.inputs[k], f.cotangents[k]))
        else:
            out.append(f.grads[k])
    return jax.tree.unflatten(treedef, out)
