"""The run store: round trips, live reading, durability under SIGKILL, a full disk, a file
deleted or replaced while written, damaged files."""

import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lmd4ml.telemetry import store
from lmd4ml.telemetry.store import (
    RunStoreError,
    RunWriter,
    list_runs,
    load_run,
    new_run_dir,
)
from lmd4ml.telemetry.summaries import Sizes

FIELDS = {
    "loss": ((), np.float32),
    "norm_test": ((), np.float64),
    "nan_seen": ((), np.bool_),
    "grad_hist_1d": ((100,), np.int32),
    "per_layer/['w']": ((2, 3), np.float32),
}


def _values(step: int) -> dict[str, np.ndarray]:
    values = {
        "loss": np.float32(1.0 / (step + 1)),
        "norm_test": np.nan if step == 3 else step * 0.25,
        "nan_seen": step == 3,
        "per_layer/['w']": np.arange(6, dtype=np.float32).reshape(2, 3) * step,
    }
    if step % 2 == 0:  # a field tracked on some steps only
        values["grad_hist_1d"] = np.arange(100, dtype=np.int32) + step
    return values


def _write(run_dir, n_steps: int, **kwargs) -> None:
    with RunWriter(run_dir, {"config": {"lr": 0.1}}, FIELDS, **kwargs) as writer:
        for step in range(n_steps):
            writer.append(step, _values(step))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A closed run of 2000 steps, large enough to span many pages of the file."""
    run_dir = new_run_dir(tmp_path_factory.mktemp("runs"), "finished")
    _write(run_dir, 2000)
    return str(run_dir)


def test_round_trip(tmp_path):
    run_dir = new_run_dir(tmp_path, "r")
    _write(run_dir, 10)
    run = load_run(run_dir)
    assert run.path == run_dir
    assert run.keys == list(FIELDS)
    np.testing.assert_array_equal(run.steps(), np.arange(10))
    for key, (shape, dtype) in FIELDS.items():
        steps, values = run[key]
        expected_steps = [s for s in range(10) if key in _values(s)]
        assert steps.dtype == np.int64 and steps.tolist() == expected_steps
        assert values.dtype == dtype and values.shape == (len(steps), *shape)
        expected = np.array([_values(s)[key] for s in expected_steps], dtype)
        np.testing.assert_array_equal(values, expected)  # NaN included, bit for bit
    assert load_run(run_dir / "run.sqlite").keys == run.keys


def test_thin_reads_rows_spread_over_the_steps(finished_run):
    run = load_run(finished_run)
    assert run.shapes == {key: shape for key, (shape, _) in FIELDS.items()}
    all_steps, all_values = run["grad_hist_1d"]  # tracked at even steps
    steps, values = run.thin("grad_hist_1d", 5)
    assert steps[0] == 0 and steps[-1] == 1998 and len(steps) == 5
    assert np.all(np.diff(steps) > 300)  # spread, not bunched
    np.testing.assert_array_equal(values, all_values[np.searchsorted(all_steps, steps)])
    assert run.thin("loss", 10_000)[0].tolist() == list(range(2000))  # n above its steps: all
    with pytest.raises(ValueError, match="at least 2"):
        run.thin("loss", 1)


def test_read_in_step_order_whatever_order_sqlite_scans_in(finished_run, monkeypatch):
    expected = {key: load_run(finished_run)[key] for key in FIELDS}
    times = load_run(finished_run).times()
    connect = sqlite3.connect

    def reversed_scans(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.execute("PRAGMA reverse_unordered_selects = ON")  # SQL promises no order
        return conn

    monkeypatch.setattr(sqlite3, "connect", reversed_scans)
    run = load_run(finished_run)
    np.testing.assert_array_equal(run.steps(), np.arange(2000))
    np.testing.assert_array_equal(run.times(), times)  # each step's own, in step order
    assert np.all(np.diff(times) >= 0)
    for key, (steps, values) in expected.items():
        np.testing.assert_array_equal(run[key][0], steps)
        np.testing.assert_array_equal(run[key][1], values)


def test_a_field_never_tracked_reads_empty(tmp_path):
    with RunWriter(tmp_path, {}, FIELDS) as writer:
        writer.append(0, {"loss": 1.0})
    run = load_run(tmp_path)
    for read in (run["grad_hist_1d"], run.thin("grad_hist_1d", 4)):
        assert read[0].shape == (0,) and read[1].shape == (0, 100)


def test_metadata(tmp_path):
    metadata = {
        "config": {"lr": 1e-3, "layers": (64, 10)},
        "optimizer": "adam",
        "n_params": np.int64(26122),
        "versions": {"jax": "0.4.35"},
    }
    before = time.time()
    with RunWriter(tmp_path, metadata, {"loss": ((), "float32")}) as writer:
        assert load_run(tmp_path).metadata["status"] == "running"
    meta = load_run(tmp_path).metadata
    assert meta["config"] == {"lr": 1e-3, "layers": [64, 10]}
    assert meta["n_params"] == 26122 and meta["versions"] == {"jax": "0.4.35"}
    assert meta["format"] == "lmd4ml-run" and meta["version"] == store.VERSION == 2
    assert meta["status"] == "finished"
    assert before <= meta["start_time"] <= meta["end_time"] <= time.time()
    writer.close("failed")  # already closed: nothing changes
    assert load_run(tmp_path).metadata["status"] == "finished"


def test_each_step_keeps_its_wall_time(tmp_path):
    # Doubles of every fraction, and times far from now: read back bit for bit.
    times = 1.7e9 + np.random.default_rng(0).random(50) * 1e6
    before = time.time()
    with RunWriter(tmp_path, {}, FIELDS) as writer:
        for step, wall_time in enumerate(times):
            writer.append(3 * step, {"loss": step}, wall_time=wall_time)
        writer.append(1000, {"loss": 0.0})  # default: now
    run = load_run(tmp_path)
    assert run.steps().tolist() == [*range(0, 150, 3), 1000]
    read = run.times()
    assert read.dtype == np.float64
    np.testing.assert_array_equal(read[:-1], times)
    assert before <= read[-1] <= time.time()
    steps, last = run.clock(3)  # the end of the clock alone
    assert steps.tolist() == [144, 147, 1000]
    np.testing.assert_array_equal(last, read[-3:])
    assert run.clock(100)[0].tolist() == run.steps().tolist()
    with pytest.raises(ValueError, match="last must be an integer >= 1, got 0"):
        run.clock(0)


def test_a_wall_time_must_be_a_time(tmp_path):
    writer = RunWriter(tmp_path, {}, FIELDS)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match=f"wall_time of step 0 is {bad}, not a time"):
            writer.append(0, {"loss": 1.0}, wall_time=bad)
    writer.append(0, {"loss": 1.0}, wall_time=5.0)  # the rejected ones left nothing behind
    writer.close()
    assert load_run(tmp_path).times().tolist() == [5.0]


def _as_version_1(db: pathlib.Path) -> None:
    """Rewrite a run's file as version 1 wrote it: a steps table without times."""
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE steps RENAME TO steps_v2")
        conn.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO steps SELECT step FROM steps_v2")
        conn.execute("DROP TABLE steps_v2")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    conn.close()


