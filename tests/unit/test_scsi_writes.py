"""ORWRITE(16), WRITE ATOMIC(16) and the range lock as the LU uses it (CAW vs plain WRITE)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import DataDirection, Task, run_inline

from .scsi_fakes import FakeChannel, MemBackstore, make_task, run

T = TypeVar("T")
BS = 512
NBLOCKS = 4096
TARGET_NAME = "iqn.2024-01.test:tgt"


@pytest.fixture
def store() -> MemBackstore:
    return MemBackstore(NBLOCKS * BS)


@pytest.fixture
def ready(store: MemBackstore, pool: Pool) -> ScsiTarget:
    lu = LogicalUnit(store, runner=run_inline, identity=f"{TARGET_NAME}/lun0")
    target = ScsiTarget(TARGET_NAME, [lu])
    run(target, pool, bytes(6))  # consume the power-on unit attention
    return target


def orwrite(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([0x8B, flags]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


def write_atomic(lba: int, n: int, flags: int = 0, boundary: int = 0) -> bytes:
    return (
        bytes([0x9C, flags])
        + lba.to_bytes(8, "big")
        + boundary.to_bytes(2, "big")
        + n.to_bytes(2, "big")
        + b"\0\0"
    )


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


def sense(task: Task) -> tuple[int, int, int, bytes]:
    """Sense key, ASC, ASCQ and the sense-key-specific bytes (field pointer)."""
    assert task.status == Status.CHECK_CONDITION
    s = task.sense
    return s[2] & 0x0F, s[12], s[13], s[15:18]


def test_cdb_golden() -> None:
    assert orwrite(0x0102030405060708, 0x100, 0x18) == bytes.fromhex(
        "8b 18 0102030405060708 00000100 00 00"
    )
    assert write_atomic(8, 16, 0x08, 4) == bytes.fromhex("9c 08 0000000000000008 0004 0010 00 00")


# ---- ORWRITE ---------------------------------------------------------------------------------


def test_orwrite_ors_into_the_medium(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    store.data[0 : 4 * BS] = b"\x0f" * (4 * BS)
    store.data[4 * BS : 5 * BS] = b"\x77" * BS
    task, _ch = run(ready, pool, orwrite(1, 2), data_out=b"\xa0" * BS + b"\x50" * BS)
    good(task)
    assert task.transfer_length == 2 * BS
    assert store.data[0:BS] == b"\x0f" * BS
    assert store.data[BS : 2 * BS] == b"\xaf" * BS
    assert store.data[2 * BS : 3 * BS] == b"\x5f" * BS
    assert store.data[3 * BS : 5 * BS] == b"\x0f" * BS + b"\x77" * BS


def test_orwrite_streams_large_commands(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    n = 5000 * 1024 // BS  # more than one IO_WINDOW
    n = min(n, NBLOCKS)
    pattern = bytes(range(256)) * (n * BS // 256)
    store.data[0 : n * BS] = bytes(reversed(pattern))
    task, _ = run(ready, pool, orwrite(0, n), data_out=pattern)
    good(task)
    expect = bytes(a | b for a, b in zip(pattern, reversed(pattern), strict=True))
    assert store.data[0 : n * BS] == expect


def test_orwrite_fua_flushes(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    task, _ = run(ready, pool, orwrite(0, 1, 0x18), data_out=b"\x01" * BS)
    good(task)
    assert store.flushes == 1


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (orwrite(0, 1, 0x20), (0x5, 0x24, 0x00, bytes.fromhex("cf0001"))),  # ORPROTECT
        (orwrite(NBLOCKS, 1), (0x5, 0x21, 0x00, bytes(3))),
        (orwrite(NBLOCKS - 1, 2), (0x5, 0x21, 0x00, bytes(3))),
        (orwrite(2**64 - 1, 1), (0x5, 0x21, 0x00, bytes(3))),
        (orwrite(NBLOCKS + 1, 0), (0x5, 0x21, 0x00, bytes(3))),
    ],
)
def test_orwrite_errors(
    ready: ScsiTarget,
    pool: Pool,
    store: MemBackstore,
    cdb: bytes,
    expected: tuple[int, int, int, bytes],
) -> None:
    task, ch = run(ready, pool, cdb, data_out=b"\xff" * BS)
    assert sense(task) == expected
    assert ch.receives == []
    assert store.writes == 0


def test_orwrite_zero_blocks(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    task, ch = run(ready, pool, orwrite(0, 0), edtl=0)
    good(task)
    assert task.transfer_length == 0
    assert ch.receives == []
    assert store.writes == 0


# ---- WRITE ATOMIC ----------------------------------------------------------------------------


def test_write_atomic_stores_in_one_call(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    data = bytes(range(256)) * (2048 * BS // 256)
    task, _ = run(ready, pool, write_atomic(8, 2048, 0x08), data_out=data)
    good(task)
    assert store.data[8 * BS : 2056 * BS] == data
    assert store.writes == 1
    assert store.flushes == 1


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (write_atomic(0, 8, 0x40), (0x5, 0x24, 0x00, bytes.fromhex("cf0001"))),  # WRPROTECT
        (write_atomic(NBLOCKS - 8, 16), (0x5, 0x21, 0x00, bytes(3))),
        (write_atomic(2**63, 8), (0x5, 0x21, 0x00, bytes(3))),
        (write_atomic(NBLOCKS + 8, 0), (0x5, 0x21, 0x00, bytes(3))),
        (write_atomic(0, 2056), (0x5, 0x24, 0x00, bytes.fromhex("c0000c"))),  # > maximum
        (write_atomic(0, 8, boundary=2056), (0x5, 0x24, 0x00, bytes.fromhex("c0000a"))),
        (write_atomic(1, 8), (0x5, 0x24, 0x00, bytes.fromhex("c00002"))),  # alignment
        (write_atomic(0, 4), (0x5, 0x24, 0x00, bytes.fromhex("c0000c"))),  # granularity
    ],
)
def test_write_atomic_errors(
    ready: ScsiTarget,
    pool: Pool,
    store: MemBackstore,
    cdb: bytes,
    expected: tuple[int, int, int, bytes],
) -> None:
    task, ch = run(ready, pool, cdb, data_out=b"\xff" * (8 * BS))
    assert sense(task) == expected
    assert ch.receives == []
    assert store.writes == 0


def test_write_atomic_short_buffer_writes_nothing(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    task, _ = run(ready, pool, write_atomic(0, 16), data_out=b"\xff" * (8 * BS))
    assert sense(task)[:3] == (0x5, 0x0E, 0x03)  # INVALID FIELD IN INFORMATION UNIT
    assert store.writes == 0


def test_write_atomic_zero_blocks(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, write_atomic(0, 0), edtl=0)
    good(task)
    assert ch.receives == []


def test_rsoc_reports_both(ready: ScsiTarget, pool: Pool) -> None:
    def one(op: int) -> bytes:
        _, ch = run(ready, pool, bytes([0xA3, 0x0C, 0x01, op, 0, 0, 0, 0, 0x01, 0, 0, 0]))
        return bytes(ch.data_in)

    assert one(0x8B) == bytes.fromhex("00 03 0010 8b 18 ffffffffffffffff ffffffff 3f 00")
    assert one(0x9C) == bytes.fromhex("00 03 0010 9c 18 ffffffffffffffff ffffffff 3f 00")


# ---- atomicity against concurrent commands -----------------------------------------------------


class Gate:
    """A runner that parks chosen backstore calls until released (a slow backstore)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.stall: Callable[[str, int], bool] = lambda name, offset: False
        self.open = asyncio.Event()

    async def __call__(self, fn: Callable[..., T], /, *args: Any) -> T:
        name = getattr(fn, "__name__", "?")
        offset = args[0] if args and isinstance(args[0], int) else -1
        if self.stall(name, offset):
            await self.open.wait()
        self.calls.append((name, offset))
        return fn(*args)


