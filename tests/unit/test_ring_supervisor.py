"""Supervisor: handler processes die (SIGKILL, a hung command, a broken ring, a crash loop) and
come back; their in-flight commands get BUSY only once they are gone; shutdown leaves nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sgtarget.backstores.base import BackstoreBusy, BackstoreError
from sgtarget.datapath import Pool
from sgtarget.ring import supervisor as supervisor_mod
from sgtarget.ring.backstore import MODES, RingBackstore, RingOptions
from sgtarget.ring.supervisor import Supervisor
from tests.unit import ring_support as support
from tests.unit.ring_support import SIZE, KiB, MiB, make_image, run

QUIRKY = "tests.unit.ring_b2_handlers:QuirkyFileHandler"
FAILING = "tests.unit.ring_b2_handlers:FailingOpenHandler"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def ring_lun(
    pool: Pool, image: Path, mode: str = "copy", *, handler: str = QUIRKY, **kw: Any
) -> contextlib.AbstractAsyncContextManager[RingBackstore]:
    return support.ring_lun(pool, image, mode, handler=handler, **kw)


def sup_of(bs: RingBackstore) -> Supervisor:
    assert bs.supervisor is not None
    return bs.supervisor


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def new_pids(sup: Supervisor, old: set[int], n: int = 1) -> list[int]:
    await wait_for(lambda: len({w.pid for w in sup.workers()} - old) >= n)
    return [w.pid for w in sup.workers() if w.pid not in old]


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_mid_command(pool: Pool, image: Path, tmp_path: Path, mode: str) -> None:
    """A handler killed while it holds a WRITE: the WRITE gets BUSY once the process is gone,
    the next command runs on a restarted process within seconds."""
    started = tmp_path / "started"

    async def main() -> None:
        async with ring_lun(
            pool, image, mode, write_delay="30", started=str(started), timeout=0
        ) as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            (old,) = sup.pids()
            sg = pool.alloc(64 * KiB)
            write = asyncio.ensure_future(io.writev(0, sg.views()))
            await wait_for(started.exists)
            os.kill(old, signal.SIGKILL)
            with pytest.raises(BackstoreBusy):
                await asyncio.wait_for(write, 10)
            assert gone(old)  # reaped before the command was failed
            sg.release()  # safe: nothing can write into these blocks any more
            assert sup.stats.failed_inflight == 1
            started.unlink()
            t0 = time.monotonic()
            out = bytearray(4096)
            await io.readv(0, [memoryview(out)])  # reads are not slowed: no write_delay
            assert time.monotonic() - t0 < 5
            (new,) = await new_pids(sup, {old})
            assert new != old
            assert sup.stats.deaths == 1

    run(main())


def test_forked_helpers_die_with_their_handler(pool: Pool, image: Path, tmp_path: Path) -> None:
    """A handler that forked a helper (which maps the pool too): killing the handler kills its
    process group, so nothing that could write into reused buffers survives it."""
    helper_file = tmp_path / "helper.pid"

    async def main() -> int:
        async with ring_lun(pool, image, "zerocopy", helper=str(helper_file)) as bs:
            sup = sup_of(bs)
            (old,) = sup.pids()
            await wait_for(helper_file.exists)
            helper = int(helper_file.read_text())
            assert not gone(helper)
            os.kill(old, signal.SIGKILL)
            await new_pids(sup, {old})
            return helper

    helper = run(main())
    deadline = time.monotonic() + 5
    while not gone(helper):  # killed; a zombie until init reaps it
        state = Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            break
        assert time.monotonic() < deadline, f"helper {helper} survived its handler ({state})"
        time.sleep(0.02)


def test_hung_handler_times_out(pool: Pool, image: Path) -> None:
    """handler_timeout=1: a write that takes 30 s kills its process; BUSY; restarted."""

    async def main() -> None:
        async with ring_lun(pool, image, "copy", write_delay="30", timeout=1) as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            (old,) = sup.pids()
            t0 = time.monotonic()
            with pytest.raises(BackstoreBusy):
                await io.writev(0, [memoryview(bytes(4096))])
            assert 0.9 < time.monotonic() - t0 < 8
            assert sup.stats.timeouts == 1
            assert gone(old)
            await new_pids(sup, {old})
            out = bytearray(4096)
            await io.readv(0, [memoryview(out)])

    run(main())


def test_broken_ring_restarts(pool: Pool, image: Path) -> None:
    """A handler that corrupts cmd_tail: RingBroken, killed, its command BUSY, restarted."""

    async def main() -> None:
        async with ring_lun(pool, image, "zerocopy", hostile="1") as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            (old,) = sup.pids()
            with pytest.raises(BackstoreBusy):
                await io.writev(0, [memoryview(bytes(4096))])
            assert sup.stats.broken_rings == 1
            assert gone(old)
            await new_pids(sup, {old})
            out = bytearray(b"\x01" * 4096)
            await io.readv(0, [memoryview(out)])  # a read: the hostile write is not run
            assert out == bytes(4096)

    run(main())


def test_crash_loop_gives_up_with_medium_error(
    pool: Pool, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that dies at every start: after GIVE_UP_AFTER quick deaths commands get
    BackstoreError (MEDIUM ERROR) at once instead of waiting for it."""
    monkeypatch.setattr(supervisor_mod, "MAX_BACKOFF", 0.2)

    async def main() -> None:
        async with ring_lun(pool, image, "copy", handler=FAILING) as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            t0 = time.monotonic()
            busy = 0
            error: BackstoreError | None = None
            while error is None:  # as an initiator retries BUSY
                assert time.monotonic() - t0 < 15, "never gave up"
                try:
                    await io.readv(0, [memoryview(bytearray(512))])
                except BackstoreBusy:  # sent to a process that then died at its start
                    busy += 1
                except BackstoreError as exc:
                    error = exc
                else:
                    pytest.fail("a handler that never opens served a read")
            assert "keeps dying" in str(error)
            assert busy <= supervisor_mod.GIVE_UP_AFTER
            assert sup.stats.deaths >= supervisor_mod.GIVE_UP_AFTER

    run(main())


