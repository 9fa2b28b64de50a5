"""The immediate path (``execute_now``) of plain READ/WRITE(10/16) against the full path.

``execute_now`` must either finish a command exactly as ``execute`` would, or decline having
touched nothing (medium, pool, range locks, unit attentions, the task) so that ``execute`` then
runs it as if there were no fast path. Every test here checks one side of that contract.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import random
import struct
from collections.abc import Iterator
from ctypes import c_int, c_long, c_size_t, c_void_p
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import Backstore, BackstoreBusy, BackstoreError, Buffers
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.null import NullBackstore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.datapath import Pool, ScatterList
from sgtarget.scsi.constants import IO_WINDOW, Asc, Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import (
    NOW_DECLINED,
    NOW_DONE,
    NOW_PENDING,
    DataDirection,
    Task,
    run_inline,
)

from .scsi_fakes import NEXUS, OTHER_NEXUS, FakeChannel, MemBackstore, make_task, run

BS = 512
NBLOCKS = 4096  # 2 MiB: room for transfers past IO_WINDOW and for LBAs past the end
WINDOW_BLOCKS = IO_WINDOW // BS
IMAGE = random.Random(7).randbytes(NBLOCKS * BS)
#: Data-Out, distinct from IMAGE so a write that lands (or not) shows.
PAYLOAD = random.Random(8).randbytes((NBLOCKS + 16) * BS)
READ10, WRITE10, READ16, WRITE16 = 0x28, 0x2A, 0x88, 0x8A
R, W, NONE = DataDirection.READ, DataDirection.WRITE, DataDirection.NONE
#: What a declined command must leave in the task (a fresh task would hide a stray write).
UNTOUCHED = (0x7E, b"untouched", 0x5A5A)
TUR = bytes(6)
#: CDB, EDTL, direction, Data-Out.
Case = tuple[bytes, int, DataDirection, bytes]


class FakeTx:
    """An ``ImmediateChannel`` over a pool. Data-Out sits in pool blocks from the start, as a
    transport's immediate data does, and stays the transport's until ``complete``."""

    def __init__(self, pool: Pool, data_out: bytes | None = None, *, memory: bool = True) -> None:
        self.pool = pool
        self.memory = memory
        self.sent: list[tuple[bytes, int]] = []
        self.data: ScatterList | None = None
        if data_out is not None:
            self.data = pool.alloc(len(data_out))
            self.data.copy_in(data_out)

    def alloc_now(self, nbytes: int) -> ScatterList | None:
        return self.pool.try_alloc(nbytes) if self.memory else None

    def data_now(self, task: Task) -> ScatterList | None:
        return self.data

    def send_now(self, task: Task, sg: ScatterList, length: int) -> None:
        try:
            self.sent.append((sg.to_bytes(0, length), length))
        finally:
            sg.release()

    # For a write left pending (NOW_PENDING), which an inline runner never does.
    def take_data(self, task: Task) -> ScatterList:
        raise AssertionError("write left pending")

    def finish(self, task: Task) -> None:
        raise AssertionError("write left pending")

    def complete(self) -> None:
        if self.data is not None:
            self.data.release()
            self.data = None


def rw(op: int, lba: int, n: int, flags: int = 0, *, group: int = 0, control: int = 0) -> bytes:
    if op in (READ10, WRITE10):  # opcode, flags, LBA(4), group, length(2), control
        return struct.pack(">BBIBHB", op, flags, lba, group, n, control)
    return struct.pack(">BBQIBB", op, flags, lba, n, group, control)


def lba_len(cdb: bytes) -> tuple[int, int]:
    if cdb[0] in (READ10, WRITE10):
        return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
    return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")


def rw_task(cdb: bytes, edtl: int, direction: DataDirection | None = None) -> Task:
    if direction is None:
        direction = W if cdb[0] & 0x02 else R
    task = make_task(cdb, expected_length=edtl, direction=direction)
    task.status, task.sense, task.transfer_length = UNTOUCHED
    return task


def result(task: Task) -> tuple[int, bytes, int]:
    return task.status, task.sense, task.transfer_length


def sense(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION, (task.status, task.sense.hex())
    return task.sense[2] & 0x0F, task.sense[12], task.sense[13]


def good(task: Task) -> None:
    assert (task.status, task.sense) == (Status.GOOD, b""), task.sense.hex()


def medium(tgt: ScsiTarget) -> bytes:
    store = tgt.luns[0].backstore
    if isinstance(store, MemBackstore):  # its readv may be set to fail
        return bytes(store.data)
    buf = bytearray(store.size)
    store.readv(0, [memoryview(buf)])
    return bytes(buf)


def ready(store: Backstore, pool: Pool, *, readonly: bool = False, ua: bool = True) -> ScsiTarget:
    """A target with one LU whose power-on unit attention NEXUS has taken (unless ``ua``)."""
    tgt = ScsiTarget(
        "t", [LogicalUnit(store, runner=run_inline, identity="t/0", readonly=readonly)]
    )
    if ua:
        assert sense(run(tgt, pool, TUR)[0]) == (0x6, 0x29, 0x00)
    return tgt


def loaded(
    pool: Pool, kind: type[Backstore] = RamBackstore, *, readonly: bool = False
) -> ScsiTarget:
    """A ready LU holding IMAGE. ``MemBackstore`` does not check ranges (a bytearray slice),
    so only the LU stands between a command past the end and the medium."""
    store = kind(NBLOCKS * BS)
    store.writev(0, [memoryview(IMAGE)])
    return ready(store, pool, readonly=readonly)


def now(tgt: ScsiTarget, pool: Pool, task: Task, tx: FakeTx, *, snap: bool = True) -> bool:
    """``ScsiTarget.execute_now``; a decline is checked to have changed nothing at all.

    ``snap=False`` skips the medium snapshots: reading a file fills the page cache, which
    would turn a miss a test arranged into a hit.
    """
    ranges = tgt.luns[0].ranges
    before = (medium(tgt) if snap else b"", pool.stats.blocks_in_use, ranges.held)
    fields = result(task)
    done = tgt.execute_now(task, tx)
    assert done in (NOW_DECLINED, NOW_DONE)  # never NOW_PENDING with an inline runner
    after = (medium(tgt) if snap else b"", pool.stats.blocks_in_use, ranges.held)
    if done:
        assert after[1:] == before[1:], "pool blocks or a range lock kept"
    else:
        assert after == before, "declined with a side effect"
        assert result(task) == fields
        assert tx.sent == []
    return bool(done)


def execute(tgt: ScsiTarget, pool: Pool, task: Task, data_out: bytes = b"") -> FakeChannel:
    """The full path on ``task`` as the transport runs it after a decline."""
    in_use = pool.stats.blocks_in_use
    ch = FakeChannel(pool, task, data_out)
    asyncio.run(tgt.execute(task, ch))
    assert pool.stats.blocks_in_use == in_use, "scatter lists leaked"
    return ch


def declined(tgt: ScsiTarget, pool: Pool, cdb: bytes, edtl: int, *, tx: FakeTx | None = None,
             direction: DataDirection | None = None) -> Task:  # fmt: skip
    """Assert ``execute_now`` declines ``cdb``, then run it the full way (Data-Out: PAYLOAD)."""
    data = PAYLOAD[:edtl] if cdb[0] & 0x02 else b""
    task = rw_task(cdb, edtl, direction)
    if tx is None:
        tx = FakeTx(pool, data if data else None)
    assert not now(tgt, pool, task, tx)
    tx.complete()
    execute(tgt, pool, task, data)
    return task


# ---- 1. equivalence with the full path -------------------------------------------------------


@st.composite
def commands(draw: st.DrawFn, ops: tuple[int, ...]) -> Case:
    """Half plain commands the fast path must take, half with one or more things that send
    them down the full path (or to an error)."""
    op = draw(st.sampled_from(ops))
    write = op & 0x02 == 0x02
    right = W if write else R
    group = draw(st.integers(0, 0xFF))  # ignored by both paths
    if draw(st.booleans()):
        n = draw(st.one_of(st.integers(1, 16), st.integers(1, WINDOW_BLOCKS)))
        lba = draw(st.one_of(st.integers(0, NBLOCKS - n), st.just(NBLOCKS - n)))
        cdb = rw(op, lba, n, group=group, control=draw(st.sampled_from([0, 0x80, 0x01])))
        edtl, direction = n * BS, right
    else:
        around_window = st.integers(WINDOW_BLOCKS - 2, WINDOW_BLOCKS + 2)
        n = draw(st.one_of(st.integers(0, 16), around_window, st.integers(0, NBLOCKS + 4)))
        top = 2**32 - 1 if op in (READ10, WRITE10) else 2**64 - 1
        lba = draw(st.one_of(st.integers(NBLOCKS - 20, NBLOCKS + 4), st.integers(0, top)))
        # FUA, DPO, RARC, an obsolete bit or a protect field.
        flags = draw(st.sampled_from([0, 0, 0x08, 0x10, 0x04, 0x02, 0x20, 0x60]))
        cdb = rw(op, lba, n, flags, group=group, control=draw(st.sampled_from([0, 4, 0x80, 1])))
        edtl = max(0, n * BS + draw(st.sampled_from([0, -BS, BS, -1, 1])))
        direction = draw(st.sampled_from([right, right, R, W, NONE]))
    shift = draw(st.integers(0, 15)) * BS
    return cdb, edtl, direction, PAYLOAD[shift : shift + edtl] if write else b""


def eligible(cdb: bytes, edtl: int, direction: DataDirection) -> bool:
    """When an idle RAM/null LU with memory to spare must take the fast path (the spec, written
    independently of lu.py)."""
    lba, n = lba_len(cdb)
    plain = cdb[1] == 0 and not cdb[-1] & 0x04 and direction == (W if cdb[0] & 0x02 else R)
    return plain and 0 < n <= WINDOW_BLOCKS and edtl == n * BS and lba + n <= NBLOCKS


def check_twins(tgt: ScsiTarget, twin: ScsiTarget, pool: Pool, case: Case) -> None:
    cdb, edtl, direction, data = case
    write = cdb[0] & 0x02
    tx = FakeTx(pool, data if write else None)
    task = rw_task(cdb, edtl, direction)
    done = now(tgt, pool, task, tx)
    assert done == eligible(cdb, edtl, direction)
    tx.complete()
    if not done:
        wire = bytes(execute(tgt, pool, task, data).data_in)
    else:
        assert [n for _, n in tx.sent] == ([] if write else [edtl])
        wire = tx.sent[0][0] if tx.sent else b""
    expect = rw_task(cdb, edtl, direction)
    assert wire == bytes(execute(twin, pool, expect, data).data_in)
    assert result(task) == result(expect)
    assert medium(tgt) == medium(twin)
    assert pool.stats.blocks_in_use == 0


SLOW = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SLOW
@pytest.mark.parametrize("kind", [RamBackstore, MemBackstore])
@given(case=commands((READ10, WRITE10, READ16, WRITE16)))
def test_ram_matches_full_path(pool: Pool, kind: type[Backstore], case: Case) -> None:
    check_twins(loaded(pool, kind), loaded(pool, kind), pool, case)


@SLOW
@given(case=commands((READ10, READ16)))
def test_null_read_matches_full_path(pool: Pool, case: Case) -> None:
    # Recycled pool blocks full of 0xAA: a null read that leaves them would send them.
    dirty = pool.alloc(pool.size)
    dirty.copy_in(b"\xaa" * pool.size)
    dirty.release()
    fast, twin = (ready(NullBackstore(NBLOCKS * BS), pool) for _ in range(2))
    check_twins(fast, twin, pool, case)


def test_plain_write_then_read_golden(pool: Pool) -> None:
    tgt = loaded(pool)
    tx = FakeTx(pool, PAYLOAD[: 3 * BS])
    task = rw_task(rw(WRITE16, 100, 3), 3 * BS)
    assert now(tgt, pool, task, tx)
    tx.complete()
    assert result(task) == (Status.GOOD, b"", 3 * BS)
    assert medium(tgt) == IMAGE[: 100 * BS] + PAYLOAD[: 3 * BS] + IMAGE[103 * BS :]
    tx = FakeTx(pool)
    task = rw_task(rw(READ10, 99, 5), 5 * BS)
    assert now(tgt, pool, task, tx)
    assert result(task) == (Status.GOOD, b"", 5 * BS)
    want = IMAGE[99 * BS : 100 * BS] + PAYLOAD[: 3 * BS] + IMAGE[103 * BS : 104 * BS]
    assert tx.sent == [(want, 5 * BS)]
    # Exactly one IO_WINDOW is still immediate (one block more is not: see below).
    tx = FakeTx(pool)
    assert now(tgt, pool, rw_task(rw(READ16, 200, WINDOW_BLOCKS), IO_WINDOW), tx)
    assert tx.sent == [(IMAGE[200 * BS : 200 * BS + IO_WINDOW], IO_WINDOW)]


# ---- 2. declines: the CDB or task ------------------------------------------------------------

GOOD = None
OOR, INVALID_CDB, INVALID_IU = (5, 0x21, 0), (5, 0x24, 0), (5, 0x0E, 0x03)
WINDOW1 = IO_WINDOW + BS  # one block more than IO_WINDOW


@pytest.mark.parametrize(
    ("cdb", "edtl", "direction", "expect"),
    [
        pytest.param(rw(READ10, NBLOCKS - 1, 2), 2 * BS, R, OOR, id="read-past-end"),
        pytest.param(rw(WRITE16, NBLOCKS - 1, 2), 2 * BS, W, OOR, id="write-past-end"),
        pytest.param(rw(WRITE16, NBLOCKS, 1), BS, W, OOR, id="write-lba-at-end"),
        pytest.param(rw(READ10, 5, 0), 0, R, GOOD, id="read-length-0"),
        pytest.param(rw(WRITE16, 5, 0), 0, W, GOOD, id="write-length-0"),
        pytest.param(rw(READ10, 8, 4), 3 * BS, R, GOOD, id="read-underflow"),
        pytest.param(rw(READ16, 8, 4), 5 * BS, R, GOOD, id="read-overflow"),
        pytest.param(rw(WRITE10, 8, 4), 3 * BS, W, GOOD, id="write-edtl-short"),
        pytest.param(rw(WRITE16, 8, 4), 4 * BS - 1, W, INVALID_IU, id="write-edtl-mid-block"),
        pytest.param(rw(READ10, 8, 2, 0x08), 2 * BS, R, GOOD, id="read-fua"),
        pytest.param(rw(WRITE10, 8, 2, 0x08), 2 * BS, W, GOOD, id="write-fua"),
        pytest.param(rw(READ16, 8, 2, 0x10), 2 * BS, R, GOOD, id="read-dpo"),
        pytest.param(rw(READ10, 8, 2, 0x20), 2 * BS, R, INVALID_CDB, id="rdprotect-no-pi"),
        pytest.param(rw(WRITE16, 8, 2, 0x20), 2 * BS, W, INVALID_CDB, id="wrprotect-no-pi"),
        pytest.param(rw(READ10, 8, 2, control=4), 2 * BS, R, INVALID_CDB, id="naca"),
        pytest.param(rw(READ10, 8, 2), 2 * BS, W, GOOD, id="read-write-direction"),
        pytest.param(rw(READ16, 8, 2), 2 * BS, NONE, GOOD, id="read-no-direction"),
        pytest.param(rw(WRITE10, 8, 2), 2 * BS, R, GOOD, id="write-read-direction"),
        pytest.param(rw(READ16, 0, WINDOW_BLOCKS + 1), WINDOW1, R, GOOD, id="read-window+1"),
        pytest.param(rw(WRITE16, 0, WINDOW_BLOCKS + 1), WINDOW1, W, GOOD, id="write-window+1"),
    ],
)
def test_declines_then_full_path(pool: Pool, cdb: bytes, edtl: int, direction: DataDirection,
                                 expect: tuple[int, int, int] | None) -> None:  # fmt: skip
    tgt = loaded(pool, MemBackstore)
    task = declined(tgt, pool, cdb, edtl, direction=direction)
    lba, n = lba_len(cdb)
    if expect is not None:
        assert sense(task) == expect
        assert medium(tgt) == IMAGE
        return
    good(task)
    assert task.transfer_length == n * BS
    if cdb[0] & 0x02:  # whole blocks within EDTL are written (FCP-4 option a)
        k = min(n, edtl // BS)
        assert medium(tgt) == IMAGE[: lba * BS] + PAYLOAD[: k * BS] + IMAGE[(lba + k) * BS :]


# ---- 2. declines: LU and transport state -----------------------------------------------------


def test_power_on_unit_attention_left_for_execute(pool: Pool) -> None:
    tgt = ready(RamBackstore(NBLOCKS * BS), pool, ua=False)
    assert sense(declined(tgt, pool, rw(READ10, 0, 1), BS)) == (0x6, 0x29, 0x00)
    # Delivered once: now the command goes fast.
    assert now(tgt, pool, rw_task(rw(READ10, 0, 1), BS), FakeTx(pool))


def test_queued_unit_attention_only_for_its_nexus(pool: Pool) -> None:
    tgt = loaded(pool)
    tgt.luns[0].queue_ua(OTHER_NEXUS.key, Asc.CAPACITY_DATA_HAS_CHANGED)
    assert now(tgt, pool, rw_task(rw(READ16, 0, 1), BS), FakeTx(pool))
    tgt.luns[0].queue_ua(NEXUS.key, Asc.CAPACITY_DATA_HAS_CHANGED)
    assert sense(declined(tgt, pool, rw(WRITE10, 0, 1), BS)) == (0x6, 0x2A, 0x09)
    assert medium(tgt) == IMAGE


def test_readonly_write_declined_read_taken(pool: Pool) -> None:
    tgt = loaded(pool, readonly=True)
    assert sense(declined(tgt, pool, rw(WRITE16, 3, 2), 2 * BS)) == (0x7, 0x27, 0x00)
    assert medium(tgt) == IMAGE
    assert now(tgt, pool, rw_task(rw(READ16, 3, 2), 2 * BS), FakeTx(pool))


def test_medium_not_present(pool: Pool) -> None:
    tgt = loaded(pool)
    tgt.luns[0].medium_present = False  # ejected
    assert sense(declined(tgt, pool, rw(READ10, 0, 1), BS)) == (0x2, 0x3A, 0x00)


@pytest.mark.parametrize("op", [READ10, WRITE10])
def test_spc2_reservation_of_another_nexus(pool: Pool, op: int) -> None:
    tgt = loaded(pool)
    run(tgt, pool, TUR, nexus=OTHER_NEXUS)  # its power-on unit attention
    good(run(tgt, pool, bytes([0x16, 0, 0, 0, 0, 0]), nexus=OTHER_NEXUS)[0])  # RESERVE(6)
    task = declined(tgt, pool, rw(op, 0, 1), BS)
    assert (task.status, task.sense) == (Status.RESERVATION_CONFLICT, b"")
    assert medium(tgt) == IMAGE


def test_pi_formatted_lu(pool: Pool) -> None:
    tgt = ready(RamBackstore(NBLOCKS * BS, pi=1), pool)
    # Zero data with zero tuples is valid at LBA 0 (guard 0, reference tag 0).
    good(declined(tgt, pool, rw(READ10, 0, 1), BS))


def test_failed_sanitize_fences(pool: Pool) -> None:
    store = MemBackstore(NBLOCKS * BS)
    tgt = ready(store, pool)
    tgt.luns[0].sanitizer.rate = None
    store.fail_write = True
    run(tgt, pool, bytes([0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]))  # SANITIZE BLOCK ERASE
    store.fail_write = False
    assert tgt.luns[0].sanitizer.failed
    assert sense(declined(tgt, pool, rw(READ16, 0, 1), BS)) == (0x3, 0x31, 0x03)


def test_range_held_exclusively(pool: Pool) -> None:
    tgt = loaded(pool)
    ranges = tgt.luns[0].ranges
    held = ranges.try_acquire(12 * BS - 1, 20 * BS, exclusive=True)  # the command's last byte
    assert held is not None
    tx = FakeTx(pool, PAYLOAD[: 4 * BS])
    assert not now(tgt, pool, rw_task(rw(WRITE10, 8, 4), 4 * BS), tx)
    assert not now(tgt, pool, rw_task(rw(READ10, 8, 4), 4 * BS), FakeTx(pool))
    tx.complete()
    ranges.release(held)
    # Shared holders do not exclude each other: a READ goes fast beside one.
    shared = ranges.try_acquire(0, NBLOCKS * BS)
    assert now(tgt, pool, rw_task(rw(READ10, 8, 4), 4 * BS), FakeTx(pool))
    assert ranges.held == [shared]


def test_no_pool_memory_now(pool: Pool) -> None:
    tgt = loaded(pool)
    good(declined(tgt, pool, rw(READ16, 7, 3), 3 * BS, tx=FakeTx(pool, memory=False)))


def test_write_data_not_all_here(pool: Pool) -> None:
    tgt = loaded(pool)
    good(declined(tgt, pool, rw(WRITE16, 7, 3), 3 * BS, tx=FakeTx(pool, None)))
    assert medium(tgt) == IMAGE[: 7 * BS] + PAYLOAD[: 3 * BS] + IMAGE[10 * BS :]


def test_backstore_errors_are_left_to_execute(pool: Pool) -> None:
    store = MemBackstore(NBLOCKS * BS)
    store.data[:] = IMAGE
    tgt = ready(store, pool)
    store.fail_read = store.fail_write = True
    # now() checks the READ's sg went back to the pool.
    assert sense(declined(tgt, pool, rw(READ10, 2, 4), 4 * BS)) == (0x3, 0x11, 0x00)
    assert sense(declined(tgt, pool, rw(WRITE10, 2, 4), 4 * BS)) == (0x3, 0x0C, 0x00)
    assert bytes(store.data) == IMAGE


class Broken(MemBackstore):
    """A backstore with a bug: not a BackstoreError but anything else."""

    def readv(self, offset: int, bufs: Buffers) -> int:
        raise RuntimeError("backstore bug")

    writev = readv


@pytest.mark.parametrize("op", [READ10, WRITE10], ids=["read", "write"])
def test_unexpected_backstore_exception_leaks_nothing(
    pool: Pool, caplog: pytest.LogCaptureFixture, op: int
) -> None:
    tgt = ready(Broken(NBLOCKS * BS), pool)
    in_use = pool.stats.blocks_in_use
    tx = FakeTx(pool, PAYLOAD[: 4 * BS] if op == WRITE10 else None)
    task = rw_task(rw(op, 2, 4), 4 * BS)
    # A leaked range lock would block every later exclusive user of the range (COMPARE AND
    # WRITE) for ever: the bug is declined, and the full path reports it.
    assert tgt.execute_now(task, tx) == NOW_DECLINED
    tx.complete()
    assert tgt.luns[0].ranges.held == []
    assert pool.stats.blocks_in_use == in_use
    execute(tgt, pool, task, PAYLOAD[: 4 * BS] if op == WRITE10 else b"")
    assert sense(task) == (0x4, 0x44, 0x00)  # as execute answers any other exception
    caplog.clear()  # the logged traceback pins pool views


# ---- 2./3. file LU: page-cache hit and miss ---------------------------------------------------


@pytest.fixture
def file_lu(tmp_path: Path, pool: Pool) -> Iterator[tuple[ScsiTarget, FileBackstore]]:
    fb = FileBackstore(tmp_path / "lun.img", NBLOCKS * BS)
    fb.writev(0, [memoryview(IMAGE)])
    yield ready(fb, pool), fb
    fb.close()


def test_file_read_hit(pool: Pool, file_lu: tuple[ScsiTarget, FileBackstore]) -> None:
    tgt, _fb = file_lu
    tx = FakeTx(pool, PAYLOAD[: 2 * BS])
    assert now(tgt, pool, rw_task(rw(WRITE10, 30, 2), 2 * BS), tx)
    tx.complete()
    tx = FakeTx(pool)
    task = rw_task(rw(READ16, 29, 4), 4 * BS)
    if not now(tgt, pool, task, tx):  # pragma: no cover - no RWF_NOWAIT here
        pytest.skip("read_nowait cannot serve buffered reads on this kernel/filesystem")
    good(task)
    want = IMAGE[29 * BS : 30 * BS] + PAYLOAD[: 2 * BS] + IMAGE[32 * BS : 33 * BS]
    assert tx.sent == [(want, 4 * BS)]


def resident_pages(path: str, offset: int, length: int) -> int:
    """Pages of ``[offset, offset + length)`` in the page cache, by mincore(2): unlike a probe
    read, asking starts no readahead (with read_ahead_kb at megabytes, an RWF_NOWAIT probe
    that misses brings the whole range in behind the test's back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = c_void_p
    libc.mmap.argtypes = (c_void_p, c_size_t, c_int, c_int, c_int, c_long)
    libc.mincore.argtypes = (c_void_p, c_size_t, ctypes.c_char_p)
    libc.munmap.argtypes = (c_void_p, c_size_t)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, c_void_p(-1).value), os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(addr, size)
    first, last = offset // mmap.PAGESIZE, (offset + length - 1) // mmap.PAGESIZE
    return sum(b & 1 for b in vec.raw[first : last + 1])


