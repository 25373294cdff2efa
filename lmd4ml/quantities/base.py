"""The quantity protocol and the step context that quantities read from.

A quantity is a key plus a pure function of a :class:`StepContext` and its own state,
in the style of an optax transformation: ``init(params) -> state`` and
``compute(ctx, state) -> (value, state)``. Everything runs inside the compiled train step.
A quantity may also report values beside its own, each under a key of its own
(:attr:`Quantity.siblings`, :class:`Report`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lmd4ml import stats
from lmd4ml.describing import json_safe
from lmd4ml.stats import LossFn, PerSample, PyTree


class StepContext:
    """What one train step knows, with shared statistics built lazily, at most once each.

    Attributes are computed on first access while the step is traced, so a statistic that no
    quantity reads never enters the compiled program, and one that several read is built once.
    All per-sample statistics declared by the step's quantities (``Quantity.per_sample``) come
    from a single chunked pass over the batch.

    Attributes:
      params: θₜ, where this step's gradient is taken.
      new_params: θₜ₊₁ = θₜ + updates.
      updates: the optimizer's update θₜ₊₁ − θₜ.
      losses: per-sample losses ℓᵢ at θₜ, shape (B,).
      grads: the mean gradient g = (1/B) Σᵢ ∇ℓᵢ that the optimizer used.
      vjp: ``vjp(c)`` = Σᵢ cᵢ ∇ℓᵢ for a cotangent c of shape (B,).
      step: t, the number of updates applied before this one (an int32 scalar).
      mask: which samples are real (a boolean (B,)), or None when all are. Padded samples
        have ℓᵢ = 0 and ∇ℓᵢ = 0 here; ``batch_size`` counts the real ones, and every
        statistic built here leaves the padded ones out.

    ``per_sample`` names the statistics to build in the shared pass, ``memory_budget`` bounds
    the bytes it holds at once (per device), and ``data`` says how the batch is split over
    devices, if it is. ``split``: the model and output loss, for a loss from
    ``lm.supervised`` (:class:`lmd4ml.stats.ggn.Split`), else None. ``per_sample_pass``: the
    declared statistics, where the step already made the pass (it linearizes the loss in it:
    :func:`lmd4ml.step.linearize_in_pass`).

    Under mixed precision ``params`` and ``new_params`` keep the model's dtypes, while
    ``losses``, ``grads``, ``updates``, ``vjp``'s results and every statistic built here are
    float32 or wider (:mod:`lmd4ml.stats.precision`), so quantities accumulate in float32.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        batch: PyTree,
        params: PyTree,
        losses: jax.Array,
        vjp: Callable[[jax.Array], PyTree],
        grads: PyTree,
        updates: PyTree,
        new_params: PyTree,
        step: jax.Array,
        per_sample: Mapping[str, PerSample] | None = None,
        memory_budget: int = 2**26,
        data: stats.DataAxis | None = None,
        mask: jax.Array | None = None,
        split: stats.ggn.Split | None = None,
        per_sample_pass: Mapping[str, jax.Array] | None = None,
    ):
        self.loss_fn = loss_fn
        self.split = split
        self.batch = batch
        self.params = params
        self.losses = stats.widen(losses)
        self.vjp = lambda c: stats.widen(vjp(c.astype(losses.dtype)))
        self.grads = stats.widen(grads)
        self.updates = stats.widen(updates)
        self.new_params = new_params
        self.step = step
        self.mask = mask
        self._declared = dict(per_sample or {})
        self._memory_budget = memory_budget
        self._data = data
        self._last_pass: jax.Array | tuple = ()
        self._given_pass = per_sample_pass

    @property
    def batch_size(self) -> int | jax.Array:
        """B, the number of samples: a Python int, known while tracing, or with a ``mask``
        the number of real samples (a traced scalar of the losses' dtype)."""
        if self.mask is None:
            return self.losses.shape[0]
        return jnp.sum(self.mask).astype(self.losses.dtype)

    def sample_mean(self, values: jax.Array) -> jax.Array:
        """The mean of per-sample ``values`` (B,) over the real samples."""
        return stats.sample_mean(values, self.mask)

    @cached_property
    def loss(self) -> jax.Array:
        """L = mean(ℓ) over the real samples."""
        return self.sample_mean(self.losses)

    @cached_property
    def grad_sq_norm(self) -> jax.Array:
        """‖g‖²."""
        return optax.tree.norm(self.grads, squared=True)

    @cached_property
    def _declared_pass(self) -> Mapping[str, jax.Array]:
        if self._given_pass is not None:
            return self._given_pass
        return self._pass(self._declared)

    def _pass(self, wanted: Mapping[str, PerSample]) -> dict[str, jax.Array]:
        return stats.per_sample_pass(
            self.loss_fn, self.params, self.batch, wanted, self._memory_budget, self._data
        )

    def per_sample(self, stat: PerSample) -> jax.Array:
        """The value of a per-sample statistic, from the shared pass when it was declared.

        With a ``mask``, a ``"sum"`` statistic leaves the padded samples out: their
        gradients are zero, so their share is their number times ``stat.fn`` of one zero
        gradient, taken off (a histogram's count of zeros, say; exactly, for
        :class:`~lmd4ml.stats.Counts`).
        """
        if stat.name in self._declared:
            value = self._declared_pass[stat.name]
        else:
            value = self._pass({stat.name: stat})[stat.name]
        if self.mask is None or stat.combine != "sum":
            return value
        zero = jax.tree.map(lambda x: jnp.zeros((1, *x.shape), x.dtype), stats.widen(self.params))
        one = stat.fn(zero, self.params)
        padded = jnp.sum(~self.mask)
        if isinstance(value, stats.Counts):
            return value - one.times(padded)
        return value - padded.astype(value.dtype) * one.astype(value.dtype)

    @cached_property
    def sq_norms(self) -> jax.Array:
        """‖∇ℓᵢ‖² for every sample, shape (B,)."""
        return self.per_sample(stats.SQ_NORMS)

    @cached_property
    def projections(self) -> jax.Array:
        """pᵢ = ∇ℓᵢ · g for every sample, shape (B,), from one JVP along g."""
        return self.directional(self.params, self.grads)[1]

    def directional(self, params: PyTree, direction: PyTree) -> tuple[jax.Array, jax.Array]:
        """ℓᵢ and ∇ℓᵢ · v at ``params`` on this step's batch (:func:`lmd4ml.stats.directional`,
        within the step's ``memory_budget``), each call's pass after the previous one's."""
        out = stats.directional(
            self.loss_fn, params, self.batch, direction, self._last_pass, self._memory_budget
        )
        self._last_pass = out[1]
        return out

    @cached_property
    def second_moment(self) -> PyTree:
        """(1/B) Σᵢ (∇ℓᵢ)² per coordinate, a pytree like the params (one per-sample pass)."""
        unravel = ravel_pytree(stats.widen(self.params))[1]
        return unravel(self.per_sample(stats.SQ_GRADS) / self.batch_size)

    @cached_property
    def hvp(self) -> Callable[[PyTree], PyTree]:
        """``hvp(v)`` = ∇²L v at θₜ, forward over reverse, the gradient linearized once."""
        return stats.hessian.hvp(self.loss_fn, self.params, self.batch, self.mask)

    @cached_property
    def _hessian_diags(self) -> dict[stats.hessian.DiagEstimator, PyTree]:
        return {}

    def hessian_diag(
        self, estimator: stats.hessian.DiagEstimator, key: jax.Array | None = None
    ) -> PyTree:
        """diag(∇²L), a pytree like the params, built once per step per ``estimator``.

        ``key`` draws Hutchinson's probes; equal estimators (same method, probes and seed)
        share the first caller's, so quantities with the same settings see the same estimate.
        """
        if estimator not in self._hessian_diags:
            self._hessian_diags[estimator] = estimator(
                self.hvp, self.params, key, self._memory_budget
            )
        return self._hessian_diags[estimator]

    @cached_property
    def output_directions(self) -> int:
        """How many directions the output loss's Hessian square root has per sample (one
        sample's outputs' size, for the closed forms): the exact GGN's cost in backward
        passes (needs a ``split``)."""
        split = self.require_split("the model's outputs")
        shape = jax.eval_shape(split.forward, self.params, split.inputs).shape[1:]
        return split.curvature.directions(shape)

    @cached_property
    def piecewise_linear(self) -> bool:
        """Whether the model is piecewise linear in each parameter leaf alone, so that the
        GGN's diagonal is the Hessian's (:func:`lmd4ml.stats.ggn.piecewise_linear`); False
        without a ``split``."""
        if self.split is None:
            return False
        return stats.ggn.piecewise_linear(self.split.forward, self.params, self.split.inputs)

    def require_split(self, what: str) -> stats.ggn.Split:
        """The ``split``, or a clear error saying that ``what`` needs ``lm.supervised``."""
        if self.split is None:
            raise ValueError(
                f"{what} needs the loss split into a model and a loss on its outputs: make it "
                "with lm.supervised(apply_fn, output_loss), e.g. lm.supervised(model.apply, "
                "optax.softmax_cross_entropy_with_integer_labels)"
            )
        return self.split

    @cached_property
    def _ggn_diags(self) -> dict[int | None, PyTree]:
        return {}

    def ggn_diag(self, seed: int | None = None, key: jax.Array | None = None) -> PyTree:
        """diag(G) of the mean loss, G = (1/B) Σᵢ Jᵢᵀ ∇²_fℓᵢ Jᵢ the generalised Gauss-Newton
        matrix (:mod:`lmd4ml.stats.ggn`), a pytree like the params: exact with ``seed``
        None, else its one-sample Monte-Carlo estimate drawn with ``key``. Built once per step
        per seed: quantities with the same seed share the first caller's draw.
        """
        if seed in self._ggn_diags:
            return self._ggn_diags[seed]
        split = self.require_split("the GGN")
        n = self.losses.shape[0]
        curvature, targets = split.curvature, split.targets
        if seed is None:
            directions = self.output_directions

            def rows(f: jax.Array, sample: PyTree, _: jax.Array) -> jax.Array:
                return curvature.sqrt(f, targets(sample))

            keys = None
        else:
            directions = 1

            def rows(f: jax.Array, sample: PyTree, k: jax.Array) -> jax.Array:
                return curvature.sample(f, targets(sample), k)[None]

            keys = jax.random.key_data(jax.random.split(key, n))
        weights = None if self.mask is None else self.mask.astype(self.losses.dtype)
        total = stats.ggn.diag(
            split.forward,
            rows,
            self.params,
            split.inputs,
            directions,
            weights,
            keys,
            self._memory_budget,
            self._data,
        )
        value = jax.tree.map(lambda d: d / self.batch_size, total)
        self._ggn_diags[seed] = value
        return value


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IDENTIFIER_RULE = "an identifier (letters, digits and _, not starting with a digit)"