def test_commands_wait_for_a_restart(pool: Pool, image: Path) -> None:
    """A command that arrives while no process is up waits for the next one."""

    async def main() -> None:
        async with ring_lun(pool, image, "copy") as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            (old,) = sup.pids()
            os.kill(old, signal.SIGKILL)
            await wait_for(lambda: not sup.workers())
            data = b"\x42" * 4096
            await io.writev(0, [memoryview(data)])
            out = bytearray(4096)
            await io.readv(0, [memoryview(out)])
            assert out == data

    run(main())


def test_two_handlers_share_the_load_and_survive_one_death(pool: Pool, image: Path) -> None:
    async def main() -> None:
        async with ring_lun(pool, image, "zerocopy", handlers=2) as bs:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            assert len(sup.workers()) == 2
            views = [memoryview(bytes([i]) * 4096) for i in range(32)]
            await asyncio.gather(*(io.writev(i * 4096, [v]) for i, v in enumerate(views)))
            assert all(w.completed > 0 for w in sup.workers())
            victim = sup.workers()[0].pid
            os.kill(victim, signal.SIGKILL)
            await wait_for(lambda: gone(victim) and victim not in sup.pids())
            out = bytearray(32 * 4096)
            await io.readv(0, [memoryview(out)])
            assert out == b"".join(bytes(v) for v in views)
            await io.flush()  # to every live process

    run(main())


def test_clean_stop_finishes_inflight(pool: Pool, image: Path, tmp_path: Path) -> None:
    """Shutdown lets a running WRITE complete (it is acknowledged, and in the file)."""
    started = tmp_path / "started"

    async def main() -> None:
        bs = RingBackstore(
            QUIRKY,
            {"path": str(image), "write_delay": "0.5", "started": str(started)},
            SIZE,
            RingOptions(mode="copy"),
        )
        await bs.start(pool)
        write = asyncio.ensure_future(bs.io(None).writev(0, [memoryview(b"\x99" * 4096)]))  # type: ignore[arg-type]
        await wait_for(started.exists)
        await bs.aclose()
        assert await write == 4096

    run(main())
    assert image.read_bytes()[:4096] == b"\x99" * 4096


