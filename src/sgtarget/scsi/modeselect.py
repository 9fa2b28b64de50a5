"""MODE SELECT(6/10) parameter lists (SPC-5 6.11, 6.12, 7.5): parse and check, no state.

A mode page sent by MODE SELECT may change only the bits its changeable-values image marks;
every other bit must repeat the current value, or the whole list is refused with INVALID FIELD
IN PARAMETER LIST pointing at the first offending byte (SPC-5 7.5.1). Nothing is applied until
the whole list has been checked, so a bad list changes nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .constants import Asc, SenseKey
from .sense import CheckCondition, SenseData, field_pointer

__all__ = ["ModeSelectCdb", "decode_mode_select", "parse_mode_select"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

#: Page code -> page image for the page control (0 current, 1 changeable), or None if unknown.
PageSource = Callable[[int, int], bytes | None]


@dataclass(frozen=True, slots=True)
class ModeSelectCdb:
    ten: bool
    pf: bool
    sp: bool
    param_len: int


def decode_mode_select(cdb: bytes) -> ModeSelectCdb:
    ten = cdb[0] == 0x55
    length = _U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
    return ModeSelectCdb(ten, bool(cdb[1] & 0x10), bool(cdb[1] & 0x01), length)


def _param_error(byte: int, bit: int | None = None) -> CheckCondition:
    sks = field_pointer(byte, bit, in_cdb=False)
    return CheckCondition(
        SenseData(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, None, sks)
    )


def _length_error() -> CheckCondition:
    return CheckCondition.illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)


def check_cdb(ms: ModeSelectCdb) -> None:
    if ms.sp:
        # Nothing is saved across power cycles: there is no saved page to write.
        raise CheckCondition.invalid_field(1, 0)
    if not ms.pf and ms.param_len:
        # PF=0 would mean vendor-specific page formats; we have only the standard ones.
        raise CheckCondition.invalid_field(1, 4)


def parse_mode_select(
    ms: ModeSelectCdb,
    data: bytes,
    pages: PageSource,
    *,
    block_size: int,
    num_blocks: int,
) -> dict[int, bytes]:
    """The pages of ``data`` (page code -> new image, PS bit cleared) after every check.

    Raises CheckCondition for a list that is too short for what it declares, a block
    descriptor that would change the format, an unknown page or subpage, a wrong page length,
    or a change to a bit that is not changeable.
    """
    hdr_len = 8 if ms.ten else 4
    if not data:
        return {}  # PARAMETER LIST LENGTH 0: nothing sent, nothing changes (SPC-5 6.11)
    if len(data) < hdr_len:
        raise _length_error()
    if ms.ten:
        long_lba = bool(data[4] & 0x01)
        bd_len = _U16.unpack_from(data, 6)[0]
        bd_field = 6
    else:
        long_lba = False
        bd_len = data[3]
        bd_field = 3
    if hdr_len + bd_len > len(data):
        raise _length_error()
    desc_size = 16 if long_lba else 8
    if bd_len % desc_size:
        raise _param_error(bd_field)
    if bd_len > desc_size:
        raise _param_error(bd_field)  # one descriptor: the LU has one format
    if bd_len:
        off = hdr_len
        if long_lba:
            count = struct.unpack_from(">Q", data, off)[0]
            length = _U32.unpack_from(data, off + 12)[0]
            length_at = off + 12
        else:
            count = _U32.unpack_from(data, off)[0]
            length = int.from_bytes(data[off + 5 : off + 8], "big")
            length_at = off + 5
        # NUMBER OF LOGICAL BLOCKS 0 means "leave it"; the capacity and the block length are
        # fixed by the backstore, so only the values the LU already has are accepted.
        if count not in (0, num_blocks if long_lba else min(num_blocks, 0xFFFFFFFF)):
            raise _param_error(off)
        if length != block_size:
            raise _param_error(length_at)
    out: dict[int, bytes] = {}
    off = hdr_len + bd_len
    while off < len(data):
        if off + 2 > len(data):
            raise _length_error()
        code = data[off] & 0x3F
        if data[off] & 0x40:
            raise _param_error(off, 6)  # SPF: we have no subpages
        page_len = data[off + 1] + 2
        if off + page_len > len(data):
            raise _length_error()
        current = pages(code, 0)
        changeable = pages(code, 1)
        if current is None or changeable is None or code in out:
            raise _param_error(off, 5)
        if page_len != len(current):
            raise _param_error(off + 1)
        new = bytearray(data[off : off + page_len])
        new[0] &= 0x7F  # PS is reserved in MODE SELECT
        for i in range(2, page_len):
            if (new[i] ^ current[i]) & ~changeable[i] & 0xFF:
                bad = (new[i] ^ current[i]) & ~changeable[i] & 0xFF
                raise _param_error(off + i, bad.bit_length() - 1)
        out[code] = bytes(new)
        off += page_len
    return out
