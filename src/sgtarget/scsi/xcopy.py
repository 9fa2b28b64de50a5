"""Third-party copy, LID1 (SPC-4 6.4, 6.18): EXTENDED COPY and RECEIVE COPY RESULTS.

The LU that receives EXTENDED COPY is the copy manager. Its parameter list names copy targets
with identification CSCD descriptors (E4h) holding an NAA designator from VPD 83h, and says
what to copy with block-to-block segment descriptors (02h). Copy targets are resolved among the
LUs of this target only, so the data never crosses the network: each segment is read from the
source backstore into pool blocks and written from the same blocks to the destination.

Errors follow SPC-4's two phases. A malformed parameter list (lengths, counts, descriptor types)
is found before any segment is processed and ends in ILLEGAL REQUEST. What goes wrong while a
segment is processed (an index with no descriptor, a designator that names no LU of ours, an
LBA out of range, a medium error) ends in COPY ABORTED, with a segment pointer to the failing
segment descriptor and, when a copy target refused the I/O, that target's sense data appended
(the COMMAND-SPECIFIC INFORMATION bytes give its offset, as SPC-4 describes).

With LIST ID USAGE 00b the outcome is held per I_T nexus and list identifier for RECEIVE COPY
RESULTS (COPY STATUS, FAILED SEGMENT DETAILS) until it is read, the list identifier is reused,
or a LU reset or nexus loss discards it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgtarget.scsi.cdb import u32
from sgtarget.scsi.constants import IO_WINDOW, Asc, Opcode, SenseKey, Status
from sgtarget.scsi.reservations import Conflict
from sgtarget.scsi.sense import FIXED_LENGTH, CheckCondition, SenseData, field_pointer

if TYPE_CHECKING:
    from sgtarget.scsi.lu import Cmd, LogicalUnit

#: RECEIVE COPY RESULTS (OPERATING PARAMETERS) limits. The descriptor list length is the
#: largest parameter list we buffer; a list of the maximum counts (8 * 32 + 16 * 28) fits it.
MAX_CSCD_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
#: Bytes one segment may copy: 65535 blocks of 4 KiB, so a command copies at most 4 GiB.
MAX_SEGMENT_BYTES = 0xFFFF * 4096
#: Reported concurrency: we refuse no copy for being one too many; list IDs are one byte.
TOTAL_CONCURRENT_COPIES = 256
MAX_CONCURRENT_COPIES = 255
#: Segment lengths are whole blocks of at least 512 bytes (log2).
DATA_SEGMENT_GRANULARITY = 9

HEADER_LEN = 16
CSCD_LEN = 32
B2B_SEGMENT_LEN = 28

IDENTIFICATION_CSCD = 0xE4
BLOCK_TO_BLOCK = 0x02
IMPLEMENTED_DESCRIPTORS = bytes((BLOCK_TO_BLOCK, IDENTIFICATION_CSCD))

#: Parameter list header: list ID, flags (STR, LIST ID USAGE, PRIORITY), CSCD descriptor list
#: length, 4 reserved, segment descriptor list length, inline data length.
_HEADER = struct.Struct(">BBH4xII")
#: Block-to-block segment: type, DC/CAT, descriptor length, source and destination CSCD
#: indexes, 2 reserved, NUMBER OF BLOCKS, source LBA, destination LBA.
_B2B = struct.Struct(">BBHHH2xHQQ")
#: OPERATING PARAMETERS (LID1) up to the implemented descriptor list: available data, SNLID,
#: 3 reserved, max CSCD descriptors, max segment descriptors, max descriptor list length, max
#: segment length, max inline data, held data limit, max stream transfer, 2 reserved, total
#: concurrent copies, max concurrent copies, three granularities, 3 reserved, list length.
_OP_PARAMS = struct.Struct(">IB3xHHIIIII2xHBBBB3xB")
#: COPY STATUS (LID1): available data, HDD|status, segments processed, units, transfer count.
_COPY_STATUS = struct.Struct(">IBHBI")
#: FAILED SEGMENT DETAILS header: available data, 52 reserved, status, reserved, sense length.
_FAILED_SEGMENT = struct.Struct(">I52xBxH")
_READ_16 = bytes((Opcode.READ_16,)) + bytes(15)
_WRITE_16 = bytes((Opcode.WRITE_16,)) + bytes(15)

_SNLID = 0x01  # LIST ID USAGE 11b (no list identifier) is supported


class CopyResultsAction(enum.IntEnum):
    """RECEIVE COPY RESULTS service actions we implement (RECEIVE DATA 01h is not: no
    segment type we support holds data)."""

    COPY_STATUS = 0x00
    OPERATING_PARAMETERS = 0x03
    FAILED_SEGMENT_DETAILS = 0x04


class ListIdUsage(enum.IntEnum):
    HOLD = 0b00
    DISCARD = 0b10
    NONE = 0b11


class CopyManagerStatus(enum.IntEnum):
    IN_PROGRESS = 0x00
    COMPLETED = 0x01
    COMPLETED_WITH_ERRORS = 0x02


@dataclass(frozen=True, slots=True)
class CopyAbortedSense(SenseData):
    """COPY ABORTED sense with a copy target's sense data appended (fixed format only).

    ``command_specific`` holds the source and destination sense offsets in its two high
    bytes, pointing at ``attached`` within the whole sense data.
    """

    command_specific: int = 0
    attached: bytes = b""

    def fixed(self) -> bytes:
        # Explicit base call: zero-argument super() breaks in slotted dataclasses.
        data = bytearray(SenseData.fixed(self))
        data[7] = FIXED_LENGTH - 8 + len(self.attached)
        data[8:12] = self.command_specific.to_bytes(4, "big")
        return bytes(data) + self.attached


@dataclass(frozen=True, slots=True)
class CscdDescriptor:
    """An identification CSCD descriptor (E4h) for a block device."""

    #: Offset of the descriptor in the parameter list (for sense field pointers).
    offset: int
    code_set: int
    association: int
    designator_type: int
    designator: bytes
    block_length: int


@dataclass(frozen=True, slots=True)
class BlockSegment:
    """A block-to-block segment descriptor (02h)."""

    offset: int
    source: int
    destination: int
    #: DC: NUMBER OF BLOCKS counts destination blocks (else source blocks).
    destination_count: bool
    nblocks: int
    source_lba: int
    destination_lba: int


@dataclass(frozen=True, slots=True)
class CopyParameters:
    list_id: int
    usage: ListIdUsage
    targets: tuple[CscdDescriptor, ...]
    segments: tuple[BlockSegment, ...]


# ---- sense -------------------------------------------------------------------------------------


def _illegal(asc: Asc, byte: int | None = None, bit: int | None = None) -> CheckCondition:
    """ILLEGAL REQUEST with a field pointer into the parameter list (C/D 0)."""
    sks = field_pointer(byte, bit, in_cdb=False) if byte is not None else None
    return CheckCondition(SenseData(SenseKey.ILLEGAL_REQUEST, asc, sks=sks))


def _length_error() -> CheckCondition:
    return CheckCondition.illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)


def copy_aborted(asc: Asc, byte: int) -> CheckCondition:
    """COPY ABORTED found by the copy manager; the segment pointer (SD 0) is ``byte``."""
    return CheckCondition(
        SenseData(SenseKey.COPY_ABORTED, asc, sks=field_pointer(byte, in_cdb=False))
    )


def copy_target_failed(target_sense: SenseData, *, destination: bool, byte: int) -> CheckCondition:
    """COPY ABORTED because a copy target refused its I/O; its sense data goes along."""
    offset = FIXED_LENGTH  # the target's sense follows our 18 bytes
    return CheckCondition(
        CopyAbortedSense(
            SenseKey.COPY_ABORTED,
            Asc.NO_ADDITIONAL_SENSE,
            sks=field_pointer(byte, in_cdb=False),
            command_specific=offset << (16 if destination else 24),
            attached=target_sense.fixed(),
        )
    )


# ---- the parameter list ------------------------------------------------------------------------


def check_parameter_list_length(n: int) -> None:
    """Refuse a PARAMETER LIST LENGTH no valid list has, before receiving the list."""
    if 0 < n < HEADER_LEN or n > HEADER_LEN + MAX_DESCRIPTOR_LIST_LENGTH:
        raise _length_error()


def parse_parameters(data: bytes) -> CopyParameters:
    """The EXTENDED COPY (LID1) parameter list; raises the ILLEGAL REQUEST SPC-4 gives."""
    if len(data) < HEADER_LEN:
        raise _length_error()
    list_id, flags, cscd_len, seg_len, inline_len = _HEADER.unpack_from(data)
    usage = (flags >> 3) & 0x03
    if usage == 0b01:
        raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, 1, 4)
    if inline_len:
        # MAXIMUM INLINE DATA LENGTH is 0: no segment type we support uses inline data.
        raise _illegal(Asc.INLINE_DATA_LENGTH_EXCEEDED, 12)
    if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH:
        raise _length_error()
    if HEADER_LEN + cscd_len + seg_len > len(data):
        raise _length_error()
    targets = _parse_cscds(data, HEADER_LEN, HEADER_LEN + cscd_len)
    segments = _parse_segments(data, HEADER_LEN + cscd_len, HEADER_LEN + cscd_len + seg_len)
    return CopyParameters(list_id, ListIdUsage(usage), targets, segments)


def _parse_cscds(data: bytes, pos: int, end: int) -> tuple[CscdDescriptor, ...]:
    out: list[CscdDescriptor] = []
    while pos < end:
        if len(out) == MAX_CSCD_DESCRIPTORS:
            raise _illegal(Asc.TOO_MANY_TARGET_DESCRIPTORS, pos)
        if data[pos] != IDENTIFICATION_CSCD:
            raise _illegal(Asc.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, pos)
        if end - pos < CSCD_LEN:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, 2)  # the list length
        # Byte 1: LU ID TYPE and NUL are obsolete in SPC-4 and ignored; the peripheral
        # device type must be a block device, the only kind whose parameters we read.
        if data[pos + 1] & 0x1F:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, pos + 1, 4)
        dlen = data[pos + 7]
        if dlen > CSCD_LEN - 12:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, pos + 7)
        out.append(
            CscdDescriptor(
                offset=pos,
                code_set=data[pos + 4] & 0x0F,
                association=(data[pos + 5] >> 4) & 0x03,
                designator_type=data[pos + 5] & 0x0F,
                designator=bytes(data[pos + 8 : pos + 8 + dlen]),
                block_length=int.from_bytes(data[pos + 29 : pos + 32], "big"),
            )
        )
        pos += CSCD_LEN
    return tuple(out)


def _parse_segments(data: bytes, pos: int, end: int) -> tuple[BlockSegment, ...]:
    out: list[BlockSegment] = []
    while pos < end:
        if len(out) == MAX_SEGMENT_DESCRIPTORS:
            raise _illegal(Asc.TOO_MANY_SEGMENT_DESCRIPTORS, pos)
        if data[pos] != BLOCK_TO_BLOCK:
            raise _illegal(Asc.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, pos)
        if end - pos < B2B_SEGMENT_LEN:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, 8)  # the list length
        _, flags, dlen, src, dst, nblocks, src_lba, dst_lba = _B2B.unpack_from(data, pos)
        if dlen != B2B_SEGMENT_LEN - 4:
            raise _illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, pos + 2)
        out.append(BlockSegment(pos, src, dst, bool(flags & 0x02), nblocks, src_lba, dst_lba))
        pos += B2B_SEGMENT_LEN
    return tuple(out)


# ---- held results ------------------------------------------------------------------------------


class CopyRecord:
    """What RECEIVE COPY RESULTS reports about one EXTENDED COPY."""

    __slots__ = (
        "bytes_copied",
        "details_held",
        "key",
        "list_id",
        "segments",
        "sense",
        "state",
        "status",
        "usage",
    )

    def __init__(self, key: str, list_id: int, usage: ListIdUsage) -> None:
        self.key = key
        self.list_id = list_id
        self.usage = usage
        self.state = CopyManagerStatus.IN_PROGRESS
        self.segments = 0
        self.bytes_copied = 0
        #: SCSI status and sense the command ended with (FAILED SEGMENT DETAILS).
        self.status = Status.GOOD
        self.sense = b""
        self.details_held = False


class CopyResults:
    """Per-LU store of held copy results, keyed by I_T nexus and list identifier."""

    def __init__(self) -> None:
        self._by_nexus: dict[str, dict[int, CopyRecord]] = {}

    def begin(self, key: str, list_id: int, usage: ListIdUsage) -> CopyRecord:
        record = CopyRecord(key, list_id, usage)
        if usage == ListIdUsage.NONE:
            return record  # no list identifier: nothing to hold or to collide with
        held = self._by_nexus.setdefault(key, {})
        old = held.get(list_id)
        if old is not None and old.state == CopyManagerStatus.IN_PROGRESS:
            raise CheckCondition.illegal(Asc.OPERATION_IN_PROGRESS)
        # A new EXTENDED COPY with the same list identifier discards the old results.
        held[list_id] = record
        return record

    def finish(self, record: CopyRecord, status: Status, sense: bytes = b"") -> None:
        record.status = status
        record.sense = sense
        ok = status == Status.GOOD
        record.state = (
            CopyManagerStatus.COMPLETED if ok else CopyManagerStatus.COMPLETED_WITH_ERRORS
        )
        record.details_held = not ok
        if record.usage != ListIdUsage.HOLD:
            self._drop(record)

    def get(self, key: str, list_id: int) -> CopyRecord | None:
        return self._by_nexus.get(key, {}).get(list_id)

    def _drop(self, record: CopyRecord) -> None:
        held = self._by_nexus.get(record.key)
        if held is not None and held.get(record.list_id) is record:
            del held[record.list_id]
            if not held:
                del self._by_nexus[record.key]

    def status_read(self, record: CopyRecord) -> None:
        """COPY STATUS of a finished copy was returned: discard it (SPC-4 6.18.3), unless
        FAILED SEGMENT DETAILS are still to be read."""
        if record.state != CopyManagerStatus.IN_PROGRESS and not record.details_held:
            self._drop(record)

    def details_read(self, record: CopyRecord) -> None:
        record.details_held = False
        if record.state != CopyManagerStatus.IN_PROGRESS:
            self._drop(record)

    def nexus_lost(self, key: str) -> None:
        self._by_nexus.pop(key, None)

    def clear(self) -> None:
        """LU reset (or power on): all held results go."""
        self._by_nexus.clear()


# ---- RECEIVE COPY RESULTS data -----------------------------------------------------------------


def operating_parameters() -> bytes:
    body = _OP_PARAMS.pack(
        0,
        _SNLID,
        MAX_CSCD_DESCRIPTORS,
        MAX_SEGMENT_DESCRIPTORS,
        MAX_DESCRIPTOR_LIST_LENGTH,
        MAX_SEGMENT_BYTES,
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT: block-to-block segments hold no data
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE: no stream devices
        TOTAL_CONCURRENT_COPIES,
        MAX_CONCURRENT_COPIES,
        DATA_SEGMENT_GRANULARITY,
        0,  # INLINE DATA GRANULARITY
        0,  # HELD DATA GRANULARITY
        len(IMPLEMENTED_DESCRIPTORS),
    )
    data = bytearray(body + IMPLEMENTED_DESCRIPTORS)
    data[0:4] = (len(data) - 4).to_bytes(4, "big")
    return bytes(data)


def copy_status_data(record: CopyRecord) -> bytes:
    """COPY STATUS: the transfer count in the smallest unit (bytes, KiB, MiB, ...) that fits."""
    count, units = record.bytes_copied, 0
    while count > 0xFFFFFFFF:
        count >>= 10
        units += 1
    return _COPY_STATUS.pack(8, record.state, record.segments, units, count)


def failed_segment_data(record: CopyRecord) -> bytes:
    """FAILED SEGMENT DETAILS: nothing (AVAILABLE DATA 0) unless the copy failed."""
    if not record.details_held:
        return bytes(4)
    size = _FAILED_SEGMENT.size + len(record.sense)
    return _FAILED_SEGMENT.pack(size - 4, record.status, len(record.sense)) + record.sense


async def cmd_receive_copy_results(lu: LogicalUnit, cmd: Cmd) -> None:
    from sgtarget.scsi.lu import send_reply  # noqa: PLC0415 - lu imports this module

    cdb = cmd.cdb
    action = cdb[1] & 0x1F
    list_id = cdb[2]
    alloc = u32(cdb, 10)
    results = lu.copy_results
    if action == CopyResultsAction.OPERATING_PARAMETERS:
        await send_reply(cmd, operating_parameters(), alloc)
        return
    record = results.get(cmd.nexus_key, list_id)
    if record is None:
        # No EXTENDED COPY with this list identifier is known on this nexus.
        raise CheckCondition.invalid_field(2)
    if action == CopyResultsAction.COPY_STATUS:
        data = copy_status_data(record)
        results.status_read(record)
    else:
        data = failed_segment_data(record)
        if alloc == 0 or alloc >= len(data):
            results.details_read(record)
    await send_reply(cmd, data, alloc)


# ---- EXTENDED COPY -----------------------------------------------------------------------------


async def cmd_extended_copy(lu: LogicalUnit, cmd: Cmd) -> None:
    n = u32(cmd.cdb, 10)
    cmd.task.transfer_length = n
    if n == 0:
        return  # no parameter list is not an error (SPC-4 6.4.1)
    check_parameter_list_length(n)
    data = await lu._receive_bytes(cmd, n)
    if data is None:
        return
    params = parse_parameters(data)
    key = cmd.nexus_key
    results = lu.copy_results
    record = results.begin(key, params.list_id, params.usage)
    status, sense = Status.CHECK_CONDITION, b""
    try:
        for segment in params.segments:
            await _copy_segment(lu, cmd, params, segment, record)
            if cmd.aborted():
                return
            record.segments += 1
        status = Status.GOOD
    except CheckCondition as cc:
        sense = cc.sense.fixed()
        raise
    except Conflict:
        status = Status.RESERVATION_CONFLICT
        raise
    finally:
        # Also on abort or TASK SET FULL: the list identifier must not stay "in progress".
        results.finish(record, status, sense)


def _target(params: CopyParameters, index: int, byte: int) -> CscdDescriptor:
    if index >= len(params.targets):
        raise copy_aborted(Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, byte)
    return params.targets[index]


def resolve_copy_target(desc: CscdDescriptor, candidates: Iterable[LogicalUnit]) -> LogicalUnit:
    """The LU of this target that ``desc`` designates (its VPD 83h NAA designator)."""
    if (desc.code_set, desc.association, desc.designator_type) == (0x1, 0x0, 0x3):
        for other in candidates:
            if other.naa == desc.designator:
                if desc.block_length != other.block_size:
                    # The initiator counts LBAs in another block size than the LU's.
                    raise copy_aborted(Asc.INVALID_FIELD_IN_PARAMETER_LIST, desc.offset + 29)
                return other
    raise copy_aborted(Asc.COPY_TARGET_DEVICE_NOT_REACHABLE, desc.offset + 4)


async def _copy_segment(
    lu: LogicalUnit, cmd: Cmd, params: CopyParameters, seg: BlockSegment, record: CopyRecord
) -> None:
    d = lu._directory
    candidates = tuple(d.logical_units()) if d is not None else (lu,)
    src = resolve_copy_target(_target(params, seg.source, seg.offset + 4), candidates)
    dst = resolve_copy_target(_target(params, seg.destination, seg.offset + 6), candidates)
    # A copy target applies its reservations as if the initiator had sent READ or WRITE.
    key = cmd.nexus_key
    if src.reservations.conflicts(_READ_16, key) or dst.reservations.conflicts(_WRITE_16, key):
        raise Conflict
    nbytes = seg.nblocks * (dst.block_size if seg.destination_count else src.block_size)
    if nbytes % src.block_size or nbytes % dst.block_size:
        # An inexact segment (block sizes that do not divide it): CAT/PAD handling of the
        # residue is for stream devices, which we do not have.
        raise copy_aborted(Asc.INVALID_FIELD_IN_PARAMETER_LIST, seg.offset + 10)
    if nbytes > MAX_SEGMENT_BYTES:
        raise copy_aborted(Asc.INVALID_FIELD_IN_PARAMETER_LIST, seg.offset + 10)
    from sgtarget.scsi.lu import COMMANDS  # noqa: PLC0415 - lu imports this module

    # Each copy target checks what it would check for a READ(16) or WRITE(16) of the range:
    # medium present, write protection, then the LBA range.
    for target, op, lba, at, is_dst in (
        (src, Opcode.READ_16, seg.source_lba, seg.offset + 12, False),
        (dst, Opcode.WRITE_16, seg.destination_lba, seg.offset + 20, True),
    ):
        spec = COMMANDS.get(op)
        assert spec is not None
        try:
            target._check_medium(spec)
            target._check_range(lba, nbytes // target.block_size)
        except CheckCondition as cc:
            raise copy_target_failed(cc.sense, destination=is_dst, byte=at) from None
    await _copy_blocks(
        cmd,
        (src, seg.source_lba * src.block_size),
        (dst, seg.destination_lba * dst.block_size),
        nbytes,
        record=record,
        seg_offset=seg.offset,
    )


async def _copy_blocks(
    cmd: Cmd,
    source: tuple[LogicalUnit, int],
    destination: tuple[LogicalUnit, int],
    total: int,
    *,
    record: CopyRecord,
    seg_offset: int,
) -> None:
    """Copy ``total`` bytes backstore to backstore, one pool chunk at a time.

    Chunks come from the command's channel, i.e. the target's pool: the copy stays inside
    the memory budget and its backpressure (a short pool gives smaller chunks, not a failure),
    and backstores read into and write from the same page-aligned blocks, so nothing is
    copied in user space and O_DIRECT files take them as they are. Overlapping ranges on one
    LU with the destination ahead are copied from the end, like memmove.
    """
    (src, src_off), (dst, dst_off) = source, destination
    backwards = src is dst and src_off < dst_off < src_off + total
    unit = max(src.block_size, dst.block_size)
    done = 0
    while done < total:
        sg = await cmd.channel.alloc(min(IO_WINDOW, total - done), partial=True)
        try:
            n = sg.length - sg.length % unit if sg.length > unit else sg.length
            n = min(n, total - done)
            pos = total - done - n if backwards else done
            if cmd.aborted():
                return
            try:
                await src._read_into(sg, src_off + pos, n, cmd.channel)
            except CheckCondition as cc:
                raise copy_target_failed(cc.sense, destination=False, byte=seg_offset) from None
            if cmd.aborted():
                return
            try:
                await dst._write_from(sg, dst_off + pos, n, cmd.channel)
            except CheckCondition as cc:
                raise copy_target_failed(cc.sense, destination=True, byte=seg_offset) from None
        finally:
            sg.release()
        done += n
        record.bytes_copied += n
        if cmd.aborted():
            return
