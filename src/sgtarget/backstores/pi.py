"""Protection information (SBC-4 4.22) kept apart from the data: 8 bytes per logical block.

A ``ProtectionStore`` holds one tuple (guard, application tag, reference tag; the bytes as they
travel on the wire) per logical block, addressed by LBA, beside the backstore's data: a sidecar
file ``PATH.pi`` for ``file`` LUNs, anonymous memory for ``ram`` LUNs. Only LUNs configured
with ``pi=`` have one (PI buffers exist only where PI is enabled).

Tuples are stored bitwise inverted. Storage that was never written reads as zeros (a sparse
hole, a fresh anonymous page), which inverts to all-0xFF: the escape tuple (application tag
0xFFFF, reference tag 0xFFFFFFFF) that SBC-4 requires for blocks whose PI was never written,
and that FORMAT UNIT writes ("a default value of FFFFFFFF_FFFFFFFFh"). So formatting or
deallocating a range is punching a hole, not writing 0xFF over it.

``ptype`` is the current format: 0 (formatted without PI: the store is kept but unused) or
1, 2, 3. It starts as the ``pi=`` value and FORMAT UNIT changes it. It is not saved: the
``--lun`` spec says how a LUN starts.
"""

from __future__ import annotations

import abc
import errno
import mmap
import os
from collections.abc import Sequence

from sgtarget.backstores.base import BackstoreError, Buffers
from sgtarget.datapath.views import byte_view

#: Bytes of protection information per logical block.
TUPLE_SIZE = 8
#: ``bytes.translate`` table inverting every bit: stored form <-> wire form.
_INVERT = bytes(255 - i for i in range(256))
_NO_PUNCH = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
#: Protection types a LUN can be formatted with (``pi=``).
PI_TYPES = (1, 2, 3)


def _invert_into(bufs: Buffers) -> None:
    # Small (1/64 of the data at 512-byte blocks): two C-speed copies per buffer are fine.
    for buf in bufs:
        view = byte_view(buf)
        view[:] = bytes(view).translate(_INVERT)


def _inverted(bufs: Buffers) -> bytes:
    # A copy: the caller's buffers (wire data) must not change under it.
    return b"".join(bufs).translate(_INVERT)


