"""The dashboard tried from outside: crafted callbacks, tokens, the server, its arguments.

Requests go through Flask's test client to ``create_app(...).server``, built as Dash's page
sends them; one test runs the real command (waitress) and talks to it over HTTP.
"""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dashboard import fake_run

import lmd4ml as lm
from lmd4ml.dashboard import app as dash_app
from lmd4ml.dashboard import auth, cli, launch

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
        body = callback(app, "runs.options", {}, "list-tick.n_intervals")
        request = urllib.request.Request(
            f"{base}/_dash-update-component", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Cookie": cookie},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            options = json.load(answer)["response"]["runs"]["options"]
        assert [o["label"] for o in options] == ["mine (finished, 5 steps)"]
    finally:
        server.kill()
        server.wait()


def test_open_dashboard_hands_a_token_over_beyond_loopback(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(launch, "_started", {})  # the servers started: none for real here
    monkeypatch.setattr(launch, "_port_free", lambda host, port: True)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: started.append((a, kw)))
    monkeypatch.setenv(auth.TOKEN_ENV, "from-the-users-shell")
    url, _ = launch.open_dashboard(tmp_path / "a", port=8123, host="0.0.0.0")
    token = re.fullmatch(r"http://0\.0\.0\.0:8123/\?token=([\w-]+)", url)[1]
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
