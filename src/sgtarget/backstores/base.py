"""The backstore interface and the registry of backstore kinds by name.

A backstore is byte-addressed storage of a fixed size. Its I/O methods take lists of buffers
(pool views) so payload moves with ``os.preadv``/``os.pwritev`` and never through a temporary.
They may block: the caller runs them in a thread pool unless ``blocking`` is False (RAM, null),
in which case they are cheap enough to run inline on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import mmap
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from sgtarget.datapath.bounce import ConsumerLimits

if TYPE_CHECKING:
    from sgtarget.backstores.pi import ProtectionStore
    from sgtarget.datapath.pool import Pool

Buffers = Sequence[memoryview]
#: Called on the event loop when a ``writev_soon`` write is done: ``None`` or its error
#: (without a traceback: its frames held the pool views).
WriteDone = Callable[[BaseException | None], None]
T = TypeVar("T")
#: ``(offset, length, mapped)`` runs of a range (GET LBA STATUS).
Extents = list[tuple[int, int, bool]]

# Zeros for ``discard``'s fallback: an anonymous read-only mapping is page aligned, so it also
# suits O_DIRECT files, and shared so no discard allocates a zero buffer of its own.
_ZERO_MAP = mmap.mmap(-1, 64 * 1024, prot=mmap.PROT_READ)
_ZEROS = memoryview(_ZERO_MAP)
_ZERO_RUN = 1024 * 1024


class BackstoreError(Exception):
    """An I/O failure of the medium; the SCSI layer answers MEDIUM ERROR."""


class BackstoreBusy(BackstoreError):
    """The backstore cannot run the I/O now but may shortly (a handler process restarting).

    The SCSI layer answers BUSY, which initiators retry (SAM-5 5.3.1), instead of an error.
    """


class Runner(Protocol):
    """Runs a blocking call off the event loop (a thread pool) or inline; awaited either way."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


class BackstoreIO(Protocol):
    """A backstore's operations as the SCSI layer awaits them (see ``Backstore.io``)."""

    async def readv(self, offset: int, bufs: Buffers) -> int: ...
    async def writev(self, offset: int, bufs: Buffers) -> int: ...
    async def flush(self) -> None: ...
    async def prefetch(self, offset: int, length: int) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def mapped_extents(self, offset: int, length: int) -> Extents: ...
    # The immediate path (``LogicalUnit.execute_now``): done before returning, without
    # blocking the event loop, or ``None`` having done nothing (then await the call above).
    def readv_now(self, offset: int, bufs: Buffers) -> int | None: ...
    def writev_now(self, offset: int, bufs: Buffers) -> int | None: ...
    # A write that completes later through ``done`` (its error or None) without a task of
    # its own; False: not offered here (await ``writev``).
    def writev_soon(self, offset: int, bufs: Buffers, done: WriteDone) -> bool: ...


@runtime_checkable
class PiBackstoreIO(BackstoreIO, Protocol):
    """``BackstoreIO`` of a backstore that stores protection information itself, carried with
    the data in one operation (``Backstore.pi_with_data``: a ring LUN with ``handler_pi=1``).

    ``pi_bufs`` holds the tuples (8 bytes per block, wire form) of the whole blocks in
    ``bufs``; ``offset`` and the lengths are whole blocks.
    """

    async def readv_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int: ...
    async def writev_pi(self, offset: int, bufs: Buffers, pi_bufs: Buffers) -> int: ...


