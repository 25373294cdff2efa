"""Every seed quantity, on every model kind, against the brute-force reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm
from lmd4ml.stats.histogram import BLOCK, Counts
from lmd4ml.stats.per_sample import _chunked
from lmd4ml.telemetry.store import RunWriter, load_run

RTOL = 1e-10
NBINS = 31  # odd: 0, where many elements of ReLU nets sit, is mid-bin, not on a bin edge
SCALARS = ("loss", "grad_norm", "distance", "update_size", "norm_test")
KEYS = (*SCALARS, "grad_hist_1d")
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "adam": lambda: optax.adam(1e-2),
}
BIG_BUDGET = 2**30  # the whole batch in one chunk
# Per optimizer, the chunk of samples whose gradients fit the memory budget: with adam every
# model also runs chunked: 9 samples in chunks of at most 4, made equal, are 3 of 3 in a scan.
CHUNK = {"sgd": models.BATCH, "adam": 4}


def seed_quantities(nbins: int, maxval: float) -> list[lm.Quantity]:
    return [
        lm.Loss(),
        lm.GradNorm(),
        lm.Distance(),
        lm.UpdateSize(),
        lm.NormTest(),
        lm.GradHist1d(nbins=nbins, maxval=maxval),
    ]


def case_maxval(case: models.Case) -> float:
    """A histogram range a few times the typical per-sample gradient element at θ₀."""
    ps = reference.per_sample_grads(case.loss_fn, case.params, case.batches[0])
    return reference.spread_maxval(ps.grads)


def run(
    case: models.Case,
    optimizer: optax.GradientTransformation,
    quantities: list[lm.Quantity],
    memory_budget: int = BIG_BUDGET,
) -> list[tuple[lm.StepState, dict, lm.StepState]]:
    """(state before, metrics on the host, state after) for one step per batch of the case."""
    step = lm.instrument(case.loss_fn, optimizer, quantities, memory_budget=memory_budget)
    return models.run_steps(step, case)


def assert_matches_reference(metrics: dict, expected: dict, where: str) -> None:
    assert set(metrics) == set(KEYS), where
    for key in SCALARS:
        value = metrics[key]
        assert np.shape(value) == (), f"{where}: {key} is not a scalar"
        if expected[key] == 0:
            assert value == 0, f"{where}: {key} = {value}, expected exactly 0"
        else:
            np.testing.assert_allclose(value, expected[key], rtol=RTOL, err_msg=f"{where}: {key}")
    hist = metrics["grad_hist_1d"]
    assert np.issubdtype(hist.dtype, np.integer), f"{where}: counts of dtype {hist.dtype}"
    np.testing.assert_array_equal(hist, expected["grad_hist_1d"], err_msg=f"{where}: histogram")


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_seed_quantities_match_reference(case: models.Case, opt_name: str) -> None:
    """Every quantity at every step t equals its definition evaluated at θₜ."""
    optimizer = OPTIMIZERS[opt_name]()
    maxval = case_maxval(case)
    theta0 = reference.flatten(case.params)
    budget = models.budget_for_chunk(case.params, CHUNK[opt_name])
    assert lm.stats.chunk_size(case.params, budget, models.BATCH) == CHUNK[opt_name]
    steps = run(case, optimizer, seed_quantities(NBINS, maxval), memory_budget=budget)
    for t, (before, metrics, after) in enumerate(steps):
        where = f"{case.name}/{opt_name} step {t}"
        ps = reference.per_sample_grads(case.loss_fn, before.params, case.batches[t])
        theta, theta_next = reference.flatten(before.params), reference.flatten(after.params)
        expected = reference.quantities(ps, theta, theta0, theta_next, NBINS, maxval)
        assert_matches_reference(metrics, expected, where)
        # The histogram is informative (spread over many bins) and counts every element.
        assert np.count_nonzero(metrics["grad_hist_1d"]) >= NBINS // 3, where
        assert metrics["grad_hist_1d"].sum() == ps.grads.size, where
        # The update applied is the optimizer's update of the mean gradient g.
        g = reference.unflatten_like(reference.mean_grad(ps.grads), before.params)
        updates, _ = optimizer.update(g, before.opt_state, before.params)
        expected_next = reference.flatten(optax.apply_updates(before.params, updates))
        np.testing.assert_allclose(theta_next, expected_next, rtol=1e-12, atol=1e-10, err_msg=where)
    assert steps[0][1]["distance"] == 0.0
    # θ₁ − θ₀ is the first update
    np.testing.assert_allclose(steps[1][1]["distance"], steps[0][1]["update_size"], rtol=RTOL)


# --------------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def one_chunk_run(mlp_case: models.Case) -> list:
    quantities = seed_quantities(NBINS, case_maxval(mlp_case))
    return run(mlp_case, optax.adam(1e-2), quantities, memory_budget=BIG_BUDGET)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunking_gives_the_values_of_one_chunk(
    mlp_case: models.Case, one_chunk_run: list, chunk: int
) -> None:
    """chunk 1: 9 chunks in a scan; 2: 4 in a scan + a remainder of 1; 5: one chunk + 4."""
    budget = models.budget_for_chunk(mlp_case.params, chunk)
    assert lm.stats.chunk_size(mlp_case.params, budget, models.BATCH) == chunk
    quantities = seed_quantities(NBINS, case_maxval(mlp_case))
    chunked = run(mlp_case, optax.adam(1e-2), quantities, memory_budget=budget)
    for t, ((_, got, _), (_, want, _)) in enumerate(zip(chunked, one_chunk_run, strict=True)):
        for key in SCALARS:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-13, err_msg=f"{key} t={t}")
        np.testing.assert_array_equal(got["grad_hist_1d"], want["grad_hist_1d"])


@pytest.mark.parametrize(
    ("n", "chunk", "sizes"), [(32, 17, [16]), (9, 4, [3]), (9, 2, [2, 1]), (5, 9, [5])]
)
def test_chunks_are_made_equal(n: int, chunk: int, sizes: list) -> None:
    """At most ``chunk`` samples each, as equal as can be: the sizes ``fn`` is traced with."""
    seen = []

    def fn(x: jax.Array) -> dict:
        seen.append(x.shape[0])
        return {"sum": jnp.sum(x), "each": 2 * x}

    out = _chunked(fn, jnp.arange(n, dtype=jnp.float64), chunk, {"sum": "sum", "each": "concat"})
    assert sorted(set(seen), reverse=True) == sizes
    assert out["sum"] == n * (n - 1) / 2
    np.testing.assert_array_equal(out["each"], 2 * np.arange(n))


# ------------------------------------------------------------------- histogram semantics


def identity_grads_loss(w: jax.Array, x: jax.Array) -> jax.Array:
    """ℓᵢ = xᵢ·w, so ∇ℓᵢ = xᵢ exactly: the per-sample gradients are the batch itself."""
    return x @ w


def hist_of_grads(values: np.ndarray, nbins: int, maxval: float) -> np.ndarray:
    """lmd4ml's grad_hist_1d for per-sample gradients equal to ``values`` (shape B×P)."""
    step = lm.instrument(
        identity_grads_loss, optax.sgd(0.1), [lm.GradHist1d(nbins=nbins, maxval=maxval)]
    )
    state = step.init(jnp.zeros(values.shape[1], jnp.float64))
    _, metrics = step(state, jnp.asarray(values, jnp.float64))
    return np.asarray(metrics["grad_hist_1d"])


