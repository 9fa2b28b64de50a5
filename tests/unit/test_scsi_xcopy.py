"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: parameter lists, held results, the copy."""

from __future__ import annotations

import pytest

from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline
from sgtarget.scsi.xcopy import (
    BlockSegment,
    CopyParameters,
    CscdDescriptor,
    ListIdUsage,
    parse_parameters,
)

from .scsi_fakes import NEXUS, OTHER_NEXUS, FakeChannel, MemBackstore, run

BS = 512
NBLOCKS = 8192  # 4 MiB per LU
TARGET_NAME = "iqn.2024-01.test:xcopy"
NAA = bytes.fromhex("6000000faada340b039cc39fa3137de1")


@pytest.fixture
def stores() -> list[MemBackstore]:
    return [MemBackstore(NBLOCKS * BS), MemBackstore(NBLOCKS * BS)]


@pytest.fixture
def target(stores: list[MemBackstore], pool: Pool) -> ScsiTarget:
    luns = [
        LogicalUnit(s, runner=run_inline, identity=f"{TARGET_NAME}/lun{i}")
        for i, s in enumerate(stores)
    ]
    t = ScsiTarget(TARGET_NAME, luns)
    for nexus in (NEXUS, OTHER_NEXUS):
        for lun in (0, 1):
            run(t, pool, bytes(6), lun=lun, nexus=nexus)  # consume the power-on UA
    return t


# ---- encoders (independent of the module under test) -------------------------------------------


def cscd(naa: bytes, *, block_size: int = BS, byte1: int = 0, code: int = 0xE4) -> bytes:
    """An identification CSCD descriptor naming a LU by its NAA designator."""
    designator = bytes((0x01, 0x03, 0x00, len(naa))) + naa
    return bytes((code, byte1, 0, 0)) + designator.ljust(24, b"\0") + block_size.to_bytes(4, "big")


def b2b(src: int, dst: int, nblocks: int, src_lba: int, dst_lba: int, *, dc: bool = False) -> bytes:
    return (
        bytes((0x02, 0x02 if dc else 0, 0x00, 0x18))
        + src.to_bytes(2, "big")
        + dst.to_bytes(2, "big")
        + bytes(2)
        + nblocks.to_bytes(2, "big")
        + src_lba.to_bytes(8, "big")
        + dst_lba.to_bytes(8, "big")
    )


def plist(
    targets: list[bytes], segments: list[bytes], *, list_id: int = 1, usage: int = 0
) -> bytes:
    t, s = b"".join(targets), b"".join(segments)
    header = bytes((list_id, usage << 3)) + len(t).to_bytes(2, "big") + bytes(4)
    return header + len(s).to_bytes(4, "big") + bytes(4) + t + s


def xcopy_cdb(n: int) -> bytes:
    return bytes((0x83, 0)) + bytes(8) + n.to_bytes(4, "big") + bytes(2)


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return bytes((0x84, sa, list_id)) + bytes(7) + alloc.to_bytes(4, "big") + bytes(2)


def xcopy(t: ScsiTarget, pool: Pool, data: bytes, *, lun: int = 0) -> tuple[Task, FakeChannel]:
    return run(t, pool, xcopy_cdb(len(data)), lun=lun, data_out=data)


def sense(task: Task) -> tuple[int, int, int, bytes]:
    """Sense key, ASC, ASCQ and the sense-key specific bytes of fixed-format sense."""
    assert task.status == Status.CHECK_CONDITION
    s = task.sense
    return s[2] & 0x0F, s[12], s[13], s[15:18]


def naa(t: ScsiTarget, lun: int) -> bytes:
    return t.luns[lun].naa


# ---- the parameter list ------------------------------------------------------------------------

