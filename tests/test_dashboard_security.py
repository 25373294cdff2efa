"""The dashboard tried from outside: crafted callbacks, tokens, the server, its arguments.

Requests go through Flask's test client to ``create_app(...).server``, built as Dash's page
sends them; one test runs the real command (waitress) and talks to it over HTTP.
"""

import contextlib
import io
import json
import math
import os
import re
import site
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import waitress
from dash import Patch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dashboard import fake_run

import lmd4ml as lm
from lmd4ml.dashboard import app as dash_app
from lmd4ml.dashboard import auth, cli, inputs, launch
from lmd4ml.dashboard.data import RunCache

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
TABLE = "..runs.options...runs-head.children...table.style.."
LOG = "logged.data"


def cells(label: dict) -> list[str]:
    """The cells of a runs-table row, as a callback's JSON answer holds its label."""
    return [cell["props"]["children"] for cell in label["props"]["children"]]


def show(client, app, selected) -> dict:
    """What the page gets back for the run chooser's value ``selected``."""
    values = {"runs.value": selected, "smoothing.value": 0, "logged.data": [],
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
    assert [o["value"] for o in dash_app.run_table(dash_app.Listing(runs))[0]] == [
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
    crafted = callback(app, TABLE, {}, "list-tick.n_intervals")
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
    assert [cells(o["label"])[:3] for o in options["runs"]["options"]] == [
        ["mine", "finished", "5"]
    ]
    assert {t["meta"]["run"] for t in show(client, app, [])["cockpit"]["figure"]["data"]} == {
        "mine"
    }
    assert "Set-Cookie" not in client.get("/").headers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_with_waitress_and_asks_for_its_token(places):
    port = free_port()
    command = [sys.executable, "-m", "lmd4ml.dashboard", str(places["runs"]),
               "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN]  # fmt: skip
    here = {**os.environ, "PYTHONPATH": str(Path(lm.__file__).parents[1])}  # this lmd4ml
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=here)
    try:
        line = server.stdout.readline()
        assert line.endswith(f": http://127.0.0.1:{port}/?token={TOKEN}\n"), line
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/", timeout=10)
        assert refused.value.code == 403 and refused.value.read().decode() == auth.FORBIDDEN
        with urllib.request.urlopen(f"{base}/?token={TOKEN}", timeout=10) as page:
            assert page.headers["Server"] == "waitress"
            cookie = page.headers["Set-Cookie"].split(";")[0]
        app = dash_app.create_app(places["runs"])  # the same callbacks, to build a request
        body = callback(app, TABLE, {}, "list-tick.n_intervals")
        request = urllib.request.Request(
            f"{base}/_dash-update-component", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Cookie": cookie},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            options = json.load(answer)["response"]["runs"]["options"]
        assert [cells(o["label"])[:3] for o in options] == [["mine", "finished", "5"]]
    finally:
        server.kill()
        server.wait()


def test_open_dashboard_hands_a_token_over_beyond_loopback(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launch, "_started", {})  # the servers started: none for real here
    monkeypatch.setattr(launch, "_port_free", lambda host, port: True)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: started.append((a, kw)))
    monkeypatch.setenv(auth.TOKEN_ENV, "from-the-users-shell")
    monkeypatch.setattr(cli.socket, "gethostname", lambda: "trainbox")
    url, _ = launch.open_dashboard(tmp_path / "a", port=8123, host="0.0.0.0")
    token = re.fullmatch(r"http://trainbox:8123/\?token=([\w-]+)", url)[1]
    (command,), kw = started[-1]
    assert kw["env"][auth.TOKEN_ENV] == token and token not in " ".join(command)
    url, _ = launch.open_dashboard(tmp_path / "b", port=8124)  # loopback: none asked
    assert url == "http://127.0.0.1:8124/" and auth.TOKEN_ENV not in started[-1][1]["env"]
    url, _ = launch.open_dashboard(tmp_path / "c", port=8125, token=TOKEN)
    assert url == f"http://127.0.0.1:8125/?token={TOKEN}"
    assert started[-1][1]["env"][auth.TOKEN_ENV] == TOKEN


def configure(*argv: str):
    return cli.configure(["dashboard", *argv])


def test_arguments_choose_the_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    runs = str(tmp_path)
    assert configure(runs).token is None  # loopback
    made = configure(runs, "--host", "0.0.0.0").token
    assert auth.token_problem(made) is None and made != configure(runs, "--host", "::").token
    assert configure(runs, "--host", "0.0.0.0", "--no-token").token is None
    assert configure(runs, "--token", TOKEN).token == TOKEN  # loopback too, when asked
    monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)
    assert configure(runs, "--host", "0.0.0.0").token == TOKEN
    assert configure(runs, "--no-token").token is None
    monkeypatch.setenv(auth.TOKEN_ENV, "bad")
    for argv, message in [
        ([], "LMD4ML_DASHBOARD_TOKEN: a token is 8 to 256"),
        (["--port", "65536"], "'65536' is not a port: expected 0 to 65535"),
        (["--port", "-1"], "expected 0 to 65535"),
        (["--host", "no such host"], "is not a host"),
        (["--token", "x"], "a token is 8 to 256"),
        (["--token", TOKEN, "--no-token"], "not allowed with argument"),
        (["--owner", "-1"], "is not a process id"),
        (["--linger", "nan"], "is not a number of seconds"),
    ]:
        with pytest.raises(SystemExit) as exit:
            configure(runs, *argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv
    (tmp_path / "file").write_text("")
    for runs_dir in (tmp_path / "file", tmp_path / "missing", "a\0b"):
        with pytest.raises(SystemExit):
            configure(str(runs_dir), "--no-token")
        assert "is not a directory" in capsys.readouterr().err


def test_a_port_in_use_is_a_clear_exit(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = configure(str(tmp_path), "--port", str(busy.getsockname()[1]))
        with pytest.raises(SystemExit, match=r"cannot listen on 127\.0\.0\.1 port"):
            cli.serve(args)


TEXT = st.one_of(st.sampled_from(["runs", "file", "missing", "", "..", "-1"]), st.text(max_size=10))
HOSTS = ["127.0.0.1", "localhost", "0.0.0.0", "::", "::1", "example.org", "1.2.3.4.5", "a..b"]
OPTION = st.one_of(
    st.tuples(st.just("--port"), st.one_of(st.integers(-9, 70_000).map(str), TEXT)),
    st.tuples(st.just("--host"), st.one_of(st.sampled_from(HOSTS), TEXT)),
    st.tuples(st.just("--token"), st.one_of(st.just(TOKEN), TEXT)),
    st.tuples(st.just("--owner"), st.one_of(st.integers(-9, 2**40).map(str), TEXT)),
    st.tuples(st.just("--linger"), st.one_of(st.floats().map(str), TEXT)),
    st.tuples(st.sampled_from(["--no-token", "-h", "--", "-x"])),
)
# Mostly command lines of the right shape with odd values, some anything at all.
SHAPED = st.tuples(st.one_of(st.just(["runs"]), st.lists(TEXT, max_size=2)),
                   st.lists(OPTION, max_size=4))  # fmt: skip
ANY = st.lists(st.one_of(TEXT, st.sampled_from(["dashboard", "--port", "--no-token"])), max_size=6)
ARGV = st.one_of(
    SHAPED.map(lambda t: ["dashboard", *t[0], *(word for option in t[1] for word in option)]),
    st.tuples(st.sampled_from([["dashboard"], []]), ANY).map(lambda t: t[0] + t[1]),
)


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(argv=ARGV)
def test_any_arguments_start_a_valid_server_or_exit_with_a_usage_error(argv, monkeypatch):
    """Random command lines: a clear argparse error (status 2) and nothing started, or a
    server started with arguments that hold."""
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    Path("runs").mkdir(exist_ok=True)  # in the test's own directory (conftest)
    Path("file").write_text("")
    served = []
    monkeypatch.setattr(cli, "serve", served.append)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as exit:
            assert not served
            if exit.code == 0:  # -h somewhere
                assert out.getvalue().startswith("usage: lmd4ml")
            else:
                assert exit.code == 2 and "usage: lmd4ml" in err.getvalue()
                assert re.search(r"lmd4ml( dashboard)?: error: .", err.getvalue())
            return
    (args,) = served
    assert Path(args.runs_dir).is_dir() and 0 <= args.port <= 65535
    assert cli.host_name(args.host) == args.host
    assert args.token is None or auth.token_problem(args.token) is None
    assert args.token is not None or args.no_token or cli.is_loopback(args.host)


# Crafted values of every other input: made valid, or refused on the page; never a 500.

PAUSE = "..tick.disabled...pause.children...paused.children.."
# Every callback of the page, as app.callback_map names them (the clientside one included).
CALLBACKS = [UPDATE, TABLE, LOG, PAUSE, "page.title", "download.data"]


def post(client, body) -> object:
    """The answer to a callback request ``body``: anything JSON, or bytes as they are."""
    if isinstance(body, bytes):
        return client.post("/_dash-update-component", data=body, content_type="application/json")
    return client.post("/_dash-update-component", json=body)


def test_each_value_is_made_valid_in_one_place():
    assert [inputs.smoothing(v) for v in (0.3, 1, 10**400, -math.inf, math.nan, "0.5", [], True)
            ] == [0.3, 0.99, 0.99, 0.0, 0.0, 0.0, 0.0, 0.0]  # fmt: skip
    assert [inputs.logged(v) for v in (["loss"], [], None, "loss", {"loss": 1}, [["loss"]])] == [
        {"loss"}, set(), set(), set(), set(), set()
    ]  # fmt: skip
    many = [str(i) for i in range(1000)] + ["x" * (inputs.MAX_TITLE + 1), 7, None]
    assert len(inputs.logged(many)) == inputs.MAX_LOGGED and inputs.logged(many[-3:]) == set()
    click = {"index": 0, "annotation": {"name": inputs.LOG_TOGGLE + "loss"}}
    assert inputs.log_click(click) == "loss"
    for bad in ({"annotation": {"name": "loss"}}, {"annotation": {"name": inputs.LOG_TOGGLE}},
                {"annotation": {"name": inputs.LOG_TOGGLE + "x" * 201}}, {"annotation": "log:x"},
                {"annotation": {"name": ["log:x"]}}, ["log:x"], "log:x", None):  # fmt: skip
        assert inputs.log_click(bad) is None, bad
    assert [inputs.dark(v) for v in ("dark", "light", None, ["dark"])] == [True, *[False] * 3]
    assert [inputs.clicks(v) for v in (5, 0, -1, None, "3", 2.0, 10**30)] == [5, 0, 0, 0, 0, 0,
                                                                              10**30]  # fmt: skip
    assert inputs.run_choice(None) == inputs.run_choice("") == []
    assert inputs.run_choice("a") == ["a"] and inputs.run_choice([{}]) == [{}]
    assert inputs.run_choice(["a"] * inputs.MAX_RUNS) is not None
    assert inputs.run_choice(["a"] * (inputs.MAX_RUNS + 1)) is None
    trace = {"run": "/r", "field": "loss", "kind": "lines", "n": 3, "last": 2}
    good = {"key": "k", "versions": {"/r": 1}, "traces": [trace]}
    assert inputs.view(good) is good and inputs.view({**good, "traces": []}) is not None
    for bad in ([good], None, {**good, "key": 1}, {**good, "traces": {}},
                {**good, "traces": [trace, trace]},  # the same trace twice: twice the work
                *({**good, "traces": [{**trace, k: v}]} for k, v in [
                    ("run", None), ("field", 3), ("kind", "pie"), ("kind", ["lines"]),
                    ("n", -1), ("n", 1.0), ("n", True), ("last", -2), ("last", 2**63),
                    ("last", "2")])):  # fmt: skip
        assert inputs.view(bad) is None, bad


def test_a_request_not_shaped_as_a_callback_gets_400_unrun(places, capsys):
    app = dash_app.create_app(places["runs"])
    client = app.server.test_client()
    good = callback(app, UPDATE, {}, "runs.value")
    assert inputs.callback_problem(good, app.callback_map) is None
    state_less = callback(app, TABLE, {}, "list-tick.n_intervals")
    del state_less["state"]  # as Dash's page sends a callback without states
    assert post(client, state_less).status_code == 200
    crafted = [
        b"not json", b"[" * 50_000 + b"]" * 50_000, [good], "text", None,
        {**good, "output": "nope.figure"}, {**good, "output": ["cockpit.figure"]},
        callback(app, "page.title", {}, "theme.value"),  # clientside: runs in the browser
        {**good, "outputs": good["outputs"][:2]}, {**good, "outputs": good["outputs"][0]},
        {**good, "inputs": good["inputs"][1:]}, {**good, "inputs": good["inputs"][::-1]},
        {**good, "inputs": None}, {**good, "state": [{"id": "view", "property": "figure"}]},
        {**good, "state": [[]]}, {**good, "changedPropIds": ["view.data"]},
        {**good, "changedPropIds": "runs.value"}, {**good, "changedPropIds": ['{"a":1}.x']},
        {**good, "changedPropIds": ["runs.value"] * 9},
    ]  # fmt: skip
    for body in crafted:
        answer = post(client, body)
        assert answer.status_code == 400 and answer.mimetype == "text/plain", body
        assert answer.text.startswith("400 Bad Request: ") and answer.text.count("\n") == 1
    huge = json.dumps({**good, "pad": "x" * inputs.MAX_REQUEST_BYTES}).encode()
    assert post(client, huge).status_code == 413
    assert "Traceback" not in capsys.readouterr().err  # nothing on the training terminal


def test_crafted_values_get_an_answer_and_refusals_a_message(places, watched, capsys):
    app = dash_app.create_app(places["runs"])
    client = app.server.test_client()
    base = {"runs.value": [], "smoothing.value": 0, "logged.data": [], "theme.value": "light",
            "tick.n_intervals": 3}  # fmt: skip
    drawn = post(client, callback(app, UPDATE, base, "runs.value")).json["response"]
    view = drawn["view"]["data"]
    trace = view["traces"][0]
    crafted = [
        {"smoothing.value": 1}, {"smoothing.value": "0.5"}, {"smoothing.value": math.nan},
        {"smoothing.value": -math.inf}, {"smoothing.value": 10**400}, {"logged.data": None},
        {"logged.data": "log"}, {"logged.data": [{"a": []}] * 10_000}, {"theme.value": {"x": 1}},
        {"logged.data": ["x" * 100] * 5000},
        {"view.data": [1]}, {"view.data": {"key": view["key"]}},
        {"view.data": {**view, "traces": [{**trace, "run": str(places["outside"] / "secret")}]}},
        {"view.data": {**view, "traces": [{**trace, "field": "nope"}]}},
        {"view.data": {**view, "traces": [{**trace, "kind": "heatmap"}]}},
        {"view.data": {**view, "traces": [{**trace, "n": 10**30}]}},
    ]  # fmt: skip
    for values in crafted:
        answer = post(client, callback(app, UPDATE, {**base, **values}, "tick.n_intervals"))
        assert answer.status_code in (200, 204), values
        if answer.status_code == 200:
            assert answer.json["response"]["status"]["children"] == drawn["status"]["children"]
    # too many runs: refused, whatever they name, before any is looked up
    answer = show(client, app, [str(places["runs"] / "mine")] * (inputs.MAX_RUNS + 1))
    assert inputs.TOO_MANY in json.dumps(answer["status"])
    assert answer["cockpit"]["figure"]["data"] == []
    for clicks in ("x", [1], -3, 1.5, None, 10**30, 7):
        body = callback(app, PAUSE, {"pause.n_clicks": clicks}, "pause.n_clicks")
        paused = post(client, body).json["response"]["tick"]["disabled"]
        assert paused is (clicks == 7), clicks
    assert download(client, app, {"a": "b"})["content"] == dash_app.REFUSED + "\n"
    assert not watched and "Traceback" not in capsys.readouterr().err


def test_a_view_that_does_not_fit_its_runs_is_redrawn(tmp_path):
    fake_run(tmp_path, "r", {"loss": (), "h": (4,)}, 5, status="running")
    cache, listing = RunCache(), dash_app.Listing(tmp_path)
    _, view, _ = dash_app.update(cache, listing, [], 0.5, (), False, None, redraw=True)
    cache.get(str(tmp_path / "r")).columns["h"].extend(np.arange(5, 7), np.ones((2, 4)))
    out, _, _ = dash_app.update(cache, listing, [], 0.5, (), False, view, redraw=False)
    assert isinstance(out, Patch)  # the view as drawn: new steps patched in
    heatmap = next(t for t in view["traces"] if t["field"] == "h" and t["kind"] == "heatmap")
    for change in ({"kind": "lines"}, {"run": "elsewhere"}, {"field": "nope"}):
        crafted = inputs.view({**view, "traces": [{**heatmap, **change}]})
        out, new, _ = dash_app.update(cache, listing, [], 0.5, (), False, crafted, False)
        assert isinstance(out, dict) and new["traces"] != crafted["traces"], change


def test_a_failing_callback_shows_the_client_no_traceback(places, monkeypatch):
    def fail(*args):
        raise RuntimeError("a bug, with /some/path in it")

    monkeypatch.setattr(dash_app, "update", fail)
    app = dash_app.create_app(places["runs"])
    answer = post(app.server.test_client(), callback(app, UPDATE, {}, "runs.value"))
    assert answer.status_code == 500
    assert "Traceback" not in answer.text and "/some/path" not in answer.text
    made = {}

    def create_server(wsgi_app, **options):  # waitress's, as serve calls it
        made.update(options)
        raise SystemExit

    monkeypatch.setattr(waitress, "create_server", create_server)
    with pytest.raises(SystemExit):
        cli.serve(configure(str(places["runs"]), "--port", "0"))
    assert made["expose_tracebacks"] is False


def test_on_loopback_only_requests_addressed_to_it_are_answered(places):
    """DNS rebinding: another site's page that points a name of its own at 127.0.0.1 still
    sends that name as its Host, and is refused; a tunnel from another port is not."""
    runs = places["runs"]
    local = ["localhost:8050", "127.0.0.1:8050", "[::1]:8050", "localhost", "LOCALHOST.:9000",
             "127.0.0.2:1"]  # fmt: skip
    other = ["evil.example:8050", "localhost.evil.example", "127.0.0.1.nip.io:8050", "[::2]:1",
             "0.0.0.0:8050", "", "::1", "a:b:c", "[::1", "local host"]  # fmt: skip
    for bound, token in [("127.0.0.1", None), ("::1", None), ("localhost", TOKEN)]:
        client = dash_app.create_app(runs, token, bound).server.test_client()
        query = f"?token={TOKEN}" if token else ""
        for host in local:
            assert client.get(f"/{query}", headers={"Host": host}).status_code == 200, host
        for host in other:
            answer = client.get(f"/{query}", headers={"Host": host})
            assert (answer.status_code, answer.text) == (403, auth.WRONG_HOST), (bound, host)
    assert auth.local_host("myname:8050", "myname") and auth.local_host(None, "127.0.0.1")
    # beyond loopback, the token guards it, reached by whatever name
    client = dash_app.create_app(runs, TOKEN, "0.0.0.0").server.test_client()
    for host in ["trainbox.example:8050", "10.1.2.3:8050", "evil.example"]:
        assert client.get("/", headers={"Host": host}).status_code == 403
        assert client.get(f"/?token={TOKEN}", headers={"Host": host}).status_code == 200


def test_an_address_for_every_interface_is_announced_by_host_name(monkeypatch):
    monkeypatch.setattr(cli.socket, "gethostname", lambda: "trainbox")
    assert cli.url("0.0.0.0", 8050, "abc") == "http://trainbox:8050/?token=abc"
    assert cli.url("::", 8050, None) == "http://trainbox:8050/"
    assert cli.url("10.1.2.3", 80, None) == "http://10.1.2.3:80/"
    assert cli.url("example.org", 80, None) == "http://example.org:80/"


def test_the_server_imports_the_lmd4ml_that_starts_it(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launch, "_started", {})
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: started.append(kw))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(lm, "__file__", "/src/co/lmd4ml/__init__.py")  # a checkout
    launch.open_dashboard(tmp_path, port=free_port())
    assert started[-1]["env"]["PYTHONPATH"] == os.pathsep.join(["/src/co", "/elsewhere"])
    # installed, the server finds it in site-packages, kept behind the standard library
    installed = Path(site.getsitepackages()[0])
    assert launch.python_path(installed, "/elsewhere") == "/elsewhere"
    assert launch.python_path(installed, None) is None
    assert launch.python_path(Path("/src/co"), None) == "/src/co"


# Random JSON for every input and state of every callback: a clean answer, nothing read outside.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=8,
)  # fmt: skip
ODD = [0.5, 0.99, 1, -1, 2**63, "log", ["log"], "dark", "lines", "heatmap", "loss", "..", "",
       "log:mini-batch loss", ["mini-batch loss"], {"annotation": {"name": "log:mini-batch loss"}},
       {"annotation": {"name": "log:" + "x" * 300}}]  # fmt: skip


@pytest.fixture
def page(places):
    """The app, a client, what the page sends at first (the view the server drew included),
    and values a crafted request might try (the runs directory's and the outside's paths)."""
    app = dash_app.create_app(places["runs"])
    client = app.server.test_client()
    values = {"runs.value": [], "smoothing.value": 0, "logged.data": [], "theme.value": "light",
              "tick.n_intervals": 1, "list-tick.n_intervals": 1, "pause.n_clicks": 1,
              "cockpit.clickAnnotationData": None,
              "csv.n_clicks": 1}  # fmt: skip
    values["view.data"] = show(client, app, [])["view"]["data"]
    paths = [str(places[d] / r) for d in ("runs", "outside") for r in ("mine", "secret", "link")]
    return app, client, values, paths


@settings(max_examples=50, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@pytest.mark.parametrize("output", CALLBACKS)
@given(data=st.data())
def test_any_values_of_any_callback_get_a_clean_answer(output, page, watched, capsys, data):
    """Some of the page's values replaced by anything (or the view's traces altered): 200
    with the callback's outputs, or 204; 400 for the one run in the browser; never a 500."""
    app, client, page_values, paths = page
    assert sorted(app.callback_map) == sorted(CALLBACKS)
    spec = app.callback_map[output]
    names = [f"{i['id']}.{i['property']}" for i in spec["inputs"] + spec["state"]]
    view = page_values["view.data"]
    value = st.one_of(JSON, st.sampled_from(ODD + paths), st.lists(st.sampled_from(paths)))
    changes = st.lists(st.sampled_from(names[: len(spec["inputs"])]), unique=True)
    crafted = st.tuples(st.dictionaries(st.sampled_from(names), value), changes)
    if "view.data" in names:  # at a poll, the view as drawn, its traces altered: to extend()
        altered = st.tuples(st.sampled_from(["run", "field", "kind", "n", "last"]),
                            st.sampled_from(ODD + paths) | JSON)  # fmt: skip
        crafted |= altered.map(lambda kv: ({"view.data": {
            **view, "traces": [{**t, kv[0]: kv[1]} for t in view["traces"]]}},
            ["tick.n_intervals"]))  # fmt: skip
    crafted, changed = data.draw(crafted)
    body = callback(app, output, {**page_values, **crafted}, "")
    body["changedPropIds"] = changed
    answer = post(client, body)
    if "callback" not in spec:
        assert answer.status_code == 400
    elif answer.status_code == 200:
        response = answer.json["response"]
        declared = {(o["id"], o["property"]) for o in inputs._outputs(output)}
        assert {(i, p) for i, props in response.items() for p in props} <= declared
    else:
        assert answer.status_code == 204, answer.text
    assert not watched and "Traceback" not in capsys.readouterr().err


@settings(max_examples=100, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(output=st.sampled_from(CALLBACKS), parts=st.dictionaries(
    st.sampled_from(["output", "outputs", "inputs", "state", "changedPropIds"]), JSON,
    min_size=1))  # fmt: skip
def test_any_request_shape_gets_a_clean_answer(page, watched, capsys, output, parts):
    """Parts of a callback request replaced by anything: 400 unless still well shaped."""
    app, client, values, _ = page
    answer = post(client, {**callback(app, output, values, ""), **parts})
    assert answer.status_code in (200, 204, 400), answer.text
    assert not watched and "Traceback" not in capsys.readouterr().err