def check_key(value: object, what: str, example: str) -> None:
    """Raise ``ValueError`` unless ``value`` can key a quantity: an identifier.

    Example:
      >>> check_key("narrow", "GradHist1d: name=", "narrow")
      >>> check_key("my-hist", "GradHist1d: name=", "narrow")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: GradHist1d: name= must be an identifier (letters, ...; got 'my-hist'
    """
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"{what} must be {IDENTIFIER_RULE}, e.g. {example!r}; got {value!r}")


def _repr(q: Quantity) -> str:
    """``Class(field=value, ...)`` as a dataclass shows it, with ``name`` last and only if set."""
    fields = [f for f in dataclasses.fields(q) if f.repr and f.name != "name"]
    if q.name is not None:
        fields += [f for f in dataclasses.fields(q) if f.name == "name"]
    args = ", ".join(f"{f.name}={getattr(q, f.name)!r}" for f in fields)
    return f"{type(q).__qualname__}({args})"


def sibling_key(key: str, suffix: str) -> str:
    """The key a sibling value reports under: its quantity's key, ``_``, its suffix.

    Example:
      >>> sibling_key("top", "converged")
      'top_converged'
    """
    return f"{key}_{suffix}"


class Report(NamedTuple):
    """What ``compute`` returns as its value when its quantity declares ``siblings``: the
    quantity's own value, and by suffix the values reported beside it.

    Example:
      >>> import jax.numpy as jnp
      >>> Report(jnp.array(2.0), {"converged": jnp.array(True)}).siblings["converged"].item()
      True
    """

    value: Any
    siblings: Mapping[str, Any]


