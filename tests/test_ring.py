"""The shared-memory ring: round trips, torn-free reads under a full-speed writer, lapping,
records damaged behind the count rejected, cleanup (close, SIGKILL), attach errors, and
damaged or foreign segments fuzzed, with writers and readers in separate processes."""

import json
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmd4ml.telemetry.ring import MAGIC, VERSION, RingReader, RingWriter, ring_name
from lmd4ml.telemetry.ring import _checksum as ring_checksum

SPAWN = mp.get_context("spawn")
TIMEOUT = 60

STRESS_RECORDS = 100_000
STRESS_CAPACITY = 64
STRESS_FIELDS = {"x": ((), np.float64), "hist": ((100,), np.int32), "check": ((), np.uint64)}
_WEIGHTS = np.arange(1, 201, 2, dtype=np.uint64)


@pytest.fixture
def name():
    """A fresh segment name, removed after the test whatever happened."""
    name = ring_name(f"t{uuid.uuid4().hex[:12]}")
    yield name
    Path("/dev/shm", name).unlink(missing_ok=True)


def _checksum(steps: np.ndarray, xs: np.ndarray, hists: np.ndarray) -> np.ndarray:
    """Mixes every field of a record, so parts of two different records disagree with it."""
    h = steps.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= xs.view(np.uint64)
    return h + (hists.astype(np.uint64) * _WEIGHTS).sum(axis=-1)


def _read_in_child(name, since, queue):
    with RingReader(name) as reader:
        queue.put((reader.fields, reader.read(since)))


def _stress_writer(name, created, start, done):
    rng = np.random.default_rng(0)
    pool = 997  # prime, so records a ring's length apart hold different values
    xs = rng.standard_normal(pool)
    hists = rng.integers(-(2**31), 2**31, (pool, 100), dtype=np.int32)
    steps = np.arange(STRESS_RECORDS)
    checks = _checksum(steps, xs[steps % pool], hists[steps % pool])
    with RingWriter(name, STRESS_FIELDS, capacity=STRESS_CAPACITY) as writer:
        created.set()
        start.wait()
        for step in range(STRESS_RECORDS):
            k = step % pool
            writer.write(step, {"x": xs[k], "hist": hists[k], "check": checks[step]})
        done.set()


def _stress_reader(name, created, start, done, results):
    created.wait()
    errors, read, missed, lapped, polls, since = [], 0, 0, 0, 0, 0
    with RingReader(name) as reader:
        start.wait()
        while True:
            finished = done.is_set()  # before reading: that read then sees every record
            batch = reader.read(since)
            n = len(batch.steps)
            if batch.start != since + batch.missed or batch.next != batch.start + n:
                errors.append(f"since {since}: start {batch.start}, next {batch.next}, n {n}")
            # steps are the records' indices here: this checks they strictly increase too
            if not np.array_equal(batch.steps, np.arange(batch.start, batch.next)):
                errors.append(f"steps {batch.steps[:3]}... from {batch.start}")
            check = _checksum(batch.steps, batch.values["x"], batch.values["hist"])
            torn = np.count_nonzero(check != batch.values["check"])
            if torn:
                errors.append(f"{torn} torn records in [{batch.start}, {batch.next})")
            read, missed, lapped = read + n, missed + batch.missed, lapped + (batch.missed > 0)
            since = batch.next
            if finished:
                break
            polls += 1
            if polls % 8 == 0:
                time.sleep(0.001)  # long enough for the writer to lap this reader
    results.put({"read": read, "missed": missed, "lapped": lapped, "errors": errors})


