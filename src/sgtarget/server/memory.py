"""Waiting for pool memory: backpressure step (a) of the data path, on the event loop."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from sgtarget.datapath import Pool, PoolExhausted

#: How long a command waits for pool blocks before it gives up with TASK SET FULL.
MEMORY_WAIT = 5.0
#: How long a connection stops reading while immediate data waits for pool blocks.
UNSOLICITED_WAIT = 0.5


class MemoryGate:
    """Allocations waiting for pool blocks, woken in arrival order as blocks are freed.

    Waiting is backpressure step (a): a READ window or an R2T burst simply starts later. Only a
    command that waits longer than ``MEMORY_WAIT`` gets TASK SET FULL. Nobody waits while
    holding blocks (windows are released before the next is asked for), so waiting cannot
    deadlock. A free wakes only the waiters the free blocks can satisfy, first come first
    served, so a crowd of waiters does not all retry (and fail) on every freed block.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        pool.on_free = self._wake

    def _wake(self) -> None:
        waiters = self._waiters
        if not waiters:
            return  # every free of every command lands here: the common case first
        budget = self.pool.usable_blocks()
        while waiters:
            need, fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if need > budget:
                break
            waiters.popleft()
            budget -= need
            fut.set_result(None)

    async def wait(
        self,
        need_blocks: int,
        register: Callable[[asyncio.Future[None]], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Until ``need_blocks`` could be had; raises PoolExhausted after ``timeout``
        (default ``MEMORY_WAIT``) seconds."""
        pool = self.pool
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((need_blocks, fut))
        if register is not None:
            register(fut)
        pool.waiting += 1
        pool.stats.alloc_waits += 1
        try:
            await asyncio.wait_for(fut, MEMORY_WAIT if timeout is None else timeout)
        except TimeoutError:
            raise PoolExhausted("no pool blocks freed in time") from None
        finally:
            pool.waiting -= 1
