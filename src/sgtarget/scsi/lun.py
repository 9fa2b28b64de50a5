"""The 8-byte SAM-5 LUN field (SAM-5 4.7): single-level peripheral and flat space addressing.

- peripheral device addressing (method 00b, bus 0): ``00 LL 00 00 00 00 00 00`` for LUN < 256;
- flat space addressing (method 01b): ``01LLLLLL LLLLLLLL 00 ...`` for LUN 0..16383.

We encode with the smallest method (what Linux and libiscsi send) and decode both.
"""

from __future__ import annotations

MAX_PERIPHERAL_LUN = 255
MAX_FLAT_LUN = 16383
_FLAT = 0x40


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field for ``lun``."""
    if lun < 0 or lun > MAX_FLAT_LUN:
        raise ValueError(f"LUN {lun} outside 0..{MAX_FLAT_LUN}")
    if lun <= MAX_PERIPHERAL_LUN:
        return bytes((0x00, lun)) + bytes(6)
    return bytes((_FLAT | (lun >> 8), lun & 0xFF)) + bytes(6)


def decode_lun(field: bytes) -> int | None:
    """The LUN number, or ``None`` for an address we do not serve (other methods, levels)."""
    if len(field) != 8 or any(field[2:]):
        # Second and deeper levels (or a truncated field) address nothing here.
        return None
    method = field[0] >> 6
    if method == 0:
        # Bus identifier must be 0: there is no bus behind us.
        return field[1] if field[0] == 0 else None
    if method == 1:
        return ((field[0] & 0x3F) << 8) | field[1]
    return None
