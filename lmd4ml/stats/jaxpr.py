"""Reading a loss's jaxpr: one evaluator that the statistics built on jaxprs share.

:func:`walk` evaluates a closed jaxpr equation by equation, inlining calls of ``jax.jit``
functions so that a model's layers are seen as the primitives they are made of, and lets a
``visit`` function see (and replace) the outputs of every other equation. Per-sample factors
(:mod:`~lmd4ml.stats.ghost`) tap products through it; random draws are recorded and
replayed through it (:mod:`~lmd4ml.stats.randomness`).

:func:`propagate` runs an abstract analysis over the same equations instead of values: which
parameter leaves meet the batch first (:func:`lmd4ml.stats.per_sample.entry_leaves`), in which
leaves a model is piecewise linear (:func:`lmd4ml.stats.ggn.piecewise_linear`).

:func:`canonical_convolutions` rewrites a function's convolutions into the one layout XLA's
CPU backend runs fast everywhere, for functions that run inside a loop or a branch;
:func:`argmax_pooling` gives its max-pools derivatives that gather at each window's argmax,
found once, instead of XLA's select-and-scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.extend.core import primitives

INLINED = (primitives.jit_p, primitives.closed_call_p)
"""Primitives whose calls are analysed as part of the jaxpr that makes them."""

CALLS = (*INLINED, primitives.custom_jvp_call_p, primitives.custom_vjp_call_p, primitives.remat_p)
"""Primitives whose inner jaxpr computes their outputs from their inputs, one for one: an
analysis of values (not of derivatives) may look through them."""

Visit = Callable[[Any, list, list, list], list]


def read(env: dict, var: Any) -> Any:
    """The value of ``var`` (a literal's own value) in ``env``."""
    return var.val if isinstance(var, core.Literal) else env[var]


def bind_params(eqn: Any) -> dict:
    """The parameters with which ``eqn``'s primitive is bound again."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    # JAX < 0.7 returned (subfuns, params); no primitive that is not inlined has subfuns now.
    return bound[1] if isinstance(bound, tuple) else bound


def inner_jaxpr(eqn: Any) -> core.ClosedJaxpr:
    """The jaxpr an inlined call evaluates."""
    return eqn.params.get("jaxpr") or eqn.params["call_jaxpr"]


def bind_outputs(eqn: Any, inputs: list) -> list:
    """The outputs of ``eqn``'s primitive bound again on ``inputs``, as a list."""
    out = eqn.primitive.bind(*inputs, **bind_params(eqn))
    return out if eqn.primitive.multiple_results else [out]


def walk(
    closed: core.ClosedJaxpr,
    args: Sequence,
    origins: Sequence,
    visit: Visit,
    bind: Callable[[Any, list], list] = bind_outputs,
) -> list:
    """Evaluate ``closed`` on ``args``, inlining jit calls and tracking which values are leaves.

    ``origins[j]`` is the parameter leaf that argument j is (or None). ``visit(eqn, inputs,
    input_origins, outputs)`` sees every equation that is not inlined and returns its outputs;
    ``bind(eqn, inputs)`` computes those outputs (by default the equation itself).
    """
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    origin = {v: o for v, o in zip(jaxpr.invars, origins, strict=True) if o is not None}
    for eqn in jaxpr.eqns:
        inputs = [read(env, v) for v in eqn.invars]
        in_origins = [None if isinstance(v, core.Literal) else origin.get(v) for v in eqn.invars]
        if eqn.primitive in INLINED:
            outputs = walk(inner_jaxpr(eqn), inputs, in_origins, visit, bind)
        elif eqn.primitive is primitives.convert_element_type_p and in_origins[0] is not None:
            # A cast (mixed precision, flax's promote_dtype) keeps the value a view of the leaf.
            outputs = bind(eqn, inputs)
            origin[eqn.outvars[0]] = in_origins[0]
        else:
            outputs = visit(eqn, inputs, in_origins, bind(eqn, inputs))
        env.update(zip(eqn.outvars, outputs, strict=True))
    return [read(env, v) for v in jaxpr.outvars]


def sub_jaxprs(eqn: Any) -> Iterator[core.Jaxpr]:
    """The jaxprs among ``eqn``'s parameters (a loop's body, a cond's branches, ...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item


def equations(jaxpr: core.Jaxpr) -> Iterator[tuple[Any, bool]]:
    """Every equation of ``jaxpr`` and of the jaxprs inside it, with whether :func:`walk`
    reaches it (it is not inside a loop, a cond or another call that is not inlined)."""

    def visit(jaxpr: core.Jaxpr, reached: bool) -> Iterator[tuple[Any, bool]]:
        for eqn in jaxpr.eqns:
            yield eqn, reached
            inlined = eqn.primitive in INLINED
            for inner in sub_jaxprs(eqn):
                yield from visit(inner, reached and inlined)

    return visit(jaxpr, True)


def _call_body(eqn: Any) -> core.Jaxpr | None:
    """The jaxpr that computes a call's outputs from its inputs (see CALLS), or None."""
    if eqn.primitive not in CALLS:
        return None
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    inner = getattr(inner, "jaxpr", inner)
    if not isinstance(inner, core.Jaxpr) or len(inner.invars) != len(eqn.invars):
        return None
    return inner


def propagate(
    jaxpr: core.Jaxpr, tags: Sequence, rule: Callable[[Any, list], list], constant: Any
) -> list:
    """Tags of ``jaxpr``'s outputs from ``tags`` of its inputs, an abstract evaluation.

    Calls (:data:`CALLS`) are looked into; every other equation's output tags are
    ``rule(eqn, input_tags)``. Literals and constants get ``constant``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> closed = jax.make_jaxpr(lambda a, b: (jax.nn.relu(a) + 1.0, b * 2.0))(1.0, 2.0)
      >>> rule = lambda eqn, ins: [frozenset().union(*ins)] * len(eqn.outvars)
      >>> propagate(closed.jaxpr, [{"a"}, {"b"}], rule, frozenset())
      [frozenset({'a'}), frozenset({'b'})]
    """
    env = {v: constant for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, tags, strict=True))

    def tag(v: Any) -> Any:
        return constant if isinstance(v, core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [tag(v) for v in eqn.invars]
        inner = _call_body(eqn)
        outs = rule(eqn, ins) if inner is None else propagate(inner, ins, rule, constant)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [tag(v) for v in jaxpr.outvars]


def _canonical_convolution(lhs: Any, rhs: Any, params: dict) -> Any:
    """``conv_general_dilated(lhs, rhs, **params)`` with its operands transposed to (batch,
    spatial…, feature) and (spatial…, in, out) and its output transposed back, or None where
    they already are."""
    spec = params["dimension_numbers"]
    n = lhs.ndim
    order_lhs = (spec.lhs_spec[0], *spec.lhs_spec[2:], spec.lhs_spec[1])
    order_rhs = (*spec.rhs_spec[2:], spec.rhs_spec[1], spec.rhs_spec[0])
    order_out = (spec.out_spec[0], *spec.out_spec[2:], spec.out_spec[1])
    if order_lhs == order_rhs == order_out == tuple(range(n)):
        return None
    spatial = tuple(range(1, n - 1))
    canonical = lax.ConvDimensionNumbers((0, n - 1, *spatial), (n - 1, n - 2, *range(n - 2)),
                                         (0, n - 1, *spatial))  # fmt: skip
    out = primitives.conv_general_dilated_p.bind(
        lhs.transpose(order_lhs), rhs.transpose(order_rhs),
        **{**params, "dimension_numbers": canonical},
    )  # fmt: skip
    back = [0] * n
    for axis, dim in enumerate(order_out):
        back[dim] = axis
    return out.transpose(back)


def _bind_canonical(eqn: Any, inputs: list) -> list:
    """:func:`bind_outputs`, with a convolution in the canonical layout."""
    if eqn.primitive is primitives.conv_general_dilated_p:
        out = _canonical_convolution(*inputs, bind_params(eqn))
        if out is not None:
            return [out]
    return bind_outputs(eqn, inputs)


def _unchanged(eqn: Any, inputs: list, in_origins: list, outputs: list) -> list:
    return outputs


def _rebound(
    closed: core.ClosedJaxpr, shapes: Any, args: tuple, bind: Callable[[Any, list], list]
) -> Any:
    """``closed`` (traced from ``args``, its outputs shaped as ``shapes``) evaluated on
    ``args`` with every equation bound by ``bind``: a rewrite of the function it came from."""
    flat = jax.tree.leaves(args)
    outputs = walk(closed, flat, [None] * len(flat), _unchanged, bind)
    return jax.tree.unflatten(jax.tree.structure(shapes), outputs)


def canonical_convolutions(fn: Callable) -> Callable:
    """``fn`` with every convolution it makes (its derivatives' included) in the layout XLA's
    CPU backend hands to its fast (Eigen) kernels: inputs (batch, spatial…, feature), kernels
    (spatial…, in, out). On other backends, ``fn`` itself.

    XLA's CPU compiler brings only the program's top level into that layout; a convolution
    inside a loop body or a branch keeps the layout autodiff gave it (a kernel gradient's, a
    transposed kernel's) and runs as generic loops, 10-20× slower (a Hessian-vector product
    of DeepOBS 3c3d: 0.3 s alone, 5 s inside ``fori_loop``; jax-ml/jax#12868). Wrap the body
    of every loop or branch that may convolve; the transposes cost a copy of each operand.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> conv = lambda x, w: jax.lax.conv_general_dilated(
      ...     x, w, (1,), "VALID", dimension_numbers=("NCH", "OIH", "NCH"))
      >>> x, w = jnp.arange(12.0).reshape(1, 2, 6), jnp.ones((3, 2, 2))
      >>> bool(jnp.all(canonical_convolutions(conv)(x, w) == conv(x, w)))
      True
    """
    if jax.default_backend() != "cpu":
        return fn

    @functools.wraps(fn)
    def canonical(*args: Any) -> Any:
        return _rebound(*jax.make_jaxpr(fn, return_shape=True)(*args), args, _bind_canonical)

    return canonical


def window_argmax(x: jax.Array, params: dict) -> jax.Array:
    """For each window of ``lax.reduce_window_max`` (its equation's ``params``) over ``x``,
    the flat index into ``x`` of the window's largest element, the first in row-major order
    on a tie (the one XLA's select-and-scatter picks). Padding never wins over a real element.

    Example:
      >>> params = dict(window_dimensions=(2,), window_strides=(2,), padding=((0, 0),),
      ...               base_dilation=(1,), window_dilation=(1,))
      >>> window_argmax(jnp.array([1.0, 3.0, 2.0, 2.0]), params).tolist()
      [1, 2]
    """
    x = lax.stop_gradient(x)
    index = lax.iota(jnp.int32, x.size).reshape(x.shape)

    def larger(a: tuple, b: tuple) -> tuple:
        (va, ia), (vb, ib) = a, b
        pick = (va > vb) | ((va == vb) & (ia < ib))
        return jnp.where(pick, va, vb), jnp.where(pick, ia, ib)

    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(x.size, jnp.int32))
    return lax.reduce_window(
        (x, index), init, larger, params["window_dimensions"], params["window_strides"],
        params["padding"], params["base_dilation"], params["window_dilation"],
    )[1]  # fmt: skip


