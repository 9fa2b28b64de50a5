"""The 8-byte SAM LUN field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.scsi.lun import MAX_FLAT_LUN, decode_lun, encode_lun


@pytest.mark.parametrize(
    ("lun", "field"),
    [
        (0, "0000000000000000"),
        (5, "0005000000000000"),
        (255, "00ff000000000000"),
        (256, "4100000000000000"),
        (0x1234, "5234000000000000"),
        (16383, "7fff000000000000"),
    ],
)
def test_encode_golden(lun: int, field: str) -> None:
    assert encode_lun(lun) == bytes.fromhex(field)
    assert decode_lun(bytes.fromhex(field)) == lun


@pytest.mark.parametrize("lun", [-1, 16384, 1 << 20])
def test_encode_out_of_range(lun: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_lun(lun)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("4005000000000000", 5),  # flat space may also address small LUNs
        ("0105000000000000", None),  # bus identifier 1: nothing there
        ("c101000000000000", None),  # REPORT LUNS well-known LUN (extended addressing)
        ("0005000100000000", None),  # second-level address
        ("8005000000000000", None),  # logical unit addressing method
        ("00050000", None),  # truncated
    ],
)
def test_decode_other_forms(field: str, expected: int | None) -> None:
    assert decode_lun(bytes.fromhex(field)) == expected


@given(st.integers(0, MAX_FLAT_LUN))
def test_round_trip(lun: int) -> None:
    field = encode_lun(lun)
    assert len(field) == 8
    assert decode_lun(field) == lun
    # The smallest method: peripheral below 256, flat space above.
    assert field[0] >> 6 == (0 if lun < 256 else 1)


@given(st.binary(min_size=8, max_size=8))
def test_decode_never_raises_and_reencodes(field: bytes) -> None:
    lun = decode_lun(field)
    if lun is not None:
        assert 0 <= lun <= MAX_FLAT_LUN
        assert decode_lun(encode_lun(lun)) == lun
