"""The payload pool: one page-aligned MAP_SHARED arena carved into fixed-size blocks.

Every payload byte that crosses sgtarget lives in a pool block: the socket receives into them, the
backstore reads into and writes from them, and Data-In PDUs are sent from them. Because the arena
is an anonymous shared mapping it is page aligned (usable with O_DIRECT) and can be shared with a
handler process without a copy.

Blocks are handed out by a byte map (one byte per block, 0 = free) searched with
``bytearray.find``, which runs in C. The search is confined below a threshold that grows only
when demand needs it (TCMU's ``dbi_thresh``), so a lightly used pool keeps touching the same low
blocks and the pages above stay untouched. Exhaustion is an expected outcome: ``try_alloc``
returns ``None`` and the caller turns that into flow control or TASK SET FULL.
"""

from __future__ import annotations

import mmap

from sgtarget.datapath.sglist import ScatterList
from sgtarget.datapath.stats import DataPathStats

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_POOL_SIZE = 64 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024

_FREE = 0
_USED = 1


class PoolExhausted(Exception):
    """Raised by callers that cannot wait for blocks; maps to TASK SET FULL."""


PoolStats = DataPathStats


class Pool:
    """A budgeted arena of ``size`` bytes split into blocks of ``block_size`` bytes."""

    __slots__ = (
        "_map",
        "_mmap",
        "_thresh",
        "arena",
        "block_size",
        "nblocks",
        "size",
        "stats",
    )

    def __init__(self, size: int = DEFAULT_POOL_SIZE, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0 or block_size % PAGE_SIZE:
            raise ValueError(f"block size must be a positive multiple of {PAGE_SIZE}")
        if size < block_size:
            raise ValueError("pool must hold at least one block")
        self.block_size = block_size
        self.nblocks = size // block_size
        self.size = self.nblocks * block_size
        self._mmap = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED)
        self.arena = memoryview(self._mmap)
        self._map = bytearray(self.nblocks)
        # Search the first blocks only until demand pushes past them.
        self._thresh = min(self.nblocks, 64)
        self.stats = PoolStats()

    @property
    def free_blocks(self) -> int:
        return self.nblocks - self.stats.blocks_in_use

    def blocks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size)

    def try_alloc(self, nbytes: int) -> ScatterList | None:
        """A scatter list of at least ``nbytes`` bytes, or ``None`` if the budget is spent.

        Adjacent blocks are merged into one segment, so a run of free blocks becomes a single
        contiguous entry.
        """
        need = self.blocks_for(nbytes)
        if need > self.free_blocks:
            self.stats.failed_allocations += 1
            return None
        bmap = self._map
        sg = ScatterList(self)
        remaining = nbytes
        start = 0
        bs = self.block_size
        while need:
            idx = bmap.find(_FREE, start, self._thresh)
            if idx < 0:
                # Grow the search window; the budget check above guarantees a free block exists.
                start = self._thresh
                self._thresh = min(self.nblocks, max(self._thresh * 2, self._thresh + need))
                continue
            run = 1
            while run < need and idx + run < self._thresh and bmap[idx + run] == _FREE:
                run += 1
            bmap[idx : idx + run] = b"\x01" * run
            take = min(remaining, run * bs)
            sg.append_blocks(idx, run, take)
            remaining -= take
            need -= run
            start = idx + run
        self.stats.allocations += 1
        self.stats.blocks_in_use += sg.nblocks
        self.stats.peak_blocks_in_use = max(self.stats.peak_blocks_in_use, self.stats.blocks_in_use)
        return sg

    def alloc(self, nbytes: int) -> ScatterList:
        sg = self.try_alloc(nbytes)
        if sg is None:
            raise PoolExhausted(nbytes)
        return sg

    def free_run(self, first_block: int, nblocks: int) -> None:
        bmap = self._map
        if bmap.find(_FREE, first_block, first_block + nblocks) >= 0:
            raise RuntimeError(f"double free of pool blocks {first_block}+{nblocks}")
        bmap[first_block : first_block + nblocks] = bytes(nblocks)
        self.stats.blocks_in_use -= nblocks

    def close(self) -> None:
        self.arena.release()
        self._mmap.close()
