"""A shared-memory ring of metric records: one training process writes, dashboards read live.

The segment holds a header (magic, format version, capacity, record size, the layout as JSON,
a checksum of these, and the writer's count of records written) and then ``capacity``
fixed-size slots. A slot is a checksum, the record's global index (uint64), the step (int64),
a presence flag per field and every field's bytes at the offsets the layout gives, so a reader
attaches knowing only the segment name.

Torn records are excluded by the checksum: for the record with global index i the writer
builds the slot's bytes in private memory (i, step, flags, fields), puts in front of them
their 128-bit BLAKE2b digest, copies the whole slot into the ring and only then raises the
count to i + 1. A reader copies the slots it wants into private memory and keeps the copy of
slot i mod capacity as record i only when the digest of the copy's bytes equals the copy's
checksum and the copy's index is i.

Why this holds on any memory model (x86's TSO, ARM's or POWER's weak ordering), with no
fences, which Python cannot issue: the reader decides from its private copy alone, so the
order in which the writer's stores become visible to it does not matter. Each byte of the
copy is one that some write stored there (or the slot's initial zero). Either every byte is
from the write of record i, and the copy is that record; or the copy mixes writes, holds a
slot not yet written, or holds another record j intact. A mix, or zeros, matches its checksum
only if BLAKE2b collides on it (probability 2⁻¹²⁸); an intact record j carries index j ≠ i,
and an index patched to i alone no longer matches the digest, which covers it. The index in
the digest is what rejects an intact old record read under a newer count. The count is one
aligned 8-byte word, which x86-64 and AArch64 load and store whole; it only tells a reader
where to look.

What a reader does with a rejected record: if the writer has moved on to its slot (its index
is at most the count, read again after the copy, minus ``capacity``) it was lapped, and the
read starts after the newest such record, counting what it skipped as ``missed``; otherwise
the record is not yet visible (weakly ordered hardware can show the count before the slot),
and the read ends before it, so that the next read, starting there, tries it again. What a
reader gets is therefore contiguous and in order.

Cleanup: the segment has mode 0600 and ``RingWriter.close`` unlinks it. For a writer that dies
without closing (SIGKILL included) a watchdog process, started by the writer, unlinks it when
its pipe from the writer closes; the pipe is inherited by children forked from the writer, so
then the segment outlives a killed writer until they exit too. Segments are opened with
``shm_open`` and ``mmap`` rather than ``multiprocessing.shared_memory``, which (before Python
3.13) registers every attach with the resource tracker to be unlinked at exit: readers would
have to unregister, and the tracker keeps one entry per name for all the processes sharing it,
so a reader in the writer's process or family (a notebook plotting its own run) would cancel
the writer's registration, and two such readers make the tracker raise.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import json
import mmap
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"LMD4RING"
VERSION = 2  # 1 was a seqlock per slot, correct under x86 ordering only
_COUNT_OFFSET = 64  # the writer's count gets a cache line of its own
_LAYOUT_OFFSET = 128
_HEADER = np.dtype(
    [("magic", "S8"), ("version", "<u4"), ("layout_size", "<u4"), ("capacity", "<u8"),
     ("record_size", "<u8"), ("data_offset", "<u8"), ("checksum", "u1", (16,))]
)  # fmt: skip
_DESCRIBED = slice(8, 40)  # what the header's checksum covers, with the layout: version…offset
RESERVED_FIELDS = ("checksum", "seq", "step", "present")
"""The names a slot gives its own parts, which no field may take."""
_CHECKSUM_BYTES = 16

# Run with -I -S so that it starts in milliseconds and imports nothing of the user's.
_WATCHDOG = """
import sys, _posixshmem
if sys.stdin.buffer.read() != b"closed":
    try:
        _posixshmem.shm_unlink("/" + sys.argv[1])
    except FileNotFoundError:
        pass
