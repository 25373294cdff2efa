"""Export a stored run to CSV, JSON or TensorBoard event files.

Example:
  >>> import tempfile, numpy as np
  >>> from lmd4ml.telemetry.store import RunWriter, load_run
  >>> out = tempfile.mkdtemp()
  >>> with RunWriter(out, {}, {"loss": ((), "float32"), "hist": ((2,), "int32")}) as w:
  ...     w.append(0, {"loss": 0.5, "hist": [3, 1]})
  ...     w.append(1, {"loss": 0.25})
  >>> to_csv(load_run(out), f"{out}/run.csv")
  >>> print(open(f"{out}/run.csv").read(), end="")
  step,loss,hist[0],hist[1]
  0,0.5,3,1
  1,0.25,,
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import struct
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from lmd4ml.telemetry.store import Run


def _element_names(key: str, shape: tuple[int, ...]) -> list[str]:
    """Column or tag names of a field's elements: ``key``, ``key[i]``, ``key[i,j]``, …"""
    if not shape:
        return [key]
    return [f"{key}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _as_text(values: np.ndarray) -> np.ndarray:
    # Booleans as 0/1 so that every cell parses as a number; floats come out as the shortest
    # text that reads back to the same value of their own dtype.
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    return values.astype(str)


def to_csv(run: Run, path: str | os.PathLike) -> None:
    """Write one row per step: ``step``, then every element of every field.

    A scalar field is one column named after it; an array field is flattened in C order into
    columns ``name[i]`` (``name[i,j]`` for 2-D, …). Booleans are written as 0/1, floats as the
    shortest text that reads back (as their dtype) to the same value, ``nan``/``inf`` as such;
    a field not tracked at a step leaves its cells empty.
    """
    steps = run.steps()
    header = ["step"]
    blocks = [steps.astype(str)[:, None].astype(object)]
    for key in run.keys:
        field_steps, values = run[key]
        header += _element_names(key, values.shape[1:])
        block = np.full((len(steps), int(np.prod(values.shape[1:]))), "", dtype=object)
        block[np.searchsorted(steps, field_steps)] = _as_text(values.reshape(len(values), -1))
        blocks.append(block)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(np.concatenate(blocks, axis=1).tolist())


def to_json(run: Run, path: str | os.PathLike) -> None:
    """Write ``{"metadata": ..., "fields": {name: {"shape", "dtype", "steps", "values"}}}``.

    ``values`` holds one (nested) list per step in ``steps``. Non-finite floats are written as
    ``NaN``/``Infinity``, which Python's ``json`` reads back but strict JSON parsers reject.
    """
    fields = {}
    for key in run.keys:
        steps, values = run[key]
        fields[key] = {
            "shape": list(values.shape[1:]),
            "dtype": values.dtype.name,
            "steps": steps.tolist(),
            "values": values.tolist(),
        }
    with open(path, "w") as f:
        json.dump({"metadata": run.metadata, "fields": fields}, f)


# Protocol-buffer wire format, just what tensorflow.Event needs.
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as ten bytes, as protobuf does
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _double_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _histogram(counts: np.ndarray, edges: np.ndarray) -> bytes:
    """A tensorflow.HistogramProto of per-bin counts; min/max are the outer edges of the
    non-empty bins, sum and sum_squares take every count at its bin's centre."""
    nonempty = np.flatnonzero(counts)
    low, high = (edges[nonempty[0]], edges[nonempty[-1] + 1]) if nonempty.size else edges[[0, -1]]
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    return b"".join(
        [
            _double_field(1, low),
            _double_field(2, high),
            _double_field(3, counts.sum()),
            _double_field(4, counts @ centres),
            _double_field(5, counts @ centres**2),
            _bytes_field(6, edges[1:].astype("<f8").tobytes()),
            _bytes_field(7, counts.astype("<f8").tobytes()),
        ]
    )


def _summary_values(key: str, values: np.ndarray, edges: np.ndarray | None) -> list[list[bytes]]:
    """Per step, the encoded Summary.Value entries of one field."""
    if edges is not None:
        return [
            [_bytes_field(1, key.encode()) + _bytes_field(5, _histogram(v, edges))] for v in values
        ]
    tags = [_bytes_field(1, name.encode()) for name in _element_names(key, values.shape[1:])]
    flat = values.reshape(len(values), -1).astype("<f4")
    # simple_value is field 2, a 32-bit float (wire type 5).
    return [[tag + b"\x15" + x.tobytes() for tag, x in zip(tags, row, strict=True)] for row in flat]


def _crc32c_table() -> np.ndarray:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of every byte value."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ 0x82F63B78, table >> 1)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(messages: list[bytes]) -> list[int]:
    """TFRecord's masked CRC-32C of each message.

    Plain Python would cost a loop step per byte; instead, messages of equal length are
    stacked and processed one byte column at a time for all of them at once.

    Example:
      >>> [hex(c) for c in _masked_crc32c([b"123456789", b""])]  # CRC-32C 0xe3069283, 0x0
      ['0xc78ab0e5', '0xa282ead8']
    """
    crcs = np.empty(len(messages), np.uint32)
    by_length: dict[int, list[int]] = {}
    for i, message in enumerate(messages):
        by_length.setdefault(len(message), []).append(i)
    for length, indices in by_length.items():
        data = b"".join(messages[i] for i in indices)
        columns = np.frombuffer(data, np.uint8).reshape(len(indices), length).T
        crc = np.full(len(indices), 0xFFFFFFFF, np.uint32)
        for column in columns:
            crc = _CRC32C_TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
        crcs[indices] = ~crc
    return [((c >> 15 | c << 17) + 0xA282EAD8) & 0xFFFFFFFF for c in crcs.tolist()]


def _tfrecords(records: list[bytes]) -> bytes:
    """Records framed as TFRecord: length, its masked CRC, data, the data's masked CRC."""
    lengths = [struct.pack("<Q", len(r)) for r in records]
    length_crcs = _masked_crc32c(lengths)
    data_crcs = _masked_crc32c(records)
    return b"".join(
        b"".join([n, struct.pack("<I", n_crc), r, struct.pack("<I", r_crc)])
        for n, n_crc, r, r_crc in zip(lengths, length_crcs, records, data_crcs, strict=True)
    )


def _recorded_edges(run: Run, key: str, nbins: int) -> np.ndarray:
    """The bin edges of histogram ``key`` as the run's metadata describes its quantity
    (``quantities_by_key``: a ``GradHist1d`` of any name); else the bin indices 0…nbins."""
    about = run.metadata.get("quantities_by_key", {}).get(key)
    args = about.get("args", {}) if isinstance(about, dict) else {}
    if about and about.get("kind") == "grad_hist_1d" and args.get("nbins") == nbins:
        maxval = float(args["maxval"])
        return np.linspace(-maxval, maxval, nbins + 1)
    return np.arange(nbins + 1)


def to_tensorboard(
    run: Run, logdir: str | os.PathLike, bin_edges: Mapping[str, ArrayLike] | None = None
) -> pathlib.Path:
    """Write the run as a TensorBoard event file in ``logdir`` and return its path.

    Scalar fields become scalar summaries. 1-D integer fields are taken as histogram counts
    and become histogram summaries, with bins ``bin_edges[name]`` (``nbins + 1`` edges,
    e.g. ``np.linspace(-maxval, maxval, nbins + 1)``), else those of the ``GradHist1d`` that
    the run's metadata records under that key (whatever its ``name``), else the bin indices
    0…nbins. Any other array becomes one scalar per element, tagged ``name[i]``. The store
    keeps no per-step clock, so every event carries the run's start time. Exporting the
    same run again replaces the file.
    """
    bin_edges = dict(bin_edges or {})
    by_step: dict[int, list[bytes]] = {}
    for key in run.keys:
        steps, values = run[key]
        edges = None
        if values.ndim == 2 and values.dtype.kind in "iu":
            nbins = values.shape[1]
            edges = np.asarray(bin_edges.pop(key, _recorded_edges(run, key, nbins)), np.float64)
            if edges.shape != (nbins + 1,):
                raise ValueError(
                    f"to_tensorboard: {key!r} has {nbins} bins but {edges.shape} bin edges"
                )
        for step, entries in zip(steps.tolist(), _summary_values(key, values, edges), strict=True):
            by_step.setdefault(step, []).extend(entries)
    if bin_edges:
        raise ValueError(f"to_tensorboard: bin_edges for {sorted(bin_edges)}, not histogram fields")

    start = float(run.metadata["start_time"])
    wall_time = _double_field(1, start)
    events = [wall_time + _bytes_field(3, b"brain.Event:2")]
    for step in sorted(by_step):
        summary = b"".join(_bytes_field(1, value) for value in by_step[step])
        # step is field 2, an int64 varint (wire type 0).
        events.append(wall_time + b"\x10" + _varint(step) + _bytes_field(5, summary))
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / f"events.out.tfevents.{int(start)}.lmd4ml"
    path.write_bytes(_tfrecords(events))
    return path
