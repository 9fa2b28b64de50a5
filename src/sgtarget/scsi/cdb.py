"""CDB field decoding (SPC-5 4.2, SBC-4 5.x) with one precompiled struct per layout.

Decoders take the raw CDB (at least as long as the command's CDB length; the dispatcher checks
that) and return frozen slotted dataclasses. They only extract fields; validation lives with the
command handlers, which know which values they support.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: 6-byte READ/WRITE: opcode, LBA (21 bits, high 5 bits share byte 1), transfer length, control.
_RW6 = struct.Struct(">I")  # bytes 0..3: opcode, LBA(21) -- we mask the opcode away
#: 10-byte READ/WRITE/VERIFY/SYNC CACHE: opcode, flags, LBA(4), group, length(2), control.
RW10 = struct.Struct(">BBIBHB")
#: 12-byte: opcode, flags, LBA(4), length(4), group, control.
RW12 = struct.Struct(">BBIIBB")
#: 16-byte: opcode, flags, LBA(8), length(4), group, control.
RW16 = struct.Struct(">BBQIBB")
#: 32-byte (opcode 7Fh): group at 6, service action at 8, flags at 10, LBA(8) at 12, expected
#: tags at 20..27 (scsi/protection.py), length(4) at 28.
_RW32_GROUP = 6
_RW32_FLAGS = 10
_RW32_LBA = struct.Struct(">Q")
_RW32_LENGTH = 28
#: 6-byte allocation length (INQUIRY: 16 bits at 3..4; others 8 bits at 4).
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class BlockCdb:
    """The common shape of LBA-addressed CDBs (READ, WRITE, VERIFY, WRITE AND VERIFY, SYNC)."""

    lba: int
    #: Transfer (or verification, or number of) logical blocks.
    length: int
    #: Byte 1 of the CDB (byte 10 of a 32-byte one): PROTECT(7-5) DPO(4) FUA(3) / BYTCHK(2-1)
    flags: int
    group: int

    @property
    def protect(self) -> int:
        """RDPROTECT / WRPROTECT / VRPROTECT."""
        return self.flags >> 5

    @property
    def dpo(self) -> bool:
        return bool(self.flags & 0x10)

    @property
    def fua(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def bytchk(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def immed(self) -> bool:
        """SYNCHRONIZE CACHE IMMED."""
        return bool(self.flags & 0x02)


def decode_block(cdb: bytes) -> BlockCdb:
    """Decode a 6/10/12/16/32-byte LBA CDB; the size class comes from the opcode's group code."""
    group_code = cdb[0] >> 5
    if group_code == 0:
        lba = _RW6.unpack_from(cdb)[0] & 0x1FFFFF
        # READ(6)/WRITE(6): a transfer length of 0 means 256 blocks (SBC-4 5.15).
        return BlockCdb(lba, cdb[4] or 256, 0, 0)
    if group_code in (1, 2):
        _op, flags, lba, group, length, _ctl = RW10.unpack_from(cdb)
        return BlockCdb(lba, length, flags, group & 0x3F)
    if group_code == 5:
        _op, flags, lba, length, group, _ctl = RW12.unpack_from(cdb)
        return BlockCdb(lba, length, flags, group & 0x3F)
    if group_code == 4:
        _op, flags, lba, length, group, _ctl = RW16.unpack_from(cdb)
        return BlockCdb(lba, length, flags, group & 0x3F)
    if cdb[0] == 0x7F:
        # READ/WRITE/VERIFY/WRITE AND VERIFY/WRITE SAME(32): byte 10 has byte 1's layout.
        lba = _RW32_LBA.unpack_from(cdb, 12)[0]
        length = _U32.unpack_from(cdb, _RW32_LENGTH)[0]
        return BlockCdb(lba, length, cdb[_RW32_FLAGS], cdb[_RW32_GROUP] & 0x1F)
    raise ValueError(f"opcode {cdb[0]:#04x} has no LBA layout")


def u16(cdb: bytes, offset: int) -> int:
    return int(_U16.unpack_from(cdb, offset)[0])


def u32(cdb: bytes, offset: int) -> int:
    return int(_U32.unpack_from(cdb, offset)[0])


@dataclass(frozen=True, slots=True)
class InquiryCdb:
    evpd: bool
    page_code: int
    alloc_len: int


def decode_inquiry(cdb: bytes) -> InquiryCdb:
    return InquiryCdb(bool(cdb[1] & 0x01), cdb[2], u16(cdb, 3))


@dataclass(frozen=True, slots=True)
class ModeSenseCdb:
    dbd: bool
    llbaa: bool
    pc: int
    page: int
    subpage: int
    alloc_len: int


def decode_mode_sense(cdb: bytes) -> ModeSenseCdb:
    """MODE SENSE(6) (alloc length at byte 4) or MODE SENSE(10) (bytes 7..8)."""
    ten = len(cdb) >= 10 and cdb[0] == 0x5A
    alloc = u16(cdb, 7) if ten else cdb[4]
    return ModeSenseCdb(
        bool(cdb[1] & 0x08),
        ten and bool(cdb[1] & 0x10),
        cdb[2] >> 6,
        cdb[2] & 0x3F,
        cdb[3],
        alloc,
    )


@dataclass(frozen=True, slots=True)
class RsocCdb:
    """REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN / 0x0C)."""

    rctd: bool
    options: int
    opcode: int
    service_action: int
    alloc_len: int


def decode_rsoc(cdb: bytes) -> RsocCdb:
    return RsocCdb(bool(cdb[2] & 0x80), cdb[2] & 0x07, cdb[3], u16(cdb, 4), u32(cdb, 6))