class Backstore(abc.ABC):
    """Fixed-size byte-addressed storage."""

    #: Registry name used in ``--lun KIND:...``.
    kind: ClassVar[str]
    #: True when read/write may block on I/O and must run off the event loop.
    blocking: ClassVar[bool] = True
    #: What buffers ``readv``/``writev`` accept (alignment, segments); the SCSI layer bounces
    #: the ones that do not fit. ``None``: any buffers. Class default, instances may override.
    limits: ConsumerLimits | None = None
    #: Logical block size the medium is formatted with (``bs=``): the LU's block size.
    block_size: int = 512
    #: Protection information beside the data (``pi=``, backstores/pi.py), or ``None``: the
    #: LUN has no PI and cannot be formatted with it.
    protection: ProtectionStore | None = None
    #: True: the tuples are not the target's to keep. ``io()`` is a ``PiBackstoreIO`` and the
    #: SCSI layer moves every block's tuples with its data (``readv_pi``/``writev_pi``)
    #: instead of through ``protection``, which then only carries the format (``ptype``).
    pi_with_data: bool = False

    def __init__(self, size: int) -> None:
        self.size = size

    @abc.abstractmethod
    def readv(self, offset: int, bufs: Buffers) -> int:
        """Fill ``bufs`` from ``offset``; returns bytes read (always all of them)."""

    @abc.abstractmethod
    def writev(self, offset: int, bufs: Buffers) -> int:
        """Store ``bufs`` at ``offset``; returns bytes written (always all of them)."""

    def flush(self) -> None:  # noqa: B027 - RAM and null have nothing to flush
        """Make written data durable (SYNCHRONIZE CACHE, FUA)."""

    def prefetch(self, offset: int, length: int) -> None:  # noqa: B027 - nothing to warm
        """Hint that ``[offset, offset + length)`` will be read soon (PRE-FETCH)."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset + length)``; it reads back as zeros afterwards.

        The default writes zeros (correct, frees nothing); thin-capable kinds override it.
        """
        end = offset + length
        while offset < end:
            n = min(end - offset, _ZERO_RUN)
            views = [_ZEROS[: min(len(_ZEROS), n - i)] for i in range(0, n, len(_ZEROS))]
            self.writev(offset, views)
            offset += n

    def mapped_extents(self, offset: int, length: int) -> Extents:
        """``(offset, length, mapped)`` runs covering the range, in order (GET LBA STATUS).

        The default model: everything is mapped.
        """
        return [(offset, length, True)]

    async def start(self, pool: Pool) -> None:  # noqa: B027 - most kinds start nothing
        """Called once on the server's event loop before it serves, with the payload pool.

        Kinds that run something of their own (handler processes behind rings) start it here.
        """

    def close(self) -> None:  # noqa: B027
        """Release resources; flushes first where that matters."""

    def io(self, runner: Runner) -> BackstoreIO:
        """The operations the SCSI layer awaits.

        The synchronous methods run through ``runner`` (a thread pool) when they may block,
        inline when not. A backstore whose I/O completes asynchronously by itself (a handler
        process behind a ring) overrides this and skips the thread hop.
        """
        return RunnerIO(self, runner if self.blocking else run_inline)

    def describe(self) -> str:
        return f"{self.kind} ({self.size} bytes{self.format_note()})"

    def format_note(self) -> str:
        """``, 4096-byte blocks, PI type 1`` where the medium's format is not the default."""
        note = f", {self.block_size}-byte blocks" if self.block_size != 512 else ""
        if self.protection is not None:
            note += f", PI type {self.protection.ptype}"
        return note


async def run_inline(fn: Callable[..., T], /, *args: Any) -> T:
    """A ``Runner`` for calls cheap enough to run on the event loop."""
    return fn(*args)


