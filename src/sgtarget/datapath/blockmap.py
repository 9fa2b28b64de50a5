"""The block allocator shared by the payload pool and copy mode's ring data areas.

One byte per block (0 = free) searched with ``bytearray.find``, which runs in C. The search is
confined below a threshold that grows only when demand needs it (TCMU's ``dbi_thresh``), so a
lightly used area keeps touching the same low blocks and the pages above stay untouched;
``shrink`` lowers it again when the area goes idle, and the owner gives the pages above it back
to the kernel with ``MADV_REMOVE`` (TCMU's unmap worker; a shared mapping only frees pages
that are removed).
"""

from __future__ import annotations

import mmap
import os

_FREE = 0
_USED = 1


def memfd_mapping(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A close-on-exec memfd of ``size`` bytes and its shared mapping (pass the fd to the
    processes that share the memory)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise


class BlockMap:
    """Which of ``nblocks`` blocks are in use; ``take`` and ``release`` runs of them."""

    __slots__ = ("_map", "_min", "in_use", "nblocks", "thresh")

    def __init__(self, nblocks: int, min_thresh: int) -> None:
        self.nblocks = nblocks
        self._map = bytearray(nblocks)
        self._min = min_thresh
        #: Blocks below this index are searched; it grows with demand, ``shrink`` lowers it.
        self.thresh = min(nblocks, min_thresh)
        self.in_use = 0

    @property
    def free(self) -> int:
        return self.nblocks - self.in_use

    def take_one(self) -> int:
        """One free block (``take(1)`` without the run list); the caller checked ``free``."""
        idx = self._map.find(_FREE, 0, self.thresh)
        if idx < 0:
            return self.take(1)[0][0]
        self._map[idx] = _USED
        self.in_use += 1
        return idx

    def take(self, need: int) -> list[tuple[int, int]]:
        """``need`` free blocks as ``(first, count)`` runs, lowest first; the caller has
        checked that ``need <= free``."""
        bmap = self._map
        runs: list[tuple[int, int]] = []
        start = 0
        self.in_use += need
        while need:
            idx = bmap.find(_FREE, start, self.thresh)
            if idx < 0:
                # Grow the search window; the caller's count check guarantees a free block.
                start = self.thresh
                self.thresh = min(self.nblocks, max(self.thresh * 2, self.thresh + need))
                continue
            run = 1
            while run < need and idx + run < self.thresh and bmap[idx + run] == _FREE:
                run += 1
            bmap[idx : idx + run] = b"\x01" * run
            runs.append((idx, run))
            need -= run
            start = idx + run
        return runs

    def release(self, first: int, count: int) -> None:
        """Free a run that ``take`` handed out; ``RuntimeError`` for a double free."""
        bmap = self._map
        if bmap.find(_FREE, first, first + count) >= 0:
            raise RuntimeError(f"double free of blocks {first}+{count}")
        if count == 1:
            bmap[first] = _FREE
        else:
            bmap[first : first + count] = bytes(count)
        self.in_use -= count

    def shrink(self) -> tuple[int, int]:
        """Lower the threshold to just above the highest block in use (not below the minimum):
        ``(new threshold, blocks above it now untouched)``; ``(thresh, 0)`` if it cannot."""
        top = self._map.rfind(_USED, 0, self.thresh) + 1
        new = min(self.nblocks, max(self._min, top))
        if new >= self.thresh:
            return self.thresh, 0
        freed = self.thresh - new
        self.thresh = new
        return new, freed
