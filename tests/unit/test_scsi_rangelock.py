"""RangeLock: exclusion, FIFO fairness, liveness and clean cancellation, against a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgtarget.scsi.rangelock import RangeLock


def conflict(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> bool:
    return (a[2] or b[2]) and max(a[0], b[0]) < min(a[1], b[1])


async def settle() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


def test_shared_ranges_never_wait_and_release_by_value() -> None:
    lock = RangeLock()
    a = lock.try_acquire(0, 10)
    b = lock.try_acquire(0, 10)
    assert a == b == (0, 10, False)
    assert lock.held == [a, b]
    assert a is not None
    lock.release(a)
    assert lock.held == [(0, 10, False)]


def test_exclusive_conflicts_only_where_ranges_overlap() -> None:
    lock = RangeLock()
    assert lock.try_acquire(0, 10, True) == (0, 10, True)
    assert lock.try_acquire(9, 20) is None
    assert lock.try_acquire(10, 20) == (10, 20, False)  # half-open: no overlap
    assert lock.try_acquire(5, 5, True) == (5, 5, True)  # empty ranges conflict with nothing


def test_waiter_blocks_later_conflicting_requests() -> None:
    async def main() -> list[str]:
        lock = RangeLock()
        order: list[str] = []
        shared = lock.try_acquire(0, 8)
        assert shared is not None

        async def take(name: str, start: int, end: int, exclusive: bool) -> None:
            entry = await lock.acquire(start, end, exclusive)
            order.append(name)
            await asyncio.sleep(0)
            lock.release(entry)

        x = asyncio.create_task(take("exclusive", 4, 12, True))
        await settle()
        # Shared and overlapping the queued exclusive: it waits its turn (no starvation)...
        assert lock.try_acquire(10, 11) is None
        late = asyncio.create_task(take("late shared", 10, 11, False))
        # ...while one that overlaps nothing queued passes.
        assert lock.try_acquire(20, 30) is not None
        await settle()
        assert order == []
        lock.release(shared)
        await asyncio.gather(x, late)
        return order

    assert asyncio.run(main()) == ["exclusive", "late shared"]


def test_cancelled_waiter_unblocks_those_behind_it() -> None:
    async def main() -> None:
        lock = RangeLock()
        held = lock.try_acquire(0, 4, True)
        assert held is not None
        blocked = asyncio.create_task(lock.acquire(0, 8, True))
        await settle()
        behind = asyncio.create_task(lock.acquire(6, 8))  # only blocked by the waiter
        await settle()
        assert not behind.done()
        blocked.cancel()
        await settle()
        assert behind.done()
        assert behind.result() == (6, 8, False)
        assert lock.waiting == 0
        lock.release(held)
        lock.release(behind.result())
        assert lock.held == []

    asyncio.run(main())


def test_grant_then_cancel_gives_the_range_back() -> None:
    async def main() -> None:
        lock = RangeLock()
        held = lock.try_acquire(0, 4, True)
        assert held is not None
        waiter = asyncio.create_task(lock.acquire(0, 4, True))
        await settle()
        lock.release(held)  # grants the waiter...
        waiter.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lock.held == []
        assert lock.try_acquire(0, 4, True) is not None

    asyncio.run(main())


def test_hold_releases_on_error() -> None:
    async def main() -> None:
        lock = RangeLock()

        async def fail() -> None:
            async with lock.hold(0, 4):
                assert lock.held == [(0, 4, True)]
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fail()
        assert lock.held == []

    asyncio.run(main())


# ---- property test against a model -------------------------------------------------------------


@dataclass
class Req:
    seq: int
    rng: tuple[int, int, bool]
    task: asyncio.Task[tuple[int, int, bool]] | None = None
    granted_at: int | None = None
    released: bool = False
    cancelled: bool = False


@dataclass
class Model:
    reqs: list[Req] = field(default_factory=list)
    grants: int = 0

    def holding(self) -> list[Req]:
        return [r for r in self.reqs if r.granted_at is not None and not r.released]

    def waiting(self) -> list[Req]:
        return [r for r in self.reqs if r.granted_at is None and not r.cancelled]


requests = st.tuples(st.integers(0, 12), st.integers(0, 5), st.booleans()).map(
    lambda t: ("acquire", t[0], t[0] + t[1], t[2])
)
ops = st.lists(
    st.one_of(requests, st.tuples(st.sampled_from(["release", "cancel"]), st.integers(0, 50))),
    max_size=40,
)


def check(lock: RangeLock, m: Model) -> None:
    holding = m.holding()
    # Exclusion: nothing held conflicts with anything else held.
    for i, a in enumerate(holding):
        for b in holding[i + 1 :]:
            assert not conflict(a.rng, b.rng), (a, b)
    assert sorted(lock.held) == sorted(r.rng for r in holding)
    # Liveness: a request only waits behind a holder or an earlier waiter it conflicts with.
    waiting = m.waiting()
    for w in waiting:
        assert any(conflict(w.rng, h.rng) for h in holding) or any(
            conflict(w.rng, e.rng) for e in waiting if e.seq < w.seq
        ), w
    # FIFO: of two conflicting requests, the later one is never granted first.
    for a in m.reqs:
        for b in m.reqs:
            if a.seq < b.seq and conflict(a.rng, b.rng) and b.granted_at is not None:
                assert a.cancelled or (a.granted_at is not None and a.granted_at < b.granted_at)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_range_lock_against_model(program: list[tuple[object, ...]]) -> None:
    async def main() -> None:
        lock = RangeLock()
        m = Model()

        async def acquire(r: Req) -> tuple[int, int, bool]:
            entry = await lock.acquire(*r.rng)
            r.granted_at = m.grants
            m.grants += 1
            return entry

        for op in program:
            if op[0] == "acquire":
                _, s, e, x = op
                assert isinstance(s, int)
                assert isinstance(e, int)
                assert isinstance(x, bool)
                r = Req(len(m.reqs), (s, e, x))
                m.reqs.append(r)
                r.task = asyncio.create_task(acquire(r))
            else:
                kind, k = op
                assert isinstance(k, int)
                pool = m.holding() if kind == "release" else m.waiting()
                if pool:
                    r = pool[k % len(pool)]
                    if kind == "release":
                        lock.release(r.rng)
                        r.released = True
                    else:
                        assert r.task is not None
                        r.task.cancel()
                        r.cancelled = True
            await settle()
            # A cancel that raced a grant gives the range back: the model drops it too.
            for r in m.reqs:
                if r.cancelled and r.granted_at is not None:
                    r.released = True
            check(lock, m)
        # Draining: releasing every holder eventually grants every live waiter.
        while m.holding():
            for r in m.holding():
                lock.release(r.rng)
                r.released = True
            await settle()
            check(lock, m)
        assert m.waiting() == []
        assert lock.held == []
        assert lock.waiting == 0

    asyncio.run(main())
