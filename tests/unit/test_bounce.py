"""Bounce buffers: limits, fit checks, bounced reads and read-modify-write writes, accounting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Iterator, Sequence
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import Buffers
from sgtarget.datapath import Pool, ScatterList
from sgtarget.datapath.bounce import (
    REASON_SEGMENTS,
    REASON_UNALIGNED,
    ConsumerError,
    ConsumerLimits,
    fits,
    misfit,
    read_bounced,
    read_into,
    write_bounced,
    write_from,
    write_order,
)
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import run_inline

from .scsi_fakes import MemBackstore, run

PAGE = 4096
DISK = 64 * 1024


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


class Consumer:
    """A model file that asserts every call it gets fits its limits."""

    def __init__(self, limits: ConsumerLimits, size: int = DISK) -> None:
        self.limits = limits
        self.data = bytearray(pattern(size, 99))
        self.calls: list[tuple[str, int, int, int]] = []
        #: Awaited between calls, to let other tasks interleave.
        self.yield_between = False

    def _check(self, op: str, offset: int, views: Sequence[memoryview]) -> int:
        assert fits(views, offset, self.limits), (op, offset, [len(v) for v in views])
        n = sum(len(v) for v in views)
        assert offset >= 0
        assert offset + n <= len(self.data)
        self.calls.append((op, offset, n, len(views)))
        return n

    async def read(self, offset: int, views: Sequence[memoryview]) -> int:
        n = self._check("read", offset, views)
        if self.yield_between:
            await asyncio.sleep(0.001)
        pos = offset
        for v in views:
            v[:] = self.data[pos : pos + len(v)]
            pos += len(v)
        return n

    async def write(self, offset: int, views: Sequence[memoryview]) -> int:
        n = self._check("write", offset, views)
        if self.yield_between:
            await asyncio.sleep(0.001)
        pos = offset
        for v in views:
            self.data[pos : pos + len(v)] = v
            pos += len(v)
        return n


class Allocs:
    """An ``alloc`` over a pool that records what it was asked for."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.asked: list[int] = []

    async def __call__(self, nbytes: int) -> ScatterList:
        self.asked.append(nbytes)
        return self.pool.alloc(nbytes)


@contextlib.contextmanager
def new_pool() -> Iterator[Pool]:
    p = Pool(size=256 * PAGE, block_size=PAGE)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pool() -> Iterator[Pool]:
    with new_pool() as p:
        yield p


def fragmented(pool: Pool, sizes: Sequence[int], seed: int = 1) -> ScatterList:
    """A scatter list made of separate allocations: partly used blocks in the middle."""
    sg = pool.alloc(0)
    for i, size in enumerate(sizes):
        piece = pool.alloc(size)
        piece.copy_in(pattern(size, seed + i))
        sg.extend(piece)
    return sg


def caught(aw: Awaitable[None]) -> tuple[type[BaseException], str]:
    async def main() -> tuple[type[BaseException], str]:
        try:
            await aw
        except Exception as exc:
            return type(exc), str(exc)
        raise AssertionError("no exception")

    return asyncio.run(main())