def max_pool(x: jax.Array, params: dict) -> jax.Array:
    """``lax.reduce_window_max`` of ``x`` whose derivative gathers the tangent at each
    window's argmax (:func:`window_argmax`): the same values and derivatives (ties broken as
    XLA breaks them). Linearized, the argmax is a residual, so each Hessian-vector product
    (forward over reverse) and each direction of a many-direction backward pass only gathers
    and scatter-adds pooled-size arrays; XLA's CPU backend instead finds every window's
    argmax again in each select-and-scatter, and inside a loop it does not hoist that search.
    """

    @jax.custom_jvp
    def pool(x: jax.Array) -> jax.Array:
        return lax.reduce_window_max_p.bind(x, **params)

    @pool.defjvp
    def pool_jvp(primals: tuple, tangents: tuple) -> tuple:
        (x,), (t,) = primals, tangents
        return pool(x), jnp.take(t.reshape(-1), window_argmax(x, params), mode="clip")

    return pool(x)


def bind_argmax_pool(eqn: Any, inputs: list) -> list:
    """:func:`bind_outputs`, with a floating-point max-pool as :func:`max_pool` on CPU (where
    XLA's select-and-scatter is slow): a ``bind`` for :func:`walk`, so that XLA's own pool is
    never traced (under ``jax.jvp`` it would leave its tangent's select-and-gather behind)."""
    if eqn.primitive is lax.reduce_window_max_p and jax.default_backend() == "cpu":
        x = inputs[0]
        if jnp.issubdtype(x.dtype, jnp.floating) and x.size < 2**31:  # int32 indices
            return [max_pool(x, eqn.params)]
    return bind_outputs(eqn, inputs)


def argmax_pooling(fn: Callable) -> Callable:
    """``fn`` with every max-pool it makes (inlined calls' included) as :func:`max_pool`:
    equal values and derivatives, but its backward pass and products of its Hessian (forward
    over reverse) find each window's argmax once, in the forward pass. On other backends than
    CPU, or where ``fn`` has no max-pool, ``fn`` itself.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pool = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (2,), (2,), "VALID")
      >>> f = lambda x: jnp.sum(pool(x) ** 3)
      >>> x = jnp.array([1.0, 3.0, 2.0, 2.0])
      >>> bool(jnp.all(jax.hessian(argmax_pooling(f))(x) == jax.hessian(f)(x)))
      True
    """
    if jax.default_backend() != "cpu":
        return fn

    @functools.wraps(fn)
    def pooled(*args: Any) -> Any:
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        eqns = equations(closed.jaxpr)
        if not any(reached and e.primitive is lax.reduce_window_max_p for e, reached in eqns):
            return fn(*args)  # no max-pool that walk reaches: the function as it is
        return _rebound(closed, shapes, args, bind_argmax_pool)

    return pooled