def test_a_version_1_run_opens_without_a_clock(tmp_path):
    _write(tmp_path / "old", 6)
    _as_version_1(tmp_path / "old" / "run.sqlite")
    run = load_run(tmp_path / "old")
    assert run.metadata["version"] == 1 and run.steps().tolist() == list(range(6))
    assert run.times().shape == (6,) and np.isnan(run.times()).all()
    steps, times = run.clock(2)
    assert steps.tolist() == [4, 5] and np.isnan(times).all()
    np.testing.assert_array_equal(run["loss"][1], [_values(s)["loss"] for s in range(6)])
    assert [r["n_steps"] for r in list_runs(tmp_path)] == [6]


def test_failed_run_is_marked(tmp_path):
    with pytest.raises(RuntimeError), RunWriter(tmp_path, {}, FIELDS) as writer:
        writer.append(0, _values(0))
        raise RuntimeError("diverged")
    run = load_run(tmp_path)
    assert run.metadata["status"] == "failed"
    assert run.steps().tolist() == [0]


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"store's keys \['status'\]"):
        RunWriter(tmp_path / "a", {"status": "x"}, FIELDS)
    writer = RunWriter(tmp_path / "b", {}, FIELDS)
    with pytest.raises(FileExistsError):
        RunWriter(tmp_path / "b", {}, FIELDS)
    writer.append(5, _values(5))
    with pytest.raises(ValueError, match="steps must increase"):
        writer.append(5, _values(5))
    with pytest.raises(ValueError, match=r"fields \['lr'\] not in the layout"):
        writer.append(6, {"lr": 1.0})
    with pytest.raises(ValueError, match=r"has shape \(3,\), layout says \(100,\)"):
        writer.append(6, {"loss": 1.0, "grad_hist_1d": [1, 2, 3]})
    writer.append(6, {"loss": 2.0})  # the rejected step 6 left nothing behind
    with pytest.raises(ValueError, match="status must be"):
        writer.close("done")
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.append(7, {})
    run = load_run(tmp_path / "b")
    assert run.steps().tolist() == [5, 6]
    np.testing.assert_array_equal(run["loss"][1], np.float32([1 / 6, 2]))
    with pytest.raises(KeyError, match=r"lr.* is not a field .* it has .*loss"):
        run["lr"]


