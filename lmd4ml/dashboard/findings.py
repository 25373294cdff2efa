"""A run's findings (:mod:`lmd4ml.diagnosis`) for the page: read back from what its store
holds, checked, with the links to their instruments' docs pages.

A run's store keeps the findings its live diagnosis made (``run.metadata["findings"]``,
noted by the writer thread as they change while it trains). They come from a file, so
nothing in them is trusted: :func:`checked` keeps only entries whose code and severity are
known ones and whose steps are whole numbers in order, shortens their messages, and
rebuilds each as a :class:`~lmd4ml.diagnosis.Finding`; the docs link is made from the
checked code (:attr:`~lmd4ml.diagnosis.Finding.docs`), never from the stored one. Text goes
into Dash components, which escape it.

Example:
  >>> stored = [{"code": "stalled", "severity": "error", "first_step": 0, "last_step": 59,
  ...            "message": "not moving", "docs": "javascript:alert(1)"},
  ...           {"code": "<b>", "severity": "error", "first_step": 0, "last_step": 1,
  ...            "message": "?"}]
  >>> [(f.code, f.first_step, f.last_step, f.docs) for f in checked(stored)]
  [('stalled', 0, 59, 'instruments/update_size.md')]
  >>> page_url(checked(stored)[0], "http://127.0.0.1:8000/")
  'http://127.0.0.1:8000/instruments/update_size/'
"""

from __future__ import annotations

import urllib.parse

from lmd4ml.diagnosis import RULES, SEVERITIES, Finding

# Where the docs site is when nothing else is said: what ``mkdocs serve`` serves.
DOCS_URL = "http://127.0.0.1:8000/"
MAX_FINDINGS = 20  # per run: the rules make at most one or two per code
MAX_MESSAGE = 600  # characters of a message shown; the rules' are one or two sentences
SEVERITY_COLORS = {"info": "#17becf", "warning": "#ff7f0e", "error": "#d62728"}


def _step(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def checked(stored: object) -> list[Finding]:
    """The findings in ``stored`` (what a run's metadata holds under "findings": anything)
    that are well formed, at most ``MAX_FINDINGS``, as :class:`Finding` s without evidence."""
    if not isinstance(stored, list):
        return []
    findings = []
    for entry in stored[:MAX_FINDINGS]:
        if not isinstance(entry, dict):
            continue
        code, severity, message = entry.get("code"), entry.get("severity"), entry.get("message")
        first, last = _step(entry.get("first_step")), _step(entry.get("last_step"))
        if (
            code in RULES
            and severity in SEVERITIES
            and isinstance(message, str)
            and first is not None
            and last is not None
            and first <= last
        ):
            text = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
            findings.append(Finding(code, severity, first, last, text))
    return findings


def docs_url(url: object) -> str:
    """``url`` as the base of the docs links: an http(s) URL, ending in a slash.

    Example:
      >>> docs_url("https://example.org/lmd4ml")
      'https://example.org/lmd4ml/'
      >>> docs_url("javascript:alert(1)")
      Traceback (most recent call last):
      ...
      ValueError: docs_url must be an http(s) URL such as ..., got 'javascript:alert(1)'
    """
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"docs_url must be an http(s) URL such as {DOCS_URL}, got {url!r}")
    return url if url.endswith("/") else url + "/"


def page_url(finding: Finding, base: str) -> str:
    """The docs site's page of the instrument ``finding`` is read from: MkDocs serves
    ``docs/instruments/alpha.md`` at ``instruments/alpha/`` under ``base``."""
    return urllib.parse.urljoin(base, finding.docs.removesuffix(".md") + "/")


def steps_text(finding: Finding) -> str:
    if finding.first_step == finding.last_step:
        return f"step {finding.first_step}"
    return f"steps {finding.first_step}–{finding.last_step}"