class ProtectionStore(abc.ABC):
    """Tuples of ``nblocks`` logical blocks; the current format in ``ptype``."""

    #: True when the methods may block on I/O (run them off the event loop).
    blocking: bool = True

    def __init__(self, nblocks: int, ptype: int) -> None:
        if ptype not in (0, *PI_TYPES):
            raise ValueError(f"protection type {ptype} is not 0, 1, 2 or 3")
        self.nblocks = nblocks
        self.ptype = ptype

    def _check(self, lba: int, nbytes: int) -> None:
        if nbytes % TUPLE_SIZE:
            raise BackstoreError(f"pi: {nbytes} bytes is not whole tuples")
        if lba < 0 or lba + nbytes // TUPLE_SIZE > self.nblocks:
            raise BackstoreError(
                f"pi: blocks {lba}+{nbytes // TUPLE_SIZE} out of range ({self.nblocks} blocks)"
            )

    def read(self, lba: int, bufs: Buffers) -> None:
        """Fill ``bufs`` (whole tuples) with the tuples of the blocks from ``lba``."""
        self._check(lba, sum(b.nbytes for b in bufs))
        self._read_raw(lba * TUPLE_SIZE, bufs)
        _invert_into(bufs)

    def read_nowait(self, lba: int, bufs: Buffers) -> bool:
        """``read`` if it can be done without blocking (the tuples are cached); ``False``
        otherwise, and ``bufs`` may hold anything (``read`` overwrites them)."""
        return False

    def write(self, lba: int, bufs: Buffers) -> None:
        """Store the tuples in ``bufs`` for the blocks from ``lba``; ``bufs`` is not changed."""
        self._check(lba, sum(b.nbytes for b in bufs))
        self._write_raw(lba * TUPLE_SIZE, _inverted(bufs))

    def discard(self, lba: int, nblocks: int) -> None:
        """Give ``nblocks`` from ``lba`` the escape tuple (never written: UNMAP, SANITIZE)."""
        self._check(lba, nblocks * TUPLE_SIZE)
        if nblocks:
            self._zero_raw(lba * TUPLE_SIZE, nblocks * TUPLE_SIZE)

    def format(self, ptype: int) -> None:
        """FORMAT UNIT: every tuple back to escape, then the new type (0: no PI)."""
        if ptype not in (0, *PI_TYPES):
            raise ValueError(f"protection type {ptype} is not 0, 1, 2 or 3")
        self.discard(0, self.nblocks)
        self.ptype = ptype

    @abc.abstractmethod
    def _read_raw(self, offset: int, bufs: Buffers) -> None: ...

    @abc.abstractmethod
    def _write_raw(self, offset: int, data: bytes) -> None: ...

    @abc.abstractmethod
    def _zero_raw(self, offset: int, length: int) -> None: ...

    def flush(self) -> None:  # noqa: B027 - memory has nothing to flush
        """Make written tuples durable (with the data's flush)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


class MemoryProtection(ProtectionStore):
    """Tuples in anonymous memory (``ram`` LUNs): zero pages until written."""

    blocking = False

    def __init__(self, nblocks: int, ptype: int) -> None:
        super().__init__(nblocks, ptype)
        size = max(1, nblocks * TUPLE_SIZE)
        try:
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as exc:
            raise BackstoreError(f"pi: cannot map {size} bytes for protection information") from exc
        self._mem = memoryview(self._mmap)

    def _read_raw(self, offset: int, bufs: Buffers) -> None:
        pos = offset
        for buf in bufs:
            view = byte_view(buf)
            view[:] = self._mem[pos : pos + len(view)]
            pos += len(view)

    def _write_raw(self, offset: int, data: bytes) -> None:
        self._mem[offset : offset + len(data)] = data

    def _zero_raw(self, offset: int, length: int) -> None:
        page = mmap.PAGESIZE
        first = -(-offset // page) * page
        last = (offset + length) // page * page
        if first < last:
            # Whole pages go back to the kernel and read as zeros (escape) again.
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)
            self._mem[offset:first] = bytes(first - offset)
            self._mem[last : offset + length] = bytes(offset + length - last)
        else:
            self._mem[offset : offset + length] = bytes(length)

    def close(self) -> None:
        if not self._mmap.closed:
            self._mem.release()
            self._mmap.close()


class FileProtection(ProtectionStore):
    """Tuples in a sidecar file, grown sparsely to ``nblocks * 8`` bytes."""

    blocking = True

    def __init__(self, path: str, nblocks: int, ptype: int, *, readonly: bool = False) -> None:
        super().__init__(nblocks, ptype)
        self.path = path
        self.readonly = readonly
        flags = os.O_CLOEXEC | (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            raise ValueError(
                f"pi: {path} does not exist (readonly=1 never creates the PI sidecar)"
            ) from None
        except OSError as exc:
            raise BackstoreError(f"pi: cannot open {path}: {exc.strerror}") from exc
        try:
            size = nblocks * TUPLE_SIZE
            if os.fstat(fd).st_size < size:
                if readonly:
                    raise ValueError(f"pi: {path} is smaller than {size} bytes (readonly=1)")
                os.ftruncate(fd, size)  # the new tail is a hole: escape tuples
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _read_raw(self, offset: int, bufs: Buffers) -> None:
        views: Sequence[memoryview] = [byte_view(b) for b in bufs]
        want = sum(len(v) for v in views)
        got = 0
        while got < want:
            try:
                n = os.preadv(self._fd, views, offset + got)
            except OSError as exc:
                raise BackstoreError(f"pi: read of {self.path}: {exc.strerror}") from exc
            if n == 0:
                raise BackstoreError(f"pi: end of file at {offset + got} reading {self.path}")
            got += n
            views = _skip(views, n)

    def read_nowait(self, lba: int, bufs: Buffers) -> bool:
        # The sidecar is 1/64 of the data and read with it: nearly always in the page cache,
        # so the event loop reads it itself instead of paying a thread hand-off per command.
        flag = getattr(os, "RWF_NOWAIT", None)
        if flag is None:
            return False
        views = [byte_view(b) for b in bufs]
        want = sum(len(v) for v in views)
        self._check(lba, want)
        try:
            got = os.preadv(self._fd, views, lba * TUPLE_SIZE, flag)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, *_NO_PUNCH):
                return False
            raise BackstoreError(f"pi: read of {self.path}: {exc.strerror}") from exc
        if got != want:  # partly cached (or past the end): the blocking read does it all
            return False
        _invert_into(views)
        return True

    def _write_raw(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                raise BackstoreError(f"pi: write of {self.path}: {exc.strerror}") from exc
            view = view[n:]
            offset += n

    def _zero_raw(self, offset: int, length: int) -> None:
        from sgtarget.backstores.file import _punch_hole  # noqa: PLC0415 - file imports us

        err = _punch_hole(self._fd, offset, length)
        if err == 0:
            return
        if err not in _NO_PUNCH:
            raise BackstoreError(f"pi: discard in {self.path}: {os.strerror(err)}")
        for pos in range(offset, offset + length, 1 << 20):
            self._write_raw(pos, bytes(min(1 << 20, offset + length - pos)))

    def flush(self) -> None:
        if self.readonly or self._fd < 0:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise BackstoreError(f"pi: fdatasync of {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                if not self.readonly:
                    os.fdatasync(fd)
            finally:
                os.close(fd)


def _skip(views: Sequence[memoryview], n: int) -> Sequence[memoryview]:
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    if i < len(views) and n:
        return [views[i][n:], *views[i + 1 :]]
    return views[i:]


def parse_format(kind: str, params: dict[str, str], *, pi: bool) -> tuple[int, int]:
    """Take ``bs=`` and (where ``pi``) ``pi=`` out of ``params``: ``(block_size, ptype)``.

    ``bs`` is 512 or 4096 (default 512); ``pi`` is 1, 2 or 3 (default 0: no PI).
    """
    raw_bs = params.pop("bs", "512")
    if raw_bs not in ("512", "4096"):
        raise ValueError(f"{kind}: bs={raw_bs!r} is not 512 or 4096 (logical block size)")
    raw_pi = params.pop("pi", None)
    if raw_pi is None:
        return int(raw_bs), 0
    if not pi:
        raise ValueError(
            f"{kind}: pi={raw_pi} needs a medium that keeps what is written (file or ram)"
        )
    if raw_pi not in ("1", "2", "3"):
        raise ValueError(f"{kind}: pi={raw_pi!r} is not 1, 2 or 3 (T10 protection type)")
    return int(raw_bs), int(raw_pi)


def sidecar_path(path: str) -> str:
    """Where a ``file`` LUN's protection information lives."""
    return path + ".pi"