def test_round_trip_across_processes(name):
    fields = {
        "loss": ((), np.float32),
        "count": ((), np.int64),
        "dead": ((), np.bool_),
        "hist": ((100,), np.int32),
        "layer/w": ((2, 3), np.float64),
        "bytes": ((3,), np.uint8),
    }
    rng = np.random.default_rng(1)
    records = [
        {
            "loss": rng.standard_normal(dtype=np.float32),
            "count": rng.integers(2**40),
            "dead": bool(step % 2),
            "hist": rng.integers(0, 1000, 100, dtype=np.int32),
            "layer/w": rng.standard_normal((2, 3)),
            "bytes": rng.integers(0, 256, 3, dtype=np.uint8),
        }
        for step in range(5)
    ]
    with RingWriter(name, fields, capacity=16) as writer:
        assert writer.name == name
        for step, values in enumerate(records):
            writer.write(10 * step, values)
        queue = SPAWN.Queue()
        child = SPAWN.Process(target=_read_in_child, args=(name, 1, queue))
        child.start()
        got_fields, batch = queue.get(timeout=TIMEOUT)
        child.join(TIMEOUT)
        assert child.exitcode == 0
        # a reader's exit must leave the segment to the writer
        assert Path("/dev/shm", name).exists()
        with RingReader(name) as reader:
            assert reader.read(1).steps.tolist() == batch.steps.tolist()
    assert got_fields == {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in fields.items()}
    assert (batch.start, batch.next, batch.missed) == (1, 5, 0)
    assert batch.steps.dtype == np.int64 and batch.steps.tolist() == [10, 20, 30, 40]
    for key, (shape, dtype) in fields.items():
        assert batch.values[key].dtype == dtype and batch.values[key].shape == (4, *shape)
        np.testing.assert_array_equal(batch.values[key], [r[key] for r in records[1:]])


def test_stress_many_readers_one_writer(name):
    created, start, done = SPAWN.Event(), SPAWN.Barrier(4), SPAWN.Event()
    results = SPAWN.Queue()
    writer = SPAWN.Process(target=_stress_writer, args=(name, created, start, done))
    readers = [
        SPAWN.Process(target=_stress_reader, args=(name, created, start, done, results))
        for _ in range(3)
    ]
    for process in [writer, *readers]:
        process.start()
    outcomes = [results.get(timeout=TIMEOUT) for _ in readers]
    for process in [writer, *readers]:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    for outcome in outcomes:
        assert outcome["errors"] == []
        assert outcome["read"] + outcome["missed"] == STRESS_RECORDS
        assert outcome["read"] > 0 and outcome["lapped"] > 0, outcome
    assert not Path("/dev/shm", name).exists()


def test_lapped_reader_counts_missed_records(name):
    with RingWriter(name, {"x": ((), np.float32)}, capacity=4) as writer, RingReader(name) as r:
        for step in range(10):
            writer.write(step, {"x": step})
        batch = r.read()
        assert (batch.start, batch.next, batch.missed) == (6, 10, 6)
        assert batch.steps.tolist() == [6, 7, 8, 9]
        assert r.read(8).steps.tolist() == [8, 9] and r.read(8).missed == 0
        empty = r.read(10)
        assert (empty.start, empty.next, empty.missed, empty.steps.shape) == (10, 10, 0, (0,))
        assert empty.values["x"].shape == (0,)
        for step in range(10, 13):
            writer.write(step, {"x": step})
        assert r.read(10).steps.tolist() == [10, 11, 12]
        batch = r.read(7)
        assert (batch.start, batch.missed, batch.values["x"].tolist()) == (9, 2, [9, 10, 11, 12])
        with pytest.raises(ValueError, match="since=14"):
            r.read(14)


def test_write_rejects_bad_values_and_marks_absent_fields(name):
    fields = {"loss": ((), np.float32), "hist": ((4,), np.int32)}
    with RingWriter(name, fields, capacity=8) as writer, RingReader(name) as reader:
        good = {"loss": np.float64(0.5), "hist": np.arange(4, dtype=np.int64)}  # same-kind casts
        writer.write(0, good)
        with pytest.raises(ValueError, match=r"'hist': shape \(5,\)"):
            writer.write(1, {**good, "hist": np.zeros(5)})
        with pytest.raises(ValueError, match="'hist': cannot cast float64"):
            writer.write(1, {**good, "hist": np.zeros(4)})
        with pytest.raises(ValueError, match=r"unknown fields.*'extra'"):
            writer.write(1, {**good, "extra": 1.0})
        writer.write(1, good)
        writer.write(2, {"loss": 2.0})  # a step that tracked only some fields
        batch = reader.read()
        assert (batch.start, batch.missed, batch.steps.tolist()) == (0, 0, [0, 1, 2])
        assert batch.present["loss"].tolist() == [True, True, True]
        assert batch.present["hist"].tolist() == [True, True, False]
        assert batch.values["hist"][2].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="'step' is reserved"):
        RingWriter(name, {"step": ((), np.int64)})
    with pytest.raises(ValueError, match="capacity"):
        RingWriter(name, {"x": ((), np.float32)}, capacity=0)


