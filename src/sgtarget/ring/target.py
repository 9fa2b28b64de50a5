"""The kernel's side of one TCMU command ring: submit commands and TMRs, reap completions.

sgtarget plays the part of target_core_user.c. ``submit`` writes one command entry (header,
iovecs, CDB) at ``cmd_head``, inserting a PAD entry first when the entry would not fit before the
end of the ring, then publishes the new ``cmd_head``; ``reap`` reads the handler's ``cmd_tail``
and turns every command entry the tail passed into a ``Completion``. Neither rings a doorbell:
the caller does (after ``submit``, the kick; the done doorbell wakes it to ``reap``).

The handler is assumed malicious (the kernel header says so). The target keeps its own record
of every entry it wrote (position, length, opcode, cmd_id) and of every command's CDB and iovecs,
so entry lengths and iovecs are never read back from the ring. ``reap`` reads ``cmd_tail`` once
and accepts it only on an entry boundary between its last reaped position and ``cmd_head``; for
each command entry passed it reads only cmd_id (in flight, not twice in one batch), uflags
(known bits), the status (a SAM status), read_len (at most the bytes submitted for data-in) and,
for CHECK CONDITION, the sense its own header sizes (at most 96 bytes). Anything else breaks the
ring: ``RingBroken`` is raised (and logged once) now and on every later call, and the caller
fails the commands ``inflight()`` still lists. A rewritten len_op or iovec is simply never read.

Free space is counted against the last reaped position, as the kernel counts against
``cmdr_last_cleaned``: used = (head - reaped) mod size, free = size - used - 1. An entry larger
than half the ring is refused outright (``ValueError``), as the kernel refuses it, so an entry
that is refused with ``RingFull`` always fits once the ring drains.

Threading: a RingTarget belongs to one thread (the target's event loop); nothing is locked.
Memory ordering: entries are stored before ``cmd_head`` and, on the handler's side, responses
before ``cmd_tail``; x86-64 (TSO) makes stores through a shared mapping visible in program order,
and the eventfd write that follows is a system call, a full barrier.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from sgtarget.ring import abi
from sgtarget.ring.abi import MailboxFlag, Opcode, UFlag

log = logging.getLogger(__name__)

_MIN_CMDR_SIZE = 256
_U64_MAX = (1 << 64) - 1
# Plain ints on the hot path: IntFlag arithmetic costs a Python call per operator.
_UNKNOWN_OP = int(UFlag.UNKNOWN_OP)
_READ_LEN = int(UFlag.READ_LEN)

Iovecs = tuple[tuple[int, int], ...]


class RingFull(Exception):
    """No room in the command ring (or no free cmd_id) now: queue and retry after ``reap``."""


class RingBroken(Exception):
    """The handler broke the ABI; ``str()`` says how. The ring is unusable from now on."""


@dataclass(frozen=True, slots=True)
class Completion:
    cmd_id: int
    #: SAM status byte as the handler set it (validated); CHECK CONDITION for ``unknown_op``.
    status: int
    #: b"" unless CHECK CONDITION; validated fixed or descriptor sense, at most 96 bytes.
    sense: bytes
    #: With UFlag.READ_LEN (validated <= the data-in bytes submitted), else None.
    read_len: int | None
    #: UFlag.UNKNOWN_OP: the handler does not know the CDB (its status and sense are ignored).
    unknown_op: bool


@dataclass(slots=True)
class RingStats:
    submitted: int = 0
    completed: int = 0
    pads: int = 0
    tmrs: int = 0
    #: Why the ring broke, once it has.
    broken: str | None = None


@dataclass(frozen=True, slots=True)
class _Sent:
    cdb: bytes
    iovs: Iovecs
    bidi_iovs: Iovecs
    dif_iovs: Iovecs
    #: Bytes of data-in buffer: read_len may not exceed it.
    read_limit: int


def _iovecs(iovs: Sequence[tuple[int, int]]) -> Iovecs:
    out = tuple((int(base), int(length)) for base, length in iovs)
    for base, length in out:
        if not (0 <= base <= _U64_MAX and 0 <= length <= _U64_MAX):
            raise ValueError(f"iovec ({base}, {length}) out of range")
    return out


class RingTarget:
    """The target's side of the ring in ``ring[0:data_off]`` (mailbox at 0, ring at 128)."""

    __slots__ = (
        "_entries",
        "_free_ids",
        "_head",
        "_inflight",
        "_reaped",
        "_ring",
        "_uflags",
        "_words",
        "cmdr_size",
        "flags",
        "stats",
    )

    def __init__(
        self,
        ring: memoryview,
        *,
        data_off: int,
        flags: int = MailboxFlag.CAP_OOOC | MailboxFlag.CAP_READ_LEN | MailboxFlag.CAP_TMR,
    ) -> None:
        cmdr_size = data_off - abi.MAILBOX_SIZE
        if cmdr_size < _MIN_CMDR_SIZE or cmdr_size % abi.ALIGN:
            raise ValueError(
                f"command ring of {cmdr_size} bytes: need a multiple of {abi.ALIGN}"
                f" of at least {_MIN_CMDR_SIZE}"
            )
        if len(ring) < data_off:
            raise ValueError(f"ring region of {len(ring)} bytes is shorter than data_off")
        if flags & ~0xF:
            raise ValueError(f"unknown mailbox flags {flags:#x}")
        if flags & MailboxFlag.CAP_KEEP_BUF:
            raise ValueError("KEEP_BUF is not supported: there is no channel to release buffers")
        if not flags & MailboxFlag.CAP_OOOC:
            raise ValueError("the ring requires OOOC (out-of-order completion)")
        self._ring = ring[:data_off]
        self.cmdr_size = cmdr_size
        self.flags = MailboxFlag(flags)
        #: uflags a handler may set: READ_LEN only if it was offered.
        self._uflags = _UNKNOWN_OP | (_READ_LEN if flags & MailboxFlag.CAP_READ_LEN else 0)
        abi.pack_mailbox(self._ring, int(flags), cmdr_size)
        self._words = abi.index_words(self._ring)
        self._head = 0
        #: Ring position up to which completions were reaped (the kernel's cmdr_last_cleaned).
        self._reaped = 0
        #: (position, length, opcode, cmd_id) of every entry written and not yet reaped.
        self._entries: deque[tuple[int, int, int, int]] = deque()
        # FIFO reuse: an id comes back as late as possible, which makes stale ids stand out.
        self._free_ids: deque[int] = deque(range(1, abi.CMD_ID_MAX + 1))
        self._inflight: dict[int, _Sent] = {}
        self.stats = RingStats()

    # -- space -------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Bytes of the ring an entry (plus its PAD) may use now."""
        used = (self._head - self._reaped) % self.cmdr_size
        return self.cmdr_size - used - 1

    def _reserve(self, length: int) -> int:
        """Room for a ``length``-byte entry: insert a PAD if needed, return the position."""
        if length > self.cmdr_size // 2:
            raise ValueError(f"a {length}-byte entry exceeds half the {self.cmdr_size}-byte ring")
        to_end = self.cmdr_size - self._head
        need = length if to_end >= length else length + to_end
        if need > self.free:
            raise RingFull(f"{need} bytes needed, {self.free} free")
        if to_end < length:
            abi.pack_pad_entry(self._ring, abi.CMDR_OFF + self._head, to_end)
            self._entries.append((self._head, to_end, Opcode.PAD, 0))
            self.stats.pads += 1
            self._head = 0
        return self._head

    def _publish(self, pos: int, length: int) -> None:
        self._head = (pos + length) % self.cmdr_size
        self._words[abi.HEAD_WORD] = self._head

    # -- submit ------------------------------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        iovs: Sequence[tuple[int, int]],
        *,
        bidi_iovs: Sequence[tuple[int, int]] = (),
        dif_iovs: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Write one command entry; return its cmd_id. ``RingFull`` if it does not fit now."""
        self._check()
        cdb = bytes(cdb)
        if not cdb or len(cdb) != abi.cdb_length(cdb):
            raise ValueError(f"a {len(cdb)}-byte CDB does not match its opcode's length")
        data, bidi, dif = _iovecs(iovs), _iovecs(bidi_iovs), _iovecs(dif_iovs)
        length = abi.cmd_entry_size(len(data) + len(bidi) + len(dif), len(cdb))
        if not self._free_ids:
            raise RingFull("every cmd_id is in flight")
        pos = self._reserve(length)
        cmd_id = self._free_ids.popleft()
        abi.pack_cmd_entry(
            self._ring,
            abi.CMDR_OFF + pos,
            cmd_id=cmd_id,
            cdb=cdb,
            iovs=data,
            bidi_iovs=bidi,
            dif_iovs=dif,
        )
        read_limit = sum(n for _, n in (bidi if bidi else data))
        self._inflight[cmd_id] = _Sent(cdb, data, bidi, dif, read_limit)
        self._entries.append((pos, length, Opcode.CMD, cmd_id))
        self._publish(pos, length)
        self.stats.submitted += 1
        return cmd_id

    def submit_tmr(self, tmr_type: int, cmd_ids: Sequence[int]) -> None:
        """Tell the handler about a task management function (no answer comes back)."""
        self._check()
        if not self.flags & MailboxFlag.CAP_TMR:
            raise ValueError("the ring was set up without CAP_TMR")
        ids = tuple(int(i) for i in cmd_ids)
        if not 0 <= tmr_type <= 0xFF or any(not 0 <= i <= abi.CMD_ID_MAX for i in ids):
            raise ValueError("TMR type or cmd_id out of range")
        length = abi.tmr_entry_size(len(ids))
        pos = self._reserve(length)
        abi.pack_tmr_entry(self._ring, abi.CMDR_OFF + pos, tmr_type, ids)
        self._entries.append((pos, length, Opcode.TMR, 0))
        self._publish(pos, length)
        self.stats.tmrs += 1

    # -- reap --------------------------------------------------------------------------------

    def reap(self) -> list[Completion]:
        """Completions for every command entry the handler's cmd_tail has passed."""
        self._check()
        tail: int = self._words[abi.TAIL_WORD]
        if tail == self._reaped:
            return []
        if tail >= self.cmdr_size or tail % abi.ALIGN:
            self._break(f"cmd_tail {tail} is outside the ring or not {abi.ALIGN}-aligned")
        # Where the tail landed, from our own records, before reading a byte of any entry.
        passed = 0
        for pos, _length, _op, _cmd_id in self._entries:
            if pos == tail:
                break
            passed += 1
        else:
            if tail != self._head:
                self._break(
                    f"cmd_tail {tail} is not an entry boundary between"
                    f" {self._reaped} and cmd_head {self._head}"
                )
        done: list[Completion] = []
        seen: set[int] = set()
        for pos, _length, op, _cmd_id in itertools.islice(self._entries, passed):
            if op == Opcode.CMD:
                done.append(self._completion(pos, seen))
        for _ in range(passed):
            self._entries.popleft()
        for c in done:
            del self._inflight[c.cmd_id]
            self._free_ids.append(c.cmd_id)
        self._reaped = tail
        self.stats.completed += len(done)
        return done

    def _completion(self, pos: int, seen: set[int]) -> Completion:
        """Read and check the response in the command entry at ring position ``pos``."""
        ring = self._ring
        off = abi.CMDR_OFF + pos
        cmd_id = abi.U16.unpack_from(ring, off + abi.CMD_ID_OFF)[0]
        sent = self._inflight.get(cmd_id)
        if sent is None:
            self._break(f"completion at {pos} for cmd_id {cmd_id}, which is not in flight")
        if cmd_id in seen:
            self._break(f"cmd_id {cmd_id} completed twice")
        seen.add(cmd_id)
        uflags = ring[off + abi.UFLAGS_OFF]
        if uflags & ~self._uflags:
            self._break(f"cmd_id {cmd_id}: unknown uflags {uflags:#x}")
        if uflags & _UNKNOWN_OP:
            return Completion(cmd_id, abi.STATUS_CHECK_CONDITION, b"", None, True)
        status, read_len = abi.RSP.unpack_from(ring, off + abi.RSP_OFF)
        if status not in abi.SCSI_STATUSES:
            self._break(f"cmd_id {cmd_id}: invalid SCSI status {status:#04x}")
        length: int | None = None
        if uflags & _READ_LEN:
            if read_len > sent.read_limit:
                self._break(
                    f"cmd_id {cmd_id}: read_len {read_len} exceeds the"
                    f" {sent.read_limit} bytes submitted"
                )
            length = read_len
        sense = b""
        if status == abi.STATUS_CHECK_CONDITION:
            start = off + abi.SENSE_OFF
            raw = bytes(ring[start : start + abi.SENSE_BUFFERSIZE])
            claimed = abi.sense_length(raw)
            if claimed is None:
                self._break(f"cmd_id {cmd_id}: CHECK CONDITION without sense data")
            if claimed > abi.SENSE_BUFFERSIZE:
                self._break(
                    f"cmd_id {cmd_id}: sense claims {claimed} bytes,"
                    f" the buffer holds {abi.SENSE_BUFFERSIZE}"
                )
            sense = raw[:claimed]
        return Completion(cmd_id, status, sense, length, False)

    # -- state -------------------------------------------------------------------------------

    def inflight(self) -> list[int]:
        """cmd_ids submitted and not reaped (after ``RingBroken``: the commands to fail)."""
        return list(self._inflight)

    def submitted(self, cmd_id: int) -> tuple[bytes, Iovecs]:
        """The CDB and data iovecs recorded at submit (``KeyError`` if not in flight)."""
        sent = self._inflight[cmd_id]
        return sent.cdb, sent.iovs

    def _check(self) -> None:
        if self.stats.broken is not None:
            raise RingBroken(self.stats.broken)

    def _break(self, reason: str) -> NoReturn:
        if self.stats.broken is None:
            self.stats.broken = reason
            log.error("command ring broken by its handler: %s", reason)
        raise RingBroken(reason)
