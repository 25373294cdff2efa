"""Every quantity on a batch split over 4 devices equals its single-device value.

Run by tests/test_data_parallel.py in a subprocess with 4 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``); collected only there.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lmd4ml as lm

RTOL = 1e-9
N = 12  # 3 samples per device on 4 devices: a chunk of 2 leaves a remainder
OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}


def every_quantity(curvature: bool = True) -> list[lm.Quantity]:
    first_order = [
        lm.Loss(),
        lm.GradNorm(per_layer=True),
        lm.Distance(per_layer=True),
        lm.UpdateSize(per_layer=True),
        lm.NormTest(),
        lm.InnerTest(),
        lm.OrthoTest(),
        lm.GradHist1d(nbins=21, maxval=1.0),
        lm.GradHist2d(bins=(7, 9)),
        lm.Alpha(),
        lm.MeanGSNR(),
        lm.EarlyStopping(),
        lm.CABS(),
        lm.NoiseScale(),
    ]
    second_order = [
        lm.TICDiag(),
        lm.TICTrace(method="hutchinson", probes=4),
        lm.HessTrace(per_layer=True),
        lm.HessMaxEV(),
    ]
    return first_order + second_order * curvature


def batches(case: models.Case) -> list:
    """Three batches of N samples: the case's 9, then its first 3 again."""
    return [jax.tree.map(lambda x: jnp.concatenate([x, x[: N - len(x)]]), b) for b in case.batches]


def run_masked(
    step: lm.InstrumentedStep, state: lm.StepState, data: list, mask: jax.Array, mesh: Mesh | None
) -> tuple[list, lm.StepState]:
    """As :func:`run`, each batch with ``mask`` (both split over ``mesh``'s "data" axis, if
    given); also the last state."""
    out = []
    for t, batch in enumerate(data):
        batch_mask = mask
        if mesh is not None:
            batch, batch_mask = jax.device_put((batch, mask), NamedSharding(mesh, P("data")))
        state, metrics = without_recompiling(t, step, state, batch, mask=batch_mask)
        out.append((lm.stats.to_host(metrics), jax.device_get(state.params)))
    return out, state


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def fsdp_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))


def fsdp_spec(leaf: jax.Array) -> P:
    """Split a parameter over the "model" axis along its first even axis (else replicate)."""
    for axis, size in enumerate(np.shape(leaf)):
        if size % 2 == 0:
            return P(*[None] * axis, "model")
    return P()


def initial_state(step: lm.InstrumentedStep, params: Any, mesh: Mesh, split: bool) -> lm.StepState:
    """``step.init`` of ``params`` placed on ``mesh``: replicated, or split over "model"."""
    spec = fsdp_spec if split else lambda leaf: P()
    placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    return step.init(placed)


BACKEND_COMPILES = collections.Counter()


def _count_compiles(event: str, duration: float, **kwargs: Any) -> None:
    BACKEND_COMPILES[event] += 1


# XLA compilations counted as they happen: a step's input shardings are part of what JAX
# caches it by, so a state given back split otherwise than it was placed compiles the next
# step again, which lm.instrument's trace_count does not see.
jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compilations() -> int:
    """XLA programs compiled so far in this process."""
    return BACKEND_COMPILES["/jax/core/compile/backend_compile_duration"]


def without_recompiling(t: int, step: Callable, *args: Any, **kwargs: Any) -> Any:
    """``step(*args, **kwargs)``, the ``t``-th step of a loop; asserts that only the first
    compiles."""
    before = compilations()
    out = step(*args, **kwargs)
    assert t == 0 or compilations() == before, f"step {t} compiled again"
    return out


def run(step: lm.InstrumentedStep, state: lm.StepState, data: list, mesh: Mesh | None) -> list:
    """(metrics, params) after each batch; asserts that only the first step compiled."""
    out = []
    for t, batch in enumerate(data):
        if mesh is not None:
            batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        state, metrics = without_recompiling(t, step, state, batch)
        out.append((lm.stats.to_host(metrics), jax.device_get(state.params)))
    return out


def assert_same(sharded: list, single: list) -> None:
    """Equal to round-off: relative to each metric's largest entry (a per-layer dict's total),
    since a parameter whose gradient is 0 in exact arithmetic (an attention key's bias) has
    an update of pure round-off under Adam."""
    for t, ((m, p), (m_ref, p_ref)) in enumerate(zip(sharded, single, strict=True)):
        assert m.keys() == m_ref.keys()
        for key in m_ref:
            scale = max(np.max(np.abs(x)) for x in jax.tree.leaves(m_ref[key]))
            for (path, value), ref in zip(
                jax.tree_util.tree_leaves_with_path(m[key]),
                jax.tree.leaves(m_ref[key]),
                strict=True,
            ):
                np.testing.assert_allclose(
                    value,
                    ref,
                    RTOL,
                    RTOL * scale,
                    err_msg=f"step {t}: {key}{jax.tree_util.keystr(path)}",
                )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, RTOL, 1e-10), p, p_ref)


