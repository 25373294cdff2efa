"""Convolutions inside loops and branches run in XLA's fast CPU layout; max-pools there
gather at an argmax found once.

XLA's CPU compiler hands a convolution to its fast (Eigen) kernels only in one layout, and
brings only a program's top level into it: inside a loop body or a ``lax.cond`` branch, a
convolution's derivatives keep the layouts autodiff gave them and run as generic loops, 10-20×
slower (3c3d's Hutchinson step went from 2 s to 51 s when its products moved into a
``lax.scan``; jax-ml/jax#12868). Every loop and branch of the step is built with
:func:`lmd4ml.stats.jaxpr.canonical_convolutions`. These checks read the compiled program,
never its time.

Max-pooling's derivatives are XLA's select-and-scatter, which the CPU backend lowers to a
search of every window for its argmax and a scatter: a Hessian-vector product, or each
direction of the GGN's backward pass, would search again. The step's losses pool through
:func:`lmd4ml.stats.jaxpr.max_pool`, whose derivative gathers at the argmax its forward pass
found.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lmd4ml as lm
from lmd4ml.stats.jaxpr import argmax_pooling, canonical_convolutions

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="XLA's CPU layout pass and select-and-scatter are in question; both rewrites are "
    "CPU-only",
)

CONVOLUTION = re.compile(r"convolution\(.*?dim_labels=([^,\s]+)")
CANONICAL = re.compile(r"b(0\d*)f_(0\d*)io->b(0\d*)f")


def apply(params: dict, x: jax.Array) -> jax.Array:
    """conv 3×3 (4 channels), ReLU, 2×2 max-pool, dense 3: NHWC and HWIO, as flax writes."""
    y = jax.lax.conv_general_dilated(
        x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                              (1, 2, 2, 1), "VALID")  # fmt: skip
    return y.reshape(y.shape[0], -1) @ params["w"]


LOSS = lm.supervised(apply, optax.softmax_cross_entropy_with_integer_labels)
PARAMS = {
    "k": jax.random.normal(jax.random.key(0), (3, 3, 2, 4)) / 4,
    "w": jax.random.normal(jax.random.key(1), (16 * 4, 3)) / 8,
}
BATCH = (jax.random.normal(jax.random.key(2), (6, 8, 8, 2)), jnp.arange(6) % 3)


def layouts(compiled_text: str) -> list[str]:
    return CONVOLUTION.findall(compiled_text)


def assert_canonical(compiled_text: str, at_least: int) -> None:
    found = layouts(compiled_text)
    assert len(found) >= at_least, found
    odd = [f for f in found if not (m := CANONICAL.fullmatch(f)) or len(set(m.groups())) != 1]
    assert not odd, f"convolutions XLA's CPU backend runs as generic loops: {odd}"


def test_the_rewrite_keeps_every_convolution_value() -> None:
    """1-D to 3-D, any dimension order, feature groups, strides, dilations: the same values."""
    rng = np.random.default_rng(0)
    cases = [
        ((2, 3, 9), (4, 3, 2), ("NCH", "OIH", "NCH"), 1, (1,), (1,), (1,)),
        ((2, 9, 7, 4), (3, 2, 2, 6), ("NHWC", "HWIO", "NCHW"), 2, (2, 1), (1, 1), (1, 2)),
        ((5, 4, 2, 3), (3, 3, 2, 4), ("HWCN", "HWIO", "NHWC"), 1, (1, 1), (2, 1), (1, 1)),
        ((1, 4, 5, 5, 3), (2, 2, 2, 3, 2), ("NDHWC", "DHWIO", "NCDHW"), 1, (1, 1, 1), (1,) * 3,
         (1,) * 3),
    ]  # fmt: skip
    for lhs_shape, rhs_shape, numbers, groups, strides, lhs_dilation, rhs_dilation in cases:
        lhs, rhs = rng.normal(size=lhs_shape), rng.normal(size=rhs_shape)

        def conv(a, b, numbers=numbers, groups=groups, strides=strides, ld=lhs_dilation,
                 rd=rhs_dilation):  # fmt: skip
            padding = [(1, 0)] * len(strides)
            return jax.lax.conv_general_dilated(
                a, b, strides, padding, ld, rd, numbers, feature_group_count=groups
            )

        np.testing.assert_allclose(
            canonical_convolutions(conv)(lhs, rhs), conv(lhs, rhs), rtol=1e-6, atol=1e-6
        )
        # Its derivatives, which autodiff writes in other layouts, too.
        grads = jax.grad(lambda a, b, f=conv: jnp.sum(f(a, b) ** 2), argnums=(0, 1))
        for mine, theirs in zip(canonical_convolutions(grads)(lhs, rhs), grads(lhs, rhs),
                                strict=True):  # fmt: skip
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_loop_without_the_rewrite_is_what_it_guards_against() -> None:
    """The premise: a gradient's convolutions inside a loop, as autodiff writes them."""
    grad = jax.grad(lambda p: LOSS(p, BATCH).mean())

    def looped(rewrite):
        body = lambda i, p: jax.tree.map(jnp.subtract, p, grad(p))  # noqa: E731
        return jax.lax.fori_loop(0, 2, rewrite(body), PARAMS)

    plain = jax.jit(lambda: looped(lambda f: f)).lower().compile().as_text()
    assert any(not CANONICAL.fullmatch(f) for f in layouts(plain))
    assert_canonical(jax.jit(lambda: looped(canonical_convolutions)).lower().compile().as_text(), 2)


