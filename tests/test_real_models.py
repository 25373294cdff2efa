"""Models as people train them: randomness, model state, coupled samples, optimizers that
need the loss. Values against brute force (a Python loop of ``jax.grad`` over the samples of
the batched loss, so with the batched pass's own dropout masks), float64."""

from __future__ import annotations

import collections
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import lmd4ml as lm

B, D, H, C = 8, 5, 6, 3
KEY = jax.random.key(7)


def batch_of(seed: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(B, D))), jnp.asarray(rng.integers(0, C, B))


BATCHES = [batch_of(s) for s in range(3)]


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(D, H)) / np.sqrt(D)),
        "b1": jnp.zeros(H),
        "w2": jnp.asarray(rng.normal(size=(H, C)) / np.sqrt(H)),
    }


def dropout_loss(params: dict, batch: tuple, *, key: jax.Array) -> jax.Array:
    """An MLP with dropout on its hidden layer: one mask per sample, drawn from ``key``."""
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    keep = jax.random.bernoulli(key, 0.6, h.shape)
    logits = jnp.where(keep, h / 0.6, 0.0) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


SUM_GRADS = lm.PerSample(
    "sum_grads",
    lambda grads, params: jnp.concatenate(
        [jnp.sum(g, axis=0).ravel() for g in jax.tree.leaves(grads)]
    ),
    "sum",
)


def mean_gap(ctx: lm.StepContext) -> jax.Array:
    """max |mean of the per-sample pass's ∇ℓᵢ − the optimizer's g|, relative to max |g|."""
    g = jnp.concatenate([x.ravel() for x in jax.tree.leaves(ctx.grads)])
    mean = ctx.per_sample(SUM_GRADS) / ctx.batch_size
    return jnp.max(jnp.abs(mean - g)) / jnp.max(jnp.abs(g))


GAP = lm.quantity("mean_gap", mean_gap, per_sample=[SUM_GRADS])


def test_dropout_per_sample_statistics_use_the_batched_masks() -> None:
    """Each statistic equals the loop over the batched pass's ∇ℓᵢ, masks and all."""
    quantities = [
        lm.Loss(),
        lm.GradNorm(),
        lm.NormTest(),
        lm.InnerTest(),
        lm.OrthoTest(),
        lm.MeanGSNR(),
        lm.GradHist1d(nbins=12, maxval=0.5),
        GAP,
    ]
    step = lm.instrument(dropout_loss, optax.sgd(0.1), quantities)
    state = step.init(init_params(), key=KEY)
    for t, batch in enumerate(BATCHES):
        params = state.params
        state, m = step(state, batch)
        key_t = jax.random.fold_in(KEY, t)
        grads = reference.batched_grads(partial(dropout_loss, batch=batch, key=key_t), params)
        assert float(m["mean_gap"]) < 1e-12
        np.testing.assert_allclose(m["loss"], dropout_loss(params, batch, key=key_t).mean())
        np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(grads.mean(0)), rtol=1e-10)
        np.testing.assert_allclose(m["norm_test"], reference.norm_test(grads), rtol=1e-9)
        np.testing.assert_allclose(m["inner_test"], reference.inner_test(grads), rtol=1e-9)
        np.testing.assert_allclose(m["ortho_test"], reference.ortho_test(grads), rtol=1e-9)
        np.testing.assert_allclose(m["mean_gsnr"], reference.mean_gsnr(grads), rtol=1e-9)
        np.testing.assert_array_equal(m["grad_hist_1d"], reference.grad_hist_1d(grads, 12, 0.5))
    assert step.trace_count[frozenset(step.keys)] == 1


def test_dropout_keys_are_the_same_tracked_or_not() -> None:
    """Step t uses fold_in(key, t), whether or not it is tracked: the same training."""
    step = lm.instrument(dropout_loss, optax.sgd(0.1), [lm.Loss(), lm.NormTest()])
    tracked = bare = step.init(init_params(), key=KEY)
    for batch in BATCHES:
        tracked, _ = step(tracked, batch)
        bare, _ = step(bare, batch, track=False)
    np.testing.assert_allclose(reference.flatten(tracked.params), reference.flatten(bare.params))