class _Key:
    """A quantity class's ``key``: on an instance its ``name`` if it was given one, else the
    class's default key, which is also what the class itself reads (``lm.NormTest.key``)."""

    def __init__(self, default: str | None):
        self.default = default

    def __get__(self, instance: Quantity | None, owner: type) -> str:
        if instance is not None and instance.name is not None:
            return instance.name
        if self.default is None:
            raise AttributeError(
                f"{owner.__name__} has no key: set `key = ...` in the class or pass name=..."
            )
        return self.default


@dataclasses.dataclass(frozen=True)
class Quantity(abc.ABC):
    """Base of every quantity: a ``key`` and a pure ``compute``.

    Subclasses set ``key``, override :meth:`compute`, and where they carry state across steps
    also :meth:`init`. ``per_sample`` lists the per-sample statistics ``compute`` reads, so
    the step can build them all in one pass.

    Every quantity takes ``name=`` (keyword only), the key it reports under instead of its
    class's, so that two settings of one instrument can run in one step. A name is an
    identifier; it is checked at construction.

    Example:
      >>> import lmd4ml as lm
      >>> lm.GradHist1d(maxval=0.1, name="narrow").key, lm.GradHist1d().key, lm.NormTest.key
      ('narrow', 'grad_hist_1d', 'norm_test')
    """

    key: ClassVar[str] = _Key(None)  # type: ignore[assignment]
    per_sample: ClassVar[tuple[PerSample, ...]] = ()
    uses_samples: ClassVar[bool] = True
    """Whether the value needs each sample's own loss or gradient (per-sample statistics,
    ``ctx.losses``, ``ctx.vjp``); False for batch-level values (the mean loss, g, curvature
    of the mean loss), which stay defined when samples interact (train-mode BatchNorm)."""
    siblings: ClassVar[tuple[str, ...]] = ()
    """Suffixes of the values reported beside the quantity's own, each under
    ``f"{key}_{suffix}"`` (``hess_max_ev_converged``); ``compute`` then returns a
    :class:`Report` of its value and these, by suffix. They are logged, stored and plotted
    as values of their own, computed and tracked with the quantity."""
    name: str | None = dataclasses.field(default=None, kw_only=True)

    __repr__ = _repr

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        default = cls.__dict__.get("key")
        if isinstance(default, str):
            check_key(default, f"{cls.__name__}: key", "my_quantity")
            cls.key = _Key(default)  # type: ignore[assignment]
        for suffix in cls.__dict__.get("siblings", ()):
            check_key(sibling_key("key", suffix), f"{cls.__name__}: sibling key", "key_converged")
        if "__repr__" not in cls.__dict__:  # the dataclass decorator keeps what is set here
            cls.__repr__ = _repr  # type: ignore[method-assign]

    def __new__(cls, *args: Any, **kwargs: Any) -> Quantity:
        del args
        if kwargs.get("name") is not None:
            check_key(kwargs["name"], f"{cls.__name__}: name=", "narrow")
        return super().__new__(cls)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every key the quantity reports under: its ``key``, then one per sibling.

        Example:
          >>> import lmd4ml as lm
          >>> lm.HessMaxEV(name="top").metric_keys
          ('top', 'top_converged', 'top_iterations')
        """
        return (self.key, *(sibling_key(self.key, s) for s in self.siblings))

    def by_key(self, value: Any) -> dict[str, Any]:
        """What :meth:`compute` returned as its value, by metric key (:attr:`metric_keys`).

        Example:
          >>> import lmd4ml as lm
          >>> lm.HessMaxEV().by_key(Report(5.0, {"converged": True, "iterations": 3}))
          {'hess_max_ev': 5.0, 'hess_max_ev_converged': True, 'hess_max_ev_iterations': 3}
        """
        if not self.siblings and not isinstance(value, Report):
            return {self.key: value}
        got = sorted(value.siblings) if isinstance(value, Report) else None
        if got != sorted(self.siblings):
            raise TypeError(
                f"{type(self).__name__} ({self.key!r}) declares siblings {self.siblings}, so "
                f"compute must return Report(value, {{suffix: ...}}) with exactly those "
                f"suffixes; got {'siblings ' + str(got) if got is not None else type(value)}"
            )
        siblings = {sibling_key(self.key, s): value.siblings[s] for s in self.siblings}
        return {self.key: value.value, **siblings}

    def init(self, params: PyTree) -> PyTree:
        """The quantity's state before the first step (empty by default)."""
        del params
        return ()

    def check(self, batch_size: int) -> None:
        """Raise ``ValueError`` if this quantity has no value for batches of ``batch_size``."""
        del batch_size

    def axes(self) -> dict[str, list[float]]:
        """Coordinates along the value's axes, by name, for plots; ``{}``: positions 0, 1, …"""
        return {}

    @property
    def nan_is_missing(self) -> bool:
        """Whether NaN is a value it reports by design ("none at this step"), not divergence:
        ``lm.train`` and ``lm.Recorder`` then do not warn of it."""
        return False

    @abc.abstractmethod
    def compute(self, ctx: StepContext, state: PyTree) -> tuple[Any, PyTree]:
        """The value at this step and the next state."""


