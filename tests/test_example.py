"""The README's main job, examples/train_digits.py, for one epoch: it trains and keeps its run."""

import subprocess
import sys
from pathlib import Path

import numpy as np

import lmd4ml as lm

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_digits.py"


def test_train_digits_runs_and_keeps_every_instrument(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "run kept in" in out.stdout
    [info] = lm.list_runs(tmp_path)
    run = lm.load_run(info["path"])
    assert info["n_steps"] == 22  # 1437 training images in batches of 64
    for key in ("loss", "alpha", "norm_test", "noise_scale", "grad_hist_1d"):
        steps, values = run[key]
        assert len(steps) == 22 and np.all(np.isfinite(values)), key
    for key in ("hess_trace", "tic_trace", "hess_max_ev", "grad_hist_2d"):
        steps, _ = run[key]
        np.testing.assert_array_equal(steps, np.arange(0, 22, 4), err_msg=key)