# The per-sample pass (under shard_map) on every model kind, in one chunk (straight-line) or
# several (a scan); the curvature quantities (Hessian-vector products under the partitioner,
# the same for any model) on the two plain models, whose programs compile fast.
LAYOUTS = [
    ("regression", "data", None, True),
    ("linen_conv", "data", None, False),
    ("linen_attention", "data", None, False),
    ("mlp", "data", 2, True),
    ("nnx_conv", "data", 2, False),
    ("mlp", "data+model", 2, True),
    ("linen_attention", "data+model", 2, False),
]


@pytest.mark.parametrize(("name", "layout", "chunk", "curvature"), LAYOUTS)
def test_every_quantity_matches_single_device(
    name: str, layout: str, chunk: int | None, curvature: bool
) -> None:
    case = models.get(name)
    budget = 2**26 if chunk is None else models.budget_for_chunk(case.params, chunk)
    optimizer = OPTIMIZERS["sgd" if name == "regression" else "adam"]
    quantities = every_quantity(curvature)
    step = lm.instrument(case.loss_fn, optimizer(), quantities, memory_budget=budget)
    mesh = data_mesh() if layout == "data" else fsdp_mesh()
    single = run(step, step.init(case.params), batches(case), None)
    sharded_state = initial_state(step, case.params, mesh, split=layout != "data")
    assert_same(run(step, sharded_state, batches(case), mesh), single)
    # one compile for the single device, one for the mesh; none after
    assert list(step.trace_count.values()) == [2]


def test_samples_stay_where_they_are() -> None:
    """Chunked per-sample statistics gather neither the batch nor per-sample gradients."""
    case = models.get("mlp")
    budget = models.budget_for_chunk(case.params, 1)
    step = lm.instrument(case.loss_fn, optax.adam(1e-2), every_quantity(), memory_budget=budget)
    batch = jax.tree.map(lambda x: jnp.concatenate([x] * 4), batches(case)[0])
    mesh = data_mesh()
    state = initial_state(step, case.params, mesh, split=False)
    assert gathers(compiled(step, state, batch, mesh)) == []

    # Split parameters and activations are gathered for the forward pass as in any FSDP step;
    # per-sample gradients (a leading sample axis, then one parameter's elements) only one
    # chunk at a time.
    mesh = fsdp_mesh()
    state = initial_state(step, case.params, mesh, split=True)
    shapes = gathers(compiled(step, state, batch, mesh))
    leaves = jax.tree.leaves(case.params)
    sizes, params = {np.size(x) for x in leaves}, {np.shape(x) for x in leaves}
    per_sample = [d for d in shapes if d not in params and len(d) > 1 and math.prod(d[1:]) in sizes]
    assert per_sample and all(dims[0] == 1 for dims in per_sample), per_sample


def compiled(step: lm.InstrumentedStep, state: lm.StepState, batch: tuple, mesh: Mesh) -> str:
    """The text of the compiled step on ``batch`` split over ``mesh``'s data axis."""
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    return step.lower(state, batch).compile().as_text()


def monitored_step(tx: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    """A user's own jitted train step with ``tx`` (an ``lm.monitor``) in it."""

    @jax.jit
    def step(params: Any, opt_state: Any, batch: tuple) -> tuple:
        grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn, batch=batch)
        return optax.apply_updates(params, updates), opt_state

    return step


def test_monitor_told_the_batch_sharding_matches_one_device() -> None:
    case = models.get("nnx_conv")
    budget = models.budget_for_chunk(case.params, 2)
    mesh = data_mesh()
    split = NamedSharding(mesh, P("data"))
    quantities = every_quantity(curvature=False)
    results = {}
    for told in (None, split):
        tx = lm.monitor(optax.adam(1e-2), quantities, memory_budget=budget, batch_sharding=told)
        step = monitored_step(tx, case.loss_fn)
        params = case.params
        if told is not None:
            params = jax.device_put(params, NamedSharding(mesh, P()))
        opt_state = tx.init(params)
        results[told] = []
        for t, batch in enumerate(batches(case)):
            batch = batch if told is None else jax.device_put(batch, split)
            params, opt_state = without_recompiling(t, step, params, opt_state, batch)
            values = {k: v for k, v in lm.metrics(opt_state).items() if k != "step"}
            results[told].append((lm.stats.to_host(values), jax.device_get(params)))
    assert_same(results[split], results[None])


