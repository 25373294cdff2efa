"""When to track: a schedule says, for a step counted from 0, whether a quantity is computed.

Anywhere a schedule is taken, an integer k means "every k-th step" and any callable
``step -> bool`` is used as it is. ``lm.train`` asks every quantity's schedule at every step;
the quantities due together run as one compiled variant of the step, compiled the first time
that set is due (so a few distinct sets cost a few compilations, never one per step).

The schedules made here describe themselves (``describe()``), so that a run records them
readably.

Example:
  >>> import lmd4ml as lm
  >>> [step for step in range(12) if lm.schedules.every(4, start=1)(step)]
  [1, 5, 9]
  >>> sorted(step for step in range(1000) if lm.schedules.logarithmic(0, 3, steps=8)(step))
  [0, 1, 2, 7, 19, 51, 138, 372]
  >>> lm.schedules.every(4).describe()
  {'function': 'lmd4ml.schedules.every', 'k': 4, 'start': 0}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lmd4ml import checks

Schedule = int | Callable[[int], bool]


@dataclasses.dataclass(frozen=True)
class Every:
    """Steps ``start``, ``start + k``, ``start + 2k``, … (made by :func:`every`)."""

    k: int
    start: int = 0

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.k == 0

    def describe(self) -> dict[str, Any]:
        return {"function": f"{__name__}.every", **dataclasses.asdict(self)}


def every(k: int, start: int = 0) -> Every:
    """Track at steps ``start``, ``start + k``, ``start + 2k``, …"""
    checks.check_int("every: k", k, 1)
    checks.check_int("every: start", start, 0)
    return Every(int(k), int(start))


@dataclasses.dataclass(frozen=True)
class Logarithmic:
    """The steps of :func:`logarithmic`, with the arguments that made them."""

    start: float
    end: float
    steps: int
    base: float
    init: bool
    due: frozenset[int] = dataclasses.field(repr=False, compare=False)

    def __call__(self, step: int) -> bool:
        return step in self.due

    def describe(self) -> dict[str, Any]:
        arguments = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del arguments["due"]  # what the arguments make
        return {"function": f"{__name__}.logarithmic", **arguments}


def logarithmic(
    start: float, end: float, steps: int = 300, base: float = 10.0, init: bool = True
) -> Logarithmic:
    """Track at ``steps`` points spaced evenly in log between ``base**start`` and ``base**end``.

    The points are truncated to integers, as in Cockpit's schedule of the same name, so early
    steps, where training changes fastest, are tracked densely and later ones sparsely. With
    ``init`` step 0 is tracked too.
    """
    for name, exponent in (("start", start), ("end", end)):
        checks.check_real(f"logarithmic: {name}", exponent, "a finite number (an exponent)")
    checks.check_int("logarithmic: steps", steps, 1)
    checks.check_real("logarithmic: base", base, "a finite number > 1", lambda b: b > 1)
    if not end >= start:
        raise ValueError(f"logarithmic: end must be >= start, got start={start}, end={end}")
    # The last point, base**end, becomes a step number, an int64: 2**62 leaves room for
    # the rounding of the float64 power.
    if end * math.log(base) >= 62 * math.log(2):
        raise ValueError(
            f"logarithmic: base**end must be below 2**62 (the last step it tracks), got "
            f"{base}**{end}"
        )
    if not isinstance(init, bool):
        raise ValueError(f"logarithmic: init must be True or False, got {init!r}")
    points = np.logspace(start, end, steps, base=base).astype(np.int64)
    due = frozenset(points.tolist()) | ({0} if init else set())
    return Logarithmic(start, end, int(steps), base, init, due)


def as_schedule(schedule: Schedule, what: str = "a schedule") -> Callable[[int], bool]:
    """A callable ``step -> bool`` from an integer k (every k-th step) or a callable.

    Example:
      >>> as_schedule(3)(6), as_schedule(lambda step: step < 2)(5)
      (True, False)
    """
    if callable(schedule):
        return schedule
    if not checks.is_integer(schedule) or schedule < 1:
        raise ValueError(
            f"{what} must be an integer >= 1 (every k-th step) or a callable step -> bool, "
            f"got {schedule!r}"
        )
    return every(schedule)
