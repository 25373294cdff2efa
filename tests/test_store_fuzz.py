"""Fuzzing run store files: whatever the bytes, reading a run gives its values or a
``RunStoreError`` naming the file, never a raw SQLite, JSON or numpy error; ``list_runs``
lists what it cannot read as damaged."""

import json
import re
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store import FIELDS, SMALL, _values

from lmd4ml.telemetry.store import VERSION, RunStoreError, RunWriter, list_runs, load_run

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SQLITE_MAGIC = b"SQLite format 3\0"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    """The bytes of a closed run of 40 steps: a few pages, so that damage reaches every kind,
    with small summaries: 5 chunks and 10 blocks at level 0 of each scalar field."""
    run_dir = tmp_path_factory.mktemp("valid") / "run"
    with RunWriter(run_dir, {"config": {"lr": 0.1}}, FIELDS, summarise=SMALL) as writer:
        for step in range(40):
            writer.append(step, _values(step))
    return (run_dir / "run.sqlite").read_bytes()


def read_or_refuse(data: bytes) -> bool:
    """Put ``data`` as a run's file and read all of it: values, or a RunStoreError naming
    the file; and ``list_runs`` lists the run, as damaged if it cannot be read. Whether it
    was read."""
    with tempfile.TemporaryDirectory() as runs:
        db = Path(runs) / "run" / "run.sqlite"
        db.parent.mkdir()
        db.write_bytes(data)
        (listed,) = list_runs(runs)
        try:
            run = load_run(db.parent)
        except RunStoreError as error:
            assert str(db) in str(error)
            assert listed["status"] == "damaged" and listed["error"] == str(error)
            return False
        assert listed["status"] != "damaged"
        try:  # damage among the values shows only when they are read
            run.steps()
            for key in run.keys:
                steps, values = run[key]
                assert len(steps) == len(values)
                if run.shapes[key] == ():
                    np.testing.assert_array_equal(run.values(key), values)
                    for blocks in (1, 3):
                        outline = run.outline(key, blocks)
                        assert len({len(a) for a in outline}) == 1
        except RunStoreError as error:
            assert str(db) in str(error)
            return False
        return True


def rewritten(data: bytes, statement: str, *args) -> bytes:
    """``data`` with one SQL statement applied to it, as a writer of another kind would."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "run.sqlite"
        db.write_bytes(data)
        with sqlite3.connect(db) as conn:
            conn.execute(statement, args)
        conn.close()
        return db.read_bytes()


@FUZZ
@given(st.binary(max_size=4096) | st.binary(max_size=4096).map(SQLITE_MAGIC.__add__))
def test_random_bytes(data):
    assert not read_or_refuse(data)


@FUZZ
@given(st.data())
def test_truncated(valid, data):
    read_or_refuse(valid[: data.draw(st.integers(0, len(valid) - 1))])


@FUZZ
@given(st.data())
def test_bytes_overwritten(valid, data):
    damaged = bytearray(valid)
    spots = st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=64))
    for at, junk in data.draw(st.lists(spots, min_size=1, max_size=8)):
        damaged[at : at + len(junk)] = junk
    read_or_refuse(bytes(damaged[: len(valid)]))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@FUZZ
@given(
    key=st.sampled_from(["format", "version", "start_time", "end_time", "status", "metadata"]),
    value=JSON.map(json.dumps) | st.text(max_size=12),
)
def test_run_metadata_rewritten(valid, key, value):
    read_or_refuse(rewritten(valid, "UPDATE meta SET value = ? WHERE key = ?", value, key))


@FUZZ
@given(
    column=st.sampled_from(["name", "shape", "dtype"]),
    value=JSON.map(json.dumps) | st.sampled_from(["<f8", "|b1", "<i4", "O", "V3", "<U2"]),
)
def test_field_layout_rewritten(valid, column, value):
    read_or_refuse(rewritten(valid, f"UPDATE fields SET {column} = ? WHERE idx = 1", value))


@FUZZ
@given(st.integers(VERSION + 1, 2**70) | st.sampled_from([0, -1, True, None, "1", 1.0, [1]]))
def test_a_newer_or_foreign_version_is_named(valid, version):
    data = rewritten(valid, "UPDATE meta SET value = ? WHERE key = 'version'", json.dumps(version))
    with tempfile.TemporaryDirectory() as runs:
        (Path(runs) / "run").mkdir()
        (Path(runs) / "run" / "run.sqlite").write_bytes(data)
        newer = isinstance(version, int) and version > VERSION
        named = re.escape(
            f"run format version {version}, written by a newer lmd4ml; this one reads versions "
            f"up to {VERSION}"
            if newer
            else f"run format version {version!r} is none that lmd4ml wrote"
        )
        with pytest.raises(RunStoreError, match=named):
            load_run(Path(runs) / "run")
        (listed,) = list_runs(runs)
        assert listed["status"] == "damaged" and re.search(named, listed["error"])


@FUZZ
@given(
    statement=st.sampled_from(
        [
            "UPDATE c0 SET data = ? WHERE block = 1",
            "UPDATE c1 SET steps = ? WHERE block = 4",
            "UPDATE m0 SET data = ? WHERE level = 0 AND block = 9",
            "UPDATE m1 SET data = ? WHERE level = 1 AND block = 0",
            "UPDATE m2 SET data = ? WHERE level = 3",
            "UPDATE meta SET value = ? WHERE key = 'summaries'",
        ]
    ),
    value=st.binary(max_size=200) | JSON.map(json.dumps),
)
def test_summaries_rewritten(valid, statement, value):
    read_or_refuse(rewritten(valid, statement, value))


@pytest.mark.parametrize(
    "statement",
    ["DELETE FROM c0 WHERE block = 2", "DELETE FROM m1 WHERE block = 3", "DROP TABLE m0",
     "UPDATE c1 SET block = 7 WHERE block = 4",
     "UPDATE m0 SET level = 9 WHERE level = 0 AND block = 3"],
)  # fmt: skip
def test_summaries_with_rows_missing(valid, statement):
    read_or_refuse(rewritten(valid, statement))


def test_the_valid_file_reads(valid):
    assert read_or_refuse(valid)
    with tempfile.TemporaryDirectory() as runs:
        (Path(runs) / "run.sqlite").write_bytes(valid)
        assert {"c0", "m0", "c2", "m2"} <= {
            name
            for (name,) in sqlite3.connect(Path(runs) / "run.sqlite").execute(
                "SELECT name FROM sqlite_master"
            )
        }  # the summaries are there to be damaged