def test_alpha_and_hessian_see_the_step_masks() -> None:
    """α's end point and Hessian products evaluate the loss with the step's key."""
    step = lm.instrument(dropout_loss, optax.sgd(0.1), [lm.Alpha(), lm.HessMaxEV()])
    state = step.init(init_params(), key=KEY)
    params = state.params
    _, m = step(state, BATCHES[0])
    fixed = jax.random.fold_in(KEY, 0)
    loss = lambda p: dropout_loss(p, BATCHES[0], key=fixed)  # noqa: E731
    grads = reference.batched_grads(loss, params)
    new = reference.unflatten_like(reference.flatten(params) - 0.1 * grads.mean(0), params)
    end_grads = reference.batched_grads(loss, new)
    expected = reference.alpha(
        np.asarray(loss(params)), grads, np.asarray(loss(new)), end_grads, -0.1 * grads.mean(0)
    )
    np.testing.assert_allclose(m["alpha"], expected, rtol=1e-8)
    hessian = reference.hessian(lambda p, b: dropout_loss(p, b, key=fixed), params, BATCHES[0])
    np.testing.assert_allclose(m["hess_max_ev"], np.linalg.eigvalsh(hessian)[-1], rtol=1e-6)


class DropoutNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D, H, rngs=rngs, param_dtype=jnp.float64)
        self.drop = nnx.Dropout(0.4, rngs=rngs)
        self.l2 = nnx.Linear(H, C, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(self.drop(nnx.relu(self.l1(x))))


class BatchNormNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D, H, rngs=rngs, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(H, rngs=rngs, param_dtype=jnp.float64)
        self.l2 = nnx.Linear(H, C, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def module_loss(model: nnx.Module, batch: tuple) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def test_nnx_dropout_learner_trains_with_consistent_masks() -> None:
    net = DropoutNet(nnx.Rngs(0, dropout=1))
    net.train()
    learner = lm.Learner(net, module_loss, BATCHES, optax.sgd(0.05), [*lm.presets.economy(), GAP])
    graphdef = nnx.graphdef(net)
    before = learner.state
    history = lm.train(learner, epochs=1, progress=False, runs_dir=None)
    for key, values in history.items():
        if key != "step":
            assert np.all(np.isfinite(values)), key
    assert np.max(history["mean_gap"]) < 1e-12

    # Step 0 by brute force, from the module's state before it (its RNG count included).
    def losses(p: nnx.State) -> jax.Array:
        p, rest = jax.tree.map(lambda x: x, (p, before.model_state))  # Variables of this trace
        return module_loss(nnx.merge(graphdef, p, rest), BATCHES[0])

    grads = reference.batched_grads(losses, before.params)
    np.testing.assert_allclose(history["norm_test"][0], reference.norm_test(grads), rtol=1e-9)
    # The RNG count moved once per step, as in nnx's own training.
    counts = [x for x in jax.tree.leaves(learner.model_state) if x.dtype == jnp.uint32]
    assert [int(c) for c in counts] == [len(BATCHES)]


def plain_nnx_training(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Module:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for batch in BATCHES:
        grads = nnx.grad(lambda m, b: module_loss(m, b).mean())(model, batch)
        optimizer.update(model, grads)
    return model


def test_nnx_batchnorm_trains_batch_level_instruments_and_moves_its_statistics() -> None:
    bn = BatchNormNet(nnx.Rngs(0))
    bn.train()
    quantities = [lm.Loss(), lm.GradNorm(), lm.Distance(), lm.UpdateSize(), lm.HessMaxEV()]
    learner = lm.Learner(bn, module_loss, BATCHES, optax.sgd(0.05), quantities)
    history = lm.train(learner, epochs=1, progress=False, runs_dir=None)
    assert np.all(np.isfinite(history["hess_max_ev"]))
    plain = plain_nnx_training(BatchNormNet(nnx.Rngs(0)), optax.sgd(0.05))
    trained = learner.model
    for ours, theirs in zip(
        jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(plain)), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(trained.bn.mean[...])) > 1e-3  # the running mean moved


def test_per_sample_instrument_on_train_mode_batchnorm_names_batchnorm() -> None:
    bn = BatchNormNet(nnx.Rngs(0))
    bn.train()
    learner = lm.Learner(bn, module_loss, BATCHES, optax.sgd(0.05), [lm.Loss(), lm.NormTest()])
    with pytest.raises(ValueError, match="BatchNorm"):
        lm.train(learner, epochs=1, progress=False, runs_dir=None)
    bn.eval()  # running averages: samples no longer interact
    learner = lm.Learner(bn, module_loss, BATCHES, optax.sgd(0.05), [lm.NormTest()])
    assert np.all(np.isfinite(lm.train(learner, progress=False, runs_dir=None)["norm_test"]))


def test_a_batch_centred_loss_is_refused_for_per_sample_instruments() -> None:
    def centred(params: dict, batch: tuple) -> jax.Array:
        x, y = batch
        x = x - x.mean(axis=0)  # couples every sample to the batch
        return optax.softmax_cross_entropy_with_integer_labels(x @ params["w1"] @ params["w2"], y)

    step = lm.instrument(centred, optax.sgd(0.1), [lm.Loss(), lm.GradHist1d()])
    state = step.init(init_params())
    with pytest.raises(ValueError, match="samples") as caught:
        step(state, BATCHES[0])
    assert "BatchNorm" not in str(caught.value)
    state, m = step(state, BATCHES[0], track=["loss"])  # batch-level: fine
    assert np.isfinite(m["loss"])


def linear_loss(w: jax.Array, batch: tuple) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, y)


def plain_optax(tx: optax.GradientTransformation, w: jax.Array) -> jax.Array:
    """The optimizer's own loop, with the extra arguments optax documents."""
    state = tx.init(w)
    for batch in BATCHES:
        value_fn = lambda v: linear_loss(v, batch).mean()  # noqa: B023, E731
        value, grad = jax.value_and_grad(value_fn)(w)
        updates, state = tx.update(grad, state, w, value=value, grad=grad, value_fn=value_fn)
        w = optax.apply_updates(w, updates)
    return w


@pytest.mark.parametrize(
    "make",
    [
        optax.lbfgs,
        optax.polyak_sgd,
        lambda: optax.chain(
            optax.sgd(1.0), optax.scale_by_backtracking_linesearch(max_backtracking_steps=15)
        ),
        lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
    ],
    ids=["lbfgs", "polyak_sgd", "backtracking", "inject_hyperparams"],
)
def test_optimizers_that_need_the_loss(make: callable) -> None:
    w0 = jnp.zeros((D, C))
    step = lm.instrument(linear_loss, make(), [lm.Loss(), lm.NormTest(), lm.UpdateSize()])
    state = step.init(w0)
    for batch in BATCHES:
        state, m = step(state, batch)
        assert np.isfinite(m["norm_test"]) and m["update_size"] > 0
    np.testing.assert_allclose(state.params, plain_optax(make(), w0), rtol=1e-10, atol=1e-12)

    tx = lm.monitor(make(), [lm.Loss(), lm.NormTest()])
    w, opt_state = w0, tx.init(w0)
    for batch in BATCHES:
        grads = jax.grad(lambda v: linear_loss(v, batch).mean())(w)  # noqa: B023
        updates, opt_state = tx.update(grads, opt_state, w, loss_fn=linear_loss, batch=batch)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w, plain_optax(make(), w0), rtol=1e-10, atol=1e-12)


