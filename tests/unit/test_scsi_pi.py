"""Protection information semantics: RDPROTECT/WRPROTECT/VRPROTECT, 32-byte CDBs, FORMAT UNIT.

Tuples are computed here by a bit-at-a-time CRC (the oracle), not by ``datapath.dif``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import Buffers, Runner, RunnerIO
from sgtarget.backstores.pi import MemoryProtection, ProtectionStore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.datapath import Pool
from sgtarget.datapath.bounce import ConsumerLimits
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline
from tests.pi_oracle import crc16

from .scsi_fakes import OTHER_NEXUS, FakeChannel, MemBackstore, run

NAME = "iqn.2024-01.test:pi"
NBLOCKS = 4096
ESCAPE = b"\xff" * 8
GUARD = (0x0B, 0x10, 0x01)
APP = (0x0B, 0x10, 0x02)
REF = (0x0B, 0x10, 0x03)
INVALID_FIELD = (0x05, 0x24, 0x00)
INVALID_OPCODE = (0x05, 0x20, 0x00)


def test_oracle_check_value() -> None:
    assert crc16(b"123456789") == 0xD0DB


def tuple_of(block: bytes, ref: int, app: int = 0) -> bytes:
    return struct.pack(">HHI", crc16(block), app, ref & 0xFFFFFFFF)


def wire(blocks: list[bytes], tuples: list[bytes]) -> bytes:
    return b"".join(b + t for b, t in zip(blocks, tuples, strict=True))


def blocks_of(n: int, bs: int, seed: int = 1) -> list[bytes]:
    return [bytes((seed + i + j) & 0xFF for j in range(bs)) for i in range(n)]


def rw10(op: int, lba: int, n: int, protect: int = 0, extra: int = 0) -> bytes:
    return (
        bytes([op, protect << 5 | extra])
        + lba.to_bytes(4, "big")
        + bytes([0])
        + (n.to_bytes(2, "big") + b"\0")
    )


def rw16(op: int, lba: int, n: int, protect: int = 0) -> bytes:
    return bytes([op, protect << 5]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


def rw32(
    sa: int, lba: int, n: int, protect: int, ref: int, *, app: int = 0, mask: int = 0
) -> bytes:
    cdb = bytearray(32)
    cdb[0], cdb[7] = 0x7F, 0x18
    cdb[8:10] = sa.to_bytes(2, "big")
    cdb[10] = protect << 5
    cdb[12:20] = lba.to_bytes(8, "big")
    struct.pack_into(">IHH", cdb, 20, ref, app, mask)
    cdb[28:32] = n.to_bytes(4, "big")
    return bytes(cdb)


def sense(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION, task.status
    return task.sense[2] & 0x0F, task.sense[12], task.sense[13]


def info(task: Task) -> int:
    assert task.sense[0] & 0x80  # VALID
    return int.from_bytes(task.sense[3:7], "big")


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


class FormatOnly(ProtectionStore):
    """The target's store of a backstore that keeps tuples itself (``RingProtection``'s
    model): the format type only; reading or writing tuples through it is a bug."""

    blocking = False

    def __init__(self, tuples: ProtectionStore) -> None:
        super().__init__(tuples.nblocks, tuples.ptype)
        self.tuples = tuples

    def read(self, lba: int, bufs: Buffers) -> None:
        raise AssertionError("tuples read beside the data")

    def write(self, lba: int, bufs: Buffers) -> None:
        raise AssertionError("tuples written beside the data")

    def discard(self, lba: int, nblocks: int) -> None:
        self._check(lba, nblocks * 8)  # the backstore's own discard did it

    def format(self, ptype: int) -> None:
        self.tuples.format(ptype)
        self.ptype = ptype

    def _read_raw(self, offset: int, bufs: Buffers) -> None:
        raise AssertionError

    def _write_raw(self, offset: int, data: bytes) -> None:
        raise AssertionError

    def _zero_raw(self, offset: int, length: int) -> None:
        raise AssertionError


class PiWithDataRam(RamBackstore):
    """A RAM backstore that stores tuples itself and takes them with the data
    (``pi_with_data``: an in-process model of a ``handler_pi=1`` ring LUN)."""

    pi_with_data = True

    def __init__(self, size: int, *, block_size: int, pi: int) -> None:
        super().__init__(size, block_size=block_size, pi=pi)
        assert self.protection is not None
        self.tuples = self.protection
        self.protection = FormatOnly(self.tuples)
        self.pi_calls = 0

    def discard(self, offset: int, length: int) -> None:
        super().discard(offset, length)
        self.tuples.discard(offset // self.block_size, length // self.block_size)

    def io(self, runner: Runner) -> PiIO:
        return PiIO(self, RunnerIO(self, runner))

    def close(self) -> None:
        super().close()
        self.tuples.close()


class PiIO:
    """``PiBackstoreIO`` of ``PiWithDataRam``: data and tuples in one call."""

    def __init__(self, backstore: PiWithDataRam, io: RunnerIO) -> None:
        self._bs = backstore
        self._io = io
        self.readv = io.readv
        self.writev = io.writev
        self.flush = io.flush
        self.prefetch = io.prefetch
        self.discard = io.discard
        self.mapped_extents = io.mapped_extents
        self.readv_now = io.readv_now
        self.writev_now = io.writev_now
        self.writev_soon = io.writev_soon

    async def readv_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int:
        n = await self._io.readv(offset, bufs)
        self._bs.tuples.read(offset // self._bs.block_size, pi_bufs)
        self._bs.pi_calls += 1
        return n

    async def writev_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int:
        n = await self._io.writev(offset, bufs)
        self._bs.tuples.write(offset // self._bs.block_size, pi_bufs)
        self._bs.pi_calls += 1
        return n


#: How LUs under test keep their tuples: beside the data in the target, or with the data in
#: the backstore (``pi_with_data``); set by the ``luns`` fixture.
_KIND = ["ram"]


class Lun:
    """A target with one PI-formatted RAM LU, past its power-on unit attention."""

    def __init__(self, pool: Pool, ptype: int, bs: int = 512) -> None:
        self.pool = pool
        self.bs = bs
        if _KIND[0] == "pi_with_data":
            self.backstore: RamBackstore = PiWithDataRam(NBLOCKS * bs, block_size=bs, pi=ptype)
        else:
            self.backstore = RamBackstore(NBLOCKS * bs, block_size=bs, pi=ptype)
        self.lu = LogicalUnit(self.backstore, runner=run_inline, identity="t/0")
        self.target = ScsiTarget(NAME, [self.lu])
        self.run(bytes(6))

    @property
    def store(self) -> ProtectionStore:
        assert self.backstore.protection is not None
        return self.backstore.protection

    def run(self, cdb: bytes, data_out: bytes = b"", edtl: int | None = None) -> Task:
        return run(self.target, self.pool, cdb, data_out=data_out, edtl=edtl)[0]

    def read(self, cdb: bytes, edtl: int) -> tuple[Task, bytes]:
        task, ch = run(self.target, self.pool, cdb, edtl=edtl)
        return task, bytes(ch.data_in)

    def data(self, lba: int, n: int) -> bytes:
        buf = bytearray(n * self.bs)
        self.backstore.readv(lba * self.bs, [memoryview(buf)])
        return bytes(buf)

    def tuples(self, lba: int, n: int) -> bytes:
        buf = bytearray(n * 8)
        store = self.store
        (store.tuples if isinstance(store, FormatOnly) else store).read(lba, [memoryview(buf)])
        return bytes(buf)

    def close(self) -> None:
        self.backstore.close()


@pytest.fixture(params=["ram", "pi_with_data"])
def luns(pool: Pool, request: pytest.FixtureRequest) -> Iterator[list[Lun]]:
    """LUs made by ``lun``: tuples kept by the target, or taken with the data by the
    backstore (then every PI-formatted LU's tuples must go through readv_pi/writev_pi)."""
    made: list[Lun] = []
    _KIND[0] = request.param
    try:
        yield made
    finally:
        _KIND[0] = "ram"
        for lun in made:
            lun.close()


def lun(luns: list[Lun], pool: Pool, ptype: int, bs: int = 512) -> Lun:
    made = Lun(pool, ptype, bs)
    luns.append(made)
    return made


# ---- WRITE / READ with tuples on the wire ------------------------------------------------------


@pytest.mark.parametrize(("ptype", "bs"), [(1, 512), (3, 512), (1, 4096)])
def test_write_with_tuples_then_read_them_back(
    luns: list[Lun], pool: Pool, ptype: int, bs: int
) -> None:
    u = lun(luns, pool, ptype, bs)
    blocks = blocks_of(5, bs)
    tuples = [tuple_of(b, 100 + i, app=0x1234) for i, b in enumerate(blocks)]
    good(u.run(rw10(0x2A, 100, 5, protect=1), wire(blocks, tuples)))
    assert u.data(100, 5) == b"".join(blocks)
    assert u.tuples(100, 5) == b"".join(tuples)
    for protect in (1, 2, 3, 4, 5):
        task, data = u.read(rw16(0x88, 100, 5, protect), 5 * (bs + 8))
        good(task)
        assert task.transfer_length == 5 * (bs + 8)
        assert data == wire(blocks, tuples)
    # RDPROTECT 0: the data alone, the tuples checked on the way.
    task, data = u.read(rw10(0x28, 100, 5), 5 * bs)
    good(task)
    assert data == b"".join(blocks)
    if isinstance(u.backstore, PiWithDataRam):  # 1 write, 5 interleaved reads, 1 checked
        assert u.backstore.pi_calls == 7


@pytest.mark.parametrize(
    ("field", "expected"), [(0, GUARD), (2, APP), (4, REF)], ids=["guard", "app", "ref"]
)
@pytest.mark.parametrize("bad", [0, 3, 2090])
def test_corrupt_tuple_on_write_is_refused_and_nothing_is_written(
    luns: list[Lun], pool: Pool, field: int, expected: tuple[int, int, int], bad: int
) -> None:
    u = lun(luns, pool, 2)
    n = 2100  # more than one window at 512-byte blocks: nothing of the first may land either
    blocks = blocks_of(n, 512, seed=7)
    tuples = [tuple_of(b, 0x5000 + i, app=0xA5A5) for i, b in enumerate(blocks)]
    broken = bytearray(tuples[bad])
    broken[field] ^= 0x01
    tuples[bad] = bytes(broken)
    cdb = rw32(0x000B, 20, n, protect=1, ref=0x5000, app=0xA5A5, mask=0xFFFF)
    task = u.run(cdb, wire(blocks, tuples))
    assert sense(task) == expected
    assert info(task) == 20 + bad
    assert u.data(20, n) == bytes(n * 512)
    assert u.tuples(20, n) == ESCAPE * n


def test_type1_reference_tag_is_the_lba(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    blocks = blocks_of(3, 512)
    shifted = [tuple_of(b, 41 + i) for i, b in enumerate(blocks)]  # one off
    task = u.run(rw10(0x2A, 40, 3, protect=1), wire(blocks, shifted))
    assert sense(task) == REF
    assert info(task) == 40
    # WRPROTECT 3: no checks, stored as sent; reading with RDPROTECT 1 finds the bad tag.
    good(u.run(rw10(0x2A, 40, 3, protect=3), wire(blocks, shifted)))
    task, _ = u.read(rw10(0x28, 40, 3, protect=1), 3 * 520)
    assert sense(task) == REF
    task, data = u.read(rw10(0x28, 40, 3, protect=3), 3 * 520)
    good(task)
    assert data == wire(blocks, shifted)
    # WRPROTECT 4 checks only the guard; 2 only the tags.
    good(u.run(rw10(0x2A, 40, 3, protect=4), wire(blocks, shifted)))
    assert sense(u.run(rw10(0x2A, 40, 3, protect=2), wire(blocks, shifted))) == REF


def test_escape_application_tag_turns_checks_off(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    blocks = blocks_of(2, 512)
    escaped = [b"\x00\x00\xff\xff\x00\x00\x00\x00", tuple_of(blocks[1], 11)]
    good(u.run(rw10(0x2A, 10, 2, protect=1), wire(blocks, escaped)))
    task, data = u.read(rw10(0x28, 10, 2, protect=1), 2 * 520)
    good(task)
    assert data == wire(blocks, escaped)


def test_type3_escape_needs_both_tags(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 3)
    block = blocks_of(1, 512)[0]
    app_only = b"\x00\x00\xff\xff\x00\x00\x00\x01"  # app escape, ref not: guard is checked
    assert sense(u.run(rw10(0x2A, 0, 1, protect=1), block + app_only)) == GUARD
    both = b"\x00\x00" + b"\xff" * 6
    good(u.run(rw10(0x2A, 0, 1, protect=1), block + both))


def test_unwritten_blocks_read_back_escape(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    task, data = u.read(rw10(0x28, 7, 2, protect=1), 2 * 520)
    good(task)
    assert data == (bytes(512) + ESCAPE) * 2


# ---- protect field 0 on a PI LU: generate on write, check on read ------------------------------


@pytest.mark.parametrize("bs", [512, 4096])
def test_protect_zero_generates_and_checks(luns: list[Lun], pool: Pool, bs: int) -> None:
    u = lun(luns, pool, 1, bs)
    blocks = blocks_of(4, bs, seed=3)
    good(u.run(rw10(0x2A, 30, 4), b"".join(blocks)))
    assert u.tuples(30, 4) == b"".join(tuple_of(b, 30 + i) for i, b in enumerate(blocks))
    task, data = u.read(rw10(0x28, 30, 4), 4 * bs)
    good(task)
    assert data == b"".join(blocks)
    # The medium rots under the PI: READ with RDPROTECT 0 reports the guard with the LBA.
    u.backstore.writev(32 * bs, [memoryview(b"rot")])
    task, _ = u.read(rw10(0x28, 30, 4), 4 * bs)
    assert sense(task) == GUARD
    assert info(task) == 32
    # RDPROTECT 3 reads it anyway (no checks), VERIFY finds it.
    good(u.read(rw10(0x28, 30, 4, protect=3), 4 * (bs + 8))[0])
    task = u.run(rw10(0x2F, 30, 4), edtl=0)
    assert sense(task) == GUARD
    assert info(task) == 32


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, NBLOCKS - 64), st.integers(1, 64), st.integers(0, 255))
def test_generated_tuples_are_what_rdprotect_returns(
    pool: Pool, lba: int, n: int, seed: int
) -> None:
    u = Lun(pool, 1)
    try:
        blocks = blocks_of(n, 512, seed)
        good(u.run(rw16(0x8A, lba, n), b"".join(blocks)))
        task, data = u.read(rw16(0x88, lba, n, protect=1), n * 520)
        good(task)
        assert data == wire(blocks, [tuple_of(b, lba + i) for i, b in enumerate(blocks)])
    finally:
        u.close()


# ---- non-PI LUs, reserved values, type 2 -------------------------------------------------------


@pytest.mark.parametrize("protect", range(1, 8))
@pytest.mark.parametrize("op", [0x28, 0x2A, 0x2E, 0x2F, 0x41])
def test_protect_fields_on_a_lu_without_pi(
    luns: list[Lun], pool: Pool, op: int, protect: int
) -> None:
    u = lun(luns, pool, 1)
    good(u.run(bytes([0x04, 0, 0, 0, 0, 0])))  # FORMAT UNIT: type 0
    task = u.run(rw10(op, 0, 1, protect), bytes(512))
    assert sense(task) == INVALID_FIELD
    assert task.sense[15:18] == bytes.fromhex("cf 0001")  # byte 1, bit 7


def test_reserved_protect_values(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    for protect in (6, 7):
        assert sense(u.run(rw10(0x28, 0, 1, protect), edtl=520)) == INVALID_FIELD


def test_type2_needs_32_byte_cdbs(luns: list[Lun], pool: Pool) -> None:
    t2 = lun(luns, pool, 2)
    assert sense(t2.run(rw10(0x28, 0, 1, protect=1), edtl=520)) == INVALID_OPCODE
    good(t2.run(rw10(0x28, 0, 1), edtl=512))  # protect 0 works with any CDB
    t1 = lun(luns, pool, 1)
    assert sense(t1.run(rw32(0x0009, 0, 1, 1, 0), edtl=520)) == INVALID_OPCODE


def test_type2_32_byte_round_trip_with_application_tag_mask(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 2)
    blocks = blocks_of(4, 512, seed=9)
    tuples = [tuple_of(b, 0xFFFFFFFE + i, app=0x12F0 | i) for i, b in enumerate(blocks)]
    # Mask 0xFFF0: the low nibble differs per block and is not compared; ref tags wrap.
    cdb = rw32(0x000B, 500, 4, 1, 0xFFFFFFFE, app=0x12F0, mask=0xFFF0)
    good(u.run(cdb, wire(blocks, tuples)))
    task, data = u.read(rw32(0x0009, 500, 4, 1, 0xFFFFFFFE, app=0x12F0, mask=0xFFF0), 4 * 520)
    good(task)
    assert data == wire(blocks, tuples)
    task, _ = u.read(rw32(0x0009, 500, 4, 1, 0xFFFFFFFE, app=0x13F0, mask=0xFFF0), 4 * 520)
    assert sense(task) == APP
    assert info(task) == 500
    task, _ = u.read(rw32(0x0009, 500, 4, 1, 7, app=0x12F0, mask=0xFFF0), 4 * 520)
    assert sense(task) == REF
    # RDPROTECT 0 with a 32-byte CDB checks against its tags too.
    task, _ = u.read(rw32(0x0009, 500, 4, 0, 7), 4 * 512)
    assert sense(task) == REF


def test_write_32_protect_zero_generates_from_the_initial_tag(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 2)
    blocks = blocks_of(2, 512)
    good(u.run(rw32(0x000B, 3, 2, 0, 0xABC), b"".join(blocks)))
    assert u.tuples(3, 2) == tuple_of(blocks[0], 0xABC) + tuple_of(blocks[1], 0xABD)


# ---- WRITE SAME, VERIFY, UNMAP-like deallocation ----------------------------------------------


def test_write_same_with_tuple_steps_the_reference_tag(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    block = blocks_of(1, 512, seed=5)[0]
    cdb = bytes([0x41, 1 << 5, 0, 0, 0, 50, 0, 0, 3, 0])
    good(u.run(cdb, block + tuple_of(block, 50, app=0x77)))
    assert u.tuples(50, 3) == b"".join(tuple_of(block, 50 + i, app=0x77) for i in range(3))
    assert sense(u.run(cdb, block + tuple_of(block, 51))) == REF
    # WRITE SAME(32) on type 2: the same, from the expected initial tag.
    t2 = lun(luns, pool, 2)
    good(t2.run(rw32(0x000D, 9, 2, 1, 0x900), block + tuple_of(block, 0x900)))
    assert t2.tuples(9, 2) == tuple_of(block, 0x900) + tuple_of(block, 0x901)


def test_write_same_protect_zero_generates(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    block = blocks_of(1, 512, seed=2)[0]
    good(u.run(bytes([0x41, 0, 0, 0, 0, 8, 0, 0, 4, 0]), block))
    assert u.tuples(8, 4) == b"".join(tuple_of(block, 8 + i) for i in range(4))


def test_verify_with_vrprotect_checks_the_data_out(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    blocks = blocks_of(3, 512)
    good(u.run(rw10(0x2A, 60, 3), b"".join(blocks)))
    tuples = [tuple_of(b, 60 + i) for i, b in enumerate(blocks)]
    good(u.run(rw10(0x2F, 60, 3, protect=1, extra=0x02), wire(blocks, tuples)))
    bad = list(tuples)
    bad[2] = tuple_of(blocks[2], 99)
    task = u.run(rw10(0x2F, 60, 3, protect=1, extra=0x02), wire(blocks, bad))
    assert sense(task) == REF
    assert info(task) == 62
    other = list(blocks)
    other[1] = bytes(512)
    task = u.run(rw10(0x2F, 60, 3, protect=3, extra=0x02), wire(other, tuples))
    assert sense(task) == (0x0E, 0x1D, 0x00)
    assert info(task) == 520  # into the Data-Out buffer, tuples counted
    # BYTCHK 11b: one block and its tuple.
    good(u.run(rw10(0x2F, 60, 1, protect=1, extra=0x06), blocks[0] + tuples[0]))


def test_deallocated_blocks_get_escape_tuples(luns: list[Lun], pool: Pool) -> None:
    backstore = RamBackstore(NBLOCKS * 512, pi=1)
    thin = LogicalUnit(backstore, runner=run_inline, identity="t/1", thin=True)
    target = ScsiTarget(NAME, [thin])
    try:
        run(target, pool, bytes(6))
        block = blocks_of(1, 512)[0]
        good(run(target, pool, rw10(0x2A, 5, 1), data_out=block)[0])
        # UNMAP: data length 22, descriptor length 16; LBA 5, one block.
        params = (
            bytes.fromhex("0016 0010 00000000")
            + (5).to_bytes(8, "big")
            + bytes.fromhex("00000001 00000000")
        )
        good(run(target, pool, bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), data_out=params)[0])
        assert backstore.protection is not None
        buf = bytearray(8)
        backstore.protection.read(5, [memoryview(buf)])
        assert bytes(buf) == ESCAPE
    finally:
        backstore.close()


# ---- FORMAT UNIT -------------------------------------------------------------------------------


def rc16_prot(u: Lun) -> int:
    task, data = u.read(bytes.fromhex("9e10 0000000000000000 00000020 0000"), 32)
    good(task)
    return data[12]


@pytest.mark.parametrize(("fmtpinfo", "pfu", "ptype"), [(0, 0, 0), (2, 0, 1), (3, 0, 2), (3, 1, 3)])
def test_format_unit_sets_the_type(
    luns: list[Lun], pool: Pool, fmtpinfo: int, pfu: int, ptype: int
) -> None:
    u = lun(luns, pool, 1)
    good(u.run(rw10(0x2A, 0, 1), bytes(512)))
    header = bytes([pfu, 0, 0, 0])
    good(u.run(bytes([0x04, fmtpinfo << 6 | 0x10, 0, 0, 0, 0]), header))
    assert u.store.ptype == ptype
    assert rc16_prot(u) == (((ptype - 1) << 1 | 1) if ptype else 0)
    assert u.tuples(0, 1) == ESCAPE


@pytest.mark.parametrize(
    ("fmtpinfo", "pfu", "asc"),
    [(1, 0, 0x24), (0, 1, 0x26), (2, 1, 0x26), (3, 2, 0x26)],
)
def test_format_unit_illegal_combinations(
    luns: list[Lun], pool: Pool, fmtpinfo: int, pfu: int, asc: int
) -> None:
    u = lun(luns, pool, 3)
    task = u.run(bytes([0x04, fmtpinfo << 6 | 0x10, 0, 0, 0, 0]), bytes([pfu, 0, 0, 0]))
    assert sense(task) == (0x05, asc, 0x00)
    assert u.store.ptype == 3


def test_format_unit_without_pi_capability(pool: Pool) -> None:
    backstore = RamBackstore(1 << 20)
    target = ScsiTarget(NAME, [LogicalUnit(backstore, runner=run_inline, identity="t/0")])
    run(target, pool, bytes(6))
    good(run(target, pool, bytes([0x04, 0, 0, 0, 0, 0]))[0])
    assert sense(run(target, pool, bytes([0x04, 0x80, 0, 0, 0, 0]))[0]) == INVALID_FIELD
    backstore.close()


def test_format_unit_tells_other_nexuses(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    run(u.target, pool, bytes(6), nexus=OTHER_NEXUS)
    good(u.run(bytes([0x04, 0xC0, 0, 0, 0, 0])))  # type 2 (FMTDATA 0: PFU 0)
    task = run(u.target, pool, bytes(6), nexus=OTHER_NEXUS)[0]
    assert sense(task) == (0x06, 0x2A, 0x09)


def test_interleaved_read_streams_through_a_short_pool(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    n = 300
    blocks = blocks_of(n, 512, seed=11)
    tuples = [tuple_of(b, i) for i, b in enumerate(blocks)]
    good(u.run(rw10(0x2A, 0, n, protect=1), wire(blocks, tuples)))

    def short(ch: FakeChannel) -> None:
        ch.partial_limit = 5000  # windows of 9 blocks and tuples, receives cut mid-tuple

    task, ch = run(u.target, pool, rw10(0x28, 0, n, protect=1), edtl=n * 520, setup=short)
    good(task)
    assert bytes(ch.data_in) == wire(blocks, tuples)
    task, ch = run(
        u.target, pool, rw10(0x2A, 0, n, protect=1), data_out=wire(blocks, tuples), setup=short
    )
    good(task)


# ---- other writers keep data and tuples in step (protect 0) -----------------------------------


def test_orwrite_and_compare_and_write_generate_tuples(luns: list[Lun], pool: Pool) -> None:
    u = lun(luns, pool, 1)
    blocks = blocks_of(3, 512, seed=4)
    good(u.run(rw16(0x8A, 70, 3), b"".join(blocks)))
    mask = bytes([0x80]) * 1536

    def odd(ch: FakeChannel) -> None:
        ch.partial_limit = 700  # receives end inside blocks

    task, _ = run(u.target, pool, rw16(0x8B, 70, 3), data_out=mask, setup=odd)
    good(task)
    ored = [bytes(b | 0x80 for b in blk) for blk in blocks]
    assert u.data(70, 3) == b"".join(ored)
    assert u.tuples(70, 3) == b"".join(tuple_of(b, 70 + i) for i, b in enumerate(ored))
    new = blocks_of(1, 512, seed=99)[0]
    cdb = bytes([0x89, 0]) + (71).to_bytes(8, "big") + bytes([0, 0, 0, 1, 0, 0])
    good(u.run(cdb, ored[1] + new))
    assert u.tuples(71, 1) == tuple_of(new, 71)
    assert sense(u.run(bytes([0x89, 0x20]) + cdb[2:], ored[1] + new)) == INVALID_FIELD
    # A rotten block fails COMPARE AND WRITE's read with the guard check, not a miscompare.
    u.backstore.writev(71 * 512, [memoryview(b"rot")])
    task = u.run(cdb, new + new)
    assert sense(task) == GUARD
    assert info(task) == 71


def test_backstore_with_alignment_limits_goes_through_a_bounce(pool: Pool) -> None:
    """O_DIRECT-like limits: data pieces between tuples are not aligned, so they bounce."""
    store = MemBackstore(NBLOCKS * 512)
    store.limits = ConsumerLimits(alignment=4096, max_segments=16)
    store.protection = MemoryProtection(NBLOCKS, 1)
    target = ScsiTarget(NAME, [LogicalUnit(store, runner=run_inline, identity="t/0")])
    run(target, pool, bytes(6))
    blocks = blocks_of(20, 512, seed=8)
    tuples = [tuple_of(b, 5 + i) for i, b in enumerate(blocks)]
    good(run(target, pool, rw10(0x2A, 5, 20, protect=1), data_out=wire(blocks, tuples))[0])
    assert bytes(store.data[5 * 512 : 25 * 512]) == b"".join(blocks)
    task, ch = run(target, pool, rw10(0x28, 5, 20, protect=1), edtl=20 * 520)
    good(task)
    assert bytes(ch.data_in) == wire(blocks, tuples)
    assert pool.stats.copies.get(("pi-split-bounce", "in"), 0) == 20 * 512


def test_segment_limit_alone_bounces_only_when_exceeded(pool: Pool) -> None:
    store = MemBackstore(NBLOCKS * 512)
    store.limits = ConsumerLimits(alignment=1, max_segments=8)
    store.protection = MemoryProtection(NBLOCKS, 1)
    target = ScsiTarget(NAME, [LogicalUnit(store, runner=run_inline, identity="t/0")])
    run(target, pool, bytes(6))
    for n, bounced in ((8, 0), (9, 9 * 512)):
        blocks = blocks_of(n, 512, seed=n)
        data_out = wire(blocks, [tuple_of(b, i) for i, b in enumerate(blocks)])
        before = pool.stats.copies.get(("pi-split-bounce", "in"), 0)
        good(run(target, pool, rw10(0x2A, 0, n, protect=1), data_out=data_out)[0])
        assert pool.stats.copies.get(("pi-split-bounce", "in"), 0) - before == bounced
        assert bytes(store.data[: n * 512]) == b"".join(blocks)
