"""``file``: a regular file served with ``os.preadv``/``os.pwritev`` straight into pool views.

``--lun file:PATH[,size=SIZE][,direct=1]``. With ``size`` the file is created if missing (mode
0o644) and grown sparsely with ``ftruncate``; an existing larger file is never shrunk. Without
``size`` the file must exist and its size is used. An exclusive ``flock`` keeps two sgtarget
processes from serving the same file (advisory: it does not stop other programs).

``readonly=1`` (a LUN key, for write-protected LUNs) opens the file ``O_RDONLY``, so an image
without write permission can be served; the file must then exist and is never created, grown
or flushed.

``bs=512|4096`` is the logical block size (default 512). ``pi=1|2|3`` formats the LUN with
T10 protection information of that type, kept in a sidecar file ``PATH.pi`` (8 bytes per
block, created and grown sparsely like the image; see ``backstores/pi.py``).

``direct=1`` opens the file with ``O_DIRECT``: the page cache is bypassed and the pool's pages go
to the device as they are. O_DIRECT needs aligned offsets, lengths and addresses, which the
backstore states in ``limits``; the SCSI layer bounces the I/Os that do not fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable, Sequence

from sgtarget.backstores.base import (
    Backstore,
    BackstoreError,
    BackstoreIO,
    Buffers,
    Runner,
    RunnerIO,
    check_params,
    register,
)
from sgtarget.backstores.pi import FileProtection, parse_format, sidecar_path
from sgtarget.datapath.bounce import ConsumerLimits
from sgtarget.units import parse_size

SECTOR = 512
_IOV_MAX = os.sysconf("SC_IOV_MAX")
if _IOV_MAX <= 0:  # "no limit" from sysconf; Linux never says so, stay within its 1024
    _IOV_MAX = 1024
_NOWAIT_MISS = frozenset({errno.EAGAIN, errno.EOPNOTSUPP, errno.ENOTSUP})
#: O_DIRECT alignment of offsets, lengths and buffer addresses. 4096 satisfies every Linux
#: filesystem and device (logical blocks are at most 4 KiB), and the pool's blocks start on
#: pages, so aligned I/O needs no bounce; probing each device's own limit is not worth it.
DIRECT_ALIGNMENT = 4096
DIRECT_LIMITS = ConsumerLimits(alignment=DIRECT_ALIGNMENT, max_segments=_IOV_MAX)
_BOOLS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}


def _skip(bufs: Buffers, n: int) -> Buffers:
    """``bufs`` without its first ``n`` bytes: whole buffers dropped, the next one sliced."""
    i = 0
    while n:
        view = bufs[i]
        size = view.nbytes
        if n < size:
            view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
            return [view[n:], *bufs[i + 1 :]]
        n -= size
        i += 1
    return bufs[i:]


def _batch(bufs: Buffers) -> Buffers:
    # The kernel refuses more than IOV_MAX vectors; the rest is sent as a "short" transfer.
    return bufs[:_IOV_MAX] if len(bufs) > _IOV_MAX else bufs


class FileBackstore(Backstore):
    """A regular file of ``size`` bytes, locked for exclusive use while open."""

    kind = "file"
    blocking = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        direct: bool = False,
        readonly: bool = False,
        lock: bool = True,
        block_size: int = SECTOR,
        pi: int = 0,
    ) -> None:
        # lock=False: a ring handler process opening the file its target process has locked.
        self.path = os.fspath(path)
        self.direct = direct
        self.readonly = readonly
        if block_size not in (512, 4096):
            raise ValueError(f"file: block size {block_size} is not 512 or 4096")
        self.block_size = block_size
        # Buffered I/O takes any buffers and readv/writev already split at IOV_MAX: no limits.
        self.limits = DIRECT_LIMITS if direct else None
        unit = max(DIRECT_ALIGNMENT if direct else SECTOR, block_size)
        if size is not None and (size <= 0 or size % unit):
            extra = " with direct=1" if direct else ""
            raise ValueError(f"file: size {size} is not a positive multiple of {unit}{extra}")
        if readonly:
            flags = os.O_RDONLY | os.O_CLOEXEC
        else:
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if size is not None else 0)
        if direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if readonly:
                raise ValueError(
                    f"file: {self.path} does not exist (readonly=1 never creates it)"
                ) from None
            if size is None:
                raise ValueError(
                    f"file: {self.path} does not exist (give size= to create it)"
                ) from None
            raise BackstoreError(f"file: cannot create {self.path}: directory missing") from None
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise self._no_direct(exc) from exc
            raise BackstoreError(f"file: cannot open {self.path}: {_why(exc)}") from exc
        try:
            if lock:
                self._lock(fd)
            super().__init__(self._fit(fd, size))
            if direct:
                self._probe_direct(fd)
            if pi:
                self.protection = FileProtection(
                    sidecar_path(self.path), self.size // block_size, pi, readonly=readonly
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _no_direct(self, exc: OSError) -> BackstoreError:
        fs = _fs_type(self.path)
        where = f"its filesystem ({fs})" if fs else "its filesystem"
        return BackstoreError(
            f"file: {self.path}: {where} refuses O_DIRECT (direct=1): {_why(exc)}; "
            "tmpfs and some FUSE filesystems do not support it: use direct=0 or put the file "
            "on a disk filesystem"
        )

    def _probe_direct(self, fd: int) -> None:
        """One aligned read: some filesystems accept O_DIRECT at open and refuse every I/O."""
        page = mmap.mmap(-1, DIRECT_ALIGNMENT)  # page aligned, as the pool's blocks are
        view = memoryview(page)
        try:
            os.preadv(fd, [view], 0)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise self._no_direct(exc) from None
            raise BackstoreError(f"file: cannot read {self.path}: {_why(exc)}") from None
        finally:
            view.release()
            page.close()

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackstoreError(
                f"file: {self.path} is already in use (locked by another process)"
            ) from None
        except OSError as exc:
            raise BackstoreError(f"file: cannot lock {self.path}: {_why(exc)}") from exc

    def _fit(self, fd: int, size: int | None) -> int:
        """The served size; grows the file sparsely up to ``size`` when it is smaller."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"file: {self.path} is not a regular file")
        if size is None:
            if st.st_size <= 0 or st.st_size % self.block_size:
                raise ValueError(
                    f"file: {self.path} is {st.st_size} bytes, not a positive multiple of "
                    f"{self.block_size} (give size= to grow it)"
                )
            if self.direct and st.st_size % DIRECT_ALIGNMENT:
                raise ValueError(
                    f"file: {self.path} is {st.st_size} bytes, not a multiple of "
                    f"{DIRECT_ALIGNMENT} as direct=1 needs (give size= to grow it)"
                )
            return st.st_size
        if st.st_size > size:
            raise ValueError(
                f"file: {self.path} is {st.st_size} bytes, larger than size={size}; "
                "refusing to shrink it"
            )
        if st.st_size < size and self.readonly:
            raise ValueError(
                f"file: {self.path} is {st.st_size} bytes, smaller than size={size}; "
                "readonly=1 cannot grow it"
            )
        if st.st_size < size:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                raise BackstoreError(
                    f"file: cannot grow {self.path} to {size} bytes: {_why(exc)}"
                ) from exc
        return size

    def _extent(self, offset: int, bufs: Buffers) -> int:
        total = sum(b.nbytes for b in bufs)
        if offset < 0 or offset + total > self.size:
            raise BackstoreError(
                f"file: {offset}+{total} out of range for {self.path} ({self.size} bytes)"
            )
        return total

    def readv(self, offset: int, bufs: Buffers) -> int:
        return self._transfer("read", os.preadv, offset, bufs)

    def writev(self, offset: int, bufs: Buffers) -> int:
        return self._transfer("write", os.pwritev, offset, bufs)

    def prefetch(self, offset: int, length: int) -> None:
        # Readahead into the page cache; a hint, so a refusal is not an error.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (the blocks are freed and read back as zeros); zeros if unsupported.

        ``os.posix_fallocate`` cannot punch holes, so fallocate(2) is called through ctypes.
        Filesystems without hole punching get zeros written instead (correct, frees nothing).
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BackstoreError(
                f"file: discard {offset}+{length} out of range for {self.path} ({self.size} bytes)"
            )
        if not length:
            return
        err = _punch_hole(self._fd, offset, length)
        if err == 0:
            return
        if err not in _NO_PUNCH:
            raise self._error("discard", offset, length, OSError(err, os.strerror(err)))
        super().discard(offset, length)

    def mapped_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Data and holes from ``lseek(SEEK_DATA/SEEK_HOLE)``; all mapped if unsupported."""
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to EOF
                    data = end
                elif exc.errno in _NO_SEEK_HOLE:
                    return [(offset, length, True)]
                else:
                    raise self._error("seek", pos, end - pos, exc) from exc
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
            if pos >= end:
                break
            try:
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            except OSError as exc:
                raise self._error("seek", pos, end - pos, exc) from exc
            out.append((pos, hole - pos, True))
            pos = hole
        return out

    def _transfer(
        self,
        what: str,
        call: Callable[[int, Sequence[memoryview], int], int],
        offset: int,
        bufs: Buffers,
    ) -> int:
        """``preadv``/``pwritev`` until every byte moved, slicing past short transfers."""
        total = self._extent(offset, bufs)
        done = 0
        while done < total:
            try:
                n = call(self._fd, _batch(bufs), offset + done)
            except OSError as exc:
                raise self._error(what, offset + done, total - done, exc) from exc
            if n == 0:
                if what == "read":
                    raise BackstoreError(
                        f"file: end of file at {offset + done} reading {self.path} "
                        f"(expected {self.size} bytes; truncated by someone else?)"
                    )
                raise BackstoreError(f"file: wrote nothing at {offset + done} to {self.path}")
            done += n
            if done < total:
                bufs = _skip(bufs, n)
        return total

    def io(self, runner: Runner) -> BackstoreIO:
        return _CachedReadIO(self, runner)

    def read_nowait(self, offset: int, bufs: Buffers) -> int | None:
        """``readv`` served from the page cache only, without blocking; ``None`` if it cannot.

        All or nothing: ``None`` means part of the range is not cached (or RWF_NOWAIT is not
        supported here) and the caller must run ``readv`` in a thread; the buffers may then hold
        a prefix of the data, which ``readv`` overwrites.
        """
        flag = getattr(os, "RWF_NOWAIT", None)
        if flag is None or self.direct:
            return None  # O_DIRECT never reads from the page cache
        total = self._extent(offset, bufs)
        done = 0
        while done < total:
            try:
                n = os.preadv(self._fd, _batch(bufs), offset + done, flag)
            except OSError as exc:
                if exc.errno in _NOWAIT_MISS:
                    return None
                raise self._error("read", offset + done, total - done, exc) from exc
            if n == 0:
                raise BackstoreError(f"file: end of file at {offset + done} reading {self.path}")
            done += n
            if done < total:
                bufs = _skip(bufs, n)
        return total

    def _error(self, op: str, offset: int, length: int, exc: OSError) -> BackstoreError:
        return BackstoreError(
            f"file: {op} of {length} bytes at {offset} on {self.path}: {_why(exc)}"
        )

    def flush(self) -> None:
        if self.readonly:
            return  # nothing was written
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise BackstoreError(f"file: fdatasync of {self.path}: {_why(exc)}") from exc
        if self.protection is not None:
            self.protection.flush()

    def close(self) -> None:
        """Flush, unlock and close; idempotent. The lock and fd are released even if the
        flush fails, and the flush error is raised afterwards."""
        fd = self._fd
        if fd < 0:
            return
        try:
            self.flush()
        finally:
            self._fd = -1
            if self.protection is not None:
                self.protection.close()
            # Unlock explicitly: a forked child sharing the open file would keep the lock alive.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def describe(self) -> str:
        mode = (", direct I/O" if self.direct else "") + (", read-only" if self.readonly else "")
        return f"file {self.path} ({self.size} bytes{self.format_note()}{mode})"


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NO_PUNCH = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_NO_SEEK_HOLE = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
_fallocate: Callable[[int, int, int, int], int] | None = None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _libc.fallocate.restype = ctypes.c_int
    _fallocate = _libc.fallocate
except (OSError, AttributeError):  # no libc fallocate: discard writes zeros
    pass


class _CachedReadIO(RunnerIO):
    """Reads the page cache can answer are served on the event loop (``read_nowait``, i.e.
    RWF_NOWAIT); misses, and every other call, go through the runner (a thread). A cached
    read then costs one syscall instead of two thread hand-offs (issue 7)."""

    __slots__ = ("_file",)

    def __init__(self, backstore: FileBackstore, runner: Runner) -> None:
        super().__init__(backstore, runner)
        self._file = backstore

    def readv_now(self, offset: int, bufs: Buffers) -> int | None:
        return self._file.read_nowait(offset, bufs)

    async def readv(self, offset: int, bufs: Buffers) -> int:
        n = self.readv_now(offset, bufs)
        if n is not None:
            return n
        return await super().readv(offset, bufs)


def _punch_hole(fd: int, offset: int, length: int) -> int:
    """fallocate(PUNCH_HOLE | KEEP_SIZE); 0 or the errno."""
    if _fallocate is None:
        return errno.ENOSYS
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err
    return 0


def _fs_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts), best effort."""
    try:
        where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for fields in mounts:
        if len(fields) < 3:
            continue
        mnt = fields[1].encode().decode("unicode_escape")  # "\040" for spaces and the like
        inside = where == mnt or where.startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) >= best[0]):
            best = (len(mnt), fields[2])
    return best[1] if best else None


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"[Errno {exc.errno} {name}] {exc.strerror}"


@register("file")
def create_file(params: dict[str, str], /, *, readonly: bool = False) -> FileBackstore:
    params = dict(params)
    block_size, pi = parse_format("file", params, pi=True)
    check_params("file", params, ("bs", "direct", "path", "pi", "size"), required=("path",))
    size = parse_size(params["size"]) if "size" in params else None
    raw = params.get("direct", "0")
    direct = _BOOLS.get(raw.lower())
    if direct is None:
        raise ValueError(
            f"file: direct={raw!r} is not one of {', '.join(_BOOLS)} (O_DIRECT on or off)"
        )
    return FileBackstore(
        params["path"], size, direct=direct, readonly=readonly, block_size=block_size, pi=pi
    )