def test_optimizers_that_need_something_else_say_what() -> None:
    w0 = jnp.zeros((D, C))
    with pytest.raises(TypeError, match="per-example gradients"):
        lm.instrument(linear_loss, optax.contrib.dpsgd(0.1, 1.0, 0.1, 0), []).init(w0)
    step = lm.instrument(linear_loss, optax.contrib.sophia(0.1), [lm.Loss()])
    with pytest.raises(TypeError, match="obj_fn"):
        step(step.init(w0), BATCHES[0])


def test_the_protocol_refuses_what_does_not_fit() -> None:
    w = init_params()
    # Declared model state, but the loss returns only the losses.
    step = lm.instrument(
        lambda p, b, *, model_state: dropout_loss(p, b, key=KEY), optax.sgd(0.1), [lm.Loss()]
    )
    with pytest.raises(TypeError, match=r"must return a pair .*\(losses, new_model_state\)"):
        step(step.init(w, model_state={"n": jnp.zeros(())}), BATCHES[0])
    # A loss that wants a key it is not given, and a key where the batch goes.
    step = lm.instrument(dropout_loss, optax.sgd(0.1), [lm.Loss()])
    with pytest.raises(TypeError, match="key"):
        step(step.init(w), BATCHES[0])
    with pytest.raises(TypeError, match="PRNG key"):
        step(step.init(w, key=KEY), KEY)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        step.init(w, key=3)
    # has_aux: the aux comes back third.
    step = lm.instrument(
        lambda p, b, *, key: (dropout_loss(p, b, key=key), {"n": b[1].shape[0]}),
        optax.sgd(0.1),
        [lm.Loss()],
        has_aux=True,
    )
    _, metrics, aux = step(step.init(w, key=KEY), BATCHES[0])
    assert int(aux["n"]) == B and np.isfinite(metrics["loss"])
    # A new model state of another shape.
    step = lm.instrument(
        lambda p, b, *, model_state: (linear_loss(p["w1"] @ p["w2"], b), jnp.zeros(3)),
        optax.sgd(0.1),
        [lm.Loss()],
    )
    with pytest.raises(ValueError, match="structure and shapes"):
        step(step.init(w, model_state=jnp.zeros(2)), BATCHES[0])


