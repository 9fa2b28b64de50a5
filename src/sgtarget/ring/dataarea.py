"""Copy mode's TCMU data area: a memfd carved into blocks, handed out by a bitmap.

The kernel's TCMU gives each ring a data area (default 1 GiB, pages allocated on first use)
and copies every command's payload between the command's pages and blocks of it; the
handler sees only the data area. ``DataArea`` is that area for ``handler=copy``: one memfd
per handler process (shared with it by fd), ``size`` bytes in ``block_size`` blocks.

Blocks come from the pool's allocator (``datapath.blockmap.BlockMap``: a search threshold
that grows only with demand, TCMU's ``dbi_thresh``), so a lightly used area touches only its low
pages. ``reclaim`` lowers the threshold again when the area is idle and gives the pages above
it back with ``MADV_REMOVE`` (TCMU's unmap worker).

``alloc`` never grows the area: a full area answers ``None`` and the caller waits for frees
(``on_free``), then gives up with a retryable status. Not thread-safe: one event loop owns it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable

from sgtarget.datapath.blockmap import BlockMap, memfd_mapping

#: Default size of one handler's data area (pages are allocated only when touched).
DEFAULT_DATA_SIZE = 32 * 1024 * 1024
#: Default block: 16 pages, as the pool's blocks (TCMU's data blocks are one page).
DEFAULT_DATA_BLOCK = 64 * 1024
PAGE_SIZE = mmap.PAGESIZE

#: The search threshold never drops below this many blocks.
_MIN_THRESH = 16

Extent = tuple[int, int]


class DataArea:
    """``size`` bytes of shared memory in ``block_size`` blocks; ``alloc``/``free`` extents."""

    __slots__ = (
        "_blocks",
        "_mmap",
        "block_size",
        "buf",
        "fd",
        "nblocks",
        "on_free",
        "peak_blocks_in_use",
        "reclaimed_blocks",
        "size",
    )

    def __init__(self, size: int = DEFAULT_DATA_SIZE, block_size: int = DEFAULT_DATA_BLOCK) -> None:
        if block_size <= 0 or block_size % PAGE_SIZE:
            raise ValueError(f"data block size must be a positive multiple of {PAGE_SIZE}")
        if size < block_size:
            raise ValueError("data area must hold at least one block")
        self.block_size = block_size
        self.nblocks = size // block_size
        self.size = self.nblocks * block_size
        #: The memfd (close-on-exec): pass it to the handler process that shares the area.
        self.fd, self._mmap = memfd_mapping("sgtarget-ring-data", self.size)
        self.buf = memoryview(self._mmap)
        self._blocks = BlockMap(self.nblocks, _MIN_THRESH)
        self.peak_blocks_in_use = 0
        self.reclaimed_blocks = 0
        #: Called after blocks are freed (whoever waits for room retries).
        self.on_free: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    @property
    def blocks_in_use(self) -> int:
        return self._blocks.in_use

    @property
    def free_blocks(self) -> int:
        return self._blocks.free

    def blocks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size)

    def alloc(self, nbytes: int) -> list[Extent] | None:
        """``(offset, length)`` extents covering ``nbytes`` (adjacent blocks merged), or
        ``None`` when the area has too few free blocks now (wait for ``on_free``).

        ``ValueError`` for a request the whole area could never hold, or a closed area.
        """
        if self.closed:
            raise ValueError("data area closed")
        need = self.blocks_for(nbytes)
        if nbytes <= 0:
            return []
        if need > self.nblocks:
            raise ValueError(f"{nbytes} bytes do not fit a data area of {self.size}")
        if need > self.free_blocks:
            return None
        bs = self.block_size
        out: list[Extent] = []
        remaining = nbytes
        for idx, run in self._blocks.take(need):
            take = min(remaining, run * bs)
            out.append((idx * bs, take))
            remaining -= take
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)
        return out

    def free(self, extents: Iterable[Extent]) -> None:
        """Give back extents from ``alloc``; a closed area ignores it (its memory is gone)."""
        if self.closed:
            return
        bs = self.block_size
        freed = 0
        for offset, length in extents:
            if offset % bs or length <= 0 or offset + length > self.size:
                raise ValueError(f"not an extent of this data area: {offset}+{length}")
            count = self.blocks_for(length)
            self._blocks.release(offset // bs, count)
            freed += count
        if freed and self.on_free is not None:
            self.on_free()

    def views(self, extents: Iterable[Extent]) -> list[memoryview]:
        buf = self.buf
        return [buf[off : off + n] for off, n in extents]

    def reclaim(self) -> int:
        """Give pages above the highest block in use back to the kernel; returns blocks freed."""
        if self.closed:
            return 0
        thresh, freed = self._blocks.shrink()
        if not freed:
            return 0
        bs = self.block_size
        self._mmap.madvise(mmap.MADV_REMOVE, thresh * bs, freed * bs)
        self.reclaimed_blocks += freed
        return freed

    def close(self) -> None:
        """Unmap and close the memfd; idempotent. Views handed out must be released first."""
        if self.closed:
            return
        self.buf.release()
        # Views still exported: the mapping goes when the last one is released.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        os.close(self.fd)
        self.fd = -1