def test_close_unlinks_private_segment(name):
    path = Path("/dev/shm", name)
    writer = RingWriter(name, {"x": ((), np.float32)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match=name):
        RingWriter(name, {"x": ((), np.float32)})
    reader = RingReader(name)
    reader.close()
    reader.close()
    assert path.exists()
    writer.close()
    assert not path.exists()
    writer.close()
    with RingWriter(name, {"x": ((), np.float32)}):
        assert path.exists()
    assert not path.exists()


def test_sigkill_of_writer_removes_segment(name):
    script = (
        "import sys, time\n"
        "from lmd4ml.telemetry.ring import RingWriter\n"
        "writer = RingWriter(sys.argv[1], {'x': ((), 'float32')})\n"
        "print(writer.name, flush=True)\n"
        "time.sleep(TIMEOUT)\n"
    ).replace("TIMEOUT", str(TIMEOUT))
    path = Path("/dev/shm", name)
    with subprocess.Popen(
        [sys.executable, "-c", script, name], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout.readline().strip() == name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.kill(process.pid, signal.SIGKILL)
        process.wait(TIMEOUT)
    deadline = time.monotonic() + 5
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not path.exists()


def test_attach_errors(name):
    with pytest.raises(FileNotFoundError, match=f"no lmd4ml ring '{name}'"):
        RingReader(name)
    path = Path("/dev/shm", name)
    for content in [bytes(4096), b"tiny", MAGIC[:4] + bytes(4092)]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match="is not an lmd4ml ring"):
            RingReader(name)
    path.write_bytes(MAGIC + np.uint32(99).tobytes() + bytes(4084))
    with pytest.raises(ValueError, match="format version 99"):
        RingReader(name)


# ------------------------------------------------------------- records damaged behind the count

SMALL = {"x": ((), np.float64), "h": ((3,), np.int32)}


def _small_record(i: int) -> dict:
    return {"x": np.float64(i) / 7, "h": np.array([i, -i, 2 * i], np.int32)}


def _segment(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The ring's slots (uint8, capacity × record size) and count, writable, as another
    process mapping the segment sees them (header offsets: capacity 16, record size 24,
    data 32, count 64)."""
    raw = np.memmap(Path("/dev/shm", name), np.uint8, "r+")
    capacity, size, offset = (int(raw[o : o + 8].view("<u8")[0]) for o in (16, 24, 32))
    return raw[offset : offset + capacity * size].reshape(capacity, size), raw[64:72].view("<u8")


def _assert_written(batch) -> None:
    """Every record a read returned is exactly the one written with its index."""
    assert batch.steps.tolist() == [10 * i for i in range(batch.start, batch.next)]
    for key in SMALL:
        expected = [_small_record(i)[key] for i in range(batch.start, batch.next)]
        np.testing.assert_array_equal(batch.values[key], np.reshape(expected, (-1, *SMALL[key][0])))


def _flip_byte(slots, count, old):
    slots[3 % 4, 40] ^= 1  # record 3's x
    return 3


def _torn(at):
    def corrupt(slots, count, old):
        slots[5 % 4, at:] = old[5 % 4, at:]  # record 5's first bytes, record 1's after them
        return 5

    return corrupt


def _old_record_intact(slots, count, old):
    slots[5 % 4] = old[5 % 4]  # record 1 whole, checksum included, where 5 belongs
    return 5


def _old_record_renumbered(slots, count, old):
    slots[5 % 4] = old[5 % 4]
    slots[5 % 4, 16:24] = np.array([5], "<u8").view(np.uint8)  # its index patched to 5
    return 5


def _count_before_record(slots, count, old):
    count[0] = 7  # record 6 announced while its slot still holds record 2
    return 6


def _lapped(slots, count, old):
    slots[2 % 4, 40] ^= 1  # the oldest record, whose slot the next write takes
    return 2


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_flip_byte, (2, 3)),
        (_torn(8), (2, 5)),  # half a checksum
        (_torn(24), (2, 5)),  # the new checksum and index, the old payload
        (_torn(44), (2, 5)),  # mid-field
        (_old_record_intact, (2, 5)),
        (_old_record_renumbered, (2, 5)),
        (_count_before_record, (3, 6)),
        (_lapped, (3, 6)),
    ],
)
def test_records_damaged_behind_the_count_are_rejected(name, corrupt, expected):
    """Whatever the order in which another CPU sees a write's bytes, a reader never takes a
    record that is not whole: a later record's start over an older one's end, the checksum
    and index of a record without its payload, an intact older record where a newer one
    belongs. It stops before such a record (to read it again) unless it was lapped."""
    with RingWriter(name, SMALL, capacity=4) as writer, RingReader(name) as reader:
        for i in range(4):
            writer.write(10 * i, _small_record(i))
        slots, count = _segment(name)
        old = slots.copy()  # records 0-3
        for i in range(4, 6):
            writer.write(10 * i, _small_record(i))
        damaged = corrupt(slots, count, old)
        batch = reader.read(2)
        assert damaged not in range(batch.start, batch.next)
        assert (batch.start, batch.next) == expected
        assert batch.missed == batch.start - 2
        _assert_written(batch)
        if damaged == 6:  # the record arrives: the next read, from where this one ended, has it
            count[0] = 6
            writer.write(60, _small_record(6))
            assert reader.read(batch.next).steps.tolist() == [60]


# ------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=40, derandomize=True, deadline=None)


def _attach_and_read(content: bytes) -> object:
    """What a reader makes of a segment holding ``content``: a batch, or a ``ValueError``
    that names the segment (any other exception fails the test)."""
    name = ring_name(f"z{uuid.uuid4().hex[:12]}")
    path = Path("/dev/shm", name)
    path.write_bytes(content)
    try:
        with RingReader(name) as reader:
            return reader.read()
    except ValueError as error:
        assert name in str(error), error
        return error
    finally:
        path.unlink()


def _ring_bytes(records: int = 6) -> bytes:
    """A segment's bytes after ``records`` writes to a ring of 4 of :data:`SMALL`."""
    name = ring_name(f"f{uuid.uuid4().hex[:12]}")
    with RingWriter(name, SMALL, capacity=4) as writer:
        for i in range(records):
            writer.write(10 * i, _small_record(i))
        return Path("/dev/shm", name).read_bytes()


RING = _ring_bytes()


@FUZZ
@given(st.binary(max_size=1024), st.booleans())
def test_fuzz_random_bytes_are_refused(content, magic):
    assert isinstance(_attach_and_read((MAGIC if magic else b"") + content), ValueError)


@FUZZ
@given(st.integers(0, len(RING) - 1))
def test_fuzz_truncated_segment_is_refused(size):
    assert isinstance(_attach_and_read(RING[:size]), ValueError)


@FUZZ
@given(st.integers(VERSION + 1, 2**32 - 1))
def test_fuzz_newer_version_is_named(version):
    error = _attach_and_read(RING[:8] + np.uint32(version).tobytes() + RING[12:])
    assert f"format version {version}, this lmd4ml reads version {VERSION}: upgrade" in str(error)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(RING) - 1), st.integers(1, 255)), max_size=6))
