"""ring/handler.py: CDB dispatch to block operations, sense bytes, defaults, BackstoreHandler."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pytest

from sgtarget.backstores.base import BackstoreBusy, BackstoreError
from sgtarget.backstores.file import FileBackstore
from sgtarget.ring import handler as handler_mod
from sgtarget.ring.handler import (
    BackstoreHandler,
    Extents,
    Handler,
    HandlerConfig,
    HandlerError,
    Result,
    Status,
    execute,
    load_handler,
    open_handler,
    split_buffers,
)

BS = 512
BLOCKS = 64
SIZE = BS * BLOCKS


def sense(key: int, asc: int, ascq: int, info: int | None = None) -> bytes:
    """Fixed-format sense, written out byte by byte."""
    out = bytearray(18)
    out[0] = 0x70 | (0x80 if info is not None else 0)
    out[2] = key
    if info is not None:
        out[3:7] = info.to_bytes(4, "big")
    out[7] = 10
    out[12] = asc
    out[13] = ascq
    return bytes(out)


def cdb16(op: int, lba: int, count: int, byte1: int = 0, byte14: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, byte1, lba, count, byte14, 0)


def cdb10(op: int, lba: int, count: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, byte1, lba, 0, count, 0)


def caw(lba: int, count: int) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, 0, lba, count, 0, 0)


def get_lba_status(lba: int, alloc: int) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def bufs_of(*sizes: int, fill: int = 0) -> list[memoryview]:
    return [memoryview(bytearray([fill]) * n) for n in sizes]


def joined(bufs: list[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


class Recorder(Handler):
    """Records every block operation; reads produce ``0xAB`` (or a short count)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.short: int | None = None
        self.extents: Extents | None = None

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        self.calls.append(("read", offset, [len(b) for b in bufs]))
        for b in bufs:
            b[:] = b"\xab" * len(b)
        return self.short

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        self.calls.append(("write", offset, joined(bufs)))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def unmap(self, offset: int, length: int) -> None:
        self.calls.append(("unmap", offset, length))

    def prefetch(self, offset: int, length: int) -> None:
        self.calls.append(("prefetch", offset, length))

    def write_same(self, offset: int, length: int, block: memoryview) -> None:
        self.calls.append(("write_same", offset, length, bytes(block)))

    def compare_and_write(
        self, offset: int, verify: list[memoryview], write: list[memoryview]
    ) -> None:
        self.calls.append(("caw", offset, joined(verify), joined(write)))

    def mapped_extents(self, offset: int, length: int) -> Extents:
        self.calls.append(("extents", offset, length))
        return self.extents if self.extents is not None else [(offset, length, True)]


class Memory(Handler):
    """A RAM disk using every generic default (write_same, unmap, compare_and_write)."""

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.writes: list[tuple[int, int]] = []

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        for b in bufs:
            b[:] = self.data[offset : offset + len(b)]
            offset += len(b)
        return None

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        self.writes.append((offset, len(bufs)))
        for b in bufs:
            self.data[offset : offset + len(b)] = b
            offset += len(b)


@pytest.fixture
def rec() -> Recorder:
    h = Recorder()
    h.open(HandlerConfig(SIZE, BS))
    return h


@pytest.fixture
def mem() -> Memory:
    h = Memory()
    h.open(HandlerConfig(SIZE, BS))
    return h


def run(h: Handler, cdb: bytes, bufs: list[memoryview] | None = None) -> Result:
    return execute(h, cdb, bufs or [], [])


# ---- golden CDBs -> block operations -------------------------------------------------------


def test_read16_reads_the_byte_range_into_the_buffers(rec: Recorder) -> None:
    bufs = bufs_of(512, 1024)
    assert run(rec, cdb16(0x88, 2, 3), bufs) == Result()
    assert rec.calls == [("read", 1024, [512, 1024])]
    assert joined(bufs) == b"\xab" * 1536


