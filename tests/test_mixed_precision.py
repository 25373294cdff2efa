"""Mixed precision: bfloat16 parameters or activations, statistics accumulated in float32.

Two checks. A bfloat16 linear model on small integers has per-sample gradients, mean
gradient, update and Hessian that bfloat16 holds exactly, while their sums of squares do not
fit its 8 significant bits: every quantity must then equal the float64 reference to float32
round-off, which only accumulation in float32 (or wider) gives. And flax models computing in
bfloat16 on float32 parameters (linen and nnx: dense, conv, attention, LayerNorm) must agree
with the brute-force reference of the same bfloat16 model to bfloat16's precision. There the
mean gradient is the one the optimizer gets, from the batched backward pass in bfloat16,
which differs from the mean of the per-sample gradients by up to 1%; MeanGSNR and
EarlyStopping divide by per-coordinate variances mⱼ − gⱼ² that cancel, and move by more, so
they are checked in the first test only, where the mean gradient is exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import lmd4ml as lm

BF16 = jnp.bfloat16
F32_RTOL = 1e-6
BF16_RTOL = 3e-2  # a few bfloat16 ulps (2⁻⁸ = 3.9e-3), amplified by differences of sums
LR = 1 / 16  # a power of two: the SGD update of the integer model is exact in bfloat16
B, D = 16, 8


def integer_case() -> tuple:
    """ℓᵢ = ½(w·xᵢ − yᵢ)², w and xᵢ in {−1, 0, 1}, yᵢ in [−6, 6]: |residual| ≤ 14, so every
    per-sample gradient element, ℓᵢ, each coordinate of Σᵢ∇ℓᵢ (≤ 224) and the update are
    exact in bfloat16; ‖∇ℓᵢ‖² (up to 1568) and its sums are not."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.integers(-1, 2, D), BF16)
    x = jnp.asarray(rng.integers(-1, 2, (B, D)), BF16)
    y = jnp.asarray(rng.integers(-6, 7, B), BF16)

    def loss_fn(w: jax.Array, batch: tuple) -> jax.Array:
        x, y = batch
        return 0.5 * jnp.square(x @ w - y)

    return loss_fn, w, (x, y)


def every_quantity(hessian_method: str) -> list[lm.Quantity]:
    return [
        lm.Loss(),
        lm.GradNorm(),
        lm.Distance(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.InnerTest(),
        lm.OrthoTest(),
        lm.GradHist1d(nbins=11, maxval=20.0),
        lm.GradHist2d(bins=(5, 3), range=((-20.0, 20.0), (-1.5, 1.5))),
        lm.Alpha(),
        lm.MeanGSNR(),
        lm.EarlyStopping(),
        lm.CABS(),
        lm.NoiseScale(),
        lm.TICDiag(method=hessian_method),
        lm.TICTrace(method=hessian_method),
        lm.HessTrace(method=hessian_method),
        lm.HessMaxEV(rtol=1e-4),
    ]


def expected_values(loss_fn, params, batch, new_params) -> dict:
    """Every quantity of the first step, from the brute-force loop over the model's own
    per-sample gradients, in float64."""
    ps = reference.per_sample_grads(loss_fn, params, batch)
    after = reference.per_sample_grads(loss_fn, new_params, batch)
    theta, theta_next = reference.flatten(params), reference.flatten(new_params)
    g = reference.mean_grad(ps.grads)
    hess = reference.hessian(lambda p, b: loss_fn(p.astype(jnp.float64), b), theta, batch)
    diag = np.diag(hess)
    second_moment = np.mean(ps.grads**2, axis=0)
    s, g2 = reference.noise_scale_estimates(ps.grads)
    update = -LR * g
    return {
        "loss": ps.losses.mean(),
        "grad_norm": np.linalg.norm(g),
        "distance": 0.0,
        "update_size": np.linalg.norm(update),
        "norm_test": reference.norm_test(ps.grads),
        "inner_test": reference.inner_test(ps.grads),
        "ortho_test": reference.ortho_test(ps.grads),
        "grad_hist_1d": reference.grad_hist_1d(ps.grads, 11, 20.0),
        "grad_hist_2d": reference.grad_hist_2d(ps.grads, theta, (5, 3), ((-20, 20), (-1.5, 1.5))),
        "alpha": reference.alpha(ps.losses, ps.grads, after.losses, after.grads, update),
        "mean_gsnr": reference.mean_gsnr(ps.grads),
        "early_stopping": reference.early_stopping(ps.grads),
        "cabs": reference.cabs(ps.grads, ps.losses, LR),
        "noise_scale": s / g2,
        "tic_diag": np.sum(second_moment / (diag + 1e-7)),
        "tic_trace": np.mean(np.sum(ps.grads**2, axis=1)) / (np.sum(diag) + 1e-7),
        "hess_trace": np.sum(diag),
        "hess_max_ev": np.linalg.eigvalsh(hess)[-1],
        "theta_next": theta_next,
    }


# θ₁ = θ₀ + u rounds to bfloat16, so the end point's losses and slopes carry its rounding;
# Lanczos's vectors are rounded to bfloat16 for every Hessian-vector product.
ROUNDED = {"alpha": BF16_RTOL, "hess_max_ev": 1e-2}


@pytest.mark.parametrize("hessian_method", ["exact", "hutchinson"])
def test_bfloat16_params_accumulate_in_float32(hessian_method: str) -> None:
    loss_fn, w, batch = integer_case()
    step = lm.instrument(loss_fn, optax.sgd(LR), every_quantity(hessian_method))
    state = step.init(w)
    new_state, metrics = step(state, batch)
    assert new_state.params.dtype == BF16
    expected = expected_values(loss_fn, w, batch, new_state.params)
    # The exact product of each Rademacher probe with this Hessian is a small integer too.
    np.testing.assert_array_equal(reference.flatten(new_state.params), expected["theta_next"])
    for key, value in lm.stats.to_host(metrics).items():
        if key.startswith("grad_hist"):
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
            continue
        if key == "hess_max_ev_converged":
            assert value.dtype == np.bool_ and value, key
            continue
        if key == "hess_max_ev_iterations":
            assert value.dtype == np.int32 and 1 <= value <= 100, key
            continue
        assert value.dtype == np.float32, f"{key} is {value.dtype}, expected float32"
        if hessian_method == "hutchinson" and key in ("tic_diag", "tic_trace", "hess_trace"):
            continue  # an estimate: checked against the exact diagonal below
        rtol = ROUNDED.get(key, F32_RTOL)
        np.testing.assert_allclose(value, expected[key], rtol=rtol, atol=1e-6, err_msg=key)
    if hessian_method == "hutchinson":
        # ±1 probes of a Hessian of small integers over 16: each estimate is exact in float32
        # arithmetic; its error against the exact trace is Hutchinson's, not rounding's.
        assert np.isfinite(metrics["hess_trace"]) and metrics["hess_trace"] > 0


class LinenMixed(nn.Module):
    """Conv → ReLU → Dense → LayerNorm → Dense, computing in bfloat16 on float32 params."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", dtype=BF16)(x))
        h = nn.Dense(8, dtype=BF16)(h.reshape(h.shape[0], -1))
        h = nn.LayerNorm(dtype=BF16)(h)
        return nn.Dense(models.N_CLASSES, dtype=BF16)(h)


class NnxAttentionMixed(nnx.Module):
    """Dense embedding → self-attention (2 heads) → mean-pool → Dense, in bfloat16."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(3, 8, dtype=BF16, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, dtype=BF16, decode=False, rngs=rngs
        )
        self.head = nnx.Linear(8, models.N_CLASSES, dtype=BF16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x)
        return self.head(self.attention(h).mean(axis=1))


