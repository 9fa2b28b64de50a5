"""Sense data bytes: fixed (70h) and descriptor (72h) format, field pointers."""

from __future__ import annotations

import pytest

from sgtarget.scsi.constants import Asc, SenseKey
from sgtarget.scsi.sense import CheckCondition, SenseData, field_pointer


def test_fixed_format_golden_lba_out_of_range() -> None:
    sense = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE).fixed()
    assert sense == bytes.fromhex("70 00 05 00000000 0a 00000000 21 00 00 000000")
    assert len(sense) == 18


def test_fixed_format_information_sets_valid() -> None:
    sense = SenseData(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=0x1234)
    assert sense.fixed() == bytes.fromhex("f0 00 0e 00001234 0a 00000000 1d 00 00 000000")


def test_fixed_format_information_too_wide_leaves_valid_clear() -> None:
    sense = SenseData(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, information=1 << 40)
    assert sense.fixed() == bytes.fromhex("70 00 03 00000000 0a 00000000 11 00 00 000000")


def test_invalid_field_in_cdb_field_pointer() -> None:
    cc = CheckCondition.invalid_field(2)
    assert cc.sense.fixed() == bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 c00002")
    # With a bit pointer: SKSV | C/D | BPV | bit 4, byte 1.
    assert CheckCondition.invalid_field(1, 4).sense.fixed()[15:18] == bytes.fromhex("cc0001")


def test_field_pointer_for_parameter_data() -> None:
    assert field_pointer(0x1234, in_cdb=False) == bytes.fromhex("801234")
    assert field_pointer(10, 7) == bytes.fromhex("cf000a")


def test_descriptor_format_plain() -> None:
    sense = SenseData(SenseKey.UNIT_ATTENTION, Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert sense.descriptor() == bytes.fromhex("72 06 29 03 000000 00")
    assert sense.encode(descriptor=True) == sense.descriptor()
    assert sense.encode() == sense.fixed()


def test_descriptor_format_with_information_and_sks() -> None:
    sense = SenseData(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, information=1 << 40, sks=b"\xc0\x00\x02"
    )
    assert sense.descriptor() == bytes.fromhex(
        "72 05 24 00 000000 14"  # header, additional length 20
        "00 0a 80 00 0000010000000000"  # information descriptor (64-bit, VALID)
        "02 06 0000 c00002 00"  # sense-key specific descriptor
    )


def test_ascq_split_and_invalid_field_in_iu() -> None:
    assert (
        Asc.INVALID_FIELD_IN_INFORMATION_UNIT.asc,
        Asc.INVALID_FIELD_IN_INFORMATION_UNIT.ascq,
    ) == (
        0x0E,
        0x03,
    )
    assert (Asc.INTERNAL_TARGET_FAILURE.asc, Asc.INTERNAL_TARGET_FAILURE.ascq) == (0x44, 0x00)


def test_check_condition_is_an_exception_with_sense() -> None:
    with pytest.raises(CheckCondition) as info:
        raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
    assert info.value.sense.key is SenseKey.ILLEGAL_REQUEST
    assert "INVALID_COMMAND_OPERATION_CODE" in str(info.value)