def test_read_trims_longer_buffers_to_the_transfer_length(rec: Recorder) -> None:
    bufs = bufs_of(1024, 1024)
    assert run(rec, cdb10(0x28, 1, 3), bufs).status == Status.GOOD
    assert rec.calls == [("read", 512, [1024, 512])]
    assert joined(bufs)[1536:] == bytes(512)


def test_short_read_sets_read_len(rec: Recorder) -> None:
    rec.short = 700
    assert run(rec, cdb16(0x88, 0, 2), bufs_of(1024)) == Result(read_len=700)


def test_zero_length_read_and_write_do_nothing(rec: Recorder) -> None:
    assert run(rec, cdb16(0x88, 5, 0)) == Result()
    assert run(rec, cdb16(0x8A, 5, 0)) == Result()
    assert rec.calls == []


@pytest.mark.parametrize(
    ("cdb", "calls"),
    [
        (cdb16(0x8A, 3, 2), [("write", 1536, b"\x11" * 1024)]),
        (cdb10(0x2A, 3, 2), [("write", 1536, b"\x11" * 1024)]),
        (cdb16(0x8A, 3, 2, byte1=0x08), [("write", 1536, b"\x11" * 1024), ("flush",)]),
        (cdb10(0x2A, 3, 2, byte1=0x08), [("write", 1536, b"\x11" * 1024), ("flush",)]),
    ],
)
def test_writes_and_fua(rec: Recorder, cdb: bytes, calls: list[tuple[Any, ...]]) -> None:
    assert run(rec, cdb, bufs_of(1024, fill=0x11)) == Result()
    assert rec.calls == calls


def test_synchronize_cache_flushes(rec: Recorder) -> None:
    assert run(rec, cdb16(0x91, 0, 0)) == Result()
    assert run(rec, cdb10(0x35, 0, 0)) == Result()
    assert rec.calls == [("flush",), ("flush",)]


def test_prefetch_range_and_zero_length_to_the_end(rec: Recorder) -> None:
    assert run(rec, cdb16(0x90, 4, 2)) == Result()
    assert run(rec, cdb16(0x90, 60, 0)) == Result()
    assert rec.calls == [("prefetch", 2048, 1024), ("prefetch", 60 * BS, 4 * BS)]


def test_write_same_unmap_ndob_unmaps(rec: Recorder) -> None:
    assert run(rec, cdb16(0x93, 8, 16, byte1=0x09)) == Result()
    assert rec.calls == [("unmap", 8 * BS, 16 * BS)]


def test_write_same_with_a_block_writes_it_over_the_range(rec: Recorder) -> None:
    block = bytes(range(256)) * 2
    assert run(rec, cdb16(0x93, 1, 5), [memoryview(bytearray(block))]) == Result()
    assert rec.calls == [("write_same", BS, 5 * BS, block)]


def test_write_same_block_split_across_buffers(rec: Recorder) -> None:
    block = bytes(range(256)) * 2
    bufs = [memoryview(bytearray(block[:100])), memoryview(bytearray(block[100:]))]
    assert run(rec, cdb16(0x93, 1, 5), bufs) == Result()
    assert rec.calls == [("write_same", BS, 5 * BS, block)]


def test_write_same_unmap_with_zeros_unmaps_with_data_writes(rec: Recorder) -> None:
    assert run(rec, cdb16(0x93, 0, 2, byte1=0x08), bufs_of(BS)) == Result()
    assert run(rec, cdb16(0x93, 0, 2, byte1=0x08), bufs_of(BS, fill=7)) == Result()
    assert run(rec, cdb16(0x93, 0, 2, byte1=0x01)) == Result()  # NDOB alone: zeros
    assert rec.calls == [
        ("unmap", 0, 1024),
        ("write_same", 0, 1024, b"\x07" * BS),
        ("write_same", 0, 1024, bytes(BS)),
    ]


