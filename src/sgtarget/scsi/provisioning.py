"""Logical block provisioning (SBC-4 4.7): UNMAP, WRITE SAME(10/16), GET LBA STATUS.

The handlers are called from ``lu.COMMANDS`` like any other command. A LUN is thin when it was
created with ``thin=True``: then UNMAP and the UNMAP bit of WRITE SAME deallocate through
``Backstore.discard`` and deallocated blocks read back as zeros (LBPRZ). A thin LUN created
with ``unmap=False`` has no UNMAP command (LBPU 0) and deallocates through WRITE SAME only.
WRITE SAME without UNMAP and GET LBA STATUS work on every LUN (a fully provisioned one reports
all blocks mapped).

We report no anchored state (ANC_SUP 0), so an ANCHOR bit is always an invalid field.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from sgtarget.backstores.base import BackstoreBusy, BackstoreError
from sgtarget.scsi.cdb import decode_block, u16, u32
from sgtarget.scsi.constants import Asc, Opcode, SenseKey, io_window
from sgtarget.scsi.lbastatus import (
    LBA_STATUS_DESC,
    LBA_STATUS_HDR,
    LBA_STATUS_SCAN_BYTES,
    block_runs,
    lba_status_data,
)
from sgtarget.scsi.protection import PiCheck, pi_failure
from sgtarget.scsi.sense import CheckCondition, SenseData, field_pointer

if TYPE_CHECKING:
    from sgtarget.scsi.lu import Cmd, LogicalUnit

log = logging.getLogger(__name__)

#: VPD B0h MAXIMUM UNMAP LBA COUNT: one UNMAP frees at most this many blocks (libiscsi calls
#: anything above 1M and below "unlimited" insane).
MAX_UNMAP_LBA_COUNT = 1024 * 1024
#: VPD B0h MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT; bounds the parameter list we receive.
MAX_UNMAP_DESCRIPTORS = 256
#: VPD B0h MAXIMUM WRITE SAME LENGTH (blocks), as LIO. Below 65536 on purpose: a larger one
#: makes libiscsi's WRITE SAME tests WRITE(16) 65536 blocks first, beyond MAXIMUM TRANSFER.
MAX_WRITE_SAME_BLOCKS = 0xFFFF

_HDR = struct.Struct(">HH4x")  # UNMAP DATA LENGTH, UNMAP BLOCK DESCRIPTOR DATA LENGTH
_UNMAP_DESC = struct.Struct(">QI4x")  # LBA, NUMBER OF LOGICAL BLOCKS
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_LBA_OUT_OF_RANGE = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
_PARAM_LIST_LENGTH = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
_BAD_IU = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)


def _bad_param(byte: int) -> CheckCondition:
    """INVALID FIELD IN PARAMETER LIST pointing into the parameter data (C/D = 0)."""
    return CheckCondition(
        SenseData(
            SenseKey.ILLEGAL_REQUEST,
            Asc.INVALID_FIELD_IN_PARAMETER_LIST,
            sks=field_pointer(byte, in_cdb=False),
        )
    )


# ---- what the LU reports ---------------------------------------------------------------------


def fill_block_limits(lu: LogicalUnit, body: bytearray) -> None:
    """The provisioning fields of VPD B0h (``body`` offsets are page offsets minus 4).

    WSNZ stays 0: WRITE SAME with 0 blocks means "to the end of the medium". The UNMAP limits
    must be 0 unless UNMAP is supported (LBPU); the granularity also applies to WRITE SAME
    with UNMAP, so every thin LUN reports it.
    """
    if lu.lbpu:
        _U32.pack_into(body, 16, MAX_UNMAP_LBA_COUNT)
        _U32.pack_into(body, 20, MAX_UNMAP_DESCRIPTORS)
    if lu.thin:
        _U32.pack_into(body, 24, lu.lbppb)  # OPTIMAL UNMAP GRANULARITY: a physical block
        _U32.pack_into(body, 28, 0x80000000)  # UGAVALID; UNMAP GRANULARITY ALIGNMENT 0
    _U64.pack_into(body, 32, MAX_WRITE_SAME_BLOCKS)


def provisioning_vpd_body(lu: LogicalUnit) -> bytes:
    """VPD B2h after its header: LBPU (unless ``unmap=0``), LBPWS, LBPWS10, LBPRZ 001b,
    provisioning type 2."""
    if not lu.thin:
        return bytes(4)  # fully provisioned: no deallocation commands
    lbpu = 0x80 if lu.lbpu else 0
    return bytes((0, lbpu | 0x40 | 0x20 | 0x04, 0x02, 0))


def rc16_provisioning(lu: LogicalUnit) -> int:
    """READ CAPACITY(16) bytes 14..15: LBPME and LBPRZ on thin LUNs, lowest aligned LBA 0."""
    return 0xC000 if lu.thin else 0


# ---- UNMAP -----------------------------------------------------------------------------------


def unmap_descriptor_count(header: bytes, param_len: int) -> int:
    """How many block descriptors the 8-byte header announces, checked against limits."""
    data_len, bd_len = _HDR.unpack_from(header)
    if bd_len > param_len - 8:
        # The header claims more descriptors than the CDB's PARAMETER LIST LENGTH carries.
        raise CheckCondition(_PARAM_LIST_LENGTH)
    if data_len < bd_len + 6:
        raise _bad_param(0)
    # SBC-4: a truncated last descriptor is ignored.
    count: int = bd_len // _UNMAP_DESC.size
    if count > MAX_UNMAP_DESCRIPTORS:
        raise _bad_param(2)
    return count


def parse_unmap_descriptors(data: bytes, num_blocks: int) -> list[tuple[int, int]]:
    """``(lba, nblocks)`` per descriptor; every one is checked before anything is unmapped."""
    out: list[tuple[int, int]] = []
    total = 0
    for i in range(len(data) // _UNMAP_DESC.size):
        lba, count = _UNMAP_DESC.unpack_from(data, i * _UNMAP_DESC.size)
        if lba + count > num_blocks:
            raise CheckCondition(_LBA_OUT_OF_RANGE)
        total += count
        if total > MAX_UNMAP_LBA_COUNT:
            raise _bad_param(8 + i * _UNMAP_DESC.size + 8)
        out.append((lba, count))
    return out


async def cmd_unmap(lu: LogicalUnit, cmd: Cmd) -> None:
    cdb = cmd.cdb
    param_len = u16(cdb, 7)
    cmd.task.transfer_length = param_len
    if not lu.lbpu:
        # Fully provisioned and unmap=0 LUNs do not have UNMAP, as if it were not in the table.
        raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
    if cdb[1] & 0x01:
        raise CheckCondition.invalid_field(1, 0)  # ANCHOR: ANC_SUP is 0
    if param_len == 0:
        return  # no parameter list: nothing to do (SBC-4 5.32.1)
    if param_len < _HDR.size:
        raise CheckCondition(_PARAM_LIST_LENGTH)
    # One receive for the whole list (at most 64 KiB, the field is 16 bits): the transport
    # wants Data-Out windows in ascending order and a window cut short loses its tail.
    received = await lu._receive_bytes(cmd, param_len)
    if received is None:
        return
    data = received
    count = unmap_descriptor_count(data, param_len)
    start = _HDR.size
    data = data[start : start + count * _UNMAP_DESC.size]
    ranges = parse_unmap_descriptors(data, lu.num_blocks)
    bs = lu.block_size
    for lba, nblocks in ranges:
        if nblocks:
            # Exclusive with PI: data and tuples are deallocated in two steps.
            pi = bool(lu.pi_type)
            async with lu.ranges.hold(lba * bs, (lba + nblocks) * bs, exclusive=pi):
                await _discard(lu, lba * bs, nblocks * bs)
        if cmd.aborted():
            return


async def _discard(lu: LogicalUnit, offset: int, length: int) -> None:
    try:
        await lu.io.discard(offset, length)
    except BackstoreBusy:
        raise
    except BackstoreError as exc:
        log.warning("discard of %d bytes at %d failed on %s: %s", length, offset, lu.identity, exc)
        failed = True
    else:
        failed = False
    if failed:
        raise CheckCondition.of(
            SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=offset // lu.block_size
        )
    # Deallocated blocks read back with escape tuples (never written), unchecked.
    await lu._discard_pi(offset, length)


# ---- WRITE SAME ------------------------------------------------------------------------------


async def cmd_write_same(lu: LogicalUnit, cmd: Cmd) -> None:
    """WRITE SAME(10/16/32): one block (or zeros with NDOB) over a range, or deallocate it.

    With WRPROTECT != 0 (PI-formatted LUs) the block comes with its tuple, which is checked as
    the first block's and written to every block, its reference tag +1 per block (types 1
    and 2; type 3's is copied as it is). With WRPROTECT 0 the tuples are generated.
    """
    task = cmd.task
    cdb = cmd.cdb
    blk = decode_block(cdb)
    flags = blk.flags
    at = lu._flags_byte(cdb)
    ndob = cdb[0] != Opcode.WRITE_SAME_10 and bool(flags & 0x01)
    unmap = bool(flags & 0x08)
    bs = lu.block_size
    check = lu._protect(cmd, blk)
    unit = lu._unit(check)
    task.transfer_length = 0 if ndob else unit
    if flags & 0x10:
        raise CheckCondition.invalid_field(at, 4)  # ANCHOR (ANC_SUP 0; and needs UNMAP)
    if unmap and not lu.thin:
        raise CheckCondition.invalid_field(at, 3)
    if ndob and unit != bs:
        raise CheckCondition.invalid_field(at, 7)  # no Data-Out: no tuple to protect
    # NUMBER OF LOGICAL BLOCKS 0 means "through the last LBA" (WSNZ 0).
    nblocks = blk.length or max(lu.num_blocks - blk.lba, 0)
    lu._check_range(blk.lba, nblocks)
    if nblocks > MAX_WRITE_SAME_BLOCKS:
        raise CheckCondition.invalid_field(lu._length_byte(cdb))
    pattern: bytes | None = None
    tuple_: bytes | None = None
    if not ndob:
        # Exactly one block of Data-Out: a shorter or longer buffer is not "the same block".
        if task.expected_length != unit:
            raise CheckCondition(_BAD_IU)
        pattern = await lu._receive_bytes(cmd, unit)
        if pattern is None:
            return
        if unit != bs:
            assert check is not None
            pattern, tuple_ = pattern[:bs], pattern[bs:]
            error = check.verify(pattern, tuple_, bs, 0)
            if error is not None:
                raise pi_failure(error, blk.lba)
    base = blk.lba * bs
    total = nblocks * bs
    if unmap:
        # Deallocate whatever the block holds, as LIO and tgt do and libiscsi 1.19 expects
        # (its UnmapUntilEnd sends 0xFF blocks and wants zeros back): the initiator asked for
        # deallocation, and LBPRZ tells it what the range reads as afterwards.
        async with lu.ranges.hold(base, base + total, exclusive=bool(lu.pi_type)):
            await _discard(lu, base, total)
        return
    # Shared for the whole range: COMPARE AND WRITE and atomic writes see all of it or none.
    # Exclusive with PI: no reader may see blocks whose tuples are not written yet.
    async with lu.ranges.hold(base, base + total, exclusive=bool(lu.pi_type)):
        await _write_repeated(lu, cmd, pattern, base, total, check=check, tuple_=tuple_)


async def _write_repeated(
    lu: LogicalUnit,
    cmd: Cmd,
    pattern: bytes | None,
    base: int,
    total: int,
    *,
    check: PiCheck | None = None,
    tuple_: bytes | None = None,
) -> None:
    """Write ``pattern`` (``None``: zeros) over ``[base, base + total)`` through one window.

    On a PI-formatted LU each window's tuples are ``tuple_`` repeated (reference tag stepped)
    or, without one, generated with the reference tags ``check`` expects.
    """
    bs = lu.block_size
    window = min(total, io_window(bs))
    sg = await cmd.channel.alloc(window, partial=True)
    try:
        n = sg.length - sg.length % bs
        if n == 0 or cmd.aborted():
            return
        if pattern is None:
            sg.zero(0, n)
        else:
            # Filled once, written as often as needed: the range is never held in memory.
            sg.fill(pattern, n, reason="write-same")
        pos = 0
        while pos < total:
            m = min(n, total - pos)
            index = pos // bs  # block of the command
            pi = None if tuple_ is None else _repeat_tuple(tuple_, index, m // bs, check)
            ref = check.ref_at(index) if check is not None else None
            await lu._write_from(sg, base + pos, m, cmd.channel, pi=pi, ref_tag=ref)
            if cmd.aborted():
                return
            pos += m
    finally:
        sg.release()


def _repeat_tuple(tuple_: bytes, index: int, count: int, check: PiCheck | None) -> bytes:
    """``count`` copies of the received tuple for blocks ``index``.. of a WRITE SAME: guard
    and application tag as sent, the reference tag +1 per block except for type 3."""
    head, ref = tuple_[:4], int.from_bytes(tuple_[4:], "big")
    if check is not None and check.ptype == 3:
        return tuple_ * count
    return b"".join(
        head + ((ref + i) & 0xFFFFFFFF).to_bytes(4, "big") for i in range(index, index + count)
    )


# ---- GET LBA STATUS --------------------------------------------------------------------------


async def cmd_get_lba_status(lu: LogicalUnit, cmd: Cmd) -> None:
    from sgtarget.scsi.lu import send_reply  # noqa: PLC0415 - lu imports this module

    cdb = cmd.cdb
    lba = _U64.unpack_from(cdb, 2)[0]
    alloc = u32(cdb, 10)
    if lba >= lu.num_blocks:
        raise CheckCondition(_LBA_OUT_OF_RANGE)
    bs = lu.block_size
    end = min(lu.num_blocks, lba + max(1, LBA_STATUS_SCAN_BYTES // bs))
    if lu.thin:
        try:
            extents = await lu.io.mapped_extents(lba * bs, (end - lba) * bs)
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            log.warning("mapped extents at LBA %d failed on %s: %s", lba, lu.identity, exc)
            extents = None
        if extents is None:
            raise CheckCondition.of(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
        runs = block_runs(extents, bs, lba, end)
    else:
        runs = [(lba, end - lba, True)]
    # As many descriptors as fit the allocation length; at least one, truncated by send_reply.
    max_desc = max(1, (alloc - LBA_STATUS_HDR.size) // LBA_STATUS_DESC.size)
    await send_reply(cmd, lba_status_data(runs, max_desc), alloc)