@dataclasses.dataclass(frozen=True, eq=False)
class _FunctionQuantity(Quantity):
    fn: Callable[..., Any]
    init_fn: Callable[[PyTree], PyTree] | None
    stats: tuple[PerSample, ...]
    samples: bool = True

    @property
    def key(self) -> str:  # type: ignore[override]
        return self.name

    @property
    def uses_samples(self) -> bool:  # type: ignore[override]
        return self.samples

    @property
    def per_sample(self) -> tuple[PerSample, ...]:  # type: ignore[override]
        return self.stats

    def init(self, params: PyTree) -> PyTree:
        return () if self.init_fn is None else self.init_fn(params)

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[Any, PyTree]:
        if self.init_fn is None:
            return self.fn(ctx), state
        return self.fn(ctx, state)


def quantity(
    key: str,
    fn: Callable[..., Any],
    *,
    init: Callable[[PyTree], PyTree] | None = None,
    per_sample: Sequence[PerSample] = (),
    uses_samples: bool = True,
) -> Quantity:
    """A quantity from one function of the step context.

    Without ``init``, ``fn(ctx) -> value``. With ``init``, the quantity carries state:
    ``init(params) -> state`` and ``fn(ctx, state) -> (value, state)``. ``uses_samples=False``
    declares a batch-level value (reading only ``ctx.loss``, ``ctx.grads``, the params, the
    update or ``ctx.hvp``): it is then computed where the loss's samples interact (train-mode
    BatchNorm), where per-sample values are refused (:attr:`Quantity.uses_samples`).

    Example:
      >>> import lmd4ml as lm, jax.numpy as jnp
      >>> max_loss = lm.quantity("max_loss", lambda ctx: jnp.max(ctx.losses))
      >>> max_loss.key
      'max_loss'
    """
    check_key(key, "lm.quantity: key", "max_loss")
    if not callable(fn):
        raise TypeError(f"quantity {key!r}: fn must be callable, got {type(fn).__name__}")
    if init is not None and not callable(init):
        raise TypeError(
            f"quantity {key!r}: init must be callable (params -> state) or None, got "
            f"{type(init).__name__}"
        )
    stats_ok = (
        isinstance(per_sample, Sequence)
        and not isinstance(per_sample, str | PerSample)
        and all(isinstance(s, PerSample) for s in per_sample)
    )
    if not stats_ok:
        raise TypeError(
            f"quantity {key!r}: per_sample must be a sequence of lm.PerSample statistics "
            f"(e.g. [lm.stats.SQ_NORMS]), got {per_sample!r}"
        )
    return _FunctionQuantity(fn, init, tuple(per_sample), bool(uses_samples), name=key)