@pytest.mark.parametrize(
    "cdb",
    [
        cdb16(0x93, 0, 0, byte1=0x09),  # WSNZ: zero blocks refused
        cdb16(0x93, 0, 1, byte1=0x19),  # ANCHOR
        cdb16(0x88, 0, 1)[:10],  # short CDB
        caw(0, 1)[:12],
        get_lba_status(0, 64)[:8],
    ],
)
def test_invalid_field_in_cdb(rec: Recorder, cdb: bytes) -> None:
    assert run(rec, cdb, bufs_of(BS)) == Result(Status.CHECK_CONDITION, sense(5, 0x24, 0))
    assert rec.calls == []


def test_buffers_shorter_than_the_transfer_are_refused(rec: Recorder) -> None:
    result = run(rec, cdb16(0x8A, 0, 2), bufs_of(BS))
    assert result == Result(Status.CHECK_CONDITION, sense(5, 0x24, 0))
    assert rec.calls == []


def test_compare_and_write_splits_verify_and_write_data(rec: Recorder) -> None:
    bufs = [memoryview(bytearray(b"\x01" * 700)), memoryview(bytearray(b"\x02" * 324))]
    assert run(rec, caw(7, 1), bufs) == Result()
    assert rec.calls == [("caw", 7 * BS, b"\x01" * 512, b"\x01" * 188 + b"\x02" * 324)]


@pytest.mark.parametrize(
    ("cdb", "nbuf"),
    [
        (cdb16(0x88, BLOCKS - 1, 2), 1024),
        (cdb16(0x88, 1 << 63, 1), 512),
        (cdb10(0x2A, BLOCKS, 1), 512),
        (cdb16(0x91, BLOCKS, 0), 0),
        (cdb16(0x90, BLOCKS + 1, 0), 0),
        (cdb16(0x93, BLOCKS - 2, 3, byte1=0x09), 0),
        (caw(BLOCKS - 1, 2), 2048),
        (get_lba_status(BLOCKS, 64), 64),
    ],
)
def test_lba_out_of_range(rec: Recorder, cdb: bytes, nbuf: int) -> None:
    result = run(rec, cdb, bufs_of(nbuf) if nbuf else [])
    assert result == Result(Status.CHECK_CONDITION, sense(5, 0x21, 0))
    assert rec.calls == []


@pytest.mark.parametrize(
    "cdb",
    [b"", bytes(6), bytes([0x12, 0, 0, 0, 36, 0]), cdb16(0x9E, 0, 32, byte1=0x10), b"\x9e"],
)
def test_unknown_cdb_is_unknown_op(rec: Recorder, cdb: bytes) -> None:
    result = run(rec, cdb)
    assert result.unknown_op
    assert result.status == Status.CHECK_CONDITION
    assert result.sense == sense(5, 0x20, 0)
    assert rec.calls == []


def test_handle_cmd_override_sees_raw_cdbs(rec: Recorder) -> None:
    class Raw(Recorder):
        def handle_cmd(
            self,
            cdb: bytes,
            bufs: list[memoryview],
            bidi_bufs: list[memoryview],
            pi_bufs: list[memoryview] | None = None,
        ) -> Result:
            if cdb[0] == 0x12:
                return Result(read_len=len(bufs))
            return super().handle_cmd(cdb, bufs, bidi_bufs)

    h = Raw()
    h.open(HandlerConfig(SIZE, BS))
    assert run(h, bytes([0x12, 0, 0, 0, 36, 0]), bufs_of(1, 1)) == Result(read_len=2)
    assert run(h, cdb16(0x91, 0, 0)) == Result()
    assert h.calls == [("flush",)]


# ---- errors -> sense -----------------------------------------------------------------------


class Failing(Recorder):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        raise self.exc

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        raise self.exc

    def flush(self) -> None:
        raise self.exc

    def mapped_extents(self, offset: int, length: int) -> Extents:
        raise self.exc


def failing(exc: BaseException) -> Failing:
    h = Failing(exc)
    h.open(HandlerConfig(SIZE, BS))
    return h


