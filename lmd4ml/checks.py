"""Checks of the arguments users give: made where an object is built, before anything is
traced or compiled, each a ``ValueError`` that names the argument, the rule and the value.

Numbers are Python or numpy scalars, never bools (``True`` is no count and no tolerance).
Reals are finite in float32, the narrowest dtype statistics are kept in, as constants of the
compiled step become; counts that become array sizes or int32 loop bounds stay below 2³¹.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

INT32_MAX = 2**31 - 1
"""The largest count that an array axis or an int32 loop counter holds."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""float32's largest and smallest normal numbers."""


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer: a Python or numpy int, not a bool.

    Example:
      >>> import numpy as np
      >>> is_integer(3), is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
      (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number finite in float32: a Python or numpy int or float,
    not a bool, of magnitude at most float32's largest number.

    Example:
      >>> is_real(0.5), is_real(1e300), is_real(float("nan")), is_real("0.5")
      (True, False, False, False)
    """
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= FLOAT32_MAX
    )


def check_int(what: str, value: object, minimum: int, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer in [``minimum``, ``maximum``].

    Example:
      >>> check_int("every: k", 0, 1)
      Traceback (most recent call last):
      ...
      ValueError: every: k must be an integer >= 1, got 0
      >>> check_int("HessMaxEV: max_iters", 2**40, 1, INT32_MAX)
      Traceback (most recent call last):
      ...
      ValueError: HessMaxEV: max_iters must be an integer >= 1 and <= 2147483647, got 1099511627776
    """
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{what} must be an integer >= {minimum}{upper}, got {value!r}")


def check_real(
    what: str, value: object, rule: str, holds: Callable[[float], bool] | None = None
) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (:func:`is_real`) for which
    ``holds`` (if given); ``rule`` says so in words, and the message adds float32's range
    for a value beyond it.

    Example:
      >>> check_real("NoiseScale: decay", 1.0, "a number in [0, 1)", lambda d: 0 <= d < 1)
      Traceback (most recent call last):
      ...
      ValueError: NoiseScale: decay must be a number in [0, 1), got 1.0
    """
    if not is_real(value) or (holds is not None and not holds(value)):
        beyond = isinstance(value, numbers.Real) and abs(value) > FLOAT32_MAX
        span = f" (within float32's range, |x| <= {FLOAT32_MAX:.4g})" if beyond else ""
        raise ValueError(f"{what} must be {rule}{span}, got {value!r}")


def check_seed(owner: str, seed: object) -> None:
    """Raise ``ValueError`` unless ``seed`` can seed ``jax.random.PRNGKey``: an int64.

    Example:
      >>> check_seed("HessMaxEV", 1.5)
      Traceback (most recent call last):
      ...
      ValueError: HessMaxEV: seed must be an integer (a PRNG seed, int64), got 1.5
    """
    if not is_integer(seed) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"{owner}: seed must be an integer (a PRNG seed, int64), got {seed!r}")


def check_eps(owner: str, eps: object, added_to: str = "each variance") -> None:
    """Raise ``ValueError`` unless ``eps`` is a finite number ≥ 0 (the ε added to a variance,
    or to what ``added_to`` says).

    Example:
      >>> check_eps("MeanGSNR", -1.0)
      Traceback (most recent call last):
      ...
      ValueError: MeanGSNR: eps must be a finite number >= 0 (added to each variance), got -1.0
    """
    rule = f"a finite number >= 0 (added to {added_to})"
    check_real(f"{owner}: eps", eps, rule, lambda e: e >= 0)
