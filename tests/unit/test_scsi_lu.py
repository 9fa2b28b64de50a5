"""LogicalUnit through ScsiTarget.execute: emulated replies, data path, errors, unit attentions."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import Backstore, Buffers
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import IO_WINDOW, Status
from sgtarget.scsi.lu import COMMANDS, LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline

from .scsi_fakes import NEXUS, OTHER_NEXUS, FakeChannel, MemBackstore, make_task, run

BS = 512
NBLOCKS = 32768  # 16 MiB
TARGET_NAME = "iqn.2024-01.test:tgt"


@pytest.fixture
def store() -> MemBackstore:
    return MemBackstore(NBLOCKS * BS)


@pytest.fixture
def target(store: MemBackstore) -> ScsiTarget:
    lu0 = LogicalUnit(store, runner=run_inline, identity=f"{TARGET_NAME}/lun0")
    lu1 = LogicalUnit(MemBackstore(64 * BS), runner=run_inline, identity=f"{TARGET_NAME}/lun1")
    return ScsiTarget(TARGET_NAME, [lu0, lu1])


def cdb(text: str) -> bytes:
    return bytes.fromhex(text)


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([op, flags]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([op, flags]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([op, flags]) + lba.to_bytes(4, "big") + n.to_bytes(4, "big") + b"\0\0"


def sense_of(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION
    s = task.sense
    assert s[0] & 0x7F == 0x70
    assert len(s) == 18
    return s[2] & 0x0F, s[12], s[13]


def sks_of(task: Task) -> bytes:
    return task.sense[15:18]


@pytest.fixture
def ready(target: ScsiTarget, pool: Pool) -> ScsiTarget:
    """The target after NEXUS consumed its power-on unit attention on LUN 0 and 1."""
    for lun in (0, 1):
        task, _ = run(target, pool, cdb("00 00 00 00 00 00"), lun=lun)
        assert sense_of(task) == (0x6, 0x29, 0x00)
    return target


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()
    assert task.sense == b""


# ---- INQUIRY ---------------------------------------------------------------------------------

STD_INQUIRY = bytes.fromhex(
    "00 00 06 12 45 08 00 02"  # 3PC: the LU is a copy manager
    + b"SGTARGET".hex()
    + b"VIRTUAL-DISK    ".hex()
    + b"0001".hex()
    + "00" * 22
    + "00a0 0460 04c0 0960"
    + "00" * 8
)


def test_standard_inquiry_golden(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("12 00 00 01 04 00"))
    good(task)
    assert bytes(ch.data_in) == STD_INQUIRY
    assert task.transfer_length == 74
    assert ch.sends == [(0, 74, True)]


@pytest.mark.parametrize("alloc", [0, 5, 36, 73])
def test_inquiry_truncated_to_allocation_length(ready: ScsiTarget, pool: Pool, alloc: int) -> None:
    task, ch = run(ready, pool, bytes([0x12, 0, 0, 0, alloc, 0]))
    good(task)
    assert bytes(ch.data_in) == STD_INQUIRY[:alloc]
    assert task.transfer_length == alloc


def test_inquiry_16_bit_allocation_length(ready: ScsiTarget, pool: Pool) -> None:
    _a, ch_a = run(ready, pool, cdb("12 00 00 01 ff 00"))
    _b, ch_b = run(ready, pool, cdb("12 00 00 02 00 00"))
    assert bytes(ch_a.data_in) == bytes(ch_b.data_in) == STD_INQUIRY


def test_inquiry_page_code_without_evpd(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("12 00 01 00 ff 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("c00002")
    assert ch.sends == []


def test_inquiry_unknown_vpd_page(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("12 01 c7 00 ff 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)


SERIAL = b"1aaa18f684c1bdd9e5e14cfa3be4948d"
NAA = bytes.fromhex("6000000faada340b039cc39fa3137de1")


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (0x00, bytes.fromhex("00 00 0006 00 80 83 b0 b1 b2")),
        (0x80, bytes.fromhex("00 80 0020") + SERIAL),
        (
            0x83,
            bytes.fromhex("00 83 0064")
            + bytes.fromhex("01 03 00 10")
            + NAA
            + bytes.fromhex("02 01 00 28")
            + b"SGTARGET"
            + SERIAL
            + bytes.fromhex("01 14 00 04 0000 0001")
            + bytes.fromhex("03 28 00 18")
            + TARGET_NAME.encode()
            + b"\0\0\0\0",
        ),
        (
            0xB0,
            # MAXIMUM COMPARE AND WRITE LENGTH 255, OPTIMAL TRANSFER LENGTH GRANULARITY 8 (a
            # 4 KiB physical block), MAXIMUM WRITE SAME LENGTH 0xFFFF (no UNMAP limits: LUN 0
            # is not thin), WRITE ATOMIC: 2048 blocks, aligned to and in multiples of 8.
            bytes.fromhex("00 b0 003c 00 ff 0008 00004000 00000800")
            + bytes(20)
            + bytes.fromhex("000000000000ffff")
            + bytes.fromhex("00000800 00000008 00000008 00000800 00000800"),
        ),
        # WABEREQ/WACEREQ 01b: reads after a SANITIZE erase succeed.
        (0xB1, bytes.fromhex("00 b1 003c 0001 00 50") + bytes(56)),
        (0xB2, bytes.fromhex("00 b2 0004 00 00 00 00")),
    ],
)
def test_vpd_pages_golden(ready: ScsiTarget, pool: Pool, page: int, expected: bytes) -> None:
    task, ch = run(ready, pool, bytes([0x12, 0x01, page, 0x01, 0x00, 0]))
    good(task)
    assert bytes(ch.data_in) == expected


def test_vpd_pages_are_listed_sorted_and_all_readable(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, cdb("12 01 00 00 ff 00"))
    pages = list(ch.data_in[4:])
    assert pages == sorted(pages)
    for page in pages:
        task, _ = run(ready, pool, bytes([0x12, 0x01, page, 0, 0xFF, 0]))
        good(task)


def test_identity_is_stable_and_distinct(store: MemBackstore) -> None:
    a = LogicalUnit(store, runner=run_inline, identity="iqn.x:t/lun0")
    b = LogicalUnit(store, runner=run_inline, identity="iqn.x:t/lun0")
    c = LogicalUnit(store, runner=run_inline, identity="iqn.x:t/lun1")
    assert (a.serial, a.naa) == (b.serial, b.naa)
    assert a.serial != c.serial
    assert a.naa != c.naa
    assert a.naa[0] >> 4 == 6


# ---- READ CAPACITY ---------------------------------------------------------------------------


def test_read_capacity_10(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("25 00 00000000 0000 00 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00007fff 00000200")
    assert task.transfer_length == 8


def test_read_capacity_16(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("9e 10 0000000000000000 00000020 00 00"))
    good(task)
    # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 3: 4 KiB physical blocks.
    assert bytes(ch.data_in) == bytes.fromhex("0000000000007fff 00000200 00 03 0000") + bytes(16)


@pytest.mark.parametrize("alloc", [0, 1, 12, 15, 31])
def test_read_capacity_16_truncation(ready: ScsiTarget, pool: Pool, alloc: int) -> None:
    task, ch = run(ready, pool, bytes([0x9E, 0x10]) + bytes(8) + alloc.to_bytes(4, "big") + b"\0\0")
    good(task)
    assert task.transfer_length == alloc
    assert len(ch.data_in) == alloc


class HugeBackstore(Backstore):
    """Capacity without memory: every byte reads as zero."""

    kind: ClassVar[str] = "test-huge"
    blocking: ClassVar[bool] = False

    def readv(self, offset: int, bufs: Buffers) -> int:
        for b in bufs:
            b[:] = bytes(len(b))
        return sum(len(b) for b in bufs)

    def writev(self, offset: int, bufs: Buffers) -> int:
        return sum(len(b) for b in bufs)


def test_read_capacity_10_saturates_for_big_luns(pool: Pool) -> None:
    lu = LogicalUnit(
        HugeBackstore((1 << 32) * 4096), runner=run_inline, identity="big", block_size=4096
    )
    tgt = ScsiTarget(TARGET_NAME, [lu])
    run(tgt, pool, cdb("00" * 6))
    _, ch = run(tgt, pool, cdb("25 00 00000000 0000 00 00"))
    assert bytes(ch.data_in) == bytes.fromhex("ffffffff 00001000")
    _, ch16 = run(tgt, pool, cdb("9e 10 0000000000000000 00000020 00 00"))
    assert ch16.data_in[:12] == bytes.fromhex("00000000ffffffff 00001000")
    # An LBA above 2^32 works through READ(16).
    task, ch = run(tgt, pool, rw16(0x88, 0xFFFFFFFF, 1))
    good(task)
    assert bytes(ch.data_in) == bytes(4096)


# ---- MODE SENSE ------------------------------------------------------------------------------

CACHING = bytes.fromhex("08 12 04") + bytes(17)
CONTROL = bytes.fromhex("0a 0a 00 10 00 00 00 00 ffff 0000")
BLOCK_DESC = bytes.fromhex("00008000 00 000200")


def test_mode_sense_6_all_pages_golden(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("1a 00 3f 00 ff 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("2b 00 10 08") + BLOCK_DESC + CACHING + CONTROL
    assert task.transfer_length == 44


def test_mode_sense_6_all_pages_and_subpages_dbd(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, cdb("1a 08 3f ff ff 00"))
    assert bytes(ch.data_in) == bytes.fromhex("23 00 10 00") + CACHING + CONTROL


def test_mode_sense_10_control_page(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("5a 08 0a 00 00 00 00 01 00 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("0012 00 10 00 00 0000") + CONTROL


def test_mode_sense_10_with_block_descriptor(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, cdb("5a 00 08 00 00 00 00 01 00 00"))
    assert bytes(ch.data_in) == bytes.fromhex("0022 00 10 00 00 0008") + BLOCK_DESC + CACHING


def test_mode_sense_changeable_and_default(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, cdb("1a 00 48 00 ff 00"))  # PC=1 changeable, caching
    assert bytes(ch.data_in) == bytes.fromhex("1f 00 10 08") + bytes(8) + bytes.fromhex(
        "0812"
    ) + bytes(18)
    _, ch = run(ready, pool, cdb("1a 08 88 00 ff 00"))  # PC=2 default
    assert bytes(ch.data_in) == bytes.fromhex("17 00 10 00") + CACHING


def test_mode_sense_saved_values_not_supported(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("1a 00 ff 00 ff 00"))
    assert sense_of(task) == (0x5, 0x39, 0x00)


def test_mode_sense_unsupported_page_and_subpage(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("1a 00 19 00 ff 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("cd0002")
    task, _ = run(ready, pool, cdb("1a 00 08 01 ff 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("c00003")
    task, _ = run(ready, pool, cdb("1a 00 3f 01 ff 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)


def test_mode_sense_truncation(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("1a 00 3f 00 04 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("2b 00 10 08")
    assert task.transfer_length == 4


# ---- simple commands -------------------------------------------------------------------------


def test_test_unit_ready_and_start_stop(ready: ScsiTarget, pool: Pool) -> None:
    good(run(ready, pool, cdb("00 00 00 00 00 00"))[0])
    for power in range(16):
        task, _ = run(ready, pool, bytes([0x1B, 0, 0, 0, power << 4 | 0x01, 0]))
        good(task)
    good(run(ready, pool, cdb("1b 01 00 00 02 00"))[0])  # IMMED, LOEJ


def test_unknown_opcode(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("42 00 00 00 00 00 00 00 00 00"))
    assert sense_of(task) == (0x5, 0x20, 0x00)


def test_unknown_service_action(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("9e 11" + "00" * 14))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("cc0001")


def test_naca_is_rejected(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("00 00 00 00 00 04"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("ca0005")


def test_short_cdb_is_rejected(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("28 00 00 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)


def test_synchronize_cache(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    good(run(ready, pool, cdb("35 00 00000000 00 0000 00"))[0])
    good(run(ready, pool, cdb("91 02 0000000000007fff 00000001 00 00"))[0])  # IMMED, last LBA
    assert store.flushes == 2
    task, _ = run(ready, pool, cdb("35 00 00007fff 00 0002 00"))
    assert sense_of(task) == (0x5, 0x21, 0x00)
    store.fail_flush = True
    task, _ = run(ready, pool, cdb("35 00 00000000 00 0000 00"))
    assert sense_of(task) == (0x3, 0x0C, 0x00)


# ---- REPORT LUNS -----------------------------------------------------------------------------


def test_report_luns(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, cdb("a0 00 00 00 00 00 00 00 01 00 00 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00000010 00000000 0000000000000000 0001000000000000")
    _, ch = run(ready, pool, cdb("a0 00 02 00 00 00 00 00 00 10 00 00"))
    # Truncated to the allocation length of 16: header and the first entry.
    assert bytes(ch.data_in) == bytes.fromhex("00000010 00000000 0000000000000000")
    _, ch = run(ready, pool, cdb("a0 00 01 00 00 00 00 00 01 00 00 00"))
    assert bytes(ch.data_in) == bytes(8)  # no well-known LUs


def test_report_luns_errors(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, cdb("a0 00 03 00 00 00 00 00 01 00 00 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("c00002")
    task, _ = run(ready, pool, cdb("a0 00 00 00 00 00 00 00 00 0f 00 00"))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("c00006")


# ---- REPORT SUPPORTED OPERATION CODES --------------------------------------------------------


def rsoc(options: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return bytes(
        [
            0xA3,
            0x0C,
            options | (0x80 if rctd else 0),
            opcode,
            sa >> 8,
            sa & 0xFF,
            0,
            0,
            0xFF,
            0xFF,
            0,
            0,
        ]
    )


def test_rsoc_all_commands(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, rsoc(0))
    good(task)
    data = bytes(ch.data_in)
    length = int.from_bytes(data[:4], "big")
    # Every command but those only some LUs have (UNMAP: thin, PREVENT ALLOW: removable).
    assert length == len(data) - 4 == 8 * sum(1 for c in COMMANDS if c.supported is None)
    descs = [data[4 + i : 12 + i] for i in range(0, length, 8)]
    assert bytes.fromhex("28 00 0000 00 00 000a") in descs  # READ(10)
    assert bytes.fromhex("9e 00 0010 00 01 0010") in descs  # READ CAPACITY(16), SERVACTV
    assert bytes.fromhex("a3 00 000c 00 01 000c") in descs  # RSOC itself
    for d in descs:
        assert d[5] & 0x01 or d[2:4] == b"\0\0"


def test_rsoc_all_commands_with_timeouts(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, rsoc(0, rctd=True))
    data = bytes(ch.data_in)
    # Not the commands only some LUs have (UNMAP, PREVENT ALLOW).
    assert int.from_bytes(data[:4], "big") == 20 * sum(1 for c in COMMANDS if c.supported is None)
    first = data[4:24]  # TEST UNIT READY: CTDP, timeouts descriptor length 0x0A
    assert first == bytes.fromhex("00 00 0000 00 02 0006 000a 00 00 00000000 00000000")


def test_rsoc_one_command(ready: ScsiTarget, pool: Pool) -> None:
    _, ch = run(ready, pool, rsoc(1, 0x28))
    assert bytes(ch.data_in) == bytes.fromhex("00 03 000a 28 18 ffffffff 3f ffff 00")
    _, ch = run(ready, pool, rsoc(1, 0x28, rctd=True))
    assert bytes(ch.data_in) == bytes.fromhex(
        "00 83 000a 28 18 ffffffff 3f ffff 00 000a 00 00 00000000 0000001e"
    )
    _, ch = run(ready, pool, rsoc(2, 0x9E, 0x10))
    assert bytes(ch.data_in) == bytes.fromhex("00 03 0010 9e 10 0000000000000000 ffffffff 00 00")
    _, ch = run(ready, pool, rsoc(3, 0x12, 0))
    assert ch.data_in[:5] == bytes.fromhex("00 03 0006 12")


def test_rsoc_not_supported_and_errors(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, rsoc(1, 0x42))  # UNMAP: LUN 0 is not thin
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")
    _, ch = run(ready, pool, rsoc(2, 0x9E, 0x11))
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")
    _, ch = run(ready, pool, rsoc(3, 0x12, 5))  # INQUIRY has no service action 5
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")
    for bad in (rsoc(1, 0x9E), rsoc(2, 0x28), rsoc(4)):
        task, _ = run(ready, pool, bad)
        assert sense_of(task) == (0x5, 0x24, 0x00)
        assert sks_of(task) == bytes.fromhex("ca0002")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 255), st.integers(0, 31))
def test_rsoc_agrees_with_dispatch(ready: ScsiTarget, pool: Pool, opcode: int, sa: int) -> None:
    """What RSOC reports as supported is exactly what dispatch does not reject as unknown."""
    has_sa = COMMANDS.has_service_actions(opcode)
    _, ch = run(ready, pool, rsoc(2 if has_sa else 1, opcode, sa))
    supported = ch.data_in[1] & 0x07 == 0x03
    probe = bytes([opcode, sa if has_sa else 0]) + bytes(14)
    task, _ = run(ready, pool, probe, edtl=0)
    unknown = (
        task.status == Status.CHECK_CONDITION
        and (
            (task.sense[12], task.sense[13]) == (0x20, 0x00)
            or (has_sa and task.sense[12] == 0x24 and task.sense[15:18] == bytes.fromhex("cc0001"))
            # 32-byte CDBs carry their service action in bytes 8..9.
            or (opcode == 0x7F and task.sense[12] == 0x24 and task.sense[15:18] == b"\xc0\x00\x08")
        )
    )
    assert supported != unknown


# ---- READ / WRITE ----------------------------------------------------------------------------


def pattern(nbytes: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed + (i >> 9)) & 0xFF for i in range(nbytes))


def test_write_then_read_back(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    data = pattern(4 * BS)
    task, ch = run(ready, pool, rw10(0x2A, 10, 4), data_out=data)
    good(task)
    assert task.transfer_length == 4 * BS
    assert ch.receives == [(0, 4 * BS)]
    assert store.data[10 * BS : 14 * BS] == data
    for read in (rw10(0x28, 10, 4), rw12(0xA8, 10, 4), rw16(0x88, 10, 4)):
        task, ch = run(ready, pool, read)
        good(task)
        assert bytes(ch.data_in) == data
        assert task.transfer_length == 4 * BS


def test_read6_write6(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    data = pattern(256 * BS, 3)
    task, _ = run(ready, pool, cdb("0a 00 01 00 00 00"), data_out=data)  # 0 => 256 blocks
    good(task)
    assert task.transfer_length == 256 * BS
    assert store.data[256 * BS : 512 * BS] == data
    task, ch = run(ready, pool, cdb("08 00 01 00 00 00"), edtl=256 * BS)
    good(task)
    assert bytes(ch.data_in) == data
    task, _ = run(ready, pool, cdb("08 00 7f ff 02 00"))  # LBA 0x7fff + 2 blocks
    assert sense_of(task) == (0x5, 0x21, 0x00)


def test_large_read_streams_in_windows(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    n = 3 * IO_WINDOW // BS + 1
    store.data[: n * BS] = pattern(n * BS, 5)
    peak: list[int] = []
    task, ch = run(
        ready,
        pool,
        rw16(0x88, 0, n),
        edtl=n * BS,
        setup=lambda c: setattr(c, "hook", lambda _w: peak.append(pool.stats.blocks_in_use)),
    )
    good(task)
    assert ch.sends == [
        (0, IO_WINDOW, False),
        (IO_WINDOW, IO_WINDOW, False),
        (2 * IO_WINDOW, IO_WINDOW, False),
        (3 * IO_WINDOW, BS, True),
    ]
    assert bytes(ch.data_in) == store.data[: n * BS]
    # Never more than one window of pool memory held at once.
    assert max(peak) <= IO_WINDOW // pool.block_size


def test_large_write_streams_in_windows(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    n = 2 * IO_WINDOW // BS + 3
    data = pattern(n * BS, 9)
    task, ch = run(ready, pool, rw16(0x8A, 100, n), data_out=data)
    good(task)
    assert ch.receives == [(0, IO_WINDOW), (IO_WINDOW, IO_WINDOW), (2 * IO_WINDOW, 3 * BS)]
    assert store.data[100 * BS : (100 + n) * BS] == data


def test_read_stops_at_edtl(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    store.data[: 4 * BS] = pattern(4 * BS)
    task, ch = run(ready, pool, rw10(0x28, 0, 4), edtl=600)
    good(task)
    assert task.transfer_length == 4 * BS
    assert ch.sends == [(0, 2 * BS, True)]
    assert bytes(ch.data_in) == store.data[:600]
    task, ch = run(ready, pool, rw10(0x28, 0, 1), edtl=0)
    good(task)
    assert (task.transfer_length, ch.sends) == (BS, [])


def test_zero_blocks(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    for op in (0x28, 0x2A, 0x2E, 0x2F):
        task, ch = run(ready, pool, rw10(op, 0, 0), edtl=0)
        good(task)
        assert (task.transfer_length, ch.sends, ch.receives) == (0, [], [])
        task, _ = run(ready, pool, rw10(op, NBLOCKS, 0), edtl=0)
        assert sense_of(task) == (0x5, 0x21, 0x00)
    assert store.writes == 0


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(st.integers(NBLOCKS - 20, NBLOCKS + 20), st.integers(0, 2**64 - 1)),
    st.integers(0, 24),
)
def test_read16_range_check(ready: ScsiTarget, pool: Pool, lba: int, n: int) -> None:
    task, ch = run(ready, pool, rw16(0x88, lba, n))
    assert task.transfer_length == n * BS
    if lba < NBLOCKS and lba + n <= NBLOCKS:
        good(task)
        assert len(ch.data_in) == n * BS
    else:
        assert sense_of(task) == (0x5, 0x21, 0x00)
        assert ch.sends == []


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**32 - 1), st.integers(0, 8))
def test_write10_range_check(
    ready: ScsiTarget, pool: Pool, store: MemBackstore, lba: int, n: int
) -> None:
    writes = store.writes
    task, ch = run(ready, pool, rw10(0x2A, lba, n), data_out=bytes(n * BS), edtl=n * BS)
    if lba < NBLOCKS and lba + n <= NBLOCKS:
        good(task)
        assert store.writes == writes + (1 if n else 0)
    else:
        assert sense_of(task) == (0x5, 0x21, 0x00)
        assert (ch.receives, store.writes) == ([], writes)


def test_transfer_length_limit(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, rw16(0x88, 0, 16385))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("c0000a")


@pytest.mark.parametrize(
    "op", [0x28, 0xA8, 0x88, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x2F, 0xAF, 0x8F]
)
@pytest.mark.parametrize("protect", range(1, 8))
def test_protect_fields_rejected(
    ready: ScsiTarget, pool: Pool, store: MemBackstore, op: int, protect: int
) -> None:
    make = {0: rw10, 5: rw12, 4: rw16}[op >> 5 if op >> 5 != 1 else 0]
    task, ch = run(ready, pool, make(op, 0, 1, protect << 5 | 0x02), data_out=bytes(BS))
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("cf0001")
    assert (ch.sends, ch.receives, store.writes) == ([], [], 0)


def test_dpo_fua(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    for flags in (0x10, 0x08, 0x18):
        good(run(ready, pool, rw10(0x28, 0, 1, flags))[0])
    good(run(ready, pool, rw10(0x2A, 0, 1, 0x10), data_out=bytes(BS))[0])
    assert store.flushes == 0
    good(run(ready, pool, rw10(0x2A, 0, 1, 0x08), data_out=bytes(BS))[0])
    good(run(ready, pool, rw16(0x8A, 0, 1, 0x18), data_out=bytes(BS))[0])
    assert store.flushes == 2


def test_write_overflow_writes_only_whole_blocks_within_edtl(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    # FCP-4 option a, as libiscsi 1.19 expects: GOOD, only EDTL's worth written.
    store.data[: 2 * BS] = b"a" * 2 * BS
    task, ch = run(ready, pool, rw10(0x2A, 0, 2), data_out=b"b" * BS, edtl=BS)
    good(task)
    assert task.transfer_length == 2 * BS
    assert ch.receives == [(0, BS)]
    assert store.data[: 2 * BS] == b"b" * BS + b"a" * BS
    task, ch = run(ready, pool, rw10(0x2A, 0, 1), edtl=0)
    good(task)
    assert ch.receives == []


def test_write_overflow_inside_a_block_is_refused_without_transfer(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    task, ch = run(ready, pool, rw10(0x2A, 0, 2), data_out=b"b" * 200, edtl=200)
    assert sense_of(task) == (0x5, 0x0E, 0x03)
    assert task.transfer_length == 2 * BS
    assert ch.receives == []
    assert store.writes == 0


def test_write_underflow_writes_spdtl(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    task, ch = run(ready, pool, rw10(0x2A, 0, 1), data_out=b"b" * 10000)
    good(task)
    assert task.transfer_length == BS
    assert ch.receives == [(0, BS)]
    assert store.data[: BS + 1] == b"b" * BS + b"\0"


def test_write_and_verify(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    data = pattern(3 * BS)
    for op, make in ((0x2E, rw10), (0xAE, rw12), (0x8E, rw16)):
        store.data[: 3 * BS] = bytes(3 * BS)
        flushes = store.flushes
        task, _ = run(ready, pool, make(op, 0, 3, 0x02), data_out=data)
        good(task)
        assert store.data[: 3 * BS] == data
        assert store.flushes == flushes + 1
    for bytchk in (2, 3):
        task, _ = run(ready, pool, rw10(0x2E, 0, 1, bytchk << 1), data_out=bytes(BS))
        assert sense_of(task) == (0x5, 0x24, 0x00)


def test_write_and_verify_overflow_writes_whole_blocks_within_edtl(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    store.data[: 2 * BS] = b"a" * 2 * BS
    task, _ = run(ready, pool, rw10(0x2E, 0, 2, 0x02), data_out=b"b" * BS, edtl=BS)
    good(task)
    assert task.transfer_length == 2 * BS
    assert store.data[: 2 * BS] == b"b" * BS + b"a" * BS
    task, ch = run(ready, pool, rw10(0x2E, 0, 1, 0x02), edtl=0)
    good(task)
    assert ch.receives == []


def test_medium_errors(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    store.fail_read = True
    task, ch = run(ready, pool, rw10(0x28, 7, 1))
    assert sense_of(task) == (0x3, 0x11, 0x00)
    assert task.sense[0] == 0xF0
    assert task.sense[3:7] == (7).to_bytes(4, "big")
    assert ch.sends == []
    store.fail_write = True
    task, _ = run(ready, pool, rw10(0x2A, 9, 1), data_out=bytes(BS))
    assert sense_of(task) == (0x3, 0x0C, 0x00)
    assert task.transfer_length == BS


def test_pool_exhausted_is_task_set_full(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    def exhaust(c: FakeChannel) -> None:
        c.exhausted = True

    for command, out in (
        (rw10(0x28, 0, 1), b""),
        (rw10(0x2A, 0, 1), b"x" * BS),
        (cdb("12 00 00 00 ff 00"), b""),
    ):
        task, ch = run(ready, pool, command, data_out=out, setup=exhaust)
        assert task.status == Status.TASK_SET_FULL
        assert task.sense == b""
        assert ch.sends == []
    assert store.writes == 0


def test_abort_during_read_stops_and_releases(ready: ScsiTarget, pool: Pool) -> None:
    def abort_on_send(c: FakeChannel) -> None:
        c.hook = lambda what: setattr(c.task, "aborted", what == "send" or c.task.aborted)

    n = 3 * IO_WINDOW // BS
    _, ch = run(ready, pool, rw16(0x88, 0, n), edtl=n * BS, setup=abort_on_send)
    assert len(ch.sends) == 1  # run() also asserts nothing leaked


def test_abort_during_write_writes_nothing(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    def abort(c: FakeChannel) -> None:
        c.hook = lambda what: setattr(c.task, "aborted", what == "receive" or c.task.aborted)

    for command in (rw10(0x2A, 0, 4), rw10(0x2E, 0, 4, 0x02), rw10(0x2F, 0, 4, 0x02)):
        _, ch = run(ready, pool, command, data_out=bytes(4 * BS), setup=abort)
        assert len(ch.receives) == 1
    assert store.writes == 0


def test_abort_during_verify_read(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    def abort(c: FakeChannel) -> None:
        c.hook = lambda what: setattr(c.task, "aborted", what == "alloc" or c.task.aborted)

    store.data[0] = 1  # would miscompare if the command went on
    task, _ = run(ready, pool, rw10(0x2F, 0, 1, 0x02), data_out=bytes(BS), setup=abort)
    assert task.sense == b"" or sense_of(task)[0] != 0xE


def test_abort_during_emulated_reply(ready: ScsiTarget, pool: Pool) -> None:
    def abort(c: FakeChannel) -> None:
        c.hook = lambda what: setattr(c.task, "aborted", True)

    _, ch = run(ready, pool, cdb("12 00 00 00 ff 00"), setup=abort)
    assert ch.sends == []


class ExplodingBackstore(MemBackstore):
    def readv(self, offset: int, bufs: Buffers) -> int:
        raise RuntimeError("bug in a backstore")


def test_unexpected_exception_is_internal_target_failure(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    tgt = ScsiTarget(
        TARGET_NAME, [LogicalUnit(ExplodingBackstore(64 * BS), runner=run_inline, identity="x")]
    )
    run(tgt, pool, cdb("00" * 6))
    with caplog.at_level(logging.ERROR, logger="sgtarget.scsi.lu"):
        task, _ = run(tgt, pool, rw10(0x28, 0, 1))
    assert sense_of(task) == (0x4, 0x44, 0x00)
    assert "internal error executing CDB 28" in caplog.text
    caplog.clear()  # the logged traceback pins pool views


def test_blocking_backstore_goes_through_runner(pool: Pool) -> None:
    calls: list[str] = []

    class Blocking(MemBackstore):
        blocking: ClassVar[bool] = True

    async def runner(fn, /, *args):  # type: ignore[no-untyped-def]
        calls.append(fn.__name__)
        return fn(*args)

    tgt = ScsiTarget(TARGET_NAME, [LogicalUnit(Blocking(64 * BS), runner=runner, identity="b")])
    run(tgt, pool, cdb("00" * 6))
    run(tgt, pool, rw10(0x2A, 0, 1, 0x08), data_out=bytes(BS))
    run(tgt, pool, rw10(0x28, 0, 1))
    assert calls == ["writev", "flush", "readv"]


# ---- VERIFY ----------------------------------------------------------------------------------


def test_verify_bytchk0_is_range_check_only(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, rw10(0x2F, 0, 8), edtl=0)
    good(task)
    assert (task.transfer_length, ch.receives) == (0, [])
    task, _ = run(ready, pool, rw16(0x8F, NBLOCKS - 1, 2), edtl=0)
    assert sense_of(task) == (0x5, 0x21, 0x00)


def test_verify_bytchk1(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    data = pattern(4 * BS, 11)
    store.data[BS : 5 * BS] = data
    for op, make in ((0x2F, rw10), (0xAF, rw12), (0x8F, rw16)):
        task, _ = run(ready, pool, make(op, 1, 4, 0x02), data_out=data)
        good(task)
        assert task.transfer_length == 4 * BS
    bad = bytearray(data)
    bad[700] ^= 0x58
    task, _ = run(ready, pool, rw10(0x2F, 1, 4, 0x02), data_out=bytes(bad))
    assert sense_of(task) == (0xE, 0x1D, 0x00)
    assert task.sense[0] == 0xF0
    assert int.from_bytes(task.sense[3:7], "big") == 700


def test_verify_miscompare_in_later_window(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    n = IO_WINDOW // BS + 4
    data = bytearray(n * BS)
    data[IO_WINDOW + 5] = 1
    task, _ = run(ready, pool, rw16(0x8F, 0, n, 0x02), data_out=bytes(data))
    assert sense_of(task) == (0xE, 0x1D, 0x00)
    assert int.from_bytes(task.sense[3:7], "big") == IO_WINDOW + 5


def test_verify_bytchk3_single_block(ready: ScsiTarget, pool: Pool, store: MemBackstore) -> None:
    block = pattern(BS, 13)
    store.data[: 3 * BS] = block * 3
    task, ch = run(ready, pool, rw10(0x2F, 0, 3, 0x06), data_out=block)
    good(task)
    assert task.transfer_length == BS
    assert ch.receives == [(0, BS)]
    store.data[2 * BS + 5] ^= 0xFF
    task, _ = run(ready, pool, rw10(0x2F, 0, 3, 0x06), data_out=block)
    assert sense_of(task) == (0xE, 0x1D, 0x00)
    assert int.from_bytes(task.sense[3:7], "big") == 5


def test_verify_errors(ready: ScsiTarget, pool: Pool) -> None:
    task, _ = run(ready, pool, rw10(0x2F, 0, 1, 0x04), data_out=bytes(BS))  # BYTCHK 2
    assert sense_of(task) == (0x5, 0x24, 0x00)
    assert sks_of(task) == bytes.fromhex("ca0001")
    task, _ = run(ready, pool, rw10(0x2F, 0, 2, 0x02), data_out=bytes(BS))  # short Data-Out
    assert sense_of(task) == (0x5, 0x0E, 0x03)


# ---- unit attentions -------------------------------------------------------------------------

TUR = cdb("00 00 00 00 00 00")
REQUEST_SENSE = cdb("03 00 00 00 ff 00")


def test_power_on_ua_once_per_nexus(target: ScsiTarget, pool: Pool) -> None:
    good(run(target, pool, cdb("12 00 00 00 ff 00"))[0])  # INQUIRY never reports a UA
    good(run(target, pool, cdb("a0 00 00 00 00 00 00 00 01 00 00 00"))[0])
    assert sense_of(run(target, pool, TUR)[0]) == (0x6, 0x29, 0x00)
    good(run(target, pool, TUR)[0])
    # Another nexus and another LU each have their own.
    assert sense_of(run(target, pool, TUR, nexus=OTHER_NEXUS)[0]) == (0x6, 0x29, 0x00)
    assert sense_of(run(target, pool, TUR, lun=1)[0]) == (0x6, 0x29, 0x00)
    # So do tasks without a nexus.
    assert sense_of(run(target, pool, TUR, nexus=None)[0]) == (0x6, 0x29, 0x00)
    good(run(target, pool, TUR, nexus=None)[0])


def test_command_reporting_ua_is_not_executed(
    target: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    task, ch = run(target, pool, rw10(0x2A, 0, 1), data_out=b"z" * BS)
    assert sense_of(task) == (0x6, 0x29, 0x00)
    assert (ch.receives, store.writes) == ([], 0)


def test_request_sense_returns_and_clears_ua(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, REQUEST_SENSE)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("70 00 06 00000000 0a 00000000 29 00 00 000000")
    good(run(target, pool, TUR)[0])
    _, ch = run(target, pool, REQUEST_SENSE)
    assert bytes(ch.data_in) == bytes.fromhex("70 00 00 00000000 0a 00000000 00 00 00 000000")


def test_request_sense_descriptor_format(ready: ScsiTarget, pool: Pool) -> None:
    assert ready.lun_reset(0)
    task, ch = run(ready, pool, cdb("03 01 00 00 ff 00"))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("72 06 29 03 000000 00")
    _, ch = run(ready, pool, cdb("03 01 00 00 04 00"))
    assert bytes(ch.data_in) == bytes.fromhex("72 00 00 00")


def test_lun_reset_ua(ready: ScsiTarget, pool: Pool) -> None:
    run(ready, pool, TUR, nexus=OTHER_NEXUS)  # consume OTHER_NEXUS's power-on UA on LUN 0
    assert ready.lun_reset(0) is True
    assert ready.lun_reset(7) is False
    assert sense_of(run(ready, pool, TUR)[0]) == (0x6, 0x29, 0x03)
    good(run(ready, pool, TUR)[0])
    assert sense_of(run(ready, pool, TUR, nexus=OTHER_NEXUS)[0]) == (0x6, 0x29, 0x03)
    good(run(ready, pool, TUR, lun=1)[0])  # LUN 1 was not reset


def test_repeated_resets_report_one_ua(ready: ScsiTarget, pool: Pool) -> None:
    ready.lun_reset(0)
    ready.target_reset(cold=False)
    assert sense_of(run(ready, pool, TUR)[0]) == (0x6, 0x29, 0x00)
    good(run(ready, pool, TUR)[0])


@pytest.mark.parametrize("cold", [False, True])
def test_target_reset_ua_on_all_luns(ready: ScsiTarget, pool: Pool, cold: bool) -> None:
    ready.target_reset(cold=cold)
    for lun in (0, 1):
        assert sense_of(run(ready, pool, TUR, lun=lun)[0]) == (0x6, 0x29, 0x00)
        good(run(ready, pool, TUR, lun=lun)[0])


def test_nexus_lost_forgets_state(ready: ScsiTarget, pool: Pool) -> None:
    ready.lun_reset(0)
    ready.nexus_lost(NEXUS)
    # The nexus is new again: power-on, not the reset it never saw.
    assert sense_of(run(ready, pool, TUR)[0]) == (0x6, 0x29, 0x00)
    good(run(ready, pool, TUR)[0])


def test_execute_is_reentrant_for_concurrent_tasks(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    store.data[: 8 * BS] = pattern(8 * BS)

    async def both() -> list[FakeChannel]:
        chans = []
        for lba in (0, 4):
            task = make_task(rw10(0x28, lba, 4), expected_length=4 * BS)
            chans.append(FakeChannel(pool, task))
        await asyncio.gather(*(ready.execute(c.task, c) for c in chans))
        return chans

    a, b = asyncio.run(both())
    assert bytes(a.data_in) + bytes(b.data_in) == store.data[: 8 * BS]
    assert pool.stats.blocks_in_use == 0


def test_read_and_write_stream_through_short_windows_under_pressure(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    def squeeze(ch: FakeChannel) -> None:
        ch.partial_limit = 3 * BS  # the transport hands out three blocks at a time

    data = pattern(16 * BS, seed=7)
    task, ch = run(ready, pool, rw10(0x2A, 4, 16), data_out=data, setup=squeeze)
    good(task)
    assert [n for _off, n in ch.receives][:2] == [16 * BS, 13 * BS]
    assert store.data[4 * BS : 20 * BS] == data
    task, ch = run(ready, pool, rw10(0x28, 4, 16), edtl=16 * BS, setup=squeeze)
    good(task)
    assert bytes(ch.data_in) == data
    assert [n for _off, n, _last in ch.sends] == [3 * BS] * 5 + [BS]
    assert [last for *_, last in ch.sends] == [False] * 5 + [True]


def test_verify_compares_in_short_windows_and_reports_the_exact_offset(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    data = pattern(16 * BS, seed=9)
    store.data[0 : 16 * BS] = data

    def squeeze(ch: FakeChannel) -> None:
        ch.partial_limit = 3 * BS

    task, _ = run(ready, pool, rw10(0x2F, 0, 16, 0x02), data_out=data, setup=squeeze)
    good(task)
    bad = bytearray(data)
    bad[11 * BS + 7] ^= 0xFF
    task, _ = run(ready, pool, rw10(0x2F, 0, 16, 0x02), data_out=bytes(bad), setup=squeeze)
    assert sense_of(task) == (0x0E, 0x1D, 0x00)
    assert int.from_bytes(task.sense[3:7], "big") == 11 * BS + 7


def test_read_defect_data_is_an_empty_list_in_the_requested_format(
    ready: ScsiTarget, pool: Pool
) -> None:
    task, ch = run(ready, pool, bytes([0x37, 0, 0x1D, 0, 0, 0, 0, 0, 32, 0]))
    good(task)
    assert bytes(ch.data_in) == bytes([0, 0x05, 0, 0])
    task, ch = run(ready, pool, bytes([0xB7, 0x1C, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]))
    good(task)
    assert bytes(ch.data_in) == bytes([0, 0x04, 0, 0, 0, 0, 0, 0])


def test_prefetch_checks_the_range_and_warms_the_backstore(
    ready: ScsiTarget, pool: Pool, store: MemBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed: list[tuple[int, int]] = []
    monkeypatch.setattr(store, "prefetch", lambda offset, length: warmed.append((offset, length)))
    task, _ = run(ready, pool, bytes([0x34, 0, 0, 0, 0, 8, 0, 0, 4, 0]))
    good(task)
    assert warmed == [(8 * BS, 4 * BS)]
    task, _ = run(ready, pool, bytes([0x34, 0, 0, 0, 0x80, 0, 0, 0, 1, 0]))
    assert sense_of(task) == (0x05, 0x21, 0x00)
    task, _ = run(ready, pool, bytes([0x90, 0, *(5).to_bytes(8, "big"), 0, 0, 0, 0, 0, 0]))
    good(task)  # zero blocks: nothing to warm
    assert warmed == [(8 * BS, 4 * BS)]


def caw(lba: int, nblocks: int, flags: int = 0) -> bytes:
    return bytes([0x89, flags, *lba.to_bytes(8, "big"), 0, 0, 0, nblocks, 0, 0])


def test_compare_and_write_writes_only_when_the_blocks_match(
    ready: ScsiTarget, pool: Pool, store: MemBackstore
) -> None:
    old, new = pattern(2 * BS, seed=3), pattern(2 * BS, seed=4)
    store.data[4 * BS : 6 * BS] = old
    task, _ = run(ready, pool, caw(4, 2), data_out=old + new)
    good(task)
    assert store.data[4 * BS : 6 * BS] == new
    # The medium now holds ``new``: comparing against ``old`` miscompares, nothing written.
    wrong = bytearray(old)
    task, _ = run(ready, pool, caw(4, 2), data_out=bytes(wrong) + pattern(2 * BS, seed=5))
    assert sense_of(task) == (0x0E, 0x1D, 0x00)
    first = next(i for i in range(2 * BS) if old[i] != new[i])
    assert int.from_bytes(task.sense[3:7], "big") == first
    assert store.data[4 * BS : 6 * BS] == new


def test_compare_and_write_field_errors(ready: ScsiTarget, pool: Pool) -> None:
    task, ch = run(ready, pool, caw(0, 0), edtl=0)
    good(task)
    assert ch.receives == []
    task, _ = run(ready, pool, caw(NBLOCKS - 1, 2), data_out=bytes(4 * BS))
    assert sense_of(task) == (0x05, 0x21, 0x00)
    task, _ = run(ready, pool, caw(0, 1, 0x20), data_out=bytes(2 * BS))
    assert sense_of(task) == (0x05, 0x24, 0x00)
    task, ch = run(ready, pool, caw(0, 2), data_out=bytes(2 * BS))  # half the Data-Out
    assert sense_of(task) == (0x05, 0x24, 0x00)
    assert ch.receives == []
    task, ch = run(ready, pool, caw(0, 0), data_out=bytes(2 * BS))  # 256 wrapped to 0
    assert sense_of(task) == (0x05, 0x24, 0x00)
    assert ch.receives == []
