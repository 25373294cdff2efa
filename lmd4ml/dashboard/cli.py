"""``lmd4ml dashboard RUNS_DIR [--port 8050] [--host 127.0.0.1]``, which the ``lmd4ml``
command (:mod:`lmd4ml.cli`) hands over whole.

Served by waitress, bound to loopback unless ``--host`` says otherwise. Bound beyond it, the
server asks every client for a token (:mod:`lmd4ml.dashboard.auth`), made up unless
``--token`` (or ``$LMD4ML_DASHBOARD_TOKEN``) gives one, and printed in the URL it announces;
``--no-token`` serves anyone who can reach it, with a warning. ``--token`` on loopback asks
for it there too. On loopback, requests must also be addressed to it there (their ``Host``:
no DNS rebinding). Bound to every address (``--host 0.0.0.0``), the URL it announces names
this machine by its host name.

``--owner PID`` (what ``lm.train(dashboard=True)`` passes) makes the server stop by itself
once that process has exited and no page has polled for ``--linger`` seconds: it outlives
the training run, so that an open page keeps showing the finished (or killed) run, but
does not outlive everyone's interest in it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from lmd4ml.dashboard.auth import QUERY, TOKEN_ENV, is_loopback, new_token, token_problem
from lmd4ml.dashboard.data import process_alive
from lmd4ml.dashboard.findings import DOCS_URL, docs_url

# A DNS name: dot-separated labels of letters, digits and inner hyphens (RFC 1123).
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def port_number(text: str) -> int:
    """``--port``: 0 to 65535 (0: any free port, which the announced URL names)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: expected 0 to 65535")
    return port


def host_name(text: str) -> str:
    """``--host``: an IP address or a host name."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        if len(text) <= 253 and _HOSTNAME.fullmatch(text):
            return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a host: expected an IP address (127.0.0.1, 0.0.0.0, ::1) or a name"
    )


def token_text(text: str) -> str:
    """``--token``: see :func:`lmd4ml.dashboard.auth.token_problem`."""
    if problem := token_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def process_id(text: str) -> int:
    """``--owner``: a process id, above 0 (``os.kill`` reads 0 and below as groups)."""
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return pid


def docs_base(text: str) -> str:
    """``--docs``: see :func:`lmd4ml.dashboard.findings.docs_url`."""
    try:
        return docs_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def seconds(text: str) -> float:
    """``--linger``: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def url(host: str, port: int, token: str | None) -> str:
    """The address to open, with the token when there is one. A server bound to every
    address (0.0.0.0, ::) is named by this machine's host name, which another machine can
    open, as 0.0.0.0 is no address to open.

    Example:
      >>> url("::1", 8050, None), url("127.0.0.1", 80, "abc")
      ('http://[::1]:8050/', 'http://127.0.0.1:80/?token=abc')
    """
    with contextlib.suppress(ValueError):  # a host name: as it is
        if ipaddress.ip_address(host).is_unspecified:
            host = socket.gethostname()
    netloc = f"[{host}]" if ":" in host else host
    query = f"?{urllib.parse.urlencode({QUERY: token})}" if token else ""
    return f"http://{netloc}:{port}/{query}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmd4ml", description="lmd4ml's command line.")
    commands = parser.add_subparsers(dest="command", required=True)
    dash = commands.add_parser(
        "dashboard",
        help="serve the live dashboard of a runs directory",
        description="Serve the dashboard of RUNS_DIR: the newest run, live while it trains.",
    )
    dash.add_argument("runs_dir", metavar="RUNS_DIR", help="a directory of lm.train runs")
    dash.add_argument("--port", type=port_number, default=8050, help="0 to 65535 (default 8050)")
    dash.add_argument(
        "--host",
        type=host_name,
        default="127.0.0.1",
        help="127.0.0.1 (default) serves this machine only; 0.0.0.0 serves others, and then "
        "asks each client for a token",
    )
    access = dash.add_mutually_exclusive_group()
    access.add_argument(
        "--token",
        type=token_text,
        help=f"the token clients must give (default: ${TOKEN_ENV}, or else a random one "
        "beyond loopback and none on it)",
    )
    access.add_argument(
        "--no-token", action="store_true", help="serve anyone who can reach the server"
    )
    dash.add_argument(
        "--docs",
        type=docs_base,
        default=DOCS_URL,
        help=f"the docs site the findings link to (default {DOCS_URL}: mkdocs serve)",
    )
    dash.add_argument("--owner", type=process_id, help=argparse.SUPPRESS)
    dash.add_argument("--linger", type=seconds, default=300.0, help=argparse.SUPPRESS)
    return parser


