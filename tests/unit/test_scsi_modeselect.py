"""MODE SELECT parameter lists: golden bytes, every refusal, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Asc, SenseKey, Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.modeselect import check_cdb, decode_mode_select, parse_mode_select
from sgtarget.scsi.sense import CheckCondition
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import run_inline

from .scsi_fakes import NEXUS, OTHER_NEXUS, MemBackstore, run

# A control page (0x0A, 12 bytes) whose only changeable bit is SWP (byte 4 bit 3).
CURRENT = bytes.fromhex("0a0a001000000000ffff0000")
CHANGEABLE = bytes.fromhex("0a0a00000800000000000000")


def pages(code: int, pc: int) -> bytes | None:
    if code != 0x0A:
        return None
    return CHANGEABLE if pc else CURRENT


def parse(cdb: bytes, data: bytes) -> dict[int, bytes]:
    ms = decode_mode_select(cdb)
    check_cdb(ms)
    return parse_mode_select(ms, data, pages, block_size=512, num_blocks=1 << 20)


SELECT6 = bytes.fromhex("151000001000")  # PF=1, 16 bytes
SELECT10 = bytes.fromhex("55100000000000001400")  # PF=1, 20 bytes
SWP_ON = bytes.fromhex("0a0a001008000000ffff0000")


def refusal(cdb: bytes, data: bytes) -> tuple[SenseKey, Asc, bytes | None]:
    with pytest.raises(CheckCondition) as e:
        parse(cdb, data)
    s = e.value.sense
    return s.key, s.asc, s.sks


def test_decode() -> None:
    ms = decode_mode_select(SELECT10)
    assert (ms.ten, ms.pf, ms.sp, ms.param_len) == (True, True, False, 20)
    ms = decode_mode_select(bytes.fromhex("151100000400"))
    assert (ms.ten, ms.pf, ms.sp, ms.param_len) == (False, True, True, 4)


def test_swp_on_mode_select_6_and_10() -> None:
    assert parse(SELECT6, bytes(4) + SWP_ON) == {0x0A: SWP_ON}
    assert parse(SELECT10, bytes(8) + SWP_ON) == {0x0A: SWP_ON}


def test_ps_bit_is_ignored_and_cleared() -> None:
    assert parse(SELECT6, bytes(4) + b"\x8a" + SWP_ON[1:]) == {0x0A: SWP_ON}


def test_header_only_changes_nothing() -> None:
    assert parse(SELECT6, bytes(4)) == {}


def test_block_descriptor_must_match_the_format() -> None:
    same = bytes.fromhex("00000008") + (1 << 20).to_bytes(4, "big") + bytes.fromhex("00000200")
    assert parse(SELECT6, same + SWP_ON) == {0x0A: SWP_ON}
    keep = bytes.fromhex("00000008") + bytes(4) + bytes.fromhex("00000200")
    assert parse(SELECT6, keep) == {}
    other = bytes.fromhex("00000008") + bytes(4) + bytes.fromhex("00001000")
    assert refusal(SELECT6, other) == (
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        bytes.fromhex("800009"),  # SKSV, C/D=0, byte 9: the BLOCK LENGTH
    )


def test_unchangeable_bit_points_at_byte_and_bit() -> None:
    d_sense = bytearray(SWP_ON)
    d_sense[2] |= 0x04  # D_SENSE is not changeable here
    assert refusal(SELECT6, bytes(4) + d_sense) == (
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        bytes.fromhex("8a0006"),  # SKSV, BPV, bit 2; byte 4 + 2
    )


def test_unknown_page_wrong_length_and_subpage() -> None:
    assert refusal(SELECT6, bytes(4) + bytes.fromhex("3f0200000000"))[1] == (
        Asc.INVALID_FIELD_IN_PARAMETER_LIST
    )
    short = bytes.fromhex("0a08") + SWP_ON[2:10]
    assert refusal(SELECT6, bytes(4) + short)[2] == bytes.fromhex("800005")
    assert refusal(SELECT6, bytes(4) + b"\x4a" + SWP_ON[1:])[2] == bytes.fromhex("8e0004")


def test_truncated_lists() -> None:
    length = (SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR, None)
    assert refusal(SELECT6, bytes(3)) == length
    assert refusal(SELECT6, bytes.fromhex("00000008") + bytes(4)) == length
    assert refusal(SELECT6, bytes(4) + SWP_ON[:-1]) == length
    assert refusal(SELECT6, bytes(4) + b"\x0a") == length


def test_cdb_refusals() -> None:
    sp = refusal(bytes.fromhex("151100001000"), b"")
    assert sp[2] == bytes.fromhex("c80001")  # SKSV, C/D, BPV, bit 0 of byte 1: SP
    pf0 = refusal(bytes.fromhex("150000001000"), b"")
    assert pf0[2] == bytes.fromhex("cc0001")  # bit 4: PF
    assert parse(bytes.fromhex("150000000000"), b"") == {}  # PF=0 with no list: a no-op


def _outcome(data: bytes) -> dict[int, bytes] | CheckCondition:
    try:
        return parse(SELECT6, data)
    except CheckCondition as e:
        return e


@given(st.binary(min_size=0, max_size=40))
def test_any_list_is_parsed_or_refused_precisely(data: bytes) -> None:
    out = _outcome(data)
    if isinstance(out, CheckCondition):
        assert out.sense.key == SenseKey.ILLEGAL_REQUEST
        assert out.sense.asc in (
            Asc.INVALID_FIELD_IN_PARAMETER_LIST,
            Asc.PARAMETER_LIST_LENGTH_ERROR,
        )
        return
    # Whatever was accepted differs from the current page only in changeable bits.
    for page in out.values():
        diffs = zip(page, CURRENT, CHANGEABLE, strict=True)
        assert all((a ^ b) & ~m & 0xFF == 0 for a, b, m in diffs)


# ---- through a LogicalUnit: SWP write-protects, others get a unit attention, reset clears it


@pytest.fixture
def target(pool: Pool) -> ScsiTarget:
    lu = LogicalUnit(MemBackstore(2048 * 512), runner=run_inline, identity="iqn.x:ms/0")
    tgt = ScsiTarget("iqn.x:ms", [lu])
    for nexus in (NEXUS, OTHER_NEXUS):
        task, _ = run(tgt, pool, bytes(6), nexus=nexus)  # consume POWER ON RESET
        assert task.sense[2] == 0x06
    return tgt


MODE_SENSE6_CONTROL = bytes.fromhex("1a 08 0a 00 ff 00")  # DBD, current control page
MODE_SENSE6_CONTROL_CHANGEABLE = bytes.fromhex("1a 08 4a 00 ff 00")
WRITE_10 = bytes.fromhex("2a 00 00000000 00 0001 00")
WRITE_PROTECTED = bytes.fromhex("70 00 07 00000000 0a 00000000 27 00 00 000000")
MODE_PARAMETERS_CHANGED = bytes.fromhex("70 00 06 00000000 0a 00000000 2a 01 00 000000")


def select6(data: bytes) -> bytes:
    return bytes((0x15, 0x10, 0, 0, len(data), 0))


def test_swp_through_the_lu(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, MODE_SENSE6_CONTROL_CHANGEABLE)
    assert task.status == Status.GOOD
    assert ch.data_in[4:] == CHANGEABLE  # only SWP is changeable
    task, ch = run(target, pool, MODE_SENSE6_CONTROL)
    assert ch.data_in == bytes.fromhex("0f001000") + CURRENT  # WP clear

    task, _ = run(target, pool, select6(bytes(4) + SWP_ON), data_out=bytes(4) + SWP_ON)
    assert task.status == Status.GOOD, task.sense.hex()
    task, ch = run(target, pool, MODE_SENSE6_CONTROL)
    assert ch.data_in == bytes.fromhex("0f009000") + SWP_ON  # WP set, SWP set

    task, _ = run(target, pool, WRITE_10, data_out=bytes(512))
    assert (task.status, task.sense) == (Status.CHECK_CONDITION, WRITE_PROTECTED)
    # The other nexus is told the mode pages changed, then is write-protected too.
    task, _ = run(target, pool, WRITE_10, data_out=bytes(512), nexus=OTHER_NEXUS)
    assert task.sense == MODE_PARAMETERS_CHANGED
    task, _ = run(target, pool, WRITE_10, data_out=bytes(512), nexus=OTHER_NEXUS)
    assert task.sense == WRITE_PROTECTED

    # A LUN reset brings back the default pages: writable again.
    assert target.lun_reset(0)
    run(target, pool, bytes(6))  # the reset's unit attention
    task, _ = run(target, pool, WRITE_10, data_out=bytes(512))
    assert task.status == Status.GOOD, task.sense.hex()


def test_bad_mode_select_changes_nothing(target: ScsiTarget, pool: Pool) -> None:
    bad = bytearray(SWP_ON)
    bad[3] = 0x00  # QAM is not changeable
    task, _ = run(target, pool, select6(bytes(4) + bad), data_out=bytes(4) + bytes(bad))
    assert task.sense[2] == 0x05
    assert task.sense[12:14] == b"\x26\x00"  # INVALID FIELD IN PARAMETER LIST
    task, _ = run(target, pool, WRITE_10, data_out=bytes(512))
    assert task.status == Status.GOOD
    task, _ = run(target, pool, WRITE_10, data_out=bytes(512), nexus=OTHER_NEXUS)
    assert task.status == Status.GOOD  # no unit attention either