class SlowStore(MemBackstore):
    blocking = True  # so the LU goes through the gate


def caw(lba: int, n: int) -> bytes:
    return bytes([0x89, 0]) + lba.to_bytes(8, "big") + bytes([0, 0, 0, n, 0, 0])


def write10(lba: int, n: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def start(lu: LogicalUnit, pool: Pool, cdb: bytes, data: bytes) -> tuple[Task, asyncio.Task[None]]:
    task = make_task(cdb, expected_length=len(data), direction=DataDirection.WRITE)
    channel = FakeChannel(pool, task, data)
    return task, asyncio.create_task(lu.execute(task, channel))


def test_write_waits_for_compare_and_write_on_its_range(pool: Pool) -> None:
    async def main() -> None:
        gate = Gate()
        store = SlowStore(NBLOCKS * BS)
        lu = LogicalUnit(store, runner=gate, identity="slow")
        lu.take_ua("iqn.2024-01.test:init,i,0x23d000000001")
        old, new, plain = b"\x00" * BS, b"\xcc" * BS, b"\x11" * BS
        # COMPARE AND WRITE's read of LBA 0 stalls: it holds the range, mid-command.
        gate.stall = lambda name, offset: name == "readv" and offset == 0
        caw_task, caw_run = start(lu, pool, caw(0, 1), old + new)
        await asyncio.sleep(0.01)
        assert gate.calls == []
        # A WRITE elsewhere goes through; one to the same block waits.
        other_task, other_run = start(lu, pool, write10(100, 1), plain)
        same_task, same_run = start(lu, pool, write10(0, 1), plain)
        await asyncio.wait_for(other_run, 1)
        await asyncio.sleep(0.01)
        assert gate.calls == [("writev", 100 * BS)]
        assert not same_run.done()
        assert store.data[0:BS] == old
        gate.open.set()
        await asyncio.wait_for(asyncio.gather(caw_run, same_run), 1)
        for t in (caw_task, other_task, same_task):
            assert t.status == Status.GOOD, t.sense.hex()
        # The CAW compared and wrote as one step; the WRITE came after it.
        assert gate.calls[1:] == [("readv", 0), ("writev", 0), ("writev", 0)]
        assert store.data[0:BS] == plain
        assert lu.ranges.held == []

    asyncio.run(main())
    assert pool.stats.blocks_in_use == 0


def test_compare_and_write_waits_for_a_write_in_flight(pool: Pool) -> None:
    async def main() -> None:
        gate = Gate()
        store = SlowStore(NBLOCKS * BS)
        lu = LogicalUnit(store, runner=gate, identity="slow")
        lu.take_ua("iqn.2024-01.test:init,i,0x23d000000001")
        first = b"\x22" * BS
        gate.stall = lambda name, offset: name == "writev" and offset == 0 and not gate.calls
        write_task, write_run = start(lu, pool, write10(0, 1), first)
        await asyncio.sleep(0.01)
        # The CAW expects what the WRITE is storing: it must not read the old data.
        caw_task, caw_run = start(lu, pool, caw(0, 1), first + b"\x33" * BS)
        await asyncio.sleep(0.01)
        assert not caw_run.done()
        gate.stall = lambda name, offset: False
        gate.open.set()
        await asyncio.wait_for(asyncio.gather(write_run, caw_run), 1)
        assert write_task.status == caw_task.status == Status.GOOD, caw_task.sense.hex()
        assert store.data[0:BS] == b"\x33" * BS

    asyncio.run(main())
    assert pool.stats.blocks_in_use == 0


def test_aborted_waiter_leaves_no_lock_behind(pool: Pool) -> None:
    async def main() -> None:
        gate = Gate()
        lu = LogicalUnit(SlowStore(NBLOCKS * BS), runner=gate, identity="slow")
        lu.take_ua("iqn.2024-01.test:init,i,0x23d000000001")
        gate.stall = lambda name, offset: name == "readv"
        _, caw_run = start(lu, pool, caw(0, 1), bytes(2 * BS))
        await asyncio.sleep(0.01)
        _, write_run = start(lu, pool, write10(0, 1), bytes(BS))
        await asyncio.sleep(0.01)
        assert lu.ranges.waiting == 1
        write_run.cancel()  # what a lost connection does to the command's coroutine
        await asyncio.gather(write_run, return_exceptions=True)
        assert lu.ranges.waiting == 0
        gate.open.set()
        await asyncio.wait_for(caw_run, 1)
        assert lu.ranges.held == []

    asyncio.run(main())
    assert pool.stats.blocks_in_use == 0
