"""Start the dashboard in a process of its own, beside a training run.

The server is a separate process (``python -m lmd4ml.dashboard``) in a session of its own:
if it fails or is killed, training goes on; Ctrl-C in the terminal stops training but not
the page; and when training ends or dies, the server keeps showing the run. It exits by
itself once the process that started it has exited and no page has polled it for
``linger`` seconds (5 minutes by default).

Bound beyond loopback, it asks for a token (:mod:`lmd4ml.dashboard.auth`): one is made up
here and handed over in the server's environment, which, unlike its command line, other
users of the machine cannot read; the returned URL carries it.

The server imports the lmd4ml this process runs: its directory goes first on the server's
``PYTHONPATH``, so that a checkout used without installing starts its own dashboard, not
another installed copy (or none).
"""

from __future__ import annotations

import importlib.util
import os
import site
import socket
import subprocess
import sys
from pathlib import Path

import lmd4ml
from lmd4ml.dashboard.auth import TOKEN_ENV, new_token
from lmd4ml.dashboard.cli import is_loopback, url

# Servers this process started, by (runs directory, port): a second lm.train call reuses one.
_started: dict[tuple[str, int], tuple[str, subprocess.Popen]] = {}


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def python_path(root: Path, current: str | None) -> str | None:
    """The server's ``PYTHONPATH``: ``root``, the directory this lmd4ml is imported from,
    ahead of ``current``; ``current`` alone if ``root`` is a site-packages directory, which
    the server searches anyway (ahead of the standard library, its packages could shadow it).

    Example:
      >>> python_path(Path("/src/lmd4ml-checkout"), None)
      '/src/lmd4ml-checkout'
    """
    if str(root) in [*site.getsitepackages(), site.getusersitepackages()]:
        return current
    return os.pathsep.join([str(root), *([current] if current else [])])


def open_dashboard(
    runs_dir: str | os.PathLike,
    port: int = 8050,
    host: str = "127.0.0.1",
    linger: float = 300.0,
    token: str | None = None,
) -> tuple[str, subprocess.Popen]:
    """Serve the dashboard of ``runs_dir`` from a new process; return its URL and process.

    ``token``: the one clients must give, in the URL returned; by default a new one when
    ``host`` is beyond loopback, and none on it. A busy ``port`` is replaced by a free one.
    Raises ``ImportError`` if Dash is missing.
    """
    if importlib.util.find_spec("dash") is None or importlib.util.find_spec("plotly") is None:
        raise ImportError('the dashboard needs Dash and plotly: pip install "lmd4ml[dashboard]"')
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    key = (str(runs_dir.resolve()), port)
    if key in _started and _started[key][1].poll() is None:
        return _started[key]
    if not _port_free(host, port):
        port = _free_port(host)
    if token is None and not is_loopback(host):
        token = new_token()
    command = [
        sys.executable, "-m", "lmd4ml.dashboard", str(runs_dir), "--port", str(port),
        "--host", host, "--owner", str(os.getpid()), "--linger", str(linger),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    path = python_path(Path(lmd4ml.__file__).parents[1], env.get("PYTHONPATH"))
    if path is not None:
        env["PYTHONPATH"] = path
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        env=env,
    )  # fmt: skip
    _started[key] = (url(host, port, token), proc)
    return _started[key]