def describe_keys(q: Quantity) -> dict[str, dict[str, Any]]:
    """:func:`describe` for every key ``q`` reports under: a sibling's ``kind`` is its
    quantity's kind with its suffix, and its ``sibling_of`` is the quantity's key.

    Example:
      >>> import lmd4ml as lm
      >>> about = describe_keys(lm.HessMaxEV(name="top"))
      >>> list(about), about["top_iterations"]["kind"], about["top_iterations"]["sibling_of"]
      (['top', 'top_converged', 'top_iterations'], 'hess_max_ev_iterations', 'top')
    """
    own = describe(q)
    siblings = {
        sibling_key(q.key, s): {**own, "kind": sibling_key(own["kind"], s), "sibling_of": q.key}
        for s in q.siblings
    }
    return {q.key: own, **siblings}


def describe(q: Quantity) -> dict[str, Any]:
    """What kind of quantity ``q`` is, for a run's metadata (JSON-safe).

    ``class`` is its class's name (``"quantity"`` for one made by :func:`quantity`), ``kind``
    the key its class reports under by default, which readers such as the dashboard go by
    whatever the quantity's ``name``, and ``args`` its settings (its dataclass fields but
    ``name``), and ``resolved`` what it decided when the step was traced, if anything (the
    method a curvature instrument used).

    Example:
      >>> import lmd4ml as lm
      >>> describe(lm.GradHist1d(nbins=20, maxval=0.1, name="narrow"))
      {'class': 'GradHist1d', 'kind': 'grad_hist_1d', 'args': {'nbins': 20, 'maxval': 0.1}}
    """
    if isinstance(q, _FunctionQuantity):
        args = {"fn": q.fn, "init": q.init_fn, "per_sample": [s.name for s in q.stats]}
        return {"class": "quantity", "kind": q.key, "args": json_safe(args)}
    kind = getattr(type(q), "key", None)
    fields = [f for f in dataclasses.fields(q) if f.name != "name" and f.init]
    out = {
        "class": type(q).__qualname__,
        "kind": kind if isinstance(kind, str) else q.key,
        "args": json_safe({f.name: getattr(q, f.name) for f in fields}),
    }
    # What the quantity decided while the step was traced (the method a curvature
    # instrument resolved "auto" to), for a reader to know what was measured.
    resolved = {k: v for k, v in getattr(q, "resolved", {}).items() if k != "warned"}
    return {**out, "resolved": json_safe(resolved)} if resolved else out