def test_fuzz_damaged_ring_is_refused_or_read_right(flips):
    """Bytes flipped anywhere (header, layout, count, records): refused with a clear error,
    or read with the damaged records left out and every other exactly as written."""
    content = np.frombuffer(RING, np.uint8).copy()
    for at, bits in flips:
        content[at] ^= bits
    if not isinstance(batch := _attach_and_read(content.tobytes()), ValueError):
        _assert_written(batch)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
FIELD = st.fixed_dictionaries(
    {"name": st.text(max_size=4), "shape": st.lists(st.integers(-2, 2**40), max_size=3),
     "dtype": st.sampled_from(["<f4", "<i8", "|b1", "|O", "|V8", "float", "nonsense"]),
     "offset": st.integers(-8, 2**40)}
)  # fmt: skip


@FUZZ
@given(JSON | st.lists(FIELD, max_size=3))
def test_fuzz_layout_is_refused(layout):
    """Any JSON as the layout, under a header whose checksum matches it (fields of odd names,
    shapes and dtypes, or none, or no list at all): a clear error, never another exception."""
    text = json.dumps(layout).encode()
    described = RING[8:12] + np.uint32(len(text)).tobytes() + RING[16:40]
    header = RING[:8] + described + ring_checksum(described + text) + RING[56:128]
    assert isinstance(_attach_and_read(header + text + RING[128 + len(text) :]), ValueError)