def test_grad_hist_1d_clamps_outliers_and_drops_nan() -> None:
    values = np.array([[-100.0, -np.inf, -0.3, 0.1], [0.2, 7.0, np.inf, np.nan]])
    got = hist_of_grads(values, nbins=2, maxval=1.0)
    np.testing.assert_array_equal(got, [3, 4])
    np.testing.assert_array_equal(got, reference.grad_hist_1d(values, 2, 1.0))


def test_grad_hist_1d_on_exact_bin_edges() -> None:
    """Edges of 4 bins on [−1, 1] are exact in binary: left-closed bins, the last one closed."""
    edges = np.array([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    got = hist_of_grads(edges, nbins=4, maxval=1.0)
    np.testing.assert_array_equal(got, [1, 1, 1, 2])
    np.testing.assert_array_equal(got, reference.grad_hist_1d(edges, 4, 1.0))


def test_grad_hist_1d_bins_values_just_below_an_edge_like_np_histogram() -> None:
    """A value below a bin edge belongs to the bin on the left, however close it is.

    −1e-20 < 0 and 0.5 − 2⁻⁵⁴ < 0.5 are both exactly representable; np.histogram puts them
    left of the edges 0 and 0.5. Tiny negative gradient elements are common (saturated
    softmax, and in float32 anything below ~ulp(maxval) ≈ 4e-9 for maxval = 0.05).
    """
    values = np.array([[-1e-20, 0.5 - 2.0**-54, -0.5 - 2.0**-53]])
    expected = reference.grad_hist_1d(values, 4, 1.0)
    np.testing.assert_array_equal(expected, [1, 1, 1, 0])
    np.testing.assert_array_equal(hist_of_grads(values, nbins=4, maxval=1.0), expected)


def test_large_arrays_are_binned_in_blocks_like_np_histogram() -> None:
    """Beyond 2 × BLOCK elements values are binned a block at a time, the rest after: the
    counts are np.histogram's and np.histogram2d's, outliers clamped, NaN left out."""
    size = 2 * BLOCK + 12_345
    rng = np.random.default_rng(0)
    x = rng.normal(scale=0.5, size=(3, size // 3)).astype(np.float32)
    x[0, :5] = [np.nan, np.inf, -np.inf, 9.0, -0.0]
    y = rng.normal(size=size // 3).astype(np.float32)
    y[7] = np.nan
    got = lm.stats.histogram(jnp.asarray(x), 11, -1.0, 1.0)
    np.testing.assert_array_equal(got, reference.grad_hist_1d(x, 11, 1.0))
    ranges = ((-1.0, 1.0), (-2.0, 2.0))
    got2d = lm.stats.histogram2d(jnp.asarray(x), jnp.asarray(y), (5, 4), ranges)
    np.testing.assert_array_equal(got2d, reference.grad_hist_2d(x, y, (5, 4), ranges))


def test_grad_hist_1d_drops_nan_gradient_of_one_sample(mlp_case: models.Case) -> None:
    """A NaN input poisons one sample's gradient: its NaN elements are left out of the counts."""
    x, y = mlp_case.batches[0]
    x = x.at[3, 0].set(jnp.nan)
    batch = (x, y)
    maxval = case_maxval(mlp_case)
    ps = reference.per_sample_grads(mlp_case.loss_fn, mlp_case.params, batch)
    assert np.isnan(ps.grads[3]).any() and np.isfinite(np.delete(ps.grads, 3, axis=0)).all()
    step = lm.instrument(
        mlp_case.loss_fn, optax.sgd(0.1), [lm.Loss(), lm.GradHist1d(nbins=NBINS, maxval=maxval)]
    )
    _, metrics = step(step.init(mlp_case.params), batch)
    hist = np.asarray(metrics["grad_hist_1d"])
    np.testing.assert_array_equal(hist, reference.grad_hist_1d(ps.grads, NBINS, maxval))
    assert hist.sum() == np.count_nonzero(~np.isnan(ps.grads))
    assert np.isnan(metrics["loss"])


# ------------------------------------------------------------------ counts that cannot wrap
# Users train with jax_enable_x64 off, where int64 is silently int32: these run that way, and
# reach 2³¹, 2³² and 2⁵³ through the accumulator itself rather than by counting that far.


def as_ints(counts: Counts) -> list[int]:
    """hi·2³² + lo in Python's integers, which do not wrap."""
    return [(int(h) << 32) + int(lo) for h, lo in zip(counts.hi, counts.lo, strict=True)]


def test_counts_add_subtract_and_multiply_exactly_with_x64_off() -> None:
    """At the word boundary (lo = 2³² − 5 plus 10 carries into hi), at 2⁵³ − 1 + 1, and on
    random words, sums, differences and products are Python's."""
    rng = np.random.default_rng(0)
    hi = np.r_[0, 0, 0, 2**21 - 1, rng.integers(0, 2**21, 500)].astype(np.uint32)
    lo = np.r_[2**32 - 5, 2**31, 2**32 - 1, 2**32 - 1, rng.integers(0, 2**32, 500)]
    lo = lo.astype(np.uint32)
    add = np.r_[10, 2**31 - 1, 2**31 - 1, 1, rng.integers(0, 2**31, 500)].astype(np.int32)
    k = np.r_[2**31 - 1, 3, 2**11 - 1, 1, rng.integers(0, 2**11, 500)].astype(np.int32)

    def ops(hi, lo, add, k):
        c = Counts(hi, lo)
        return c + Counts.of(add), c + Counts.of(add) - Counts.of(add), c.times(k)

    with jax.enable_x64(False):
        total, back, product = jax.jit(ops)(hi, lo, add, k)
    assert total.lo.dtype == jnp.uint32
    start = as_ints(Counts(hi, lo))
    assert as_ints(total)[:4] == [2**32 + 5, 2**32 - 1, 2**32 + 2**31 - 2, 2**53]
    assert as_ints(total) == [s + int(a) for s, a in zip(start, add, strict=True)]
    assert as_ints(back) == start
    assert as_ints(product) == [s * int(n) for s, n in zip(start, k, strict=True)]
    assert np.asarray(total).dtype == np.int64 and np.asarray(total)[3] == 2**53


def test_block_counts_carry_through_a_scan_and_a_psum_with_x64_off() -> None:
    """As the histogram adds its int32 block counts in a ``lax.scan`` and sums devices with a
    psum: 4096 blocks of 2³¹ − 1 in one bin lift 2⁵³ − 1 − 4096·(2³¹ − 1) to 2⁵³ − 1, and 4
    (vmapped) devices holding up to 2⁵¹ each, in lo words ≥ 2³¹ that a plain psum would
    wrap, sum exactly."""
    start = 2**53 - 1 - 4096 * (2**31 - 1)
    rng = np.random.default_rng(1)
    lo = rng.integers(2**31, 2**32, (4, 3)).astype(np.uint32)
    hi = rng.integers(0, 2**19, (4, 3)).astype(np.uint32)
    with jax.enable_x64(False):

        def add(c: Counts, block: jax.Array) -> tuple[Counts, None]:
            return c + Counts.of(block), None

        c = Counts(jnp.uint32(start >> 32), jnp.uint32(start & 0xFFFFFFFF))
        scanned = jax.jit(lambda c: jax.lax.scan(add, c, jnp.full(4096, 2**31 - 1))[0])(c)
        summed = jax.vmap(lambda c: c.psum("devices"), axis_name="devices")(Counts(hi, lo))
    assert int(np.asarray(scanned)) == 2**53 - 1
    per_device = [as_ints(Counts(h, lo_)) for h, lo_ in zip(hi, lo, strict=True)]
    expected = [sum(column) for column in zip(*per_device, strict=True)]
    got = [as_ints(Counts(h, lo_)) for h, lo_ in zip(summed.hi, summed.lo, strict=True)]
    assert got == [expected] * 4


def test_grad_hist_reaches_the_host_and_the_store_exact_with_x64_off(tmp_path) -> None:
    """A masked step with x64 off compiles once and counts like numpy; what the host keeps
    is int64, and the run store gives back counts beyond 2³² and at 2⁵³ unchanged."""
    values = np.array([[0.3, 0.0, -2.0], [0.0, 0.0, 0.1], [5.0, 5.0, 5.0]], np.float32)
    mask = jnp.array([True, True, False])
    with jax.enable_x64(False):
        step = lm.instrument(
            identity_grads_loss, optax.sgd(0.1), [lm.GradHist1d(nbins=4, maxval=1.0)]
        )
        state = step.init(jnp.zeros(3, jnp.float32))
        for _ in range(2):
            state, metrics = step(state, jnp.asarray(values), mask=mask)
        host = lm.stats.to_host(metrics)
        shapes = lm.stats.host_shapes(jax.eval_shape(lambda: metrics))
    assert step.trace_count == {frozenset({"grad_hist_1d"}): 1}
    assert host["grad_hist_1d"].dtype == np.int64
    np.testing.assert_array_equal(host["grad_hist_1d"], reference.grad_hist_1d(values[:2], 4, 1))
    assert shapes["grad_hist_1d"] == jax.ShapeDtypeStruct((4,), np.int64)
    big = Counts(np.array([0, 1, 2**21, 2**20], np.uint32), np.array([7, 5, 0, 2**31], np.uint32))
    with RunWriter(tmp_path / "run", {}, {"grad_hist_1d": ((4,), np.int64)}) as writer:
        writer.append(0, lm.stats.to_host({"grad_hist_1d": big}))
    _, stored = load_run(tmp_path / "run")["grad_hist_1d"]
    assert stored[0].tolist() == [7, 2**32 + 5, 2**53, 2**52 + 2**31]
