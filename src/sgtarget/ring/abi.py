"""The TCMU user ABI (include/uapi/linux/target_core_user.h, TCMU_VERSION "2.0"), byte-exact.

Everything is little endian (native on x86-64 and arm64 Linux). Offsets below are the ones a C
compiler gives for the kernel header; the nested ``req``/``rsp`` structs of ``tcmu_cmd_entry``
are *not* packed (only the outer struct is), so ``req.cdb_off`` sits at 24, not 20.

Mailbox (``struct tcmu_mailbox``, 128 bytes = ``CMDR_OFF``; the command ring follows it)::

    0  u16 version      (= 2)          12 u32 cmd_head   (written by the target)
    2  u16 flags        (MailboxFlag)  64 u32 cmd_tail   (written by the handler; own cache line)
    4  u32 cmdr_off     (= 128)
    8  u32 cmdr_size

Entry header (``struct tcmu_cmd_entry_hdr``, 8 bytes) at the start of every ring entry::

    0  u32 len_op       (entry length | Opcode in the low 3 bits; lengths are multiples of 8)
    4  u16 cmd_id       6  u8 kflags       7  u8 uflags (UFlag)

Command entry (``struct tcmu_cmd_entry``, sizeof 112), request view written by the target::

    8  u32 iov_cnt      12 u32 iov_bidi_cnt   16 u32 iov_dif_cnt   20 (4 bytes alignment hole)
    24 u64 cdb_off      32 u64 __pad1         40 u64 __pad2        48 struct iovec iov[]
    iovec: u64 iov_base (offset from the start of the shared map), u64 iov_len

response view written over it by the handler (a union: the request is gone once answered)::

    8  u8 scsi_status   9 u8 __pad1   10 u16 __pad2   12 u32 read_len   16 char sense[96]

A command entry is ``max(48 + 16 * n_iov, 112)`` bytes, then the CDB (``cdb_off`` points at it,
from the start of the shared map), the whole rounded up to 8.

TMR entry (``struct tcmu_tmr_entry``, packed, 32 bytes + 2 per id, rounded up to 8)::

    8  u8 tmr_type (TmrType)  9 u8 __pad1  10 u16 __pad2  12 u32 cmd_cnt
    16 u64 __pad3             24 u64 __pad4  32 u16 cmd_ids[cmd_cnt]

PAD entries are a bare header whose length reaches the end of the ring.
"""

from __future__ import annotations

import enum
import struct

TCMU_VERSION = "2.0"
MAILBOX_VERSION = 2
#: Size of the mailbox; the command ring starts right after it.
MAILBOX_SIZE = 128
CMDR_OFF = MAILBOX_SIZE
#: Every entry length and every head/tail position is a multiple of this.
ALIGN = 8
OP_MASK = 0x7
SENSE_BUFFERSIZE = 96
CMD_ID_MAX = 0xFFFF


class MailboxFlag(enum.IntFlag):
    CAP_OOOC = 1
    CAP_READ_LEN = 2
    CAP_TMR = 4
    CAP_KEEP_BUF = 8


class Opcode(enum.IntEnum):
    PAD = 0
    CMD = 1
    TMR = 2


class UFlag(enum.IntFlag):
    UNKNOWN_OP = 1
    READ_LEN = 2
    KEEP_BUF = 4


class TmrType(enum.IntEnum):
    UNKNOWN = 0
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    LUN_RESET_PRO = 128


# Plain ints for the hot path (IntFlag operators are Python calls).
_READ_LEN = int(UFlag.READ_LEN)
_UNKNOWN_OP = int(UFlag.UNKNOWN_OP)

#: SAM status bytes a handler may answer (the target rejects anything else).
SCSI_STATUSES = frozenset({0x00, 0x02, 0x04, 0x08, 0x18, 0x28, 0x30, 0x40})
STATUS_GOOD = 0x00
STATUS_CHECK_CONDITION = 0x02