def plain_loss(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


EVERY_KIND = [
    *lm.presets.economy(),
    lm.MeanGSNR(),
    lm.EarlyStopping(),
    lm.CABS(),
    lm.NoiseScale(),
    lm.TICDiag(),
    lm.TICTrace(),
    lm.HessTrace(),
    lm.HessMaxEV(),
    lm.GradHist2d(bins=(6, 5), range=((-0.5, 0.5), (-1.0, 1.0))),
]


def padded(batch: tuple, n: int) -> tuple[tuple, jax.Array]:
    """The first ``n`` samples of ``batch``, padded back to B with copies of them, and the mask."""
    index = np.arange(B) % n
    return jax.tree.map(lambda x: x[:n][index], batch), jnp.arange(B) < n


def test_a_padded_batch_gives_what_its_real_samples_give() -> None:
    """Every quantity, and the update, on 5 real samples padded to 8 equal those on the 5."""
    step = lm.instrument(plain_loss, optax.adam(0.05), EVERY_KIND)
    batch, mask = padded(BATCHES[0], 5)
    real = jax.tree.map(lambda x: x[:5], BATCHES[0])
    state = step.init(init_params())
    ours, m = step(state, batch, mask=mask)
    theirs, expected = step(state, real)
    for key in step.keys:
        np.testing.assert_allclose(m[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(reference.flatten(ours.params), reference.flatten(theirs.params))
    grads = reference.per_sample_grads(plain_loss, state.params, real).grads
    np.testing.assert_allclose(m["norm_test"], reference.norm_test(grads), rtol=1e-9)
    assert np.asarray(m["grad_hist_1d"]).sum() == 5 * grads.shape[1]
    # A batch left with one real sample: NaN where two are needed, no error.
    one, mask = padded(BATCHES[0], 1)
    _, m = step(state, one, mask=mask)
    assert np.isnan(m["norm_test"]) and np.isnan(m["alpha"]) and np.isfinite(m["loss"])
    assert step.trace_count[frozenset(step.keys)] == 2  # 8 samples, with and without a mask


def test_lm_monitor_takes_the_mask_too() -> None:
    quantities = [lm.Loss(), lm.NormTest(), lm.GradHist1d(nbins=8, maxval=0.5)]
    batch, mask = padded(BATCHES[1], 6)
    real = jax.tree.map(lambda x: x[:6], BATCHES[1])
    w = init_params()
    tx = lm.monitor(optax.sgd(0.1), quantities)
    grads = jax.grad(lambda p: plain_loss(p, real).mean())(w)
    _, opt_state = tx.update(grads, tx.init(w), w, loss_fn=plain_loss, batch=batch, mask=mask)
    step = lm.instrument(plain_loss, optax.sgd(0.1), quantities)
    _, expected = step(step.init(w), real)
    m = lm.metrics(opt_state)
    for key in expected:
        np.testing.assert_allclose(m[key], expected[key], rtol=1e-9, err_msg=key)


def test_train_pads_or_drops_a_short_last_batch() -> None:
    short = jax.tree.map(lambda x: x[:5], BATCHES[2])
    data = [*BATCHES[:2], short]
    learner = lm.Learner(init_params(), plain_loss, data, optax.sgd(0.1), lm.presets.economy())
    history = lm.train(learner, epochs=2, progress=False, runs_dir=None)
    assert history["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert learner.step.trace_count[frozenset(learner.step.keys)] == 1  # one program
    # Step 2 (padded) against the same state stepped on the 5 real samples alone.
    two = lm.Learner(init_params(), plain_loss, BATCHES[:2], optax.sgd(0.1), lm.presets.economy())
    lm.train(two, progress=False, runs_dir=None)
    _, alone = two.step(two.state, short)
    for key in ("loss", "norm_test", "alpha", "distance", "grad_hist_1d"):
        np.testing.assert_allclose(history[key][2], alone[key], rtol=1e-9, err_msg=key)
    learner = lm.Learner(init_params(), plain_loss, data, optax.sgd(0.1), [lm.Loss()])
    history = lm.train(learner, progress=False, runs_dir=None, last_batch="drop")
    assert history["step"].tolist() == [0, 1]


def test_train_drops_a_short_batch_where_samples_interact() -> None:
    short = jax.tree.map(lambda x: x[:5], BATCHES[2])
    bn = BatchNormNet(nnx.Rngs(0))
    bn.train()
    learner = lm.Learner(bn, module_loss, [*BATCHES[:2], short], optax.sgd(0.05), [lm.Loss()])
    with pytest.warns(RuntimeWarning, match="BatchNorm in training mode"):
        history = lm.train(learner, progress=False, runs_dir=None)
    assert history["step"].tolist() == [0, 1]


def test_a_mask_of_the_wrong_shape_is_refused() -> None:
    step = lm.instrument(plain_loss, optax.sgd(0.1), [lm.Loss()])
    state = step.init(init_params())
    with pytest.raises(ValueError, match=r"one entry per sample, shape \(8,\); got shape \(5,\)"):
        step(state, BATCHES[0], mask=jnp.ones(5, bool))
    with pytest.raises(TypeError, match="pass has_aux=True"):
        lm.instrument(lambda p, b: (plain_loss(p, b), 0), optax.sgd(0.1), [lm.Loss()])(
            state, BATCHES[0]
        )


COMPILES = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: COMPILES.update([event])
)


def compilations() -> int:
    """XLA programs compiled so far in this process."""
    return COMPILES["/jax/core/compile/backend_compile_duration"]


def test_nothing_compiles_after_the_first_epoch() -> None:
    """Dropout, BatchNorm statistics, RNG counts and a padded last batch: a second epoch,
    tracked and untracked steps alike, compiles nothing (XLA compilations counted)."""

    net = DropoutNet(nnx.Rngs(0, dropout=1))
    data = [*BATCHES[:2], jax.tree.map(lambda x: x[:5], BATCHES[2])]
    learner = lm.Learner(net, module_loss, data, optax.adam(0.01), lm.presets.economy())
    lm.train(learner, epochs=1, track_every=2, progress=False, runs_dir=None)
    before = compilations()
    lm.train(learner, epochs=2, track_every=2, progress=False, runs_dir=None)
    assert compilations() == before
