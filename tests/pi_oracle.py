"""The CRC-16/T10-DIF oracle the PI tests check sgtarget against: the definition, one bit at a
time, independent of ``sgtarget.datapath.dif`` and its native code."""

from __future__ import annotations


def crc16(data: bytes) -> int:
    """CRC-16/T10-DIF (poly 0x8BB7, init 0, not reflected) a bit at a time."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8BB7) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc
