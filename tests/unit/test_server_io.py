"""The zero-copy writer and the memory gate, on a real event loop and socket pair."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sgtarget.datapath import Pool, PoolExhausted, ScatterList
from sgtarget.server import memory
from sgtarget.server.memory import MemoryGate
from sgtarget.server.sender import ZeroCopyWriter


def test_writer_sends_everything_in_order_and_releases_only_after_the_kernel_took_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = Pool(8 * 1024 * 1024, 64 * 1024)
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        b.setblocking(False)
        paused: list[bool] = []
        writer = ZeroCopyWriter(
            loop,
            a,
            on_error=lambda exc: pytest.fail(str(exc)),
            pause=lambda: paused.append(True),
            resume=lambda: paused.append(False),
        )
        payload = os.urandom(5 * 1024 * 1024)  # more than the 4 MiB high-water mark
        sgs: list[ScatterList] = []
        expected = b""
        for i in range(5):
            sg = pool.alloc(1024 * 1024)
            sg.copy_in(payload[i * 1024 * 1024 : (i + 1) * 1024 * 1024])
            header = bytes([i]) * 48
            writer.send([header, *sg.views()], [sg])
            sgs.append(sg)
            expected += header + payload[i * 1024 * 1024 : (i + 1) * 1024 * 1024]
        copied_before = pool.stats.copied_bytes
        # The kernel cannot hold 5 MiB: the tail is queued as views, blocks still owned.
        assert writer.pending > 0
        assert not sgs[-1].released
        received = bytearray()
        while len(received) < len(expected):
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            received += chunk
        done = asyncio.Event()
        writer.when_drained(done.set)
        await asyncio.wait_for(done.wait(), 5)
        assert bytes(received) == expected
        assert all(sg.released for sg in sgs)
        assert pool.stats.blocks_in_use == 0
        assert pool.stats.copied_bytes == copied_before  # the writer itself copied nothing
        assert paused == [True, False]  # over the high-water mark, then drained
        writer.close()
        b.close()

    asyncio.run(main())


def test_writer_close_releases_what_is_still_queued() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = Pool(4 * 1024 * 1024, 64 * 1024)
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        writer = ZeroCopyWriter(
            loop, a, on_error=lambda exc: None, pause=lambda: None, resume=lambda: None
        )
        sg = pool.alloc(2 * 1024 * 1024)
        writer.send(sg.views(), [sg])
        assert sg.nblocks == 32  # still owned: ``released`` would narrow for mypy
        assert pool.stats.blocks_in_use == 32
        writer.close()
        assert sg.released
        # After close, sends release at once and write nothing.
        late = pool.alloc(100)
        writer.send(late.views(), [late])
        assert late.released
        b.close()

    asyncio.run(main())


def test_memory_gate_wakes_waiters_in_order_as_far_as_the_freed_blocks_go() -> None:
    async def main() -> None:
        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        pool = Pool(8 * 4096, 4096)
        gate = MemoryGate(pool)
        hog = [pool.alloc(4096) for _ in range(8)]
        order: list[str] = []

        async def want(name: str, blocks: int) -> None:
            await gate.wait(blocks)
            order.append(name)

        big = asyncio.create_task(want("big", 3))
        small = asyncio.create_task(want("small", 1))
        await settle()
        assert pool.waiting == 2
        hog.pop().release()  # one block: not enough for the first in line
        await settle()
        assert order == []
        hog.pop().release()
        hog.pop().release()  # three: the first in line, and nothing left for the next
        await settle()
        assert order == ["big"]
        hog.pop().release()
        await settle()
        assert order == ["big", "small"]
        await asyncio.gather(big, small)
        assert pool.waiting == 0
        assert pool.stats.alloc_waits == 2
        for sg in hog:
            sg.release()

    asyncio.run(main())


def test_memory_gate_gives_up_with_a_typed_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "MEMORY_WAIT", 0.01)

    async def main() -> None:
        pool = Pool(4096, 4096)
        gate = MemoryGate(pool)
        hog = pool.alloc(4096)
        with pytest.raises(PoolExhausted):
            await gate.wait(1)
        assert pool.waiting == 0
        hog.release()

    asyncio.run(main())