def configure(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The checked arguments of ``argv``, with the token to ask for (``None``: none);
    anything wrong exits with argparse's usage and a message (status 2). Starts nothing."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.runs_dir = Path(args.runs_dir)
    try:
        is_dir = args.runs_dir.is_dir()
    except (OSError, ValueError):  # a NUL byte, a name too long
        is_dir = False
    if not is_dir:
        parser.error(
            f"RUNS_DIR {str(args.runs_dir)!r} is not a directory: expected the runs_dir that "
            "lm.train(..., runs_dir=...) writes runs into (default ./runs)"
        )
    if args.no_token:
        args.token = None
    elif args.token is None and (given := os.environ.get(TOKEN_ENV)):
        if problem := token_problem(given):
            parser.error(f"${TOKEN_ENV}: {problem}")
        args.token = given
    elif args.token is None and not is_loopback(args.host):
        args.token = new_token()
    return args


def _stop_when_unwatched(owner: int, linger: float, last_seen: list[float]) -> None:
    """Exit the process once ``owner`` is gone and no page polled for ``linger`` seconds."""
    while True:
        time.sleep(min(2.0, linger))
        if not process_alive(owner) and time.monotonic() - last_seen[0] > linger:
            # From this thread, as the server's loop runs in the main one; nothing is left
            # to flush (the server only reads runs).
            os._exit(0)


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port``; ``OSError`` if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def serve(args: argparse.Namespace) -> None:
    """Serve the dashboard as ``args`` (from :func:`configure`) say, until stopped."""
    try:
        from waitress import create_server

        from lmd4ml.dashboard.app import create_app
    except ImportError as error:
        sys.exit(f'lmd4ml dashboard needs Dash and waitress: pip install "lmd4ml[dashboard]" '
                 f"({error})")  # fmt: skip
    app = create_app(args.runs_dir, args.token, args.host, args.docs)
    if args.owner is not None:
        last_seen = [time.monotonic()]
        app.server.before_request(lambda: last_seen.__setitem__(0, time.monotonic()))
        threading.Thread(
            target=_stop_when_unwatched, args=(args.owner, args.linger, last_seen), daemon=True
        ).start()
    try:
        sock = _listen(args.host, args.port)
    except OSError as error:
        sys.exit(f"lmd4ml dashboard: cannot listen on {args.host} port {args.port}: {error}")
    # Said though it is waitress's default: a failing request gets a bare 500, no traceback.
    server = create_server(app.server, sockets=[sock], expose_tracebacks=False)
    port = sock.getsockname()[1]
    print(f"lmd4ml dashboard of {args.runs_dir}: {url(args.host, port, args.token)}", flush=True)
    if args.token is None and not is_loopback(args.host):
        print(
            f"lmd4ml dashboard: WARNING: --no-token: anyone who can reach {args.host} port "
            f"{port} can read the runs in {args.runs_dir}",
            file=sys.stderr,
            flush=True,
        )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop without a traceback
        server.run()


def main(argv: Sequence[str] | None = None) -> None:
    """``lmd4ml dashboard``: ``argv`` starts with "dashboard"."""
    serve(configure(argv))
