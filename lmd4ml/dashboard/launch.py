"""Start the dashboard in a process of its own, beside a training run.

The server is a separate process (``python -m lmd4ml.dashboard``) in a session of its own:
if it fails or is killed, training goes on; Ctrl-C in the terminal stops training but not
the page; and when training ends or dies, the server keeps showing the run. It exits by
itself once the process that started it has exited and no page has polled it for
``linger`` seconds (5 minutes by default).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def open_dashboard(
    runs_dir: str | os.PathLike,
    port: int = 8050,
    host: str = "127.0.0.1",
    linger: float = 300.0,
) -> tuple[str, subprocess.Popen]:
    """Serve the dashboard of ``runs_dir`` from a new process; return its URL and process.

    A busy ``port`` is replaced by a free one. Raises ``ImportError`` if Dash is missing.
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
    command = [
        sys.executable, "-m", "lmd4ml.dashboard", str(runs_dir), "--port", str(port),
        "--host", host, "--owner", str(os.getpid()), "--linger", str(linger),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    _started[key] = (f"http://{host}:{port}/", proc)
    return _started[key]
