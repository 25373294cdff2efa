"""Knobs are arguments: the ε of MeanGSNR and EarlyStopping and Alpha's variance floor are
fields with Cockpit's values as defaults, checked at construction, and used."""

from __future__ import annotations

import models
import numpy as np
import optax
import pytest
import reference

import lmd4ml as lm


def test_eps_is_an_argument_with_cockpits_default(regression_case: models.Case) -> None:
    loss_fn, params = regression_case.loss_fn, regression_case.params
    batch = regression_case.batches[0]
    quantities = [
        lm.MeanGSNR(),
        lm.MeanGSNR(eps=0.5, name="gsnr_half"),
        lm.EarlyStopping(eps=0.5),
    ]
    step = lm.instrument(loss_fn, optax.sgd(0.1), quantities)
    _, metrics = step(step.init(params), batch)
    grads = reference.per_sample_grads(loss_fn, params, batch).grads
    b, g = grads.shape[0], reference.mean_grad(grads)
    second_moment = np.mean(grads**2, axis=0)
    variance = np.var(grads, axis=0, ddof=1)
    np.testing.assert_allclose(metrics["mean_gsnr"], reference.mean_gsnr(grads), rtol=1e-10)
    want = np.mean(g**2 / (second_moment - g**2 + 0.5))
    np.testing.assert_allclose(metrics["gsnr_half"], want, rtol=1e-10)
    want = 1 - b * np.mean(g**2 / (variance + 0.5))
    np.testing.assert_allclose(metrics["early_stopping"], want, rtol=1e-10)


def test_defaults_and_bad_values() -> None:
    assert (lm.MeanGSNR().eps, lm.EarlyStopping().eps, lm.Alpha().var_floor) == (1e-5, 1e-5, 1e-10)
    for make in (lm.MeanGSNR, lm.EarlyStopping):
        for bad in (-1e-3, True, "1e-5"):
            with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
                make(eps=bad)
    for bad in (0.0, -1.0, None):
        with pytest.raises(ValueError, match=r"var_floor must be a number >= 1\.175e-38"):
            lm.Alpha(var_floor=bad)
