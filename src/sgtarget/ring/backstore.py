"""``RingBackstore``: a LUN served by handler processes through TCMU rings.

``--lun file:PATH,handler=copy|zerocopy|isolated[,handlers=N][,handler_timeout=SECONDS]`` (and
``null:size=...,handler=...``). The target process keeps what it had -- it creates, sizes and
locks the file -- and every I/O becomes one ring command (READ(16), WRITE(16), SYNCHRONIZE
CACHE(16), PRE-FETCH(16), WRITE SAME(16) with UNMAP+NDOB, GET LBA STATUS(16)) to the least
loaded of ``handlers`` worker processes (``supervisor.Supervisor``). ``io()`` completes from the
done doorbell on the event loop: no thread hop.

The three data modes differ in what memory the handler sees (``--data-fd``):

- ``copy`` (the kernel's TCMU): a data area of its own (``dataarea.DataArea``, one per process).
  WRITE payload is copied into data-area blocks before submit, READ payload copied out after
  the completion; every byte counted as ``ring-copy`` in the pool's copy accounting.
- ``zerocopy``: the data area IS the pool arena (``Pool.fd``): iovecs are the arena offsets of
  the very views the socket filled; no payload copy. READ buffers are zeroed before the handler
  gets them (KERNEL_NOTES rule 4: never another command's stale bytes). KEEP_BUF is off and the
  command timeout is off by default (review rules 1-2): killing a process that may be writing
  into pool pages is the one safe way to take them back, and a timeout would do that to a
  handler that is only slow. The handler maps the whole arena: use it for trusted handlers.
- ``isolated``: the handler maps only a bounce window (``datapath.mapping.WindowMapping``, one
  per process): payload is copied through it with swiotlb's rules (``window-map`` copies),
  READ buffers zeroed before they are copied in.

Views outside the arena (the caller's own bytes, read-only buffers) are staged through pool
blocks in zerocopy and isolated mode (``ring-stage`` copies).

Protection information (``pi=1|2|3``) has two homes:

- by default the target keeps it: ``protection`` is the sidecar ``inner`` opened, the LU
  splits, checks, generates and stores tuples, and handlers see only the data -- so every
  handler serves PI LUNs without knowing of PI (TCMU's ``iov_dif_cnt`` stays 0);
- ``handler_pi=1``: the handler stores the tuples (it must be PI-aware, ``Handler.protection``;
  one that is not exits at start with an error line, and the supervisor's failing-slot rule
  then makes the LUN answer MEDIUM ERROR). ``pi_with_data`` is set and ``RingIO`` is a
  ``PiBackstoreIO``: ``readv_pi``/``writev_pi`` send READ(16)/WRITE(16) whose tuple buffer
  travels as the same command's dif iovecs, mapped like the data in every mode (data-area
  blocks in copy mode; pool views, or staged through pool blocks, in zerocopy mode; the
  window in isolated mode). The LU still splits, checks before writing, generates for
  protect 0 and checks what it reads; only where tuples are stored moves. ``protection`` is a
  ``RingProtection``: it holds the format type (the target answers READ CAPACITY, INQUIRY
  ...), its ``discard`` does nothing because the handler gives escape tuples to what it
  unmaps (WRITE SAME(16) UNMAP reaches it as before), and ``format`` sends FORMAT UNIT, which
  a PI-aware handler answers by making every tuple escape. The target still creates (or
  checks) the sidecar ``PATH.pi`` when it builds a ``file`` LUN, and keeps it open, but never
  reads or writes it: the handler process opens it (``handler.open_file``). The built-in
  ``file`` handler is PI-aware; ``direct=1`` is refused with ``handler_pi=1`` (the split data
  pieces sit between tuples, not on O_DIRECT's alignment, and a handler gets no bounce).

Hostile-handler safety on this side: each command's buffers and lengths are this module's own
records; from a ``Completion`` only status, sense and read_len are used; a READ with
``read_len`` short of its length gets the rest of the caller's buffers zeroed. A handler that
breaks the ring is killed and restarted like a crashed one (``supervisor``).

The synchronous ``Backstore`` methods work from any thread but the loop's: each is a blocking
round trip onto the loop the rings belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sgtarget.backstores.base import (
    Backstore,
    BackstoreBusy,
    BackstoreError,
    Buffers,
    Extents,
    Runner,
    WriteDone,
)
from sgtarget.backstores.pi import TUPLE_SIZE, ProtectionStore
from sgtarget.datapath.mapping import MapDirection, Mapped, WindowFull, WindowMapping
from sgtarget.datapath.pool import Pool
from sgtarget.datapath.sglist import ScatterList
from sgtarget.datapath.stats import IN, OUT
from sgtarget.datapath.views import byte_view, copy_views, prefix, split_views
from sgtarget.ring.dataarea import DEFAULT_DATA_SIZE, DataArea, Extent
from sgtarget.ring.supervisor import (
    DEFAULT_CMDR_SIZE,
    KILL_WAIT,
    STOP_GRACE,
    HandlerCommand,
    NotSubmitted,
    State,
    Supervisor,
    Worker,
)
from sgtarget.ring.target import Completion

T = TypeVar("T")
log = logging.getLogger(__name__)

MODES = ("copy", "zerocopy", "isolated")
#: ``--lun`` keys of a ring LUN, with what they set.
RING_KEYS: Mapping[str, str] = {
    "handler": "run the backstore in handler processes behind rings: copy, zerocopy or isolated",
    "handlers": "how many handler processes (default 1)",
    "handler_timeout": "seconds a command may take before its handler is killed and restarted "
    "(default 30, 0 = off; off by default with handler=zerocopy)",
    "handler_pi": "1: the handler process stores the T10 PI tuples (needs pi= and a PI-aware "
    "handler); 0 (default): the target keeps them and handlers see only data",
    "handler_threads": "threads per handler process (default 0: commands run one after another "
    "in the process's loop, the cheapest for page-cache files; more for media that need a "
    "queue depth per process)",
}
#: Kinds a handler process can serve (``ram`` lives in the target's own memory).
RING_KINDS = ("file", "null")
DEFAULT_TIMEOUT = 30.0
MAX_HANDLERS = 64
MAX_THREADS = 256
#: Bytes per ring command: larger I/Os are split (the SCSI layer's windows are 1 MiB anyway).
MAX_CMD_BYTES = 1024 * 1024
#: Isolated mode's bounce window per handler process.
DEFAULT_WINDOW_SIZE = 16 * 1024 * 1024
#: Seconds a command waits for data-area or window room before BUSY.
AREA_WAIT = 5.0
#: Seconds of no data-area use after which its pages are given back (``DataArea.reclaim``).
RECLAIM_DELAY = 5.0
COPY_REASON = "ring-copy"
STAGE_REASON = "ring-stage"
#: GET LBA STATUS allocation length per command (255 descriptors).
LBA_STATUS_LEN = 8 + 16 * 255
_MAX_LBA_STATUS_ROUNDS = 4096

_RW16 = struct.Struct(">BBQIBB")  # opcode, flags, LBA, blocks/length, group, control
_LBA_DESC = struct.Struct(">QIB3x")  # LBA, blocks, provisioning status (low 4 bits)
READ_16 = 0x88
WRITE_16 = 0x8A
PRE_FETCH_16 = 0x90
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
GET_LBA_STATUS = 0x12
FORMAT_UNIT = 0x04
#: FORMAT UNIT byte 1, FMTPINFO = 10b: formatted with protection information.
_FMTPINFO_PI = 0x80
_UNMAP_NDOB = 0x08 | 0x01
_GOOD = 0x00
_CHECK_CONDITION = 0x02
_RETRYABLE = frozenset({0x08, 0x28})  # BUSY, TASK SET FULL
_MAX_BLOCKS = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class RingOptions:
    """The ``handler*`` keys of a LUN."""

    mode: str
    handlers: int = 1
    #: Seconds; ``None``: the mode's default; 0: off.
    timeout: float | None = None
    data_size: int = DEFAULT_DATA_SIZE
    window_size: int = DEFAULT_WINDOW_SIZE
    #: Command ring bytes per handler process.
    ring_size: int = DEFAULT_CMDR_SIZE
    #: Threads per handler process; 0: commands run in its loop; ``None``: the worker's default.
    threads: int | None = None
    #: The handler stores the PI tuples (``handler_pi=1``; the module docstring).
    handler_pi: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"handler={self.mode!r} is not one of {', '.join(MODES)}")
        if not 1 <= self.handlers <= MAX_HANDLERS:
            raise ValueError(f"handlers={self.handlers} is not from 1 to {MAX_HANDLERS}")
        if self.timeout is not None and not 0 <= self.timeout < 1e6:
            raise ValueError(f"handler_timeout={self.timeout} is not 0 (off) or positive")
        if self.threads is not None and not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"handler_threads={self.threads} is not from 0 to {MAX_THREADS}")

    @property
    def command_timeout(self) -> float | None:
        """Seconds, or ``None`` for no timeout (zerocopy's default, review rule 2)."""
        if self.timeout is None:
            return None if self.mode == "zerocopy" else DEFAULT_TIMEOUT
        return self.timeout or None


def pop_ring_options(kind: str, params: dict[str, str]) -> RingOptions | None:
    """Take the ``handler*`` keys out of ``params``; ``None`` if the LUN has no handler.

    ``ValueError`` with a one-line reason for a bad value, a handler key without ``handler=``,
    or a kind a handler process cannot serve.
    """
    raw = {k: params.pop(k) for k in list(params) if k in RING_KEYS}
    if not raw:
        return None
    if "handler" not in raw:
        given = ", ".join(f"{k}={v}" for k, v in raw.items())
        raise ValueError(f"{given} needs handler={'|'.join(MODES)}")
    mode = raw["handler"].lower()
    if kind not in RING_KINDS:
        raise ValueError(
            f"handler={mode}: {kind} LUNs cannot run in a handler process "
            f"(only {', '.join(RING_KINDS)})"
        )
    handlers = _count(raw, "handlers", 1)
    threads = _count(raw, "handler_threads", 0)
    handler_pi = raw.get("handler_pi", "0")
    if handler_pi not in ("0", "1"):
        raise ValueError(f"handler_pi={handler_pi!r} is not 0 or 1")
    if handler_pi == "1":
        if "pi" not in params:
            raise ValueError("handler_pi=1 needs pi=1|2|3 (the LUN has no protection information)")
        if params.get("direct", "0").lower() not in ("0", "no", "false"):
            raise ValueError("handler_pi=1 cannot be combined with direct=1")
    timeout: float | None = None
    if "handler_timeout" in raw:
        text = raw["handler_timeout"]
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"handler_timeout={text!r} is not a number of seconds") from None
        if not 0 <= timeout < 1e6:  # also refuses nan and inf
            raise ValueError(f"handler_timeout={text!r} is not 0 (off) or positive seconds")
    return RingOptions(
        mode=mode,
        handlers=handlers,
        timeout=timeout,
        threads=threads,
        handler_pi=handler_pi == "1",
    )