def test_new_run_dir(tmp_path):
    names = [new_run_dir(tmp_path / "runs").name for _ in range(20)]
    assert len(set(names)) == 20
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", name) for name in names)
    assert new_run_dir(tmp_path / "runs", "base").is_dir()
    with pytest.raises(FileExistsError):
        new_run_dir(tmp_path / "runs", "base")
    with pytest.raises(ValueError, match="plain directory name"):
        new_run_dir(tmp_path, "../escape")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(store.time, "strftime", lambda _: "20261201-120000")
    suffixes = iter(["abcd", "abcd", "ef01"])  # the second run draws the first's suffix
    monkeypatch.setattr(store.secrets, "token_hex", lambda _: next(suffixes))
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert (first.name, second.name) == ("20261201-120000-abcd", "20261201-120000-ef01")


def test_list_runs(tmp_path, finished_run):
    for name in ["b", "a", "c"]:  # started in this order, not the alphabetical one
        with RunWriter(new_run_dir(tmp_path, name), {"name_of": name}, FIELDS) as writer:
            writer.append(0, _values(0))
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.sqlite").write_bytes(b"garbage" * 100)
    runs = list_runs(tmp_path)
    assert [r["name"] for r in runs] == ["b", "a", "c", "broken"]
    assert [r["n_steps"] for r in runs] == [1, 1, 1, 0]
    assert runs[0]["name_of"] == "b" and runs[0]["status"] == "finished"
    assert runs[0]["path"] == str(tmp_path / "b")
    assert runs[-1]["status"] == "damaged" and "bad header" in runs[-1]["error"]
    assert list_runs(tmp_path / "missing") == []


def test_buffered_until_commit(tmp_path):
    writer = RunWriter(tmp_path, {}, FIELDS, commit_every=3600)
    writer.append(0, _values(0))
    assert load_run(tmp_path).steps().tolist() == []
    writer.flush()
    assert load_run(tmp_path).steps().tolist() == [0]
    writer.close()
    with RunWriter(tmp_path / "eager", {}, FIELDS, commit_every=0) as writer:
        writer.append(0, _values(0))
        assert load_run(tmp_path / "eager").steps().tolist() == [0]