State = TypeVar("State")


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating-point element of ``tree`` is finite (other dtypes always are).

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite((jnp.ones(2), jnp.int32(3)))), bool(all_finite(jnp.array([jnp.inf])))
      (True, False)
    """
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def reset_if_nonfinite(
    carried: State,
    initial: Callable[[], State],
    resets: jax.Array,
    step: jax.Array,
    what: str,
) -> tuple[State, jax.Array]:
    """``carried``, or ``initial()`` if any of its floating-point elements is NaN or ±inf, and
    ``resets`` (how many times so far) plus one if so.

    A quantity that carries state across steps (a warm start, a moving average) passes it
    through here, so that one non-finite step does not poison the rest of the run. The first
    reset (``resets`` 0) tells the user: a ``RuntimeWarning`` about ``what``, with ``step``,
    sent from inside the compiled step (``jax.debug.callback``). Both happen in a
    ``lax.cond``: a step where all is finite costs one check.

    Example:
      >>> import jax.numpy as jnp
      >>> nan, zeros = jnp.array([jnp.nan, 1.0]), lambda: jnp.zeros(2)
      >>> state, resets = reset_if_nonfinite(nan, zeros, jnp.int32(1), jnp.int32(7), "x")
      >>> state.tolist(), int(resets)
      ([0.0, 0.0], 2)
    """
    bad = ~all_finite(carried)
    warn = functools.partial(jax.debug.callback, functools.partial(_warn_reset, what))
    jax.lax.cond(bad & (resets == 0), warn, lambda step: None, step)
    carried = jax.lax.cond(bad, lambda _: initial(), lambda kept: kept, carried)
    return carried, resets + bad.astype(resets.dtype)


def _warn_reset(what: str, step: np.ndarray) -> None:
    # Called back from the compiled step: there is no frame of the user's to point at.
    warnings.warn(
        f"lmd4ml: {what} was NaN or infinite at step {int(step)} and is reset to its initial "
        "state, so that later steps start afresh (said at the first reset only)",
        RuntimeWarning,
        stacklevel=1,
    )