class RunnerIO:
    """``BackstoreIO`` for a synchronous backstore: each call through a ``Runner``."""

    __slots__ = ("_batch", "_bs", "_inline", "_jobs", "_queued", "_run", "_running")

    def __init__(self, backstore: Backstore, runner: Runner) -> None:
        self._bs = backstore
        self._run = runner
        self._inline = runner is run_inline
        #: ``writev_soon`` calls of this loop turn, and the runs of earlier turns' batches.
        self._batch: list[tuple[int, Buffers, WriteDone]] = []
        self._queued = False
        self._running = 0
        self._jobs: set[asyncio.Task[None]] = set()

    def writev_soon(self, offset: int, bufs: Buffers, done: WriteDone) -> bool:
        """Writes go to the runner in batches: one thread hand-off per batch instead of two
        per command (tgt's cost, and the slow path's).

        A batch leaves at the end of the loop turn while fewer than ``_BATCH_JOBS`` are
        running; otherwise writes gather until one finishes (group commit), so the busier the
        LU the larger its batches, and GIL hand-offs stay few however the loop reads.
        """
        if self._inline:
            return False  # ``writev_now`` does these
        self._batch.append((offset, bufs, done))
        if not self._queued and self._running < _BATCH_JOBS:
            self._queued = True
            asyncio.get_running_loop().call_soon(self._submit)
        return True

    def _submit(self) -> None:
        self._queued = False
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._running += 1
        job = asyncio.get_running_loop().create_task(self._write_batch(batch))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _write_batch(self, batch: list[tuple[int, Buffers, WriteDone]]) -> None:
        try:
            errors = await self._run(_write_each, self._bs, batch)
        except BaseException as exc:  # the runner itself failed (shut down): all of them
            errors = [exc.with_traceback(None)] * len(batch)
        finally:
            self._running -= 1
        for (_offset, _bufs, done), error in zip(batch, errors, strict=True):
            done(error)
        if self._batch and not self._queued:
            self._submit()  # what gathered while this batch ran

    def readv_now(self, offset: int, bufs: Buffers) -> int | None:
        return self._bs.readv(offset, bufs) if self._inline else None

    def writev_now(self, offset: int, bufs: Buffers) -> int | None:
        return self._bs.writev(offset, bufs) if self._inline else None

    async def readv(self, offset: int, bufs: Buffers) -> int:
        return await self._run(self._bs.readv, offset, bufs)

    async def writev(self, offset: int, bufs: Buffers) -> int:
        return await self._run(self._bs.writev, offset, bufs)

    async def flush(self) -> None:
        await self._run(self._bs.flush)

    async def prefetch(self, offset: int, length: int) -> None:
        await self._run(self._bs.prefetch, offset, length)

    async def discard(self, offset: int, length: int) -> None:
        await self._run(self._bs.discard, offset, length)

    async def mapped_extents(self, offset: int, length: int) -> Extents:
        return await self._run(self._bs.mapped_extents, offset, length)


#: Batches of one LU's writes in the runner at once (see ``RunnerIO.writev_soon``).
_BATCH_JOBS = 2


def _write_each(
    bs: Backstore, batch: list[tuple[int, Buffers, WriteDone]]
) -> list[BaseException | None]:
    """Run in the runner's thread: every write of a batch, each one's error or None."""
    errors: list[BaseException | None] = []
    for offset, bufs, _done in batch:
        try:
            bs.writev(offset, bufs)
        except Exception as exc:  # reported per command, on the loop
            errors.append(exc.with_traceback(None))
        else:
            errors.append(None)
    return errors


class BackstoreFactory(Protocol):
    """Builds a backstore from a ``--lun`` spec's parameters.

    ``readonly``: the LUN is write-protected and nothing will be written, so the storage may be
    opened read-only (a file then needs no write permission). Kinds with nothing to open
    ignore it; refusing writes is the SCSI layer's job either way.
    """

    def __call__(self, params: dict[str, str], /, *, readonly: bool = False) -> Backstore: ...


_REGISTRY: dict[str, BackstoreFactory] = {}


def register(kind: str) -> Callable[[BackstoreFactory], BackstoreFactory]:
    """Class or function decorator that makes a backstore available as ``--lun KIND:...``."""

    def deco(factory: BackstoreFactory) -> BackstoreFactory:
        _REGISTRY[kind] = factory
        return factory

    return deco


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def create(kind: str, params: dict[str, str], *, readonly: bool = False) -> Backstore:
    try:
        factory = _REGISTRY[kind]
    except KeyError:
        raise ValueError(
            f"unknown backstore kind {kind!r} (known: {', '.join(registered_kinds())})"
        ) from None
    return factory(params, readonly=readonly)


def check_params(
    kind: str,
    params: Mapping[str, str],
    accepted: Collection[str],
    required: Collection[str] = (),
) -> None:
    """Refuse keys a backstore kind does not know and missing required ones (``ValueError``)."""
    known = ", ".join(sorted(accepted))
    for key in params:
        if key not in accepted:
            raise ValueError(f"{kind}: unknown key {key!r} (accepted: {known})")
    for key in required:
        if key not in params:
            raise ValueError(f"{kind}: missing required key {key!r}")