READ = cdb16(0x88, 0, 1)
WRITE = cdb16(0x8A, 0, 1)


@pytest.mark.parametrize(
    ("exc", "cdb", "want"),
    [
        (OSError(5, "EIO"), READ, sense(3, 0x11, 0)),
        (OSError(5, "EIO"), WRITE, sense(3, 0x0C, 0)),
        (OSError(5, "EIO"), cdb16(0x91, 0, 0), sense(3, 0x0C, 0)),
        (OSError(5, "EIO"), get_lba_status(0, 64), sense(3, 0x11, 0)),
        (BackstoreError("gone"), READ, sense(3, 0x11, 0)),
        (BackstoreError("gone"), WRITE, sense(3, 0x0C, 0)),
        (HandlerError(0x7, 0x2700), WRITE, sense(7, 0x27, 0)),
        (HandlerError(0x3, 0x1104, information=9), READ, sense(3, 0x11, 4, info=9)),
        (HandlerError(0x3, 0x1100, information=1 << 40), READ, sense(3, 0x11, 0)),
    ],
)
def test_exceptions_become_exact_sense(exc: BaseException, cdb: bytes, want: bytes) -> None:
    result = run(failing(exc), cdb, bufs_of(BS))
    assert result == Result(Status.CHECK_CONDITION, want)
    assert len(result.sense) == 18


def test_other_exceptions_are_hardware_errors_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="sgtarget.ring.handler"):
        result = run(failing(ZeroDivisionError("bug")), READ, bufs_of(BS))
    assert result == Result(Status.CHECK_CONDITION, sense(4, 0x44, 0))
    assert "Failing failed on CDB 88" in caplog.text
    assert "ZeroDivisionError" in caplog.text


def test_backstore_busy_is_busy_status() -> None:
    assert run(failing(BackstoreBusy("restarting")), WRITE, bufs_of(BS)) == Result(Status.BUSY)


# ---- generic defaults ----------------------------------------------------------------------


def test_default_write_same_repeats_the_block_through_write(mem: Memory) -> None:
    block = bytes(range(256)) * 2
    assert run(mem, cdb16(0x93, 3, 5), [memoryview(bytearray(block))]) == Result()
    assert mem.data[3 * BS : 8 * BS] == block * 5
    assert mem.data[: 3 * BS] == bytes(3 * BS)
    assert mem.data[8 * BS :] == bytes(SIZE - 8 * BS)
    assert mem.writes == [(3 * BS, 5)]


def test_default_write_same_batches_at_iov_max() -> None:
    big = Memory()
    big.data = bytearray(3000 * BS)
    big.open(HandlerConfig(3000 * BS, BS))
    big.write_same(0, 2500 * BS, memoryview(b"\x5a" * BS))
    assert big.writes == [(0, 1024), (1024 * BS, 1024), (2048 * BS, 452)]
    assert big.data[: 2500 * BS] == b"\x5a" * (2500 * BS)
    assert big.data[2500 * BS :] == bytes(500 * BS)


def test_default_write_same_refuses_partial_blocks(mem: Memory) -> None:
    with pytest.raises(ValueError, match="not a whole number"):
        mem.write_same(0, 700, memoryview(bytes(BS)))
    with pytest.raises(ValueError, match="not a whole number"):
        mem.write_same(0, 512, memoryview(b""))
    assert mem.writes == []


def test_default_unmap_writes_zeros(mem: Memory) -> None:
    mem.data[:] = b"\xff" * SIZE
    assert run(mem, cdb16(0x93, 2, 3, byte1=0x09)) == Result()
    assert mem.data[2 * BS : 5 * BS] == bytes(3 * BS)
    assert mem.data.count(0) == 3 * BS


def test_default_compare_and_write_matches_then_writes(mem: Memory) -> None:
    mem.data[BS : 3 * BS] = b"\x01" * (2 * BS)
    data = b"\x01" * (2 * BS) + b"\x02" * (2 * BS)
    bufs = [memoryview(bytearray(data[:100])), memoryview(bytearray(data[100:]))]
    assert run(mem, caw(1, 2), bufs) == Result()
    assert mem.data[BS : 3 * BS] == b"\x02" * (2 * BS)