def superset(offset: int, n: int, a: int) -> tuple[int, int]:
    return offset - offset % a, -(-(offset + n) // a) * a


# ---- limits and fit ---------------------------------------------------------------------------


def test_limits_validate() -> None:
    assert ConsumerLimits() == ConsumerLimits(alignment=1, max_segments=1024)
    for bad in (
        {"alignment": 3},
        {"alignment": 0},
        {"alignment": 2 * PAGE},
        {"max_segments": 0},
        {"alignment": 512, "max_segment_size": 700},
    ):
        with pytest.raises(ValueError, match=r"alignment|max_segment"):
            ConsumerLimits(**bad)
    with pytest.raises(AttributeError):
        ConsumerLimits().alignment = 2  # type: ignore[misc]


def test_misfit_reasons(pool: Pool) -> None:
    lim = ConsumerLimits(alignment=512, max_segments=2, max_segment_size=PAGE)
    sg = pool.alloc(3 * PAGE)
    try:
        v = sg.views()
        assert misfit(v[:1], 0, None) is None
        assert misfit(sg.views(0, 1024), 512, lim) is None
        assert misfit(sg.views(0, 1024), 100, lim) == REASON_UNALIGNED  # file offset
        assert misfit(sg.views(0, 1000), 0, lim) == REASON_UNALIGNED  # length
        assert misfit(sg.views(512, 1024), 0, lim) is None  # address 512-aligned
        assert misfit(sg.views(100, 1024), 0, lim) == REASON_UNALIGNED  # address
        assert misfit([memoryview(bytes(512))], 0, lim) == REASON_UNALIGNED  # read-only
        assert misfit([memoryview(b"")], 0, lim) is None  # empty vectors are ignored
        three = [sg.views(i * PAGE, PAGE)[0] for i in range(3)]
        assert misfit(three, 0, lim) == REASON_SEGMENTS
        assert misfit(sg.views(0, 2 * PAGE), 0, lim) == REASON_SEGMENTS  # one long segment
        assert fits(sg.views(0, 2 * PAGE), 0, ConsumerLimits(alignment=PAGE))
        assert misfit(three, 0, ConsumerLimits(alignment=1, max_segments=2)) == REASON_SEGMENTS
    finally:
        sg.release()


# ---- property: bounced I/O equals plain I/O ---------------------------------------------------

sizes_st = st.lists(st.integers(1, 3 * PAGE), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    sizes=sizes_st,
    data=st.data(),
    alignment=st.sampled_from([512, PAGE]),
    max_segments=st.sampled_from([1, 2, 1024]),
)
def test_bounced_read_and_write_match_the_model(
    sizes: list[int], data: st.DataObject, alignment: int, max_segments: int
) -> None:
    with new_pool() as pool:
        _bounced_read_and_write_match_the_model(pool, sizes, data, alignment, max_segments)


def _bounced_read_and_write_match_the_model(
    pool: Pool, sizes: list[int], data: st.DataObject, alignment: int, max_segments: int
) -> None:
    lim = ConsumerLimits(alignment=alignment, max_segments=max_segments)
    sg = fragmented(pool, sizes)
    skip = data.draw(st.integers(0, len(sg) - 1), label="skip")
    n = data.draw(st.integers(1, len(sg) - skip), label="n")
    offset = data.draw(st.integers(0, DISK - n), label="offset")
    views = sg.views(skip, n)
    start, end = superset(offset, n, alignment)
    cons = Consumer(lim)
    stats = pool.stats
    in_use = stats.blocks_in_use
    reason = misfit(views, offset, lim)
    assert reason is not None or (offset % alignment == 0 and n % alignment == 0)

    # Read: exactly the bytes a plain read gives.
    allocs = Allocs(pool)
    before = dict(stats.copies)
    bounced = stats.bounced_ios
    asyncio.run(
        read_bounced(
            cons.read, views, offset, limits=lim, alloc=allocs, stats=stats, reason=reason or "x"
        )
    )
    assert b"".join(views) == cons.data[offset : offset + n]
    assert allocs.asked == [end - start]
    assert stats.blocks_in_use == in_use
    assert stats.bounced_ios == bounced + 1
    assert stats.copies[(reason or "x", "out")] == before.get((reason or "x", "out"), 0) + n
    assert all(op == "read" for op, *_ in cons.calls)

    # Write: exactly [offset, offset + n) changes; the edges are read back first (RMW).
    payload = pattern(n, 5)
    pos = 0
    for v in views:
        v[:] = payload[pos : pos + len(v)]
        pos += len(v)
    expect = bytearray(cons.data)
    expect[offset : offset + n] = payload
    cons.calls.clear()
    allocs.asked.clear()
    asyncio.run(
        write_bounced(
            cons.write,
            views,
            offset,
            read=cons.read,
            limits=lim,
            alloc=allocs,
            stats=stats,
            reason=reason or "x",
            order=write_order(cons),
        )
    )
    assert cons.data == expect
    assert allocs.asked == [end - start]
    assert stats.blocks_in_use == in_use
    assert stats.copies[(reason or "x", "in")] == before.get((reason or "x", "in"), 0) + n
    reads = [c for c in cons.calls if c[0] == "read"]
    edges = (offset != start) + (
        offset + n != end and not (offset != start and end - start == alignment)
    )
    assert len(reads) == edges
    assert sum(c[2] for c in cons.calls if c[0] == "write") == end - start
    assert len(write_order(cons)) == 0
    sg.release()
    assert stats.blocks_in_use == 0


@settings(max_examples=100, deadline=None)
@given(sizes=sizes_st, data=st.data(), alignment=st.sampled_from([1, 512, PAGE]))
def test_read_into_and_write_from_pick_zero_copy_or_bounce(
    sizes: list[int], data: st.DataObject, alignment: int
) -> None:
    with new_pool() as pool:
        _read_into_and_write_from_pick_zero_copy_or_bounce(pool, sizes, data, alignment)


def _read_into_and_write_from_pick_zero_copy_or_bounce(
    pool: Pool, sizes: list[int], data: st.DataObject, alignment: int
) -> None:
    lim = ConsumerLimits(alignment=alignment, max_segments=2)
    sg = fragmented(pool, sizes)
    n = data.draw(st.integers(1, len(sg)), label="n")
    offset = data.draw(st.integers(0, DISK - n), label="offset")
    cons = Consumer(lim)
    stats = pool.stats
    zc, bc = stats.zero_copy_ios, stats.bounced_ios
    copied = stats.copied_bytes
    fit = fits(sg.views(0, n), offset, lim)
    payload = sg.to_bytes(0, n)
    expect = bytearray(cons.data)
    expect[offset : offset + n] = payload

    async def go() -> None:
        await write_from(
            cons.write, sg, n, offset, read=cons.read, limits=lim, order=write_order(cons)
        )
        sg.zero()
        await read_into(cons.read, sg, n, offset, limits=lim)

    asyncio.run(go())
    assert cons.data == expect
    assert sg.to_bytes(0, n) == payload
    # Each backstore I/O is counted exactly once.
    assert (stats.zero_copy_ios - zc, stats.bounced_ios - bc) == ((2, 0) if fit else (0, 2))
    assert stats.copied_bytes - copied == (0 if fit else 2 * n)
    sg.release()
    assert stats.blocks_in_use == 0


def test_five_segments_to_a_two_segment_consumer_bounce(pool: Pool) -> None:
    # Every other block, so no two pieces merge: five page-aligned segments.
    held = [pool.alloc(PAGE) for _ in range(10)]
    sg = pool.alloc(0)
    for i, piece in enumerate(held):
        if i % 2:
            piece.release()
        else:
            piece.copy_in(pattern(PAGE, i))
            sg.extend(piece)
    assert len(sg.views()) == 5
    lim = ConsumerLimits(alignment=PAGE, max_segments=2)
    cons = Consumer(lim)
    payload = sg.to_bytes()
    asyncio.run(write_from(cons.write, sg, 5 * PAGE, PAGE, read=cons.read, limits=lim, order=None))
    assert cons.data[PAGE : 6 * PAGE] == payload
    assert pool.stats.bounced_ios == 1
    assert pool.stats.copies[(REASON_SEGMENTS, "in")] == 5 * PAGE
    assert all(c[3] <= 2 for c in cons.calls)
    sg.release()
    assert pool.stats.blocks_in_use == 0


# ---- errors, cancellation, write ordering -----------------------------------------------------


def test_bounce_is_released_on_consumer_errors(pool: Pool) -> None:
    lim = ConsumerLimits(alignment=PAGE)
    sg = pool.alloc(1000)

    async def boom(offset: int, views: Sequence[memoryview]) -> int:
        raise OSError("medium")

    async def short(offset: int, views: Sequence[memoryview]) -> int:
        return 0

    # Caught inside the loop, as the SCSI layer does: an exception escaping asyncio.run sits in
    # a reference cycle with its task, and its traceback would pin the arena until a gc.
    assert caught(read_into(boom, sg, 1000, 100, limits=lim)) == (OSError, "medium")
    assert caught(write_from(boom, sg, 1000, 100, read=boom, limits=lim)) == (OSError, "medium")
    # A consumer that claims success but moved less must not let stale pool bytes through.
    assert caught(read_into(short, sg, 1000, 100, limits=lim))[0] is ConsumerError
    assert pool.stats.blocks_in_use == sg.nblocks
    assert pool.stats.copied_bytes == 0
    sg.release()


def test_cancellation_waits_for_the_consumer_then_releases(pool: Pool) -> None:
    lim = ConsumerLimits(alignment=PAGE)
    sg = pool.alloc(1000)
    started = threading.Event()
    go_on = threading.Event()

    def blocking_read(offset: int, views: Sequence[memoryview]) -> int:
        started.set()
        go_on.wait(5)
        return sum(len(v) for v in views)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def submit(offset: int, views: Sequence[memoryview]) -> int:
            return await loop.run_in_executor(None, blocking_read, offset, views)

        task = asyncio.ensure_future(read_into(submit, sg, 1000, 100, limits=lim))
        await loop.run_in_executor(None, started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.02)
        # The worker still owns the bounce: it must not be back in the pool yet.
        assert not task.done()
        assert pool.stats.blocks_in_use == sg.nblocks + 1
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert pool.stats.blocks_in_use == sg.nblocks
    sg.release()


def test_concurrent_rmw_writes_to_one_block_both_land(pool: Pool) -> None:
    lim = ConsumerLimits(alignment=PAGE)
    cons = Consumer(lim)
    cons.yield_between = True  # read, then yield, then write: a lost update without ordering
    a = pool.alloc(512)
    b = pool.alloc(512)
    a.copy_in(b"A" * 512)
    b.copy_in(b"B" * 512)
    order = write_order(cons)

    async def main() -> None:
        await asyncio.gather(
            write_from(cons.write, a, 512, 0, read=cons.read, limits=lim, order=order),
            write_from(cons.write, b, 512, 1024, read=cons.read, limits=lim, order=order),
        )

    asyncio.run(main())
    assert cons.data[0:512] == b"A" * 512
    assert cons.data[1024:1536] == b"B" * 512
    assert len(order) == 0
    a.release()
    b.release()


def test_aligned_writes_wait_for_an_rmw_on_their_blocks(pool: Pool) -> None:
    lim = ConsumerLimits(alignment=PAGE)
    cons = Consumer(lim)
    cons.yield_between = True
    small = pool.alloc(512)
    small.copy_in(b"s" * 512)
    whole = pool.alloc(PAGE)
    whole.copy_in(b"W" * PAGE)
    order = write_order(cons)

    async def main() -> None:
        rmw = asyncio.ensure_future(
            write_from(cons.write, small, 512, 512, read=cons.read, limits=lim, order=order)
        )
        await asyncio.sleep(0)  # the RMW has read the block and holds it
        await write_from(cons.write, whole, PAGE, 0, read=cons.read, limits=lim, order=order)
        await rmw

    asyncio.run(main())
    # The aligned write came after the RMW, so it wins entirely.
    assert cons.data[0:PAGE] == b"W" * PAGE
    small.release()
    whole.release()


# ---- through the SCSI layer -------------------------------------------------------------------


class AlignedMem(MemBackstore):
    """A MemBackstore that, like O_DIRECT, refuses buffers breaking its limits."""

    kind: ClassVar[str] = "test-aligned-mem"

    def __init__(self, size: int, limits: ConsumerLimits) -> None:
        super().__init__(size)
        self.limits = limits
        self.seen: list[tuple[int, int]] = []

    def _ok(self, offset: int, bufs: Buffers) -> None:
        assert fits(bufs, offset, self.limits)
        self.seen.append((offset, sum(len(b) for b in bufs)))

    def readv(self, offset: int, bufs: Buffers) -> int:
        self._ok(offset, bufs)
        return super().readv(offset, bufs)

    def writev(self, offset: int, bufs: Buffers) -> int:
        self._ok(offset, bufs)
        return super().writev(offset, bufs)


def rw10(op: int, lba: int, n: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


@settings(max_examples=40, deadline=None)
@given(lba=st.integers(0, 100), nblocks=st.integers(1, 27))
def test_lu_bounces_unaligned_commands(lba: int, nblocks: int) -> None:
    pool = Pool(size=64 * PAGE, block_size=PAGE)
    store = AlignedMem(128 * 512, ConsumerLimits(alignment=PAGE, max_segments=1024))
    store.data[:] = pattern(len(store.data), 3)
    target = ScsiTarget(
        "iqn.2024-01.test:bounce", [LogicalUnit(store, runner=run_inline, identity="b/0")]
    )
    nblocks = min(nblocks, 128 - lba)
    run(target, pool, b"\0" * 6)  # consume the power-on unit attention
    data = pattern(nblocks * 512, lba)
    expect = bytearray(store.data)
    expect[lba * 512 : (lba + nblocks) * 512] = data
    task, _ = run(target, pool, rw10(0x2A, lba, nblocks), data_out=data)
    assert task.status == Status.GOOD, task.sense.hex()
    assert store.data == expect
    task, ch = run(target, pool, rw10(0x28, lba, nblocks), edtl=nblocks * 512)
    assert task.status == Status.GOOD, task.sense.hex()
    assert bytes(ch.data_in) == data
    aligned = lba % 8 == 0 and nblocks % 8 == 0
    assert pool.stats.bounced_ios == (0 if aligned else 2)
    assert pool.stats.zero_copy_ios == (2 if aligned else 0)
    assert pool.stats.blocks_in_use == 0
    pool.close()
