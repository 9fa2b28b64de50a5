"""Golden byte vectors for the PDU codec and the CRC32C digests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.iscsi import pdu
from sgtarget.iscsi.digest import digest, digest_of

# A READ(10) of 8 blocks at LBA 0x1234, EDTL 4096, ITT 0x10, CmdSN 5, ExpStatSN 7, LUN 1.
SCSI_READ10 = bytes.fromhex(
    "01c10000"  # opcode, F|R|SIMPLE, reserved
    "00000000"  # AHS length 0, DSL 0
    "0001000000000000"  # LUN 1 (peripheral addressing)
    "00000010"  # ITT
    "00001000"  # EDTL 4096
    "00000005"  # CmdSN
    "00000007"  # ExpStatSN
    "28000000123400000800000000000000"  # CDB
)


def test_decode_scsi_command() -> None:
    hdr = pdu.Header(SCSI_READ10)
    assert hdr.opcode == pdu.Opcode.SCSI_COMMAND
    assert not hdr.immediate
    assert hdr.final
    assert hdr.b1 & pdu.F_READ
    assert not hdr.b1 & pdu.F_WRITE
    assert hdr.ahs_len == 0
    assert hdr.data_len == 0
    assert hdr.lun_bytes == bytes.fromhex("0001000000000000")
    assert hdr.itt == 0x10
    assert hdr.expected_length == 4096
    assert hdr.cmdsn == 5
    assert hdr.exp_statsn == 7
    assert hdr.cdb[:10] == bytes.fromhex("28000000123400000800")


def test_decode_lengths_and_immediate() -> None:
    raw = bytearray(48)
    raw[0] = 0x40 | pdu.Opcode.NOP_OUT
    raw[4] = 2  # 8 bytes of AHS
    raw[5:8] = (0x012345).to_bytes(3, "big")
    hdr = pdu.Header(bytes(raw))
    assert hdr.immediate
    assert hdr.opcode == pdu.Opcode.NOP_OUT
    assert hdr.ahs_len == 8
    assert hdr.data_len == 0x012345


def test_decode_login_fields() -> None:
    raw = bytes.fromhex(
        "4387 0000 00000010 400001370000 0000 00000001 0002 0000 00000009 0000000a" + "00" * 16
    )
    hdr = pdu.Header(raw)
    assert hdr.opcode == pdu.Opcode.LOGIN_REQUEST
    assert hdr.transit
    assert not hdr.cont
    assert (hdr.csg, hdr.nsg) == (1, 3)
    assert hdr.isid == bytes.fromhex("400001370000")
    assert hdr.tsih == 0
    assert hdr.cid == 2
    assert hdr.cmdsn == 9
    assert hdr.exp_statsn == 10
    assert hdr.data_len == 0x10


def test_build_nop_in_golden() -> None:
    bhs = pdu.build(pdu.Opcode.NOP_IN, data_len=5, itt=0x11223344, w5=0xFFFFFFFF, w6=1, w7=2, w8=3)
    assert bytes(bhs) == bytes.fromhex(
        "2080000000000005000000000000000011223344ffffffff000000010000000200000003" + "00" * 12
    )


def test_build_login_response_golden() -> None:
    bhs = pdu.build_login_response(
        transit=True,
        cont=False,
        csg=1,
        nsg=3,
        isid=bytes.fromhex("400001370000"),
        tsih=7,
        itt=0x10,
        statsn=0x20,
        exp_cmdsn=9,
        max_cmdsn=0x88,
        status_class=2,
        status_detail=3,
        data_len=0,
    )
    assert bytes(bhs) == bytes.fromhex(
        "23870000"
        "00000000"
        "400001370000"
        "0007"
        "00000010"
        "00000000"
        "00000020"
        "00000009"
        "00000088"
        "02030000" + "00" * 8
    )


def test_sense_segment() -> None:
    assert pdu.sense_segment(b"\x70\x00\x05") == b"\x00\x03\x70\x00\x05"


@pytest.mark.parametrize(
    ("n", "padded", "pad"),
    [
        (0, 0, b""),
        (1, 4, b"\0\0\0"),
        (2, 4, b"\0\0"),
        (3, 4, b"\0"),
        (4, 4, b""),
        (5, 8, b"\0\0\0"),
    ],
)
def test_padding(n: int, padded: int, pad: bytes) -> None:
    assert pdu.padded(n) == padded
    assert pdu.pad_for(n) == pad


@given(st.integers(min_value=0, max_value=(1 << 24) - 1))
def test_padded_is_smallest_multiple_of_four(n: int) -> None:
    p = pdu.padded(n)
    assert p % 4 == 0
    assert n <= p < n + 4
    assert len(pdu.pad_for(n)) == p - n


# RFC 3720 Appendix B.4 CRC32C examples, as the bytes appear on the wire.
@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (bytes(32), "aa36918a"),
        (b"\xff" * 32, "43aba862"),
        (bytes(range(32)), "4e79dd46"),
        (bytes(range(31, -1, -1)), "5cdb3f11"),
    ],
)
def test_digest_rfc_vectors(data: bytes, wire: str) -> None:
    assert digest(data) == bytes.fromhex(wire)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_digest_of_pieces_equals_digest_of_join(pieces: list[bytes]) -> None:
    assert digest_of(pieces) == digest(b"".join(pieces))
