"""The ``lmd4ml`` command: ls, export, the dashboard handed over; errors and exit statuses;
random command lines (hypothesis, capped and derandomized, like the dashboard's)."""

import contextlib
import csv
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_telemetry import child_env

from lmd4ml import cli
from lmd4ml.dashboard import cli as dashboard_cli
from lmd4ml.telemetry.store import RunWriter, load_run

ROOT = Path(__file__).parents[1]
FIELDS = {"loss": ((), np.float32), "w": ((2,), np.float64)}


def make_run(runs_dir: Path, name: str, n_steps: int) -> Path:
    with RunWriter(runs_dir / name, {"config": {"lr": 0.1}}, FIELDS) as writer:
        for step in range(n_steps):
            writer.append(step, {"loss": 1 / (step + 1), "w": [step, -step]}, wall_time=1e9 + step)
    return runs_dir / name


def run_cli(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``lmd4ml argv``, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(argv))
            code = 0
        except SystemExit as exit:
            code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def runs(tmp_path) -> Path:
    make_run(tmp_path / "runs", "first", 3)
    make_run(tmp_path / "runs", "second\x1b[2J", 5)  # a name a terminal would act on
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "run.sqlite").write_bytes(b"not a database at all" * 10)
    (tmp_path / "runs" / "not-a-run").mkdir()  # no store: not listed
    return tmp_path / "runs"


def test_ls(runs):
    code, out, err = run_cli("ls", str(runs))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "STEPS", "STARTED", "PATH"]
    assert [row.split()[:3] for row in rows] == [
        ["first", "finished", "3"], ["second\\x1b[2J", "finished", "5"], ["broken", "damaged", "0"]
    ]  # fmt: skip
    started = time.localtime(load_run(runs / "first").metadata["start_time"])
    assert rows[0].split()[3:5] == time.strftime("%Y-%m-%d %H:%M:%S", started).split()
    assert rows[0].endswith(str(runs / "first")) and rows[2].split()[3] == "-"
    assert "\x1b" not in out and err.startswith("broken: ") and "not an SQLite database" in err


def test_ls_errors(tmp_path):
    code, out, err = run_cli("ls", str(tmp_path))
    assert (code, out) == (0, "") and err == f"no runs in {tmp_path}\n"
    code, _, err = run_cli("ls", str(tmp_path / "missing"))
    assert code == 2 and "usage: lmd4ml ls" in err and "is not a directory" in err
    code, _, err = run_cli("ls")
    assert code == 2 and "the following arguments are required: RUNS_DIR" in err


def test_export_each_format(runs, tmp_path):
    run = load_run(runs / "first")
    code, out, _ = run_cli("export", str(runs / "first"), "--format", "csv")
    assert code == 0 and out == f"{runs / 'first'} as csv: first.csv\n"
    with open("first.csv", newline="") as f:  # the working directory: the test's own
        rows = list(csv.reader(f))
    assert rows[:4] == [["step", "key", "value"], ["0", "loss", "1.0"], ["0", "w[0]", "0.0"],
                        ["0", "w[1]", "0.0"]]  # fmt: skip
    assert len(rows) == 1 + 3 * 3

    code, _, _ = run_cli("export", str(runs / "first"), "--format", "json", "--out", "r.json")
    document = json.loads(Path("r.json").read_text())
    assert code == 0 and document["times"] == [1e9, 1e9 + 1, 1e9 + 2]
    assert document["fields"]["w"]["values"] == run["w"][1].tolist()

    code, out, _ = run_cli("export", str(runs / "first"), "--format", "tensorboard")
    assert code == 0 and out.endswith(f": {Path('tensorboard') / 'first'}\n")
    (events,) = Path("tensorboard/first").iterdir()
    assert events.name.startswith("events.out.tfevents.")


def test_export_errors(runs):
    first = str(runs / "first")
    assert run_cli("export", first, "--format", "csv")[0] == 0
    code, _, err = run_cli("export", first, "--format", "csv")
    assert code == 1 and err == "lmd4ml export: first.csv exists (--force overwrites it)\n"
    Path("first.csv").write_text("old")
    assert run_cli("export", first, "--format", "csv", "--force")[0] == 0
    assert Path("first.csv").read_text().startswith("step,key,value")

    assert run_cli("export", first, "--format", "tensorboard")[0] == 0
    code, _, err = run_cli("export", first, "--format", "tensorboard")
    assert code == 1 and "already holds TensorBoard event files" in err
    code, _, err = run_cli("export", first, "--format", "tensorboard", "--force")
    assert code == 2 and "never overwritten" in err

    code, _, err = run_cli("export", str(runs / "broken"), "--format", "json")
    assert code == 1 and err.startswith("lmd4ml export: ") and "not an SQLite database" in err
    code, _, err = run_cli("export", str(runs / "not-a-run"), "--format", "json")
    assert code == 1 and "not an lmd4ml run (no run.sqlite in it)" in err
    code, _, err = run_cli("export", str(runs / "missing"), "--format", "json")
    assert code == 2 and "RUN_DIR" in err and "is not a directory" in err
    code, _, err = run_cli("export", first, "--format", "xml")
    assert code == 2 and "invalid choice: 'xml'" in err
    code, _, err = run_cli("export", first, "--format", "json", "--out", "no/such/dir/r.json")
    assert code == 1 and "No such file or directory" in err


