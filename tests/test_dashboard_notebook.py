"""notebooks/quickstart.ipynb runs top to bottom (one epoch) and its dashboard serves the run."""

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

import lmd4ml as lm

nbclient = pytest.importorskip("nbclient")
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_trains_with_the_dashboard(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f"EPOCHS = 1\nPORT = {port}"
    server = None
    try:
        nbclient.NotebookClient(
            notebook, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        text = "\n".join(
            out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
        )
        server = int(re.search(r"server pid (\d+)", text)[1])
        assert "finished 28 steps" in text
        (run,) = lm.list_runs(tmp_path / "runs")
        assert run["status"] == "finished"
        for _ in range(100):  # the server may still be starting
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert b"lmd4ml" in page.read()
                    break
            except urllib.error.URLError:
                time.sleep(0.2)
        else:
            raise AssertionError("the notebook's dashboard never answered")
    finally:
        if server is not None:
            os.kill(server, signal.SIGKILL)
