"""The backstore interface and the registry of backstore kinds by name.

A backstore is byte-addressed storage of a fixed size. Its I/O methods take lists of buffers
(pool views) so payload moves with ``os.preadv``/``os.pwritev`` and never through a temporary.
They may block: the caller runs them in a thread pool unless ``blocking`` is False (RAM, null),
in which case they are cheap enough to run inline on the event loop.
"""

from __future__ import annotations

import abc
import mmap
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar, Protocol

from sgtarget.datapath.bounce import ConsumerLimits

Buffers = Sequence[memoryview]

# Zeros for ``discard``'s fallback: an anonymous read-only mapping is page aligned, so it also
# suits O_DIRECT files, and shared so no discard allocates a zero buffer of its own.
_ZERO_MAP = mmap.mmap(-1, 64 * 1024, prot=mmap.PROT_READ)
_ZEROS = memoryview(_ZERO_MAP)
_ZERO_RUN = 1024 * 1024


class BackstoreError(Exception):
    """An I/O failure of the medium; the SCSI layer answers MEDIUM ERROR."""


class Backstore(abc.ABC):
    """Fixed-size byte-addressed storage."""

    #: Registry name used in ``--lun KIND:...``.
    kind: ClassVar[str]
    #: True when read/write may block on I/O and must run off the event loop.
    blocking: ClassVar[bool] = True
    #: What buffers ``readv``/``writev`` accept (alignment, segments); the SCSI layer bounces
    #: the ones that do not fit. ``None``: any buffers. Class default, instances may override.
    limits: ConsumerLimits | None = None

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

    def mapped_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, mapped)`` runs covering the range, in order (GET LBA STATUS).

        The default model: everything is mapped.
        """
        return [(offset, length, True)]

    def close(self) -> None:  # noqa: B027
        """Release resources; flushes first where that matters."""

    def describe(self) -> str:
        return f"{self.kind} ({self.size} bytes)"


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
