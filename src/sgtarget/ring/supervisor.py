"""Handler processes behind rings: start, watch, time out, restart, stop.

A ``Supervisor`` runs ``workers`` handler processes (``python -m sgtarget.ring.worker``) for one
LUN, each with a ring of its own (mailbox + command ring in a memfd), a shared area for data
(``make_area``: the copy-mode data area, the pool arena, or a bounce window; a fresh one per
process), kick and done eventfds and a lifeline pipe. ``execute`` submits one command to one
worker and awaits its ``Completion``, which ``reap`` hands over when the done doorbell rings.

Death is seen at once: each process has a pidfd in the event loop (readable when it has
exited). Whatever the cause -- it crashed or was killed, it broke the ring ABI (``RingBroken``),
a command outlived ``timeout`` -- the same steps follow, in this order:

1. The process is made to be gone: SIGKILL to it and its process group, and nothing more
   happens until its pidfd says it has exited. Only then may its commands' buffers be reused:
   in zerocopy mode they are pool blocks the process had mapped, and a process still running
   could write into the next command's data.
2. Every command in flight on its ring fails with ``BackstoreBusy`` (SCSI BUSY; initiators
   retry). Commands are *not* re-queued to the next process: a command may have executed
   already (a WRITE that reached the page cache, a COMPARE AND WRITE that is not idempotent),
   only the initiator knows whether it still wants it, and a command that crashes its handler
   would crash every successor in turn. A write is acknowledged only after its completion
   arrived, i.e. after the handler wrote it to the file (page cache), which survives the
   handler, so no acknowledged write is lost.
3. The ring, the doorbells and the data area are closed, and a new process starts on fresh
   ones -- at once after a process that ran for a while, otherwise after a backoff (0.1 s
   doubling up to 5 s). After ``GIVE_UP_AFTER`` quick deaths in a row the slot is *failing*:
   restarts go on every 5 s, but while every slot fails commands get ``BackstoreError``
   (MEDIUM ERROR) at once instead of waiting for a process that does not come up.

Commands that find no live process wait up to ``START_WAIT`` seconds for one, then get BUSY.
A command whose process dies before the command reached its ring (it waited for data-area room)
raises ``NotSubmitted``, and the backstore sends it to another process: nothing ran.
A full command ring makes a command wait (bounded) for completions to make room.

Shutdown (``stop``): lifelines closed and SIGTERM; each process finishes its commands and
exits; after ``grace`` seconds the rest get SIGKILL. No child process or fd is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sgtarget.backstores.base import BackstoreBusy, BackstoreError
from sgtarget.ring.abi import MAILBOX_SIZE
from sgtarget.ring.shm import Doorbell, SharedMemory
from sgtarget.ring.target import Completion, RingBroken, RingFull, RingTarget

log = logging.getLogger(__name__)

#: Command ring bytes per handler process (TCMU's is 8 MiB for a 1 GiB data area; ours carry
#: at most ``backstore.MAX_CMD_BYTES`` per command and a few hundred commands in flight).
DEFAULT_CMDR_SIZE = 1024 * 1024
#: Seconds a command waits for a live handler process before BUSY.
START_WAIT = 10.0
#: Seconds a command waits for room in a full command ring before BUSY.
RING_WAIT = 5.0
#: A process that dies within this many seconds of its start died "quickly".
QUICK_DEATH = 1.0
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
#: Quick deaths in a row after which a slot is failing (MEDIUM ERROR instead of waiting).
GIVE_UP_AFTER = 5
#: Seconds between SIGTERM and SIGKILL on shutdown.
STOP_GRACE = 5.0
#: Seconds to wait for a killed process's pidfd (SIGKILL cannot be ignored; this only bounds
#: a process stuck in uninterruptible I/O).
KILL_WAIT = 10.0
_STDERR_MAX = 64 * 1024


class NotSubmitted(BackstoreBusy):
    """The chosen handler process went away before the command reached its ring: nothing
    ran, so the command may go to another process."""


class SharedArea(Protocol):
    """The data memory a handler process maps next to its ring (``--data-fd``)."""

    @property
    def fd(self) -> int: ...
    @property
    def size(self) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HandlerCommand:
    """What each worker process runs (the contract's command line)."""

    handler: str
    params: Mapping[str, str]
    size: int
    block_size: int = 512
    threads: int | None = None
    #: The protection type whose tuples the handler stores (``--pi``), 0: none.
    protection: int = 0

    def argv(
        self,
        ring: SharedMemory,
        *,
        area: SharedArea,
        data_off: int,
        kick: int,
        done: int,
        lifeline: int,
    ) -> list[str]:
        args = [
            sys.executable, "-m", "sgtarget.ring.worker",
            "--ring-fd", str(ring.fd), "--ring-size", str(ring.size),
            "--data-fd", str(area.fd), "--data-size", str(area.size),
            "--data-off", str(data_off),
            "--kick-fd", str(kick), "--done-fd", str(done),
            "--handler", self.handler,
        ]  # fmt: skip
        for key, value in self.params.items():
            args += ["--param", f"{key}={value}"]
        args += ["--size", str(self.size), "--block-size", str(self.block_size)]
        args += ["--lifeline-fd", str(lifeline)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.protection:
            args += ["--pi", str(self.protection)]
        return args


class State(enum.Enum):
    LIVE = "live"
    #: Killed or told to stop; its commands wait for the pidfd.
    DYING = "dying"
    DEAD = "dead"


@dataclass(slots=True)
class _Pending:
    fut: asyncio.Future[Completion]
    timer: asyncio.TimerHandle | None


@dataclass(eq=False, slots=True)
class Worker:
    """One handler process and everything it shares with the target."""

    slot: int
    proc: subprocess.Popen[bytes]
    pidfd: int
    ring: SharedMemory
    target: RingTarget
    kick: Doorbell
    done: Doorbell
    area: SharedArea
    data_off: int
    lifeline: int
    stderr: int
    started: float
    state: State = State.LIVE
    pending: dict[int, _Pending] = field(default_factory=dict)
    room: list[asyncio.Future[None]] = field(default_factory=list)
    completed: int = 0
    why: str = ""
    #: False once the process broke the ring ABI: nothing more is read from it.
    ring_trusted: bool = True
    err_buf: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def load(self) -> int:
        return len(self.pending)


@dataclass(slots=True)
class _Slot:
    index: int
    worker: Worker | None = None
    quick_deaths: int = 0
    restart: asyncio.TimerHandle | None = None

    @property
    def failing(self) -> bool:
        return self.quick_deaths >= GIVE_UP_AFTER


@dataclass(slots=True)
class SupervisorStats:
    starts: int = 0
    deaths: int = 0
    timeouts: int = 0
    broken_rings: int = 0
    #: Commands completed with BUSY because their handler died.
    failed_inflight: int = 0
    #: Times a command found its command ring full and waited for completions.
    ring_full_waits: int = 0


class Supervisor:
    """``workers`` handler processes running ``command``; see the module docstring."""

    def __init__(
        self,
        command: HandlerCommand,
        make_area: Callable[[], SharedArea],
        *,
        workers: int = 1,
        timeout: float | None = None,
        cmdr_size: int = DEFAULT_CMDR_SIZE,
        name: str = "lun",
    ) -> None:
        if workers < 1:
            raise ValueError("at least one handler process")
        self.command = command
        self.make_area = make_area
        self.timeout = timeout or None
        self.cmdr_size = cmdr_size
        self.name = name
        self.slots = [_Slot(i) for i in range(workers)]
        self.stats = SupervisorStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: list[asyncio.Future[None]] = []
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every process (on the running loop, which then owns this supervisor)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for slot in self.slots:
            self._spawn(slot)

    def workers(self) -> list[Worker]:
        """Processes that take commands now."""
        return [
            s.worker for s in self.slots if s.worker is not None and s.worker.state is State.LIVE
        ]

    def pids(self) -> list[int]:
        return [s.worker.pid for s in self.slots if s.worker is not None]

    def _spawn(self, slot: _Slot) -> None:
        loop = self._loop
        assert loop is not None
        slot.restart = None
        if self._stopping:
            return
        data_off = MAILBOX_SIZE + self.cmdr_size
        opened: list[Callable[[], None]] = []
        fds: list[int] = []
        try:
            ring = SharedMemory.create(f"sgtarget-ring-{self.name}-{slot.index}", data_off)
            opened.append(ring.close)
            target = RingTarget(ring.buf, data_off=data_off)
            kick = Doorbell.create()
            opened.append(kick.close)
            done = Doorbell.create()
            opened.append(done.close)
            area = self.make_area()
            opened.append(area.close)
            life_r, life_w = os.pipe2(os.O_CLOEXEC)
            fds += [life_r, life_w]
            err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            fds += [err_r, err_w]
            argv = self.command.argv(
                ring, area=area, data_off=data_off, kick=kick.fd, done=done.fd, lifeline=life_r
            )
            proc = subprocess.Popen(
                argv,
                pass_fds=(ring.fd, area.fd, kick.fd, done.fd, life_r),
                stdin=subprocess.DEVNULL,
                stdout=err_w,
                stderr=err_w,
                start_new_session=True,
            )
            os.close(life_r)
            os.close(err_w)
            fds = [life_w, err_r]
            try:
                pidfd = os.pidfd_open(proc.pid)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        except Exception:
            log.exception("%s: cannot start a handler process", self.name)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    close()
            self._schedule_restart(slot, quick=True)
            return
        worker = Worker(
            slot=slot.index,
            proc=proc,
            pidfd=pidfd,
            ring=ring,
            target=target,
            kick=kick,
            done=done,
            area=area,
            data_off=data_off,
            lifeline=life_w,
            stderr=err_r,
            started=time.monotonic(),
        )
        slot.worker = worker
        self.stats.starts += 1
        loop.add_reader(pidfd, self._on_exit, worker)
        loop.add_reader(done.fd, self._on_done, worker)
        loop.add_reader(err_r, self._on_stderr, worker)
        log.info("%s: handler process %d started (slot %d)", self.name, proc.pid, slot.index)
        self._wake(self._changed)

    def _schedule_restart(self, slot: _Slot, *, quick: bool) -> None:
        if self._stopping:
            return
        loop = self._loop
        assert loop is not None
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        if slot.quick_deaths == 0:
            delay = 0.0
        else:
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (slot.quick_deaths - 1))
        if slot.failing:
            log.error(
                "%s: handler slot %d died %d times in a row within %.0f s of starting; "
                "commands get MEDIUM ERROR until one stays up (retrying every %.1f s)",
                self.name, slot.index, slot.quick_deaths, QUICK_DEATH, delay,
            )  # fmt: skip
            self._wake(self._changed)  # waiting commands may now fail at once
        slot.restart = loop.call_later(delay, self._spawn, slot)

    def kill(self, worker: Worker, why: str) -> None:
        """Kill a process (crash handling follows when its pidfd fires). Idempotent; also
        kills one that was told to stop."""
        if worker.state is State.DEAD or worker.why:
            return
        worker.state = State.DYING
        worker.why = why
        log.warning("%s: killing handler process %d: %s", self.name, worker.pid, why)
        loop = self._loop
        if loop is not None:
            # Its ring is no longer trusted or wanted: nothing completes until it is gone.
            loop.remove_reader(worker.done.fd)
        self._signal(worker, signal.SIGKILL)

    @staticmethod
    def _signal(worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(worker.pidfd, sig)
        if sig == signal.SIGKILL:
            # Helpers it forked stay in its process group (it leads a new session); the group
            # id cannot be reused while the leader is an unreaped zombie.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)

    def _on_exit(self, worker: Worker) -> None:
        """The pidfd fired: the process has exited. Fail its commands, release, restart."""
        loop = self._loop
        assert loop is not None
        self._signal(worker, signal.SIGKILL)  # leftovers of its process group
        code = worker.proc.poll()
        if code is None:  # cannot happen once the pidfd is readable; be sure anyway
            worker.proc.kill()
            code = worker.proc.wait(timeout=KILL_WAIT)
        self._on_stderr(worker, final=True)
        for fd in (worker.pidfd, worker.done.fd, worker.stderr):
            loop.remove_reader(fd)
        if worker.ring_trusted:
            # Completions it posted before exiting (a clean stop finishes its commands) are
            # real: the process is gone, so reading them and releasing their buffers is safe.
            self._reap(worker)
        clean = self._stopping and worker.state is State.DYING and not worker.why
        was = worker.state
        worker.state = State.DEAD
        if not clean:
            self.stats.deaths += 1
            why = worker.why or f"exited with status {code}"
            if was is State.LIVE:
                log.error("%s: handler process %d died: %s", self.name, worker.pid, why)
        self._release(worker)
        slot = self.slots[worker.slot]
        if slot.worker is worker:
            slot.worker = None
        self._wake(self._changed)
        if not self._stopping:
            quick = time.monotonic() - worker.started < QUICK_DEATH
            self._schedule_restart(slot, quick=quick)

    def _release(self, worker: Worker) -> None:
        """Fail what was in flight, close what the process shared. It must be gone already."""
        failed = 0
        for cmd_id, p in list(worker.pending.items()):
            if p.timer is not None:
                p.timer.cancel()
            if not p.fut.done():
                why = worker.why or "exited"
                p.fut.set_exception(
                    BackstoreBusy(f"handler process {worker.pid} died ({why}); command {cmd_id}")
                )
                failed += 1
        worker.pending.clear()
        self.stats.failed_inflight += failed
        self._wake(worker.room)
        for close in (worker.kick.close, worker.done.close, worker.ring.close, worker.area.close):
            try:
                close()
            except Exception:
                log.exception("%s: closing a ring resource failed", self.name)
        for fd in (worker.lifeline, worker.stderr, worker.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        worker.lifeline = worker.stderr = worker.pidfd = -1

    def _on_stderr(self, worker: Worker, final: bool = False) -> None:
        """Log what the process wrote (it writes only errors), line by line."""
        fd = worker.stderr
        if fd < 0:
            return
        for _ in range(64):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                if self._loop is not None:
                    self._loop.remove_reader(fd)
                final = True
                break
            worker.err_buf += chunk
            if len(worker.err_buf) > _STDERR_MAX:
                del worker.err_buf[: len(worker.err_buf) - _STDERR_MAX]
        *lines, rest = bytes(worker.err_buf).split(b"\n")
        if final and rest:
            lines.append(rest)
            rest = b""
        worker.err_buf[:] = rest
        for line in lines:
            if line.strip():
                log.warning(
                    "%s: handler %d: %s", self.name, worker.pid, line.decode(errors="replace")
                )

    # -- commands ---------------------------------------------------------------------------

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        waiters.clear()

    async def _wait(self, waiters: list[asyncio.Future[None]], timeout: float) -> None:
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if fut in waiters:
                waiters.remove(fut)

    async def acquire(self) -> Worker:
        """The least loaded live process; waits up to ``START_WAIT`` for one.

        ``BackstoreBusy`` when none comes up in time (or the supervisor stops), ``BackstoreError``
        when every slot is failing (its handler keeps dying at start).
        """
        if self._loop is None:
            raise BackstoreError(f"{self.name}: handler processes not started")
        deadline = time.monotonic() + START_WAIT
        while True:
            live = self.workers()
            if live:
                return min(live, key=lambda w: w.load)
            if self._stopping:
                raise BackstoreBusy(f"{self.name}: handler processes stopping")
            if all(s.failing for s in self.slots):
                raise BackstoreError(f"{self.name}: the handler keeps dying at start")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackstoreBusy(f"{self.name}: no handler process up after {START_WAIT} s")
            with contextlib.suppress(TimeoutError):
                await self._wait(self._changed, left)

    async def execute(
        self,
        worker: Worker,
        cdb: bytes,
        iovs: Sequence[tuple[int, int]],
        dif_iovs: Sequence[tuple[int, int]] = (),
    ) -> Completion:
        """Submit one command to ``worker``, ring its kick doorbell, await its completion.
        ``dif_iovs``: its protection information buffer (TCMU's iov_dif_cnt).

        ``BackstoreBusy`` if the process dies first (raised only once it is gone). If the
        caller is cancelled, this still waits for the completion or the death, because the
        handler may be using the command's buffers until then.
        """
        loop = self._loop
        assert loop is not None
        deadline = time.monotonic() + RING_WAIT
        while True:
            if worker.state is not State.LIVE:
                raise NotSubmitted(f"{self.name}: handler process {worker.pid} is gone")
            try:
                cmd_id = worker.target.submit(cdb, iovs, dif_iovs=dif_iovs)
                break
            except RingFull:
                self.stats.ring_full_waits += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackstoreBusy(f"{self.name}: command ring full") from None
                with contextlib.suppress(TimeoutError):
                    await self._wait(worker.room, left)
        fut: asyncio.Future[Completion] = loop.create_future()
        timer = None
        if self.timeout is not None:
            timer = loop.call_later(self.timeout, self._timed_out, worker, cmd_id)
        worker.pending[cmd_id] = _Pending(fut, timer)
        worker.kick.ring()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await fut
            raise

    def _on_done(self, worker: Worker) -> None:
        worker.done.drain()
        # A process told to stop still completes its commands; a killed one is not heard.
        if worker.state is not State.DEAD and not worker.why:
            self._reap(worker)

    def _reap(self, worker: Worker) -> None:
        """Hand completions to their commands; a ring that breaks the ABI kills its process."""
        try:
            completions = worker.target.reap()
        except RingBroken as exc:
            self.stats.broken_rings += 1
            worker.ring_trusted = False
            self.kill(worker, f"broke the ring: {exc}")
            return
        for comp in completions:
            p = worker.pending.pop(comp.cmd_id, None)
            if p is None:  # the target validated it: cannot happen
                continue
            if p.timer is not None:
                p.timer.cancel()
            worker.completed += 1
            if not p.fut.done():
                p.fut.set_result(comp)
        if completions:
            self._wake(worker.room)

    def _timed_out(self, worker: Worker, cmd_id: int) -> None:
        if cmd_id in worker.pending and worker.state is not State.DEAD:
            self.stats.timeouts += 1
            self.kill(worker, f"command {cmd_id} outstanding for more than {self.timeout} s")

    # -- shutdown ---------------------------------------------------------------------------

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Lifelines closed + SIGTERM, wait ``grace``, SIGKILL the rest; all gone on return."""
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        self._wake(self._changed)
        for slot in self.slots:
            w = slot.worker
            if w is None:
                continue
            if w.state is State.LIVE:
                w.state = State.DYING
            with contextlib.suppress(OSError):
                os.close(w.lifeline)
            w.lifeline = -1
            self._signal(w, signal.SIGTERM)
        if await self._all_gone(grace):
            return
        for slot in self.slots:
            if slot.worker is not None:
                log.warning(
                    "%s: handler %d did not stop in %.1f s: SIGKILL",
                    self.name, slot.worker.pid, grace,
                )  # fmt: skip
                slot.worker.why = "did not stop in time"
                self._signal(slot.worker, signal.SIGKILL)
        if not await self._all_gone(KILL_WAIT):
            self.close_now()

    async def _all_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while any(s.worker is not None for s in self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await self._wait(self._changed, min(left, 0.5))
        return True

    def close_now(self) -> None:
        """Synchronous last resort (no loop to wait on): SIGKILL, reap, release everything."""
        self._stopping = True
        loop = self._loop
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
            w = slot.worker
            if w is None:
                continue
            w.state = State.DYING
            self._signal(w, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=KILL_WAIT)
            if loop is not None and not loop.is_closed():
                for fd in (w.pidfd, w.done.fd, w.stderr):
                    if fd >= 0:
                        with contextlib.suppress(Exception):
                            loop.remove_reader(fd)
            w.state = State.DEAD
            if w.proc.returncode is None:
                log.error("%s: handler %d survived SIGKILL; leaking it", self.name, w.pid)
                continue
            self._release(w)
            slot.worker = None