def test_default_compare_and_write_miscompare_reports_offset_writes_nothing(
    mem: Memory,
) -> None:
    mem.data[BS : 3 * BS] = b"\x01" * (2 * BS)
    mem.data[BS + 700] = 0x09
    data = b"\x01" * (2 * BS) + b"\x02" * (2 * BS)
    bufs = [memoryview(bytearray(data[:600])), memoryview(bytearray(data[600:]))]
    result = run(mem, caw(1, 2), bufs)
    assert result == Result(Status.CHECK_CONDITION, sense(0x0E, 0x1D, 0, info=700))
    assert mem.data[BS : 3 * BS] == b"\x01" * 700 + b"\x09" + b"\x01" * (2 * BS - 701)


def test_default_prefetch_and_extents(mem: Memory) -> None:
    assert run(mem, cdb16(0x90, 0, 4)) == Result()
    assert mem.mapped_extents(512, 1024) == [(512, 1024, True)]


# ---- GET LBA STATUS ------------------------------------------------------------------------


def descriptor(lba: int, count: int, status: int) -> bytes:
    return lba.to_bytes(8, "big") + count.to_bytes(4, "big") + bytes([status, 0, 0, 0])


def test_get_lba_status_descriptors_byte_exact(rec: Recorder) -> None:
    # Bytes: [2048, 2560) mapped but starting mid-block 4 only -> block 4 stays mapped;
    # a hole [3000, 8192) covers blocks 6..15 whole (block 5 partly: mapped).
    rec.extents = [(2048, 952, True), (3000, 5192, False), (8192, SIZE - 8192, True)]
    bufs = bufs_of(200)
    result = run(rec, get_lba_status(4, 200), bufs)
    want = (
        (4 + 3 * 16).to_bytes(4, "big")
        + bytes(4)
        + descriptor(4, 2, 0)
        + descriptor(6, 10, 1)
        + descriptor(16, BLOCKS - 16, 0)
    )
    assert result == Result(read_len=len(want))
    assert joined(bufs)[: len(want)] == want
    assert rec.calls == [("extents", 4 * BS, (BLOCKS - 4) * BS)]


def test_get_lba_status_truncated_to_the_allocation_length(rec: Recorder) -> None:
    rec.extents = [(0, 1024, True), (1024, 1024, False), (2048, SIZE - 2048, True)]
    bufs = bufs_of(64, fill=0xEE)
    result = run(rec, get_lba_status(0, 30), bufs)
    # One descriptor fits 30 bytes' worth (at least one is always built), then cut at 30.
    want = (20).to_bytes(4, "big") + bytes(4) + descriptor(0, 2, 0)
    assert result == Result(read_len=24)
    assert joined(bufs)[:24] == want[:24]
    assert joined(bufs)[24:] == b"\xee" * 40


def test_get_lba_status_exact_buffer_has_no_read_len(rec: Recorder) -> None:
    bufs = bufs_of(24)
    assert run(rec, get_lba_status(0, 24), bufs) == Result()
    assert joined(bufs) == (20).to_bytes(4, "big") + bytes(4) + descriptor(0, BLOCKS, 0)


# ---- buffers helper ------------------------------------------------------------------------


def test_split_buffers() -> None:
    bufs = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"h")]
    head, tail = split_buffers(bufs, 5)
    assert [bytes(b) for b in head] == [b"abc", b"de"]
    assert [bytes(b) for b in tail] == [b"fg", b"h"]
    head, tail = split_buffers(bufs, 3)
    assert [bytes(b) for b in head] == [b"abc"]
    assert [bytes(b) for b in tail] == [b"defg", b"h"]


# ---- BackstoreHandler on a real file -------------------------------------------------------


