"""The documentation site: ``mkdocs build --strict`` of the docs as they are, and of a copy
with a new public module and name (they get their pages without editing the docs), a broken
link and a docstring cross-reference to nothing (each fails the build)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# What a copy of the repository for the docs build leaves out: caches, build outputs, runs.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "site", "runs", "test-artifacts", ".venv",
    ".*cache",
)  # fmt: skip


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``root``'s mkdocs.yml into ``site``."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
         "-d", str(site)],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip


def exports(init: Path) -> list[str]:
    """A module's ``__all__``, read from its source."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{init} has no __all__")


def text(html: str) -> str:
    """The visible text of a page, one space between words."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_site_builds_strict_with_every_public_name_and_the_readme(tmp_path):
    site = tmp_path / "site"
    out = build(ROOT, site)
    assert out.returncode == 0, out.stderr

    api = (site / "api" / "lmd4ml" / "index.html").read_text()
    for name in exports(ROOT / "lmd4ml" / "__init__.py"):
        assert f"lmd4ml.{name}" in api, name
    # Docstring examples render as code, not as quotes (Markdown's reading of ">>>").
    assert "<blockquote>" not in api
    assert "&gt;&gt;&gt;" in api
    for module in ("presets", "schedules", "stats", "telemetry.store", "telemetry.export"):
        page = site / "api" / f"lmd4ml.{module}" / "index.html"
        assert f"lmd4ml.{module}" in page.read_text(), module
    stats = (site / "api" / "lmd4ml.stats" / "index.html").read_text()
    # lm.stats.histogram is the function, not the submodule griffe sees under that name.
    assert 'id="lmd4ml.stats.histogram.histogram"' in stats
    assert ":mod:`" not in stats and "<code>per_sample</code>" in stats  # roles as code

    readme = (ROOT / "README.md").read_text()
    home = text((site / "index.html").read_text())
    benchmarks = text((site / "benchmarks" / "index.html").read_text())
    first = next(line for line in readme.splitlines() if line.startswith("**"))
    assert first.strip("*") in home
    assert "python benchmarks/overhead.py --markdown" in benchmarks
    assert "python benchmarks/overhead.py --markdown" not in home  # one copy: on its page
    for page in ("instruments/alpha", "your-model", "existing-loops", "scale-out",
                 "writing-quantities", "dashboard", "design"):  # fmt: skip
        assert (site / page / "index.html").is_file(), page


def test_new_module_and_name_get_pages_and_broken_references_fail(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(ROOT, root, ignore=NOT_SOURCES)
    package = root / "lmd4ml"
    (package / "probe.py").write_text(
        '"""A module added after the docs were written."""\n\n\n'
        'def probe() -> int:\n    """Return 7, a new public function."""\n    return 7\n'
    )
    (package / "telemetry" / "probe_sink.py").write_text(
        '"""A telemetry module added after the docs were written."""\n\n\n'
        "def drain() -> None:\n"
        '    """Points to [nothing][lmd4ml.not_there], which cannot be rendered."""\n'
    )
    init = (package / "__init__.py").read_text()
    init = init.replace(
        "__all__ = [\n", 'from lmd4ml.probe import probe\n\n__all__ = [\n    "probe",\n'
    )
    (package / "__init__.py").write_text(init)
    design = root / "docs" / "design.md"
    design.write_text(design.read_text() + "\nSee [a page that is gone](gone.md).\n")

    out = build(root, tmp_path / "site")
    assert out.returncode != 0
    assert "'gone.md'" in out.stderr
    assert "lmd4ml.not_there" in out.stderr

    api = tmp_path / "site" / "api"
    assert "Return 7, a new public function." in (api / "lmd4ml" / "index.html").read_text()
    sink = (api / "lmd4ml.telemetry.probe_sink" / "index.html").read_text()
    assert "A telemetry module added after the docs were written." in sink
    assert 'href="lmd4ml.telemetry.probe_sink/"' in (api / "index.html").read_text()
