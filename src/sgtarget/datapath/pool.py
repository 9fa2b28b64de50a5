"""The payload pool: one page-aligned MAP_SHARED arena carved into fixed-size blocks.

Every payload byte that crosses sgtarget lives in a pool block: the socket receives into them, the
backstore reads into and writes from them, and Data-In PDUs are sent from them. The arena is a
shared mapping of a memfd: page aligned (usable with O_DIRECT), and a handler process given
``fd`` maps the very same pages, so payload crosses the process boundary without a copy.

Blocks are handed out by ``datapath.blockmap.BlockMap`` (a byte map searched in C below a
threshold that grows with demand, TCMU's ``dbi_thresh``), so a lightly used pool keeps touching
the same low blocks; ``reclaim`` lowers the threshold again when the pool goes idle and gives
the pages above it back to the kernel (TCMU's unmap worker).

Exhaustion is an expected outcome: ``try_alloc`` returns ``None`` and the caller turns that into
flow control (waiting for ``on_free``) or, as a last resort, TASK SET FULL. A reserve of blocks
is kept for unsolicited and immediate data, which arrives whether or not we have room and
cannot wait: ordinary allocations stop short of it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

from sgtarget.datapath.blockmap import BlockMap, memfd_mapping
from sgtarget.datapath.sglist import ScatterList
from sgtarget.datapath.stats import DataPathStats

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_POOL_SIZE = 64 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 64 * 1024

#: The search threshold never drops below this many blocks.
_MIN_THRESH = 64


class PoolExhausted(Exception):
    """Raised by callers that cannot wait for blocks; maps to TASK SET FULL."""


class Pool:
    """A budgeted arena of ``size`` bytes split into blocks of ``block_size`` bytes."""

    __slots__ = (
        "_blocks",
        "_mmap",
        "arena",
        "block_size",
        "fd",
        "nblocks",
        "on_free",
        "reserve_blocks",
        "size",
        "stats",
        "waiting",
    )

    def __init__(self, size: int = DEFAULT_POOL_SIZE, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size <= 0 or block_size % PAGE_SIZE:
            raise ValueError(f"block size must be a positive multiple of {PAGE_SIZE}")
        if size < block_size:
            raise ValueError("pool must hold at least one block")
        self.block_size = block_size
        self.nblocks = size // block_size
        self.size = self.nblocks * block_size
        #: The memfd behind the arena (close-on-exec): pass it to processes that share it.
        self.fd, self._mmap = memfd_mapping("sgtarget-pool", self.size)
        self.arena = memoryview(self._mmap)
        self._blocks = BlockMap(self.nblocks, _MIN_THRESH)
        self.stats = DataPathStats()
        #: Blocks only ``try_alloc(..., reserve=True)`` may take (unsolicited data).
        self.reserve_blocks = 0
        #: Called after blocks are freed (the server wakes allocations waiting for memory).
        self.on_free: Callable[[], None] | None = None
        #: Allocations currently waiting for blocks (maintained by whoever waits).
        self.waiting = 0

    @property
    def free_blocks(self) -> int:
        return self._blocks.free

    def usable_blocks(self, *, reserve: bool = False) -> int:
        """Free blocks an allocation may take (the reserve only for ``reserve=True``)."""
        free = self.free_blocks
        return free if reserve else max(0, free - self.reserve_blocks)

    def under_pressure(self) -> bool:
        """Short of memory: someone waits, or less than a quarter of the pool is usable."""
        # Asked for every PDU header the target sends (MaxCmdSN): no calls inside.
        blocks = self._blocks
        usable = blocks.nblocks - blocks.in_use - self.reserve_blocks
        return self.waiting > 0 or usable < self.nblocks // 4

    def try_alloc_upto(self, nbytes: int) -> ScatterList | None:
        """As many whole blocks as are usable, up to ``nbytes``; ``None`` if not even one."""
        usable = self.usable_blocks()
        if usable == 0:
            self.stats.failed_allocations += 1
            return None
        return self.try_alloc(min(nbytes, usable * self.block_size))

    def blocks_for(self, nbytes: int) -> int:
        return -(-nbytes // self.block_size)

    def try_alloc(self, nbytes: int, *, reserve: bool = False) -> ScatterList | None:
        """A scatter list of ``nbytes`` bytes, or ``None`` if the budget is spent.

        Adjacent blocks are merged into one segment, so a run of free blocks becomes a single
        contiguous entry. Only ``reserve=True`` may dip into the reserve.
        """
        bs = self.block_size
        need = -(-nbytes // bs)
        blocks = self._blocks
        usable = blocks.nblocks - blocks.in_use - (0 if reserve else self.reserve_blocks)
        stats = self.stats
        if need > usable:
            stats.failed_allocations += 1
            return None
        sg = ScatterList(self)
        if need == 1:  # most commands: one block, no run list
            sg.segments.append((blocks.take_one(), 1, nbytes))
            sg.length = nbytes
            sg.nblocks = 1
        else:
            remaining = nbytes
            for idx, run in blocks.take(need):
                take = min(remaining, run * bs)
                sg.append_blocks(idx, run, take)
                remaining -= take
        stats.allocations += 1
        stats.blocks_in_use += need
        stats.peak_blocks_in_use = max(stats.peak_blocks_in_use, stats.blocks_in_use)
        return sg

    def alloc(self, nbytes: int) -> ScatterList:
        sg = self.try_alloc(nbytes)
        if sg is None:
            raise PoolExhausted(nbytes)
        return sg

    def free_run(self, first_block: int, nblocks: int) -> None:
        self._blocks.release(first_block, nblocks)
        self.stats.blocks_in_use -= nblocks
        if self.on_free is not None:
            self.on_free()

    def reclaim(self) -> int:
        """Give pages above the highest block in use back to the kernel; returns blocks freed.

        The search threshold drops to just above that block, so later small allocations stay
        low. ``MADV_REMOVE`` (not ``MADV_DONTNEED``) because the arena is shared memory: only
        removing the pages frees them.
        """
        thresh, freed = self._blocks.shrink()
        if not freed:
            return 0
        bs = self.block_size
        self._mmap.madvise(mmap.MADV_REMOVE, thresh * bs, freed * bs)
        self.stats.reclaimed_blocks += freed
        return freed

    def close(self) -> None:
        self.arena.release()
        self._mmap.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