"""

Fields = Mapping[str, tuple[tuple[int, ...], Any]]


class Batch(NamedTuple):
    """The records one ``RingReader.read`` returns, global indices [start, next); ``next`` is
    the ``since`` of the next read, and ``missed`` counts those from ``since`` that were lapped."""

    start: int
    next: int
    missed: int
    steps: np.ndarray
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]  # per field, bool (n,): was it tracked at that step


def ring_name(run_id: str, where: str = "") -> str:
    """The shared-memory name for a run: readable when short and plain, else hashed.

    ``where`` (the run directory's full path) is hashed in: shared memory is one namespace for
    the whole machine, and two runs of one name in different runs directories would otherwise
    claim the same ring. macOS allows 31 characters in a POSIX shm name, so a hashed name
    keeps an 8-character prefix of ``run_id``.

    Example:
      >>> ring_name("run-7"), ring_name("a/very/long/experiment/name")
      ('lmd4ml_run-7', 'lmd4ml_a_very_l_16e559ee7b5c')
      >>> ring_name("run-7", "/tmp/a/run-7") != ring_name("run-7", "/tmp/b/run-7")
      True
    """
    if not where and re.fullmatch(r"[A-Za-z0-9_.-]{1,16}", run_id):
        return f"lmd4ml_{run_id}"
    key = f"{where}\0{run_id}" if where else run_id
    digest = blake2b(key.encode(), digest_size=6).hexdigest()
    return f"lmd4ml_{re.sub(r'[^A-Za-z0-9_.-]', '_', run_id[:8])}_{digest}"


def record_dtype(fields: Fields) -> np.dtype:
    """The slot layout: checksum (16 bytes), seq (the record's global index, uint64), step
    (int64), a presence flag per field, then each field at its dtype's alignment.

    Example:
      >>> dt = record_dtype({"loss": ((), "float32"), "hist": ((3,), "int32")})
      >>> {name: dt.fields[name][1] for name in dt.names}, dt.itemsize
      ({'checksum': 0, 'seq': 16, 'step': 24, 'present': 32, 'loss': 36, 'hist': 40}, 56)
    """
    names, offsets = list(RESERVED_FIELDS), [0, 16, 24, 32]
    formats = [("u1", (_CHECKSUM_BYTES,)), "<u8", "<i8", ("?", (len(fields),))]
    end = 32 + len(fields)
    for name, (shape, dtype) in fields.items():
        if name in RESERVED_FIELDS:
            raise ValueError(f"field name {name!r} is reserved by the ring")
        dtype = np.dtype(dtype)
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"field {name!r}: {dtype} is not a plain numeric dtype")
        end += -end % dtype.alignment
        names.append(name)
        formats.append((dtype.newbyteorder("<"), tuple(shape)))
        offsets.append(end)
        end += dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    itemsize = end + -end % 8  # keeps every slot's seq 8-byte aligned
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize})


def _checksum(body: bytes | memoryview) -> bytes:
    """The 128-bit BLAKE2b digest a slot starts with, of the rest of the slot (index, step,
    flags, fields); the header's, of its fields and the layout."""
    return blake2b(body, digest_size=_CHECKSUM_BYTES).digest()


def _intact(slots: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Which rows of ``slots`` (a private copy, uint8 (n, record size)) hold, whole, the
    record whose global index ``index`` gives: their checksum matches and they carry it.

    Example:
      >>> dt = record_dtype({"x": ((), "float32")})
      >>> slot = np.zeros(1, dt).view(np.uint8).reshape(1, -1)
      >>> slot[0, :16] = np.frombuffer(_checksum(slot[0, 16:].tobytes()), np.uint8)
      >>> _intact(slot, np.array([0])).tolist(), _intact(slot, np.array([4])).tolist()
      ([True], [False])
    """
    flat, size = memoryview(np.ascontiguousarray(slots).reshape(-1)), slots.shape[1]
    starts = range(0, len(flat), size)
    digests = b"".join([_checksum(flat[k + _CHECKSUM_BYTES : k + size]) for k in starts])
    expected = np.frombuffer(digests, np.uint8).reshape(-1, _CHECKSUM_BYTES)
    seq = slots[:, 16:24].copy().view("<u8")[:, 0]
    return (expected == slots[:, :_CHECKSUM_BYTES]).all(axis=1) & (seq == index)


def _layout(dtype: np.dtype) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(dtype[n].shape), "dtype": dtype[n].base.str,
         "offset": dtype.fields[n][1]}
        for n in dtype.names[len(RESERVED_FIELDS):]
    ]  # fmt: skip


def _parse_header(
    name: str, buf: mmap.mmap
) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], np.dtype, int, int]:
    """The fields, record dtype, capacity and data offset a ring's header describes.

    Whatever the bytes (a damaged segment, another program's, a newer format), the answer is
    a ``ValueError`` that says what is wrong; the header's checksum makes any damage to it
    or to the layout one.
    """
    if buf[:8] != MAGIC:
        raise ValueError(f"shared memory {name!r} is not an lmd4ml ring")
    header = np.ndarray((), _HEADER, buf).copy()  # a copy holds no export of buf
    if header["version"] != VERSION:
        upgrade = ": upgrade lmd4ml to read it" if header["version"] > VERSION else ""
        raise ValueError(
            f"ring {name!r} has format version {header['version']}, this lmd4ml reads "
            f"version {VERSION}{upgrade}"
        )
    layout_size, capacity, data_offset = (
        int(header[k]) for k in ("layout_size", "capacity", "data_offset")
    )
    text = buf[_LAYOUT_OFFSET : _LAYOUT_OFFSET + layout_size]
    if _checksum(buf[_DESCRIBED] + text) != header["checksum"].tobytes():
        raise ValueError(f"ring {name!r} has a damaged header")
    try:
        layout = json.loads(text)
        fields = {f["name"]: (tuple(f["shape"]), np.dtype(f["dtype"])) for f in layout}
        dtype = record_dtype(fields)
        same = dtype.itemsize == header["record_size"] and _layout(dtype) == layout
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):  # any JSON at all
        same = False
    if not same:
        raise ValueError(f"ring {name!r} has a layout this lmd4ml does not produce")
    if len(buf) < data_offset + capacity * dtype.itemsize:
        raise ValueError(f"ring {name!r} is shorter than its header says")
    return fields, dtype, capacity, data_offset


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def _map(name: str, size: int = 0) -> mmap.mmap:
    """Map segment ``name``: created with ``size`` bytes and mode 0600, else read-only."""
    create = size > 0
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if create else os.O_RDONLY
    fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        else:
            size = os.fstat(fd).st_size
            if size < _LAYOUT_OFFSET:
                raise ValueError(f"shared memory {name!r} is not an lmd4ml ring")
        return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
    except OSError:
        if create:
            _unlink(name)
        raise
    finally:
        os.close(fd)


class RingWriter:
    """Creates the ring ``name`` and appends records to it; ``close`` (or exit) removes it.

    ``fields`` maps each metric name to ``(shape, dtype)``; ``write`` takes a value for every
    field, cast within its kind (float64 to a float32 field, not float to int).

    Example:
      >>> with RingWriter(ring_name("doc"), {"loss": ((), "float32")}, capacity=8) as w:
      ...     for step in range(3):
      ...         w.write(step, {"loss": 1.0 / (step + 1)})
      ...     with RingReader(w.name) as r:
      ...         batch = r.read(since=1)
      >>> batch.start, batch.next, batch.missed, batch.steps.tolist(), batch.values["loss"].tolist()
      (1, 3, 0, [1, 2], [0.5, 0.3333333432674408])
    """

    def __init__(self, name: str, fields: Fields, capacity: int = 4096):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        dtype = record_dtype(fields)
        layout = json.dumps(_layout(dtype)).encode()
        data_offset = _LAYOUT_OFFSET + len(layout)
        data_offset += -data_offset % 64
        size = data_offset + capacity * dtype.itemsize
        try:
            buf = _map(name, size)
        except FileExistsError:
            raise FileExistsError(
                f"shared memory {name!r} exists: a live run with the same id, or one that left "
                f"it behind (remove /dev/shm/{name})"
            ) from None
        self.name = name
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, name],
            stdin=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C at the terminal must not kill it before the writer
        )
        buf[_LAYOUT_OFFSET:data_offset] = layout.ljust(data_offset - _LAYOUT_OFFSET, b" ")
        self._count = np.ndarray((1,), "<u8", buf, _COUNT_OFFSET)
        self._slots = np.ndarray((capacity, dtype.itemsize), np.uint8, buf, data_offset)
        # Each record is built here, in private memory, then copied to its slot whole.
        record = np.zeros(1, dtype)
        self._record = record.view(np.uint8)
        self._view = memoryview(self._record)
        self._seq, self._steps = record["seq"], record["step"]
        self._flags = memoryview(record["present"].view(np.uint8)[0])
        self._columns = {n: record[n] for n in fields}
        self._dtypes = {n: dtype[n].base for n in fields}
        self._shapes = {n: dtype[n].shape for n in fields}
        self._castable: set[tuple[str, np.dtype]] = set()
        self._capacity, self._written = capacity, 0
        header = np.ndarray((), _HEADER, buf)
        header[()] = (b"", VERSION, len(layout), capacity, dtype.itemsize, data_offset, 0)
        header["checksum"] = np.frombuffer(_checksum(buf[_DESCRIBED] + layout), np.uint8)
        header["magic"] = MAGIC  # last: a reader never takes a half-written header for valid
        # Last, so that garbage collection releases the views above before closing the mapping.
        self._buf = buf

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """Append the record for ``step``: an array in its shape for each field tracked then.

        Fields left out are marked absent (and zeroed) in the record.
        """
        # The record is private until copied out below, so it is filled while the values are
        # checked: a bad value leaves nothing to undo.
        for k, (name, shape) in enumerate(self._shapes.items()):
            column = self._columns[name]
            if name not in values:
                self._flags[k] = column[0] = 0
                continue
            value = np.asarray(values[name])
            if value.shape != shape:
                raise ValueError(f"field {name!r}: shape {value.shape}, expected {shape}")
            if (name, value.dtype) not in self._castable:  # can_cast is most of a write's cost
                dtype = self._dtypes[name]
                if not np.can_cast(value.dtype, dtype, "same_kind"):
                    raise ValueError(f"field {name!r}: cannot cast {value.dtype} to {dtype}")
                self._castable.add((name, value.dtype))
            self._flags[k] = 1
            column[0] = value
        if not values.keys() <= self._shapes.keys():
            raise ValueError(f"unknown fields {sorted(set(values) - set(self._shapes))}")
        i = self._written
        self._seq[0] = i
        self._steps[0] = step
        self._view[:_CHECKSUM_BYTES] = _checksum(self._view[_CHECKSUM_BYTES:])
        self._slots[i % self._capacity] = self._record
        self._count[0] = self._written = i + 1

    def close(self) -> None:
        """Unlink the segment (readers attached keep their mapping) and stop the watchdog."""
        if self._watchdog.stdin.closed:
            return
        # Release every view of the buffer, or closing the mapping fails.
        self._slots = self._count = None
        self._buf.close()
        _unlink(self.name)
        self._watchdog.stdin.write(b"closed")
        self._watchdog.stdin.close()
        # Reaped in the background: waiting for a fresh interpreter to start and exit would
        # add about 10 ms to every close.
        threading.Thread(target=self._watchdog.wait, daemon=True).start()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingReader:
    """Attaches to the ring ``name`` (in any process) and reads what was written since an index.

    ``fields`` maps each field to ``(shape, dtype)`` as the writer declared them.
    """

    def __init__(self, name: str):
        try:
            buf = _map(name)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no lmd4ml ring {name!r} in shared memory: the run has ended or not started, "
                "or another user owns it"
            ) from None
        try:
            self.fields, dtype, capacity, data_offset = _parse_header(name, buf)
        except ValueError:
            buf.close()
            raise
        self.name, self._capacity, self._dtype = name, capacity, dtype
        self._count = np.ndarray((1,), "<u8", buf, _COUNT_OFFSET)
        self._slots = np.ndarray((capacity, dtype.itemsize), np.uint8, buf, data_offset)
        self._buf = buf  # last, as in RingWriter

    def read(self, since: int = 0) -> Batch:
        """The records with global index ≥ ``since`` still in the ring, oldest first, up to
        the first one not yet visible whole (read it again from ``next``)."""
        written = int(self._count[0])
        if not 0 <= since <= written:
            raise ValueError(f"since={since} is outside the {written} records written")
        first = max(since, written - self._capacity)
        index = np.arange(first, written, dtype=np.uint64)
        copy = self._slots[index % np.uint64(self._capacity)]  # private: checked, then used
        rejected = index[~_intact(copy, index)]
        # Lapped: the writer has moved on to their slot (the count is read again, after the copy).
        lapped = rejected + np.uint64(self._capacity) <= self._count[0]
        start = int(rejected[lapped][-1]) + 1 if lapped.any() else first
        end = int(rejected[~lapped][0]) if (~lapped).any() else written
        records = copy[start - first : end - first].view(self._dtype)[:, 0]
        values = {n: np.ascontiguousarray(records[n]) for n in self.fields}
        present = dict(zip(self.fields, np.ascontiguousarray(records["present"].T), strict=True))
        steps = np.ascontiguousarray(records["step"])
        return Batch(start, end, start - since, steps, values, present)

    def close(self) -> None:
        """Detach; the segment stays for the writer and other readers. Idempotent."""
        self._count = self._slots = None
        self._buf.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
