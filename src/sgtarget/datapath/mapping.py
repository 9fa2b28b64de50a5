"""How a consumer (a backstore, or a handler process over a shared ring) sees a command's buffers.

A mapping turns a byte range of a scatter list into entries ``(offset, length)`` into a shared
buffer the consumer can see -- what goes into a TCMU iovec as offsets into the shared map.

``IdentityMapping``: the consumer sees the pool arena itself, so the entries are the arena
offsets of the scatter entries. Zero copy; mapping costs one pass over the segments.

``WindowMapping``: the consumer may only see a separate shared bounce window (an untrusted
handler, like the host of an isolated VM behind swiotlb; seed 004). The window follows swiotlb's
rules (kernel/dma/swiotlb.c):

* the window is cut into slots (2 KiB); one mapping is a run of at most ``max_slots`` (128)
  contiguous slots that never crosses a ``max_slots`` boundary (swiotlb's IO_TLB_SEGSIZE
  segments), so the largest mapping is ``max_slots * slot_size - roundup(min_align_mask,
  slot_size)`` bytes;
* mapping is per scatter entry (dma_map_sg), not per page; an entry longer than the largest
  mapping is split into several pieces, each mapped contiguously;
* ``orig & min_align_mask`` is preserved in the window offset, where ``orig`` is the arena
  offset of the original bytes: the consumer sees the same offset within its page/granule. The
  low bits come from an offset into the first slot, the high bits from choosing the slot;
* pieces of a page or more start page-aligned in the window (besides the preserved bits).
  swiotlb only does this when the device has no min_align_mask; here it always applies, so the
  rule holds for every consumer;
* mapping always copies the original into the window, also when the consumer is only going to
  write it (swiotlb's fix for leaking stale window bytes: bytes the consumer does not write come
  back unchanged); unmap copies back when the consumer may have written;
* running out of window is transient: ``WindowFull`` (a ``PoolExhausted``, so callers turn it
  into a retry or TASK SET FULL) after freeing every piece already mapped for that call.

Not thread-safe: one event loop owns a mapping.
"""

from __future__ import annotations

import enum
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sgtarget.datapath.pool import PAGE_SIZE, Pool, PoolExhausted
from sgtarget.datapath.sglist import ScatterList

DEFAULT_SLOT_SIZE = 2048
DEFAULT_MAX_SLOTS = 128

_FREE = 0
_USED = 1

#: Copy accounting reason in the pool's ``DataPathStats``.
COPY_REASON = "window-map"
_ZEROS = memoryview(bytes(64 * 1024))


class MapDirection(enum.Enum):
    """Which way the data goes, seen from the consumer."""

    #: The consumer reads (WRITE commands' data): copied in at map.
    TO_CONSUMER = "to"
    #: The consumer writes (READ commands): pre-copied in at map, copied back at unmap.
    FROM_CONSUMER = "from"
    BIDIRECTIONAL = "both"


class WindowFull(PoolExhausted):
    """The bounce window has no room now; retry after unmaps (TASK SET FULL / queue full)."""


@dataclass(slots=True)
class MappingStats:
    maps: int = 0
    unmaps: int = 0
    live_mappings: int = 0
    #: ``map`` calls that failed for lack of window (injected failures included).
    map_failures: int = 0
    #: Window slots (zero for the identity mapping).
    total_slots: int = 0
    slots_in_use: int = 0
    peak_slots_in_use: int = 0


