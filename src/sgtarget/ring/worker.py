"""A handler process: ``python -m sgtarget.ring.worker ...`` serves one ring with one handler.

::

    python -m sgtarget.ring.worker --ring-fd FD --ring-size BYTES --data-fd FD --data-size BYTES
        --data-off BYTES --kick-fd FD --done-fd FD --handler NAME [--param KEY=VALUE ...]
        --size BYTES --block-size 512 --lifeline-fd FD [--threads N] [--pi TYPE]

The fds are inherited from the target (``pass_fds``): two memfds (the ring: mailbox and
command ring; the data area), two eventfds (kick: target -> handler, done: handler -> target)
and the read end of the lifeline pipe, whose write end only the target holds.

The main thread blocks in ``poll`` on the kick eventfd, the lifeline and a wake-up pipe (signals
and fatal errors of the command threads); it never busy-polls. On a kick it drains the eventfd,
then fetches (``UserRing.fetch``, which snapshots every request) and hands each request to a
pool of ``--threads`` threads (default 4), so commands run concurrently — file I/O releases
the GIL — and complete out of order. A thread completes its command under the lock that also
serialises ``fetch`` (``UserRing`` is not thread-safe) and rings the done doorbell once for
every completion no other thread has signalled yet, so simultaneous completions share one ring.

``--threads 0`` runs every command in the poll loop itself, one after another, ringing after
each blocking one so the target can answer it at once. That skips two thread hand-offs per
command (a futex wake-up and a GIL switch each way): measured, it takes 22-30 % less of the
handler process's CPU on 1 MiB READs and WRITEs of a page-cache file. Queue depth then comes
from more handler processes (``handlers=N``) instead of threads; media that need a queue depth
per process (disks, network files) want threads. Non-blocking handlers (null, RAM) always run in
the loop, in batches with one ring per batch.

A command's buffers are views of the shared map (``SharedMap.views``); an iovec outside the data
area is the target's mistake and completes CHECK CONDITION / INVALID FIELD IN CDB (05/24/00)
without the handler seeing it. Views are released when the command completes.

Protection information: dif iovecs (``iov_dif_cnt``) are mapped like the data and given to a
PI-aware handler (``Handler.protection``) as ``pi_bufs``; for any other handler the command
completes INVALID FIELD IN CDB without reaching it. ``--pi TYPE`` (the LUN's ``handler_pi=1``)
asks the handler to store the tuples of a LUN of that protection type: a handler that is not
PI-aware after ``open`` is closed and the process exits 1 with one error line saying so.

Task management (``TmrNotice``: ABORT TASK, LUN RESET, ...) is logged at debug level and
otherwise ignored: commands already fetched run to the end and complete normally, as a kernel's
TCMU expects (it waits for the completion of an aborted command before it reuses its data
area; the status is then discarded). A TMR entry's ring space is returned at once (done rung).

Exit status: 0 after lifeline EOF (the target is gone), SIGTERM or SIGINT, once every fetched
command has completed; 1 when the maps or the handler cannot be opened; 2 for bad arguments;
3 when the ring breaks the ABI (``UserRing`` raises), after the commands running have ended.
Output goes to stderr, only for errors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from sgtarget.ring.abi import MailboxFlag, TmrType
from sgtarget.ring.handler import (
    Asc,
    Handler,
    HandlerConfig,
    Result,
    SenseKey,
    execute,
    open_handler,
)
from sgtarget.ring.shm import Doorbell, SharedMap, SharedMemory
from sgtarget.ring.user import Request, TmrNotice, UserRing

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START = 1
EXIT_RING = 3
DEFAULT_THREADS = 4
#: An iovec outside the data area: the target sent garbage.
BAD_IOV = Result.check_condition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
INTERNAL_ERROR = Result.check_condition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


def _tmr_name(tmr_type: int) -> str:
    try:
        return TmrType(tmr_type).name
    except ValueError:
        return f"TMR {tmr_type}"


class Worker:
    """Runs the requests of one ring on a handler with a thread pool; see the module doc."""

    def __init__(
        self, ring: UserRing, smap: SharedMap, handler: Handler, done: Doorbell, threads: int
    ) -> None:
        self._ring = ring
        self._map = smap
        self._handler = handler
        self._done = done
        #: ``None``: every command runs in the poll loop (``--threads 0``).
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="ring-cmd") if threads > 0 else None
        )
        #: Serialises every UserRing call (fetch, complete) and ``_unrung``.
        self._lock = threading.Lock()
        #: One command at a time for a handler that is not ``concurrent``.
        self._serial = None if handler.concurrent else threading.Lock()
        self._unrung = 0
        self._read_len = bool(ring.flags & MailboxFlag.CAP_READ_LEN)
        self._wake_w = -1
        self.stop_reason: str | None = None
        self.failure: str | None = None

    # -- the main loop -----------------------------------------------------------------------

    def run(self, kick: Doorbell, lifeline: int) -> int:
        """Serve until lifeline EOF, SIGTERM/SIGINT or a ring failure; the exit status."""
        wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        poller = select.poll()
        for fd in (kick.fd, lifeline, wake_r):
            poller.register(fd, select.POLLIN)
        try:
            self._fetch()  # anything the target submitted before we were up
            while self.stop_reason is None and self.failure is None:
                kicked = False
                for fd, events in poller.poll():
                    if fd == kick.fd:
                        kick.drain()
                        kicked = True
                    elif fd == lifeline:
                        self._read_lifeline(lifeline, events)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                if kicked and self.stop_reason is None:
                    self._fetch()
            log.debug("stopping (%s), %d commands in flight", self.stop_reason, self.pending())
        finally:
            # In-flight commands finish and complete; after a ring failure only those running.
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=self.failure is not None)
            signal.set_wakeup_fd(old_wakeup)
            for sig, old in old_handlers.items():
                signal.signal(sig, old)
            os.close(wake_r)
            os.close(self._wake_w)
            self._wake_w = -1
        if self.failure is not None:
            log.error("ring failure: %s", self.failure)
            return EXIT_RING
        return EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # The wake-up fd has been written by the C handler already: poll returns.
        self.stop_reason = signal.Signals(signum).name

    def _read_lifeline(self, fd: int, events: int) -> None:
        data = b""
        if events & select.POLLIN:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
        if not data:  # EOF (or POLLHUP/POLLERR without data): the target is gone
            self.stop_reason = "lifeline closed"

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"!")

    def _fail(self, why: str) -> None:
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = why
        if first:
            self._wake()

    # -- fetch and run -----------------------------------------------------------------------

    def _fetch(self) -> None:
        try:
            with self._lock:
                items = self._ring.fetch()
        except Exception as exc:  # RingCorrupt, or worse: the ring is unusable
            self._fail(f"fetch: {exc}")
            return
        tmr = False
        inline: list[Request] = []
        pool = self._pool
        for item in items:
            if isinstance(item, TmrNotice):
                tmr = True
                log.debug(
                    "%s for cmd_ids %s: commands already running finish",
                    _tmr_name(item.tmr_type),
                    list(item.cmd_ids),
                )
            elif pool is None or not self._handler.blocking:
                inline.append(item)
            else:
                pool.submit(self._run, item)
        if inline:
            self._run_inline(inline)
        if tmr:
            self._done.ring()  # the TMR entries' ring space came back

    def _run_inline(self, reqs: list[Request]) -> None:
        """Run the batch here; ring the done doorbell once, or after each command of a
        blocking handler (its commands take long enough for the target to want each at once)."""
        each = self._handler.blocking
        for req in reqs:
            if not self._complete(req, self._result(req)):
                return
            if each:
                with self._lock:
                    self._unrung = 0
                self._done.ring()
        with self._lock:
            n, self._unrung = self._unrung, 0
        if n:
            self._done.ring()

    def _result(self, req: Request) -> Result:
        try:
            return self._execute(req)
        except Exception:  # execute() maps handler errors: this is the worker's own bug
            log.exception("cmd_id %d (CDB %s) failed in the worker", req.cmd_id, req.cdb.hex())
            return INTERNAL_ERROR

    def _complete(self, req: Request, result: Result) -> bool:
        read_len = result.read_len if self._read_len else None
        try:
            with self._lock:
                self._ring.complete(
                    req.cmd_id,
                    result.status,
                    result.sense,
                    read_len=read_len,
                    unknown_op=result.unknown_op,
                )
                self._unrung += 1
        except Exception as exc:
            self._fail(f"completing cmd_id {req.cmd_id}: {exc}")
            return False
        return True

    def _run(self, req: Request) -> None:
        if not self._complete(req, self._result(req)):
            return
        # Completions other threads made meanwhile are signalled by this one ring.
        with self._lock:
            n, self._unrung = self._unrung, 0
        if n:
            self._done.ring()

    def _views(self, iovs: Sequence[tuple[int, int]], out: list[memoryview]) -> bool:
        data_off = self._map.data_off
        for base, length in iovs:
            if base < data_off:  # the ring itself is never a data buffer
                return False
            try:
                out.append(self._map.view(base, length))
            except ValueError:
                return False
        return True

    def _execute(self, req: Request) -> Result:
        bufs: list[memoryview] = []
        bidi: list[memoryview] = []
        pi: list[memoryview] = []
        try:
            if req.dif_iovs and not self._handler.protection:
                log.warning(
                    "cmd_id %d (CDB %s): protection information for a handler that does not "
                    "store it",
                    req.cmd_id,
                    req.cdb.hex(),
                )
                return BAD_IOV
            if not (
                self._views(req.iovs, bufs)
                and self._views(req.bidi_iovs, bidi)
                and self._views(req.dif_iovs, pi)
            ):
                log.warning(
                    "cmd_id %d (CDB %s): iovecs %s / %s / %s outside the data area",
                    req.cmd_id,
                    req.cdb.hex(),
                    req.iovs,
                    req.bidi_iovs,
                    req.dif_iovs,
                )
                return BAD_IOV
            if self._serial is None:
                return execute(self._handler, req.cdb, bufs, bidi, pi)
            with self._serial:
                return execute(self._handler, req.cdb, bufs, bidi, pi)
        finally:
            for view in (*bufs, *bidi, *pi):
                with contextlib.suppress(BufferError):  # re-exported by the handler: gc'd later
                    view.release()

    def pending(self) -> int:
        with self._lock:
            return self._ring.pending()


# ---- command line --------------------------------------------------------------------------


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _nonneg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sgtarget.ring.worker",
        description="Serve one TCMU-compatible command ring with a handler (started by sgtarget).",
    )
    p.add_argument("--ring-fd", type=_nonneg, required=True)
    p.add_argument("--ring-size", type=_nonneg, required=True)
    p.add_argument("--data-fd", type=_nonneg, required=True)
    p.add_argument("--data-size", type=_nonneg, required=True)
    p.add_argument("--data-off", type=_nonneg, required=True)
    p.add_argument("--kick-fd", type=_nonneg, required=True)
    p.add_argument("--done-fd", type=_nonneg, required=True)
    p.add_argument("--lifeline-fd", type=_nonneg, required=True)
    p.add_argument("--handler", required=True, help="file, null or MODULE:CLASS")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--size", type=_nonneg, required=True)
    p.add_argument("--block-size", type=_nonneg, default=512)
    p.add_argument("--threads", type=_nonneg, default=DEFAULT_THREADS)
    p.add_argument(
        "--pi",
        type=int,
        choices=(0, 1, 2, 3),
        default=0,
        help="the handler stores the T10 PI tuples of a LUN of this protection type",
    )
    args = p.parse_args(argv)
    if args.block_size <= 0 or args.size <= 0 or args.size % args.block_size:
        p.error(f"--size {args.size} is not a positive multiple of --block-size {args.block_size}")
    params: dict[str, str] = {}
    for key, value in args.param:
        if key in params:
            p.error(f"--param {key} given twice")
        params[key] = value
    args.params = params
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format=f"sgtarget.ring.worker[{os.getpid()}] %(levelname)s: %(message)s",
    )
    try:
        ring_mem = SharedMemory.attach(args.ring_fd, args.ring_size)
    except (OSError, ValueError) as exc:
        log.error("cannot map the ring (fd %d): %s", args.ring_fd, exc)
        return EXIT_START
    try:
        return _serve(args, ring_mem)
    finally:
        gc.collect()  # views still referenced from cycles or tracebacks go before the unmap
        ring_mem.close()


def _serve(args: argparse.Namespace, ring_mem: SharedMemory) -> int:
    try:
        data_mem = SharedMemory.attach(args.data_fd, args.data_size)
    except (OSError, ValueError) as exc:
        log.error("cannot map the data area (fd %d): %s", args.data_fd, exc)
        return EXIT_START
    try:
        # Every view of the maps (ring, SharedMap, commands' buffers) dies with this call.
        return _serve_maps(args, ring_mem, data_mem)
    finally:
        gc.collect()
        data_mem.close()


def _serve_maps(args: argparse.Namespace, ring_mem: SharedMemory, data_mem: SharedMemory) -> int:
    try:
        ring = UserRing(ring_mem.buf)
        smap = SharedMap(ring_mem.buf, data_mem.buf, args.data_off)
    except Exception as exc:
        log.error("unusable ring: %s", exc)
        return EXIT_RING
    config = HandlerConfig(args.size, args.block_size, args.params, protection=args.pi)
    try:
        handler = open_handler(args.handler, config)
    except Exception as exc:
        log.error("cannot open handler %s: %s", args.handler, exc)
        return EXIT_START
    if config.protection and not handler.protection:
        log.error(
            "cannot open handler %s: it does not store protection information "
            "(Handler.protection is False), which handler_pi=1 needs",
            args.handler,
        )
        with contextlib.suppress(Exception):
            handler.close()
        return EXIT_START
    try:
        worker = Worker(ring, smap, handler, Doorbell.attach(args.done_fd), args.threads)
        return worker.run(Doorbell.attach(args.kick_fd), args.lifeline_fd)
    finally:
        try:
            handler.close()
        except Exception as exc:
            log.error("closing handler %s: %s", args.handler, exc)


if __name__ == "__main__":
    sys.exit(main())
