"""The forward-mode pass behind projections and α: its values, and the leaves where it parts
from the step's own forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm
from lmd4ml.stats import per_sample


def paths(params) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def entry_paths(loss_fn, params, batch) -> list[str]:
    names = paths(params)
    return sorted(names[k] for k in per_sample.entry_leaves(loss_fn, params, batch))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mlp", ["['layer0']['w']"]),
        ("nnx_conv", ["['conv']['kernel'].value"]),
        ("linen_conv", ["['params']['Conv_0']['kernel']"]),
        ("linen_attention", ["['params']['Dense_0']['kernel']"]),
    ],
)
def test_entry_leaves_are_the_first_layer_of_zoo_models(name: str, expected: list) -> None:
    case = models.get(name)
    assert entry_paths(case.loss_fn, case.params, case.batches[0]) == expected


def token_loss(p, batch):
    tokens, y = batch
    h = jnp.tanh(p["table"][tokens] + p["positions"]).mean(axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["head"], y)


def token_problem():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "table": jax.random.normal(keys[0], (50, 16), jnp.float64),
        "positions": jax.random.normal(keys[1], (12, 16), jnp.float64),
        "head": jax.random.normal(keys[2], (16, 3), jnp.float64),
    }
    batch = (jax.random.randint(keys[3], (6, 12), 0, 50), jax.random.randint(keys[4], (6,), 0, 3))
    return params, batch


def test_entry_leaves_see_through_jit_and_several_inputs() -> None:
    params, batch = token_problem()
    assert entry_paths(jax.jit(token_loss), params, batch) == ["['table']"]

    def two_towers(p, batch):
        x, t = batch
        return jnp.tanh(x @ p["a"]).sum(1) + p["b"][t].sum((1, 2)) * p["c"]

    params = {"a": jnp.ones((3, 2)), "b": jnp.ones((5, 2)), "c": jnp.ones(())}
    batch = (jnp.ones((4, 3)), jnp.zeros((4, 2), jnp.int32))
    assert entry_paths(two_towers, params, batch) == ["['a']", "['b']"]


def wide_loss(p, x):
    """Many activations per sample for few parameters, and a batch smaller than ``w``: the
    pass is made distinct through the batch."""
    return jnp.sum(jnp.tanh(x[..., None] * p["w"]) ** 2 @ p["v"], axis=1)


def wide_problem():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {
        "w": jax.random.normal(keys[0], (400,), jnp.float64),
        "v": jax.random.normal(keys[1], (400,), jnp.float64),
    }
    return params, jax.random.normal(keys[2], (3, 10), jnp.float64)


def wide_mlp_problem():
    """Few activations per sample for many parameters: the pass shares the step's forward."""
    case = models.get("mlp")
    params = models.init_mlp(sizes=(5, 300, models.N_CLASSES))
    x, y = case.batches[0]
    return case.loss_fn, params, (x[:2], y[:2])


PROBLEMS = {
    # (loss, params, batch): which of the three ways the pass goes
    "shared forward": wide_mlp_problem,
    "distinct through the batch": lambda: (wide_loss, *wide_problem()),
    "distinct through the embedding table": lambda: (token_loss, *token_problem()),
}


@pytest.mark.parametrize("budget", [0, 2**30], ids=["recompute", "within budget: shared"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_directional_equals_the_plain_jvp(name: str, budget: int) -> None:
    loss_fn, params, batch = PROBLEMS[name]()
    params = jax.tree.map(jnp.asarray, params)
    direction = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    after = jnp.arange(3.0)
    got = jax.jit(per_sample.directional, static_argnums=(0, 5))(
        loss_fn, params, batch, direction, after, budget
    )
    want = jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)


def test_alpha_and_the_inner_test_on_an_activation_heavy_model() -> None:
    """Through the step, where the passes are made distinct: the brute-force values."""
    params, batch = token_problem()
    step = lm.instrument(token_loss, optax.sgd(0.3), [lm.Alpha(), lm.InnerTest()])
    state, metrics = step(step.init(params), batch)
    start = reference.per_sample_grads(token_loss, params, batch)
    end = reference.per_sample_grads(token_loss, state.params, batch)
    d = reference.flatten(state.params) - reference.flatten(params)
    want = reference.alpha(start.losses, start.grads, end.losses, end.grads, d)
    np.testing.assert_allclose(metrics["alpha"], want, rtol=1e-9)
    np.testing.assert_allclose(metrics["inner_test"], reference.inner_test(start.grads), rtol=1e-9)
