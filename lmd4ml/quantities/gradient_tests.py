"""Gradient tests: is the batch gradient dominated by per-sample noise?"""

from __future__ import annotations

import dataclasses

import jax

from lmd4ml import stats
from lmd4ml.quantities.base import Quantity, StepContext
from lmd4ml.stats import PyTree


@dataclasses.dataclass(frozen=True)
class NormTest(Quantity):
    """Norm test 1/(B(B−1)) · (Σᵢ‖∇ℓᵢ‖² / ‖g‖² − B), the square of Cockpit's norm-test θ.

    Large values mean the mean gradient is small against the spread of per-sample gradients
    (noise dominates: a larger batch would help); near 0 means samples agree. Needs B ≥ 2.
    """

    key = "norm_test"
    per_sample = (stats.SQ_NORMS,)

    def check(self, batch_size: int) -> None:
        if batch_size < 2:
            raise ValueError(
                f"NormTest needs at least 2 samples per batch (it is a sample variance); "
                f"got batch size {batch_size}"
            )

    def compute(self, ctx: StepContext, state: PyTree) -> tuple[jax.Array, PyTree]:
        b = ctx.batch_size
        ratio = ctx.sq_norms.sum() / ctx.grad_sq_norm
        return (ratio - b) / (b * (b - 1)), state
