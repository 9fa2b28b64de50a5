"""Sense data (SPC-5 4.4): fixed format (0x70) and descriptor format (0x72).

``CheckCondition`` is how a command handler unwinds into CHECK CONDITION: it carries a
``SenseData`` and is caught by the dispatcher, which turns it into status and sense bytes. It
never leaves ``ScsiTarget.execute``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sgtarget.scsi.constants import Asc, SenseKey

#: Fixed format: response code, obsolete, flags|key, information(4), additional length,
#: command-specific(4), ASC, ASCQ, FRU, sense-key specific(3). 18 bytes.
_FIXED = struct.Struct(">BBBIBIBBB3s")
FIXED_LENGTH = _FIXED.size
#: Descriptor format header: response code, key, ASC, ASCQ, reserved(3), additional length.
_DESC_HDR = struct.Struct(">BBBB3xB")
#: Information descriptor (type 0x00): type, additional length 0x0A, VALID, reserved, 8-byte info.
_DESC_INFO = struct.Struct(">BBBxQ")
#: Sense-key specific descriptor (type 0x02): type, additional length 6, 2 reserved, SKS, reserved.
_DESC_SKS = struct.Struct(">BBxx3sx")

RESPONSE_FIXED_CURRENT = 0x70
RESPONSE_DESC_CURRENT = 0x72
_VALID = 0x80
_SKSV = 0x80
_CD = 0x40
_BPV = 0x08


def field_pointer(byte: int, bit: int | None = None, *, in_cdb: bool = True) -> bytes:
    """Sense-key specific field pointer for ILLEGAL REQUEST (SPC-5 4.4.2.4.2)."""
    first = _SKSV | (_CD if in_cdb else 0)
    if bit is not None:
        first |= _BPV | (bit & 0x07)
    return bytes((first, (byte >> 8) & 0xFF, byte & 0xFF))


@dataclass(frozen=True, slots=True)
class SenseData:
    key: SenseKey
    asc: Asc
    #: INFORMATION field; ``None`` leaves VALID clear.
    information: int | None = None
    #: 3-byte sense-key specific field (SKSV set), or ``None``.
    sks: bytes | None = None

    def fixed(self) -> bytes:
        info = self.information
        # The fixed format holds 32 bits of INFORMATION; wider values cannot be VALID.
        valid = info is not None and 0 <= info <= 0xFFFFFFFF
        return _FIXED.pack(
            RESPONSE_FIXED_CURRENT | (_VALID if valid else 0),
            0,
            int(self.key),
            info if valid and info is not None else 0,
            FIXED_LENGTH - 8,
            0,
            self.asc.asc,
            self.asc.ascq,
            0,
            self.sks or b"\0\0\0",
        )

    def descriptor(self) -> bytes:
        body = b""
        if self.information is not None:
            body += _DESC_INFO.pack(0x00, 0x0A, _VALID, self.information & 0xFFFFFFFFFFFFFFFF)
        if self.sks is not None:
            body += _DESC_SKS.pack(0x02, 0x06, self.sks)
        hdr = _DESC_HDR.pack(
            RESPONSE_DESC_CURRENT, int(self.key), self.asc.asc, self.asc.ascq, len(body)
        )
        return hdr + body

    def encode(self, *, descriptor: bool = False) -> bytes:
        return self.descriptor() if descriptor else self.fixed()


NO_SENSE = SenseData(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE)


class CheckCondition(Exception):
    """Terminates the current command with CHECK CONDITION and ``sense``."""

    def __init__(self, sense: SenseData) -> None:
        super().__init__(sense)
        self.sense = sense

    @classmethod
    def of(
        cls,
        key: SenseKey,
        asc: Asc,
        *,
        information: int | None = None,
        sks: bytes | None = None,
    ) -> CheckCondition:
        return cls(SenseData(key, asc, information, sks))

    @classmethod
    def invalid_field(cls, byte: int, bit: int | None = None) -> CheckCondition:
        """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at ``byte`` (and ``bit``)."""
        return cls(
            SenseData(
                SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, None, field_pointer(byte, bit)
            )
        )

    @classmethod
    def illegal(cls, asc: Asc) -> CheckCondition:
        return cls(SenseData(SenseKey.ILLEGAL_REQUEST, asc))

    def __str__(self) -> str:
        s = self.sense
        return f"CHECK CONDITION {s.key.name} {s.asc.name}"
