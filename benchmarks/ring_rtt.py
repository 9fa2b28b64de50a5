"""Ring round trip: 4 KiB READs per second on a null backstore, in one process and across a ring.

Three ways to run the same null READ, each for ``--seconds`` (best of ``--rounds``):

- ``direct``: the null backstore's ``io()`` awaited on the event loop -- what an in-process LUN
  costs per command below the SCSI layer;
- ``ring, one process``: ``RingTarget`` and ``UserRing`` on one shared memory in one thread,
  batches of ``--depth`` (submit, fetch, complete, reap): the ring's own bookkeeping, no process
  switch, no doorbell;
- ``ring, handler process``: ``RingBackstore`` with a ``null`` handler in its own process
  (zerocopy), ``--depth`` commands in flight, completions from the done eventfd -- the real
  cross-process round trip (QD1 and QD ``--depth``).

    python -m benchmarks.ring_rtt
    python -m benchmarks.ring_rtt --seconds 2 --depth 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from benchmarks.common import print_table
from sgtarget.backstores.base import run_inline
from sgtarget.backstores.null import NullBackstore
from sgtarget.datapath.pool import Pool
from sgtarget.ring import abi
from sgtarget.ring.backstore import RingBackstore, RingOptions
from sgtarget.ring.shm import SharedMemory
from sgtarget.ring.target import RingTarget
from sgtarget.ring.user import Request, UserRing

BLOCK = 4096
SIZE = 1 << 30
READ16 = bytes((0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0))


async def _direct(seconds: float) -> int:
    io = NullBackstore(SIZE).io(run_inline)
    buf = memoryview(bytearray(BLOCK))
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(256):
            await io.readv(0, [buf])
        n += 256
    return n


def _in_process(seconds: float, depth: int) -> int:
    cmdr = 1 << 20
    ring = SharedMemory.create("sgtarget-rtt", abi.MAILBOX_SIZE + cmdr)
    data_off = abi.MAILBOX_SIZE + cmdr
    try:
        target = RingTarget(ring.buf, data_off=data_off)
        user = UserRing(ring.buf)
        iov = ((data_off, BLOCK),)
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(depth):
                target.submit(READ16, iov)
            for req in user.fetch():
                assert isinstance(req, Request)
                user.complete(req.cmd_id, 0)
            n += len(target.reap())
        del target, user
        return n
    finally:
        ring.close()


async def _across(seconds: float, depth: int, pool: Pool) -> int:
    bs = RingBackstore("null", {}, SIZE, RingOptions(mode="zerocopy"), name="rtt")
    await bs.start(pool)
    try:
        io = bs.io(run_inline)
        sg = pool.alloc(BLOCK * depth)
        views = [sg.views(i * BLOCK, BLOCK)[0] for i in range(depth)]
        count = 0
        end = time.monotonic() + seconds

        async def lane(view: memoryview) -> None:
            nonlocal count
            while time.monotonic() < end:
                await io.readv(0, [view])
                count += 1

        await asyncio.gather(*(lane(v) for v in views))
        del views
        sg.release()
        return count
    finally:
        await bs.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (2)")
    ap.add_argument("--depth", type=int, default=32, help="commands in flight (32)")
    ap.add_argument("--rounds", type=int, default=2, help="best of (2)")
    args = ap.parse_args()
    if not 1 <= args.depth <= 256 or not 0.1 <= args.seconds <= 60:
        ap.error("--depth must be 1..256 and --seconds 0.1..60")
    print(
        f"ring_rtt: null 4 KiB READs, {args.seconds:g} s each, best of {args.rounds}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    pool = Pool(16 << 20)
    best: dict[str, float] = {}

    def note(name: str, n: int) -> None:
        best[name] = max(best.get(name, 0.0), n / args.seconds)

    try:
        for _ in range(args.rounds):
            note("direct (in-process backstore)", asyncio.run(_direct(args.seconds)))
            note(f"ring, one process, batch {args.depth}", _in_process(args.seconds, args.depth))
            note("ring, handler process, QD1", asyncio.run(_across(args.seconds, 1, pool)))
            note(
                f"ring, handler process, QD{args.depth}",
                asyncio.run(_across(args.seconds, args.depth, pool)),
            )
    finally:
        pool.close()
    base = best["direct (in-process backstore)"]
    rows = [[k, f"{v:,.0f}", f"{v / base:.3f}", f"{1e6 / v:.1f}"] for k, v in best.items()]
    print_table(["path", "commands/s", "vs direct", "us/command"], rows, "Round trips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
