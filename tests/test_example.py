"""The README's main job, examples/train_digits.py, for one epoch: it trains and keeps its run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from test_telemetry import child_env

import lmd4ml as lm

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_digits.py"


def test_train_digits_runs_and_keeps_every_instrument(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True, env=child_env(),
    )  # fmt: skip
    assert "run kept in" in out.stdout
    [info] = lm.list_runs(tmp_path)
    run = lm.load_run(info["path"])
    # 1437 training images in batches of 64: 22 steps, and the test accuracy after the last
    assert info["n_steps"] == 23
    for key in ("loss", "alpha", "norm_test", "noise_scale", "grad_hist_1d", "hyper/learning_rate"):
        steps, values = run[key]
        assert len(steps) == 22 and np.all(np.isfinite(values)), key
    steps, accuracy = run["test_acc"]
    assert steps.tolist() == [0, 22] and 0 < accuracy[0] < 0.5 < accuracy[1] <= 1, accuracy
    assert run.metadata["config"]["batch_size"] == 64
    for key in ("hess_trace", "tic_trace", "hess_max_ev", "grad_hist_2d"):
        steps, _ = run[key]
        np.testing.assert_array_equal(steps, np.arange(0, 22, 4), err_msg=key)
