"""RingBackstore: each data mode round-trips through a real handler process; copy accounting;
no stale bytes reach a handler or an initiator; the data area allocator; the handler keys."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import BackstoreError
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.null import NullBackstore
from sgtarget.cli.specs import build_backstore, parse_lun_spec
from sgtarget.datapath import Pool
from sgtarget.datapath.mapping import MapDirection, WindowMapping
from sgtarget.ring import backstore as ring_backstore
from sgtarget.ring.backstore import (
    COPY_REASON,
    MODES,
    RingBackstore,
    RingOptions,
    pop_ring_options,
)
from sgtarget.ring.dataarea import DataArea
from tests.unit.ring_support import SIZE, KiB, MiB, make_image, ring_lun, run

QUIRKY = "tests.unit.ring_b2_handlers:QuirkyFileHandler"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- the modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_pool_views(pool: Pool, image: Path, mode: str) -> None:
    """Data written from pool blocks reads back into other pool blocks and is in the file."""
    data = pattern(3 * MiB + 512, 1)  # more than one ring command (1 MiB each)

    async def main() -> None:
        async with ring_lun(pool, image, mode) as bs:
            io = bs.io(None)  # type: ignore[arg-type]  # a ring needs no runner
            src = pool.alloc(len(data))
            src.copy_in(data)
            assert await io.writev(8192, src.views()) == len(data)
            dst = pool.alloc(len(data))
            dst.views()[0][:] = b"\xaa" * len(dst.views()[0])
            assert await io.readv(8192, dst.views()) == len(data)
            assert dst.to_bytes() == data
            await io.flush()
            src.release()
            dst.release()

    run(main())
    assert image.read_bytes()[8192 : 8192 + len(data)] == data


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_foreign_buffers(pool: Pool, image: Path, mode: str) -> None:
    """Buffers outside the pool arena (bytearrays, read-only bytes) work in every mode."""
    data = pattern(200 * KiB, 2)

    async def main() -> None:
        async with ring_lun(pool, image, mode) as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            view = memoryview(data)
            await io.writev(0, [view[: 100 * KiB], view[100 * KiB :]])
            out = bytearray(len(data))
            await io.readv(0, [memoryview(out)])
            assert out == data

    run(main())
    assert pool.stats.blocks_in_use == 0


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_direct_io(pool: Pool, image: Path, mode: str) -> None:
    """direct=1 reaches the handler (O_DIRECT): every mode hands it page-aligned buffers."""
    try:
        FileBackstore(image, direct=True, lock=False).close()
    except BackstoreError as exc:
        pytest.skip(str(exc))
    data = pattern(1 * MiB + 64 * KiB, 7)

    async def main() -> None:
        async with ring_lun(pool, image, mode, direct="1") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(len(data))
            sg.copy_in(data, reason="test")
            await io.writev(64 * KiB, sg.views())
            out = bytearray(len(data))
            await io.readv(64 * KiB, [memoryview(out)])
            assert out == data
            sg.release()

    run(main())


def test_copy_mode_counts_copies(pool: Pool, image: Path) -> None:
    data = pattern(512 * KiB, 3)

    async def main() -> None:
        async with ring_lun(pool, image, "copy") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(len(data))
            sg.copy_in(data, reason="test")
            await io.writev(0, sg.views())
            await io.readv(0, sg.views())
            sg.release()

    run(main())
    copies = pool.stats.copies
    assert copies[(COPY_REASON, "in")] == len(data)
    assert copies[(COPY_REASON, "out")] == len(data)


def test_zerocopy_copies_nothing(pool: Pool, image: Path) -> None:
    data = pattern(512 * KiB, 4)

    async def main() -> None:
        async with ring_lun(pool, image, "zerocopy") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(len(data))
            sg.copy_in(data, reason="test")
            before = pool.stats.copied_bytes
            await io.writev(0, sg.views())
            await io.readv(0, sg.views())
            assert sg.to_bytes() == data
            assert pool.stats.copied_bytes == before
            sg.release()

    run(main())


def test_isolated_mode_copies_through_the_window(pool: Pool, image: Path) -> None:
    data = pattern(256 * KiB, 5)

    async def main() -> None:
        async with ring_lun(pool, image, "isolated") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(len(data))
            sg.copy_in(data, reason="test")
            await io.writev(0, sg.views())
            await io.readv(0, sg.views())
            assert sg.to_bytes() == data
            sg.release()

    run(main())
    copies = pool.stats.copies
    # WRITE: copied in; READ: a zeroed window (nothing copied in), the data copied back.
    assert copies[("window-map", "in")] == len(data)
    assert copies[("window-map", "out")] == len(data)


@pytest.mark.parametrize("mode", MODES)
def test_read_buffers_reach_the_handler_zeroed(pool: Pool, image: Path, mode: str) -> None:
    """KERNEL_NOTES rule 4: the handler fails any read whose buffer holds old bytes."""

    async def main() -> None:
        async with ring_lun(pool, image, mode, handler=QUIRKY, check_zeroed="1") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(256 * KiB)
            sg.copy_in(b"\x5a" * (256 * KiB), reason="test")  # another command's bytes
            await io.writev(0, sg.views())  # also leaves them in copy mode's data area
            await io.readv(0, sg.views())
            assert sg.to_bytes() == b"\x5a" * (256 * KiB)
            sg.release()

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_short_read_len_zeroes_the_tail(pool: Pool, image: Path, mode: str) -> None:
    """A handler fills the whole buffer but reports half: the other half reads as zeros."""

    async def main() -> None:
        async with ring_lun(pool, image, mode, handler=QUIRKY, short_read="1") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            sg = pool.alloc(128 * KiB)
            sg.copy_in(b"\x11" * (128 * KiB), reason="test")
            assert await io.readv(0, sg.views()) == 128 * KiB
            got = sg.to_bytes()
            assert got[: 64 * KiB] == b"\xee" * (64 * KiB)
            assert got[64 * KiB :] == bytes(64 * KiB)
            sg.release()

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_discard_extents_prefetch(pool: Pool, image: Path, mode: str) -> None:
    async def main() -> None:
        async with ring_lun(pool, image, mode) as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            await io.writev(0, [memoryview(b"\x77" * (256 * KiB))])
            assert await io.mapped_extents(0, SIZE) == [
                (0, 256 * KiB, True),
                (256 * KiB, SIZE - 256 * KiB, False),
            ]
            await io.discard(64 * KiB, 64 * KiB)
            out = bytearray(256 * KiB)
            await io.readv(0, [memoryview(out)])
            assert out == b"\x77" * (64 * KiB) + bytes(64 * KiB) + b"\x77" * (128 * KiB)
            extents = await io.mapped_extents(0, 256 * KiB)
            assert (64 * KiB, 64 * KiB, False) in extents
            await io.prefetch(0, SIZE)

    run(main())


def test_null_handler(pool: Pool) -> None:
    async def main() -> None:
        bs = RingBackstore("null", {}, SIZE, RingOptions(mode="zerocopy"))
        await bs.start(pool)
        try:
            io = bs.io(None)  # type: ignore[arg-type]
            await io.writev(0, [memoryview(b"\x01" * 4096)])
            out = bytearray(b"\x02" * 4096)
            await io.readv(0, [memoryview(out)])
            assert out == bytes(4096)
        finally:
            await bs.aclose()

    run(main())


def test_blocking_methods_round_trip_from_a_thread(pool: Pool, image: Path) -> None:
    """The synchronous Backstore methods work (off the loop) as a round trip onto it."""

    async def main() -> None:
        async with ring_lun(pool, image, "copy") as bs:
            data = pattern(64 * KiB, 6)
            await asyncio.to_thread(bs.writev, 4096, [memoryview(data)])
            out = bytearray(len(data))
            assert await asyncio.to_thread(bs.readv, 4096, [memoryview(out)]) == len(data)
            assert out == data
            await asyncio.to_thread(bs.flush)
            ext = await asyncio.to_thread(bs.mapped_extents, 0, 8192)
            assert ext[-1] == (4096, 4096, True)
            with pytest.raises(RuntimeError, match="event loop"):
                bs.readv(0, [memoryview(out)])

    run(main())


def test_unaligned_and_out_of_range(pool: Pool, image: Path) -> None:
    async def main() -> None:
        async with ring_lun(pool, image, "copy") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            with pytest.raises(BackstoreError, match="whole 512-byte blocks"):
                await io.readv(100, [memoryview(bytearray(512))])
            with pytest.raises(BackstoreError, match="out of range"):
                await io.writev(SIZE, [memoryview(bytes(512))])

    run(main())


def test_not_started() -> None:
    bs = RingBackstore("null", {}, SIZE, RingOptions(mode="copy"))
    with pytest.raises(BackstoreError, match="not started"):
        bs.readv(0, [memoryview(bytearray(512))])
    bs.close()


# ---- the window mapping's additions for rings ---------------------------------------------


def test_window_map_segments_zero_and_discard(pool: Pool) -> None:
    """map_segments maps arena ranges as map() maps scatter lists; zero=True hands the consumer
    zeros without copying the stale original in; unmap(discard=True) copies nothing back; the
    window is a memfd another process can map."""
    win = WindowMapping(pool, 1024 * KiB)
    sg = pool.alloc(128 * KiB)
    try:
        sg.copy_in(b"\x33" * (128 * KiB), reason="test")
        off = sg.segments[0][0] * pool.block_size
        before = pool.stats.copied_bytes
        m = win.map_segments([(off, 128 * KiB)], MapDirection.FROM_CONSUMER, zero=True)
        assert pool.stats.copied_bytes == before
        assert not any(v.tobytes().strip(b"\0") for v in m.views())
        shared = mmap.mmap(win.fd, len(win.buffer))  # what a handler process maps
        for w, n in m.entries:
            shared[w : w + n] = b"\x44" * n
        shared.close()
        win.unmap(m)
        assert sg.to_bytes() == b"\x44" * (128 * KiB)
        m = win.map_segments([(off, 4096)], MapDirection.FROM_CONSUMER)
        win.buffer[m.entries[0][0]] = 0x55
        win.unmap(m, discard=True)
        assert sg.to_bytes(0, 1) == b"\x44"
        with pytest.raises(ValueError, match="outside the pool arena"):
            win.map_segments([(pool.size - 512, 1024)], MapDirection.TO_CONSUMER)
        assert win.stats.slots_in_use == 0
    finally:
        sg.release()
        win.close()


# ---- the data area -------------------------------------------------------------------------


def test_idle_data_area_pages_go_back(
    pool: Pool, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy mode gives an idle data area's pages above its low blocks back (MADV_REMOVE)."""
    monkeypatch.setattr(ring_backstore, "RECLAIM_DELAY", 0.05)

    async def main() -> None:
        async with ring_lun(pool, image, "copy") as bs:
            io = bs.io(None)  # type: ignore[arg-type]
            views = [memoryview(bytes(MiB)) for _ in range(3)]
            await asyncio.gather(*(io.writev(i * MiB, [v]) for i, v in enumerate(views)))
            assert bs.supervisor is not None
            (worker,) = bs.supervisor.workers()
            area = worker.area
            assert isinstance(area, ring_backstore._Area)
            assert area.data is not None
            assert area.data.peak_blocks_in_use >= 32
            await asyncio.sleep(0.3)
            assert area.data.reclaimed_blocks > 0
            assert area.data.blocks_in_use == 0

    run(main())


