"""Bounce buffers for consumers that cannot take the caller's buffers as they are.

A consumer (a backstore, later a handler process) states its ``ConsumerLimits``: the alignment
its file offset, lengths and buffer addresses need (O_DIRECT) and how many segments one call may
take. Buffers that fit go to it untouched (zero copy). Buffers that do not are *bounced* instead
of failing (seeds 002/003, requirement 7): the data goes through a bounce that is itself a
``ScatterList`` from the pool, so it is built of block-sized, page-aligned pieces and never
needs a contiguous allocation larger than one block (requirement 5), and it obeys the pool
budget because the caller's ``alloc`` hands it out (``DataChannel.alloc``: backpressure, TASK
SET FULL).

- READ: the consumer reads the aligned superset ``[align_down(off), align_up(off + len))`` into
  the bounce; the submitter then copies ``len`` bytes back into the caller's views, using the
  lengths it recorded, never a count the consumer reports.
- WRITE: read-modify-write. The partial head and tail blocks are read into the bounce, the
  caller's bytes copied over them, and the aligned range written. ``WriteOrder`` keeps other
  writes off those blocks meanwhile, or their bytes would be lost.

Every copied byte is counted (``bounce-unaligned`` / ``bounce-segments``, ``in`` / ``out``), and
every backstore I/O is counted once: ``zero_copy_ios`` or ``bounced_ios``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgtarget.datapath.sglist import ScatterList
from sgtarget.datapath.stats import IN, OUT, DataPathStats
from sgtarget.datapath.views import copy_views

if TYPE_CHECKING:
    from sgtarget.datapath.pool import Pool

#: Linux's IOV_MAX: the most vectors one preadv/pwritev takes.
IOV_MAX = 1024
REASON_UNALIGNED = "bounce-unaligned"
REASON_SEGMENTS = "bounce-segments"

#: ``submit(file_offset, views)`` runs one consumer I/O and returns the bytes it moved.
Submit = Callable[[int, Sequence[memoryview]], Awaitable[int]]
#: ``alloc(nbytes)`` gives a scatter list from the pool (``DataChannel.alloc``).
Alloc = Callable[[int], Awaitable[ScatterList]]


class ConsumerError(RuntimeError):
    """A consumer broke its contract (moved fewer bytes than asked without raising)."""


@dataclass(frozen=True, slots=True)
class ConsumerLimits:
    """What one consumer call accepts."""

    #: Alignment of the file offset, of every segment's length and of its address (1: none).
    alignment: int = 1
    #: Most segments in one call (IOV_MAX for preadv/pwritev).
    max_segments: int = IOV_MAX
    #: Longest single segment, or ``None`` for no limit.
    max_segment_size: int | None = None

    def __post_init__(self) -> None:
        a = self.alignment
        if a < 1 or a & (a - 1):
            raise ValueError(f"alignment {a} is not a power of two")
        # Bounces are built of pool blocks, which are page-multiples starting on pages: any
        # alignment up to a page is met by construction, a larger one could not be.
        if a > mmap.PAGESIZE:
            raise ValueError(f"alignment {a} is larger than a page ({mmap.PAGESIZE})")
        if self.max_segments < 1:
            raise ValueError("max_segments must be at least 1")
        mss = self.max_segment_size
        if mss is not None and (mss < a or mss % a):
            raise ValueError(f"max_segment_size {mss} is not a positive multiple of {a}")


def _address(view: memoryview) -> int | None:
    """The address of a view's first byte, or ``None`` if it cannot be had cheaply.

    ``c_char.from_buffer`` on the view itself costs ~0.2 us and needs nothing but the view;
    deriving it from the arena base would need the view's offset into the arena, which a
    memoryview does not expose. Read-only views are refused by ``from_buffer``: they count as
    unaligned, which is always safe (they bounce).
    """
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError, BufferError):
        return None


def misfit(views: Sequence[memoryview], offset: int, limits: ConsumerLimits | None) -> str | None:
    """Why ``views`` at file ``offset`` break ``limits`` (a copy reason), or ``None`` if fine."""
    if limits is None:
        return None
    mask = limits.alignment - 1
    if mask:
        if offset & mask:
            return REASON_UNALIGNED
        for view in views:
            n = view.nbytes
            if n == 0:
                continue  # Linux ignores empty vectors when it checks O_DIRECT alignment
            if n & mask:
                return REASON_UNALIGNED
            addr = _address(view)
            if addr is None or addr & mask:
                return REASON_UNALIGNED
    if len(views) > limits.max_segments:
        return REASON_SEGMENTS
    mss = limits.max_segment_size
    if mss is not None and any(view.nbytes > mss for view in views):
        return REASON_SEGMENTS
    return None


def fits(views: Sequence[memoryview], offset: int, limits: ConsumerLimits | None) -> bool:
    return misfit(views, offset, limits) is None


def _batches(
    views: Sequence[memoryview], offset: int, limits: ConsumerLimits
) -> Iterator[tuple[int, list[memoryview]]]:
    """Consumer calls covering ``views`` at ``offset``, each within the segment limits.

    Bounce pieces are aligned, so every call's offset stays aligned. Usually one call: a
    bounce has a segment per run of adjacent blocks.
    """
    mss = limits.max_segment_size
    batch: list[memoryview] = []
    start = offset
    pos = offset
    for view in views:
        pieces = [view] if mss is None else [view[i : i + mss] for i in range(0, len(view), mss)]
        for piece in pieces:
            if len(batch) == limits.max_segments:
                yield start, batch
                batch = []
                start = pos
            batch.append(piece)
            pos += len(piece)
    if batch:
        yield start, batch


async def _settled(aw: Awaitable[int]) -> int:
    """Await a consumer call; if we are cancelled, still wait for it before returning.

    The consumer may be filling or reading the bounce in a worker thread: freeing the blocks
    while it runs would hand them to someone else under its feet.
    """
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if not fut.done():
            # Its outcome no longer matters; ours (the cancellation) does.
            with contextlib.suppress(BaseException):
                await fut
        raise
    finally:
        # An exception's traceback holds this frame and the task holds the exception: break
        # the cycle, or the pool views in the traceback pin the arena until the next gc.
        del fut


async def _run_consumer(
    submit: Submit, views: Sequence[memoryview], offset: int, limits: ConsumerLimits
) -> None:
    for at, batch in _batches(views, offset, limits):
        want = sum(len(v) for v in batch)
        got = await _settled(submit(at, batch))
        if got != want:
            # Copying back would expose whatever the bounce held before (another command's data).
            raise ConsumerError(f"consumer moved {got} of {want} bytes at {at}")


def _superset(offset: int, n: int, alignment: int) -> tuple[int, int]:
    mask = alignment - 1
    return offset & ~mask, (offset + n + mask) & ~mask


async def read_bounced(
    submit: Submit,
    views: Sequence[memoryview],
    offset: int,
    *,
    limits: ConsumerLimits,
    alloc: Alloc,
    stats: DataPathStats,
    reason: str = REASON_UNALIGNED,
) -> None:
    """Fill ``views`` from file ``offset`` through a bounce the consumer can take."""
    n = sum(v.nbytes for v in views)
    start, end = _superset(offset, n, limits.alignment)
    bounce = await alloc(end - start)
    try:
        await _run_consumer(submit, bounce.views(0, end - start), start, limits)
        copied = copy_views(bounce.views(offset - start, n), views)
    finally:
        bounce.release()
    stats.add_copy(reason, OUT, copied)
    stats.bounced_ios += 1


async def write_bounced(
    submit: Submit,
    views: Sequence[memoryview],
    offset: int,
    *,
    read: Submit,
    limits: ConsumerLimits,
    alloc: Alloc,
    stats: DataPathStats,
    reason: str = REASON_UNALIGNED,
    order: WriteOrder | None = None,
) -> None:
    """Store ``views`` at file ``offset`` through a bounce (read-modify-write of the edges).

    ``order`` (one per consumer) keeps concurrent writes off the edge blocks while they are
    rewritten; without it the caller guarantees no write overlaps.
    """
    a = limits.alignment
    n = sum(v.nbytes for v in views)
    start, end = _superset(offset, n, a)
    size = end - start
    head = offset != start
    tail = offset + n != end
    span = await order.enter(start, end, rmw=head or tail) if order is not None else None
    copied = 0
    try:
        bounce = await alloc(size)
        try:
            if head:
                await _run_consumer(read, bounce.views(0, a), start, limits)
            if tail and not (head and size == a):
                await _run_consumer(read, bounce.views(size - a, a), end - a, limits)
            copied = copy_views(views, bounce.views(offset - start, n))
            await _run_consumer(submit, bounce.views(0, size), start, limits)
        finally:
            bounce.release()
    finally:
        if order is not None and span is not None:
            order.leave(span)
    stats.add_copy(reason, IN, copied)
    stats.bounced_ios += 1


class _Span:
    __slots__ = ("done", "end", "rmw", "start")

    def __init__(self, start: int, end: int, rmw: bool) -> None:
        self.start = start
        self.end = end
        self.rmw = rmw
        self.done: asyncio.Event | None = None


class WriteOrder:
    """Orders overlapping writes to one consumer when one of them is a read-modify-write.

    An RMW reads its edge blocks, patches them and writes them back: a write landing on those
    blocks in between would be undone, so the two wait for each other. Plain writes never wait
    for plain writes (SCSI leaves overlapping concurrent writes unordered), and with no RMW in
    flight a write costs a list append and remove.
    """

    __slots__ = ("__weakref__", "_spans")

    def __init__(self) -> None:
        self._spans: list[_Span] = []

    async def enter(self, start: int, end: int, *, rmw: bool) -> _Span:
        while True:
            for span in self._spans:
                if span.start < end and start < span.end and (rmw or span.rmw):
                    if span.done is None:
                        span.done = asyncio.Event()
                    await span.done.wait()
                    break
            else:
                span = _Span(start, end, rmw)
                self._spans.append(span)
                return span

    def leave(self, span: _Span) -> None:
        self._spans.remove(span)
        if span.done is not None:
            span.done.set()

    def __len__(self) -> int:
        return len(self._spans)


_ORDERS: weakref.WeakKeyDictionary[object, WriteOrder] = weakref.WeakKeyDictionary()


def write_order(consumer: object) -> WriteOrder:
    """The ``WriteOrder`` of ``consumer`` (created on first use, dropped with the consumer)."""
    order = _ORDERS.get(consumer)
    if order is None:
        order = _ORDERS[consumer] = WriteOrder()
    return order


# ---- entry points for the SCSI layer: a scatter list in, one backstore I/O out ----------------


def _pool_of(sg: ScatterList) -> Pool:
    # Package-internal: the scatter list's pool holds the stats and the fallback allocator.
    pool = sg._pool
    if pool is None:
        raise ValueError("scatter list already released")
    return pool


def _alloc_from(pool: Pool) -> Alloc:
    async def alloc(nbytes: int) -> ScatterList:
        return pool.alloc(nbytes)  # no waiting: PoolExhausted becomes TASK SET FULL

    return alloc


async def read_into(
    read: Submit,
    sg: ScatterList,
    n: int,
    offset: int,
    *,
    limits: ConsumerLimits | None,
    alloc: Alloc | None = None,
) -> None:
    """Fill ``sg[0:n]`` from file ``offset``: straight into its views when they fit ``limits``,
    else through a bounce from ``alloc`` (default: the pool, without waiting)."""
    if n == 0:
        return  # nothing to move (an empty O_DIRECT call at an odd offset could even fail)
    views = sg.views(0, n)
    stats = _pool_of(sg).stats
    reason = misfit(views, offset, limits)
    if reason is None:
        await read(offset, views)
        stats.zero_copy_ios += 1
        return
    assert limits is not None
    await read_bounced(
        read,
        views,
        offset,
        limits=limits,
        alloc=alloc or _alloc_from(_pool_of(sg)),
        stats=stats,
        reason=reason,
    )


async def write_from(
    write: Submit,
    sg: ScatterList,
    n: int,
    offset: int,
    *,
    read: Submit,
    limits: ConsumerLimits | None,
    alloc: Alloc | None = None,
    order: WriteOrder | None = None,
) -> None:
    """Store ``sg[0:n]`` at file ``offset``, bouncing (read-modify-write) when the views do
    not fit ``limits``. ``order`` is the consumer's ``WriteOrder``; give it whenever the
    consumer has an alignment, so unbounced writes are ordered against RMWs too."""
    if n == 0:
        return  # nothing to move (an empty O_DIRECT call at an odd offset could even fail)
    views = sg.views(0, n)
    stats = _pool_of(sg).stats
    reason = misfit(views, offset, limits)
    if reason is None:
        if order is None or limits is None or limits.alignment == 1:
            await write(offset, views)
        else:
            span = await order.enter(offset, offset + n, rmw=False)
            try:
                await write(offset, views)
            finally:
                order.leave(span)
        stats.zero_copy_ios += 1
        return
    assert limits is not None
    if limits.alignment == 1:
        order = None  # no edges to rewrite: nothing to order
    await write_bounced(
        write,
        views,
        offset,
        read=read,
        limits=limits,
        alloc=alloc or _alloc_from(_pool_of(sg)),
        stats=stats,
        reason=reason,
        order=order,
    )
