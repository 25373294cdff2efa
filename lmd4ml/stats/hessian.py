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

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.jaxpr import argmax_pooling, canonical_convolutions, equations
from lmd4ml.stats.per_sample import _chunked, _nbytes, chunk_size, sample_mean
from lmd4ml.stats.precision import cast_like, widen

Hvp = Callable[[PyTree], PyTree]


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, weights: jax.Array | None = None) -> Hvp:
    """``v ↦ ∇²L v`` at ``params`` for L = mean(``loss_fn(params, batch)``), or with
    ``weights`` wᵢ (a sample mask) L = Σᵢ wᵢℓᵢ / Σᵢ wᵢ.

    The gradient is linearized once (``jax.linearize``, forward over reverse): the returned
    function reuses that linearization, so each product costs one tangent pass, and max-pools
    keep their argmax from it (:func:`~lmd4ml.stats.jaxpr.argmax_pooling`). ``v`` is
    cast to the dtypes of ``params`` and the product comes back in float32 or wider
    (:mod:`.precision`), so iterations over products keep their precision under bfloat16.

    Example:
      >>> import jax.numpy as jnp
      >>> loss_fn = lambda w, x: (x @ w) ** 2  # L = mean((xᵢ·w)²), ∇²L = 2 xᵀx / B
      >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
      >>> hvp(loss_fn, jnp.zeros(2), x)(jnp.array([1.0, 0.0])).tolist()
      [2.0, 2.0]
    """
    loss_fn = argmax_pooling(loss_fn)
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


def product_bytes(matvec: Callable[[jax.Array], jax.Array], flat: jax.Array) -> int:
    """Bytes of every value one product's tangent pass makes (its jaxpr's intermediates): a
    bound on what a product adds to a vmapped batch of them. On a convolutional model these
    are activation-sized, far more than the parameter vector (3c3d, B = 64: 17 Hutchinson
    probes at once took 2.2 GB and twice the time of one at a time).

    Example:
      >>> import jax.numpy as jnp
      >>> product_bytes(lambda v: 2 * (v + 1), jnp.zeros(10, jnp.float32))  # two 10-vectors
      80
    """
    jaxpr = jax.make_jaxpr(matvec)(flat).jaxpr
    return _nbytes([v.aval for eqn, _ in equations(jaxpr) for v in eqn.outvars])


def exact_diag(hvp: Hvp, params: PyTree, memory_budget: int = 2**26) -> PyTree:
    """diag(∇²L), exactly: the j-th entry of the product with the j-th unit vector.

    D products, vmapped over as many unit vectors as fit in ``memory_budget`` bytes (a
    parameter-sized vector and :func:`product_bytes` per product), in a loop: affordable for
    a few thousand parameters.

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

    chunk = chunk_size(flat, memory_budget, size, product_bytes(matvec, flat))
    diag = _chunked(entries, jnp.arange(size), chunk, {"diag": "concat"})["diag"]
    return unravel(diag)


def hutchinson_diag(
    hvp: Hvp, params: PyTree, key: jax.Array, probes: int, memory_budget: int = 2**26
) -> PyTree:
    """Hutchinson's unbiased estimate (1/K) Σₖ zₖ ⊙ ∇²L zₖ of diag(∇²L), K = ``probes``.

    Each zₖ has independent ±1 entries (Rademacher), so E[z ⊙ Hz] = diag(H); summed over
    the coordinates, the estimate of tr(H) has variance 2 Σ_{j≠k} H_jk² / K. Probes run
    vmapped, as many at once as fit in ``memory_budget`` bytes (see :func:`exact_diag`), in a
    loop; zₖ is drawn from the k-th key of ``jax.random.split(key, probes)``.

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

    chunk = chunk_size(flat, memory_budget, probes, product_bytes(matvec, flat))
    keys = jax.random.split(key, probes)
    total = _chunked(probe_sums, keys, chunk, {"sum": "sum"})["sum"]
    return unravel(total / probes)


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
) -> Lanczos:
    """The largest (algebraic) eigenvalue of a symmetric operator, by restarted Lanczos.

    Lanczos with full reorthogonalization runs from ``start`` for at most ``krylov_dim``
    products, then restarts from its top Ritz vector, until the Ritz pair's residual
    ‖Hu − θu‖ is at most ``rtol`` times the spectral radius seen so far (so some eigenvalue
    lies that close to θ; the eigenvalue error is typically its square), ``max_iters``
    products are spent or a product comes out non-finite (then θ is NaN, not converged).
    Unlike power iteration it finds the largest eigenvalue even when a negative one is larger
    in magnitude. Holds ``krylov_dim`` vectors.

    The products run with :func:`~lmd4ml.stats.jaxpr.canonical_convolutions`, so inside the
    loop a convolutional model's products cost what they cost alone.

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

    def cycle(carry: tuple) -> tuple:
        """One Lanczos run of at most m products from carry's vector."""
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
            # A non-finite product (a NaN loss) makes every later one non-finite: stop there.
            done = converged | (j + 1 == m) | (used + j + 1 >= max_iters) | ~jnp.isfinite(b)
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
        j, _, basis, _, _, theta, s, converged, _ = jax.lax.while_loop(
            lambda c: ~c[-1], canonical_convolutions(step), init
        )
        u = s @ basis
        return theta, u / jnp.linalg.norm(u), used + j, converged

    def more(carry: tuple) -> jax.Array:
        theta, _, used, converged = carry
        return ~converged & (used < max_iters) & jnp.isfinite(theta)

    init = (jnp.zeros((), dtype), start, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    theta, u, used, converged = jax.lax.while_loop(more, cycle, init)  # convolves in step only
    return Lanczos(theta, u, used, converged)
