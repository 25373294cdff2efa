"""Reading a loss's jaxpr: one evaluator that the statistics built on jaxprs share.

:func:`walk` evaluates a closed jaxpr equation by equation, inlining calls of ``jax.jit``
functions so that a model's layers are seen as the primitives they are made of, and lets a
``visit`` function see (and replace) the outputs of every other equation. Per-sample factors
(:mod:`~lmd4ml.stats.ghost`) tap products through it; random draws are recorded and
replayed through it (:mod:`~lmd4ml.stats.randomness`).

:func:`propagate` runs an abstract analysis over the same equations instead of values: which
parameter leaves meet the batch first (:func:`lmd4ml.stats.per_sample.entry_leaves`), in which
leaves a model is piecewise linear (:func:`lmd4ml.stats.ggn.piecewise_linear`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


def walk(closed: core.ClosedJaxpr, args: Sequence, origins: Sequence, visit: Visit) -> list:
    """Evaluate ``closed`` on ``args``, inlining jit calls and tracking which values are leaves.

    ``origins[j]`` is the parameter leaf that argument j is (or None). ``visit(eqn, inputs,
    input_origins, outputs)`` sees every equation that is not inlined and returns its outputs.
    """
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    origin = {v: o for v, o in zip(jaxpr.invars, origins, strict=True) if o is not None}
    for eqn in jaxpr.eqns:
        inputs = [read(env, v) for v in eqn.invars]
        in_origins = [None if isinstance(v, core.Literal) else origin.get(v) for v in eqn.invars]
        if eqn.primitive in INLINED:
            outputs = walk(inner_jaxpr(eqn), inputs, in_origins, visit)
        elif eqn.primitive is primitives.convert_element_type_p and in_origins[0] is not None:
            # A cast (mixed precision, flax's promote_dtype) keeps the value a view of the leaf.
            outputs = [eqn.primitive.bind(*inputs, **bind_params(eqn))]
            origin[eqn.outvars[0]] = in_origins[0]
        else:
            outputs = eqn.primitive.bind(*inputs, **bind_params(eqn))
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
            outputs = visit(eqn, inputs, in_origins, outputs)
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