@pytest.mark.parametrize(
    ("quantities", "at_least"),
    [
        ([lm.HessTrace(method="hutchinson", probes=6)], 4),
        ([lm.HessTrace(method="exact")], 4),
        ([lm.HessMaxEV()], 4),
        # The step's gradient comes from the per-sample pass: the forward convolution and the
        # kernel's gradient, both in its loop.
        ([lm.NormTest(), lm.GradHist1d()], 2),
        ([lm.HessTrace(method="ggn"), lm.TICDiag(method="ggn_mc")], 4),
    ],
    ids=["hutchinson", "exact", "lanczos", "per_sample", "ggn"],
)
def test_every_convolution_of_the_step_is_canonical(quantities: list, at_least: int) -> None:
    """A budget of two samples' (two products') worth: the chunks go through loops."""
    budget = 2 * sum(x.nbytes for x in jax.tree.leaves(PARAMS))
    step = lm.instrument(LOSS, optax.sgd(0.1), quantities, memory_budget=budget)
    state = step.init(PARAMS)
    text = jax.jit(step).lower(state, BATCH).compile().as_text()
    assert "while" in text  # the products or samples did go through a loop
    assert_canonical(text, at_least)


def test_the_monitor_branch_is_canonical() -> None:
    """``every=2``: the tracked computation is a ``lax.cond`` branch."""
    tx = lm.monitor(optax.sgd(0.1), [lm.HessTrace(method="hutchinson", probes=2)], every=2)
    state = tx.init(PARAMS)
    grads = jax.grad(lambda p: LOSS(p, BATCH).mean())(PARAMS)

    def update(g, s, p):
        return tx.update(g, s, p, loss_fn=LOSS, batch=BATCH)

    text = jax.jit(update).lower(grads, state, PARAMS).compile().as_text()
    assert "conditional" in text
    assert_canonical(text, at_least=3)