def test_waiting_command_moves_to_the_restarted_handler(
    pool: Pool, image: Path, tmp_path: Path
) -> None:
    """A WRITE waiting for data-area room when its handler dies never reached the ring: it
    runs on the restarted handler instead of getting BUSY; the one in flight gets BUSY."""
    started = tmp_path / "started"

    async def main() -> None:
        options = RingOptions(mode="copy", data_size=128 * KiB, timeout=0)  # two blocks
        params = {
            "path": str(image),
            "write_delay": "30",
            "slow_offset": "0",
            "started": str(started),
        }
        bs = RingBackstore(QUIRKY, params, SIZE, options)
        await bs.start(pool)
        try:
            sup = sup_of(bs)
            io = bs.io(None)  # type: ignore[arg-type]
            (old,) = sup.pids()
            first = asyncio.ensure_future(io.writev(0, [memoryview(b"\x01" * (128 * KiB))]))
            await wait_for(started.exists)
            second = asyncio.ensure_future(io.writev(MiB, [memoryview(b"\x02" * 4096)]))
            await asyncio.sleep(0.2)
            assert not second.done()  # waiting for room in the data area
            os.kill(old, signal.SIGKILL)
            with pytest.raises(BackstoreBusy):
                await first
            assert await asyncio.wait_for(second, 10) == 4096
            out = bytearray(4096)
            await io.readv(MiB, [memoryview(out)])
            assert out == b"\x02" * 4096
            assert sup.stats.failed_inflight == 1
        finally:
            await bs.aclose()

    run(main())


def test_full_command_ring_waits_for_room(pool: Pool, image: Path) -> None:
    """A ring too small for the commands in flight: they wait for completions, all succeed."""

    async def main() -> None:
        options = RingOptions(mode="zerocopy", ring_size=1024)  # a handful of entries
        bs = RingBackstore(QUIRKY, {"path": str(image), "write_delay": "0.05"}, SIZE, options)
        await bs.start(pool)
        try:
            io = bs.io(None)  # type: ignore[arg-type]
            views = [memoryview(bytes([i]) * 4096) for i in range(40)]
            await asyncio.gather(*(io.writev(i * 4096, [v]) for i, v in enumerate(views)))
            assert sup_of(bs).stats.ring_full_waits > 0
            out = bytearray(40 * 4096)
            await io.readv(0, [memoryview(out)])
            assert out == b"".join(bytes(v) for v in views)
        finally:
            await bs.aclose()

    run(main())


def test_stop_kills_a_handler_that_does_not_finish(pool: Pool, image: Path, tmp_path: Path) -> None:
    """Shutdown waits ``grace`` for a hung handler, then SIGKILL: its WRITE gets BUSY (never
    acknowledged), and nothing is left behind."""
    started = tmp_path / "started"

    async def main() -> None:
        options = RingOptions(mode="zerocopy")
        params = {"path": str(image), "write_delay": "30", "started": str(started)}
        bs = RingBackstore(QUIRKY, params, SIZE, options)
        await bs.start(pool)
        sup = sup_of(bs)
        (pid,) = sup.pids()
        write = asyncio.ensure_future(bs.io(None).writev(0, [memoryview(bytes(4096))]))  # type: ignore[arg-type]
        await wait_for(started.exists)
        t0 = time.monotonic()
        await sup.stop(grace=0.5)
        assert time.monotonic() - t0 < 5
        with pytest.raises(BackstoreBusy):
            await write
        assert gone(pid)
        await bs.aclose()

    run(main())


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_shutdown_leaves_no_process_and_no_fd(pool: Pool, image: Path) -> None:
    async def main() -> tuple[set[str], set[str], list[int]]:
        await asyncio.sleep(0)  # the loop's own fds exist before counting
        before = _fds()
        pids: list[int] = []
        for mode in MODES:
            async with ring_lun(pool, image, mode, handlers=2) as bs:
                io = bs.io(None)  # type: ignore[arg-type]
                await io.writev(0, [memoryview(bytes(8192))])
                pids += sup_of(bs).pids()
                os.kill(pids[-1], signal.SIGKILL)  # one death and restart on the way
                victim = pids[-1]
                await wait_for(lambda b=bs, v=victim: v not in sup_of(b).pids())
                await wait_for(lambda b=bs: len(sup_of(b).workers()) == 2)
                pids += sup_of(bs).pids()
        return before, _fds(), pids

    before, after, pids = run(main())
    assert all(gone(pid) for pid in pids)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # nothing left to reap either
    assert after <= before


def test_sync_close_kills_everything(pool: Pool, image: Path) -> None:
    """``close()`` on the loop itself (no graceful round trip possible) still reaps all."""

    async def main() -> list[int]:
        bs = RingBackstore(QUIRKY, {"path": str(image)}, SIZE, RingOptions("copy", handlers=2))
        await bs.start(pool)
        pids = sup_of(bs).pids()
        bs.close()
        return pids

    pids = run(main())
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)
