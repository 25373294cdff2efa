"""Fuzzing the arguments of every quantity and schedule: each value is either taken, and then
is one the rule (written out here, apart from the library's checks) allows, or refused at
construction with a ValueError naming the class and the argument. Nothing is compiled."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmd4ml as lm
from lmd4ml import schedules

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
INT32_MAX = 2**31 - 1
METHODS = ("auto", "exact", "ggn", "ggn_mc", "hutchinson")
ENDS = ("same_batch", "next_batch")
FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ------------------------------------------------------------------------ what is allowed


def real(v: object) -> bool:
    """A Python or numpy number, not a bool, finite in float32."""
    numeric = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
    return numeric and math.isfinite(v) and abs(v) <= F32_MAX


def integer(v: object, low: int, high: float = math.inf) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool) and low <= v <= high


def count(v: object) -> bool:
    """A count that becomes an array axis or an int32 loop bound."""
    return integer(v, 1, INT32_MAX)


def seed(v: object) -> bool:
    return integer(v, -(2**63), 2**63 - 1)


def flag(v: object) -> bool:
    return isinstance(v, bool)


def eps(v: object) -> bool:
    return real(v) and v >= 0


def bins_fit(lo: float, hi: float, n: int) -> bool:
    """n bins on [lo, hi] with edges and width that float32 holds."""
    return max(abs(lo), abs(hi)) * n <= F32_MAX and (hi - lo) / n >= F32_TINY


def pair_of(v: object, ok) -> bool:
    return isinstance(v, tuple | list) and len(v) == 2 and all(ok(x) for x in v)


def hist2d_bins(v: object) -> bool:
    default = ((-1.0, 1.0), (-2.0, 2.0))
    return pair_of(v, count) and all(bins_fit(*r, n) for r, n in zip(default, v, strict=True))


def hist2d_range(v: object) -> bool:
    interval = lambda p: pair_of(p, real) and p[0] < p[1]  # noqa: E731
    return pair_of(v, interval) and all(bins_fit(*r, n) for r, n in zip(v, (40, 50), strict=True))


DIAG = {
    "method": lambda v: isinstance(v, str) and v in METHODS,
    "probes": count,
    "seed": seed,
    "exact_max_params": lambda v: integer(v, 1),
    "max_directions": lambda v: integer(v, 1),
}
RULES = {
    lm.GradNorm: {"per_layer": flag},
    lm.Distance: {"per_layer": flag},
    lm.UpdateSize: {"per_layer": flag},
    lm.MeanGSNR: {"eps": eps},
    lm.EarlyStopping: {"eps": eps},
    lm.CABS: {"lr": lambda v: v is None or (real(v) and v > 0)},
    lm.NoiseScale: {"decay": lambda v: real(v) and 0 <= v <= 1 - 2**-24},
    lm.Alpha: {
        "end": lambda v: isinstance(v, str) and v in ENDS,
        "var_floor": lambda v: real(v) and v >= F32_TINY,
    },
    lm.HessMaxEV: {
        "rtol": lambda v: real(v) and 0 < v < 1,
        "max_iters": count,
        "krylov_dim": count,
        "seed": seed,
    },
    lm.HessTrace: {**DIAG, "per_layer": flag},
    lm.TICDiag: {**DIAG, "eps": eps},
    lm.TICTrace: {**DIAG, "eps": eps},
    lm.GradHist1d: {
        "nbins": count,
        "maxval": lambda v: real(v) and v > 0 and bins_fit(-v, v, 100),
    },
    lm.GradHist2d: {"bins": hist2d_bins, "range": hist2d_range},
}
ARGUMENTS = [(cls, name) for cls, rules in RULES.items() for name in rules]

# Values of every kind an argument may be given: numbers of every size and sign (NaN, ±inf,
# beyond float32 and int64), numpy scalars, bools, strings (the valid ones among them),
# None, containers, arrays.
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 3),
    st.floats(),
    st.floats(-2, 2),
    st.sampled_from([1e-45, 1e-38, 1e-30, 0.99999999, 1 - 2**-24, 3e38, 4e38, 1e300]),
    st.integers(-(2**40), 2**40).map(np.int64),
    st.floats(width=32).map(np.float32),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from([*METHODS, *ENDS, "1e-5", "3"]),
)
values = st.one_of(
    scalars,
    st.tuples(scalars, scalars),
    st.lists(st.integers(-3, 100), max_size=3),
    st.tuples(st.tuples(scalars, scalars), st.tuples(scalars, scalars)),
    st.just(np.array([1.0])),
    st.just(object()),
)


def test_every_argument_has_a_rule() -> None:
    """A new argument needs a rule here, and so a thought about what it accepts."""
    exported = [v for v in vars(lm).values() if isinstance(v, type) and issubclass(v, lm.Quantity)]
    for cls in set(exported) - {lm.Quantity}:
        fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "name"}
        assert fields == set(RULES.get(cls, {})), cls


def says(error: Exception, *words: str) -> bool:
    return all(re.search(rf"\b{re.escape(w)}\b", str(error)) for w in words)


@FUZZ
@given(argument=st.sampled_from(ARGUMENTS), value=values)
def test_quantity_arguments_are_taken_or_refused_clearly(argument: tuple, value: object):
    cls, name = argument
    allowed = RULES[cls][name](value)
    try:
        q = cls(**{name: value})
    except ValueError as error:
        assert not allowed, f"{cls.__name__}({name}={value!r}) refused: {error}"
        assert says(error, cls.__name__, name), error
        return
    assert allowed, f"{cls.__name__}({name}={value!r}) was taken"
    assert getattr(q, name) is value
    repr(q), lm.quantities.base.describe(q)  # its run metadata


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    key=st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True), values),
    fn=st.sampled_from([lambda ctx: ctx.loss, None, 3]),
    per_sample=st.sampled_from([(), [lm.stats.SQ_NORMS], lm.stats.SQ_NORMS, [3], "sq", None]),
)
def test_custom_quantity_arguments(key: object, fn: object, per_sample: object) -> None:
    identifier = isinstance(key, str) and re.fullmatch(r"[A-Za-z_]\w*", key, re.ASCII)
    allowed = identifier and callable(fn) and per_sample in ((), [lm.stats.SQ_NORMS])
    try:
        q = lm.quantity(key, fn, per_sample=per_sample)
    except (ValueError, TypeError) as error:
        assert not allowed, error
        assert says(error, "quantity"), error
        return
    assert allowed and q.key == key


# ------------------------------------------------------------------------------ schedules


def due(schedule, n: int = 200) -> list[int]:
    return [step for step in range(n) if schedule(step)]


@FUZZ
@given(k=values, start=st.one_of(values, st.integers(0, 50)))
def test_every(k: object, start: object) -> None:
    allowed = integer(k, 1) and integer(start, 0)
    try:
        schedule = schedules.every(k, start)
    except ValueError as error:
        assert not allowed and says(error, "every"), error
        return
    assert allowed
    assert due(schedule) == [s for s in range(200) if s >= start and (s - start) % k == 0]


@FUZZ
@given(
    start=st.one_of(st.floats(-3, 4), values),
    end=st.one_of(st.floats(-3, 4), st.sampled_from([18.6, 18.7, 62.0, 400.0]), values),
    steps=st.one_of(st.integers(-2, 60), values.filter(lambda v: not integer(v, 10**4))),
    base=st.one_of(st.sampled_from([10.0, 2, np.e, 1.5]), values),
    init=st.one_of(st.booleans(), values),
)
def test_logarithmic(start, end, steps, base, init) -> None:
    allowed = (
        real(start)
        and real(end)
        and integer(steps, 1)
        and real(base)
        and base > 1
        and end >= start
        and end * math.log(base) < 62 * math.log(2)
        and flag(init)
    )
    try:
        schedule = schedules.logarithmic(start, end, steps, base, init)
    except ValueError as error:
        assert not allowed and says(error, "logarithmic"), error
        return
    assert allowed
    points = np.logspace(start, end, steps, base=base).astype(np.int64)
    expected = sorted({*points.tolist(), *([0] if init else [])})
    assert due(schedule, 2000) == [p for p in expected if p < 2000]


@FUZZ
@given(schedule=st.one_of(values, st.just(print)))
def test_as_schedule(schedule: object) -> None:
    allowed = callable(schedule) or integer(schedule, 1)
    try:
        got = schedules.as_schedule(schedule, "track_every")
    except ValueError as error:
        assert not allowed and says(error, "track_every"), error
        return
    assert allowed and callable(got)


@pytest.mark.parametrize("given_as", [["loss"], "loss", 3])
def test_train_schedules_must_be_a_mapping(given_as: object) -> None:
    loss_fn = lambda w, x: (x @ w) ** 2  # noqa: E731
    learner = lm.Learner(np.zeros(1), loss_fn, [np.ones((2, 1))], optax.sgd(0.1), [lm.Loss()])
    with pytest.raises(TypeError, match=r"schedules must be a mapping .* got"):
        lm.train(learner, schedules=given_as, progress=False, runs_dir=None)
    assert learner.steps_done == 0