def _count(raw: Mapping[str, str], key: str, default: int) -> int:
    text = raw.get(key)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{key}={text!r} is not a number")
    return int(text)


class _Area:
    """What one worker maps as its data area, closed only when no command uses it any more
    (its process may die while a command still copies out of it)."""

    __slots__ = ("_close", "closing", "data", "fd", "size", "users", "window")

    def __init__(
        self,
        fd: int,
        size: int,
        close: Callable[[], None],
        *,
        data: DataArea | None = None,
        window: WindowMapping | None = None,
    ) -> None:
        self.fd = fd
        self.size = size
        self._close = close
        self.data = data
        self.window = window
        self.users = 0
        self.closing = False

    def hold(self) -> None:
        self.users += 1

    def drop(self) -> None:
        self.users -= 1
        if self.closing and self.users == 0:
            self._close()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.users == 0:
            self._close()


def _zero_from(views: Sequence[memoryview], start: int) -> None:
    """Zero every byte of ``views`` from byte ``start`` of their concatenation on."""
    pos = 0
    for v in views:
        n = len(v)
        cut = max(0, start - pos)
        if cut < n:
            ctypes.memset(_address(v, cut), 0, n - cut)
        pos += n


def _address(view: memoryview, offset: int = 0) -> int:
    """The address of ``view[offset]`` (a writable byte view)."""
    c = ctypes.c_char.from_buffer(view, offset)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def _split_iovs(
    iovs: Sequence[tuple[int, int]], n: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Iovecs cut after ``n`` bytes: the data iovecs and the dif iovecs after them."""
    head: list[tuple[int, int]] = []
    tail: list[tuple[int, int]] = []
    for off, ln in iovs:
        if n >= ln:
            head.append((off, ln))
            n -= ln
        elif n > 0:
            head.append((off, n))
            tail.append((off + n, ln - n))
            n = 0
        else:
            tail.append((off, ln))
    return head, tail


def _chunks(views: Sequence[memoryview], limit: int) -> list[list[memoryview]]:
    """``views`` cut into runs of at most ``limit`` bytes (slicing views at the cuts)."""
    out: list[list[memoryview]] = [[]]
    room = limit
    for v in views:
        while len(v):
            if room == 0:
                out.append([])
                room = limit
            piece = v[:room]
            out[-1].append(piece)
            room -= len(piece)
            v = v[len(piece) :]
    return out


class RingBackstore(Backstore):
    """A backstore whose I/O runs in handler processes behind rings (module docstring)."""

    kind: ClassVar[str] = "ring"
    blocking: ClassVar[bool] = False

    def __init__(
        self,
        handler: str,
        params: Mapping[str, str],
        size: int,
        options: RingOptions,
        *,
        inner: Backstore | None = None,
        block_size: int = 512,
        name: str = "lun",
        pi: int = 0,
    ) -> None:
        """``pi``: the protection type of a ``handler_pi`` LUN built without ``inner`` (with
        one, its ``protection`` says)."""
        if size <= 0 or size % block_size:
            raise ValueError(f"ring: size {size} is not a positive multiple of {block_size}")
        super().__init__(size)
        self.options = options
        self.block_size = block_size
        #: The in-process backstore that created, sized and locks the storage (not used for
        #: I/O); closed with this one.
        self.inner = inner
        if inner is not None:
            self.limits = inner.limits
            # By default PI stays in the target process (the sidecar ``inner`` opened).
            self.protection = inner.protection
            if inner.protection is not None:
                pi = inner.protection.ptype
        if options.handler_pi:
            if not pi:
                raise ValueError("handler_pi=1 needs pi=1|2|3 (the LUN has no protection)")
            # The handler stores the tuples: the target keeps only the format.
            self.protection = RingProtection(self, size // block_size, pi)
            self.pi_with_data = True
            self.limits = None  # every mode takes any views (copied, staged or mapped)
        self.handler_command = HandlerCommand(
            handler,
            dict(params),
            size,
            block_size=block_size,
            threads=options.threads,
            protection=pi if options.handler_pi else 0,
        )
        self.name = name
        self.supervisor: Supervisor | None = None
        self._pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arena_addr = 0
        self._room: list[asyncio.Future[None]] = []
        self._reclaim: asyncio.TimerHandle | None = None
        self._aio = RingIO(self)
        self._closed = False

    @classmethod
    def around(cls, inner: Backstore, options: RingOptions) -> RingBackstore:
        """The ring LUN for a ``file``/``null`` backstore built from the same ``--lun`` spec."""
        from sgtarget.backstores.file import FileBackstore  # noqa: PLC0415
        from sgtarget.backstores.null import NullBackstore  # noqa: PLC0415

        params: dict[str, str] = {}
        if isinstance(inner, FileBackstore):
            handler, name = "file", os.path.basename(inner.path)
            params["path"] = os.path.abspath(inner.path)
            if inner.direct:
                params["direct"] = "1"
            if inner.readonly:
                params["readonly"] = "1"
        elif isinstance(inner, NullBackstore):
            handler, name = "null", "null"
        else:
            raise ValueError(f"{inner.kind} LUNs cannot run in a handler process")
        return cls(
            handler,
            params,
            inner.size,
            options,
            inner=inner,
            block_size=inner.block_size,
            name=name,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, pool: Pool) -> None:
        """Start the handler processes on the running loop, sharing ``pool`` (zerocopy's data
        area, isolated's bounce source, staging for views outside it)."""
        if self.supervisor is not None:
            raise RuntimeError("ring backstore already started")
        self._loop = asyncio.get_running_loop()
        self._pool = pool
        self._arena_addr = _address(pool.arena)
        self.supervisor = Supervisor(
            self.handler_command,
            self._make_area,
            workers=self.options.handlers,
            timeout=self.options.command_timeout,
            cmdr_size=self.options.ring_size,
            name=self.name,
        )
        await self.supervisor.start()

    def _make_area(self) -> _Area:
        pool = self._pool
        assert pool is not None
        mode = self.options.mode
        if mode == "zerocopy":
            return _Area(pool.fd, pool.size, lambda: None)
        if mode == "copy":
            data = DataArea(self.options.data_size)
            data.on_free = self._freed
            return _Area(data.fd, data.size, data.close, data=data)
        window = WindowMapping(pool, self.options.window_size)
        return _Area(window.fd, len(window.buffer), window.close, window=window)

    def _freed(self) -> None:
        for fut in self._room:
            if not fut.done():
                fut.set_result(None)
        self._room.clear()

    def io(self, runner: Runner) -> RingIO:
        return self._aio

    async def aclose(self) -> None:
        """Stop the handler processes (they finish their commands), then close ``inner``."""
        if self._closed:
            return
        self._closed = True
        if self._reclaim is not None:
            self._reclaim.cancel()
        if self.supervisor is not None:
            await self.supervisor.stop()
            log.info("%s: handler processes %s", self.name, self.supervisor.stats)
        if self.inner is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.inner.close)

    def close(self) -> None:
        """``aclose`` from another thread (a blocking round trip), or at once (SIGKILL) when
        called on the loop itself or with no loop running. Idempotent."""
        if self._closed:
            return
        loop = self._loop
        sup = self.supervisor
        if sup is not None:
            if loop is not None and loop.is_running() and _running_loop() is not loop:
                fut = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
                fut.result(timeout=STOP_GRACE + KILL_WAIT + 30)
                return
            sup.close_now()
        self._closed = True
        if self._reclaim is not None:
            self._reclaim.cancel()
        if self.inner is not None:
            self.inner.close()

    def describe(self) -> str:
        base = self.inner.describe() if self.inner is not None else self.handler_command.handler
        n = self.options.handlers
        t = self.options.command_timeout
        pi = ", PI stored by the handler" if self.pi_with_data else ""
        return (
            f"{base} in {n} handler process{'es' if n > 1 else ''} "
            f"(handler={self.options.mode}{pi}, timeout {f'{t:g} s' if t else 'off'})"
        )

    # -- the synchronous Backstore interface: round trips onto the ring's loop --------------

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise BackstoreError(f"{self.name}: ring backstore not started")
        if _running_loop() is loop:
            coro.close()
            raise RuntimeError("blocking ring I/O on its own event loop: await io() instead")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def readv(self, offset: int, bufs: Buffers) -> int:
        return self._blocking(self._aio.readv(offset, bufs))

    def writev(self, offset: int, bufs: Buffers) -> int:
        return self._blocking(self._aio.writev(offset, bufs))

    def flush(self) -> None:
        self._blocking(self._aio.flush())

    def prefetch(self, offset: int, length: int) -> None:
        self._blocking(self._aio.prefetch(offset, length))

    def discard(self, offset: int, length: int) -> None:
        self._blocking(self._aio.discard(offset, length))

    def mapped_extents(self, offset: int, length: int) -> Extents:
        return self._blocking(self._aio.mapped_extents(offset, length))

    # -- one ring command ---------------------------------------------------------------------

    def _supervisor(self) -> Supervisor:
        sup = self.supervisor
        if sup is None:
            raise BackstoreError(f"{self.name}: ring backstore not started")
        if self._closed:
            raise BackstoreBusy(f"{self.name}: ring backstore closing")
        return sup

    async def command(
        self,
        cdb: bytes,
        views: Sequence[memoryview],
        *,
        read: bool,
        pi: Sequence[memoryview] = (),
    ) -> int:
        """Run one command with ``views`` as its data buffer (data-in if ``read``) and ``pi``
        as its protection information buffer (dif iovecs, same direction); returns the bytes
        of data the handler produced (``read_len``, at most the buffer's length)."""
        sup = self._supervisor()
        views = [v for v in (byte_view(v) for v in views) if len(v)]
        pi_views = [v for v in (byte_view(v) for v in pi) if len(v)]
        for attempt in range(len(sup.slots) + 1):
            worker = await sup.acquire()
            try:
                if not views and not pi_views:
                    self._check(await sup.execute(worker, cdb, ()), 0, cdb)
                    return 0
                if self.options.mode == "copy":
                    return await self._via_data_area(
                        sup, worker, cdb, views, read=read, pi=pi_views
                    )
                return await self._via_arena(sup, worker, cdb, views, read=read, pi=pi_views)
            except NotSubmitted:
                # Its process died while the command waited for room: nothing ran, so it
                # may go to another (or the restarted) process, a bounded number of times.
                if attempt == len(sup.slots):
                    raise
        raise AssertionError("unreachable")

    async def _room_for(self, worker: Worker, attempt: Callable[[], T | None]) -> T:
        """``attempt()`` until it gives room, waiting for frees up to ``AREA_WAIT``."""
        deadline = time.monotonic() + AREA_WAIT
        loop = self._loop
        assert loop is not None
        while True:
            if worker.state is not State.LIVE:
                raise NotSubmitted(f"{self.name}: handler process {worker.pid} is gone")
            got = attempt()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackstoreBusy(f"{self.name}: handler data area full for {AREA_WAIT} s")
            fut = loop.create_future()
            self._room.append(fut)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, left)
            finally:
                if fut in self._room:
                    self._room.remove(fut)

    async def _via_data_area(
        self,
        sup: Supervisor,
        worker: Worker,
        cdb: bytes,
        views: list[memoryview],
        *,
        read: bool,
        pi: list[memoryview],
    ) -> int:
        area = worker.area
        assert isinstance(area, _Area)
        assert area.data is not None
        data = area.data
        pool = self._pool
        assert pool is not None
        n = sum(len(v) for v in views)
        total = n + sum(len(v) for v in pi)  # data, then its tuples, in one allocation
        area.hold()
        extents: list[Extent] = []
        try:
            extents = await self._room_for(worker, lambda: data.alloc(total))
            dst = data.views(extents)
            if read:
                _zero_from(dst, 0)  # blocks may hold an earlier command's bytes
            else:
                pool.stats.add_copy(COPY_REASON, IN, copy_views([*views, *pi], dst))
            iovs = [(worker.data_off + off, ln) for off, ln in extents]
            data_iovs, dif_iovs = _split_iovs(iovs, n)
            got = self._check(await sup.execute(worker, cdb, data_iovs, dif_iovs), n, cdb)
            if read:
                head, tail = split_views(data.views(extents), n)
                src = prefix(head, got)  # only what the handler produced
                copied = copy_views(src, views) + (copy_views(tail, pi) if pi else 0)
                pool.stats.add_copy(COPY_REASON, OUT, copied)
                _zero_from(views, got)
            return got
        finally:
            if extents:
                data.free(extents)
            area.drop()
            self._schedule_reclaim()

    def _schedule_reclaim(self) -> None:
        """Give idle data-area pages back after ``RECLAIM_DELAY`` quiet seconds."""
        if self._loop is None or self.options.mode != "copy":
            return
        if self._reclaim is not None:
            self._reclaim.cancel()
        self._reclaim = self._loop.call_later(RECLAIM_DELAY, self._reclaim_idle)

    def _reclaim_idle(self) -> None:
        self._reclaim = None
        sup = self.supervisor
        if sup is None:
            return
        for w in sup.workers():
            area = w.area
            if isinstance(area, _Area) and area.data is not None and not area.closing:
                area.data.reclaim()

    async def _via_arena(
        self,
        sup: Supervisor,
        worker: Worker,
        cdb: bytes,
        views: list[memoryview],
        *,
        read: bool,
        pi: list[memoryview],
    ) -> int:
        pool = self._pool
        assert pool is not None
        n = sum(len(v) for v in views)
        staged: list[tuple[ScatterList, memoryview]] = []
        area = worker.area
        assert isinstance(area, _Area)
        area.hold()
        mapped: Mapped | None = None
        try:
            # Data, then its tuples: one list of segments, cut into data and dif iovecs.
            segs = self._arena_segments(pool, [*views, *pi], staged, read)
            window = area.window
            if window is None:  # zerocopy: the arena is the data area
                if read:
                    for off, ln in segs:  # rule 4: the handler never sees stale bytes
                        ctypes.memset(self._arena_addr + off, 0, ln)
                iovs = [(worker.data_off + off, ln) for off, ln in segs]
            else:
                direction = MapDirection.FROM_CONSUMER if read else MapDirection.TO_CONSUMER

                def attempt() -> Mapped | None:
                    try:  # a READ's window is zeroed, not a copy of the stale buffer
                        return window.map_segments(segs, direction, zero=read)
                    except WindowFull:
                        return None

                mapped = await self._room_for(worker, attempt)
                iovs = [(worker.data_off + off, ln) for off, ln in mapped.entries]
            data_iovs, dif_iovs = _split_iovs(iovs, n)
            got = self._check(await sup.execute(worker, cdb, data_iovs, dif_iovs), n, cdb)
            if mapped is not None:
                assert window is not None
                window.unmap(mapped)  # copies a READ's data back into the arena
                mapped = None
                self._freed()
            if read:
                self._zero_segments(segs, got, n)
                for sg, view in staged:
                    pool.stats.add_copy(STAGE_REASON, OUT, copy_views(sg.views(), [view]))
            return got
        finally:
            if mapped is not None and area.window is not None:
                area.window.unmap(mapped, discard=True)
                self._freed()
            for sg, _view in staged:
                sg.release()
            area.drop()

    def _arena_segments(
        self,
        pool: Pool,
        views: list[memoryview],
        staged: list[tuple[ScatterList, memoryview]],
        read: bool,
    ) -> list[tuple[int, int]]:
        """``(arena offset, length)`` of each view, adjacent ones merged; views outside the
        arena are staged through pool blocks (appended to ``staged``; WRITE data copied in)."""
        segs: list[tuple[int, int]] = []
        base = self._arena_addr
        bs = pool.block_size
        for v in views:
            n = len(v)
            off = -1
            if not v.readonly:
                with contextlib.suppress(TypeError, ValueError):
                    off = _address(v) - base
            if off >= 0 and off + n <= pool.size:
                pieces = [(off, n)]
            else:
                sg = pool.try_alloc(n)
                if sg is None:
                    raise BackstoreBusy(f"{self.name}: pool full staging {n} bytes")
                staged.append((sg, v))
                if not read:
                    sg.copy_in(v, reason=STAGE_REASON)
                pieces = [(first * bs, ln) for first, _count, ln in sg.segments]
            for off, ln in pieces:
                if segs and segs[-1][0] + segs[-1][1] == off:
                    segs[-1] = (segs[-1][0], segs[-1][1] + ln)
                else:
                    segs.append((off, ln))
        return segs

    def _zero_segments(self, segs: list[tuple[int, int]], start: int, end: int) -> None:
        """Zero bytes ``[start, end)`` of the segments' concatenation."""
        pos = 0
        for off, ln in segs:
            lo, hi = max(start, pos), min(end, pos + ln)
            if lo < hi:
                ctypes.memset(self._arena_addr + off + lo - pos, 0, hi - lo)
            pos += ln

    def _range(self, what: str, offset: int, length: int) -> None:
        bs = self.block_size
        if offset % bs or length % bs:
            raise BackstoreError(
                f"{self.name}: {what} {offset}+{length} is not in whole {bs}-byte blocks"
            )
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BackstoreError(f"{self.name}: {what} {offset}+{length} out of range")

    def _check(self, comp: Completion, n: int, cdb: bytes) -> int:
        """Bytes of data the command produced; BUSY/TASK SET FULL -> ``BackstoreBusy``, any
        other failure -> ``BackstoreError``. Only status, sense and read_len are read."""
        op = f"0x{cdb[0]:02x}"
        if comp.unknown_op:
            raise BackstoreError(f"{self.name}: the handler does not support opcode {op}")
        status = comp.status
        if status == _GOOD:
            return n if comp.read_len is None else min(comp.read_len, n)
        if status in _RETRYABLE:
            raise BackstoreBusy(f"{self.name}: handler answered status 0x{status:02x} to {op}")
        if status == _CHECK_CONDITION:
            raise BackstoreError(
                f"{self.name}: handler CHECK CONDITION for {op}, sense {comp.sense[:18].hex()}"
            )
        raise BackstoreError(f"{self.name}: handler status 0x{status:02x} for {op}")


