"""The dashboard tried from outside: crafted callbacks, tokens.

Requests go through Flask's test client to ``create_app(...).server``, built as Dash's page
sends them.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from test_dashboard import fake_run

import lmd4ml as lm
from lmd4ml.dashboard import app as dash_app
from lmd4ml.dashboard import auth

TOKEN = "t0ken-for-the-tests"
SECRET = 123456.75  # the outside run's every value: found in no answer


def callback(app, output: str, values: dict[str, object], changed: str) -> dict:
    """The body Dash's page POSTs to /_dash-update-component for the callback of ``output``
    (as ``app.callback_map`` names it), with ``values`` {"id.property": value}."""
    spec = app.callback_map[output]

    def props(items: list[dict]) -> list[dict]:
        return [{**item, "value": values.get(f"{item['id']}.{item['property']}")} for item in items]

    outs = [dict(zip(("id", "property"), o.rsplit(".", 1), strict=True))
            for o in output.strip(".").split("...")]  # fmt: skip
    return {
        "output": output, "outputs": outs if output.startswith("..") else outs[0],
        "inputs": props(spec["inputs"]), "state": props(spec["state"]),
        "changedPropIds": [changed],
    }  # fmt: skip


UPDATE = "..cockpit.figure...view.data...status.children.."


def show(client, app, selected) -> dict:
    """What the page gets back for the run chooser's value ``selected``."""
    values = {"runs.value": selected, "smoothing.value": 0, "logy.value": [],
              "theme.value": "light"}  # fmt: skip
    body = callback(app, UPDATE, values, "runs.value")
    answer = client.post("/_dash-update-component", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json["response"]


def download(client, app, selected) -> dict:
    body = callback(
        app, "download.data", {"csv.n_clicks": 1, "runs.value": selected}, "csv.n_clicks"
    )
    answer = client.post("/_dash-update-component", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json["response"]["download"]["data"]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A runs directory with one run, and a run outside it that symlinks inside point to."""
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    fake_run(runs, "mine", {"loss": ()}, 5)
    writer = fake_run(outside, "secret", {"loss": ()}, 3, status="running")
    for step in range(3, 6):
        writer.append(step, {"loss": SECRET})
    writer.close("finished")
    (runs / "link").symlink_to(outside / "secret")  # a run directory that is a symlink out
    (runs / "dblink").mkdir()  # a run directory inside, its store a symlink out
    (runs / "dblink" / "run.sqlite").symlink_to(outside / "secret" / "run.sqlite")
    return {"runs": runs, "outside": outside}


@pytest.fixture
def watched(places):
    """Files opened, SQLite databases connected and directories listed, symlinks resolved,
    under the outside directory while the test runs."""
    seen: list[tuple] = []
    _WATCHERS.append((str(places["outside"].resolve()), seen))
    yield seen
    _WATCHERS.pop()


_WATCHERS: list[tuple[str, list]] = []


def _audit(event: str, args: tuple) -> None:
    if not _WATCHERS or event not in ("open", "sqlite3.connect", "os.listdir", "os.scandir"):
        return
    if args and isinstance(args[0], str | bytes | os.PathLike):
        root, seen = _WATCHERS[-1]
        if os.path.realpath(os.fsdecode(args[0])).startswith(root):
            seen.append((event, args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed: this one does nothing between tests


def test_only_listed_runs_are_shown_or_downloaded(places, watched):
    runs, outside = places["runs"], places["outside"]
    app = dash_app.create_app(runs)
    client = app.server.test_client()
    assert [o["value"] for o in dash_app.run_options(dash_app.Listing(runs))] == [
        str(runs / "mine")
    ]
    crafted = [
        str(outside / "secret"),  # absolute, a run store
        f"{runs}/../outside/secret",  # `..` out of the runs directory
        "runs/../outside/secret",  # relative to the server's directory (the test's)
        str(runs / "link"),  # symlinks inside, to the run outside
        str(runs / "dblink"),
        str(outside / "nothing-here"),  # nonexistent
        "secret",
        {"path": str(outside / "secret")},  # not even a string
        7,
    ]
    answers = [show(client, app, [value]) for value in crafted]
    answers.append(show(client, app, str(outside / "secret")))  # not in a list
    for value, answer in zip([*crafted, "not in a list"], answers, strict=True):
        assert answer == answers[0], value  # the same refusal whatever the path names
    assert dash_app.REFUSED in json.dumps(answers[0])
    assert answers[0]["cockpit"]["figure"]["data"] == []
    for value in crafted[:3]:
        assert download(client, app, [value])["content"] == dash_app.REFUSED + "\n"
    # next to the listed run: it is shown, the crafted one still refused
    mixed = show(client, app, [str(runs / "mine"), str(outside / "secret")])
    assert dash_app.REFUSED in json.dumps(mixed["status"])
    assert {t["meta"]["run"] for t in mixed["cockpit"]["figure"]["data"]} == {"mine"}
    assert download(client, app, [str(runs / "mine")])["filename"] == "mine.csv"
    assert not watched  # nothing outside was opened or listed
    assert str(SECRET) not in json.dumps([answers, mixed])
    lm.load_run(runs / "link")  # what the watch would have seen
    assert watched


def test_a_listed_run_replaced_by_a_symlink_out_is_refused(places, watched):
    runs = places["runs"]
    listing = dash_app.Listing(runs)
    assert listing.find(str(runs / "mine")) == runs / "mine"
    (runs / "mine").rename(runs.parent / "moved")
    (runs / "mine").symlink_to(places["outside"] / "secret")
    assert listing.find(str(runs / "mine")) is None  # the listing still names it: refused
    assert dash_app.csv_download(listing, [str(runs / "mine")])["filename"] == "refused.txt"
    assert not watched


def test_a_token_is_asked_of_every_request_and_set_as_a_cookie(places):
    app = dash_app.create_app(places["runs"], token=TOKEN)
    client = app.server.test_client()
    paths = ["/", "/_dash-layout", "/_dash-dependencies", "/assets/x.css",
             "/_dash-component-suites/dash/dcc/dash_core_components.js"]  # fmt: skip
    for path in paths:
        for query in ("", "?token=wrong-token", "?token=t0ken-for-the-tests-", "?token=é"):
            answer = client.get(path + query)
            assert (answer.status_code, answer.text) == (403, auth.FORBIDDEN), path + query
    crafted = callback(app, "runs.options", {}, "list-tick.n_intervals")
    assert client.post("/_dash-update-component", json=crafted).status_code == 403
    client.set_cookie("lmd4ml-token-80", "wrong-token")
    assert client.get("/").status_code == 403

    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and b"lmd4ml" in page.data
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith(f"lmd4ml-token-80={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # the cookie alone, as the page's own requests carry it
    assert client.get("/_dash-layout").status_code == 200
    options = client.post("/_dash-update-component", json=crafted).json["response"]
    assert [o["label"] for o in options["runs"]["options"]] == ["mine (finished, 5 steps)"]
    assert {t["meta"]["run"] for t in show(client, app, [])["cockpit"]["figure"]["data"]} == {
        "mine"
    }
    assert "Set-Cookie" not in client.get("/").headers
