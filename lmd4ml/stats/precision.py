"""Statistics in float32 or wider, whatever precision the model trains in.

bfloat16 keeps about 3 significant digits and float16 about 4: enough for a gradient step,
too few for a sum over thousands of samples or parameters, a ratio of two such sums or a
Lanczos basis. Every statistic is therefore built from values widened to at least float32
(float64 stays float64); only what goes back into the model, the tangents of a JVP or of a
Hessian-vector product, is cast to the parameters' own dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmd4ml.stats._types import PyTree


def wide_dtype(dtype: jax.typing.DTypeLike) -> np.dtype:
    """The dtype statistics of ``dtype`` values are kept in: float32 or wider for floats.

    Example:
      >>> import jax.numpy as jnp
      >>> wide_dtype(jnp.bfloat16), wide_dtype(jnp.float32), wide_dtype(jnp.int32)
      (dtype('float32'), dtype('float32'), dtype('int32'))
    """
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return np.dtype(dtype)


def widen(tree: PyTree) -> PyTree:
    """Every floating leaf of ``tree`` in :func:`wide_dtype` (a no-op for float32 and wider).

    Example:
      >>> import jax.numpy as jnp
      >>> widen({"w": jnp.ones(2, jnp.bfloat16)})["w"].dtype
      dtype('float32')
    """
    return jax.tree.map(lambda x: x.astype(wide_dtype(x.dtype)), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``: a tangent
    for a JVP at ``like``.

    Example:
      >>> import jax.numpy as jnp
      >>> cast_like(jnp.ones(2), jnp.zeros(2, jnp.bfloat16)).dtype
      dtype(bfloat16)
    """
    return optax.tree.cast_like(tree, like)
