"""Ghost norms and factored per-sample gradients against plain per-sample gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmd4ml.stats import factored_leaves, ghost


def plain_sq_norms(grads) -> np.ndarray:
    return sum(
        np.sum(np.asarray(g).reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree.leaves(grads)
    )


def assert_matches_plain(loss_fn, params, batch) -> None:
    @jax.jit
    def both(params, batch):
        f = ghost.factors(loss_fn, params, batch)
        plain = ghost._plain_grads(loss_fn, params, batch)
        return ghost.sq_norms(f), ghost.grads(f, params), plain

    sq_norms, grads, plain = both(params, batch)
    np.testing.assert_allclose(sq_norms, plain_sq_norms(plain), rtol=1e-12)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_every_zoo_model_matches_plain_per_sample_gradients(case):
    assert_matches_plain(case.loss_fn, case.params, case.batches[0])


def test_dense_kernels_are_factored_and_biases_are_not(mlp_case):
    factored = factored_leaves(mlp_case.loss_fn, mlp_case.params, mlp_case.batches[0])
    assert factored and all("w" in path for path in factored)
    n_kernels = sum(
        1
        for p, _ in jax.tree_util.tree_leaves_with_path(mlp_case.params)
        if "w" in jax.tree_util.keystr(p)
    )
    assert len(factored) == n_kernels


def seq_loss(w, x):
    """The parameter as the left operand of an einsum over a sequence of 7 positions."""
    return jnp.sum(jnp.tanh(jnp.einsum("oi,bti->bot", w, x)) ** 2, axis=(1, 2))


@pytest.mark.parametrize(("features", "positions"), [(3, 7), (40, 2)])
def test_sequences_take_gram_or_materialised_form(features, positions):
    # 7 positions × (3 + 4) features > 3 × 4: materialised; 2 × (40 + 4) < 40 × 4: Gram.
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    w = jax.random.normal(key1, (4, features), jnp.float64)
    x = jax.random.normal(key2, (5, positions, features), jnp.float64)
    assert factored_leaves(seq_loss, w, x) == [""]
    assert_matches_plain(seq_loss, w, x)


def test_tied_weights_are_not_factored():
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 3), jnp.float64)

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) @ w.T, axis=1)

    assert factored_leaves(loss, w, x) == []
    assert_matches_plain(loss, w, x)


def test_layers_inside_jit_and_dtype_casts_are_seen_through():
    @jax.jit
    def dense(w, x):
        return x @ w.astype(x.dtype)

    def loss(p, x):
        return jnp.sum(dense(p["b"], jnp.tanh(dense(p["a"], x))), axis=1)

    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"a": jax.random.normal(key1, (3, 5)), "b": jax.random.normal(key2, (5, 2))}
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    x = jax.random.normal(key3, (6, 3), jnp.float64)
    assert factored_leaves(loss, params, x) == ["['a']", "['b']"]
    got = jax.jit(lambda p, x: ghost.sq_norms(ghost.factors(loss, p, x)))(params, x)
    want = plain_sq_norms(ghost._plain_grads(loss, params, x))
    np.testing.assert_allclose(got, want, rtol=1e-6)