def test_data_area_alloc_free_reclaim() -> None:
    area = DataArea(16 * 64 * KiB, 64 * KiB)
    try:
        a = area.alloc(100 * KiB)
        assert a == [(0, 100 * KiB)]
        b = area.alloc(14 * 64 * KiB)
        assert b is not None
        assert area.free_blocks == 0
        assert area.alloc(1) is None  # full: the caller waits, the area never grows
        freed: list[int] = []
        area.on_free = lambda: freed.append(area.free_blocks)
        area.free(a)
        assert freed == [2]
        with pytest.raises(RuntimeError, match="double free"):
            area.free(a)
        with pytest.raises(ValueError, match="do not fit"):
            area.alloc(17 * 64 * KiB)
        area.free(b)
        assert area.blocks_in_use == 0
        assert area.reclaim() == 0  # the threshold is at its floor already
    finally:
        area.close()
    area.free([(0, 1)])  # a closed area ignores frees (its memory is gone)


def test_data_area_threshold_grows_and_reclaims() -> None:
    area = DataArea(64 * 64 * KiB, 64 * KiB)
    try:
        runs = [area.alloc(64 * KiB) for _ in range(40)]
        assert all(r is not None for r in runs)
        for r in runs[1:]:
            assert r is not None
            area.free(r)
        assert area.reclaim() > 0  # only block 0 is in use: the pages above go back
        assert area.reclaimed_blocks > 0
    finally:
        area.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * 64 * KiB)), max_size=60))
