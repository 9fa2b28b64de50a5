"""asyncio adapter for one iSCSI connection: socket bytes <-> the sans-I/O ``Connection``.

Received bytes go where ``Connection.get_buffer`` says (header buffer or pool blocks) through
``asyncio.BufferedProtocol``; nothing is copied on the way in. Output goes out through
``ZeroCopyWriter`` (sender.py): ``sendmsg`` over header bytes and pool views, the unsent tail
kept as views, never copied into a transport buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, cast

from sgtarget.datapath import PoolExhausted, ScatterList
from sgtarget.datapath.stats import OUT
from sgtarget.iscsi import pdu
from sgtarget.iscsi.connection import (
    CloseConnection,
    CommandAborted,
    CommandReady,
    Connection,
    DataFailed,
    DataReady,
    LoginComplete,
    MemoryWanted,
    SessionReinstated,
    TmfRequest,
    UnsolicitedDropped,
)
from sgtarget.iscsi.session import Command, Session
from sgtarget.scsi.constants import Asc, SenseKey, Status
from sgtarget.scsi.sense import SenseData
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import NOW_DONE, NOW_PENDING, Task
from sgtarget.server.memory import UNSOLICITED_WAIT
from sgtarget.server.sender import ZeroCopyWriter

if TYPE_CHECKING:
    from sgtarget.server.target import TargetServer

log = logging.getLogger(__name__)

#: The most queued headers ``_read_headers_ahead`` takes at once.
_PEEK_PDUS = 32
#: The most reads ``_read_data_ahead`` makes for one segment before the loop's turn again.
_READ_AHEAD_CALLS = 16


class IscsiChannel:
    """``DataChannel`` of one command over an iSCSI connection."""

    __slots__ = ("cmd", "proto")

    def __init__(self, proto: IscsiProtocol, cmd: Command) -> None:
        self.proto = proto
        self.cmd = cmd

    def _register(self, fut: asyncio.Future[None]) -> None:
        # An abort (or connection loss) cancels the wait like it cancels a data wait.
        self.proto.rx_waiters[self.cmd.itt] = fut

    async def alloc(self, nbytes: int, *, partial: bool = False) -> ScatterList:
        proto = self.proto
        pool = proto.server.pool
        if partial:
            take = pool.try_alloc_upto
        elif pool.blocks_for(nbytes) > pool.nblocks - pool.reserve_blocks:
            raise PoolExhausted(nbytes)  # could never fit: waiting would not help
        else:
            take = pool.try_alloc
        need = 1 if partial else pool.blocks_for(nbytes)
        while (sg := take(nbytes)) is None:
            try:
                await proto.server.memory.wait(need, self._register)
            finally:
                proto.rx_waiters.pop(self.cmd.itt, None)
        return sg

    async def receive(self, offset: int, length: int) -> ScatterList:
        proto = self.proto
        while True:
            try:
                sg = proto.conn.request_data(self.cmd, offset, length)
                break
            except CommandAborted:
                raise asyncio.CancelledError from None
            except UnsolicitedDropped:
                raise
            except PoolExhausted:
                try:
                    await proto.server.memory.wait(1, self._register)
                finally:
                    proto.rx_waiters.pop(self.cmd.itt, None)
        proto.flush()
        if sg is not None:
            return sg
        fut: asyncio.Future[ScatterList] = proto.loop.create_future()
        proto.rx_waiters[self.cmd.itt] = fut
        try:
            return await fut
        finally:
            proto.rx_waiters.pop(self.cmd.itt, None)

    async def send(self, sg: ScatterList, offset: int, length: int, *, last: bool) -> None:
        proto = self.proto
        proto.conn.send_data_in(self.cmd, sg, offset, length, last=last)
        proto.flush()
        if proto.write_paused is not None:
            await proto.write_paused


class IscsiProtocol(asyncio.BufferedProtocol):
    def __init__(self, server: TargetServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn = Connection(
            pool=server.pool,
            targets=server.directory,
            sessions=server.sessions,
            limits=server.limits,
            nop_interval=server.nop_interval,
            queue_depth=server.config.queue_depth,
        )
        self.transport: asyncio.Transport | None = None
        self._writer: ZeroCopyWriter | None = None
        #: Per command: the future its data (or memory) wait is parked on; abort cancels it.
        self.rx_waiters: dict[int, asyncio.Future[Any]] = {}
        #: Commands under way: their task, or a future ``finish`` resolves (``NOW_PENDING``).
        self.running: dict[int, asyncio.Future[None]] = {}
        self.write_paused: asyncio.Future[None] | None = None
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._flush_queued = False
        self._read_paused = False
        #: Where ``_read_headers_ahead`` peeks: room for a burst of headers with digests.
        self._peek = memoryview(bytearray(_PEEK_PDUS * (pdu.BHS_LEN + pdu.DIGEST_LEN)))
        #: The session and its SCSI target, looked up once per session.
        self._scsi_of: tuple[Session | None, ScsiTarget | None] = (None, None)

    # ---- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they implement the API.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        raw = transport.get_extra_info("socket")
        if raw is not None:
            # A private duplicate of the fd lets us sendmsg() a header + payload views in one
            # call; asyncio's and uvloop's socket wrappers do not offer sendmsg.
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writer = ZeroCopyWriter(
                self.loop,
                sock,
                on_error=lambda _exc: self.abort(),
                pause=self.pause_writing,
                resume=self.resume_writing,
            )
        self.server.connections.add(self)
        log.info("connection from %s", self.peer)
        self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.note_activity(self.loop.time())
        conn.buffer_updated(nbytes)
        writer = self._writer
        if writer is not None and not self._read_paused:
            if conn.receiving_data:
                self._read_data_ahead(writer.sock)
            if conn.headers_only:
                self._read_headers_ahead(writer.sock)
        self._pump()

    def _read_data_ahead(self, sock: socket.socket) -> None:
        """Read the rest of a data segment that is already queued, into the buffers the
        connection names (pool blocks: no copy), now rather than a loop turn per read.

        A WRITE's immediate data follows its header on the wire; the stock asyncio loop would
        take one turn (a select) for the header and another for the data.
        """
        conn = self.conn
        for _ in range(_READ_AHEAD_CALLS):
            if not conn.receiving_data or conn.reading_blocked:
                return
            buf = conn.get_buffer()
            try:
                n = sock.recv_into(buf)
            except OSError:
                return  # nothing queued (EAGAIN), or an error the transport reports itself
            if n == 0:
                return  # end of stream: the transport reports it
            conn.buffer_updated(n)

    def _read_headers_ahead(self, sock: socket.socket) -> None:
        """Read the data-less PDUs (READ commands) queued behind this one in two system calls.

        The event loop reads exactly what ``get_buffer`` asks for, one header per read, so
        a burst of 32 READs would cost 32 reads and 32 callbacks. A peek shows what is
        queued; ``Connection.headers_ahead`` says how much of it is whole headers with no
        data segment, and only that much is read (copied like any header). A data segment
        is never read this way: it still lands in pool blocks without a copy.
        """
        peek = self._peek
        try:
            n = sock.recv_into(peek, len(peek), socket.MSG_PEEK)
        except OSError:
            return  # nothing queued (EAGAIN), or an error the transport reports itself
        take = self.conn.headers_ahead(peek[:n])
        if not take:
            return
        try:
            n = sock.recv_into(peek, take)
        except OSError:
            return
        self.conn.receive_data(bytes(peek[:n]))

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        fut, self.write_paused = self.write_paused, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        log.info("connection from %s closed%s", self.peer, f": {exc}" if exc else "")
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        session = self.conn.session
        # Commands still running stop at their next await; their buffers are released by the
        # SCSI layer (never under a thread still doing I/O into them).
        for fut in self.rx_waiters.values():
            fut.cancel()
        self.conn.connection_lost()
        # A reinstated session's nexus was already lost at the new login (below); its key now
        # belongs to the new session, whose state must survive the old connection closing.
        if session is not None and not any(
            s.nexus.key == session.nexus.key for s in self.server.sessions
        ):
            scsi = self.server.scsi_target_for(session)
            if scsi is not None:
                scsi.nexus_lost(session.nexus)
        if self._writer is not None:
            self._writer.close()
        self.resume_writing()
        self.server.connections.discard(self)

    # ---- events ---------------------------------------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, CommandReady):
                self._start_command(ev.command)
            elif isinstance(ev, DataReady):
                fut = self.rx_waiters.get(ev.command.itt)
                if fut is not None and not fut.done():
                    fut.set_result(ev.sg)
                else:
                    ev.sg.release()
            elif isinstance(ev, MemoryWanted):
                self._track(self.loop.create_task(self._wait_for_memory(ev.blocks)))
            elif isinstance(ev, DataFailed):
                fut = self.rx_waiters.get(ev.command.itt)
                if fut is not None and not fut.done():
                    fut.cancel()
            elif isinstance(ev, TmfRequest):
                self._track(self.loop.create_task(self._task_management(ev)))
            elif isinstance(ev, LoginComplete):
                log.info(
                    "%s logged in: %s (%s) tsih=%d",
                    self.peer,
                    ev.session.initiator_name,
                    ev.session.session_type.name.lower(),
                    ev.session.tsih,
                )
            elif isinstance(ev, SessionReinstated):
                # Reinstatement is I_T nexus loss (RFC 7143 6.3.5): before the new session's
                # first command, not whenever the old connection finishes closing.
                old_scsi = self.server.scsi_target_for(ev.old)
                if old_scsi is not None:
                    old_scsi.nexus_lost(ev.old.nexus)
                self.server.close_session(ev.old)
            elif isinstance(ev, CloseConnection):
                log.info("closing connection from %s: %s", self.peer, ev.reason)
                self.flush()
                self.close()
        self.flush_soon()

    async def _wait_for_memory(self, blocks: int) -> None:
        """Immediate data waits for room with reading paused; TASK SET FULL after a while."""
        transport = self.transport
        if transport is None:
            return
        transport.pause_reading()
        self._read_paused = True
        try:
            await self.server.memory.wait(blocks, timeout=UNSOLICITED_WAIT)
            give_up = False
        except PoolExhausted:
            give_up = True
        if self._closing:
            return
        self.conn.retry_rx(give_up=give_up)
        if not self.conn.reading_blocked:
            self._read_paused = False
            transport.resume_reading()
        self._pump()

    def _track(self, task: asyncio.Task[None]) -> None:
        self.server.background.add(task)
        task.add_done_callback(self.server.background.discard)

    def _start_command(self, cmd: Command) -> None:
        session = self.conn.session
        assert session is not None
        if session is not self._scsi_of[0]:
            self._scsi_of = (session, self.server.scsi_target_for(session))
        scsi = self._scsi_of[1]
        if scsi is not None:
            # Issue 7's immediate path: no task, no coroutine.
            now = scsi.execute_now(cmd, self)
            if now == NOW_DONE:
                self.conn.complete(cmd)
                return
            if now == NOW_PENDING:
                # Aborts and shutdown wait for it like for a task; ``finish`` ends it.
                self.running[cmd.itt] = self.loop.create_future()
                return
        task = self.loop.create_task(self._run_command(cmd, scsi))
        self.running[cmd.itt] = task
        self._track(task)

    async def _run_command(self, cmd: Command, scsi: ScsiTarget | None) -> None:
        try:
            if scsi is None:
                raise RuntimeError(f"session has no SCSI target: {self.conn.session}")
            await scsi.execute(cmd.task, IscsiChannel(self, cmd))
        except asyncio.CancelledError:
            # A data or memory wait was cancelled, not this task: by an abort or a lost
            # connection (which marked the command aborted: no status), or by a failed data
            # phase (``complete`` answers CHECK CONDITION from ``data_error``).
            pass
        except Exception:
            log.exception("command %#x failed unexpectedly", cmd.itt)
            cmd.task.status = Status.CHECK_CONDITION
            cmd.task.sense = _INTERNAL_FAILURE_SENSE
        finally:
            self.running.pop(cmd.itt, None)
            self.conn.complete(cmd)
            self.flush_soon()

    async def _task_management(self, req: TmfRequest) -> None:
        response = await self.server.task_management(self, req)
        self.conn.tmf_done(req.itt, response)
        self.flush()
        if req.function == pdu.TmfFunction.TARGET_COLD_RESET:
            self.server.close_all()

    async def wait_commands(self, cmds: list[Command]) -> None:
        """Abort-wait: wake the commands that wait for data, then wait until they finish."""
        tasks = []
        for cmd in cmds:
            fut = self.rx_waiters.get(cmd.itt)
            if fut is not None and not fut.done():
                fut.cancel()
            task = self.running.get(cmd.itt)
            if task is not None:
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)

    # ---- ImmediateChannel (scsi.task): the transport side of ``execute_now`` ----

    def alloc_now(self, nbytes: int) -> ScatterList | None:
        pool = self.server.pool
        # Commands already waiting for memory go first.
        return None if pool.waiting else pool.try_alloc(nbytes)

    def data_now(self, task: Task) -> ScatterList | None:
        return self.conn.data_here(cast(Command, task))

    def send_now(self, task: Task, sg: ScatterList, length: int) -> None:
        self.conn.send_data_in(cast(Command, task), sg, 0, length, last=True)

    def take_data(self, task: Task) -> ScatterList:
        return self.conn.take_data(cast(Command, task))

    def finish(self, task: Task) -> None:
        cmd = cast(Command, task)
        done = self.running.pop(cmd.itt, None)
        if done is not None and not done.done():
            done.set_result(None)
        self.conn.complete(cmd)
        self.flush_soon()

    # ---- output ----

    def flush_soon(self) -> None:
        """Flush once this turn of the event loop is done with its callbacks.

        Commands that arrive together complete together (the loop reads up to 32 PDUs per
        wake-up): their responses then leave in one ``sendmsg`` instead of one each, which
        also spares the initiator a wake-up per response.
        """
        if not self._flush_queued:
            self._flush_queued = True
            self.loop.call_soon(self._flush_queued_output)

    def _flush_queued_output(self) -> None:
        self._flush_queued = False
        self.flush()

    def flush(self) -> None:
        bufs, release = self.conn.take_output()
        transport = self.transport
        if not bufs or transport is None or transport.is_closing():
            for sg in release:
                sg.release()
            return
        if self._writer is not None:
            self._writer.send(bufs, release)
            return
        # No socket to sendmsg on (an exotic transport): it buffers, which is a copy.
        for buf in bufs:
            transport.write(buf)
        self.server.pool.stats.add_copy("transport-buffer", OUT, sum(len(b) for b in bufs))
        for sg in release:
            sg.release()

    def close(self) -> None:
        """Close once everything queued (a Logout Response, a Reject) is on the wire."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._writer is not None:
            self._writer.when_drained(transport.close)
        else:
            transport.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.transport is not None:
            self.transport.abort()

    # ---- timers ----

    def _arm_timer(self) -> None:
        if self._closing:
            return
        when = self.conn.get_timer()
        # Wake at least once per ping interval: an answered ping clears the deadline this
        # timer was armed for, and the next ping is due an interval after the answer.
        cap = min(self.server.nop_interval or 5.0, 5.0)
        delay = cap if when is None else max(0.05, min(when - self.loop.time(), cap))
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.conn.handle_timer(self.loop.time())
        self._pump()
        self._arm_timer()

    @property
    def session(self) -> Session | None:
        return self.conn.session


# HARDWARE ERROR / INTERNAL TARGET FAILURE, fixed format.
_INTERNAL_FAILURE_SENSE = SenseData(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE).fixed()