def test_monitor_told_the_batch_sharding_keeps_samples_where_they_are() -> None:
    """Inside the user's jit the batch's placement is unseen: untold, the partitioner gathers
    the batch for the chunked per-sample pass; told, each device keeps its own samples."""
    case = models.get("mlp")
    mesh = data_mesh()
    split = NamedSharding(mesh, P("data"))
    batch = jax.device_put(batches(case)[0], split)
    found = {}
    for told in (None, split):
        budget = models.budget_for_chunk(case.params, 1)
        tx = lm.monitor(
            optax.adam(1e-2), [lm.NormTest()], memory_budget=budget, batch_sharding=told
        )
        params, opt_state = jax.device_put(
            (case.params, tx.init(case.params)), NamedSharding(mesh, P())
        )
        step = monitored_step(tx, case.loss_fn)
        found[told] = gathers(step.lower(params, opt_state, batch).compile().as_text())
    assert found[split] == [] and found[None] != []


def gathers(text: str) -> list[tuple]:
    """The shape of the result of each all-gather or all-to-all in a compiled program's text."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-to-all)(?:-start)?\(", text)
    return [tuple(int(n) for n in dims.split(",") if n) for dims in found]


def test_dropout_mask_and_state_match_one_device() -> None:
    """Dropout's per-sample draws travel with their samples to each device (chunked there),
    a sample mask too, and model state comes back as on one device."""

    def loss_fn(w: dict, batch: tuple, *, key: jax.Array, model_state: jax.Array) -> tuple:
        x, y = batch
        h = jnp.tanh(x @ w["a"])
        keep = jax.random.bernoulli(key, 0.7, h.shape)
        losses = (jnp.where(keep, h / 0.7, 0.0) @ w["b"] - y) ** 2
        return losses, model_state + jnp.mean(h)  # a running sum, as a statistic would be

    rng = np.random.default_rng(3)
    params = {"a": jnp.asarray(rng.normal(size=(5, 6))), "b": jnp.asarray(rng.normal(size=6))}
    data = [(jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=N)))] * 3
    mask = jnp.arange(N) < N - 2
    quantities = [lm.Loss(), lm.NormTest(), lm.GradHist1d(nbins=11, maxval=2.0), lm.Alpha()]
    budget = models.budget_for_chunk(params, 2)
    mesh = data_mesh()
    out = []
    for placed in (False, True):
        step = lm.instrument(loss_fn, optax.adam(1e-2), quantities, memory_budget=budget)
        key, start = jax.random.key(4), jnp.zeros(())
        state = step.init(params, key=key, model_state=start)
        if placed:
            on_mesh = lambda x: jax.device_put(x, NamedSharding(mesh, P()))  # noqa: E731
            state = step.init(jax.tree.map(on_mesh, params), key=key, model_state=on_mesh(start))
        runs, state = run_masked(step, state, data, mask, mesh if placed else None)
        out.append((runs, float(state.model_state)))
    assert_same(out[1][0], out[0][0])
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=RTOL)


def test_ggn_with_dropout_and_a_mask_matches_one_device() -> None:
    """The GGN's per-sample, per-direction pass (a conv kernel factored, a max-pool, dropout's
    replayed draws, a sample mask, chunks) on each device's own samples equals one device, the
    Monte-Carlo draws too."""

    def apply_fn(w: dict, x: jax.Array, *, key: jax.Array) -> jax.Array:
        h = jax.lax.conv_general_dilated(
            x, w["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.lax.reduce_window(
            jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
        )
        h = h.reshape(x.shape[0], -1)
        keep = jax.random.bernoulli(key, 0.8, h.shape)
        return jnp.where(keep, h / 0.8, 0.0) @ w["d"]

    rng = np.random.default_rng(5)
    params = {
        "k": jnp.asarray(rng.normal(size=(3, 3, 2, 3))),
        "d": jnp.asarray(rng.normal(size=(12, 4))),
    }
    data = [(jnp.asarray(rng.normal(size=(N, 4, 4, 2))), jnp.asarray(rng.integers(0, 4, N)))] * 2
    mask = jnp.arange(N) < N - 3
    loss = lm.supervised(apply_fn, optax.softmax_cross_entropy_with_integer_labels)
    quantities = [lm.HessTrace(per_layer=True), lm.TICDiag(), lm.TICTrace(method="ggn_mc")]
    budget = models.budget_for_chunk(params, 2)
    mesh = data_mesh()
    out = []
    for placed in (False, True):
        step = lm.instrument(loss, optax.sgd(0.1), quantities, memory_budget=budget)
        start = jax.device_put(params, NamedSharding(mesh, P())) if placed else params
        state = step.init(start, key=jax.random.key(6))
        out.append(run_masked(step, state, data, mask, mesh if placed else None)[0])
    assert [q.resolved["method"] for q in quantities] == ["ggn", "ggn", "ggn_mc"]
    assert_same(out[1], out[0])
