"""Data parallelism: tests/multidevice on 4 CPU devices, in a subprocess of its own.

JAX fixes its device count when it starts, so the multi-device tests run in a fresh Python
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_quantities_on_four_devices_match_one() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    # Two workers: the tests compile one program after another, and each can have a core.
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        "multidevice",
    ]
    done = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
