"""One iSCSI connection, target side, without I/O.

The adapter feeds received bytes the zero-copy way: ``get_buffer()`` says where the next bytes
must land (a header buffer, or the pool blocks of the command the data belongs to) and
``buffer_updated(n)`` says how many arrived. What the connection wants done comes back as events
from ``next_event()``; what it wants sent comes back from ``take_output()`` as a list of buffers
(headers as ``bytes``, payload as pool ``memoryview``s, never joined) plus the scatter lists to
release once those buffers have been written.

Time is passed in (``handle_timer(now)``) as in aioquic, so NOP-In pings are testable.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from sgtarget.datapath import BytesLike, Pool, PoolExhausted, ScatterList
from sgtarget.iscsi import pdu
from sgtarget.iscsi.conn_states import LEGAL_OPCODES, ConnEvent, ConnState, transition
from sgtarget.iscsi.digest import digest, digest_of
from sgtarget.iscsi.keys import (
    NegotiationError,
    Negotiator,
    OperationalParams,
    SessionType,
    TargetLimits,
    TextFormatError,
    encode_text,
    parse_text,
    send_targets_response,
)
from sgtarget.iscsi.login_states import Stage, next_stage
from sgtarget.iscsi.pdu import F_FINAL, Header, Opcode, PduFormatError, RejectReason
from sgtarget.iscsi.session import (
    DEFAULT_QUEUE_DEPTH,
    Command,
    Session,
    SessionTable,
    TargetDirectory,
    WriteState,
)
from sgtarget.scsi.constants import Asc, SenseKey, Status
from sgtarget.scsi.sense import SenseData
from sgtarget.scsi.task import DataDirection, Nexus

log = logging.getLogger(__name__)

#: Packs a whole BHS as bytes (no AHS, so the AHS/DSL word is the data length): the PDUs of
#: every command are built with it, without ``pdu.build``'s keywords and bytearray copy.
_BHS_PACK = pdu.BHS.pack

#: Login PDUs carry at most this much text (RFC 7143: 8192 until MRDSL is negotiated).
LOGIN_MAX_DATA = 8192
#: Largest text a Text/Login exchange may accumulate over continued PDUs.
MAX_TEXT = 64 * 1024
_SINK_SIZE = 64 * 1024


# ---- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class LoginComplete:
    session: Session


@dataclass(slots=True)
class CommandReady:
    """A SCSI command whose turn has come (CmdSN order): execute ``command.task``."""

    command: Command


@dataclass(slots=True)
class DataReady:
    """The Data-Out window a ``request_data`` call waited for has fully arrived."""

    command: Command
    sg: ScatterList


@dataclass(slots=True)
class MemoryWanted:
    """Immediate data found the pool full: pause reading, wait for ``blocks`` to be freed
    (bounded), then call ``retry_rx``."""

    blocks: int


@dataclass(slots=True)
class DataFailed:
    """The Data-Out a ``request_data`` call waited for will not come (see ``_fail_data``)."""

    command: Command


@dataclass(slots=True)
class TmfRequest:
    """A task management request. The adapter aborts ``commands`` (and, for resets, those of
    other sessions), resets the SCSI target as needed, then calls ``tmf_done``."""

    itt: int
    function: int
    lun: bytes
    commands: list[Command]


@dataclass(slots=True)
class CloseConnection:
    reason: str


@dataclass(slots=True)
class SessionReinstated:
    """A new login from the same I_T nexus replaced ``old``: close its connection."""

    old: Session


Event = (
    LoginComplete
    | CommandReady
    | DataReady
    | DataFailed
    | MemoryWanted
    | TmfRequest
    | CloseConnection
    | SessionReinstated
)
_ImmediateData = tuple[ScatterList | None, int]
_NO_IMMEDIATE: _ImmediateData = (None, 0)

# Enum members the per-PDU paths compare with, bound once (a member lookup costs a call).
_SCSI_COMMAND = Opcode.SCSI_COMMAND
_CLOSED = ConnState.CLOSED
_FULL_FEATURE = ConnState.FULL_FEATURE
_GOOD = Status.GOOD
_TASK_SET_FULL = Status.TASK_SET_FULL
_DATA_OUT = Opcode.DATA_OUT
_DIRECTIONS = tuple(DataDirection(i) for i in range(4))


class CommandAborted(Exception):
    """The command was aborted (task management or connection loss) while it waited."""


class UnsolicitedDropped(PoolExhausted):
    """The command's unsolicited data found even the pool's reserve empty and was dropped.

    Waiting cannot help (the bytes are gone): the command ends with TASK SET FULL, nothing
    executed, and the initiator retries it.
    """


class _RxPhase:
    BHS = 0
    AHS = 1
    DATA = 2
    TRAILER = 3


class Connection:
    """The target side of one iSCSI connection."""

    def __init__(
        self,
        *,
        pool: Pool,
        targets: TargetDirectory,
        sessions: SessionTable,
        limits: TargetLimits | None = None,
        portal_tpgt: int = 1,
        nop_interval: float | None = 30.0,
        nop_timeout: float = 15.0,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
    ) -> None:
        self.pool = pool
        self.targets = targets
        self.sessions = sessions
        self.limits = limits or TargetLimits()
        self.tpgt = portal_tpgt
        #: Commands a session may have in flight (its CmdSN window).
        self.queue_depth = queue_depth
        self.state = ConnState.LOGIN
        self.session: Session | None = None
        self.params: OperationalParams | None = None
        self.cid = 0
        self.statsn = 0
        self._events: deque[Event] = deque()
        self._out: list[BytesLike] = []
        self._out_release: list[ScatterList] = []
        # Digests and segment limits apply from the first PDU after the login.
        self._header_digest = False
        self._data_digest = False
        self._max_recv = LOGIN_MAX_DATA
        self._max_xmit = LOGIN_MAX_DATA
        # Login state.
        self._login_stage: Stage | None = None
        self._negotiator = Negotiator(self.limits)
        self._login_isid = b""
        self._login_itt: int | None = None
        self._login_text = bytearray()
        self._tpgt_sent = False
        self._text_buf = bytearray()
        # Receive state: phase, header buffer, where the current data segment goes.
        self._phase = _RxPhase.BHS
        self._hbuf = bytearray(pdu.BHS_LEN + 1020 + pdu.DIGEST_LEN)
        self._hview = memoryview(self._hbuf)
        self._hneed = pdu.BHS_LEN
        self._hhave = 0
        self._hdr: Header | None = None
        self._dest: list[memoryview] = []
        self._dest_idx = 0
        self._dest_pos = 0
        self._dest_cmd: Command | None = None
        self._data_views: list[memoryview] = []
        self._small = bytearray()
        #: Where discarded data segments go; allocated the first time something is discarded.
        self._sink: bytearray | None = None
        self._trailer = bytearray(8)
        self._trailer_need = 0
        self._trailer_have = 0
        self._discard = False
        self._discard_reason: RejectReason | None = None
        # Commands waiting for an earlier CmdSN: cmdsn -> (header, payload)
        self._deferred: dict[int, tuple[Header, _ImmediateData | bytes]] = {}
        # A SCSI Command whose immediate data waits for pool memory (reading is paused).
        self._rx_blocked: Header | None = None
        self._give_up_memory = False
        self._backlog = b""
        # Immediate data of the SCSI Command being received, and its unsolicited total.
        self._pending_rx: _ImmediateData = (None, 0)
        self._rx_landed = 0
        #: Interned 8-byte LUN fields, so commands share one object per LUN.
        self._luns: dict[bytes, bytes] = {}
        #: The last PDU had no data segment: more like it are probably queued (a burst of
        #: READs), worth ``headers_ahead``; after a WRITE's data they are probably not.
        self.headers_only = False
        # Target-initiated NOP-In pings.
        self._nop_interval = nop_interval
        self._nop_timeout = nop_timeout
        self._nop_ttt = 0x10000
        self._nop_outstanding: int | None = None
        self._nop_deadline: float | None = None
        self._last_rx = 0.0
        self._next_ttt = 1

    # ---- public API: bytes in ----------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes must be written (never empty)."""
        if self._phase in (_RxPhase.BHS, _RxPhase.AHS):
            return self._hview[self._hhave : self._hneed]
        if self._phase == _RxPhase.DATA:
            view = self._dest[self._dest_idx]
            return view[self._dest_pos :]
        return memoryview(self._trailer)[self._trailer_have : self._trailer_need]

    def headers_ahead(self, buf: BytesLike) -> int:
        """How many leading bytes of ``buf`` (bytes still to come) are whole PDUs without an
        AHS or a data segment, which ``receive_data`` can take in one go; 0 unless this
        connection is in full feature phase and between PDUs.

        The adapter peeks at its socket and reads that many at once: every READ command is
        such a PDU, and they arrive in bursts (issue 7). Nothing else is read that way, so
        data segments still land in pool blocks directly.
        """
        if self.state is not _FULL_FEATURE or self._phase != _RxPhase.BHS or self._hhave:
            return 0
        if self._rx_blocked is not None or self._backlog:
            return 0
        step = pdu.BHS_LEN + (pdu.DIGEST_LEN if self._header_digest else 0)
        view = memoryview(buf)
        pos = 0
        while pos + step <= len(view) and not any(view[pos + 4 : pos + 8]):
            pos += step
        return pos

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last buffer ``get_buffer`` returned."""
        if self.state is _CLOSED or nbytes <= 0:
            return
        try:
            self._advance(nbytes)
        except PduFormatError as exc:
            log.warning("protocol error from initiator: %s", exc)
            self._reject_and_close(exc.reason, self._hdr)

    def receive_data(self, data: bytes) -> None:
        """Convenience for tests and non-buffered transports: copies ``data`` in.

        Bytes that arrive while reading is blocked wait in a backlog until ``retry_rx``.
        """
        self._backlog += data
        view = memoryview(self._backlog)
        while view and self.state is not ConnState.CLOSED and self._rx_blocked is None:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
        self._backlog = bytes(view) if self._rx_blocked is not None else b""

    def _windows_filling(self) -> bool:
        """Whether a command of this connection holds blocks waiting for more Data-Out.

        Pausing the read would then keep those blocks from ever filling (and freeing): the
        immediate data is dropped at once instead (TASK SET FULL).
        """
        session = self.session
        if session is None:
            return False
        for cmd in session.commands.values():
            wr = cmd.wr
            if wr is not None and wr.rx_sg is not None and wr.rx_have < wr.rx_len:
                return True
        return False

    @property
    def receiving_data(self) -> bool:
        """In the middle of a PDU's data segment (or its padding and digest)."""
        return self._phase >= _RxPhase.DATA  # DATA or TRAILER

    @property
    def reading_blocked(self) -> bool:
        """True while the adapter must not read: immediate data waits for pool memory."""
        return self._rx_blocked is not None

    def retry_rx(self, *, give_up: bool) -> None:
        """Memory may have been freed (or the adapter waited long enough: ``give_up``).

        Routes the blocked PDU's immediate data again: into pool blocks if it now fits,
        else (``give_up``) to the sink, its command then ending with TASK SET FULL.
        """
        hdr = self._rx_blocked
        if hdr is None:
            return
        self._rx_blocked = None
        self._give_up_memory = give_up
        try:
            self._route_immediate(hdr)
        except PduFormatError as exc:
            self._reject_and_close(exc.reason, hdr)
        finally:
            self._give_up_memory = False
        if self._backlog and self._rx_blocked is None:
            self.receive_data(b"")

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_output(self) -> tuple[list[BytesLike], list[ScatterList]]:
        """Buffers to write in order, and scatter lists to release once they are written."""
        out, rel = self._out, self._out_release
        self._out, self._out_release = [], []
        return out, rel

    def connection_lost(self) -> None:
        """The transport is gone: drop everything this connection holds."""
        if self.state is ConnState.CLOSED and self.session is None:
            return
        self.state = transition(self.state, ConnEvent.TRANSPORT_CLOSED)
        # Immediate data of a command still being received belongs to nobody yet.
        _release_payload(self._pending_rx)
        self._pending_rx = (None, 0)
        self._release_commands()
        session, self.session = self.session, None
        if session is not None:
            self.sessions.remove(session)
        for sg in self._out_release:
            sg.release()
        self._out, self._out_release = [], []

    # ---- receive framing ---------------------------------------------------------------

    def _advance(self, n: int) -> None:
        phase = self._phase
        if phase in (_RxPhase.BHS, _RxPhase.AHS):
            self._hhave += n
            if self._hhave < self._hneed:
                return
            if phase == _RxPhase.BHS:
                extra = (self._hbuf[4] * 4) + (pdu.DIGEST_LEN if self._header_digest else 0)
                if extra:
                    self._phase = _RxPhase.AHS
                    self._hneed = pdu.BHS_LEN + extra
                    return
            self._header_complete()
        elif phase == _RxPhase.DATA:
            self._dest_pos += n
            if self._dest_pos >= len(self._dest[self._dest_idx]):
                self._dest_idx += 1
                self._dest_pos = 0
                if self._dest_idx >= len(self._dest):
                    self._data_complete()
        else:
            self._trailer_have += n
            if self._trailer_have >= self._trailer_need:
                self._trailer_complete()

    def _reset_rx(self) -> None:
        self._phase = _RxPhase.BHS
        self._hneed = pdu.BHS_LEN
        self._hhave = 0
        self._hdr = None
        self._dest = []
        self._dest_cmd = None
        self._data_views = []
        self._discard = False
        self._discard_reason = None

    def _header_complete(self) -> None:
        raw = bytes(self._hview[: pdu.BHS_LEN])
        hdr = Header(raw)
        self._hdr = hdr
        if self._header_digest:
            end = self._hneed - pdu.DIGEST_LEN
            got = bytes(self._hbuf[end : self._hneed])
            if digest(self._hview[:end]) != got:
                # The header cannot be trusted, so neither can its length fields (ERL 0).
                log.warning("header digest error; closing connection")
                self._close("header digest error")
                return
        if hdr.opcode not in LEGAL_OPCODES[self.state]:
            if hdr.opcode in pdu.INITIATOR_OPCODES or hdr.opcode >= Opcode.NOP_IN:
                reason = RejectReason.PROTOCOL_ERROR
            else:
                reason = RejectReason.COMMAND_NOT_SUPPORTED
            if self.state is ConnState.LOGIN:
                # Before the login nothing but Login PDUs make sense: answer and close.
                self._login_reject(hdr, 0x02, 0x0B)
                return
            self._start_discard(hdr, reason)
            return
        if hdr.ahs_len and hdr.opcode == Opcode.SCSI_COMMAND:
            try:  # a CDB longer than 16 bytes (READ(32) ...): the rest is in the AHS
                ahs = bytes(self._hbuf[pdu.BHS_LEN : pdu.BHS_LEN + hdr.ahs_len])
                hdr.cdb_ext = pdu.extended_cdb(ahs)
            except PduFormatError as exc:
                log.warning("SCSI Command itt %#x: %s", hdr.itt, exc)
                self._start_discard(hdr, exc.reason)
                return
        if hdr.data_len > self._max_recv:
            if self.state is ConnState.LOGIN:
                # Decided from the header alone: an unauthenticated peer does not get to make
                # us read (and throw away) up to 16 MiB.
                self._login_reject(hdr, 0x02, 0x00)
                return
            self._start_discard(hdr, RejectReason.PROTOCOL_ERROR)
            return
        if hdr.data_len == 0 and hdr.opcode != _DATA_OUT:
            # Most PDUs (every READ): complete with their header, no data phase to set up.
            self._phase = _RxPhase.BHS
            self._hneed = pdu.BHS_LEN
            self._hhave = 0
            self._hdr = None
            self.headers_only = True
            self._dispatch(hdr, None)
            return
        self._route_data(hdr)

    def _start_discard(self, hdr: Header, reason: RejectReason) -> None:
        """Read and drop the PDU's data segment, then answer it with a Reject."""
        self._discard = True
        self._discard_reason = reason
        self._begin_data(hdr, [])

    def _begin_data(self, hdr: Header, dest: list[memoryview], cmd: Command | None = None) -> None:
        """Receive ``hdr``'s data segment into ``dest`` (or the sink), then its trailer."""
        n = hdr.data_len
        if n == 0:
            self._pdu_complete()
            return
        if not dest or self._discard:
            dest = self._sink_views(n)
        self._dest = dest
        self._data_views = dest
        self._dest_idx = 0
        self._dest_pos = 0
        self._dest_cmd = cmd
        self._phase = _RxPhase.DATA

    def _sink_views(self, n: int) -> list[memoryview]:
        if self._sink is None:
            self._sink = bytearray(_SINK_SIZE)
        sink = memoryview(self._sink)
        views = []
        while n > 0:
            take = min(n, len(sink))
            views.append(sink[:take])
            n -= take
        return views

    def _data_complete(self) -> None:
        hdr = self._hdr
        assert hdr is not None
        pad = (-hdr.data_len) & 3
        need = pad + (pdu.DIGEST_LEN if self._data_digest else 0)
        if need:
            self._phase = _RxPhase.TRAILER
            self._trailer_need = need
            self._trailer_have = 0
            return
        self._pdu_complete()

    def _trailer_complete(self) -> None:
        hdr = self._hdr
        assert hdr is not None
        if self._data_digest and not self._discard:
            pad = (-hdr.data_len) & 3
            got = bytes(self._trailer[pad : pad + pdu.DIGEST_LEN])
            views: list[BytesLike] = [*self._data_views, self._trailer[:pad]]
            if digest_of(views) != got:
                log.warning("data digest error on %r", hdr)
                if hdr.opcode in (Opcode.DATA_OUT, Opcode.SCSI_COMMAND):
                    # ERL 0 cannot recover the command's data: reject, then close.
                    self._reject_and_close(RejectReason.DATA_DIGEST_ERROR, hdr)
                    return
                self._discard = True
                self._discard_reason = RejectReason.DATA_DIGEST_ERROR
        self._pdu_complete()

    def _pdu_complete(self) -> None:
        hdr = self._hdr
        assert hdr is not None
        self.headers_only = False
        discard, reason = self._discard, self._discard_reason
        cmd = self._dest_cmd
        self._reset_rx()
        if discard:
            if reason is not None:
                self._send_reject(reason, hdr)
            return
        self._dispatch(hdr, cmd)

    # ---- where data segments go ----------------------------------------------------------

    def _route_data(self, hdr: Header) -> None:
        op = hdr.opcode
        if op == Opcode.DATA_OUT:
            self._route_data_out(hdr)
        elif op == Opcode.SCSI_COMMAND and hdr.data_len:
            self._route_immediate(hdr)
        elif hdr.data_len:
            self._small = bytearray(hdr.data_len)
            self._begin_data(hdr, [memoryview(self._small)])
        else:
            self._begin_data(hdr, [])

    def _route_immediate(self, hdr: Header) -> None:
        """Immediate data lands in the command's first receive window (allocated here)."""
        params = self.params
        assert params is not None
        if not params.immediate_data or not hdr.b1 & pdu.F_WRITE:
            raise PduFormatError(RejectReason.PROTOCOL_ERROR, "unexpected immediate data")
        if hdr.data_len > min(params.first_burst_length, hdr.expected_length):
            raise PduFormatError(
                RejectReason.PROTOCOL_ERROR, "immediate data exceeds FirstBurstLength or EDTL"
            )
        unsol = (
            hdr.data_len
            if params.initial_r2t
            else min(params.first_burst_length, hdr.expected_length)
        )
        sg = self.pool.try_alloc(unsol, reserve=True)
        if sg is None:
            if not self._give_up_memory and not self._windows_filling():
                # Not even the reserve has room: stop reading this connection (TCP pushes
                # back on the initiator) until blocks are freed; see ``retry_rx``.
                self._rx_blocked = hdr
                self._events.append(MemoryWanted(self.pool.blocks_for(unsol)))
                return
            self.pool.stats.unsolicited_dropped += 1
            # Waited long enough: drop the data and answer TASK SET FULL later (no loss:
            # nothing was acknowledged, the initiator retries).
            self._pending_rx = (None, unsol)
            self._begin_data(hdr, [])
            return
        self._pending_rx = (sg, unsol)
        self._begin_data(hdr, sg.views(0, hdr.data_len))

    def _route_data_out(self, hdr: Header) -> None:
        session = self.session
        cmd = session.commands.get(hdr.itt) if session else None
        n = hdr.data_len
        if cmd is None or cmd.aborted or cmd.data_error is not None:
            # A command that already finished, failed or was aborted may still get data.
            self._begin_data(hdr, [])
            self._discard = True
            return
        wr = cmd.wr
        if wr is None:
            self._fail_data(cmd, hdr, Asc.UNEXPECTED_UNSOLICITED_DATA, "Data-Out for a read")
            return
        off = hdr.buffer_offset
        if hdr.ttt == pdu.RESERVED_TAG:
            if hdr.datasn != wr.unsol_datasn:
                self._fail_data(cmd, hdr, Asc.DATA_PHASE_ERROR, "unsolicited DataSN")
                return
            if off != wr.unsol_received:
                self._fail_data(cmd, hdr, Asc.DATA_OFFSET_ERROR, "unsolicited data offset")
                return
            if off + n > wr.unsol_expected:
                self._fail_data(cmd, hdr, Asc.UNEXPECTED_UNSOLICITED_DATA, "unsolicited data")
                return
            wr.unsol_datasn += 1
            wr.unsol_received += n
        else:
            r2t = wr.r2ts.get(hdr.ttt)
            if r2t is None:
                self._fail_data(cmd, hdr, Asc.DATA_PHASE_ERROR, "Data-Out for unknown TTT")
                return
            r_off, r_len, r_got, r_sn = r2t
            if hdr.datasn != r_sn:
                self._fail_data(cmd, hdr, Asc.DATA_PHASE_ERROR, "Data-Out DataSN")
                return
            if off != r_off + r_got or r_got + n > r_len:
                self._fail_data(cmd, hdr, Asc.DATA_OFFSET_ERROR, "Data-Out offset or length")
                return
            r2t[2] += n
            r2t[3] += 1
        # Land the bytes inside the current receive window, drop anything outside it.
        sg = wr.rx_sg
        lo = max(off, wr.rx_base)
        hi = min(off + n, wr.rx_base + wr.rx_len)
        if sg is None or hi <= lo:
            self._rx_landed = 0
            self._begin_data(hdr, [], cmd)
            return
        dest: list[memoryview] = []
        if lo > off:
            dest.extend(self._sink_views(lo - off))
        dest.extend(sg.views(lo - wr.rx_base, hi - lo))
        if off + n > hi:
            dest.extend(self._sink_views(off + n - hi))
        self._rx_landed = hi - lo
        self._begin_data(hdr, dest, cmd)

    # ---- dispatch of complete PDUs -------------------------------------------------------

    def _dispatch(self, hdr: Header, cmd: Command | None) -> None:
        op = hdr.opcode
        if op == _SCSI_COMMAND:
            self._on_sequenced(hdr)
        elif op == Opcode.LOGIN_REQUEST:
            self._on_login(hdr, bytes(self._small) if hdr.data_len else b"")
        elif op == _DATA_OUT:
            self._on_data_out(hdr, cmd)
        else:
            self._on_sequenced(hdr)

    def _on_sequenced(self, hdr: Header) -> None:
        """PDUs that carry a CmdSN: deliver in CmdSN order, drop those outside the window."""
        session = self.session
        assert session is not None
        payload: _ImmediateData | bytes
        if hdr.opcode == _SCSI_COMMAND:
            payload = self._pending_rx
            self._pending_rx = _NO_IMMEDIATE
        else:
            payload = bytes(self._small) if hdr.data_len else b""
        if hdr.immediate:
            self._deliver(hdr, payload)
            return
        cmdsn = hdr.cmdsn
        if cmdsn == session.exp_cmdsn and not self._deferred and session.has_room():
            # In order, the common case: straight through.
            self._accept_cmdsn(session)
            self._deliver(hdr, payload)
            return
        if not session.in_window(cmdsn):
            # RFC 7143 §3.2.2.1: silently ignored.
            log.info(
                "CmdSN %d outside window [%d, %d]: ignored",
                cmdsn,
                session.exp_cmdsn,
                session.max_cmdsn,
            )
            _release_payload(payload)
            return
        if cmdsn != session.exp_cmdsn:
            if cmdsn in self._deferred:
                _release_payload(payload)
                return
            self._deferred[cmdsn] = (hdr, payload)
            return
        self._accept_cmdsn(session)
        self._deliver(hdr, payload)
        while session.exp_cmdsn in self._deferred:
            dhdr, dpayload = self._deferred.pop(session.exp_cmdsn)
            self._accept_cmdsn(session)
            self._deliver(dhdr, dpayload)

    def _accept_cmdsn(self, session: Session) -> None:
        session.exp_cmdsn = (session.exp_cmdsn + 1) & 0xFFFFFFFF

    def _deliver(self, hdr: Header, payload: _ImmediateData | bytes) -> None:
        op = hdr.opcode
        if op == Opcode.SCSI_COMMAND:
            self._on_scsi_command(hdr, payload if isinstance(payload, tuple) else (None, 0))
        elif op == Opcode.NOP_OUT:
            self._on_nop_out(hdr, payload if isinstance(payload, bytes) else b"")
        elif op == Opcode.TEXT_REQUEST:
            self._on_text(hdr, payload if isinstance(payload, bytes) else b"")
        elif op == Opcode.TASK_MGMT_REQUEST:
            self._on_tmf(hdr)
        elif op == Opcode.LOGOUT_REQUEST:
            self._on_logout(hdr)
        elif op == Opcode.SNACK_REQUEST:
            # ERL 0: there is nothing to retransmit from.
            self._send_reject(RejectReason.COMMAND_NOT_SUPPORTED, hdr)

    # ---- login ---------------------------------------------------------------------------

    def _on_login(self, hdr: Header, data: bytes) -> None:
        if hdr.b3 > 0:  # Version-min above the only version there is
            self._login_reject(hdr, 0x02, 0x05)
            return
        if self._login_itt is None:
            self._login_isid = hdr.isid
            self.cid = hdr.cid
            self.statsn = hdr.exp_statsn
        elif hdr.isid != self._login_isid:
            self._login_reject(hdr, 0x02, 0x00)
            return
        self._login_itt = hdr.itt
        new_stage = next_stage(self._login_stage, hdr.csg, hdr.transit, hdr.nsg)
        if new_stage is None:
            self._login_reject(hdr, 0x02, 0x0B)
            return
        if hdr.transit and hdr.cont:
            self._login_reject(hdr, 0x02, 0x00)
            return
        self._login_text += data
        if len(self._login_text) > MAX_TEXT:
            self._login_reject(hdr, 0x02, 0x00)
            return
        if hdr.cont:
            # More text follows: acknowledge with an empty response in the same stage.
            self._login_response(hdr, transit=False, csg=hdr.csg, nsg=0, data=b"")
            return
        text, self._login_text = bytes(self._login_text), bytearray()
        try:
            pairs = parse_text(text)
            leading = hdr.tsih == 0
            answer = self._negotiator.process(pairs, stage=Stage(hdr.csg), leading=leading)
        except TextFormatError:
            self._login_reject(hdr, 0x02, 0x00)
            return
        except NegotiationError as exc:
            self._login_reject(hdr, exc.status_class, exc.status_detail)
            return
        neg = self._negotiator
        # Identity checks happen on the first request that names them.
        if neg.initiator_name is None:
            self._login_reject(hdr, 0x02, 0x07)
            return
        session_type = neg.session_type or SessionType.NORMAL
        if session_type is SessionType.NORMAL:
            if neg.target_name is None:
                self._login_reject(hdr, 0x02, 0x07)
                return
            if self.targets.lookup(neg.target_name) is None:
                self._login_reject(hdr, 0x02, 0x03)
                return
        if hdr.tsih != 0:
            # Adding connections to a session needs MaxConnections > 1; we offer 1.
            self._login_reject(hdr, 0x02, 0x0A)
            return
        if session_type is SessionType.NORMAL and not self._tpgt_sent:
            # RFC 7143 §13.9: the first Login Response of a normal session carries it.
            answer.append(("TargetPortalGroupTag", str(self.tpgt)))
            self._tpgt_sent = True
        if hdr.transit and new_stage is Stage.FULL_FEATURE:
            self._login_stage = new_stage
            self._finish_login(hdr, answer, session_type)
            return
        self._login_stage = new_stage
        self._login_response(
            hdr,
            transit=hdr.transit,
            csg=hdr.csg,
            nsg=hdr.nsg if hdr.transit else 0,
            data=encode_text(answer),
        )

    def _finish_login(
        self, hdr: Header, answer: list[tuple[str, str]], session_type: SessionType
    ) -> None:
        neg = self._negotiator
        params = neg.finish()
        assert neg.initiator_name is not None
        isid = hdr.isid
        target_name = neg.target_name if session_type is SessionType.NORMAL else None
        # Session reinstatement: a new login from the same I_T nexus replaces the old session.
        old = self.sessions.find(neg.initiator_name, isid, target_name)
        if old is not None:
            self.sessions.remove(old)
            self._events.append(SessionReinstated(old))
        nexus_key = f"{neg.initiator_name},i,0x{isid.hex()}"
        session = Session(
            tsih=self.sessions.new_tsih(),
            initiator_name=neg.initiator_name,
            isid=isid,
            session_type=session_type,
            target_name=target_name,
            params=params,
            nexus=Nexus(neg.initiator_name, nexus_key),
            exp_cmdsn=hdr.cmdsn,
            pool=self.pool,
            queue_depth=self.queue_depth,
            # What the Login Response below advertises.
            advertised=(hdr.cmdsn + self.queue_depth - 1) & 0xFFFFFFFF,
        )
        self.sessions.add(session)
        self.session = session
        self.params = params
        self._login_response(
            hdr,
            transit=True,
            csg=hdr.csg,
            nsg=Stage.FULL_FEATURE,
            data=encode_text(answer),
            tsih=session.tsih,
        )
        self.state = transition(self.state, ConnEvent.LOGIN_SUCCEEDED)
        # New limits and digests from the next PDU on, in both directions.
        self._header_digest = params.header_digest
        self._data_digest = params.data_digest
        self._max_recv = params.max_recv_data_segment_length
        self._max_xmit = params.max_xmit_data_segment_length
        self._events.append(LoginComplete(session))

    def _login_response(
        self,
        hdr: Header,
        *,
        transit: bool,
        csg: int,
        nsg: int,
        data: bytes,
        tsih: int = 0,
        status_class: int = 0,
        status_detail: int = 0,
    ) -> None:
        exp = hdr.cmdsn
        bhs = pdu.build_login_response(
            transit=transit,
            cont=False,
            csg=csg,
            nsg=nsg,
            isid=hdr.isid,
            tsih=tsih,
            itt=hdr.itt,
            statsn=self.statsn,
            exp_cmdsn=exp,
            max_cmdsn=(exp + self.queue_depth - 1) & 0xFFFFFFFF,
            status_class=status_class,
            status_detail=status_detail,
            data_len=len(data),
        )
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        self._emit(bhs, [data] if data else [], len(data))

    def _login_reject(self, hdr: Header, status_class: int, status_detail: int) -> None:
        log.info("login rejected: status %#04x/%#04x", status_class, status_detail)
        self._login_response(
            hdr,
            transit=False,
            csg=hdr.csg & 3 if hdr.csg != 2 else 0,
            nsg=0,
            data=b"",
            status_class=status_class,
            status_detail=status_detail,
        )
        self._close("login failed")

    # ---- full feature phase: SCSI commands -------------------------------------------------

    def _on_scsi_command(self, hdr: Header, imm: _ImmediateData) -> None:
        session = self.session
        params = self.params
        assert session is not None
        assert params is not None
        unsol_sg, unsol = imm
        if session.session_type is SessionType.DISCOVERY:
            if unsol_sg is not None:
                unsol_sg.release()
            self._send_reject(RejectReason.PROTOCOL_ERROR, hdr)
            return
        if hdr.itt in session.commands:
            if unsol_sg is not None:
                unsol_sg.release()
            self._send_reject(RejectReason.TASK_IN_PROGRESS, hdr)
            return
        edtl = hdr.expected_length
        read = bool(hdr.b1 & pdu.F_READ)
        write = bool(hdr.b1 & pdu.F_WRITE)
        cmd = session.take_slot()
        cmd.cdb = hdr.cdb
        # Nearly every command names one of a few LUNs: share their field objects.
        cmd.lun = self._luns.setdefault(hdr.lun_bytes, hdr.lun_bytes)
        cmd.expected_length = edtl
        cmd.direction = _DIRECTIONS[int(read) | (int(write) << 1)]
        cmd.tag = hdr.itt
        cmd.nexus = session.nexus
        cmd.cmdsn = hdr.cmdsn
        cmd.immediate = hdr.immediate
        cmd.read_edtl = edtl if read else 0
        cmd.write_edtl = edtl if write else 0
        if write and edtl:
            wr = cmd.wr = WriteState()
            if unsol_sg is None and hdr.data_len == 0 and not params.initial_r2t:
                unsol = min(params.first_burst_length, edtl)
                unsol_sg = self.pool.try_alloc(unsol, reserve=True)
                if unsol_sg is None:
                    self.pool.stats.unsolicited_dropped += 1
                    wr.no_buffer = True
            elif unsol_sg is None and hdr.data_len:
                wr.no_buffer = True
            if hdr.data_len == 0 and params.initial_r2t:
                unsol = 0
            wr.unsol_expected = unsol
            wr.unsol_received = hdr.data_len
            wr.rx_sg = unsol_sg
            wr.rx_base = 0
            wr.rx_len = unsol if unsol_sg is not None else 0
            wr.rx_have = hdr.data_len if unsol_sg is not None else 0
            wr.r2t_next = unsol
        elif unsol_sg is not None:
            unsol_sg.release()
        session.commands[hdr.itt] = cmd
        if not hdr.immediate:
            session.in_flight += 1
        self._events.append(CommandReady(cmd))

    def _on_data_out(self, hdr: Header, cmd: Command | None) -> None:
        if cmd is None or cmd.aborted or cmd.wr is None:
            return
        wr = cmd.wr
        landed, self._rx_landed = self._rx_landed, 0
        wr.rx_have += landed
        if hdr.ttt != pdu.RESERVED_TAG:
            r2t = wr.r2ts.get(hdr.ttt)
            if r2t is not None and r2t[2] >= r2t[1]:
                if not hdr.final:
                    log.debug("R2T %#x satisfied without F bit", hdr.ttt)
                del wr.r2ts[hdr.ttt]
                self._issue_r2ts(cmd, wr)
        self._check_rx_done(cmd, wr)

    def _fail_data(self, cmd: Command, hdr: Header, asc: Asc, what: str) -> None:
        """A Data-Out the command cannot accept: end the command, keep the connection.

        ERL 0 cannot recover the data, but the error is the command's, not the connection's:
        the command completes with CHECK CONDITION (ABORTED COMMAND, so the initiator
        retries it) and its remaining Data-Out PDUs are dropped.
        """
        log.warning(
            "%s error on ITT %#x (DataSN %d, offset %d): failing the command",
            what,
            cmd.itt,
            hdr.datasn,
            hdr.buffer_offset,
        )
        cmd.data_error = SenseData(SenseKey.ABORTED_COMMAND, asc).fixed()
        self._begin_data(hdr, [])
        self._discard = True
        self._discard_reason = None
        wr = cmd.wr
        if wr is None:
            return
        wr.r2ts.clear()
        wr.r2t_next = wr.r2t_end
        if wr.rx_waiting:
            wr.rx_waiting = False
            self._events.append(DataFailed(cmd))

    def _check_rx_done(self, cmd: Command, wr: WriteState) -> None:
        if wr.rx_waiting and wr.rx_have >= wr.rx_len and wr.rx_sg is not None:
            wr.rx_waiting = False
            self._events.append(DataReady(cmd, self._hand_over(cmd, wr)))

    def _solicit_cap(self) -> int:
        """The most Data-Out one window should wait for.

        While the pool is short: what its R2Ts can ask at once. With MaxOutstandingR2T bursts
        in flight the initiator sends at most that much before the next R2T; a bigger window
        would hold pool blocks idle across sequential round trips, and smaller windows let
        more commands share the pool. With memory to spare, bigger windows win: fewer
        backstore calls and thread hand-offs per command.
        """
        params = self.params
        assert params is not None
        if not self.pool.under_pressure():
            return 1 << 62
        return params.max_outstanding_r2t * params.max_burst_length

    def _hand_over(self, cmd: Command, wr: WriteState) -> ScatterList:
        """Give the filled window to the LU and, memory permitting, solicit the next one now.

        The next window then streams in while the LU writes this one, instead of each window
        waiting for the backstore and a fresh R2T round trip. It is sized as the LU will ask
        (its last request, up to the CDB's transfer length), so it is never cut short later.
        Under pool pressure nothing is prefetched: memory goes to commands that need it.
        """
        sg = wr.rx_sg
        assert sg is not None
        wr.rx_sg = None
        nxt = wr.rx_base + wr.rx_len
        end = cmd.write_edtl
        if cmd.transfer_length:
            end = min(end, cmd.transfer_length)
        # Only solicitable bytes are prefetched: unsolicited ones come on their own or not at
        # all (after a shorter first request cut their window, see ``request_data``).
        if wr.unsol_expected <= nxt < end and wr.want and not self.pool.under_pressure():
            new = self.pool.try_alloc_upto(min(wr.want, end - nxt, self._solicit_cap()))
            if new is not None:
                wr.rx_sg = new
                wr.rx_base = nxt
                wr.rx_len = new.length
                wr.rx_have = 0
                wr.r2t_next = max(wr.r2t_next, nxt)
                wr.r2t_end = nxt + new.length
                self._issue_r2ts(cmd, wr)
        return sg

    def data_here(self, cmd: Command) -> ScatterList | None:
        """All of ``cmd``'s Data-Out if it came as immediate data, else ``None``.

        The list stays the command's (``complete`` releases it), so a caller that cannot use
        it leaves everything as it was for ``request_data``.
        """
        wr = cmd.wr
        if wr is None or cmd.aborted or cmd.data_error is not None:
            return None
        sg = wr.rx_sg
        if sg is None or wr.rx_base or wr.rx_have < cmd.write_edtl or sg.length < cmd.write_edtl:
            return None
        return sg

    def take_data(self, cmd: Command) -> ScatterList:
        """``data_here``'s list, handed over: ``complete`` and a lost connection no longer
        release it (a write may still be reading it)."""
        wr = cmd.wr
        assert wr is not None
        assert wr.rx_sg is not None
        sg, wr.rx_sg = wr.rx_sg, None
        return sg

    def request_data(self, cmd: Command, offset: int, length: int) -> ScatterList | None:
        """Data-Out bytes from ``offset``, at most ``length`` of them, for the LU.

        Returns the scatter list once its bytes are here, else None and a ``DataReady`` (or
        ``DataFailed``) event follows. The list may be shorter than ``length``: it ends where
        the unsolicited data ends, or where the pool ran short — R2Ts are sent only for blocks
        we could allocate, so a large write streams through whatever memory there is. An empty
        list means no more data will come (the initiator's expected length is used up).

        Windows must be requested in ascending order, and the unsolicited part (immediate
        data up to FirstBurstLength) in the first one: a shorter first request truncates it.
        Raises ``PoolExhausted`` when not even
        one block is free (the caller may wait for memory and ask again),
        ``UnsolicitedDropped`` when the command's unsolicited data could not be kept, and
        ``CommandAborted`` once the command is aborted or its connection gone.
        """
        if cmd.aborted or cmd.data_error is not None or self.session is None:
            raise CommandAborted(cmd.itt)
        wr = cmd.wr
        length = max(0, min(length, cmd.write_edtl - offset))
        if wr is None or length == 0:
            return ScatterList(self.pool)
        if wr.no_buffer:
            raise UnsolicitedDropped(cmd.itt)
        if wr.rx_sg is not None and wr.rx_base == offset:
            # The unsolicited window, allocated when the command arrived.
            sg = wr.rx_sg
            if length < wr.rx_len:
                self._detach_rx(cmd, keep_below=offset + length)
                sg.truncate(min(length, sg.length))
                wr.rx_len = length
                wr.rx_have = min(wr.rx_have, length)
        else:
            if offset < wr.r2t_next and offset < wr.unsol_expected:
                # Unsolicited bytes cannot be solicited again, and a window cut short by an
                # earlier, smaller request gave its tail back: fail loudly instead of
                # waiting for data that will never come.
                raise RuntimeError(
                    f"ITT {cmd.itt:#x}: Data-Out [{offset}, +{length}) was unsolicited and "
                    "is no longer held; request unsolicited data in one window"
                )
            if wr.rx_sg is not None:
                self._detach_rx(cmd)
                wr.rx_sg.release()
                wr.rx_sg = None
            new = self.pool.try_alloc_upto(min(length, self._solicit_cap()))
            if new is None:
                raise PoolExhausted(length)
            sg = new
            wr.rx_sg = sg
            wr.rx_base = offset
            wr.rx_len = sg.length
            wr.rx_have = 0
            wr.r2t_next = max(wr.r2t_next, offset)
            wr.r2t_end = offset + sg.length
        wr.want = length
        if wr.rx_have >= wr.rx_len:
            return self._hand_over(cmd, wr)
        wr.rx_waiting = True
        self._issue_r2ts(cmd, wr)
        return None

    def _issue_r2ts(self, cmd: Command, wr: WriteState) -> None:
        params = self.params
        session = self.session
        assert params is not None
        assert session is not None
        while wr.r2t_next < wr.r2t_end and len(wr.r2ts) < params.max_outstanding_r2t:
            off = wr.r2t_next
            n = min(params.max_burst_length, wr.r2t_end - off)
            ttt = self._new_ttt()
            wr.r2ts[ttt] = [off, n, 0, 0]
            wr.r2t_next = off + n
            bhs = pdu.build(
                Opcode.R2T,
                lun=int.from_bytes(cmd.lun, "big"),
                itt=cmd.itt,
                w5=ttt,
                w6=self.statsn,
                w7=session.exp_cmdsn,
                w8=session.max_cmdsn,
                w9=wr.r2tsn,
                w10=off,
                w11=n,
            )
            wr.r2tsn += 1
            self._emit(bhs, [], 0)

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    def _detach_rx(self, cmd: Command, keep_below: int | None = None) -> None:
        """Stop a PDU in mid-reception from landing in ``cmd``'s buffers (they are going)."""
        if self._phase != _RxPhase.DATA or self._dest_cmd is not cmd:
            return
        wr = cmd.wr
        if keep_below is not None and wr is not None and wr.rx_base + wr.rx_len <= keep_below:
            return
        remaining = sum(len(v) for v in self._dest[self._dest_idx :]) - self._dest_pos
        self._dest = self._sink_views(remaining) if remaining else [memoryview(b"")]
        self._dest_idx = 0
        self._dest_pos = 0
        self._discard = True
        self._discard_reason = None
        self._rx_landed = 0

    def send_data_in(
        self, cmd: Command, sg: ScatterList, offset: int, length: int, *, last: bool
    ) -> None:
        """Data-In PDUs for ``sg[0:length]`` at buffer ``offset``; takes ownership of ``sg``.

        PDUs are cut at the initiator's MaxRecvDataSegmentLength; the final one is held back
        when ``last`` so that ``complete`` can put the status on it.
        """
        if cmd.aborted:
            sg.release()
            return
        end = min(offset + length, cmd.read_edtl)
        if end <= offset:
            sg.release()
            return
        session = self.session
        params = self.params
        assert session is not None
        assert params is not None
        mx = self._max_xmit
        burst = params.max_burst_length
        lun = int.from_bytes(cmd.lun, "big")
        pos = offset
        while pos < end:
            n = min(mx, end - pos, burst - (pos % burst))
            views = sg.views(pos - offset, n)
            if last and pos + n >= end:
                self._release_held(cmd)
                cmd.held_sg = sg
                cmd.held_views = views
                cmd.held_offset = pos
                return
            final = (pos + n) % burst == 0
            bhs = _BHS_PACK(
                Opcode.DATA_IN,
                F_FINAL if final else 0,
                0,
                0,
                n,
                lun,
                cmd.itt,
                pdu.RESERVED_TAG,
                0,
                session.exp_cmdsn,
                session.max_cmdsn,
                cmd.datasn,
                pos,
                0,
            )
            cmd.datasn += 1
            self._emit_bhs(bhs, views, n)
            pos += n
        self._out_release.append(sg)

    def _release_held(self, cmd: Command) -> None:
        if cmd.held_sg is not None:
            cmd.held_sg.release()
            cmd.held_sg = None
            cmd.held_views = None

    def complete(self, cmd: Command) -> None:
        """The SCSI layer is done with ``cmd``: send its status (unless it was aborted)."""
        session = self.session
        itt = cmd.tag
        if session is None or session.commands.get(itt) is not cmd:
            self._cleanup_command(cmd)
            return
        del session.commands[itt]
        if not cmd.immediate:
            session.in_flight -= 1
        if not cmd.aborted and self.state is not _CLOSED:
            self._send_status(session, cmd)
        self._cleanup_command(cmd)
        session.return_slot(cmd)

    def _send_status(self, session: Session, cmd: Command) -> None:
        status = cmd.status
        if status == _TASK_SET_FULL:
            self.pool.stats.task_set_full += 1
        if cmd.data_error is not None:
            status = cmd.status = Status.CHECK_CONDITION
            cmd.sense = cmd.data_error
        edtl = cmd.expected_length
        spdtl = cmd.transfer_length
        flags = 0
        residual = 0
        if spdtl > edtl:
            flags = pdu.F_OVERFLOW
            residual = spdtl - edtl
        elif spdtl < edtl:
            flags = pdu.F_UNDERFLOW
            residual = edtl - spdtl
        good = status == _GOOD and not cmd.sense
        if cmd.held_sg is not None and cmd.held_views is not None:
            # The last Data-In: with the status folded in when it is GOOD (RFC 7143 §11.7.4).
            views = cmd.held_views
            n = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
            bhs = _BHS_PACK(
                Opcode.DATA_IN,
                F_FINAL | (pdu.F_STATUS | flags if good else 0),
                0,
                cmd.status if good else 0,
                n,
                int.from_bytes(cmd.lun, "big"),
                cmd.itt,
                pdu.RESERVED_TAG,
                self._next_statsn() if good else 0,
                session.exp_cmdsn,
                session.max_cmdsn,
                cmd.datasn,
                cmd.held_offset,
                residual if good else 0,
            )
            cmd.datasn += 1
            self._emit_bhs(bhs, views, n)
            self._out_release.append(cmd.held_sg)
            cmd.held_sg = None
            cmd.held_views = None
            if good:
                return
        data = pdu.sense_segment(cmd.sense) if cmd.sense else b""
        bhs = _BHS_PACK(
            Opcode.SCSI_RESPONSE,
            F_FINAL | flags,
            0,
            cmd.status,
            len(data),
            0,
            cmd.itt,
            0,
            self._next_statsn(),
            session.exp_cmdsn,
            session.max_cmdsn,
            # ExpDataSN: the Data-In and R2T PDUs sent for the command.
            cmd.datasn + (cmd.wr.r2tsn if cmd.wr is not None else 0),
            0,
            residual,
        )
        self._emit_bhs(bhs, [data] if data else [], len(data))

    def _cleanup_command(self, cmd: Command) -> None:
        self._release_held(cmd)
        wr = cmd.wr
        if wr is not None:
            if wr.rx_sg is not None:
                self._detach_rx(cmd)
                wr.rx_sg.release()
                wr.rx_sg = None
            wr.r2ts.clear()

    def abort(self, cmd: Command) -> bool:
        """Mark ``cmd`` aborted: no status will be sent for it. False if already gone."""
        session = self.session
        if session is None or session.commands.get(cmd.itt) is not cmd:
            return False
        cmd.aborted = True
        self._release_held(cmd)
        return True

    def _release_commands(self) -> None:
        session = self.session
        if session is None:
            return
        for cmd in list(session.commands.values()):
            cmd.aborted = True
            self._cleanup_command(cmd)
        for _hdr, payload in self._deferred.values():
            _release_payload(payload)
        self._deferred.clear()

    # ---- full feature phase: everything else -------------------------------------------------

    def _on_nop_out(self, hdr: Header, data: bytes) -> None:
        session = self.session
        assert session is not None
        if hdr.ttt != pdu.RESERVED_TAG:
            # The answer to our ping.
            if hdr.ttt == self._nop_outstanding:
                self._nop_outstanding = None
                self._nop_deadline = None
            return
        if hdr.itt == pdu.RESERVED_TAG:
            return  # a ping that wants no answer
        data = data[: self._max_xmit]
        bhs = pdu.build(
            Opcode.NOP_IN,
            data_len=len(data),
            lun=hdr.lun,
            itt=hdr.itt,
            w5=pdu.RESERVED_TAG,
            w6=self._next_statsn(),
            w7=session.exp_cmdsn,
            w8=session.max_cmdsn,
        )
        self._emit(bhs, [data] if data else [], len(data))

    def _on_text(self, hdr: Header, data: bytes) -> None:
        session = self.session
        assert session is not None
        self._text_buf += data
        if len(self._text_buf) > MAX_TEXT:
            self._text_buf.clear()
            self._send_reject(RejectReason.PROTOCOL_ERROR, hdr)
            return
        if hdr.cont:
            self._text_response(hdr, b"", final=False, ttt=self._new_ttt())
            return
        text, self._text_buf = bytes(self._text_buf), bytearray()
        try:
            pairs = parse_text(text)
        except TextFormatError:
            self._send_reject(RejectReason.PROTOCOL_ERROR, hdr)
            return
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += send_targets_response(
                    value,
                    [(t.name, [f"{a},{t.tpgt}" for a in t.portals]) for t in self.targets],
                    current_target=session.target_name,
                    discovery=session.session_type is SessionType.DISCOVERY,
                )
            else:
                answer.append((key, "NotUnderstood"))
        self._text_response(hdr, encode_text(answer), final=True, ttt=pdu.RESERVED_TAG)

    def _text_response(self, hdr: Header, data: bytes, *, final: bool, ttt: int) -> None:
        session = self.session
        assert session is not None
        data = data[: self._max_xmit]
        bhs = pdu.build(
            Opcode.TEXT_RESPONSE,
            b1=F_FINAL if final else pdu.F_CONTINUE,
            data_len=len(data),
            lun=hdr.lun,
            itt=hdr.itt,
            w5=ttt,
            w6=self._next_statsn(),
            w7=session.exp_cmdsn,
            w8=session.max_cmdsn,
        )
        self._emit(bhs, [data] if data else [], len(data))

    def _on_tmf(self, hdr: Header) -> None:
        session = self.session
        assert session is not None
        fn = hdr.tmf_function
        lun = hdr.lun_bytes
        cmds: list[Command] = []
        if fn == pdu.TmfFunction.ABORT_TASK:
            cmd = session.commands.get(hdr.referenced_task_tag)
            if cmd is None or cmd.aborted:
                self.tmf_done(hdr.itt, pdu.TmfResponse.TASK_DOES_NOT_EXIST)
                return
            cmds = [cmd]
        elif fn in (
            pdu.TmfFunction.ABORT_TASK_SET,
            pdu.TmfFunction.CLEAR_TASK_SET,
            pdu.TmfFunction.LOGICAL_UNIT_RESET,
        ):
            cmds = [c for c in session.commands.values() if c.lun == lun and not c.aborted]
        elif fn in (pdu.TmfFunction.TARGET_WARM_RESET, pdu.TmfFunction.TARGET_COLD_RESET):
            cmds = [c for c in session.commands.values() if not c.aborted]
        elif fn == pdu.TmfFunction.TASK_REASSIGN:
            self.tmf_done(hdr.itt, pdu.TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
            return
        else:
            self.tmf_done(hdr.itt, pdu.TmfResponse.NOT_SUPPORTED)
            return
        for cmd in cmds:
            self.abort(cmd)
        self._events.append(TmfRequest(hdr.itt, fn, lun, cmds))

    def tmf_done(self, itt: int, response: int) -> None:
        session = self.session
        if session is None or self.state is ConnState.CLOSED:
            return
        bhs = pdu.build(
            Opcode.TASK_MGMT_RESPONSE,
            b2=response,
            itt=itt,
            w6=self._next_statsn(),
            w7=session.exp_cmdsn,
            w8=session.max_cmdsn,
        )
        self._emit(bhs, [], 0)

    def _on_logout(self, hdr: Header) -> None:
        session = self.session
        assert session is not None
        reason = hdr.logout_reason
        if reason == pdu.LogoutReason.REMOVE_FOR_RECOVERY:
            response = pdu.LogoutResponse.RECOVERY_NOT_SUPPORTED
        elif reason == pdu.LogoutReason.CLOSE_CONNECTION and hdr.cid != self.cid:
            response = pdu.LogoutResponse.CID_NOT_FOUND
        else:
            response = pdu.LogoutResponse.SUCCESS
        bhs = pdu.build(
            Opcode.LOGOUT_RESPONSE,
            b2=response,
            itt=hdr.itt,
            w6=self._next_statsn(),
            w7=session.exp_cmdsn,
            w8=session.max_cmdsn,
        )
        self._emit(bhs, [], 0)
        if response == pdu.LogoutResponse.SUCCESS:
            self.state = transition(self.state, ConnEvent.LOGOUT_ACCEPTED)
            self._events.append(CloseConnection("logout"))

    # ---- NOP-In pings --------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When ``handle_timer`` wants to run next (absolute, same clock as ``now``)."""
        if self.state is not ConnState.FULL_FEATURE or self._nop_interval is None:
            return None
        if self._nop_deadline is not None:
            return self._nop_deadline
        return self._last_rx + self._nop_interval

    def note_activity(self, now: float) -> None:
        self._last_rx = now

    def handle_timer(self, now: float) -> None:
        if self.state is not ConnState.FULL_FEATURE or self._nop_interval is None:
            return
        if self._nop_deadline is not None:
            if now >= self._nop_deadline:
                log.warning("initiator did not answer NOP-In ping; closing connection")
                self._close("ping timeout")
            return
        if now >= self._last_rx + self._nop_interval:
            self.ping(now)

    def ping(self, now: float) -> None:
        session = self.session
        assert session is not None
        self._nop_ttt = (self._nop_ttt + 1) & 0x7FFFFFFF or 0x10000
        self._nop_outstanding = self._nop_ttt
        self._nop_deadline = now + self._nop_timeout
        bhs = pdu.build(
            Opcode.NOP_IN,
            itt=pdu.RESERVED_TAG,
            w5=self._nop_outstanding,
            w6=self.statsn,
            w7=session.exp_cmdsn,
            w8=session.max_cmdsn,
        )
        self._emit(bhs, [], 0)

    # ---- output ----------------------------------------------------------------------------------

    def _next_statsn(self) -> int:
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _emit(self, bhs: bytearray, data: Sequence[BytesLike], n: int) -> None:
        """Queue one PDU: BHS (+digest), data views, padding (+digest)."""
        if n != 0:
            bhs[5:8] = n.to_bytes(3, "big")
        self._emit_bhs(bytes(bhs), data, n)

    def _emit_bhs(self, bhs: bytes, data: Sequence[BytesLike], n: int) -> None:
        """``_emit`` for a BHS packed whole, its DataSegmentLength ``n`` included."""
        out = self._out
        if self._header_digest:
            bhs += digest(bhs)
        out.append(bhs)
        if n:
            out.extend(data)
            pad = pdu.pad_for(n)
            if pad:
                out.append(pad)
            if self._data_digest:
                out.append(digest_of([*data, pad]))

    def _send_reject(self, reason: RejectReason, hdr: Header | None) -> None:
        session = self.session
        raw = hdr.raw if hdr is not None else bytes(pdu.BHS_LEN)
        exp = session.exp_cmdsn if session else 0
        mx = session.max_cmdsn if session else 0
        bhs = pdu.build(
            Opcode.REJECT,
            b2=reason,
            itt=pdu.RESERVED_TAG,
            w6=self._next_statsn(),
            w7=exp,
            w8=mx,
        )
        self._emit(bhs, [raw], len(raw))

    def _reject_and_close(self, reason: RejectReason, hdr: Header | None) -> None:
        if self.state is not ConnState.LOGIN:
            self._send_reject(reason, hdr)
        self._close(f"protocol error: {reason.name}")

    def _close(self, reason: str) -> None:
        if self.state is not ConnState.CLOSED:
            self.state = transition(self.state, ConnEvent.PROTOCOL_ERROR)
        self._events.append(CloseConnection(reason))


def _release_payload(payload: _ImmediateData | bytes) -> None:
    if isinstance(payload, tuple) and payload[0] is not None:
        payload[0].release()
