"""The handler's side of one TCMU command ring: fetch requests, complete them out of order.

``fetch`` reads ``cmd_head`` and parses every entry between its own fetch position and the head,
copying each request out of the ring (cmd_id, CDB, iovecs) — a *snapshot*: with out-of-order
completion (OOOC) the response of any command is written into whichever command entry sits at
``cmd_tail``, overwriting that entry's request. PAD entries are skipped; TMR entries come back as
``TmrNotice``. ``complete`` writes a response at ``cmd_tail`` (skipping PAD and TMR entries
there), rewriting hdr.cmd_id, the status, read_len (+ UFlag.READ_LEN), the sense buffer and
UFlag.UNKNOWN_OP, then advances ``cmd_tail`` past it and past any PAD/TMR entries that follow
within what was fetched, so a trailing PAD never holds ring space hostage. ``fetch`` advances
the tail over PAD/TMR entries at the tail in the same way; ring the done doorbell after a fetch
that returned a ``TmrNotice`` so the target sees that space come back.

The target is trusted less than blindly: the mailbox is checked once (version 2, cmdr_off 128,
cmdr_size a multiple of 8 that fits), ``cmd_head`` on every fetch, and every entry's length,
opcode, iovec count and CDB position must stay inside the entry and before ``cmd_head``;
anything else raises ``RingCorrupt`` and nothing is read outside the ring. The tail walk of
``complete`` uses the entry lengths recorded at fetch, never lengths re-read from the ring.

A UserRing expects a fresh ring (``cmd_tail == cmd_head``, or entries never answered): it starts
fetching at ``cmd_tail``. After OOOC completions the entries between tail and head no longer
match the commands in flight, so a restarted handler must be given a new ring, not the old one.

Threading: ``fetch`` and ``complete`` are not thread-safe; callers serialise them. Neither
rings a doorbell. Memory ordering: a response is stored before ``cmd_tail``; on x86-64 (TSO)
stores through the mapping become visible in program order, and the doorbell (an eventfd write,
a system call and full barrier) is rung after the tail store.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from sgtarget.ring import abi
from sgtarget.ring.abi import Opcode

Iovecs = tuple[tuple[int, int], ...]


class RingCorrupt(Exception):
    """The target's side of the ring holds something the ABI does not allow; ``str()`` says what."""


@dataclass(frozen=True, slots=True)
class Request:
    cmd_id: int
    cdb: bytes
    iovs: Iovecs
    bidi_iovs: Iovecs
    dif_iovs: Iovecs


@dataclass(frozen=True, slots=True)
class TmrNotice:
    tmr_type: int
    cmd_ids: tuple[int, ...]


