"""notebooks/quickstart.ipynb runs top to bottom (one epoch), its dashboard serves the run,
and its outputs have the structure of the ones stored with it (cells, output types, the
static figures' traces), whatever the numbers."""

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
PLOTLY = "application/vnd.plotly.v1+json"


def structure(notebook) -> list[tuple]:
    """Each cell's type and, for code, its outputs: the kinds of output it made (a stream by
    its name, the rest by their MIME types; how a stream was cut into pieces depends on
    timing) and the number of traces of each plotly figure, in order."""
    cells = []
    for cell in notebook.cells:
        kinds, figures = set(), []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            kinds.add((out["output_type"], out.get("name", ""), tuple(sorted(data))))
            if PLOTLY in data:
                figures.append(len(data[PLOTLY]["data"]))
        cells.append((cell.cell_type, sorted(kinds), figures))
    return cells


def test_quickstart_notebook_trains_plots_and_serves_the_run(tmp_path):
    stored = nbformat.read(NOTEBOOK, as_version=4)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f"EPOCHS = 1\nPORT = {port}"
    here = {**os.environ, "PYTHONPATH": str(Path(lm.__file__).parents[1])}  # this lmd4ml
    server = None
    try:
        nbclient.NotebookClient(
            notebook, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
        ).execute(env=here)
        text = "\n".join(
            out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
        )
        server = int(re.search(r"server pid (\d+)", text)[1])
        assert "finished 28 steps" in text
        assert structure(notebook) == structure(stored)
        figures = [o["data"][PLOTLY] for c in notebook.cells for o in c.get("outputs", [])
                   if PLOTLY in o.get("data", {})]  # fmt: skip
        assert len(figures) == 2 and all(len(f["data"]) >= 10 for f in figures)
        (iframe,) = [o for o in notebook.cells[-1].outputs if "text/html" in o.get("data", {})]
        assert f'src="http://127.0.0.1:{port}/"' in iframe["data"]["text/html"]
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


def test_the_stored_notebook_keeps_its_outputs_and_no_temporary_paths():
    stored = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code[1:]), "run it and store it with its outputs"
    assert "/tmp/" not in NOTEBOOK.read_text()