GOLDEN_LIST = bytes.fromhex(
    # list ID 7, LIST ID USAGE 10b, CSCD list 64 bytes, segment list 28, no inline data
    "07 10 0040 00000000 0000001c 00000000"
    # CSCD 0: E4, LU ID TYPE 10b and NUL (both ignored), NAA designator, block length 512
    "e4 a0 0000 01 03 00 10" + NAA.hex() + "00000000 00 000200"
    # CSCD 1: E4, same LU, block length 4096
    "e4 00 0000 01 03 00 10" + NAA.hex() + "00000000 00 001000"
    # block to block, DC, from CSCD 0 to CSCD 1: 0x10 blocks, LBA 0x20 -> LBA 0x1234567890
    "02 02 0018 0000 0001 0000 0010 0000000000000020 0000001234567890"
)


def test_parse_golden() -> None:
    assert parse_parameters(GOLDEN_LIST) == CopyParameters(
        list_id=7,
        usage=ListIdUsage.DISCARD,
        targets=(
            CscdDescriptor(16, 0x1, 0x0, 0x3, NAA, 512),
            CscdDescriptor(48, 0x1, 0x0, 0x3, NAA, 4096),
        ),
        segments=(BlockSegment(80, 0, 1, True, 0x10, 0x20, 0x1234567890),),
    )


def test_encoders_match_golden() -> None:
    built = plist(
        [cscd(NAA, byte1=0xA0), cscd(NAA, block_size=4096)],
        [b2b(0, 1, 0x10, 0x20, 0x1234567890, dc=True)],
        list_id=7,
        usage=0b10,
    )
    assert built == GOLDEN_LIST


def _bad(data: bytes, byte: int, value: int) -> bytes:
    out = bytearray(data)
    out[byte] = value
    return bytes(out)


_ONE = plist([cscd(NAA)], [b2b(0, 0, 1, 0, 1)])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # The header announces more than the list holds (libiscsi ParamHdr).
        (_ONE[:47], (0x5, 0x1A, 0x00, "000000")),
        (_ONE[:-1], (0x5, 0x1A, 0x00, "000000")),
        # LIST ID USAGE 01b is reserved: the field pointer names byte 1, bit 4.
        (_bad(_ONE, 1, 0x08), (0x5, 0x26, 0x00, "8c0001")),
        # Inline data: MAXIMUM INLINE DATA LENGTH is 0.
        (_bad(_ONE, 15, 1), (0x5, 0x26, 0x05, "80000c")),
        # Unsupported CSCD type (Fibre Channel N_Port_Name) and segment type (stream-stream).
        (plist([cscd(NAA, code=0xE0)], [b2b(0, 0, 1, 0, 1)]), (0x5, 0x26, 0x07, "800010")),
        (_bad(_ONE, 48, 0x03), (0x5, 0x26, 0x09, "800030")),
        # Not a block device: the peripheral device type in byte 1 of the CSCD descriptor.
        (plist([cscd(NAA, byte1=0x01)], [b2b(0, 0, 1, 0, 1)]), (0x5, 0x26, 0x00, "8c0011")),
        # A block-to-block segment whose DESCRIPTOR LENGTH is not 18h.
        (_bad(_ONE, 51, 0x14), (0x5, 0x26, 0x00, "800032")),
        # One descriptor too many of each kind: the pointer names the first one over.
        (plist([cscd(NAA)] * 9, [b2b(0, 0, 1, 0, 1)]), (0x5, 0x26, 0x06, "800110")),
        (plist([cscd(NAA)], [b2b(0, 0, 1, 0, 1)] * 17), (0x5, 0x26, 0x08, "8001f0")),
        # Descriptor lists longer than MAXIMUM DESCRIPTOR LIST LENGTH (1024).
        (plist([cscd(NAA)] * 9, [b2b(0, 0, 1, 0, 1)] * 27), (0x5, 0x1A, 0x00, "000000")),
    ],
    ids=[
        "truncated-cscd",
        "truncated-segment",
        "list-id-usage-01b",
        "inline-data",
        "cscd-type-e0",
        "segment-type-03",
        "not-a-block-device",
        "segment-length",
        "too-many-cscds",
        "too-many-segments",
        "descriptor-list-too-long",
    ],
)
def test_parameter_list_errors(
    target: ScsiTarget,
    pool: Pool,
    stores: list[MemBackstore],
    data: bytes,
    expected: tuple[int, int, int, str],
) -> None:
    stores[0].data[:BS] = b"\x5a" * BS
    task, _ = xcopy(target, pool, data)
    key, asc, ascq, sks = sense(task)
    assert (key, asc, ascq, sks.hex()) == expected
    assert stores[0].writes == 0  # nothing was copied


