"""The Hessian diagonal's products of a convolution stay out of XLA loops on CPU.

XLA's CPU convolutions run many times slower inside a loop body (jax-ml/jax#12868): 3c3d's
Hutchinson step went from 2 s to 51 s when its products moved into a ``lax.scan``. These
checks read the structure of the step, never its time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import models
import numpy as np
import optax
import pytest
import reference
from jax.extend import core

import lmd4ml as lm
from lmd4ml.stats import hessian
from lmd4ml.stats.jaxpr import sub_jaxprs

LOOPS = ("while", "scan")
CONV = "conv_general_dilated"


def primitives(jaxpr: core.Jaxpr, in_loop: bool = False) -> Iterator[tuple[str, bool]]:
    """Every primitive of ``jaxpr`` and of the jaxprs inside it, with whether a loop holds it."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, in_loop
        for inner in sub_jaxprs(eqn):
            yield from primitives(inner, in_loop or eqn.primitive.name in LOOPS)


def step_jaxpr(case: models.Case, quantity: lm.Quantity, chunk: int) -> core.Jaxpr:
    """The tracked step's jaxpr, its budget allowing ``chunk`` products at a time."""
    budget = chunk * reference.flatten(case.params).nbytes
    step = lm.instrument(case.loss_fn, optax.sgd(0.1), [quantity], memory_budget=budget)
    state = step.init(case.params)
    return jax.make_jaxpr(lambda s, b: step(s, b))(state, case.batches[0]).jaxpr


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="loops only slow convolutions on CPU")
@pytest.mark.parametrize(
    "quantity", [lm.HessTrace(method="hutchinson", probes=6), lm.HessTrace(method="exact")]
)
def test_no_convolution_inside_a_loop(quantity: lm.Quantity) -> None:
    """Two products a chunk: a loop would take the chunks; every convolution stays outside."""
    case = models.get("nnx_conv")
    found = list(primitives(step_jaxpr(case, quantity, chunk=2)))
    # The forward and backward passes convolve 3 times; the products add more.
    assert sum(name == CONV for name, _ in found) > 3
    assert not [name for name, in_loop in found if name == CONV and in_loop]


def diags(case: models.Case, unroll: bool) -> tuple[Any, Any]:
    """The exact diagonal and a Hutchinson estimate, 3 products a chunk."""
    params, batch = case.params, case.batches[0]
    budget = 3 * reference.flatten(params).nbytes

    @jax.jit
    def run(key: jax.Array) -> tuple[Any, Any]:
        hvp = hessian.hvp(case.loss_fn, params, batch)
        exact = hessian.exact_diag(hvp, params, budget, unroll=unroll)
        estimate = hessian.hutchinson_diag(hvp, params, key, 7, budget, unroll=unroll)
        return exact, estimate

    return run(jax.random.key(0))


def test_unrolled_products_equal_the_loop() -> None:
    """Straight-line calls give the loop's values: the same products, the same probes."""
    case = models.get("nnx_conv")
    looped, unrolled = diags(case, unroll=False), diags(case, unroll=True)
    for a, b in zip(looped, unrolled, strict=True):
        np.testing.assert_allclose(reference.flatten(b), reference.flatten(a), rtol=1e-12)


def test_max_calls_bound_the_unrolled_code() -> None:
    """D products in at most ``max_calls`` calls, as equal as can be; none in a loop."""
    h = np.diag(np.arange(1.0, 11.0))
    jaxpr = jax.make_jaxpr(
        lambda p: hessian.exact_diag(lambda v: h @ v, p, unroll=True, max_calls=4)
    )(np.zeros(10)).jaxpr
    found = list(primitives(jaxpr))
    # 10 unit vectors in chunks of 3, 3, 3 and 1: one product (a dot) a call.
    assert sum(name == "dot_general" for name, _ in found) == 4
    assert not any(in_loop for _, in_loop in found)
    with pytest.raises(ValueError, match="max_calls"):
        hessian.exact_diag(lambda v: h @ v, np.zeros(10), unroll=True, max_calls=0)
