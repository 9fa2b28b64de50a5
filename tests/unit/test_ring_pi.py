"""Ring LUNs with ``handler_pi=1``: the handler stores the T10 PI tuples, which travel as the
ring commands' dif iovecs in each data mode; the keys; a handler that cannot store PI."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import pytest

from sgtarget.backstores.base import BackstoreBusy, BackstoreError, PiBackstoreIO
from sgtarget.cli.specs import build_backstore, parse_lun_spec
from sgtarget.datapath import Pool
from sgtarget.datapath.dif import generate
from sgtarget.datapath.stats import IN
from sgtarget.ring import supervisor as supervisor_mod
from sgtarget.ring.backstore import (
    COPY_REASON,
    MODES,
    RingBackstore,
    RingOptions,
    RingProtection,
    pop_ring_options,
)
from tests.unit.ring_support import SIZE, KiB, MiB, make_image, run

BS = 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path)


def sidecar(image: Path) -> bytes:
    """The tuples in ``PATH.pi`` in wire form (stored inverted; a hole reads as escape)."""
    raw = (image.parent / (image.name + ".pi")).read_bytes()
    return bytes(255 - b for b in raw)


def pi_lun(image: Path, mode: str, *, handler: str = "file") -> RingBackstore:
    options = RingOptions(mode=mode, handler_pi=True)
    params = {"path": str(image)} if handler == "file" else {}
    return RingBackstore(handler, params, SIZE, options, pi=1)


def pi_io(bs: RingBackstore) -> PiBackstoreIO:
    io = bs.io(None)  # type: ignore[arg-type]  # a ring needs no runner
    assert isinstance(io, PiBackstoreIO)
    return io


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("foreign", [False, True], ids=["pool", "bytes"])
def test_tuples_land_in_the_handlers_sidecar_and_read_back(
    pool: Pool, image: Path, mode: str, foreign: bool
) -> None:
    """WRITE(16) with dif iovecs stores data in the image and tuples in PATH.pi, in more
    than one ring command; READ(16) returns both; discard and FORMAT make tuples escape."""
    lba = 40
    data = random.Random(7).randbytes(MiB + 8 * KiB)  # two ring commands
    tuples = bytes(generate(data, BS, ref_tag=lba))

    async def main() -> None:
        bs = pi_lun(image, mode)
        assert bs.pi_with_data
        assert isinstance(bs.protection, RingProtection)
        await bs.start(pool)
        try:
            io = pi_io(bs)
            if foreign:
                src = [memoryview(data)]
                pi_src = [memoryview(tuples)]
            else:
                sg = pool.alloc(len(data))
                sg.copy_in(data)
                psg = pool.alloc(len(tuples))
                psg.copy_in(tuples)
                src, pi_src = sg.views(), psg.views()
            assert await io.writev_pi(lba * BS, src, pi_src) == len(data)
            if not foreign:
                sg.release()
                psg.release()
            blocks = len(data) // BS
            assert image.read_bytes()[lba * BS : lba * BS + len(data)] == data
            stored = sidecar(image)
            assert stored[lba * 8 : (lba + blocks) * 8] == tuples
            assert stored[: lba * 8] == b"\xff" * (lba * 8)  # never written: escape

            out = bytearray(len(data))
            pi_out = bytearray(len(tuples))
            await io.readv_pi(lba * BS, [memoryview(out)], [memoryview(pi_out)])
            assert out == data
            assert pi_out == tuples

            await io.discard((lba + 2) * BS, 4 * BS)  # WRITE SAME(16) UNMAP: escape tuples
            stored = sidecar(image)
            assert stored[(lba + 2) * 8 : (lba + 6) * 8] == b"\xff" * 32
            assert stored[lba * 8 : (lba + 2) * 8] == tuples[:16]

            store = bs.protection
            assert store is not None
            await asyncio.to_thread(store.format, 3)  # FORMAT UNIT reaches the handler
            assert store.ptype == 3
            assert sidecar(image) == b"\xff" * (SIZE // BS * 8)
            medium = image.read_bytes()[lba * BS : lba * BS + len(data)]
            assert medium[6 * BS :] == data[6 * BS :]  # user data stays
        finally:
            await bs.aclose()

    run(main())


def test_copy_mode_counts_the_tuples_it_copies(pool: Pool, image: Path) -> None:
    data = bytes(range(256)) * 16
    tuples = bytes(generate(data, BS, ref_tag=0))

    async def main() -> None:
        bs = pi_lun(image, "copy")
        await bs.start(pool)
        try:
            key = (COPY_REASON, IN)
            before = pool.stats.copies.get(key, 0)
            await pi_io(bs).writev_pi(0, [memoryview(data)], [memoryview(tuples)])
            assert pool.stats.copies.get(key, 0) - before == len(data) + len(tuples)
        finally:
            await bs.aclose()

    run(main())


def test_the_target_keeps_no_tuples(pool: Pool, image: Path) -> None:
    """RingProtection holds the format only: its read/write refuse, discard is a no-op."""

    async def main() -> None:
        bs = pi_lun(image, "copy")
        store = bs.protection
        assert isinstance(store, RingProtection)
        assert store.ptype == 1
        with pytest.raises(BackstoreError, match="travel with the data"):
            store.read(0, [memoryview(bytearray(8))])
        with pytest.raises(BackstoreError, match="travel with the data"):
            store.write(0, [memoryview(bytes(8))])
        store.discard(0, 8)
        await bs.aclose()

    run(main())


def test_a_handler_that_cannot_store_pi_makes_the_lun_fail_clearly(
    pool: Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """null with handler_pi=1: every process exits at start with one clear line, and after
    GIVE_UP_AFTER quick deaths commands get MEDIUM ERROR at once (no hang)."""
    monkeypatch.setattr(supervisor_mod, "MAX_BACKOFF", 0.2)

    async def main() -> None:
        bs = pi_lun(Path("/nonexistent"), "copy", handler="null")
        await bs.start(pool)
        try:
            io = pi_io(bs)
            t0 = time.monotonic()
            error: BackstoreError | None = None
            while error is None:
                assert time.monotonic() - t0 < 15, "never gave up"
                try:
                    await io.readv_pi(0, [memoryview(bytearray(BS))], [memoryview(bytearray(8))])
                except BackstoreBusy:
                    pass
                except BackstoreError as exc:
                    error = exc
                else:
                    pytest.fail("a handler without PI served tuples")
            assert "keeps dying" in str(error)
        finally:
            await bs.aclose()

    with caplog.at_level(logging.WARNING, logger="sgtarget.ring.supervisor"):
        run(main())
    assert "it does not store protection information" in caplog.text


def test_handler_pi_keys(tmp_path: Path) -> None:
    def opts(**params: str) -> RingOptions | None:
        return pop_ring_options("file", dict(params))

    got = opts(handler="copy", handler_pi="1", pi="1")
    assert got is not None
    assert got.handler_pi
    got = opts(handler="copy", handler_pi="0", pi="1")
    assert got is not None
    assert not got.handler_pi
    with pytest.raises(ValueError, match="handler_pi=1 needs pi="):
        opts(handler="copy", handler_pi="1")
    with pytest.raises(ValueError, match="cannot be combined with direct=1"):
        opts(handler="copy", handler_pi="1", pi="1", direct="1")
    with pytest.raises(ValueError, match="is not 0 or 1"):
        opts(handler="copy", handler_pi="yes", pi="1")
    with pytest.raises(ValueError, match="needs handler="):
        opts(handler_pi="1", pi="1")

    path = tmp_path / "a.img"
    spec = parse_lun_spec(f"file:{path},size=1M,pi=2,handler=zerocopy,handler_pi=1")
    bs = build_backstore(spec)
    try:
        assert isinstance(bs, RingBackstore)
        assert bs.pi_with_data
        assert bs.limits is None
        assert isinstance(bs.protection, RingProtection)
        assert bs.protection.ptype == 2
        assert bs.handler_command.protection == 2
        assert (tmp_path / "a.img.pi").exists()  # the target still creates the sidecar
    finally:
        bs.close()
    spec = parse_lun_spec(f"file:{path},size=1M,pi=2,handler=copy")
    bs = build_backstore(spec)
    try:
        assert isinstance(bs, RingBackstore)
        assert not bs.pi_with_data
        assert bs.handler_command.protection == 0
    finally:
        bs.close()