class Mapped:
    """One command's buffers as the consumer sees them: ``entries`` index into ``buffer``."""

    __slots__ = ("_arena_offsets", "_owner", "_slots", "buffer", "copied", "direction", "entries")

    def __init__(self, owner: object, buffer: memoryview, direction: MapDirection) -> None:
        self._owner: object | None = owner
        #: The shared memory the consumer sees (arena or window).
        self.buffer = buffer
        self.direction = direction
        #: (offset into ``buffer``, length) per mapped piece, in scatter-list order.
        self.entries: list[tuple[int, int]] = []
        #: Arena offset of each piece's original bytes.
        self._arena_offsets: list[int] = []
        #: (first slot, slot count) per piece; empty for the identity mapping.
        self._slots: list[tuple[int, int]] = []
        #: Bytes copied for this mapping so far (in at map, out at unmap).
        self.copied = 0

    @property
    def live(self) -> bool:
        return self._owner is not None

    @property
    def length(self) -> int:
        return sum(n for _off, n in self.entries)

    def views(self) -> list[memoryview]:
        """The consumer's views of the mapped bytes, one per entry."""
        if self._owner is None:
            raise ValueError("mapping already unmapped")
        buf = self.buffer
        return [buf[off : off + n] for off, n in self.entries]

    def __repr__(self) -> str:
        return f"Mapped({self.direction.name}, entries={self.entries!r}, live={self.live})"


class Mapping(Protocol):
    """What callers use; they need not know whether the consumer sees the pool or a window."""

    @property
    def buffer(self) -> memoryview:
        """The shared memory that mapped entries index into."""
        ...

    @property
    def stats(self) -> MappingStats: ...

    def map(self, sg: ScatterList, offset: int, length: int, direction: MapDirection) -> Mapped:
        """Map ``length`` bytes of ``sg`` from ``offset``; may raise ``PoolExhausted``."""
        ...

    def unmap(self, mapped: Mapped) -> None:
        """Copy back if needed and release; unmapping twice raises ``ValueError``."""
        ...


def _segments(pool: Pool, sg: ScatterList, offset: int, length: int) -> list[tuple[int, int]]:
    """(arena offset, length) of each scatter entry piece covering ``offset``..+``length``."""
    if sg.released:
        raise ValueError("scatter list already released")
    # Offsets are computed from block numbers, so a list from another pool would alias this
    # arena; the check reads the list's owner directly because ScatterList does not expose it.
    if sg._pool is not pool:
        raise ValueError("scatter list belongs to another pool")
    if offset < 0 or length < 0 or offset + length > sg.length:
        raise ValueError(f"range {offset}+{length} outside scatter list of {sg.length}")
    bs = pool.block_size
    out: list[tuple[int, int]] = []
    for first, _count, nbytes in sg.segments:
        if length == 0:
            break
        if offset >= nbytes:
            offset -= nbytes
            continue
        n = min(nbytes - offset, length)
        out.append((first * bs + offset, n))
        length -= n
        offset = 0
    return out


class IdentityMapping:
    """The consumer sees the pool blocks themselves: entries are arena offsets, nothing copied."""

    __slots__ = ("_pool", "stats")

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.stats = MappingStats()

    @property
    def buffer(self) -> memoryview:
        return self._pool.arena

    def map(self, sg: ScatterList, offset: int, length: int, direction: MapDirection) -> Mapped:
        mapped = Mapped(self, self._pool.arena, direction)
        segs = _segments(self._pool, sg, offset, length)
        mapped.entries = segs
        mapped._arena_offsets = [off for off, _n in segs]
        st = self.stats
        st.maps += 1
        st.live_mappings += 1
        return mapped

    def unmap(self, mapped: Mapped) -> None:
        if mapped._owner is not self:
            raise ValueError("not a live mapping of this identity mapping")
        mapped._owner = None
        self.stats.unmaps += 1
        self.stats.live_mappings -= 1