class UserRing:
    """The handler's view of the ring in ``ring`` (the shared map from offset 0)."""

    __slots__ = (
        "_entries",
        "_fetch",
        "_pending",
        "_ring",
        "_tail",
        "_words",
        "cmdr_size",
        "flags",
    )

    def __init__(self, ring: memoryview) -> None:
        if len(ring) < abi.MAILBOX_SIZE:
            raise RingCorrupt(f"a {len(ring)}-byte region cannot hold the mailbox")
        version, flags, cmdr_off, cmdr_size, _head = abi.MAILBOX.unpack_from(ring, 0)
        if version != abi.MAILBOX_VERSION:
            raise RingCorrupt(f"mailbox version {version}, expected {abi.MAILBOX_VERSION}")
        if cmdr_off != abi.CMDR_OFF:
            raise RingCorrupt(f"cmdr_off {cmdr_off}, expected {abi.CMDR_OFF}")
        if cmdr_size < abi.CMD_ENTRY_SIZE or cmdr_size % abi.ALIGN:
            raise RingCorrupt(f"cmdr_size {cmdr_size} is too small or not {abi.ALIGN}-aligned")
        if cmdr_off + cmdr_size > len(ring):
            raise RingCorrupt(f"cmdr_size {cmdr_size} runs past the {len(ring)}-byte mapping")
        self._ring = ring[: cmdr_off + cmdr_size]
        self._words = abi.index_words(self._ring)
        self.flags = abi.MailboxFlag(flags)
        self.cmdr_size = cmdr_size
        self._tail = self._position(abi.MAILBOX_TAIL_OFF, "cmd_tail")
        self._fetch = self._tail
        #: (position, length, opcode) of every entry fetched and not yet passed by the tail.
        self._entries: deque[tuple[int, int, int]] = deque()
        self._pending: set[int] = set()

    def _position(self, mailbox_off: int, name: str) -> int:
        pos: int = self._words[mailbox_off // 4]
        if pos >= self.cmdr_size or pos % abi.ALIGN:
            raise RingCorrupt(f"{name} {pos} is outside the ring or not {abi.ALIGN}-aligned")
        return pos

    # -- fetch -------------------------------------------------------------------------------

    def fetch(self) -> list[Request | TmrNotice]:
        """Snapshots of the entries the target published since the last fetch."""
        head = self._position(abi.MAILBOX_HEAD_OFF, "cmd_head")
        out: list[Request | TmrNotice] = []
        pos = self._fetch
        size = self.cmdr_size
        while pos != head:
            off = abi.CMDR_OFF + pos
            len_op: int = abi.U32.unpack_from(self._ring, off)[0]
            length, op = abi.len_op_length(len_op), abi.len_op_op(len_op)
            if length < abi.HDR_SIZE or pos + length > size or length > (head - pos) % size:
                raise RingCorrupt(
                    f"entry at {pos}: length {length} runs past the ring or cmd_head {head}"
                )
            if op == Opcode.CMD:
                req = self._parse_cmd(off, length)
                if req.cmd_id in self._pending:
                    raise RingCorrupt(f"entry at {pos}: cmd_id {req.cmd_id} is already in flight")
                self._pending.add(req.cmd_id)
                out.append(req)
            elif op == Opcode.TMR:
                out.append(self._parse_tmr(off, length))
            elif op != Opcode.PAD:
                raise RingCorrupt(f"entry at {pos}: unknown opcode {op}")
            self._entries.append((pos, length, op))
            pos = (pos + length) % size
            self._fetch = pos
        if self._skip_tail():
            self._store_tail()
        return out

    def _parse_cmd(self, off: int, length: int) -> Request:
        ring = self._ring
        cmd_id = abi.U16.unpack_from(ring, off + abi.CMD_ID_OFF)[0]
        if length < abi.CMD_ENTRY_SIZE:
            raise RingCorrupt(f"cmd_id {cmd_id}: a {length}-byte command entry")
        n_data, n_bidi, n_dif, cdb_off = abi.REQ.unpack_from(ring, off + abi.REQ_OFF)
        n_iov = n_data + n_bidi + n_dif
        iov_end = off + abi.IOV_OFF + abi.IOVEC.size * n_iov
        end = off + length
        if iov_end > end:
            raise RingCorrupt(f"cmd_id {cmd_id}: {n_iov} iovecs overflow a {length}-byte entry")
        if not iov_end <= cdb_off < end:
            raise RingCorrupt(f"cmd_id {cmd_id}: cdb_off {cdb_off} is outside its entry")
        if ring[cdb_off] == abi.VARIABLE_LENGTH_CMD and cdb_off + 8 > end:
            raise RingCorrupt(f"cmd_id {cmd_id}: variable-length CDB header overflows the entry")
        cdb_len = abi.cdb_length(ring[cdb_off : min(end, cdb_off + 8)])
        if cdb_off + cdb_len > end:
            raise RingCorrupt(f"cmd_id {cmd_id}: a {cdb_len}-byte CDB overflows its entry")
        flat = struct.unpack_from(f"<{2 * n_iov}Q", ring, off + abi.IOV_OFF)
        iovs = tuple(zip(flat[0::2], flat[1::2], strict=True))
        return Request(
            cmd_id,
            bytes(ring[cdb_off : cdb_off + cdb_len]),
            iovs[:n_data],
            iovs[n_data : n_data + n_bidi],
            iovs[n_data + n_bidi :],
        )

    def _parse_tmr(self, off: int, length: int) -> TmrNotice:
        if length < abi.TMR_IDS_OFF:
            raise RingCorrupt(f"a {length}-byte TMR entry")
        tmr_type, count = abi.TMR.unpack_from(self._ring, off + abi.TMR_OFF)
        if abi.TMR_IDS_OFF + 2 * count > length:
            raise RingCorrupt(f"TMR of {count} cmd_ids overflows a {length}-byte entry")
        ids = struct.unpack_from(f"<{count}H", self._ring, off + abi.TMR_IDS_OFF)
        return TmrNotice(tmr_type, ids)

    # -- complete ----------------------------------------------------------------------------

    def complete(
        self,
        cmd_id: int,
        status: int,
        sense: bytes = b"",
        *,
        read_len: int | None = None,
        unknown_op: bool = False,
    ) -> None:
        """Answer fetched command ``cmd_id`` in the command entry at ``cmd_tail``."""
        if cmd_id not in self._pending:
            raise ValueError(f"cmd_id {cmd_id} was not fetched or is already complete")
        if not 0 <= status <= 0xFF:
            raise ValueError(f"status {status} is not a byte")
        if len(sense) > abi.SENSE_BUFFERSIZE:
            raise ValueError(f"sense of {len(sense)} bytes exceeds {abi.SENSE_BUFFERSIZE}")
        if read_len is not None and not 0 <= read_len <= 0xFFFFFFFF:
            raise ValueError(f"read_len {read_len} out of range")
        self._skip_tail()
        # Each pending command left one unanswered CMD entry in [tail, fetch): one is at the tail.
        pos, length, op = self._entries[0]
        if op != Opcode.CMD:  # cannot happen: see above
            raise RuntimeError(f"no command entry at cmd_tail {pos}")
        off = abi.CMDR_OFF + pos
        abi.U32.pack_into(self._ring, off, abi.make_len_op(length, Opcode.CMD))
        abi.pack_response(
            self._ring,
            off,
            cmd_id=cmd_id,
            status=status,
            sense=bytes(sense),
            read_len=read_len,
            unknown_op=unknown_op,
        )
        self._entries.popleft()
        self._pending.discard(cmd_id)
        self._tail = (pos + length) % self.cmdr_size
        self._skip_tail()
        self._store_tail()

    def _skip_tail(self) -> bool:
        """Move the tail over fetched PAD/TMR entries at its front; True if it moved."""
        moved = False
        entries = self._entries
        while entries and entries[0][2] != Opcode.CMD:
            pos, length, _ = entries.popleft()
            self._tail = (pos + length) % self.cmdr_size
            moved = True
        return moved

    def _store_tail(self) -> None:
        self._words[abi.TAIL_WORD] = self._tail

    def pending(self) -> int:
        """Commands fetched and not yet completed."""
        return len(self._pending)
