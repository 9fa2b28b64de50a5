"""Read-modify-write and atomic writes (SBC-4): ORWRITE(16) and WRITE ATOMIC(16).

Both are called from ``lu.COMMANDS`` and lock their range exclusively in the LU's
``RangeLock``; READ, WRITE, WRITE SAME and UNMAP lock theirs shared, so neither command is ever
seen half done by another command of this target.

WRITE ATOMIC's limits (VPD B0h) are one physical block of alignment and granularity and at most
one ``IO_WINDOW``: the whole Data-Out is received first and stored under the lock, so the
atomicity is with respect to other commands. A crash of the host in the middle of the
backstore's write can still tear it; the backstores promise nothing stronger.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from sgtarget.datapath import ScatterList
from sgtarget.scsi.cdb import decode_block
from sgtarget.scsi.constants import IO_WINDOW, Asc, SenseKey
from sgtarget.scsi.sense import CheckCondition, SenseData

if TYPE_CHECKING:
    from sgtarget.scsi.lu import Cmd, LogicalUnit

_U32 = struct.Struct(">I")
#: WRITE ATOMIC(16): opcode, flags, LBA, ATOMIC BOUNDARY, TRANSFER LENGTH, group, control.
_WRITE_ATOMIC_16 = struct.Struct(">BBQHHBB")
_BAD_IU = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
#: Bytes OR-ed per step: big enough for C-speed integer ops, small enough to stay in cache.
_OR_CHUNK = 64 * 1024


# ---- WRITE ATOMIC limits (VPD B0h) ---------------------------------------------------------


def max_atomic_blocks(lu: LogicalUnit) -> int:
    """MAXIMUM ATOMIC TRANSFER LENGTH: one window, received whole before it is stored."""
    return min(IO_WINDOW // lu.block_size, lu.max_transfer_blocks)


def fill_atomic_limits(lu: LogicalUnit, body: bytearray) -> None:
    """The WRITE ATOMIC fields of VPD B0h (``body`` offsets are page offsets minus 4).

    Alignment and granularity are one physical block. A write with an ATOMIC BOUNDARY is
    stored whole, which is atomic per boundary too, so the boundary limits equal the plain one.
    """
    most = max_atomic_blocks(lu)
    _U32.pack_into(body, 40, most)  # MAXIMUM ATOMIC TRANSFER LENGTH
    _U32.pack_into(body, 44, lu.lbppb)  # ATOMIC ALIGNMENT
    _U32.pack_into(body, 48, lu.lbppb)  # ATOMIC TRANSFER LENGTH GRANULARITY
    _U32.pack_into(body, 52, most)  # MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY
    _U32.pack_into(body, 56, most)  # MAXIMUM ATOMIC BOUNDARY SIZE


# ---- WRITE ATOMIC(16) ----------------------------------------------------------------------


async def cmd_write_atomic(lu: LogicalUnit, cmd: Cmd) -> None:
    """WRITE ATOMIC(16) (SBC-4 5.48): all the blocks or none, as seen by other commands."""
    task = cmd.task
    _op, flags, lba, boundary, nblocks, _group, _ctl = _WRITE_ATOMIC_16.unpack_from(cmd.cdb)
    bs = lu.block_size
    total = nblocks * bs
    task.transfer_length = total
    if flags & 0xE0:
        raise CheckCondition.invalid_field(1, 7)  # WRPROTECT: no protection information
    lu._check_range(lba, nblocks)
    most = max_atomic_blocks(lu)
    if boundary > most:
        raise CheckCondition.invalid_field(10)
    if nblocks > most:
        raise CheckCondition.invalid_field(12)
    if lba % lu.lbppb:
        raise CheckCondition.invalid_field(2)  # ATOMIC ALIGNMENT
    if nblocks % lu.lbppb:
        raise CheckCondition.invalid_field(12)  # ATOMIC TRANSFER LENGTH GRANULARITY
    if nblocks == 0:
        return
    if task.expected_length < total:
        # Writing the part the initiator sends (as WRITE does) would not be atomic.
        raise CheckCondition(_BAD_IU)
    sent = await lu._receive(cmd, 0, total)
    if sent is None:
        return
    base = lba * bs
    try:
        async with lu.ranges.hold(base, base + total):
            if cmd.aborted():
                return
            await lu._write_from(sent, base, total, cmd.channel)
    finally:
        sent.release()
    if flags & 0x08 and not cmd.aborted():  # FUA
        await lu._flush()


# ---- ORWRITE(16) ---------------------------------------------------------------------------


def or_into(dst: ScatterList, src: ScatterList, n: int) -> None:
    """``dst[:n] |= src[:n]`` in chunks (both lists start at offset 0)."""
    for off in range(0, n, _OR_CHUNK):
        k = min(_OR_CHUNK, n - off)
        a = int.from_bytes(src.to_bytes(off, k), "little")
        b = int.from_bytes(dst.to_bytes(off, k), "little")
        dst.copy_in((a | b).to_bytes(k, "little"), off, reason="orwrite")


async def cmd_orwrite(lu: LogicalUnit, cmd: Cmd) -> None:
    """ORWRITE(16) (SBC-4 5.9): medium |= Data-Out, atomic with respect to other commands.

    The range is locked exclusively after the first window arrived (one window covers most
    commands, so the lock is not held across network waits) and stays locked while larger
    commands stream the rest: read a window, OR the Data-Out into it, write it back.
    """
    task = cmd.task
    blk = decode_block(cmd.cdb)
    bs = lu.block_size
    task.transfer_length = blk.length * bs
    if blk.protect:
        raise CheckCondition.invalid_field(1, 7)  # ORPROTECT: no protection information
    lu._check_range(blk.lba, blk.length)
    lu._check_length(blk.length, 10)
    nblocks = lu._blocks_within_edtl(task, blk.length)
    if nblocks == 0:
        return
    base = blk.lba * bs
    total = nblocks * bs
    window = IO_WINDOW
    # With PI whole blocks per piece: their tuples are generated per block.
    unit = bs if lu.pi_type else 1
    sent = await lu._receive_units(cmd, 0, min(window, total), unit)
    if sent is None:
        return
    try:
        # Memory before the lock: waiting for it with the range locked would stall other I/O.
        medium = await cmd.channel.alloc(min(window, total))
        try:
            async with lu.ranges.hold(base, base + total):
                off = 0
                while not cmd.aborted():
                    n = sent.length
                    await lu._read_into(medium, base + off, n, cmd.channel)
                    or_into(medium, sent, n)
                    await lu._write_from(medium, base + off, n, cmd.channel)
                    sent.release()
                    off += n
                    if off >= total:
                        break
                    nxt = await lu._receive_units(cmd, off, min(window, total - off), unit)
                    if nxt is None:
                        return
                    sent = nxt
        finally:
            medium.release()
    finally:
        sent.release()
    if blk.fua and not cmd.aborted():
        await lu._flush()