class WindowMapping:
    """Bounce through a separate shared window with swiotlb's slot rules (module docstring).

    ``fail_alloc`` is a fault-injection hook: called before each slot-run allocation, a true
    result makes that allocation fail as if the window were full.
    """

    __slots__ = (
        "_index",
        "_mmap",
        "_pool",
        "_slot_map",
        "buffer",
        "fail_alloc",
        "fd",
        "max_mapping_size",
        "max_slots",
        "min_align_mask",
        "nslots",
        "slot_size",
        "stats",
    )

    def __init__(
        self,
        pool: Pool,
        window_size: int,
        *,
        slot_size: int = DEFAULT_SLOT_SIZE,
        max_slots: int = DEFAULT_MAX_SLOTS,
        min_align_mask: int = 0,
        fail_alloc: Callable[[], bool] | None = None,
    ) -> None:
        if slot_size <= 0 or slot_size & (slot_size - 1):
            raise ValueError("slot size must be a power of two")
        if window_size < slot_size or window_size % slot_size:
            raise ValueError(f"window size must be a positive multiple of {slot_size}")
        # Powers of two keep every aligned run inside one max_slots segment, so any single
        # piece fits an empty window: WindowFull is then always transient.
        if max_slots <= 0 or max_slots & (max_slots - 1):
            raise ValueError("max_slots must be a power of two")
        if min_align_mask < 0 or min_align_mask & (min_align_mask + 1):
            raise ValueError("min_align_mask must be 2**k - 1")
        self._pool = pool
        self.slot_size = slot_size
        self.nslots = window_size // slot_size
        self.max_slots = max_slots
        self.min_align_mask = min_align_mask
        run = min(max_slots, self.nslots)
        # swiotlb_max_mapping_size: the preserved offset may use up to roundup(mask) bytes.
        self.max_mapping_size = run * slot_size - (-(-min_align_mask // slot_size) * slot_size)
        if self.max_mapping_size <= 0:
            raise ValueError("min_align_mask leaves no room for a mapping")
        # A memfd, so a handler process given ``fd`` maps the window (and nothing else).
        self.fd = os.memfd_create("sgtarget-window", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.nslots * slot_size)
            self._mmap = mmap.mmap(self.fd, self.nslots * slot_size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.buffer = memoryview(self._mmap)
        self._slot_map = bytearray(self.nslots)
        # Next-fit start, like swiotlb's area->index: recently freed slots rest a while.
        self._index = 0
        self.fail_alloc = fail_alloc
        self.stats = MappingStats(total_slots=self.nslots)

    def _placement(self, orig: int, n: int) -> tuple[int, int, int, int]:
        """(offset in first slot, slots, stride, residue) for ``n`` bytes at arena ``orig``.

        The run must start at a slot index ``residue`` modulo ``stride``: that honours the
        allocation alignment and the preserved bits above the in-slot offset.
        """
        slot = self.slot_size
        align_mask = slot - 1
        if n >= PAGE_SIZE:
            align_mask |= PAGE_SIZE - 1
        mask = self.min_align_mask
        offset = orig & mask & align_mask
        high = orig & mask & ~align_mask
        stride = ((align_mask | mask) + 1) // slot
        return offset, -(-(offset + n) // slot), stride, high // slot

    def _alloc(self, orig: int, n: int) -> tuple[int, int, int]:
        """Reserve slots for one piece: (window offset, first slot, slot count)."""
        offset, need, stride, residue = self._placement(orig, n)
        st = self.stats
        hook = self.fail_alloc
        if (hook is not None and hook()) or need > self.nslots - st.slots_in_use:
            raise WindowFull(n)
        bmap = self._slot_map
        total = self.nslots
        seg = self.max_slots
        ncand = (total - residue + stride - 1) // stride
        k = max(0, -(-(self._index - residue) // stride)) % ncand
        tried = 0
        while tried < ncand:
            first = residue + k * stride
            end = first + need
            step = 1
            if end <= total and first // seg == (end - 1) // seg:
                used = bmap.rfind(_USED, first, end)
                if used < 0:
                    bmap[first:end] = b"\x01" * need
                    st.slots_in_use += need
                    st.peak_slots_in_use = max(st.peak_slots_in_use, st.slots_in_use)
                    self._index = end % total
                    return first * self.slot_size + offset, first, need
                # No run starting at or before the last used slot can fit.
                step = (used - residue) // stride + 1 - k
            if k + step >= ncand:
                tried += ncand - k
                k = 0
            else:
                tried += step
                k += step
        raise WindowFull(n)

    def _free(self, first: int, count: int) -> None:
        bmap = self._slot_map
        if bmap.find(_FREE, first, first + count) >= 0:
            raise RuntimeError(f"double free of window slots {first}+{count}")
        bmap[first : first + count] = bytes(count)
        self.stats.slots_in_use -= count

    def map(self, sg: ScatterList, offset: int, length: int, direction: MapDirection) -> Mapped:
        return self.map_segments(_segments(self._pool, sg, offset, length), direction)

    def map_segments(
        self,
        segments: Sequence[tuple[int, int]],
        direction: MapDirection,
        *,
        zero: bool = False,
    ) -> Mapped:
        """Map ``(arena offset, length)`` segments of the pool arena, as ``map`` maps a
        scatter list's entries (for callers that hold arena views, not scatter lists).

        ``zero``: the consumer gets zeros instead of a copy of the original bytes -- for a
        READ whose buffer holds nothing to preserve: no stale byte shows and nothing is copied
        in (unmap still copies all of it back, so the original ends up zeros plus the data).
        """
        pool = self._pool
        for orig, n in segments:
            if orig < 0 or n < 0 or orig + n > pool.size:
                raise ValueError(f"segment {orig}+{n} outside the pool arena of {pool.size}")
        pieces: list[tuple[int, int]] = []
        limit = self.max_mapping_size
        for orig, n in segments:
            # An entry longer than one mapping is split; every piece starts a new run.
            for start in range(0, n, limit):
                pieces.append((orig + start, min(limit, n - start)))
        need = sum(self._placement(orig, n)[1] for orig, n in pieces)
        if need > self.nslots:
            # Could never fit, however long the caller waited: not a transient condition.
            raise ValueError(f"mapping needs {need} slots, the window has {self.nslots}")
        mapped = Mapped(self, self.buffer, direction)
        st = self.stats
        try:
            for orig, n in pieces:
                win, first, count = self._alloc(orig, n)
                mapped.entries.append((win, n))
                mapped._arena_offsets.append(orig)
                mapped._slots.append((first, count))
        except WindowFull:
            for first, count in mapped._slots:
                self._free(first, count)
            st.map_failures += 1
            raise
        # Copy only once every piece has room: a failed map costs no copying. Always copy in,
        # even for FROM_CONSUMER, so unwritten bytes come back unchanged (and nothing stale
        # from an earlier mapping shows through).
        arena = pool.arena
        window = self.buffer
        if zero:
            for win, n in mapped.entries:
                for at in range(win, win + n, len(_ZEROS)):
                    end = min(win + n, at + len(_ZEROS))
                    window[at:end] = _ZEROS[: end - at]
            copied = 0
        else:
            for (win, n), orig in zip(mapped.entries, mapped._arena_offsets, strict=True):
                window[win : win + n] = arena[orig : orig + n]
            copied = sum(n for _win, n in pieces)
        pool.stats.add_copy(COPY_REASON, "in", copied)
        mapped.copied = copied
        st.maps += 1
        st.live_mappings += 1
        return mapped

    def unmap(self, mapped: Mapped, *, discard: bool = False) -> None:
        """Copy back (unless the consumer only read, or ``discard``: its result is not
        wanted, e.g. it failed) and free the slots."""
        if mapped._owner is not self:
            raise ValueError("not a live mapping of this window")
        mapped._owner = None
        if mapped.direction is not MapDirection.TO_CONSUMER and not discard:
            arena = self._pool.arena
            window = self.buffer
            back = 0
            for (win, n), orig in zip(mapped.entries, mapped._arena_offsets, strict=True):
                arena[orig : orig + n] = window[win : win + n]
                back += n
            self._pool.stats.add_copy(COPY_REASON, "out", back)
            mapped.copied += back
        for first, count in mapped._slots:
            self._free(first, count)
        st = self.stats
        st.unmaps += 1
        st.live_mappings -= 1

    def close(self) -> None:
        self.buffer.release()
        self._mmap.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