def test_help_of_each_command():
    code, out, _ = run_cli("--help")
    assert (
        code == 0
        and out.startswith("usage: lmd4ml")
        and all(command in out for command in ("ls", "export", "dashboard"))
    )
    for command, expected in [("ls", "RUNS_DIR"), ("export", "--format"),
                              ("dashboard", "--no-token")]:  # fmt: skip
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and out.startswith(f"usage: lmd4ml {command}") and expected in out


def test_the_dashboard_is_handed_over_unchanged(runs, monkeypatch):
    served = []
    monkeypatch.setattr(dashboard_cli, "serve", served.append)
    assert run_cli("dashboard", str(runs), "--port", "0")[0] == 0
    (args,) = served
    assert (args.runs_dir, args.port, args.host, args.token) == (runs, 0, "127.0.0.1", None)
    code, _, err = run_cli("dashboard", str(runs / "missing"))
    assert code == 2 and "expected the runs_dir" in err
    assert not served[1:]


def test_the_console_script_and_python_m(runs):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lmd4ml": "lmd4ml.cli:main"}
    # python -m lmd4ml, ls and export without the dashboard's packages (no dashboard extra)
    code = """
import runpy, sys
sys.modules.update(dash=None, plotly=None, waitress=None)
for argv in (["ls", sys.argv[1]], ["export", sys.argv[1] + "/first", "--format", "json"]):
    sys.argv = ["lmd4ml", *argv]
    try:
        runpy.run_module("lmd4ml", run_name="__main__")
    except SystemExit as exit:
        print("exit", exit.code)
print("lmd4ml.dashboard.app" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code, str(runs)], capture_output=True,
                          text=True, env=child_env())  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].split()[0] == "NAME" and lines[1].split()[0] == "first", done.stderr
    assert lines[-4:] == ["exit 0", f"{runs / 'first'} as json: first.json", "exit 0", "False"]


# Random command lines: a clear usage error (2), a clear failure (1) or done (0); never a
# traceback.

TEXT = st.one_of(
    st.sampled_from(["runs", "runs/first", "runs/broken", "file", "missing", "", "..", "-1"]),
    st.text(max_size=8),
)
OPTION = st.one_of(
    st.tuples(st.just("--out"), st.one_of(st.sampled_from(["out.csv", "tb", "runs/first"]), TEXT)),
    st.tuples(st.sampled_from(["--force", "-h", "--", "-x"])),
)
# Mostly command lines of the right shape with odd values, some anything at all.
RUN = st.one_of(st.just("runs/first"), st.sampled_from(["runs/broken", "runs"]), TEXT)
EXPORT = st.tuples(
    RUN, st.one_of(st.sampled_from(cli.FORMATS), TEXT), st.lists(OPTION, max_size=2)
).map(lambda t: ["export", t[0], "--format", t[1], *(word for option in t[2] for word in option)])
LS = st.tuples(TEXT, st.lists(st.sampled_from(["-h", "--", "-x", "runs"]), max_size=1)).map(
    lambda t: ["ls", t[0], *t[1]]
)
ANY = st.lists(st.one_of(TEXT, st.sampled_from(["ls", "export", "--format", "--out"])),
               max_size=5)  # fmt: skip


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(argv=st.one_of(EXPORT, LS, ANY))
def test_any_arguments_end_with_a_clear_status(argv, tmp_path):
    here = Path.cwd()
    if not (here / "runs" / "first").exists():
        make_run(here / "runs", "first", 2)
        (here / "runs" / "broken").mkdir()
        (here / "runs" / "broken" / "run.sqlite").write_text("junk")
        (here / "file").write_text("")
    code, out, err = run_cli(*argv)
    if code == 2:
        assert err.startswith("usage: lmd4ml") and re.search(r"lmd4ml( \w+)?: error: .", err)
    elif code == 1:
        assert re.fullmatch(r"lmd4ml export: .+\n", err) and out == ""
    else:
        assert code == 0 and "Traceback" not in err