def test_data_area_extents_disjoint(ops: list[tuple[bool, int]]) -> None:
    area = DataArea(32 * 64 * KiB, 64 * KiB)
    held: list[list[tuple[int, int]]] = []
    try:
        for free_one, n in ops:
            if free_one and held:
                area.free(held.pop(0))
                continue
            got = area.alloc(n)
            if got is None:
                assert area.free_blocks < area.blocks_for(n)
                continue
            assert sum(ln for _o, ln in got) == n
            held.append(got)
            blocks = [
                b
                for ext in held
                for off, ln in ext
                for b in range(off // 65536, (off + ln + 65535) // 65536)
            ]
            assert len(blocks) == len(set(blocks)) == area.blocks_in_use
    finally:
        area.close()


# ---- the handler keys ------------------------------------------------------------------------


def test_options_defaults_and_errors() -> None:
    assert RingOptions("copy").command_timeout == 30.0
    assert RingOptions("isolated").command_timeout == 30.0
    assert RingOptions("zerocopy").command_timeout is None  # review rule 2
    assert RingOptions("zerocopy", timeout=5).command_timeout == 5
    assert RingOptions("copy", timeout=0).command_timeout is None
    params = {"path": "/x", "handler": "zerocopy", "handlers": "3", "handler_timeout": "2.5"}
    opts = pop_ring_options("file", params)
    assert opts == RingOptions("zerocopy", handlers=3, timeout=2.5, threads=0)
    opts = pop_ring_options("null", {"handler": "copy", "handler_threads": "8"})
    assert opts == RingOptions("copy", threads=8)
    assert params == {"path": "/x"}
    assert pop_ring_options("file", {"path": "/x"}) is None
    for kind, bad, msg in [
        ("file", {"handler": "fast"}, "is not one of copy, zerocopy, isolated"),
        ("file", {"handlers": "2"}, "needs handler="),
        ("file", {"handler": "copy", "handlers": "0"}, "is not from 1 to 64"),
        ("file", {"handler": "copy", "handlers": "two"}, "is not a number"),
        ("file", {"handler": "copy", "handler_timeout": "-1"}, "0 \\(off\\) or positive"),
        ("file", {"handler": "copy", "handler_timeout": "inf"}, "0 \\(off\\) or positive"),
        ("file", {"handler": "copy", "handler_threads": "-1"}, "is not a number"),
        ("file", {"handler": "copy", "handler_threads": "257"}, "is not from 0 to 256"),
        ("ram", {"handler": "copy"}, "ram LUNs cannot run in a handler process"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pop_ring_options(kind, dict(bad))


def test_build_backstore_wraps_file_and_null(tmp_path: Path) -> None:
    path = tmp_path / "x.img"
    bs = build_backstore(parse_lun_spec(f"file:{path},size=1M,handler=isolated,handlers=2"))
    try:
        assert isinstance(bs, RingBackstore)
        assert isinstance(bs.inner, FileBackstore)  # holds the lock, made the file
        assert bs.size == MiB
        assert bs.handler_command.handler == "file"
        assert bs.handler_command.params == {"path": str(path)}
        assert "2 handler processes (handler=isolated, timeout 30 s)" in bs.describe()
    finally:
        bs.close()
    bs = build_backstore(parse_lun_spec("null:size=1G,handler=zerocopy"))
    assert isinstance(bs.inner, NullBackstore)  # type: ignore[attr-defined]
    assert "timeout off" in bs.describe()
    bs.close()
    with pytest.raises(ValueError, match=r"invalid LUN spec .*handler='x'"):
        build_backstore(parse_lun_spec(f"file:{tmp_path / 'y.img'},size=1M,handler=x"))
    assert not (tmp_path / "y.img").exists()  # refused before the file was created


def test_readonly_reaches_the_handler(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(MiB))
    os.chmod(path, 0o444)
    bs = build_backstore(parse_lun_spec(f"file:{path},readonly=1,handler=copy"))
    assert isinstance(bs, RingBackstore)
    assert bs.handler_command.params == {"path": str(path), "readonly": "1"}
    bs.close()
