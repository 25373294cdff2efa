"""Schedules: which steps each one tracks, and clear errors for bad ones."""

import numpy as np
import pytest

from lmd4ml import schedules


def due(schedule, n: int = 40) -> list[int]:
    return [step for step in range(n) if schedule(step)]


def test_every() -> None:
    assert due(schedules.every(1), 5) == [0, 1, 2, 3, 4]
    assert due(schedules.every(7)) == [0, 7, 14, 21, 28, 35]
    assert due(schedules.every(10, start=5)) == [5, 15, 25, 35]


def test_logarithmic_matches_truncated_logspace() -> None:
    expected = sorted({0, *np.logspace(1, 3, 50).astype(int).tolist()})
    assert due(schedules.logarithmic(1, 3, steps=50), 2000) == expected
    assert due(schedules.logarithmic(0, 1, steps=3, init=False)) == [1, 3, 10]
    assert due(schedules.logarithmic(0, 2, steps=4, base=2)) == [0, 1, 2, 4]


def test_as_schedule() -> None:
    assert due(schedules.as_schedule(16), 50) == [0, 16, 32, 48]
    assert schedules.as_schedule(print) is print


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4", None])
def test_bad_schedules_say_what_was_expected(bad) -> None:
    with pytest.raises(ValueError, match=rf"my_key must be an integer >= 1.*got {bad!r}"):
        schedules.as_schedule(bad, "my_key")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        schedules.every(bad)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        schedules.every(2, start=-1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        schedules.logarithmic(0, 2, steps=0)
    with pytest.raises(ValueError, match="end must be >= start"):
        schedules.logarithmic(3, 2)
