"""CDB decoding against hand-assembled CDBs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.scsi.cdb import (
    BlockCdb,
    decode_block,
    decode_inquiry,
    decode_mode_sense,
    decode_rsoc,
)


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        ("08 1f ff fe 00 00", BlockCdb(0x1FFFFE, 256, 0, 0)),  # length 0 means 256
        ("0a 01 02 03 07 00", BlockCdb(0x010203, 7, 0, 0)),
        ("28 18 01 02 03 04 05 00 10 00", BlockCdb(0x01020304, 0x10, 0x18, 5)),
        ("2a e0 ff ff ff ff 00 ff ff 00", BlockCdb(0xFFFFFFFF, 0xFFFF, 0xE0, 0)),
        ("a8 08 00 00 00 10 00 01 00 00 3f 00", BlockCdb(0x10, 0x10000, 0x08, 0x3F)),
        (
            "88 10 80 00 00 00 00 00 00 01 00 00 00 02 00 00",
            BlockCdb(0x8000000000000001, 2, 0x10, 0),
        ),
        ("35 02 00 00 00 00 00 00 00 00", BlockCdb(0, 0, 0x02, 0)),
    ],
)
def test_decode_block_golden(cdb: str, expected: BlockCdb) -> None:
    assert decode_block(bytes.fromhex(cdb)) == expected


def test_block_flag_accessors() -> None:
    blk = decode_block(bytes.fromhex("2f f6 00 00 00 00 00 00 01 00"))  # VERIFY(10)
    assert (blk.protect, blk.dpo, blk.bytchk) == (7, True, 3)
    wr = decode_block(bytes.fromhex("2a 08 00 00 00 00 00 00 01 00"))
    assert (wr.fua, wr.dpo, wr.protect) == (True, False, 0)
    assert decode_block(bytes.fromhex("91 02" + "00" * 14)).immed


def test_decode_block_rejects_opcode_without_lba() -> None:
    with pytest.raises(ValueError, match="no LBA layout"):
        decode_block(bytes.fromhex("c0" + "00" * 15))


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255))
def test_decode_block_16_round_trip(lba: int, length: int, flags: int) -> None:
    cdb = bytes([0x88, flags]) + lba.to_bytes(8, "big") + length.to_bytes(4, "big") + b"\0\0"
    assert decode_block(cdb) == BlockCdb(lba, length, flags, 0)


def test_decode_inquiry() -> None:
    inq = decode_inquiry(bytes.fromhex("12 01 83 01 00 00"))
    assert (inq.evpd, inq.page_code, inq.alloc_len) == (True, 0x83, 256)


def test_decode_mode_sense_6_and_10() -> None:
    ms6 = decode_mode_sense(bytes.fromhex("1a 08 7f 00 ff 00"))
    assert (ms6.dbd, ms6.llbaa, ms6.pc, ms6.page, ms6.subpage, ms6.alloc_len) == (
        True,
        False,
        1,
        0x3F,
        0,
        255,
    )
    ms10 = decode_mode_sense(bytes.fromhex("5a 18 48 ff 00 00 00 01 00 00"))
    assert (ms10.dbd, ms10.llbaa, ms10.pc, ms10.page, ms10.subpage, ms10.alloc_len) == (
        True,
        True,
        1,
        0x08,
        0xFF,
        256,
    )


def test_decode_rsoc() -> None:
    rs = decode_rsoc(bytes.fromhex("a3 0c 82 9e 00 10 00 00 ff ff 00 00"))
    assert (rs.rctd, rs.options, rs.opcode, rs.service_action, rs.alloc_len) == (
        True,
        2,
        0x9E,
        0x10,
        0xFFFF,
    )
