"""Exact histograms as a scatter-add of bin indices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def bin_index(values: jax.Array, nbins: int, lo: float, hi: float) -> jax.Array:
    """Bin of each value over ``nbins`` equal bins on [lo, hi]; outliers clamp to the edge bins.

    Bins are those of ``np.histogram(..., range=(lo, hi))``: the floor of the scaled value is
    corrected against the edges lo + k(hi − lo)/nbins, so a value within rounding of an edge
    (a tiny negative gradient next to 0, say) lands on the right side. NaN gets index
    ``nbins`` (out of range) so that a dropping scatter skips it.

    Example:
      >>> bin_index(jnp.array([-9.0, -1e-20, 0.0, 0.99, 1.0, jnp.nan]), 4, -1.0, 1.0).tolist()
      [0, 1, 2, 3, 3, 4]
    """
    dtype = values.dtype

    def edge(k: jax.Array) -> jax.Array:
        # (lo·(n−k) + hi·k)/n: exact at both ends and at 0 for symmetric ranges; arithmetic,
        # because a gather from an edge table per element doubled the histogram's cost.
        k = k.astype(dtype)
        return (lo * (nbins - k) + hi * k) / nbins

    clipped = jnp.clip(values, lo, hi)
    index = jnp.floor((clipped - lo) * (nbins / (hi - lo))).astype(jnp.int32)
    index = jnp.clip(index, 0, nbins - 1)
    # XLA may divide by multiplying with 1/n, so edge(0) can round above lo: never below bin 0.
    index = jnp.maximum(index - (clipped < edge(index)), 0)
    index = index + ((clipped >= edge(index + 1)) & (index < nbins - 1))
    return jnp.where(jnp.isnan(values), nbins, index)


def histogram(values: jax.Array, nbins: int, lo: float, hi: float) -> jax.Array:
    """Counts (int32) of ``values`` in ``nbins`` equal bins on [lo, hi], outliers clamped.

    A scatter-add of bin indices over ``values`` in its own shape: ``jnp.histogram`` searches
    sorted edges and is about 25× slower on CPU for the sizes per-sample gradients reach, and
    flattening first can force a transposing copy.

    Example:
      >>> histogram(jnp.array([[-0.3, 0.1], [0.2, 7.0]]), 2, -1.0, 1.0).tolist()
      [1, 3]
    """
    return _count(bin_index(values, nbins, lo, hi), nbins)


def histogram2d(
    x: jax.Array,
    y: jax.Array,
    bins: tuple[int, int],
    range: tuple[tuple[float, float], tuple[float, float]],  # np.histogram2d calls it so
) -> jax.Array:
    """Counts (int32, shape ``bins``) of the pairs (x, y), ``x`` and ``y`` broadcast together.

    Bins are those of ``np.histogram2d(x, y, bins, range)``; values outside ``range`` clamp
    into the edge bins and a pair with a NaN is left out. ``y`` may have fewer axes than
    ``x`` (one parameter value against every sample's gradient element): its bins are found
    once, not once per sample.

    Example:
      >>> histogram2d(jnp.array([[-0.5, 0.5], [9.0, jnp.nan]]), jnp.array([0.05, 0.25]),
      ...             (2, 3), ((-1.0, 1.0), (0.0, 0.3))).tolist()
      [[1, 0, 0], [1, 0, 1]]
    """
    (nx, ny), ((x_lo, x_hi), (y_lo, y_hi)) = bins, range
    ix = bin_index(x, nx, x_lo, x_hi)
    iy = bin_index(y, ny, y_lo, y_hi)
    # A NaN y has index ny, which ix·ny + iy would wrap into the next row: drop it explicitly.
    index = jnp.where((ix == nx) | (iy == ny), nx * ny, ix * ny + iy)
    return _count(index, nx * ny).reshape(nx, ny)


def _count(index: jax.Array, n: int) -> jax.Array:
    """How often each of 0..n−1 occurs in ``index``; indices ≥ n are dropped."""
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    ones = jnp.ones(index.shape, jnp.int32)
    mode = lax.GatherScatterMode.FILL_OR_DROP  # drops the out-of-range (NaN) index
    return lax.scatter_add(jnp.zeros(n, jnp.int32), index[..., None], ones, dims, mode=mode)