class RingProtection(ProtectionStore):
    """The protection format of a ``handler_pi=1`` LUN, whose tuples the handler stores.

    Tuples travel with the data (``RingIO.readv_pi``/``writev_pi``), so ``read`` and
    ``write`` refuse; ``discard`` does nothing because the handler gives escape tuples to
    what it unmaps (the WRITE SAME(16) UNMAP that deallocated the range); ``format`` sends
    FORMAT UNIT to the handler, then records the new type, which the target reports.
    """

    blocking = True  # ``format`` is a round trip onto the ring's loop

    def __init__(self, backstore: RingBackstore, nblocks: int, ptype: int) -> None:
        super().__init__(nblocks, ptype)
        self._backstore = backstore

    def _elsewhere(self) -> BackstoreError:
        return BackstoreError(
            f"{self._backstore.name}: the handler stores the tuples; they travel with the data"
        )

    def read(self, lba: int, bufs: Buffers) -> None:
        raise self._elsewhere()

    def write(self, lba: int, bufs: Buffers) -> None:
        raise self._elsewhere()

    def discard(self, lba: int, nblocks: int) -> None:
        self._check(lba, nblocks * TUPLE_SIZE)  # the handler's unmap did it

    def format(self, ptype: int) -> None:
        if ptype not in (0, 1, 2, 3):
            raise ValueError(f"protection type {ptype} is not 0, 1, 2 or 3")
        self._backstore._blocking(self._backstore._aio.format_pi(ptype))
        self.ptype = ptype

    def _read_raw(self, offset: int, bufs: Buffers) -> None:
        raise self._elsewhere()

    def _write_raw(self, offset: int, data: bytes) -> None:
        raise self._elsewhere()

    def _zero_raw(self, offset: int, length: int) -> None:
        raise self._elsewhere()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RingIO:
    """``BackstoreIO`` of a ``RingBackstore``: each operation one or more ring commands,
    completed from the done doorbell on the loop (no thread hop)."""

    __slots__ = ("_bs",)

    def __init__(self, backstore: RingBackstore) -> None:
        self._bs = backstore

    def readv_now(self, offset: int, bufs: Buffers) -> int | None:
        return None  # the handler answers through the ring, never before this returns

    def writev_now(self, offset: int, bufs: Buffers) -> int | None:
        return None

    def writev_soon(self, offset: int, bufs: Buffers, done: WriteDone) -> bool:
        return False

    async def readv(self, offset: int, bufs: Buffers) -> int:
        return await self._transfer(READ_16, offset, bufs)

    async def writev(self, offset: int, bufs: Buffers) -> int:
        return await self._transfer(WRITE_16, offset, bufs)

    async def readv_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int:
        """READ(16)s that also fill ``pi_bufs`` with the blocks' tuples (dif iovecs)."""
        return await self._transfer(READ_16, offset, bufs, pi_bufs)

    async def writev_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int:
        """WRITE(16)s that carry ``pi_bufs``, the blocks' tuples, as dif iovecs."""
        return await self._transfer(WRITE_16, offset, bufs, pi_bufs)

    async def format_pi(self, ptype: int) -> None:
        """FORMAT UNIT (no parameter list) to one handler process: every tuple escape.

        FMTPINFO says whether the new format has PI; the type stays the target's (the
        handler stores tuples whatever it is)."""
        cdb = bytes([FORMAT_UNIT, _FMTPINFO_PI if ptype else 0, 0, 0, 0, 0])
        await self._bs.command(cdb, (), read=False)

    async def _transfer(
        self, op: int, offset: int, bufs: Buffers, pi_bufs: Buffers | None = None
    ) -> int:
        """READ(16)s or WRITE(16)s of at most ``MAX_CMD_BYTES`` each, one after another;
        with ``pi_bufs`` each carries its blocks' tuples as dif iovecs."""
        bs_ = self._bs
        read = op == READ_16
        views = [byte_view(b) for b in bufs]
        total = sum(len(v) for v in views)
        bs_._range("read" if read else "write", offset, total)
        bs = bs_.block_size
        tuples: list[memoryview] = []
        if pi_bufs is not None:
            tuples = [byte_view(b) for b in pi_bufs]
            want = total // bs * TUPLE_SIZE
            if sum(len(t) for t in tuples) != want:
                raise BackstoreError(f"{bs_.name}: {want} bytes of tuples expected")
        pos = offset
        for chunk in _chunks(views, MAX_CMD_BYTES):
            n = sum(len(v) for v in chunk)
            if not n:
                continue
            pi: list[memoryview] = []
            if pi_bufs is not None:
                pi, tuples = split_views(tuples, n // bs * TUPLE_SIZE)
            cdb = _RW16.pack(op, 0, pos // bs, n // bs, 0, 0)
            got = await bs_.command(cdb, chunk, read=read, pi=pi)
            if read and got < n:
                _zero_from(chunk, got)  # never leave stale bytes (the mode zeroed already)
            pos += n
        return total

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE to every live process (a handler may cache per process)."""
        bs_ = self._bs
        sup = bs_._supervisor()
        cdb = _RW16.pack(SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0)
        workers = sup.workers() or [await sup.acquire()]
        comps = await asyncio.gather(
            *(sup.execute(w, cdb, ()) for w in workers), return_exceptions=True
        )
        for comp in comps:
            if isinstance(comp, BaseException):
                raise comp
            bs_._check(comp, 0, cdb)

    async def prefetch(self, offset: int, length: int) -> None:
        bs_ = self._bs
        bs_._range("prefetch", offset, length)
        bs = bs_.block_size
        blocks = min(length // bs, _MAX_BLOCKS)
        if blocks:
            await bs_.command(
                _RW16.pack(PRE_FETCH_16, 0, offset // bs, blocks, 0, 0), (), read=False
            )

    async def discard(self, offset: int, length: int) -> None:
        bs_ = self._bs
        bs_._range("discard", offset, length)
        bs = bs_.block_size
        lba, blocks = offset // bs, length // bs
        while blocks:
            n = min(blocks, _MAX_BLOCKS)
            await bs_.command(_RW16.pack(WRITE_SAME_16, _UNMAP_NDOB, lba, n, 0, 0), (), read=False)
            lba += n
            blocks -= n

    async def mapped_extents(self, offset: int, length: int) -> Extents:
        """GET LBA STATUS until the range is covered; descriptors that do not start where
        asked or do not advance are a handler error (never trusted to index anything)."""
        bs_ = self._bs
        bs_._range("get lba status", offset, length)
        bs = bs_.block_size
        end = offset + length
        out: Extents = []
        pos = offset
        buf = bytearray(LBA_STATUS_LEN)
        rounds = 0
        while pos < end:
            rounds += 1
            if rounds > _MAX_LBA_STATUS_ROUNDS:  # a handler reporting tiny runs: assume mapped
                out.append((pos, end - pos, True))
                break
            lba = pos // bs
            cdb = _RW16.pack(SERVICE_ACTION_IN_16, GET_LBA_STATUS, lba, len(buf), 0, 0)
            got = await bs_.command(cdb, [memoryview(buf)], read=True)
            if got < 8:
                raise BackstoreError(f"{bs_.name}: GET LBA STATUS returned {got} bytes")
            total = min(got, int.from_bytes(buf[0:4], "big") + 4)
            count = max(0, (total - 8) // 16)
            if count == 0:
                raise BackstoreError(f"{bs_.name}: GET LBA STATUS returned no descriptor")
            for i in range(count):
                d_lba, d_blocks, status = _LBA_DESC.unpack_from(buf, 8 + 16 * i)
                if d_lba != lba or d_blocks == 0:
                    if i:
                        break  # use what was consistent so far
                    raise BackstoreError(
                        f"{bs_.name}: GET LBA STATUS descriptor for LBA {d_lba} "
                        f"({d_blocks} blocks), asked for {lba}"
                    )
                start, stop = d_lba * bs, min(end, (d_lba + d_blocks) * bs)
                mapped = (status & 0x0F) == 0
                if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], stop - out[-1][0], mapped)
                else:
                    out.append((start, stop - start, mapped))
                lba = d_lba + d_blocks
                pos = stop
                if pos >= end:
                    break
        return out
