"""What the shared-memory ring costs: the writer per record, a reader per record drained.

The layout is that of the six seed quantities: five float32 scalars (loss, grad_norm,
distance, update_size, norm_test) and grad_hist_1d's int64[100] (its exact counts on the
host), with values as numpy arrays already on the host (what a train loop hands over after
``lm.stats.to_host``).

* ``write``: median over R blocks of N ``RingWriter.write`` calls of the block's time per record.
* ``drain``: a reader copying out a full ring (``capacity`` records) in one ``read``, each
  record's BLAKE2b checksum verified; median over R reads, as records per second.
* ``poll``: one ``read`` that finds a single new record, the cost of a dashboard's idle poll.

Writer and reader share this process, so the numbers are the calls' own cost, without the
contention of a reader on another core.

Usage::

    python benchmarks/ring.py [--capacity C] [--block N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from lmd4ml.telemetry.ring import RingReader, RingWriter, record_dtype, ring_name

SCALARS = ("loss", "grad_norm", "distance", "update_size", "norm_test")
FIELDS = {**{k: ((), np.float32) for k in SCALARS}, "grad_hist_1d": ((100,), np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--block", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    values = {k: np.float32(rng.standard_normal()) for k in SCALARS}
    values["grad_hist_1d"] = rng.integers(0, 1000, 100, dtype=np.int64)
    name = ring_name(f"bench{os.getpid()}")
    with RingWriter(name, FIELDS, args.capacity) as writer, RingReader(name) as reader:
        step = 0
        write_us = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _ in range(args.block):
                writer.write(step, values)
                step += 1
            write_us.append((time.perf_counter() - start) / args.block * 1e6)

        drain_s, poll_us = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            batch = reader.read(step - args.capacity)
            drain_s.append(time.perf_counter() - start)
            assert batch.missed == 0 and len(batch.steps) == args.capacity
            writer.write(step, values)
            step += 1
            start = time.perf_counter()
            batch = reader.read(step - 1)
            poll_us.append((time.perf_counter() - start) * 1e6)
            assert len(batch.steps) == 1

    size = record_dtype(FIELDS).itemsize
    print(f"layout: 5 float32 scalars + int64[100], {size} B/record; capacity {args.capacity}")
    print(f"write: {statistics.median(write_us):.2f} µs/record (median of {args.repeats} blocks)")
    rate = args.capacity / statistics.median(drain_s)
    print(f"drain: {rate / 1e6:.2f} M records/s ({args.capacity} records per read)")
    print(f"poll:  {statistics.median(poll_us):.1f} µs for a read of one new record")


if __name__ == "__main__":
    main()