def test_argmax_pooling_keeps_values_and_every_derivative() -> None:
    """Many ties (small integers), 'SAME' padding, strides, overlapping windows, float64: the
    values, gradients, JVPs and Hessian-vector products equal XLA's own pooling's exactly."""
    rng = np.random.default_rng(0)
    windows = [
        ((1, 3, 3, 1), (1, 2, 2, 1), "SAME"),
        ((1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        ((1, 2, 3, 1), (1, 1, 1, 1), "SAME"),
    ]
    with jax.enable_x64(True):
        for window, strides, padding in windows:
            x = jnp.asarray(rng.integers(0, 3, (2, 7, 7, 3)), jnp.float64)

            def pool(x, window=window, strides=strides, padding=padding):
                return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)

            w = jnp.asarray(rng.normal(size=pool(x).shape))
            t = jnp.asarray(rng.normal(size=x.shape))

            def f(x, pool=pool, w=w):
                # one_hot: an equation with no inputs (iota) beside the pools
                return (
                    jnp.sum(w * jnp.sin(pool(x)) * pool(x))
                    + jax.nn.one_hot(1, 3)[1] * x[0, 0, 0, 0]
                )

            g = argmax_pooling(f)
            assert g(x) == f(x)
            np.testing.assert_array_equal(jax.grad(g)(x), jax.grad(f)(x))
            np.testing.assert_array_equal(jax.jvp(g, (x,), (t,))[1], jax.jvp(f, (x,), (t,))[1])
            hvp = lambda h, x=x, t=t: jax.jvp(jax.grad(h), (x,), (t,))[1]  # noqa: E731
            np.testing.assert_allclose(hvp(g), hvp(f), rtol=1e-14, atol=1e-14)
            # Per sample, as the per-sample pass and the GGN take it.
            per_sample = jax.vmap(jax.grad(lambda xi, h: h(xi[None])), in_axes=(0, None))
            np.testing.assert_array_equal(per_sample(x, g), per_sample(x, f))


def test_argmax_pooling_differentiates_dilated_windows() -> None:
    """A dilated window, which JAX's own max-pool cannot differentiate: against the max over
    the window's strided slices (continuous values, so no ties), float64."""
    window, strides, dilation = (1, 2, 3, 1), (1, 2, 1, 1), (1, 2, 2, 1)
    pads = ((0, 0), (1, 1), (2, 1), (0, 0))

    def pool(x):
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, window, strides, pads, window_dilation=dilation
        )

    def by_slices(x):
        padded, shape = jnp.pad(x, pads, constant_values=-jnp.inf), pool(x).shape
        slices = []
        for offset in itertools.product(*(range(w) for w in window)):
            start = [o * d for o, d in zip(offset, dilation, strict=True)]
            limit = [a + (n - 1) * s + 1 for a, n, s in zip(start, shape, strides, strict=True)]
            slices.append(jax.lax.slice(padded, start, limit, strides))
        return jnp.max(jnp.stack(slices), axis=0)

    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)))
        w = jnp.asarray(rng.normal(size=pool(x).shape))
        t = jnp.asarray(rng.normal(size=x.shape))
        ours = argmax_pooling(lambda x: jnp.sum(w * jnp.sin(pool(x)) * pool(x)))
        reference = lambda x: jnp.sum(w * jnp.sin(by_slices(x)) * by_slices(x))  # noqa: E731
        np.testing.assert_array_equal(ours(x), reference(x))
        np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-14)
        hvp = lambda f: jax.jvp(jax.grad(f), (x,), (t,))[1]  # noqa: E731
        np.testing.assert_allclose(hvp(ours), hvp(reference), rtol=1e-14, atol=1e-14)


def test_argmax_pooling_leaves_a_function_without_pools_as_it_is() -> None:
    """A model without max-pools (an MLP, a transformer) keeps its own program."""

    def mlp(w, x):
        return jnp.sum(jax.nn.relu(x @ w) ** 2)

    w, x = jnp.ones((3, 4)), jnp.ones((2, 3))
    assert str(jax.make_jaxpr(argmax_pooling(mlp))(w, x)) == str(jax.make_jaxpr(mlp)(w, x))


def test_hessian_vector_products_keep_no_window_search() -> None:
    """Linearized once, a product of the Hessian only gathers and scatter-adds at the argmax:
    no reduce-window or select-and-scatter is left in it."""
    hvp = lm.stats.hessian.hvp(LOSS, PARAMS, BATCH)
    product = str(jax.make_jaxpr(hvp)(PARAMS))
    assert "gather" in product and "scatter-add" in product
    for searching in ("reduce_window", "select_and_scatter", "select_and_gather"):
        assert searching not in product, searching


@pytest.mark.parametrize(
    "quantities",
    [[], [lm.Loss(), lm.GradNorm(), lm.Alpha()], lm.presets.full()],
    ids=["untracked", "scalars", "full"],
)
def test_the_step_differentiates_pools_at_their_argmax(quantities: list) -> None:
    """Every derivative the step takes (the gradient, α's second gradient, the per-sample
    and GGN passes, Hessian products) gathers at the argmax: no select-and-scatter."""
    step = lm.instrument(LOSS, optax.sgd(0.1), quantities)
    state = step.init(PARAMS)
    program = str(jax.make_jaxpr(lambda s, b: step(s, b, track=bool(quantities)))(state, BATCH))
    assert "gather" in program
    for searching in ("select_and_scatter_add", "select_and_gather_add"):
        assert searching not in program, searching