#: Mailbox bytes 0..15: version, flags, cmdr_off, cmdr_size, cmd_head.
MAILBOX = struct.Struct("<HHIII")
MAILBOX_HEAD_OFF = 12
MAILBOX_TAIL_OFF = 64
U32 = struct.Struct("<I")
#: cmd_head and cmd_tail as mailbox words (see ``index_words``).
HEAD_WORD = MAILBOX_HEAD_OFF // 4
TAIL_WORD = MAILBOX_TAIL_OFF // 4
U16 = struct.Struct("<H")
#: Entry header at +0: len_op, cmd_id, kflags, uflags.
HDR = struct.Struct("<IHBB")
HDR_SIZE = HDR.size
CMD_ID_OFF = 4
UFLAGS_OFF = 7
#: Command request at +8: iov_cnt, iov_bidi_cnt, iov_dif_cnt, (hole), cdb_off, __pad1, __pad2.
REQ = struct.Struct("<III4xQ16x")
REQ_OFF = 8
IOV_OFF = 48
IOVEC = struct.Struct("<QQ")
#: Command response at +8: scsi_status, (pads), read_len; the sense buffer follows at +16.
RSP = struct.Struct("<B3xI")
RSP_OFF = 8
SENSE_OFF = 16
CMD_ENTRY_SIZE = 112
#: TMR entry at +8: tmr_type, (pads), cmd_cnt, (pads); cmd_ids at +32.
TMR = struct.Struct("<B3xI16x")
TMR_OFF = 8
TMR_IDS_OFF = 32

assert HDR_SIZE == 8
assert REQ_OFF + REQ.size == IOV_OFF
assert SENSE_OFF + SENSE_BUFFERSIZE == CMD_ENTRY_SIZE
assert TMR_OFF + TMR.size == TMR_IDS_OFF

#: Kernel's scsi_command_size_tbl: CDB length by opcode group (opcode >> 5).
_CDB_GROUP_LEN = (6, 10, 10, 12, 16, 12, 10, 10)
VARIABLE_LENGTH_CMD = 0x7F


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def cdb_length(cdb: bytes | memoryview) -> int:
    """The CDB length its first bytes imply (the kernel's ``scsi_command_size``)."""
    if cdb[0] == VARIABLE_LENGTH_CMD:
        if len(cdb) < 8:
            return 8
        return int(cdb[7]) + 8
    return _CDB_GROUP_LEN[(cdb[0] >> 5) & 7]


def cmd_base_size(n_iov: int) -> int:
    """Bytes of a command entry before its CDB: header, request and ``n_iov`` iovecs."""
    return align_up(max(IOV_OFF + IOVEC.size * n_iov, CMD_ENTRY_SIZE))


def cmd_entry_size(n_iov: int, cdb_len: int) -> int:
    """Length of a command entry with ``n_iov`` iovecs (all kinds) and a ``cdb_len``-byte CDB."""
    return align_up(cmd_base_size(n_iov) + cdb_len)


def tmr_entry_size(n_ids: int) -> int:
    return align_up(TMR_IDS_OFF + 2 * n_ids)


def make_len_op(length: int, op: int) -> int:
    if length & OP_MASK or not 0 <= length <= 0xFFFFFFFF:
        raise ValueError(f"entry length {length} is not a multiple of {ALIGN} in 32 bits")
    return length | (op & OP_MASK)


def len_op_length(len_op: int) -> int:
    return len_op & ~OP_MASK & 0xFFFFFFFF


def len_op_op(len_op: int) -> int:
    return len_op & OP_MASK


def set_len(len_op: int, length: int) -> int:
    """``tcmu_hdr_set_len``: replace the length, keep the opcode."""
    return (len_op & OP_MASK) | (length & ~OP_MASK & 0xFFFFFFFF)


def set_op(len_op: int, op: int) -> int:
    """``tcmu_hdr_set_op``: replace the opcode, keep the length."""
    return (len_op & ~OP_MASK & 0xFFFFFFFF) | (op & OP_MASK)


def index_words(ring: memoryview) -> memoryview:
    """The mailbox as native 32-bit words: ``words[HEAD_WORD]``, ``words[TAIL_WORD]``.

    cmd_head and cmd_tail are read by one process while the other stores them, so each access
    must be one aligned 4-byte load or store. ``struct.pack_into`` is not: it zero-fills its
    destination before writing the value, so the other side can read 0 (a handler once fetched
    "entries" from a head of 0 mid-ring), and "<" formats move a byte at a time. A memoryview
    item store is one fixed-size copy. Native byte order is the ABI's: the kernel's header
    declares host-endian __u32 fields, and both sides run on the same host.
    """
    return ring[:MAILBOX_SIZE].cast("I")


