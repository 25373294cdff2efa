"""Cockpit's three instrument panels, as lists of quantities to pass to ``lm.instrument``.

The membership is Cockpit's (``cockpit.utils.configuration``): ``economy`` has the cheap
first-order instruments, ``business`` adds the Hessian trace and TIC, ``full`` adds the top
Hessian eigenvalue and the 2-D gradient histogram. Give expensive ones a schedule of their
own with ``lm.train(..., schedules={"hess_max_ev": 16})``.

Example:
  >>> import lmd4ml as lm
  >>> [q.key for q in lm.presets.economy()][:5]
  ['loss', 'grad_norm', 'distance', 'update_size', 'norm_test']
  >>> [q.key for q in lm.presets.full()][-4:]
  ['tic_diag', 'hess_trace', 'hess_max_ev', 'grad_hist_2d']
"""

from __future__ import annotations

from lmd4ml.quantities import (
    Alpha,
    Distance,
    GradHist1d,
    GradHist2d,
    GradNorm,
    HessMaxEV,
    HessTrace,
    InnerTest,
    Loss,
    NormTest,
    OrthoTest,
    Quantity,
    TICDiag,
    UpdateSize,
)


def economy() -> list[Quantity]:
    """Loss, step size and the first-order gradient instruments (no curvature)."""
    return [
        Loss(),
        GradNorm(),
        Distance(),
        UpdateSize(),
        NormTest(),
        InnerTest(),
        OrthoTest(),
        GradHist1d(),
        Alpha(),
    ]


def business() -> list[Quantity]:
    """``economy`` plus the Hessian trace and the TIC from the Hessian diagonal."""
    return [*economy(), TICDiag(), HessTrace()]


def full() -> list[Quantity]:
    """``business`` plus the top Hessian eigenvalue and the 2-D gradient histogram."""
    return [*business(), HessMaxEV(), GradHist2d()]