def test_file_handler_round_trip_and_unmap(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    size = 1 << 20
    # The target process holds the file's lock; the handler opens it anyway (lock=False).
    owner = FileBackstore(path, size)
    try:
        h = open_handler("file", HandlerConfig(size, BS, {"path": str(path)}))
        try:
            assert isinstance(h, BackstoreHandler)
            data = bytes((i * 7) % 251 for i in range(256 * 1024))
            bufs = [memoryview(bytearray(data[:1000])), memoryview(bytearray(data[1000:]))]
            assert run(h, cdb16(0x8A, 0, 512), bufs) == Result()
            out = bufs_of(100 * 1024, 156 * 1024)
            assert run(h, cdb16(0x88, 0, 512), out) == Result()
            assert joined(out) == data
            assert run(h, cdb16(0x91, 0, 0)) == Result()

            # Deallocate 64 KiB in the middle (whole filesystem blocks): zeros and a hole.
            assert run(h, cdb16(0x93, 128, 128, byte1=0x09)) == Result()
            out = bufs_of(128 * BS)
            assert run(h, cdb16(0x88, 128, 128), out) == Result()
            assert joined(out) == bytes(128 * BS)
            status = bufs_of(64)
            result = run(h, get_lba_status(0, 64), status)
            assert result.status == Status.GOOD
            raw = joined(status)
            assert raw[8:24] == descriptor(0, 128, 0)
            assert raw[24:40] == descriptor(128, 128, 1)
            assert raw[40:48] == (256).to_bytes(8, "big")
            assert raw[52] == 0  # the data written after the hole: mapped
            assert owner.mapped_extents(128 * BS, 128 * BS) == [(128 * BS, 128 * BS, False)]

            # The handler writes what the owner reads: one file, two opens.
            back = memoryview(bytearray(512))
            owner.readv(0, [back])
            assert bytes(back) == data[:512]
        finally:
            h.close()
    finally:
        owner.close()


def test_file_handler_too_small_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="smaller than the 8192 bytes"):
        open_handler("file", HandlerConfig(8192, BS, {"path": str(path)}))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("file", {}, "missing parameter 'path'"),
        ("file", {"path": "/x", "color": "red"}, "unknown parameter 'color'"),
        ("file", {"path": "/x", "direct": "maybe"}, "direct='maybe'"),
        ("null", {"path": "/x"}, "unknown parameter 'path'"),
        ("nosuch", {}, "unknown handler 'nosuch'"),
        ("sgtarget.ring.handler:Result", {}, "not a Handler subclass"),
        ("sgtarget.ring.handler:Nope", {}, "not a Handler subclass"),
    ],
)
def test_handler_names_and_params_refused(name: str, params: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        open_handler(name, HandlerConfig(SIZE, BS, params))


def test_null_handler_reads_zeros() -> None:
    h = open_handler("null", HandlerConfig(SIZE, BS))
    out = bufs_of(BS, fill=0xFF)
    assert run(h, cdb16(0x88, 1, 1), out) == Result()
    assert joined(out) == bytes(BS)
    h.close()


def test_module_class_handler_loaded_with_config_set() -> None:
    h = load_handler("tests.unit.test_ring_handler:Memory")
    assert isinstance(h, Memory)
    h2 = open_handler("tests.unit.test_ring_handler:Memory", HandlerConfig(SIZE, BS))
    assert h2.config == HandlerConfig(SIZE, BS)
    assert handler_mod.BUILTIN.keys() == {"file", "null"}


# ---- protection information (dif iovecs) ---------------------------------------------------


class PiRecorder(Recorder):
    """A PI-aware ``Recorder``: tuples reads produce ``0xCD``."""

    protection = True

    def read_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> int | None:
        self.calls.append(("read_pi", offset, [len(b) for b in bufs], [len(b) for b in pi_bufs]))
        for b in (*bufs, *pi_bufs):
            b[:] = b"\xcd" * len(b)
        return None

    def write_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> None:
        self.calls.append(("write_pi", offset, joined(bufs), joined(pi_bufs)))

    def discard_pi(self, offset: int, length: int) -> None:
        self.calls.append(("discard_pi", offset, length))


def test_dif_buffers_go_to_read_pi_and_write_pi() -> None:
    h = PiRecorder()
    h.open(HandlerConfig(SIZE, BS, protection=1))
    pi = bufs_of(8, 8, fill=0x11)
    assert execute(h, cdb16(0x8A, 4, 2), bufs_of(2 * BS, fill=7), [], pi) == Result()
    assert h.calls[-1:] == [("write_pi", 4 * BS, b"\x07" * 2 * BS, b"\x11" * 16)]
    out, pi_out = bufs_of(2 * BS), bufs_of(16, 100)  # longer dif buffers: the first 16 bytes
    assert execute(h, cdb10(0x28, 4, 2), out, [], pi_out) == Result()
    assert h.calls[-1:] == [("read_pi", 4 * BS, [2 * BS], [16])]
    assert run(h, cdb16(0x8A, 4, 2), bufs_of(2 * BS)) == Result()  # no tuples: write
    assert h.calls[-1][0] == "write"
    # WRITE SAME(16) UNMAP: unmap, then escape tuples; FORMAT UNIT: escape tuples everywhere.
    assert run(h, cdb16(0x93, 8, 4, byte1=0x09)) == Result()
    assert h.calls[-2:] == [("unmap", 8 * BS, 4 * BS), ("discard_pi", 8 * BS, 4 * BS)]
    assert run(h, bytes([0x04, 0x80, 0, 0, 0, 0])) == Result()
    assert h.calls[-1:] == [("discard_pi", 0, SIZE)]
    bad = execute(h, bytes([0x04, 0x90, 0, 0, 0, 0]), [], [])  # FMTDATA: not ours to parse
    assert bad.sense == sense(5, 0x24, 0)


def test_dif_buffers_refused_when_short_on_other_commands_or_without_pi(rec: Recorder) -> None:
    h = PiRecorder()
    h.open(HandlerConfig(SIZE, BS, protection=1))
    short = execute(h, cdb16(0x8A, 0, 2), bufs_of(2 * BS), [], bufs_of(8))
    assert short.sense == sense(5, 0x24, 0)
    other = execute(h, cdb16(0x91, 0, 0), [], [], bufs_of(8))
    assert other.sense == sense(5, 0x24, 0)
    assert all(c[0] != "write_pi" for c in h.calls)
    # A handler without PI: tuples refused, FORMAT UNIT unknown, unmap alone.
    assert execute(rec, cdb16(0x8A, 0, 1), bufs_of(BS), [], bufs_of(8)).sense == sense(5, 0x24, 0)
    assert run(rec, bytes([0x04, 0x80, 0, 0, 0, 0])).unknown_op
    assert run(rec, cdb16(0x93, 8, 4, byte1=0x09)) == Result()
    assert rec.calls == [("unmap", 8 * BS, 4 * BS)]


def test_the_file_handler_stores_tuples_in_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "pi.img"
    FileBackstore(path, SIZE).close()
    plain = open_handler("file", HandlerConfig(SIZE, BS, {"path": str(path)}))
    try:
        assert not plain.protection
    finally:
        plain.close()
    h = open_handler("file", HandlerConfig(SIZE, BS, {"path": str(path)}, protection=1))
    try:
        assert h.protection
        tuples = bytes(range(16))
        result = execute(h, cdb16(0x8A, 3, 2), bufs_of(2 * BS, fill=9), [], [memoryview(tuples)])
        assert result == Result()
        stored = (tmp_path / "pi.img.pi").read_bytes()
        assert bytes(255 - b for b in stored[24:40]) == tuples
        pi_out = bufs_of(16)
        assert execute(h, cdb16(0x88, 3, 2), bufs_of(2 * BS), [], pi_out) == Result()
        assert joined(pi_out) == tuples
    finally:
        h.close()
