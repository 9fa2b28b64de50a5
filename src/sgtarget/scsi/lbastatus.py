"""GET LBA STATUS (SBC-4 5.8) parameter data from a backstore's byte extents.

Pure functions without I/O, shared by the in-process LUs (scsi/provisioning.py) and by ring
handler processes (ring/handler.py), which answer the same CDB on the other side of a ring.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

#: GET LBA STATUS looks at most this far ahead of its LBA; the descriptors need not reach the
#: end of the medium, so a caller asks again from where they end.
LBA_STATUS_SCAN_BYTES = 1 << 30
#: Provisioning status values.
MAPPED = 0x0
DEALLOCATED = 0x1

#: PARAMETER DATA LENGTH, reserved.
LBA_STATUS_HDR = struct.Struct(">I4x")
#: LBA, NUMBER OF LOGICAL BLOCKS, PROVISIONING STATUS, reserved.
LBA_STATUS_DESC = struct.Struct(">QIB3x")


def block_runs(
    extents: Iterable[tuple[int, int, bool]], block_size: int, first: int, end: int
) -> list[tuple[int, int, bool]]:
    """Byte extents as ``(lba, nblocks, mapped)`` runs covering blocks ``[first, end)``.

    A block is mapped when any byte of it is: mapped extents grow to whole blocks, deallocated
    ones shrink. A gap the extents leave is mapped. Adjacent runs of the same status merge.
    """
    runs: list[tuple[int, int, bool]] = []
    cursor = first

    def add(start: int, stop: int, mapped: bool) -> None:
        if runs and runs[-1][2] == mapped:
            runs[-1] = (runs[-1][0], stop - runs[-1][0], mapped)
        else:
            runs.append((start, stop - start, mapped))

    for off, length, mapped in extents:
        if mapped:
            start, stop = off // block_size, -(-(off + length) // block_size)
        else:
            start, stop = -(-off // block_size), (off + length) // block_size
        start, stop = max(start, cursor), min(stop, end)
        if stop <= start:
            continue
        if start > cursor:  # a gap can only be a partial block: it holds data
            add(cursor, start, True)
        add(start, stop, mapped)
        cursor = stop
    if cursor < end:
        add(cursor, end, True)
    return runs


def lba_status_data(runs: list[tuple[int, int, bool]], max_descriptors: int) -> bytes:
    """GET LBA STATUS parameter data: header and up to ``max_descriptors`` descriptors."""
    body = bytearray()
    for lba, count, mapped in runs[:max_descriptors]:
        status = MAPPED if mapped else DEALLOCATED
        body += LBA_STATUS_DESC.pack(lba, min(count, 0xFFFFFFFF), status)
    return LBA_STATUS_HDR.pack(len(body) + 4) + bytes(body)