def test_file_read_miss(pool: Pool, file_lu: tuple[ScsiTarget, FileBackstore]) -> None:
    tgt, fb = file_lu
    fd = os.open(fb.path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages are dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_pages(fb.path, 1000 * BS, 8 * BS):
        pytest.skip("the kernel kept the file's pages cached after POSIX_FADV_DONTNEED")
    task = rw_task(rw(READ10, 1000, 8), 8 * BS)
    # now() checks the sg read_nowait half filled went back to the pool.
    assert not now(tgt, pool, task, FakeTx(pool), snap=False)
    ch = execute(tgt, pool, task)
    good(task)
    assert bytes(ch.data_in) == IMAGE[1000 * BS : 1008 * BS]
    assert medium(tgt) == IMAGE


# ---- 4. ScsiTarget routing ---------------------------------------------------------------------


def test_target_routes_lun_fields(pool: Pool) -> None:
    lus = [LogicalUnit(RamBackstore(64 * BS), runner=run_inline, identity=f"t/{i}") for i in (0, 1)]
    for i, lu in enumerate(lus):
        lu.backstore.writev(0, [memoryview(bytes([0xC0 + i]) * 64 * BS)])
    tgt = ScsiTarget("t", lus)
    for i in (0, 1):
        run(tgt, pool, TUR, lun=i)
    # Peripheral (00 LL) and flat (40 LL) addressing of LUNs 0 and 1; then an absent LUN, a
    # second-level address and a short field, which are declined.
    fields = {b"\x00\x00": 0, b"\x40\x00": 0, b"\x00\x01": 1, b"\x40\x01": 1}
    absent = [b"\x00\x05" + bytes(6), b"\x00\x00\x00\x01" + bytes(4), b"\x00" * 7]
    for _ in range(2):  # the second round is served from the field cache
        for field in [head + bytes(6) for head in fields] + absent:
            task = rw_task(rw(READ10, 0, 1), BS)
            task.lun = field
            tx = FakeTx(pool)
            lun = fields.get(field[:2]) if field[2:] == bytes(6) else None
            want = NOW_DECLINED if lun is None else NOW_DONE
            assert tgt.execute_now(task, tx) == want, field.hex()
            if lun is None:
                assert (tx.sent, result(task)) == ([], UNTOUCHED)
            else:
                assert tx.sent == [(bytes([0xC0 + lun]) * BS, BS)]
                assert result(task) == (Status.GOOD, b"", BS)


# ---- NOW_PENDING: a file LU's WRITE handed to the batched writer --------------------------------


class PendingTx(FakeTx):
    """A ``FakeTx`` that lets a write stay pending: ``take_data`` hands the list over,
    ``finish`` records the task."""

    def __init__(self, pool: Pool, data_out: bytes) -> None:
        super().__init__(pool, data_out)
        self.finished: list[Task] = []

    def take_data(self, task: Task) -> ScatterList:
        sg, self.data = self.data, None
        assert sg is not None
        return sg

    def finish(self, task: Task) -> None:
        self.finished.append(task)


def test_file_write_pending_until_the_thread_wrote_it(tmp_path: Path, pool: Pool) -> None:
    fb = FileBackstore(tmp_path / "lun.img", NBLOCKS * BS)

    async def in_thread(fn: Any, /, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def main() -> None:
        lu = LogicalUnit(fb, runner=in_thread, identity="t/0")
        tgt = ScsiTarget("t", [lu])
        lu._nexus(NEXUS.key).pending.clear()  # past the power-on unit attention
        in_use = pool.stats.blocks_in_use
        txs = [PendingTx(pool, PAYLOAD[i * BS : (i + 4) * BS]) for i in range(3)]
        tasks = [rw_task(rw(WRITE10, 8 * i, 4), 4 * BS) for i in range(3)]
        for task, tx in zip(tasks, txs, strict=True):
            assert tgt.execute_now(task, tx) == NOW_PENDING
            assert tx.data is None  # the write owns the blocks now
            assert tx.finished == []  # nothing is done before the loop turns
        assert len(lu.ranges.held) == 3  # held until each write is on the file
        for _ in range(100):
            if all(tx.finished for tx in txs):
                break
            await asyncio.sleep(0.01)
        for task, tx in zip(tasks, txs, strict=True):
            assert tx.finished == [task]
            assert (task.status, task.sense, task.transfer_length) == (Status.GOOD, b"", 4 * BS)
        assert lu.ranges.held == []
        assert pool.stats.blocks_in_use == in_use

    try:
        asyncio.run(main())
        for i in range(3):
            out = bytearray(4 * BS)
            fb.readv(8 * i * BS, [memoryview(out)])
            assert bytes(out) == PAYLOAD[i * BS : (i + 4) * BS]
    finally:
        fb.close()


class FailingFile(FileBackstore):
    """A file whose writes fail with ``error`` (set per test)."""

    error: BackstoreError = BackstoreError("injected write failure")

    def writev(self, offset: int, bufs: Buffers) -> int:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "key_asc_ascq"),
    [
        (BackstoreError("injected"), Status.CHECK_CONDITION, (0x3, 0x0C, 0x00)),
        (BackstoreBusy("handler restarting"), Status.BUSY, None),
    ],
    ids=["medium-error", "busy"],
)
def test_pending_write_failure_answers_as_execute(
    tmp_path: Path,
    pool: Pool,
    error: BackstoreError,
    status: Status,
    key_asc_ascq: tuple[int, int, int] | None,
) -> None:
    fb = FailingFile(tmp_path / "lun.img", NBLOCKS * BS)
    fb.error = error

    async def in_thread(fn: Any, /, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def main() -> Task:
        lu = LogicalUnit(fb, runner=in_thread, identity="t/0")
        tgt = ScsiTarget("t", [lu])
        lu._nexus(NEXUS.key).pending.clear()
        in_use = pool.stats.blocks_in_use
        tx = PendingTx(pool, PAYLOAD[: 4 * BS])
        task = rw_task(rw(WRITE10, 6, 4), 4 * BS)
        assert tgt.execute_now(task, tx) == NOW_PENDING
        for _ in range(100):
            if tx.finished:
                break
            await asyncio.sleep(0.01)
        assert tx.finished == [task]
        assert lu.ranges.held == []
        assert pool.stats.blocks_in_use == in_use
        return task

    try:
        task = asyncio.run(main())
    finally:
        fb.close()
    assert task.status == status
    if key_asc_ascq is None:
        assert task.sense == b""
    else:
        assert sense(task) == key_asc_ascq
        # Fixed-format INFORMATION: the first LBA of the write, as the full path reports it.
        assert task.sense[0] & 0x80
        assert int.from_bytes(task.sense[3:7], "big") == 6