def test_parameter_list_length(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, xcopy_cdb(0), edtl=0)
    assert task.status == Status.GOOD
    assert task.sense == b""
    for n in (8, 16 + 1024 + 1):
        # Refused before any Data-Out is asked for.
        task, ch = run(target, pool, xcopy_cdb(n), data_out=bytes(n))
        assert sense(task)[:3] == (0x5, 0x1A, 0x00)
        assert ch.receives == []


# ---- the copy ----------------------------------------------------------------------------------


def test_copy_between_luns_moves_the_right_bytes(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    src, dst = stores
    pattern = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB: three pool chunks
    src.data[BS * 100 : BS * 100 + len(pattern)] = pattern
    nblocks = len(pattern) // BS
    data = plist([cscd(naa(target, 0)), cscd(naa(target, 1))], [b2b(0, 1, nblocks, 100, 7)])
    # The copy manager is LUN 1 here; the source is LUN 0.
    task, ch = xcopy(target, pool, data, lun=1)
    assert task.status == Status.GOOD, task.sense.hex()
    assert dst.data[BS * 7 : BS * 7 + len(pattern)] == pattern
    assert dst.data[: BS * 7] == bytes(BS * 7)
    assert dst.data[BS * 7 + len(pattern) :].count(0) == len(dst.data) - BS * 7 - len(pattern)
    assert ch.sends == []  # nothing went to the initiator


def test_copy_streams_through_a_short_pool(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    src, dst = stores
    src.data[: 64 * BS] = b"\xc3" * (64 * BS)

    def short(ch: FakeChannel) -> None:
        ch.partial_limit = 4096  # allocations cut to 4 KiB: the copy takes 8 chunks

    data = plist([cscd(naa(target, 0)), cscd(naa(target, 1))], [b2b(0, 1, 64, 0, 0)])
    task, _ = run(target, pool, xcopy_cdb(len(data)), data_out=data, setup=short)
    assert task.status == Status.GOOD
    assert dst.data[: 64 * BS] == b"\xc3" * (64 * BS)
    assert dst.writes == 8


def test_overlapping_copy_on_one_lu_is_a_memmove(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    src = stores[0]
    before = bytes(i % 251 for i in range(4096 * BS))
    src.data[: len(before)] = before

    def short(ch: FakeChannel) -> None:
        ch.partial_limit = 64 * 1024

    # 4096 blocks from LBA 0 to LBA 1: every chunk but the last overlaps the next one.
    data = plist([cscd(naa(target, 0))], [b2b(0, 0, 4096, 0, 1)])
    task, _ = run(target, pool, xcopy_cdb(len(data)), data_out=data, setup=short)
    assert task.status == Status.GOOD
    assert src.data[BS : BS + len(before)] == before


# ---- errors while processing segments ----------------------------------------------------------


def test_beyond_capacity_is_copy_aborted_with_the_targets_sense(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    data = plist([cscd(naa(target, 0))], [b2b(0, 0, 2048, 0, NBLOCKS - 1)], list_id=3)
    task, _ = xcopy(target, pool, data)
    assert task.status == Status.CHECK_CONDITION
    assert task.sense == bytes.fromhex(
        # COPY ABORTED, additional length 28: COMMAND-SPECIFIC INFORMATION byte 9 (the
        # destination's sense) = 18, NO ADDITIONAL SENSE, segment pointer to the destination
        # LBA of the segment at byte 48, then the destination's ILLEGAL REQUEST / LBA OUT OF
        # RANGE.
        "70 00 0a 00000000 1c 00120000 00 00 00 80004470 00 05 00000000 0a 00000000 21 00 00 000000"
    )
    assert stores[0].writes == 0


def test_unreachable_copy_targets(target: ScsiTarget, pool: Pool) -> None:
    # A segment naming CSCD descriptor 1 of a list with one (libiscsi ValidSegDescr).
    task, _ = xcopy(target, pool, plist([cscd(naa(target, 0))], [b2b(0, 1, 1, 0, 1)]))
    assert sense(task) == (0xA, 0x0D, 0x02, bytes.fromhex("800036"))
    # A designator that names no LU of this target: the pointer is at the designator.
    task, _ = xcopy(target, pool, plist([cscd(bytes(16))], [b2b(0, 0, 1, 0, 1)]))
    assert sense(task) == (0xA, 0x0D, 0x02, bytes.fromhex("800014"))
    # The block length of the descriptor is not the LU's.
    data = plist([cscd(naa(target, 0), block_size=4096)], [b2b(0, 0, 1, 0, 1)])
    task, _ = xcopy(target, pool, data)
    assert sense(task) == (0xA, 0x26, 0x00, bytes.fromhex("80002d"))


def test_medium_error_carries_the_source_sense(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    stores[0].fail_read = True
    data = plist([cscd(naa(target, 0)), cscd(naa(target, 1))], [b2b(0, 1, 8, 5, 0)])
    task, _ = xcopy(target, pool, data)
    assert sense(task)[:3] == (0xA, 0x00, 0x00)
    assert task.sense[8:10] == bytes((18, 0))  # the source's sense, at byte 18
    source = task.sense[18:]
    assert (source[2], source[12], source[13]) == (0x03, 0x11, 0x00)  # UNRECOVERED READ ERROR
    assert int.from_bytes(source[3:7], "big") == 5  # at LBA 5


def test_reservation_on_a_copy_target_conflicts(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    task, _ = run(target, pool, bytes((0x16, 0, 0, 0, 0, 0)), lun=1, nexus=OTHER_NEXUS)
    assert task.status == Status.GOOD
    stores[0].data[:BS] = b"\x11" * BS
    data = plist([cscd(naa(target, 0)), cscd(naa(target, 1))], [b2b(0, 1, 1, 0, 0)])
    task, _ = xcopy(target, pool, data)
    assert task.status == Status.RESERVATION_CONFLICT
    assert stores[1].writes == 0


# ---- RECEIVE COPY RESULTS ----------------------------------------------------------------------

OPERATING_PARAMETERS = bytes.fromhex(
    # available data 42, SNLID; 8 CSCD and 16 segment descriptors, 1024 bytes of them;
    # segments up to 0xFFFF * 4 KiB; no inline or held data, no stream devices; 256 / 255
    # concurrent copies, 512-byte data granularity; descriptors 02h and E4h.
    "0000002a 01 000000 0008 0010 00000400 0ffff000 00000000 00000000 00000000"
    "0000 0100 ff 09 00 00 000000 02 02e4"
)


def test_operating_parameters_golden(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, rcr_cdb(0x03))
    assert task.status == Status.GOOD
    assert bytes(ch.data_in) == OPERATING_PARAMETERS
    _, ch = run(target, pool, rcr_cdb(0x03, alloc=12))
    assert bytes(ch.data_in) == OPERATING_PARAMETERS[:12]


def test_copy_status_is_held_once(target: ScsiTarget, pool: Pool) -> None:
    task, _ = run(target, pool, rcr_cdb(0x00, 5))
    assert sense(task) == (0x5, 0x24, 0x00, bytes.fromhex("c00002"))  # no such copy
    data = plist([cscd(naa(target, 0))], [b2b(0, 0, 16, 0, 100)] * 2, list_id=5)
    assert xcopy(target, pool, data)[0].status == Status.GOOD
    # Another nexus has its own list identifiers.
    task, _ = run(target, pool, rcr_cdb(0x00, 5), nexus=OTHER_NEXUS)
    assert task.status == Status.CHECK_CONDITION
    task, ch = run(target, pool, rcr_cdb(0x00, 5))
    # Completed, 2 segments, 16 KiB in units of bytes.
    assert bytes(ch.data_in) == bytes.fromhex("00000008 01 0002 00 00004000")
    # Read once, then discarded; and a successful copy has no failed segment details.
    task, _ = run(target, pool, rcr_cdb(0x00, 5))
    assert task.status == Status.CHECK_CONDITION


def test_failed_copy_status_and_segment_details(target: ScsiTarget, pool: Pool) -> None:
    data = plist([cscd(naa(target, 0))], [b2b(0, 0, 1, 0, 1), b2b(0, 3, 1, 0, 1)], list_id=9)
    task, _ = xcopy(target, pool, data)
    copy_sense = task.sense
    assert sense(task)[:3] == (0xA, 0x0D, 0x02)
    _, ch = run(target, pool, rcr_cdb(0x00, 9))
    assert bytes(ch.data_in) == bytes.fromhex("00000008 02 0001 00 00000200")
    _, ch = run(target, pool, rcr_cdb(0x04, 9))
    expected = bytes.fromhex("0000004a") + bytes(52) + bytes.fromhex("02 00 0012") + copy_sense
    assert bytes(ch.data_in) == expected
    # All of it was transferred: now everything about list 9 is gone.
    task, _ = run(target, pool, rcr_cdb(0x04, 9))
    assert task.status == Status.CHECK_CONDITION


def test_discarded_and_unlisted_copies_hold_nothing(target: ScsiTarget, pool: Pool) -> None:
    for usage in (0b10, 0b11):
        data = plist([cscd(naa(target, 0))], [b2b(0, 0, 1, 0, 1)], list_id=4, usage=usage)
        assert xcopy(target, pool, data)[0].status == Status.GOOD
        task, _ = run(target, pool, rcr_cdb(0x00, 4))
        assert task.status == Status.CHECK_CONDITION


def test_nexus_loss_and_reset_discard_held_results(target: ScsiTarget, pool: Pool) -> None:
    data = plist([cscd(naa(target, 0))], [b2b(0, 0, 1, 0, 1)], list_id=2)
    assert xcopy(target, pool, data)[0].status == Status.GOOD
    target.nexus_lost(NEXUS)
    run(target, pool, bytes(6))  # the new nexus's power-on unit attention
    task, _ = run(target, pool, rcr_cdb(0x00, 2))
    assert sense(task)[:3] == (0x5, 0x24, 0x00)
    assert task.status == Status.CHECK_CONDITION
    assert xcopy(target, pool, data)[0].status == Status.GOOD
    target.lun_reset(0)
    run(target, pool, bytes(6))  # the reset's unit attention
    task, _ = run(target, pool, rcr_cdb(0x00, 2))
    assert sense(task)[:3] == (0x5, 0x24, 0x00)


def test_unsupported_service_action(target: ScsiTarget, pool: Pool) -> None:
    task, _ = run(target, pool, rcr_cdb(0x01, 1))  # RECEIVE DATA: no held data kinds
    assert sense(task) == (0x5, 0x24, 0x00, bytes.fromhex("cc0001"))


def test_write_protected_destination(pool: Pool, stores: list[MemBackstore]) -> None:
    luns = [
        LogicalUnit(stores[0], runner=run_inline, identity=f"{TARGET_NAME}/lun0"),
        LogicalUnit(stores[1], runner=run_inline, identity=f"{TARGET_NAME}/lun1", readonly=True),
    ]
    t = ScsiTarget(TARGET_NAME, luns)
    run(t, pool, bytes(6))  # the power-on unit attention
    data = plist([cscd(naa(t, 0)), cscd(naa(t, 1))], [b2b(0, 1, 1, 0, 0)])
    task, _ = xcopy(t, pool, data)
    # The segment pointer names the destination LBA (segment at byte 80, + 20).
    assert sense(task) == (0xA, 0x00, 0x00, bytes.fromhex("800064"))
    assert task.sense[8:10] == bytes((0, 18))  # the destination's sense, at byte 18
    dest = task.sense[18:]
    assert (dest[2], dest[12], dest[13]) == (0x07, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED
    assert stores[1].writes == 0
    # Reading from it is fine.
    data = plist([cscd(naa(t, 1)), cscd(naa(t, 0))], [b2b(0, 1, 1, 0, 0)])
    assert xcopy(t, pool, data)[0].status == Status.GOOD