def test_a_commit_is_quick_behind_a_busy_thread(tmp_path):
    """A few statements per commit, not one per row: each hands the GIL back and forth, and
    behind a thread that keeps it (a training loop) 2000 steps took seconds to commit."""
    writer = RunWriter(tmp_path, {}, FIELDS, commit_every=3600)
    for step in range(2000):
        writer.append(step, _values(step))
    done = threading.Event()

    def busy():
        while not done.is_set():
            pass

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        start = time.perf_counter()
        writer.flush()
        seconds = time.perf_counter() - start
    finally:
        done.set()
        thread.join()
    writer.close()
    assert seconds < 1.0, f"2000 steps took {seconds:.1f} s to commit"
    assert load_run(tmp_path).steps().tolist() == list(range(2000))


READER = """
import sys
from lmd4ml.telemetry.store import load_run
run = load_run(sys.argv[1])
print(run.metadata["status"], run.steps().tolist(), run["grad_hist_1d"][0].tolist())
"""


def test_readable_while_writing(tmp_path):
    from test_telemetry import child_env  # here: test_telemetry imports this module

    writer = RunWriter(tmp_path, {}, FIELDS, commit_every=3600)
    for step in range(5):
        writer.append(step, _values(step))
    writer.flush()
    writer.append(5, _values(5))  # buffered: not visible yet
    out = subprocess.run(
        [sys.executable, "-c", READER, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=child_env(),
    )
    assert out.stdout.split(maxsplit=1) == ["running", "[0, 1, 2, 3, 4] [0, 2, 4]\n"]
    writer.append(6, _values(6))  # the writer carries on after the reader came and went
    writer.close()
    assert load_run(tmp_path).steps().tolist() == list(range(7))


KILLED_WRITER = """
import sys, time
import numpy as np
from lmd4ml.telemetry.store import RunWriter
fields = {"loss": ((), "float32"), "grad_hist_1d": ((100,), "int32")}
writer = RunWriter(sys.argv[1], {}, fields, commit_every=1.0)
start = time.monotonic()
for step in range(10**6):
    writer.append(step, {"loss": step, "grad_hist_1d": np.full(100, step)})
    print(step, time.monotonic() - start, flush=True)
    time.sleep(0.01)
"""


def test_sigkill_keeps_a_prefix(tmp_path):
    from test_telemetry import child_env  # here: test_telemetry imports this module

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    appended = {}  # step -> seconds since the first append, when append returned
    try:
        for line in child.stdout:
            step, elapsed = line.split()
            appended[int(step)] = float(elapsed)
            if float(elapsed) >= 2.5:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    reached = max(appended)
    assert reached >= 100, f"the writer only reached step {reached}"

    run = load_run(tmp_path)
    steps = run.steps()
    n = len(steps)
    np.testing.assert_array_equal(steps, np.arange(n))
    assert n > 0 and run.metadata["status"] == "running"
    if n <= reached:  # steps n..reached were appended and lost: at most one commit interval
        assert appended[reached] - appended[n] <= 1.0 + 0.25
    loss_steps, loss = run["loss"]
    hist_steps, hist = run["grad_hist_1d"]
    np.testing.assert_array_equal(loss_steps, steps)
    np.testing.assert_array_equal(hist_steps, steps)
    np.testing.assert_array_equal(loss, steps)
    np.testing.assert_array_equal(hist, np.repeat(steps[:, None], 100, axis=1))


def disk_full_after(monkeypatch, pages: int) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL) once a run file would grow
    ``pages`` pages beyond its size when opened, as on a disk that filled up."""
    connect = store._connect

    def limited(path: pathlib.Path) -> sqlite3.Connection:
        conn = connect(path)
        if pathlib.Path(path).name == store.DB_NAME:
            (size,) = conn.execute("PRAGMA page_count").fetchone()
            conn.execute(f"PRAGMA max_page_count = {size + pages}")
        return conn

    monkeypatch.setattr(store, "_connect", limited)


def test_a_full_disk_keeps_the_committed_steps(tmp_path, monkeypatch):
    disk_full_after(monkeypatch, 2)
    writer = RunWriter(tmp_path / "run", {}, FIELDS, commit_every=0)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full") as full:
        for step in range(1000):
            writer.append(step, _values(step))
    assert full.value.__context__ is None  # not hidden behind a failed ROLLBACK
    assert writer.abandon(f"recording stopped at step {step} (disk full)")
    run = load_run(tmp_path / "run")
    assert run.steps().tolist() == list(range(step))  # every step committed before
    assert run.metadata["status"] == "incomplete"
    assert run.metadata["error"] == f"recording stopped at step {step} (disk full)"
    assert run.metadata["end_time"] >= run.metadata["start_time"]
    assert list_runs(tmp_path)[0]["error"] == run.metadata["error"]
    assert not writer.abandon("again")  # closed: nothing more happens
    writer.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_file_deleted_or_replaced_while_written_is_left_alone(tmp_path, finished_run, how):
    writer = RunWriter(tmp_path / "run", {}, FIELDS, commit_every=3600)
    writer.append(0, _values(0))
    writer.flush()
    path = tmp_path / "run" / "run.sqlite"
    if how == "deleted":
        shutil.rmtree(tmp_path / "run")
    else:
        shutil.copy(f"{finished_run}/run.sqlite", tmp_path / "other.sqlite")
        os.replace(tmp_path / "other.sqlite", path)
    replacement = path.read_bytes() if how == "replaced" else None
    writer.append(1, _values(1))
    with pytest.raises(RunStoreError, match="deleted or replaced while the run was writing it"):
        writer.flush()
    assert not writer.abandon("lost")
    if how == "deleted":
        assert not (tmp_path / "run").exists()
    else:  # the run now there is not touched
        assert path.read_bytes() == replacement
        assert load_run(path).metadata["status"] == "finished"
        assert len(load_run(path).steps()) == 2000


def test_a_failed_start_leaves_no_file_behind(tmp_path, monkeypatch):
    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_initialise", full)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        RunWriter(tmp_path, {}, FIELDS)
    assert list(tmp_path.iterdir()) == []


def _damage(path, how: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size // 2)
        elif how == "short":
            f.truncate(60)
        else:
            f.seek({"header": 0, "schema": 100, "middle": size // 2}[how])
            f.write(np.random.default_rng(0).bytes(100 if how == "header" else 30_000))


def _read_everything(path) -> None:
    run = load_run(path)
    run.steps()
    for key in run.keys:
        run[key]


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "truncated"),
        ("short", "truncated"),
        ("header", "not an SQLite database"),
        ("schema", "malformed"),
        ("middle", "malformed"),
    ],
)
def test_damaged_file(tmp_path, finished_run, how, message):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    _damage(run_dir / "run.sqlite", how)
    with pytest.raises(RunStoreError, match=message) as error:
        _read_everything(run_dir)
    assert str(run_dir / "run.sqlite") in str(error.value)
    assert list_runs(tmp_path)[0]["status"] == ("finished" if how == "middle" else "damaged")


def test_foreign_and_missing(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(RunStoreError, match=r"empty_dir: not an lmd4ml run \(no run.sqlite"):
        load_run(tmp_path / "empty_dir")
    with pytest.raises(RunStoreError, match="no such file or directory"):
        load_run(tmp_path / "nowhere")

    (tmp_path / "empty_file").mkdir()
    (tmp_path / "empty_file" / "run.sqlite").touch()
    with pytest.raises(RunStoreError, match="empty file"):
        load_run(tmp_path / "empty_file")

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(RunStoreError, match=r"foreign\.sqlite: an SQLite database but not"):
        load_run(foreign)

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        for table in ["meta (key, value)", "fields (idx, name, shape, dtype)", "steps (step)"]:
            conn.execute(f"CREATE TABLE {table}")
        conn.execute("INSERT INTO meta VALUES ('format', ?)", (json.dumps("other"),))
    with pytest.raises(RunStoreError, match="not an lmd4ml run \\(format 'other'\\)"):
        load_run(other)


# Sizes small enough that a few hundred rows fill every level of the pyramid and many chunks.
SMALL = Sizes(block_rows=4, factor=2, chunk_rows=8)


def _random_field(rng: np.random.Generator, n: int, dtype: np.dtype) -> tuple:
    """``n`` rows at increasing steps with gaps, of few distinct values (ties), NaN and ±inf
    among floats."""
    steps = np.cumsum(rng.integers(1, 4, n)) + int(rng.integers(-5, 5))
    values = rng.integers(-3, 4, n).astype(dtype)
    if dtype.kind == "f":
        odd = rng.random(n)
        values[odd < 0.15] = np.nan
        values[(odd > 0.97)] = np.inf
        values[n // 3 : n // 3 + 9] = np.nan  # an all-NaN block or more
    return steps, values


def _outline_rows(values: np.ndarray, blocks: int, sizes: Sizes) -> list[int]:
    """What ``Run.outline`` keeps, the way its docstring says it, by brute force."""
    n, block = len(values), sizes.block_rows
    count = n // block
    if count < blocks:
        return list(range(n))
    level = max(k for k in range(40) if count // sizes.factor**k >= blocks)
    nan = np.isnan(values) if values.dtype.kind == "f" else np.zeros(n, bool)
    low, high = np.where(nan, np.inf, values), np.where(nan, -np.inf, values)
    size = block * sizes.factor**level
    coarse_end = count // sizes.factor**level * size
    spans = [(a, a + size) for a in range(0, coarse_end, size)]
    spans += [(a, a + block) for a in range(coarse_end, count * block, block)]
    rows = {0, *range(count * block - 1, n)}
    for a, b in spans:
        rows |= {a + int(np.argmin(low[a:b])), a + int(np.argmax(high[a:b]))}
    return sorted(rows)


@pytest.mark.parametrize("seed", range(12))
def test_summaries_read_as_the_rows_do(tmp_path, seed):
    """Whole fields read through chunks, and outlines read from the pyramid, are the rows
    themselves, whatever the dtype, the steps, NaN, ties and where the commits fall."""
    rng = np.random.default_rng(seed)
    dtypes = [np.dtype(t) for t in ("float32", "float64", "int64", "uint8", "bool")]
    fields = {f"f{i}": rng.choice(dtypes) for i in range(2)}
    n = int(rng.choice([0, 1, 7, 8, 9, 33, 64, 300]))
    series = {key: _random_field(rng, n, dtype) for key, dtype in fields.items()}
    # A field with a row at every step the run appends (the others have some steps each).
    at = np.sort(np.concatenate([series[k][0] * 2 + (k == "f1") for k in fields]))
    series["every"] = (at, (at % 5).astype(np.float32))
    fields["every"] = np.dtype(np.float32)
    layout = {key: ((), dtype) for key, dtype in fields.items()} | {"vector": ((2,), "float32")}
    writers = {
        "summarised": RunWriter(tmp_path / "new", {}, layout, commit_every=3600, summarise=SMALL),
        "older": RunWriter(tmp_path / "old", {}, layout, commit_every=3600, summarise=None),
    }
    for writer in writers.values():
        rows = sorted(
            (int(s) * 2 + (key == "f1"), key, v)  # each field's own steps
            for key, (steps, values) in series.items()
            if key != "every"
            for s, v in zip(steps, values, strict=True)
        )
        for i, (step, key, value) in enumerate(rows):
            writer.append(step, {key: value, "every": np.float32(step % 5)})
            if rng.random() < 0.05 or i == len(rows) // 2:
                writer.flush()
        writer.close()
    for which in writers:
        run = load_run(tmp_path / ("new" if which == "summarised" else "old"))
        assert set(run._summarised) == (set(fields) if which == "summarised" else set())
        for key, (steps, values) in series.items():
            steps = steps if key == "every" else steps * 2 + (key == "f1")
            read_steps, read_values = run[key]
            np.testing.assert_array_equal(read_steps, steps)
            assert read_values.dtype == values.dtype
            np.testing.assert_array_equal(read_values, values)  # NaN too
            np.testing.assert_array_equal(run.values(key), values)
            for blocks in (1, 2, 3, 5, 40):
                got_steps, got_values, rows = run.outline(key, blocks)
                expected = _outline_rows(values, blocks, SMALL) if which == "summarised" else None
                assert rows.tolist() == (expected or list(range(len(values))))
                np.testing.assert_array_equal(got_steps, steps[rows])
                np.testing.assert_array_equal(got_values, values[rows])


def test_an_outline_keeps_every_spike_of_a_long_field(tmp_path):
    """10⁵ rows with the default sizes: 195 level-0 blocks of 512 rows, read at level 1 (48
    blocks of 2048) for at least 40 blocks, then 3 level-0 blocks and the last 164 rows."""
    rng = np.random.default_rng(0)
    values = rng.random(100_003).astype(np.float32)
    starts = np.arange(48) * 2048
    spikes, dips = starts + rng.integers(0, 1024, 48), starts + rng.integers(1024, 2048, 48)
    values[spikes], values[dips] = 100 + np.arange(48), -100 - np.arange(48)
    with RunWriter(tmp_path, {}, {"loss": ((), "float32")}) as writer:
        for step, value in enumerate(values):
            writer.append(step, {"loss": value})
    run = load_run(tmp_path)
    _, got, rows = run.outline("loss", 40)
    assert {0, *spikes, *dips, *range(195 * 512 - 1, len(values))} <= set(rows.tolist())
    assert len(rows) == 1 + 2 * 48 + 2 * 3 + 164
    np.testing.assert_array_equal(got, values[rows])
    assert rows.tolist() == _outline_rows(values, 40, Sizes())
    steps, whole = run["loss"]  # 24 chunks of 4096 rows and the 1699 after
    np.testing.assert_array_equal(steps, np.arange(len(values)))
    np.testing.assert_array_equal(whole, values)
    np.testing.assert_array_equal(run.values("loss"), values)


def test_a_failed_commit_leaves_the_summaries_as_they_were(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path, {}, {"x": ((), "int64")}, commit_every=3600, summarise=SMALL)
    for step in range(10):
        writer.append(step, {"x": step})
    writer.flush()
    for step in range(10, 30):
        writer.append(step, {"x": (step * 7) % 11})
    insert = store._insert

    def full(conn, table, rows):
        if table.startswith("m"):  # the values went in; the pyramid fails
            raise sqlite3.OperationalError("database or disk is full")
        insert(conn, table, rows)

    monkeypatch.setattr(store, "_insert", full)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        writer.flush()
    assert load_run(tmp_path)["x"][0].tolist() == list(range(10))  # rolled back
    monkeypatch.setattr(store, "_insert", insert)
    writer.close()  # the same rows again, summarised once
    values = np.array([s for s in range(10)] + [(s * 7) % 11 for s in range(10, 30)])
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run["x"][1], values)
    assert run.outline("x", 2)[2].tolist() == _outline_rows(values, 2, SMALL)


def test_outline_rejects_what_it_cannot_draw(finished_run):
    run = load_run(finished_run)
    with pytest.raises(ValueError, match="blocks must be an integer >= 1, got 0"):
        run.outline("loss", 0)
    with pytest.raises(ValueError, match=r"'grad_hist_1d' has shape \(100,\), not a scalar"):
        run.outline("grad_hist_1d", 10)
    with pytest.raises(KeyError, match=r"nope.* is not a field"):
        run.outline("nope", 10)
    with pytest.raises(ValueError, match=r"block_rows must be an integer in \[1, 2\*\*20\]"):
        Sizes(block_rows=0)
