"""The built wheel: it holds every file of the package, installs in a fresh virtual
environment without downloading anything, and runs the README's main job from there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lmd4ml as lm

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "train_digits.py"
# What the build reads: the project's metadata, its readme and the package. Built from a copy
# so that setuptools' build/ and egg-info never land in the tree, and a stale build/lib of
# an earlier build cannot slip files into the wheel.
BUILD_INPUTS = ("pyproject.toml", "README.md", "lmd4ml")
CACHES = shutil.ignore_patterns("__pycache__", "*.pyc")


def run(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
    """A command that must succeed; its output is in the error if it does not."""
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_wheel_installs_in_a_fresh_venv_and_runs_the_example(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=CACHES)
        else:
            shutil.copy2(ROOT / name, source / name)
    # Nothing from outside: no PYTHONPATH (it would point at the source tree), no index.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_NO_INDEX": "1"}
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
        "-q", "-w", tmp_path / "dist", env=env, timeout=120)  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("lmd4ml-*.whl")

    package = {  # every module and data file, as the wheel should hold them
        path.relative_to(source).as_posix()
        for path in (source / "lmd4ml").rglob("*")
        if path.is_file()
    }
    held = set(zipfile.ZipFile(wheel).namelist())
    assert package <= held, f"missing from the wheel: {sorted(package - held)}"
    [entry_points] = [n for n in held if n.endswith(".dist-info/entry_points.txt")]
    assert "lmd4ml = " in zipfile.ZipFile(wheel).read(entry_points).decode()

    # A fresh environment that sees this machine's jax, flax, ... but not the source tree
    # (the editable install of lmd4ml there is shadowed by the wheel's).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, timeout=60)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel,
        env=env, timeout=120)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runs = elsewhere / "runs"
    main = (
        "import runpy, sys, lmd4ml\n"
        "print('lmd4ml from', lmd4ml.__file__)\n"
        f"sys.argv = ['train_digits.py', '--epochs', '1', '--batch-size', '512',"
        f" '--runs-dir', {str(runs)!r}]\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    out = run(python, "-c", main, cwd=elsewhere, env=env, timeout=300).stdout
    where = Path(out.split("lmd4ml from ", 1)[1].splitlines()[0])
    assert where.is_relative_to(venv), where
    assert "run kept in" in out
    [info] = lm.list_runs(runs)
    # 1437 training images in batches of 512, the rest dropped: 2 steps, and the test
    # accuracy after the last update at step 2.
    assert info["n_steps"] == 3
    steps, values = lm.load_run(info["path"])["loss"]
    assert steps.tolist() == [0, 1] and all(0 < v < 10 for v in values)
    # The console script is installed with it (the CLI's own tests run it).
    assert f"#!{python}" in (venv / "bin" / "lmd4ml").read_text()