def pack_mailbox(buf: memoryview | bytearray, flags: int, cmdr_size: int) -> None:
    """Write a fresh mailbox (head and tail 0) into ``buf[0:128]``."""
    buf[0:MAILBOX_SIZE] = bytes(MAILBOX_SIZE)
    MAILBOX.pack_into(buf, 0, MAILBOX_VERSION, flags, CMDR_OFF, cmdr_size, 0)
    U32.pack_into(buf, MAILBOX_TAIL_OFF, 0)


def pack_cmd_entry(
    buf: memoryview | bytearray,
    pos: int,
    *,
    cmd_id: int,
    cdb: bytes,
    iovs: tuple[tuple[int, int], ...] | list[tuple[int, int]],
    bidi_iovs: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    dif_iovs: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
) -> int:
    """Encode a command entry at ``buf[pos:]`` and return its length.

    ``buf`` starts at offset 0 of the shared map (the mailbox), so ``pos`` is ``CMDR_OFF`` plus
    the ring position and ``cdb_off = pos + base``. The whole entry is zeroed first.
    """
    n_iov = len(iovs) + len(bidi_iovs) + len(dif_iovs)
    base = cmd_base_size(n_iov)
    length = align_up(base + len(cdb))
    buf[pos : pos + length] = bytes(length)
    HDR.pack_into(buf, pos, make_len_op(length, Opcode.CMD), cmd_id, 0, 0)
    REQ.pack_into(buf, pos + REQ_OFF, len(iovs), len(bidi_iovs), len(dif_iovs), pos + base)
    off = pos + IOV_OFF
    for group in (iovs, bidi_iovs, dif_iovs):
        for base_off, iov_len in group:
            IOVEC.pack_into(buf, off, base_off, iov_len)
            off += IOVEC.size
    buf[pos + base : pos + base + len(cdb)] = cdb
    return length


def pack_tmr_entry(
    buf: memoryview | bytearray, pos: int, tmr_type: int, cmd_ids: tuple[int, ...] | list[int]
) -> int:
    """Encode a TMR entry at ``buf[pos:]`` (zeroed first) and return its length."""
    length = tmr_entry_size(len(cmd_ids))
    buf[pos : pos + length] = bytes(length)
    HDR.pack_into(buf, pos, make_len_op(length, Opcode.TMR), 0, 0, 0)
    TMR.pack_into(buf, pos + TMR_OFF, tmr_type, len(cmd_ids))
    struct.pack_into(f"<{len(cmd_ids)}H", buf, pos + TMR_IDS_OFF, *cmd_ids)
    return length


def pack_pad_entry(buf: memoryview | bytearray, pos: int, length: int) -> None:
    """A PAD entry: a header of ``length`` (cmd_id 0, flags 0); its body is left alone."""
    HDR.pack_into(buf, pos, make_len_op(length, Opcode.PAD), 0, 0, 0)


def pack_response(
    buf: memoryview | bytearray,
    pos: int,
    *,
    cmd_id: int,
    status: int,
    sense: bytes = b"",
    read_len: int | None = None,
    unknown_op: bool = False,
) -> None:
    """Write a handler's answer into the command entry at ``buf[pos:]`` (len_op is kept)."""
    if len(sense) > SENSE_BUFFERSIZE:
        raise ValueError(f"sense of {len(sense)} bytes exceeds {SENSE_BUFFERSIZE}")
    uflags = 0
    if read_len is not None:
        uflags |= _READ_LEN
    if unknown_op:
        uflags |= _UNKNOWN_OP
    U16.pack_into(buf, pos + CMD_ID_OFF, cmd_id)
    buf[pos + UFLAGS_OFF] = uflags
    RSP.pack_into(buf, pos + RSP_OFF, status, read_len or 0)
    start = pos + SENSE_OFF
    buf[start : start + SENSE_BUFFERSIZE] = sense + bytes(SENSE_BUFFERSIZE - len(sense))


def sense_length(sense: bytes | memoryview) -> int | None:
    """Bytes a sense buffer claims (8 + ADDITIONAL SENSE LENGTH), or None if not sense data.

    Fixed (70h/71h) and descriptor (72h/73h) formats both keep the additional length in byte 7.
    """
    if len(sense) < 8 or (sense[0] & 0x7F) not in (0x70, 0x71, 0x72, 0x73):
        return None
    return 8 + int(sense[7])
