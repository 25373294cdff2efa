"""Type aliases shared by the statistics modules."""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
