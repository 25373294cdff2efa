"""Whether a loss's samples interact: ℓᵢ of the batch against ℓᵢ computed alone.

Per-sample statistics take sample i's gradient from the loss on a batch of one. That is the
∇ℓᵢ whose mean the optimizer applies only when ℓᵢ depends on sample i alone. BatchNorm in
training mode (it normalises with the batch's mean and variance) or a loss normalised over
the batch break this: on a batch of one they compute something else, and the statistics
would be silently wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmd4ml.stats._types import LossFn, PyTree
from lmd4ml.stats.per_sample import batch_size


def deviation(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    batched: jax.Array | None = None,
    first: int | None = None,
) -> jax.Array:
    """max |ℓᵢ(batch) − ℓᵢ(sample i alone)| over max |ℓᵢ(batch)|: zero when samples do not
    interact, up to rounding. ``batched``: ℓ on the batch, if already computed. ``first``:
    compute only the first samples alone (a few forward passes of one sample: cheap enough
    for every step; BatchNorm or a batch-centred loss moves every sample's loss).

    Example:
      >>> x = jnp.array([1.0, 2.0, 4.0])
      >>> float(deviation(lambda w, b: (w * b) ** 2, 1.0, x))          # independent samples
      0.0
      >>> float(deviation(lambda w, b: (w * (b - b.mean())) ** 2, 1.0, x)) > 0.1  # centred
      True
    """
    batch_size(batch)  # a clear error for a batch without a sample axis
    batched = loss_fn(params, batch) if batched is None else batched
    if first is not None:
        batched = batched[:first]
        batch = jax.tree.map(lambda x: x[:first], batch)
    alone = jax.vmap(lambda s: loss_fn(params, jax.tree.map(lambda x: x[None], s))[0])(batch)
    # Non-finite losses (a diverged step) are no evidence either way.
    finite = jnp.isfinite(batched) & jnp.isfinite(alone)
    scale = jnp.max(jnp.where(finite, jnp.abs(batched), 0.0)) + jnp.finfo(batched.dtype).tiny
    gap = jnp.max(jnp.where(finite, jnp.abs(batched - alone), 0.0))
    return gap / scale


def tolerance(dtype: np.dtype) -> float:
    """The largest :func:`deviation` that rounding explains: 1000 ulps of ``dtype``, relative
    (1.2e-4 in float32, 2.2e-13 in float64), far below what coupling makes (order 1).

    Example:
      >>> tolerance(np.float32) > 1e-6
      True
    """
    return 1000 * float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps)
