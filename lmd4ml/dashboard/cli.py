"""The ``lmd4ml`` command: ``lmd4ml dashboard RUNS_DIR [--port 8050] [--host 127.0.0.1]``.

``--owner PID`` (what ``lm.train(dashboard=True)`` passes) makes the server stop by itself
once that process has exited and no page has polled for ``--linger`` seconds: it outlives
the training run, so that an open page keeps showing the finished (or killed) run, but
does not outlive everyone's interest in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lmd4ml.dashboard.data import process_alive


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmd4ml", description="lmd4ml's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    dash = commands.add_parser(
        "dashboard",
        help="serve the live dashboard of a runs directory",
        description="Serve the dashboard of RUNS_DIR: the newest run, live while it trains.",
    )
    dash.add_argument("runs_dir", metavar="RUNS_DIR", help="a directory of lm.train runs")
    dash.add_argument("--port", type=int, default=8050)
    dash.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    dash.add_argument("--owner", type=int, help=argparse.SUPPRESS)
    dash.add_argument("--linger", type=float, default=300.0, help=argparse.SUPPRESS)
    return parser


def _stop_when_unwatched(owner: int, linger: float, last_seen: list[float]) -> None:
    """Exit the process once ``owner`` is gone and no page polled for ``linger`` seconds."""
    while True:
        time.sleep(min(2.0, linger))
        if not process_alive(owner) and time.monotonic() - last_seen[0] > linger:
            os._exit(0)  # werkzeug's server has no stop from another thread


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lmd4ml`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        parser.error(
            f"RUNS_DIR {str(runs_dir)!r} is not a directory: expected the runs_dir that "
            "lm.train(..., runs_dir=...) writes runs into (default ./runs)"
        )
    try:
        from lmd4ml.dashboard.app import create_app
    except ImportError as error:
        sys.exit(f'lmd4ml dashboard needs Dash: pip install "lmd4ml[dashboard]" ({error})')
    app = create_app(runs_dir)
    # Request logs would fill the terminal of the training they run beside.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if args.owner is not None:
        last_seen = [time.monotonic()]
        app.server.before_request(lambda: last_seen.__setitem__(0, time.monotonic()))
        threading.Thread(
            target=_stop_when_unwatched, args=(args.owner, args.linger, last_seen), daemon=True
        ).start()
    print(f"lmd4ml dashboard of {runs_dir}: http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=args.port, debug=False)
