"""Settings as JSON can hold them, readably: what a run records about itself.

A run keeps its quantities' options, the user's ``config`` and its optimizer, so that runs
can be told apart and compared (in the store, the dashboard, the sinks' configs).
:func:`json_safe` turns any such value into numbers, strings, lists and dicts:

* ``None``, bools, numbers and strings as they are (NaN and ±inf as ``"nan"``, ``"inf"``);
  numpy and JAX scalars and arrays of up to ``MAX_ITEMS`` elements as numbers and lists,
  larger arrays by shape and dtype;
* an object with a ``describe()`` method (:mod:`lmd4ml.schedules`) by what it says;
* an optax transformation by the function that made it and the values its ``update``
  closes over (``optax.adam`` is a chain of ``scale_by_adam`` and ``scale``: the chain is
  what remains); ``optax.inject_hyperparams(optax.adam)(...)`` by its constructor and every
  argument, schedules included;
* a closure (an optax schedule) by the function that made it and the values it closed over;
  a plain function by its qualified name;
* anything else by its ``repr``, cut to ``MAX_TEXT`` characters.

What cannot be known this way: the alias that built a chain, settings not kept in a closure
(an object's attributes show in its ``repr`` only), defaults told apart from values given.
Pass those in ``config``.

Example:
  >>> import optax
  >>> json_safe({"lr": np.float64(0.1), "sizes": (32, 16), "eps": float("nan")})
  {'lr': 0.1, 'sizes': [32, 16], 'eps': 'nan'}
  >>> json_safe(optax.cosine_decay_schedule(0.1, 1000))  # doctest: +NORMALIZE_WHITESPACE
  {'function': 'optax.cosine_decay_schedule', 'alpha': 0.0, 'decay_steps': 1000,
   'exponent': 1.0, 'init_value': 0.1}
  >>> json_safe(optax.sgd(0.1))["update_fns"][1]
  {'function': 'optax.scale', 'step_size': -0.1}
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

MAX_ITEMS = 64
"""Elements of an array, or items of a list, written out; a larger array is described by its
shape and dtype, a longer list cut."""
MAX_TEXT = 200
"""Characters of a ``repr`` kept."""
MAX_DEPTH = 32
"""Levels of nesting described (closures within closures, containers); deeper ones by their
``repr``: a value that holds itself ends there."""
LIBRARIES = ("optax", "lmd4ml")
"""Packages whose closures are named by the public function that made them
(``optax.cosine_decay_schedule``) rather than their own qualified name."""

# The keys optax.inject_hyperparams keeps the arguments of its inner factory under.
_INJECTED = ("numeric_hps", "other_hps", "sched_hps")


def json_safe(value: Any, depth: int = MAX_DEPTH) -> Any:
    """``value`` as JSON can hold it, readably (see the module's docstring)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else repr(value)
    if depth <= 0:
        return _text(value)
    if isinstance(value, np.ndarray | jax.Array):
        return _array(value, depth)
    if callable(getattr(type(value), "describe", None)):
        return json_safe(value.describe(), depth - 1)
    if isinstance(value, optax.GradientTransformation):
        return _transformation(value, depth)
    if isinstance(value, optax.WrappedSchedule):
        return json_safe(value.schedule_fn, depth - 1)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
        more = [f"... {len(items) - MAX_ITEMS} more"] if len(items) > MAX_ITEMS else []
        return [json_safe(v, depth - 1) for v in items[:MAX_ITEMS]] + more
    if isinstance(value, functools.partial):
        return {
            "partial": json_safe(value.func, depth - 1),
            "args": json_safe(value.args, depth - 1),
            **json_safe(value.keywords, depth - 1),
        }
    if inspect.isfunction(value):
        return _function(value, depth)
    if inspect.ismethod(value):
        return _name(value.__func__)
    return _text(value)


def _text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _array(value: np.ndarray | jax.Array, depth: int) -> Any:
    """Up to ``MAX_ITEMS`` numbers as (nested) lists, else the shape and dtype: a large
    array is data, not a setting, and reading it from a device would cost."""
    if value.size > MAX_ITEMS or not (
        np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.bool_)
    ):
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    return json_safe(np.asarray(value).tolist(), depth)


def _name(fn: Callable) -> str:
    """A function's name as users know it: for a closure a library made, the public function
    that made it (``optax.scale_by_adam``); otherwise its module and qualified name."""
    module = getattr(fn, "__module__", None) or ""
    qualname = fn.__qualname__
    maker = qualname.split(".<locals>.")[0]
    root = module.split(".")[0]
    if root in LIBRARIES and getattr(sys.modules.get(root), maker, None) is not None:
        return f"{root}.{maker}"
    return f"{module}.{qualname}".lstrip(".")


def _closure(fn: types.FunctionType) -> dict[str, Any]:
    """What ``fn`` closed over that says how it was made: not modules, classes, nor helper
    functions defined beside it (its maker's code, not its settings)."""
    maker = fn.__qualname__.split(".<locals>.")[0] + ".<locals>."
    cells = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        helper = inspect.isfunction(value) and value.__qualname__.startswith(maker)
        if not (helper or isinstance(value, types.ModuleType | type) or name == "__class__"):
            cells[name] = value
    return dict(sorted(cells.items()))


def _transformation(tx: optax.GradientTransformation, depth: int) -> Any:
    """An optax transformation by its ``update``, which closes over its settings; one of
    ``optax.inject_hyperparams`` by its ``init``, which closes over every argument."""
    if inspect.isfunction(tx.init):
        settings = _closure(tx.init)
        if "inner_factory" in settings and all(k in settings for k in _INJECTED):
            arguments = {k: v for group in _INJECTED for k, v in settings[group].items()}
            inner = json_safe(settings["inner_factory"], depth - 1)
            name = _name(tx.init)
            made = {"function": f"{name}({inner})"} if isinstance(inner, str) else {
                "function": name, "inner_factory": inner
            }  # fmt: skip
            return {**made, **json_safe(arguments, depth - 1)}
    return json_safe(tx.update, depth - 1)


def _function(fn: types.FunctionType, depth: int) -> Any:
    name, settings = _name(fn), _closure(fn)
    maker = fn.__qualname__.split(".<locals>.")[0]
    if name.startswith("optax.") and maker == "with_extra_args_support" and "tx" in settings:
        return json_safe(settings["tx"], depth - 1)  # optax's adapter: the transform inside
    if not settings:
        return name
    return {"function": name, **json_safe(settings, depth - 1)}
