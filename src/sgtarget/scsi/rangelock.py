"""Shared/exclusive locks on ranges of a logical unit, FIFO-fair.

Commands that must be atomic (COMPARE AND WRITE, ORWRITE, WRITE ATOMIC) lock their range
exclusively; every other command that touches the medium (READ and WRITE windows, WRITE SAME,
UNMAP) locks its range shared. Shared holders never wait for each other, so plain I/O only ever
waits when an atomic command overlaps it.

Ranges are half-open ``[start, end)`` integers; the LU uses byte offsets. A request is granted
when it conflicts with no held range *and* with no earlier waiter, so a stream of shared
requests cannot starve an exclusive one (and vice versa), while requests that conflict with
nothing queued pass straight through.

The fast path (a shared request while no exclusive range is held and nobody waits) appends one
tuple to a list; releasing removes it, O(in-flight ranges). Futures exist only for waiters.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

#: A held range: ``(start, end, exclusive)``. Equal tuples are interchangeable on release.
Held = tuple[int, int, bool]


class _Waiter:
    __slots__ = ("end", "exclusive", "fut", "start")

    def __init__(self, start: int, end: int, exclusive: bool, fut: asyncio.Future[None]) -> None:
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self.fut = fut


def _conflict(a: _Waiter, start: int, end: int, exclusive: bool) -> bool:
    return (a.exclusive or exclusive) and max(a.start, start) < min(a.end, end)


class RangeLock:
    """Locks on ``[start, end)`` ranges; not bound to an event loop until someone waits."""

    __slots__ = ("_exclusive", "_held", "_waiters")

    def __init__(self) -> None:
        self._held: list[Held] = []
        #: How many of ``_held`` are exclusive (0 makes shared requests O(1)).
        self._exclusive = 0
        self._waiters: deque[_Waiter] = deque()

    def try_acquire(self, start: int, end: int, exclusive: bool = False) -> Held | None:
        """Take the range now if that is allowed, else ``None`` (then ``await acquire``)."""
        if not self._waiters:
            if not exclusive and not self._exclusive:
                entry = (start, end, False)
                self._held.append(entry)
                return entry
            if not self._conflicts_held(start, end, exclusive):
                return self._grant(start, end, exclusive)
            return None
        if self._conflicts_held(start, end, exclusive) or any(
            _conflict(w, start, end, exclusive) for w in self._waiters
        ):
            return None
        return self._grant(start, end, exclusive)

    async def acquire(self, start: int, end: int, exclusive: bool = False) -> Held:
        """Wait for the range; a cancelled wait leaves nothing held and nobody blocked."""
        entry = self.try_acquire(start, end, exclusive)
        if entry is not None:
            return entry
        waiter = _Waiter(start, end, exclusive, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.fut
        except BaseException:
            if waiter.fut.done() and not waiter.fut.cancelled():
                # Granted, then cancelled before we resumed: give it back.
                self.release((start, end, exclusive))
            else:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                # Later waiters may only have been queued behind this one.
                self._wake()
            raise
        return (start, end, exclusive)

    def release(self, entry: Held) -> None:
        self._held.remove(entry)
        if entry[2]:
            self._exclusive -= 1
        if self._waiters:
            self._wake()

    @asynccontextmanager
    async def hold(self, start: int, end: int, exclusive: bool = True) -> AsyncIterator[None]:
        """``async with lock.hold(a, b):`` for the commands that are not the hot path."""
        entry = await self.acquire(start, end, exclusive)
        try:
            yield
        finally:
            self.release(entry)

    @property
    def held(self) -> list[Held]:
        """The ranges held now (a copy; for tests and debugging)."""
        return list(self._held)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _conflicts_held(self, start: int, end: int, exclusive: bool) -> bool:
        # max/min rather than two comparisons: an empty range overlaps nothing.
        return any((x or exclusive) and max(s, start) < min(e, end) for s, e, x in self._held)

    def _grant(self, start: int, end: int, exclusive: bool) -> Held:
        entry = (start, end, exclusive)
        self._held.append(entry)
        if exclusive:
            self._exclusive += 1
        return entry

    def _wake(self) -> None:
        """Grant, in arrival order, every waiter that conflicts with nothing before it."""
        blocked: list[_Waiter] = []
        for w in list(self._waiters):
            if w.fut.done():  # cancelled while queued; its task cleans up the rest
                self._waiters.remove(w)
                continue
            if self._conflicts_held(w.start, w.end, w.exclusive) or any(
                _conflict(b, w.start, w.end, w.exclusive) for b in blocked
            ):
                blocked.append(w)
                continue
            self._waiters.remove(w)
            self._grant(w.start, w.end, w.exclusive)
            w.fut.set_result(None)
