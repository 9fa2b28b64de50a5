"""CRC32C header and data digests (RFC 7143 §11.1.2), via the C-backed ``crc32c`` package.

The 32-bit result goes on the wire least significant byte first, which is what the Linux
initiator, LIO and libiscsi all do.
"""

from __future__ import annotations

from collections.abc import Iterable

from crc32c import crc32c

from sgtarget.datapath import BytesLike


def digest(data: BytesLike) -> bytes:
    return int(crc32c(data)).to_bytes(4, "little")


def digest_of(buffers: Iterable[BytesLike]) -> bytes:
    """Digest of the concatenation of ``buffers``, computed incrementally (no join)."""
    crc = 0
    for buf in buffers:
        crc = crc32c(buf, crc)
    return int(crc).to_bytes(4, "little")
