"""The ``lmd4ml`` command: list runs, export one, serve the dashboard.

::

    lmd4ml ls RUNS_DIR                 the runs there: name, status, steps, start time, path
    lmd4ml export RUN_DIR --format csv|json|tensorboard [--out PATH] [--force]
    lmd4ml diagnose RUN_DIR [--json]   what the instruments say is wrong (lm.diagnose)
    lmd4ml dashboard RUNS_DIR [...]    the live dashboard (lmd4ml.dashboard.cli)

``ls`` and ``export`` need nothing beyond lmd4ml itself (``--format tensorboard`` needs the
``tensorboard`` extra); ``dashboard`` is handed over whole to the dashboard's own command
line, which behaves as it always has and needs the ``dashboard`` extra. Exit status: 0 done,
1 the command could not do it (a run that cannot be read, an output already there, a missing
extra), 2 a usage error (argparse's message: a missing directory, a bad format).
``diagnose`` exits 1 also when any finding is an error, so that a CI job or a sweep can gate
on training health.

Example:
  >>> main(["ls", "/no/such/dir"])
  Traceback (most recent call last):
  ...
  SystemExit: 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmd4ml.telemetry.store import RunStoreError, list_runs, load_run

FORMATS = ("csv", "json", "tensorboard")


def printable(text: object) -> str:
    """``text`` with every character a terminal would act on (escapes, newlines) written as
    Python writes it in a string: run names come from directory names, which anyone may
    choose.

    Example:
      >>> printable("run\\x1b[2J\\n1"), printable("näive")
      ('run\\\\x1b[2J\\\\n1', 'näive')
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart, the last column unpadded.

    Example:
      >>> print(table([["NAME", "STEPS"], ["a", "10"], ["long-name", "3"]]))
      NAME       STEPS
      a          10
      long-name  3
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def _started(entry: dict) -> str:
    start = entry.get("start_time")
    if not isinstance(start, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))


def list_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``lmd4ml ls``: the table on stdout, oldest run first; why a damaged run cannot be
    read on stderr."""
    if not _is_dir(args.runs_dir):
        parser.error(f"RUNS_DIR {args.runs_dir!r} is not a directory")
    entries = list_runs(args.runs_dir)
    if not entries:
        print(f"no runs in {printable(args.runs_dir)}", file=sys.stderr)
        return 0
    rows = [["NAME", "STATUS", "STEPS", "STARTED", "PATH"]]
    rows += [
        [printable(e["name"]), printable(e["status"]), str(e["n_steps"]), _started(e),
         printable(e["path"])]
        for e in entries
    ]  # fmt: skip
    print(table(rows))
    for entry in entries:
        if entry["status"] == "damaged":
            print(f"{printable(entry['name'])}: {printable(entry['error'])}", file=sys.stderr)
    return 0


def _default_out(name: str, format: str) -> Path:
    """Where ``export`` writes without ``--out``: ``./<run>.csv`` or ``.json``, or the logdir
    ``./tensorboard`` (which the run's events go into a directory of their own in)."""
    return Path("tensorboard") if format == "tensorboard" else Path(f"{name}.{format}")


def export_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``lmd4ml export``: write the run, say where on stdout."""
    from lmd4ml.telemetry.export import to_csv, to_json, to_tensorboard

    if not _is_dir(args.run_dir):
        parser.error(f"RUN_DIR {args.run_dir!r} is not a directory")
    if args.force and args.format == "tensorboard":
        parser.error("--force: TensorBoard event files are never overwritten; choose another --out")
    try:
        run = load_run(args.run_dir)
    except RunStoreError as error:
        return _fail(f"lmd4ml export: {printable(error)}")
    out = Path(args.out) if args.out is not None else _default_out(run.path.name, args.format)
    try:
        if args.format == "tensorboard":
            where = to_tensorboard(run, out)
        else:
            if out.exists() and not args.force:
                return _fail(f"lmd4ml export: {printable(out)} exists (--force overwrites it)")
            writer: Callable = to_csv if args.format == "csv" else to_json
            writer(run, out)
            where = out
    except (OSError, ImportError, ValueError) as error:
        return _fail(f"lmd4ml export: {printable(error)}")
    print(f"{printable(run.path)} as {args.format}: {printable(where)}")
    return 0


def diagnose_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``lmd4ml diagnose``: the findings, one a line (or ``--json``), the rules skipped;
    status 1 when a finding is an error or the run cannot be read."""
    from lmd4ml.diagnosis import diagnose, format_finding

    if not _is_dir(args.run_dir):
        parser.error(f"RUN_DIR {args.run_dir!r} is not a directory")
    try:
        findings = diagnose(args.run_dir)
    except (RunStoreError, ValueError) as error:
        return _fail(f"lmd4ml diagnose: {printable(error)}")
    if args.json:
        report = {
            "run": str(args.run_dir),
            "findings": [f.as_dict() for f in findings],
            "skipped": findings.skipped,
        }
        print(json.dumps(report, indent=2))
    else:
        for finding in findings:
            print(printable(format_finding(finding)))
        if not findings:
            print(f"{printable(args.run_dir)}: no findings")
        for code, why in findings.skipped.items():
            print(f"skipped {code}: {printable(why)}", file=sys.stderr)
    return 1 if findings.worst == "error" else 0


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmd4ml", description="lmd4ml's command line: list, export and watch runs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser(
        "ls",
        help="list the runs in a directory",
        description="List the runs in RUNS_DIR, oldest first: name, status, tracked steps, "
        "start time (local) and path; damaged runs say why on stderr.",
    )
    ls.add_argument("runs_dir", metavar="RUNS_DIR", help="a directory of lm.train runs")
    ls.set_defaults(run=list_command, parser=ls)
    export = commands.add_parser(
        "export",
        help="write a run as CSV, JSON or TensorBoard event files",
        description="Write the run in RUN_DIR as long CSV (step,key,value), JSON, or "
        "TensorBoard event files (in OUT/<run name>/).",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="one run's directory")
    export.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    export.add_argument(
        "--out",
        help="the file to write (default ./<run name>.csv or .json), or for tensorboard the "
        "logdir (default ./tensorboard)",
    )
    export.add_argument("--force", action="store_true", help="overwrite a CSV or JSON file")
    export.set_defaults(run=export_command, parser=export)
    diagnosis = commands.add_parser(
        "diagnose",
        help="say what the instruments of a run show is wrong; status 1 on an error",
        description="Apply lm.diagnose's rules to the run in RUN_DIR: each finding's "
        "severity, code, steps and message (with the evidence and what to try), and the "
        "rules skipped on stderr. Exit status 1 when any finding is an error.",
    )
    diagnosis.add_argument("run_dir", metavar="RUN_DIR", help="one run's directory")
    diagnosis.add_argument(
        "--json", action="store_true", help="print findings and skipped rules as JSON"
    )
    diagnosis.set_defaults(run=diagnose_command, parser=diagnosis)
    # Parsed by the dashboard's own command line, which main hands it to: listed for --help.
    commands.add_parser(
        "dashboard",
        help="serve the live dashboard of a runs directory (lmd4ml dashboard --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lmd4ml`` console script; exits with the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dashboard"]:
        from lmd4ml.dashboard.cli import main as dashboard

        dashboard(argv)
        return
    args = _parser().parse_args(argv)
    sys.exit(args.run(args, args.parser))