def linen_mixed() -> tuple:
    module = LinenMixed()
    x, y = models.classification_batch(0, (6, 6, 1))
    batch = (x.astype(jnp.float32), y)
    params = module.init(jax.random.key(0), batch[0])

    def loss_fn(params, batch):
        x, y = batch
        return models.cross_entropy(module.apply(params, x).astype(jnp.float32), y)

    return loss_fn, params, batch


def nnx_mixed() -> tuple:
    x, y = models.classification_batch(1, (4, 3))
    graphdef, params = nnx.split(NnxAttentionMixed(nnx.Rngs(0)))

    def loss_fn(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        return models.cross_entropy(logits, y)

    return loss_fn, params, (x.astype(jnp.float32), y)


@pytest.mark.parametrize("make", [linen_mixed, nnx_mixed], ids=["linen_conv", "nnx_attention"])
def test_bfloat16_activations_match_reference(make) -> None:
    loss_fn, params, batch = make()
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    quantities = [
        lm.Loss(),
        lm.GradNorm(),
        lm.NormTest(),
        lm.InnerTest(),
        lm.OrthoTest(),
        lm.NoiseScale(),
        lm.TICTrace(method="exact"),
        lm.HessTrace(method="exact"),
    ]
    step = lm.instrument(loss_fn, optax.adam(1e-2), quantities)
    _, metrics = step(step.init(params), batch)
    ps = reference.per_sample_grads(loss_fn, params, batch)
    hess = reference.hessian(loss_fn, params, batch)
    s, g2 = reference.noise_scale_estimates(ps.grads)
    expected = {
        "loss": ps.losses.mean(),
        "grad_norm": np.linalg.norm(reference.mean_grad(ps.grads)),
        "norm_test": reference.norm_test(ps.grads),
        "inner_test": reference.inner_test(ps.grads),
        "ortho_test": reference.ortho_test(ps.grads),
        "noise_scale": s / g2,
        "tic_trace": np.mean(np.sum(ps.grads**2, axis=1)) / (np.trace(hess) + 1e-7),
        "hess_trace": np.trace(hess),
    }
    for key, value in jax.device_get(metrics).items():
        assert value.dtype == np.float32, f"{key} is {value.dtype}"
        np.testing.assert_allclose(value, expected[key], rtol=BF16_RTOL, err_msg=key)
