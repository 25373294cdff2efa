"""Curvature of the mean loss L = mean(ℓ): Hessian-vector products and what they give.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``), linearized
once per step so that each further product costs only the tangent pass. From them:

- :func:`exact_diag`: diag(∇²L) exactly, one product per parameter (small models);
- :func:`hutchinson_diag`: an unbiased estimate of diag(∇²L) from Rademacher probes;
- :func:`max_eigenvalue`: the largest (algebraic) eigenvalue by restarted Lanczos.

Every function is pure and jittable; :class:`lmd4ml.quantities.StepContext` builds each
statistic at most once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.jaxpr import equations
from lmd4ml.stats.per_sample import _chunked, batch_size, chunk_size, sample_mean
from lmd4ml.stats.precision import cast_like, widen

Hvp = Callable[[PyTree], PyTree]


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, weights: jax.Array | None = None) -> Hvp:
    """``v ↦ ∇²L v`` at ``params`` for L = mean(``loss_fn(params, batch)``), or with
    ``weights`` wᵢ (a sample mask) L = Σᵢ wᵢℓᵢ / Σᵢ wᵢ.

    The gradient is linearized once (``jax.linearize``, forward over reverse): the returned
    function reuses that linearization, so each product costs one tangent pass. ``v`` is
    cast to the dtypes of ``params`` and the product comes back in float32 or wider
    (:mod:`.precision`), so iterations over products keep their precision under bfloat16.

    Example:
      >>> import jax.numpy as jnp
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # L = mean((xᵢ·w)²), ∇²L = 2 xᵀx / B
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> hvp(loss_fn, jnp.zeros(2), x)(jnp.array([1.0, 0.0])).tolist()
      [2.0, 2.0]
    """
    grad = jax.grad(lambda p: sample_mean(loss_fn(p, batch), weights))
    product = jax.linearize(grad, params)[1]
    return lambda v: widen(product(cast_like(v, params)))


def flat_matvec(hvp: Hvp, params: PyTree) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """``hvp`` on raveled vectors (``jax.flatten_util.ravel_pytree`` order), and θ raveled,
    in float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> matvec, flat = flat_matvec(lambda v: {"a": 2 * v["a"]}, {"a": jnp.ones(2)})
      >>> matvec(jnp.array([1.0, 3.0])).tolist(), flat.shape
      ([2.0, 6.0], (2,))
    """
    flat, unravel = ravel_pytree(widen(params))
    return (lambda v: ravel_pytree(hvp(unravel(v)))[0]), flat


def exact_diag(
    hvp: Hvp,
    params: PyTree,
    memory_budget: int = 2**26,
    *,
    unroll: bool | None = None,
    max_calls: int = 32,
) -> PyTree:
    """diag(∇²L), exactly: the j-th entry of the product with the j-th unit vector.

    D products, vmapped over as many unit vectors as fit in ``memory_budget`` bytes (counting
    one parameter-sized vector per product): affordable for a few thousand parameters. They
    run in a loop, or with ``unroll`` in at most ``max_calls`` straight-line calls (see
    :func:`_over_products`; ``None``: where the products convolve on CPU).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[2.0, 1.0], [1.0, 3.0]])
      >>> exact_diag(lambda v: h @ v, jnp.zeros(2)).tolist()
      [2.0, 3.0]
    """
    matvec, flat = flat_matvec(hvp, params)
    unravel = ravel_pytree(widen(params))[1]
    size = flat.shape[0]

    def entries(index: jax.Array) -> dict[str, jax.Array]:
        def entry(j: jax.Array) -> jax.Array:
            return matvec(jnp.zeros_like(flat).at[j].set(1))[j]

        return {"diag": jax.vmap(entry)(index)}

    chunk = chunk_size(flat, memory_budget, size)
    calls = _calls(unroll, max_calls, matvec, flat)
    diag = _over_products(entries, jnp.arange(size), chunk, {"diag": "concat"}, calls)["diag"]
    return unravel(diag)


def hutchinson_diag(
    hvp: Hvp,
    params: PyTree,
    key: jax.Array,
    probes: int,
    memory_budget: int = 2**26,
    *,
    unroll: bool | None = None,
    max_calls: int = 32,
) -> PyTree:
    """Hutchinson's unbiased estimate (1/K) Σₖ zₖ ⊙ ∇²L zₖ of diag(∇²L), K = ``probes``.

    Each zₖ has independent ±1 entries (Rademacher), so E[z ⊙ Hz] = diag(H); summed over
    the coordinates, the estimate of tr(H) has variance 2 Σ_{j≠k} H_jk² / K. Probes run
    vmapped, as many at once as fit in ``memory_budget`` bytes, in a loop, or with
    ``unroll`` in at most ``max_calls`` straight-line calls (see :func:`_over_products`;
    ``None``: where the products convolve on CPU). Either way zₖ is drawn from the k-th
    key of ``jax.random.split(key, probes)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> h = jnp.diag(jnp.array([1.0, 2.0, 3.0]))  # diagonal: every probe is exact
      >>> hutchinson_diag(lambda v: h @ v, jnp.zeros(3), jax.random.key(0), probes=4).tolist()
      [1.0, 2.0, 3.0]
    """
    if probes < 1:
        raise ValueError(f"probes must be a positive number of Hessian-vector products: {probes}")
    matvec, flat = flat_matvec(hvp, params)
    unravel = ravel_pytree(widen(params))[1]

    def probe_sums(keys: jax.Array) -> dict[str, jax.Array]:
        def one(k: jax.Array) -> jax.Array:
            z = jax.random.rademacher(k, flat.shape, flat.dtype)
            return z * matvec(z)

        return {"sum": jnp.sum(jax.vmap(one)(keys), axis=0)}

    chunk = chunk_size(flat, memory_budget, probes)
    keys = jax.random.split(key, probes)
    calls = _calls(unroll, max_calls, matvec, flat)
    total = _over_products(probe_sums, keys, chunk, {"sum": "sum"}, calls)["sum"]
    return unravel(total / probes)


def _calls(
    unroll: bool | None, max_calls: int, matvec: Callable[[jax.Array], jax.Array], flat: jax.Array
) -> int:
    """How many straight-line calls the products may take: ``max_calls`` if ``unroll`` (if it
    is None: if ``matvec`` convolves on CPU, :func:`needs_unrolling`), else 0 (a loop)."""
    if max_calls < 1:
        raise ValueError(f"max_calls must be a positive number of calls, got {max_calls}")
    if unroll is None:
        unroll = needs_unrolling(matvec, flat)
    return max_calls if unroll else 0


def _over_products(
    fn: Callable[[PyTree], dict[str, jax.Array]],
    xs: PyTree,
    chunk: int,
    combine: Mapping[str, Literal["concat", "sum"]],
    calls: int,
) -> dict[str, jax.Array]:
    """``fn`` over ``xs`` (leading axis n) in chunks of at most ``chunk``, outputs joined as
    ``combine`` says: with ``calls`` 0 in a loop (:func:`~lmd4ml.stats.per_sample._chunked`),
    else as straight-line code, each chunk started once the one before is done.

    Straight-line code keeps XLA's CPU convolutions out of a loop body, where they run many
    times slower (:func:`needs_unrolling`). It grows with every call, so the n elements go in
    min(n, ``calls``) equal chunks, or more where ``chunk`` says so; no fewer, as a vmap over
    many products of a convolution runs slower per product on CPU than a few at a time
    (measured on 3c3d, B = 64: 32 probes one at a time 2.2× faster than 16 at a time).

    Example:
      >>> import jax.numpy as jnp
      >>> fn = lambda x: {"sum": jnp.sum(x), "all": 2 * x}
      >>> out = _over_products(fn, jnp.arange(5.0), 5, {"sum": "sum", "all": "concat"}, 2)
      >>> out["sum"].item(), out["all"].tolist()
      (10.0, [0.0, 2.0, 4.0, 6.0, 8.0])
    """
    if not calls:
        return _chunked(fn, xs, chunk, combine)
    n = batch_size(xs)
    parts = max(min(n, calls), -(-n // chunk))
    size = -(-n // parts)
    outs: list[dict[str, jax.Array]] = []
    for start in range(0, n, size):
        part = jax.tree.map(lambda x, start=start: x[start : start + size], xs)
        outs.append(fn(_after(part, outs[-1]) if outs else part))
    return {
        k: sum(o[k] for o in outs) if how == "sum" else jnp.concatenate([o[k] for o in outs])
        for k, how in combine.items()
    }


def _after(tree: PyTree, earlier: PyTree) -> PyTree:
    """``tree``, its values unchanged, made from ``earlier`` too, so that XLA computes what
    depends on it only once ``earlier`` exists: chunks of straight-line code then run one
    after another instead of all at once (half the memory of 32 unordered probes on 3c3d).

    A zero from ``earlier`` is added to every leaf (to a PRNG key's data): ``nan_to_num``
    keeps it 0, and XLA does not fold 0·x for floats.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> _after(jnp.arange(3), jnp.array([jnp.inf])).tolist()
      [0, 1, 2]
    """
    first = jax.tree.leaves(earlier)[0]
    zero = 0 * jnp.nan_to_num(jnp.real(first.ravel()[0]))

    def tie(x: Any) -> Any:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = tie(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return x + zero.astype(x.dtype)

    return jax.tree.map(tie, tree)


class DiagEstimator(NamedTuple):
    """How to get diag(∇²L): ``"exact"``, or ``"hutchinson"`` with ``probes`` probes.

    Hashable: estimators that compare equal share one computation per step. ``seed`` names
    the stream Hutchinson's probes come from; quantities with the same seed share probes.

    Example:
      >>> DiagEstimator("exact") == DiagEstimator("exact")
      True
    """

    method: Literal["exact", "hutchinson"]
    probes: int = 0
    seed: int = 0

    def __call__(
        self, hvp: Hvp, params: PyTree, key: jax.Array | None, memory_budget: int
    ) -> PyTree:
        """diag(∇²L) by this method; ``key`` draws Hutchinson's probes (unused if exact)."""
        if self.method == "exact":
            return exact_diag(hvp, params, memory_budget)
        return hutchinson_diag(hvp, params, key, self.probes, memory_budget)


class Lanczos(NamedTuple):
    """The result of :func:`max_eigenvalue`."""

    value: jax.Array  # the largest Ritz value
    vector: jax.Array  # its unit Ritz vector, raveled: the next call's warm start
    iterations: jax.Array  # matrix-vector products used
    converged: jax.Array  # the tolerance was met within max_iters


def _top_ritz(alpha: jax.Array, beta: jax.Array, j: jax.Array) -> tuple[jax.Array, ...]:
    """Largest eigenpair of the leading (j+1)×(j+1) block of the Lanczos tridiagonal, and the
    spectral radius of that block, from a fixed-size eigensolve.

    Rows past j get a diagonal below every eigenvalue of the block (Gershgorin) and no
    coupling, so the padded matrix's top eigenpair is the block's, zero-padded.
    """
    m = alpha.shape[0]
    index = jnp.arange(m)
    active = index <= j
    coupled = index < j
    beta = jnp.where(coupled, beta, 0)
    spread = jnp.max(jnp.where(active, jnp.abs(alpha), 0)) + 2 * jnp.max(beta)
    floor = jnp.min(jnp.where(active, alpha, jnp.inf)) - 2 * jnp.max(beta) - spread - 1
    diag = jnp.where(active, alpha, floor)
    t = jnp.diag(diag) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    values, vectors = jnp.linalg.eigh(t)
    radius = jnp.maximum(jnp.abs(values[-1]), jnp.abs(values[m - 1 - j]))
    return values[-1], vectors[:, -1], radius


def max_eigenvalue(
    matvec: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    *,
    rtol: float = 1e-3,
    max_iters: int = 100,
    krylov_dim: int = 20,
    unroll: int = 0,
) -> Lanczos:
    """The largest (algebraic) eigenvalue of a symmetric operator, by restarted Lanczos.

    Lanczos with full reorthogonalization runs from ``start`` for at most ``krylov_dim``
    products, then restarts from its top Ritz vector, until the Ritz pair's residual
    ‖Hu − θu‖ is at most ``rtol`` times the spectral radius seen so far (so some eigenvalue
    lies that close to θ; the eigenvalue error is typically its square) or ``max_iters``
    products are spent. Unlike power iteration it finds the largest eigenvalue even when a
    negative one is larger in magnitude. Holds ``krylov_dim`` vectors.

    The first ``unroll`` products run as straight-line code, outside any loop, and are
    always computed (those past convergence are discarded): XLA on CPU runs convolutions
    inside a loop body several times slower (see :func:`needs_unrolling`).

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.diag(jnp.array([-5.0, 1.0, 2.0]))
      >>> out = max_eigenvalue(lambda v: h @ v, jnp.ones(3))
      >>> round(float(out.value), 6), int(out.iterations)
      (2.0, 3)
    """
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if max_iters < 1 or krylov_dim < 1:
        raise ValueError(
            f"max_iters and krylov_dim must be positive, got {max_iters} and {krylov_dim}"
        )
    size = start.shape[0]
    m = min(krylov_dim, size)
    dtype = start.dtype

    def cycle(carry: tuple, prefix: int = 0) -> tuple:
        """One Lanczos run of at most m products from carry's vector, the first ``prefix``
        of them unrolled."""
        _, v, used, _ = carry

        def step(c: tuple) -> tuple:
            j, v, basis, alpha, beta, *_ = c
            basis = basis.at[j].set(v)
            w = matvec(v)
            a = jnp.vdot(v, w)
            # Twice against the whole basis keeps it orthogonal to working precision; without
            # it, converged Ritz values reappear as copies and the basis degrades.
            w = w - basis.T @ (basis @ w)
            w = w - basis.T @ (basis @ w)
            b = jnp.linalg.norm(w)
            alpha, beta = alpha.at[j].set(a), beta.at[j].set(b)
            theta, s, radius = _top_ritz(alpha, beta, j)
            # ‖Hu − θu‖ = b·|s_j|: small also when b ≈ 0 (an invariant subspace). Once the
            # basis spans the whole space θ is exact.
            residual = b * jnp.abs(s[j])
            converged = (residual <= rtol * radius) | (j + 1 == size)
            done = converged | (j + 1 == m) | (used + j + 1 >= max_iters)
            return j + 1, w / jnp.where(b > 0, b, 1), basis, alpha, beta, theta, s, converged, done

        init = (
            jnp.zeros((), jnp.int32),
            v / jnp.linalg.norm(v),
            jnp.zeros((m, size), dtype),
            jnp.zeros(m, dtype),
            jnp.zeros(m, dtype),
            jnp.zeros((), dtype),
            jnp.zeros(m, dtype),
            jnp.zeros((), bool),
            jnp.zeros((), bool),
        )
        for _ in range(min(prefix, m)):
            init = _unless(init[-1], init, step(init))
        j, _, basis, _, _, theta, s, converged, _ = jax.lax.while_loop(lambda c: ~c[-1], step, init)
        u = s @ basis
        return theta, u / jnp.linalg.norm(u), used + j, converged

    def more(carry: tuple) -> jax.Array:
        _, _, used, converged = carry
        return ~converged & (used < max_iters)

    init = (jnp.zeros((), dtype), start, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    first = cycle(init, min(unroll, max_iters))  # the loop below always ran a first cycle
    theta, u, used, converged = jax.lax.while_loop(more, cycle, first)
    return Lanczos(theta, u, used, converged)


def _unless(done: jax.Array, old: tuple, new: tuple) -> tuple:
    """``old`` where ``done``, else ``new``: a loop step as straight-line code."""
    return optax.tree.where(done, old, new)


def needs_unrolling(fn: Callable, *args: Any) -> bool:
    """Whether ``fn(*args)`` (a loss on params and batch, a Hessian-vector product) convolves
    and runs on CPU, where XLA runs a convolution inside a loop body about 10× slower than
    outside one (jax-ml/jax#12868; measured here: a Hessian-vector product of DeepOBS 3c3d,
    0.35 s alone, 3.5 s inside ``fori_loop``).

    ``fn`` is traced once; it may close over values of an enclosing trace.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> needs_unrolling(lambda w, x: (x @ w) ** 2, jnp.zeros(2), jnp.ones((3, 2)))
      False
      >>> conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID")
      >>> needs_unrolling(conv, jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 3, 3))) == (
      ...     jax.default_backend() == "cpu")
      True
    """
    if jax.default_backend() != "cpu":
        return False
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return any(e.primitive.name == "conv_general_dilated" for e, _ in equations(jaxpr))
