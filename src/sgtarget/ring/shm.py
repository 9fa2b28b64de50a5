"""Shared memory and doorbells between the target and handler processes.

``SharedMemory`` is one memfd mapped MAP_SHARED: the target creates it (close-on-exec) and
passes the fd to a handler process (``pass_fds``), which maps the same pages with ``attach``.
``Doorbell`` is an eventfd: ``ring`` adds 1, ``drain`` takes the count; an eventfd write is a
system call, hence a full memory barrier, so a doorbell rung after a ring store is seen after it.
``SharedMap`` is how a handler turns the offsets in iovecs into memory: offsets count from the
start of the ring region (mailbox at 0) and the data area starts at ``data_off``, the layout of
one mmap of a kernel's /dev/uioN, here spread over two mappings. A view never reaches outside
the region its offset resolves into.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
from collections.abc import Sequence


class SharedMemory:
    """One memfd mapping of ``size`` bytes; ``buf`` is a writable view of all of it.

    ``create`` owns its fd (``close`` closes it); ``attach`` maps an fd it was handed and leaves
    the fd to its owner (``close`` only unmaps).
    """

    __slots__ = ("_mmap", "_owns_fd", "buf", "fd", "size")

    def __init__(self, fd: int, size: int, *, owns_fd: bool) -> None:
        if size <= 0:
            raise ValueError("shared memory size must be positive")
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self.fd = fd
        self.size = size
        self.buf = memoryview(self._mmap)
        self._owns_fd = owns_fd

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> SharedMemory:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"fd {fd} holds fewer than {size} bytes")
        return cls(fd, size, owns_fd=False)

    def close(self) -> None:
        """Unmap (once no view of ``buf`` is left; else when the last view goes) and close."""
        # Someone may still hold a view: the mapping then goes with the last one.
        with contextlib.suppress(BufferError):
            self.buf.release()
            self._mmap.close()
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class Doorbell:
    """An eventfd (EFD_CLOEXEC | EFD_NONBLOCK) used as a one-way notification.

    ``create`` owns its fd; ``attach`` leaves an inherited fd to its owner (``close`` then only
    forgets it).
    """

    __slots__ = ("_owns_fd", "fd")

    def __init__(self, fd: int, *, owns_fd: bool) -> None:
        self.fd = fd
        self._owns_fd = owns_fd

    @classmethod
    def create(cls) -> Doorbell:
        return cls(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), owns_fd=True)

    @classmethod
    def attach(cls, fd: int) -> Doorbell:
        return cls(fd, owns_fd=False)

    def ring(self) -> None:
        # BlockingIOError: the counter is at its maximum, a wake-up is pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        """Take the count (0 if not rung); never blocks."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None) -> bool:
        """Block until rung (then drain) or ``timeout`` seconds pass; True if it was rung."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not poller.poll(ms):
            return False
        return self.drain() > 0

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class SharedMap:
    """Resolve shared-map offsets: ``[0, data_off)`` the ring, ``[data_off, +len(data))`` data.

    ``ring`` may be longer than ``data_off`` (page rounding); only its first ``data_off`` bytes
    are addressable. An offset in neither region, or a view crossing a region's end, is a
    ``ValueError``.
    """

    __slots__ = ("_data", "_data_end", "_ring", "_ring_end", "data_off")

    def __init__(self, ring: memoryview, data: memoryview, data_off: int) -> None:
        if data_off <= 0:
            raise ValueError("data_off must be positive")
        self._ring = ring
        self._ring_end = min(len(ring), data_off)
        self._data = data
        self.data_off = data_off
        self._data_end = data_off + len(data)

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        end = offset + length
        if self.data_off <= offset and end <= self._data_end:
            return self._data[offset - self.data_off : end - self.data_off]
        if end <= self._ring_end:
            return self._ring[offset:end]
        raise ValueError(f"[{offset}, {end}) is outside the ring and the data area")

    def views(self, iovs: Sequence[tuple[int, int]]) -> list[memoryview]:
        return [self.view(base, length) for base, length in iovs]
