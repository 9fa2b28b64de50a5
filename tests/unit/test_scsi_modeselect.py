"""MODE SELECT parameter lists: golden bytes, every refusal, and a property test."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.scsi.constants import Asc, SenseKey
from sgtarget.scsi.modeselect import check_cdb, decode_mode_select, parse_mode_select
from sgtarget.scsi.sense import CheckCondition

# A control page (0x0A, 12 bytes) whose only changeable bit is SWP (byte 4 bit 3).
CURRENT = bytes.fromhex("0a0a00100000ffff00000000")
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
SWP_ON = bytes.fromhex("0a0a00100800ffff00000000")


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
