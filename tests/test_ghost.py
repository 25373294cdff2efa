"""Ghost norms and factored per-sample gradients against plain per-sample gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import linen as nn
from flax import nnx

import lmd4ml as lm
from lmd4ml.stats import factored_leaves, ghost


def plain_sq_norms(grads) -> np.ndarray:
    return sum(
        np.sum(np.asarray(g).reshape(g.shape[0], -1) ** 2, 1) for g in jax.tree.leaves(grads)
    )


def assert_matches_plain(loss_fn, params, batch) -> None:
    @jax.jit
    def both(params, batch):
        f = ghost.factors(loss_fn, params, batch)
        losses, plain = ghost._plain_grads(loss_fn, params, batch)
        return (
            f.losses,
            ghost.sq_norms(f),
            ghost.grads(f, params),
            ghost.grad_sum(f, params),
            (
                losses,
                plain,
            ),
        )

    f_losses, sq_norms, grads, summed, (losses, plain) = both(params, batch)
    np.testing.assert_allclose(f_losses, losses, rtol=1e-12)
    np.testing.assert_allclose(f_losses, loss_fn(params, batch), rtol=1e-12)
    np.testing.assert_allclose(sq_norms, plain_sq_norms(plain), rtol=1e-12)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # The batch's summed gradient from the factors is the sum of the per-sample ones.
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, np.sum(want, axis=0), rtol=1e-12, atol=1e-13)


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
    want = plain_sq_norms(ghost._plain_grads(loss, params, x)[1])
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------- embedding row lookups

VOCAB, WIDTH, POSITIONS = 11, 4, 5


def tokens(out_of_range: bool = False) -> jax.Array:
    """Three sequences of 5 tokens; the first repeats token 2, so rows share gradient terms."""
    t = jax.random.randint(jax.random.PRNGKey(4), (3, POSITIONS), 0, VOCAB).at[0, :3].set(2)
    return t.at[1, 0].set(VOCAB + 3) if out_of_range else t


def lookup_loss(look):
    def loss(p, batch):
        return jnp.sum(jnp.tanh(look(p["table"], batch) @ p["w"]) ** 2, axis=1)

    return loss


LOOKUPS = {
    "index": (lambda table, t: table[t], False),
    "take_clip": (lambda table, t: jnp.take(table, t, axis=0, mode="clip"), True),
    "take_fill": (lambda table, t: jnp.take(table, t, axis=0, fill_value=0.0), True),
}


@pytest.mark.parametrize("name", sorted(LOOKUPS))
def test_embedding_lookups_are_factored_and_match_plain(name):
    look, out_of_range = LOOKUPS[name]
    key1, key2 = jax.random.split(jax.random.PRNGKey(5))
    params = {
        "table": jax.random.normal(key1, (VOCAB, WIDTH), jnp.float64),
        "w": jax.random.normal(key2, (WIDTH,), jnp.float64),
    }
    batch = tokens(out_of_range)
    assert factored_leaves(lookup_loss(look), params, batch) == ["['table']", "['w']"]
    assert_matches_plain(lookup_loss(look), params, batch)


def test_flax_embed_layers_are_factored():
    nnx_model = nnx.Embed(VOCAB, WIDTH, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, nnx_params = nnx.split(nnx_model)
    linen_model = nn.Embed(VOCAB, WIDTH, param_dtype=jnp.float64)
    batch = tokens()
    linen_params = linen_model.init(jax.random.PRNGKey(0), batch)

    def nnx_loss(p, t):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(t)) ** 2, axis=(1, 2))

    def linen_loss(p, t):
        return jnp.sum(jnp.tanh(linen_model.apply(p, t)) ** 2, axis=(1, 2))

    for loss, params in ((nnx_loss, nnx_params), (linen_loss, linen_params)):
        assert len(factored_leaves(loss, params, batch)) == 1
        assert_matches_plain(loss, params, batch)


def test_lookups_of_more_positions_than_rows_keep_plain_gradients():
    table = jax.random.normal(jax.random.PRNGKey(6), (3, WIDTH), jnp.float64)
    batch = jax.random.randint(jax.random.PRNGKey(7), (2, 8), 0, 3)

    def loss(table, t):
        return jnp.sum(jnp.tanh(table[t]) ** 2, axis=(1, 2))

    assert factored_leaves(loss, table, batch) == []
    assert_matches_plain(loss, table, batch)


# --------------------------------------------------------------------------- convolutions

CONVS = {
    # dimension numbers, input (batch first), kernel, keyword arguments
    "nhwc_same": (("NHWC", "HWIO", "NHWC"), (5, 4, 4, 16), (3, 3, 16, 32), {"padding": "SAME"}),
    "nhwc_strided": (
        ("NHWC", "HWIO", "NHWC"),
        (5, 6, 6, 8),
        (3, 3, 8, 40),
        {"window_strides": (2, 2), "padding": "VALID"},
    ),
    "nchw_dilated": (
        ("NCHW", "OIHW", "NCHW"),
        (5, 8, 5, 5),
        (30, 8, 2, 3),
        {"window_strides": (1, 2), "padding": ((1, 0), (0, 2)), "rhs_dilation": (2, 1)},
    ),
    "nwc_transposed": (
        ("NWC", "WIO", "NWC"),
        (5, 3, 10),
        (2, 10, 24),
        {"padding": ((1, 1),), "lhs_dilation": (2,)},
    ),
}


def conv_loss(dimension_numbers, **kwargs):
    def loss(w, x):
        window = {"window_strides": (1,) * (w.ndim - 2), **kwargs}
        y = jax.lax.conv_general_dilated(x, w, dimension_numbers=dimension_numbers, **window)
        return jnp.sum(jnp.tanh(y) ** 2, axis=tuple(range(1, y.ndim)))

    return loss


@pytest.mark.parametrize("name", sorted(CONVS))
def test_convolutions_with_few_positions_are_factored_and_match_plain(name):
    dimension_numbers, x_shape, w_shape, kwargs = CONVS[name]
    key1, key2 = jax.random.split(jax.random.PRNGKey(8))
    w = jax.random.normal(key1, w_shape, jnp.float64)
    x = jax.random.normal(key2, x_shape, jnp.float64)
    loss = conv_loss(dimension_numbers, **kwargs)
    assert factored_leaves(loss, w, x) == [""]
    assert_matches_plain(loss, w, x)


@pytest.mark.parametrize("groups", [1, 2])
def test_convolutions_with_many_positions_or_groups_keep_plain_gradients(groups):
    # 8 × 8 positions × (3·3·4 + 8) > 3·3·4 × 8; grouped kernels are never factored, not even
    # with 2 × 2 positions. Either way the kernel is (3, 3, 4, 8).
    x_shape = (3, 8, 8, 4) if groups == 1 else (3, 2, 2, 8)
    w = jax.random.normal(jax.random.PRNGKey(9), (3, 3, 4, 8), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(10), x_shape, jnp.float64)

    def loss(w, x):
        y = jax.lax.conv_general_dilated(
            x,
            w,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        return jnp.sum(jnp.tanh(y) ** 2, axis=(1, 2, 3))

    assert factored_leaves(loss, w, x) == []
    assert_matches_plain(loss, w, x)


def test_flax_conv_layers_are_factored():
    x = jax.random.normal(jax.random.PRNGKey(11), (4, 3, 3, 12), jnp.float64)
    nnx_model = nnx.Conv(12, 16, (2, 2), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, nnx_params = nnx.split(nnx_model)
    linen_model = nn.Conv(16, (2, 2), strides=2, param_dtype=jnp.float64)
    linen_params = linen_model.init(jax.random.PRNGKey(0), x)

    def nnx_loss(p, x):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(x)) ** 2, axis=(1, 2, 3))

    def linen_loss(p, x):
        return jnp.sum(jnp.tanh(linen_model.apply(p, x)) ** 2, axis=(1, 2, 3))

    for loss, params in ((nnx_loss, nnx_params), (linen_loss, linen_params)):
        assert [path for path in factored_leaves(loss, params, x) if "kernel" in path]
        assert_matches_plain(loss, params, x)


class TokenModel(nnx.Module):
    """Embed → self-attention (2 heads) → LayerNorm → mean over positions → Dense."""

    def __init__(self, rngs: nnx.Rngs):
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
        self.embed = nnx.Embed(VOCAB, 6, rngs=rngs, **f64)
        self.attention = nnx.MultiHeadAttention(2, 6, decode=False, rngs=rngs, **f64)
        self.norm = nnx.LayerNorm(6, rngs=rngs, **f64)
        self.head = nnx.Linear(6, 3, rngs=rngs, **f64)

    def __call__(self, t: jax.Array) -> jax.Array:
        h = self.embed(t)
        return self.head(self.norm(h + self.attention(h)).mean(axis=1))


def test_token_model_quantities_match_brute_force():
    graphdef, params = nnx.split(TokenModel(nnx.Rngs(0)))
    batch = (tokens(), jnp.array([0, 2, 1]))

    def loss_fn(p, batch):
        t, y = batch
        logits = nnx.merge(graphdef, p)(t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    assert "['embed']['embedding'].value" in "".join(factored_leaves(loss_fn, params, batch))
    quantities = [lm.NormTest(), lm.OrthoTest(), lm.NoiseScale(), lm.GradHist1d(15, 0.2)]
    step = lm.instrument(loss_fn, optax.adam(1e-2), quantities)
    _, metrics = step(step.init(params), batch)
    ps = reference.per_sample_grads(loss_fn, params, batch)
    s, g2 = reference.noise_scale_estimates(ps.grads)
    # In float64 this model's batched gradient and the mean of its one-sample gradients differ
    # by ~5e-9 relative (flax's attention, with no lmd4ml code involved): the tolerance.
    rtol = 1e-7
    np.testing.assert_allclose(metrics["norm_test"], reference.norm_test(ps.grads), rtol=rtol)
    np.testing.assert_allclose(metrics["ortho_test"], reference.ortho_test(ps.grads), rtol=rtol)
    np.testing.assert_allclose(metrics["noise_scale"], s / g2, rtol=rtol)
    np.testing.assert_array_equal(
        metrics["grad_hist_1d"], reference.grad_hist_1d(ps.grads, 15, 0.2)
    )
