"""Backstores file, ram and null: real files, real pool views, short transfers, errors."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import sgtarget.backstores
from sgtarget.backstores import file as file_mod
from sgtarget.backstores.base import Backstore, BackstoreError, create, registered_kinds
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.null import NullBackstore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import run_inline

from .scsi_fakes import run

MiB = 1 << 20


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def split(data: bytes | bytearray, sizes: Sequence[int]) -> list[memoryview]:
    """Views of consecutive pieces of a bytearray copy of ``data``."""
    buf = memoryview(bytearray(data))
    out, pos = [], 0
    for n in sizes:
        out.append(buf[pos : pos + n])
        pos += n
    assert pos == len(data)
    return out


def joined(bufs: Sequence[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(4 * MiB, 64 * 1024)
    yield p
    p.close()


@pytest.fixture
def fb(tmp_path: Path) -> Iterator[FileBackstore]:
    b = FileBackstore(tmp_path / "disk.img", 4 * MiB)
    yield b
    b.close()


# --- registry --------------------------------------------------------------------------------


def test_import_registers_all_kinds() -> None:
    assert sgtarget.backstores.file is file_mod
    assert {"file", "ram", "null"} <= set(registered_kinds())


@pytest.mark.parametrize(
    ("kind", "params", "fragment"),
    [
        ("ram", {"size": "1M", "sise": "2"}, "ram: unknown key 'sise' (accepted: bs, pi, size)"),
        ("null", {"path": "/x", "size": "1M"}, "null: unknown key 'path' (accepted: bs, size)"),
        (
            "file",
            {"path": "/x", "thin": "1"},
            "file: unknown key 'thin' (accepted: bs, direct, path, pi, size)",
        ),
        ("ram", {}, "ram: missing required key 'size'"),
        ("null", {}, "null: missing required key 'size'"),
        ("file", {"size": "1M"}, "file: missing required key 'path'"),
        ("ram", {"size": "1000"}, "not a positive multiple of 512"),
        ("null", {"size": "0"}, "must be greater than zero"),
        ("ram", {"size": "lots"}, "invalid size 'lots'"),
        ("warp", {}, "unknown backstore kind 'warp'"),
    ],
)
def test_factory_rejects(kind: str, params: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        create(kind, params)
    assert "\n" not in str(info.value)


def test_factories_build_each_kind(tmp_path: Path) -> None:
    made: list[Backstore] = [
        create("ram", {"size": "1M"}),
        create("null", {"size": "1T"}),
        create("file", {"path": str(tmp_path / "f.img"), "size": "64K"}),
    ]
    try:
        assert [(b.kind, b.size) for b in made] == [
            ("ram", MiB),
            ("null", 1 << 40),
            ("file", 64 * 1024),
        ]
        assert [b.blocking for b in made] == [False, False, True]
    finally:
        for b in made:
            b.close()


# --- file: creation, sizing, persistence -----------------------------------------------------


def test_file_created_sparse_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    b = FileBackstore(path, 1 << 30)
    try:
        st = path.stat()
        assert st.st_size == 1 << 30
        assert st.st_blocks * 512 < MiB  # sparse: nothing allocated yet
        assert st.st_mode & 0o777 == 0o644 & ~_umask()
        assert b.size == 1 << 30
        assert "big.img" in b.describe()
    finally:
        b.close()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_file_persists_across_close_and_reopen_without_size(tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    data = pattern(8192)
    b = FileBackstore(path, MiB)
    assert b.writev(4096, split(data, [1, 4095, 4096])) == 8192
    b.close()
    b.close()  # idempotent
    assert b.closed
    again = FileBackstore(path)
    try:
        assert again.size == MiB
        out = split(bytes(8192), [8192])
        assert again.readv(4096, out) == 8192
        assert joined(out) == data
    finally:
        again.close()


def test_file_grows_existing_smaller_file_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    path.write_bytes(pattern(1024))
    b = FileBackstore(path, 8192)
    try:
        assert path.stat().st_size == 8192
        out = split(bytes(2048), [2048])
        b.readv(0, out)
        assert joined(out) == pattern(1024) + bytes(1024)
    finally:
        b.close()


def test_file_same_size_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "s.img"
    path.write_bytes(bytes(4096))
    FileBackstore(path, 4096).close()


def test_file_refuses_to_shrink(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(bytes(8192))
    with pytest.raises(ValueError, match=r"is 8192 bytes, larger than size=4096; refusing"):
        FileBackstore(path, 4096)
    assert path.stat().st_size == 8192


def test_file_missing_without_size(tmp_path: Path) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(ValueError, match=r"nope\.img does not exist \(give size= to create it\)"):
        FileBackstore(path)
    assert not path.exists()


@pytest.mark.parametrize("size", [0, -512, 1000, 513])
def test_file_size_must_be_positive_multiple_of_512(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match="not a positive multiple of 512"):
        FileBackstore(tmp_path / "x.img", size)
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("length", [0, 1000])
def test_file_existing_size_must_be_multiple_of_512(tmp_path: Path, length: int) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(length))
    with pytest.raises(ValueError, match=rf"is {length} bytes, not a positive multiple of 512"):
        FileBackstore(path)


def test_file_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BackstoreError, match="directory missing"):
        FileBackstore(tmp_path / "no" / "such.img", 4096)


def test_file_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(BackstoreError, match=r"cannot open .*EISDIR"):
        FileBackstore(tmp_path, 4096)


def test_file_not_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # O_RDWR on a FIFO does not block on Linux.
    with pytest.raises(ValueError, match="is not a regular file"):
        FileBackstore(fifo)


def test_file_lock_conflict_names_path(tmp_path: Path) -> None:
    path = tmp_path / "shared.img"
    first = FileBackstore(path, 4096)
    try:
        with pytest.raises(BackstoreError, match=r"shared\.img is already in use"):
            FileBackstore(path, 4096)
        with pytest.raises(BackstoreError, match="already in use"):
            FileBackstore(path)
    finally:
        first.close()
    FileBackstore(path).close()  # released by close()


def test_file_lock_conflict_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "proc.img"
    first = FileBackstore(path, 4096)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                FileBackstore(path)
            except BackstoreError:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        first.close()


# --- file: I/O -------------------------------------------------------------------------------


def test_file_roundtrip_through_pool_views(fb: FileBackstore, pool: Pool) -> None:
    n = 200 * 1024  # four blocks, the last partly used
    data = pattern(n, seed=3)
    sg = pool.alloc(n)
    sg.copy_in(data)
    assert fb.writev(512 * 3, sg.views()) == n
    sg.zero()
    assert fb.readv(512 * 3, sg.views()) == n
    assert sg.to_bytes() == data
    sg.release()


def test_file_views_not_starting_at_block_boundaries(fb: FileBackstore, pool: Pool) -> None:
    sg = pool.alloc(300_000)
    data = pattern(100_000, seed=9)
    views = sg.views(12_345, 100_000)
    for v, piece in zip(views, split(data, [len(v) for v in views]), strict=True):
        v[:] = piece
    fb.writev(0, views)
    out = split(bytes(100_000), [100_000])
    fb.readv(0, out)
    assert joined(out) == data
    sg.release()


def test_file_empty_transfer(fb: FileBackstore) -> None:
    assert fb.readv(fb.size, []) == 0
    assert fb.writev(0, [memoryview(bytearray())]) == 0


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-512, 512), (4 * MiB - 511, 512), (4 * MiB, 1), (4 * MiB + 512, 0)],
)
def test_file_bounds(fb: FileBackstore, offset: int, length: int) -> None:
    buf = [memoryview(bytearray(length))]
    with pytest.raises(BackstoreError, match="out of range"):
        fb.readv(offset, buf)
    with pytest.raises(BackstoreError, match="out of range"):
        fb.writev(offset, buf)
    assert os.path.getsize(fb.path) == 4 * MiB


def test_file_last_byte_in_range(fb: FileBackstore) -> None:
    fb.writev(fb.size - 512, split(pattern(512), [512]))
    out = split(bytes(512), [100, 412])
    assert fb.readv(fb.size - 512, out) == 512
    assert joined(out) == pattern(512)


def test_file_non_byte_format_views(fb: FileBackstore) -> None:
    words = memoryview(bytearray(pattern(4096))).cast("I")
    fb.writev(0, [words])
    out = memoryview(bytearray(4096)).cast("Q")
    fb.readv(0, [out])
    assert out.tobytes() == pattern(4096)


class Partial:
    """Wraps ``os.preadv``/``os.pwritev`` to transfer at most ``steps[i]`` bytes per call."""

    def __init__(self, real: Callable[..., int], steps: Sequence[int]) -> None:
        self.real = real
        self.steps = list(steps)
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, fd: int, bufs: Sequence[memoryview], offset: int, *flags: int) -> int:
        self.calls.append((offset, [len(b) for b in bufs]))
        limit = self.steps.pop(0) if self.steps else 1 << 62
        trimmed, left = [], limit
        for b in bufs:
            if left == 0:
                break
            trimmed.append(b[: min(len(b), left)])
            left -= len(trimmed[-1])
        return self.real(fd, trimmed, offset, *flags)


# Steps chosen to stop mid-buffer, exactly at a boundary, and across several buffers.
SHORT_STEPS = [1, 99, 900, 3000, 5, 7000]
SIZES = [100, 1000, 4096, 1, 6995, 100]  # 12292 bytes


def test_file_short_writes_then_short_reads(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(sum(SIZES), seed=5)
    writer = Partial(os.pwritev, SHORT_STEPS)
    monkeypatch.setattr(os, "pwritev", writer)
    assert fb.writev(1024, split(data, SIZES)) == len(data)
    offsets = [off for off, _ in writer.calls]
    assert offsets == [1024, 1025, 1124, 2024, 5024, 5029, 12029]  # last call unlimited
    # The remainder after each short call: mid-buffer slices and whole buffers dropped.
    assert writer.calls[1][1] == [99, *SIZES[1:]]  # 1 byte done
    assert writer.calls[2][1] == SIZES[1:]  # exactly the first buffer done
    assert writer.calls[3][1] == [100, *SIZES[2:]]  # 900 into the second
    assert writer.calls[4][1] == [1196, 1, 6995, 100]  # 2900 into the third
    monkeypatch.undo()

    reader = Partial(os.preadv, list(reversed(SHORT_STEPS)))
    monkeypatch.setattr(os, "preadv", reader)
    out = split(bytes(len(data)), list(reversed(SIZES)))
    assert fb.readv(1024, out) == len(data)
    assert joined(out) == data
    assert len(reader.calls) == len(SHORT_STEPS) + 1
    monkeypatch.undo()

    check = split(bytes(len(data)), [len(data)])
    fb.readv(1024, check)
    assert joined(check) == data


def test_file_short_transfers_byte_by_byte(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(64, seed=11)
    monkeypatch.setattr(os, "pwritev", Partial(os.pwritev, [1] * 64))
    fb.writev(7, split(data, [3, 0, 30, 31]))
    monkeypatch.setattr(os, "preadv", Partial(os.preadv, [1] * 64))
    out = split(bytes(64), [64])
    fb.readv(7, out)
    assert joined(out) == data


def test_file_does_not_copy_buffers(fb: FileBackstore, monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches the syscall are views sharing memory with the caller's buffers."""
    backing = bytearray(8192)
    seen: list[memoryview] = []
    real = os.preadv

    def spy(fd: int, bufs: Sequence[memoryview], offset: int, *flags: int) -> int:
        seen.extend(bufs)
        return real(fd, [b[:1000] for b in bufs][:1], offset, *flags)

    fb.writev(0, split(pattern(8192), [8192]))
    monkeypatch.setattr(os, "preadv", spy)
    fb.readv(0, [memoryview(backing)])
    assert all(isinstance(v, memoryview) and v.obj is backing for v in seen)
    assert bytes(backing) == pattern(8192)


def test_file_read_past_eof_is_an_error(fb: FileBackstore) -> None:
    os.truncate(fb.path, 4096)  # someone else shrank it behind our back
    with pytest.raises(BackstoreError, match="end of file at 4096"):
        fb.readv(0, [memoryview(bytearray(8192))])


def test_file_zero_byte_write_is_an_error(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwritev", lambda *a: 0)
    with pytest.raises(BackstoreError, match="wrote nothing"):
        fb.writev(0, [memoryview(bytearray(512))])


def _raise(err: int) -> Callable[..., Any]:
    def fail(*_args: object) -> int:
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize(("name", "method"), [("preadv", "readv"), ("pwritev", "writev")])
def test_file_oserror_becomes_backstore_error(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch, name: str, method: str
) -> None:
    monkeypatch.setattr(os, name, _raise(errno.EIO))
    with pytest.raises(BackstoreError) as info:
        getattr(fb, method)(1024, [memoryview(bytearray(512))])
    msg = str(info.value)
    assert "Errno 5 EIO" in msg
    assert fb.path in msg
    assert "at 1024" in msg
    assert isinstance(info.value.__cause__, OSError)


def test_file_flush_error(fb: FileBackstore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fdatasync", _raise(errno.ENOSPC))
    with pytest.raises(BackstoreError, match=r"fdatasync .*ENOSPC"):
        fb.flush()


def test_file_close_releases_lock_even_if_flush_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.img"
    b = FileBackstore(path, 4096)
    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", _raise(errno.EIO))
        with pytest.raises(BackstoreError, match="EIO"):
            b.close()
    assert b.closed
    FileBackstore(path).close()


def test_file_close_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    b = FileBackstore(tmp_path / "f.img", 4096)
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    fd = b._fd
    b.close()
    assert synced == [fd]


def test_file_io_after_close(tmp_path: Path) -> None:
    b = FileBackstore(tmp_path / "f.img", 4096)
    b.close()
    with pytest.raises(BackstoreError, match="EBADF"):
        b.readv(0, [memoryview(bytearray(512))])


def test_file_many_buffers_beyond_iov_max(fb: FileBackstore) -> None:
    count = file_mod._IOV_MAX + 300
    data = pattern(count * 2, seed=13)
    fb.writev(0, split(data, [2] * count))
    out = split(bytes(count * 2), [2] * count)
    assert fb.readv(0, out) == count * 2
    assert joined(out) == data


# --- file: read_nowait -----------------------------------------------------------------------


def test_read_nowait_serves_cached_data(fb: FileBackstore, pool: Pool) -> None:
    data = pattern(128 * 1024, seed=17)
    fb.writev(MiB, split(data, [len(data)]))  # just written: in the page cache
    sg = pool.alloc(len(data))
    got = fb.read_nowait(MiB, sg.views())
    if got is None:  # pragma: no cover - filesystem without RWF_NOWAIT for buffered reads
        pytest.skip("RWF_NOWAIT unsupported here")
    assert got == len(data)
    assert sg.to_bytes() == data
    sg.release()


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EOPNOTSUPP])
def test_read_nowait_miss_returns_none(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    flags_seen: list[tuple[int, ...]] = []

    def miss(fd: int, bufs: Sequence[memoryview], offset: int, *flags: int) -> int:
        flags_seen.append(flags)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "preadv", miss)
    assert fb.read_nowait(0, [memoryview(bytearray(512))]) is None
    assert flags_seen == [(os.RWF_NOWAIT,)]


def test_read_nowait_partial_then_miss(fb: FileBackstore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short NOWAIT read (next page uncached) followed by EAGAIN is a miss, not a result."""
    fb.writev(0, split(pattern(8192), [8192]))
    real = os.preadv
    calls = 0

    def half(fd: int, bufs: Sequence[memoryview], offset: int, *flags: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real(fd, [bufs[0][:4096]], offset, *flags)

    monkeypatch.setattr(os, "preadv", half)
    assert fb.read_nowait(0, [memoryview(bytearray(8192))]) is None
    assert calls == 2


def test_read_nowait_short_reads_complete(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(12292, seed=19)
    fb.writev(0, split(data, SIZES))
    monkeypatch.setattr(os, "preadv", Partial(os.preadv, SHORT_STEPS))
    out = split(bytes(len(data)), SIZES)
    assert fb.read_nowait(0, out) == len(data)
    assert joined(out) == data


def test_read_nowait_other_errors_raise(fb: FileBackstore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "preadv", _raise(errno.EIO))
    with pytest.raises(BackstoreError, match="EIO"):
        fb.read_nowait(0, [memoryview(bytearray(512))])


def test_read_nowait_bounds(fb: FileBackstore) -> None:
    with pytest.raises(BackstoreError, match="out of range"):
        fb.read_nowait(fb.size, [memoryview(bytearray(1))])


def test_read_nowait_without_rwf_nowait(fb: FileBackstore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "RWF_NOWAIT")
    assert fb.read_nowait(0, [memoryview(bytearray(512))]) is None


# --- ram -------------------------------------------------------------------------------------


def test_ram_starts_zeroed_and_round_trips(pool: Pool) -> None:
    ram = RamBackstore(MiB)
    try:
        sg = pool.alloc(100_000)
        sg.copy_in(b"\xff" * 100_000)
        ram.readv(0, sg.views())
        assert sg.to_bytes() == bytes(100_000)
        data = pattern(100_000, seed=23)
        sg.copy_in(data)
        assert ram.writev(MiB - 100_000, sg.views()) == 100_000
        out = split(bytes(100_000), [1, 65535, 34464])
        assert ram.readv(MiB - 100_000, out) == 100_000
        assert joined(out) == data
        sg.release()
    finally:
        ram.close()


def test_ram_is_not_blocking_and_lazy() -> None:
    ram = RamBackstore(1 << 30)  # a gigabyte of untouched pages costs nothing
    try:
        assert ram.blocking is False
        out = [memoryview(bytearray(b"x" * 512))]
        ram.readv((1 << 30) - 512, out)
        assert bytes(out[0]) == bytes(512)
    finally:
        ram.close()


def test_ram_bounds_and_closed() -> None:
    ram = RamBackstore(4096)
    with pytest.raises(BackstoreError, match="out of range"):
        ram.readv(4096, [memoryview(bytearray(1))])
    with pytest.raises(BackstoreError, match="out of range"):
        ram.writev(-1, [memoryview(bytearray(1))])
    ram.close()
    ram.close()
    with pytest.raises(BackstoreError, match="closed"):
        ram.readv(0, [memoryview(bytearray(1))])


def test_ram_refuses_bad_size() -> None:
    with pytest.raises(ValueError, match="not a positive multiple of 512"):
        RamBackstore(100)


def test_ram_non_byte_views() -> None:
    ram = RamBackstore(4096)
    try:
        ram.writev(0, [memoryview(bytearray(pattern(1024))).cast("H")])
        out = memoryview(bytearray(1024)).cast("I")
        ram.readv(0, [out])
        assert out.tobytes() == pattern(1024)
    finally:
        ram.close()


# --- null ------------------------------------------------------------------------------------


def test_null_read_zeroes_dirty_buffers(pool: Pool) -> None:
    null = NullBackstore(1 << 40)
    sg = pool.alloc(200_000)
    sg.copy_in(b"\xaa" * 200_000)  # stale bytes of some earlier command
    assert null.readv(1 << 39, sg.views()) == 200_000
    assert sg.to_bytes() == bytes(200_000)
    sg.release()
    dirty = split(b"\x55" * 70_000, [1, 69_999])
    null.readv(0, dirty)
    assert joined(dirty) == bytes(70_000)


def test_null_discards_writes() -> None:
    null = NullBackstore(4096)
    assert null.writev(0, split(pattern(4096), [4096])) == 4096
    out = split(b"\x01" * 4096, [4096])
    null.readv(0, out)
    assert joined(out) == bytes(4096)
    assert null.blocking is False
    null.flush()
    null.close()


def test_null_bounds_and_size() -> None:
    null = NullBackstore(4096)
    with pytest.raises(BackstoreError, match="out of range"):
        null.writev(4000, [memoryview(bytearray(512))])
    with pytest.raises(BackstoreError, match="out of range"):
        null.readv(-512, [memoryview(bytearray(512))])
    with pytest.raises(ValueError, match="not a positive multiple of 512"):
        NullBackstore(0)


def test_file_short_transfer_inside_non_byte_view(
    fb: FileBackstore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(4096, seed=29)
    monkeypatch.setattr(os, "pwritev", Partial(os.pwritev, [3, 1000]))
    fb.writev(0, [memoryview(bytearray(data)).cast("I")])
    monkeypatch.setattr(os, "preadv", Partial(os.preadv, [5, 2001]))
    out = memoryview(bytearray(4096)).cast("Q")
    fb.readv(0, [out])
    assert out.tobytes() == data


def test_ram_absurd_size_is_refused_up_front() -> None:
    with pytest.raises(BackstoreError, match="ram: cannot map 4E of memory"):
        RamBackstore(4 << 60)


# --- file: direct=1 (O_DIRECT) ---------------------------------------------------------------


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    """A directory on a disk filesystem: tmp_path may be tmpfs, which refuses O_DIRECT."""
    d = Path(tempfile.mkdtemp(prefix="sgtarget-direct-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def open_direct(path: Path, size: int | None = 4 * MiB) -> FileBackstore:
    try:
        return FileBackstore(path, size, direct=True)
    except BackstoreError as exc:
        if "O_DIRECT" in str(exc):
            pytest.skip(f"O_DIRECT refused under /var/tmp too: {exc}")
        raise


@pytest.mark.parametrize(
    ("value", "direct"),
    [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False), ("False", False)],
)
def test_file_direct_key(direct_dir: Path, value: str, direct: bool) -> None:
    try:
        b = create("file", {"path": str(direct_dir / "d.img"), "size": "64K", "direct": value})
    except BackstoreError as exc:
        pytest.skip(f"O_DIRECT refused under /var/tmp: {exc}")
    assert isinstance(b, FileBackstore)
    try:
        assert b.direct is direct
        assert b.limits == (file_mod.DIRECT_LIMITS if direct else None)
        assert ("direct I/O" in b.describe()) is direct
        if direct:
            assert b.limits is not None
            assert b.limits.alignment == 4096
            assert b.read_nowait(0, [memoryview(bytearray(512))]) is None
    finally:
        b.close()


def test_file_direct_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"file: direct='on' is not one of 1, yes, true, 0"):
        create("file", {"path": str(tmp_path / "d.img"), "size": "64K", "direct": "on"})
    assert not (tmp_path / "d.img").exists()


def test_file_direct_size_must_be_4k_multiple(direct_dir: Path) -> None:
    with pytest.raises(ValueError, match="size 6144 is not a positive multiple of 4096"):
        FileBackstore(direct_dir / "a.img", 6144, direct=True)
    (direct_dir / "b.img").write_bytes(bytes(6144))
    with pytest.raises(ValueError, match="6144 bytes, not a multiple of 4096 as direct=1 needs"):
        open_direct(direct_dir / "b.img", None)


def test_file_direct_refused_at_open_names_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(file_mod, "_fs_type", lambda path: "tmpfs")
    with pytest.raises(BackstoreError) as info:
        FileBackstore(tmp_path / "d.img", 64 * 1024, direct=True)
    msg = str(info.value)
    assert "its filesystem (tmpfs) refuses O_DIRECT (direct=1)" in msg
    assert "EINVAL" in msg
    assert "use direct=0" in msg


def test_file_direct_refused_at_first_io_is_caught_by_the_probe(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def einval(*args: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    with monkeypatch.context() as m:
        m.setattr(os, "preadv", einval)
        with pytest.raises(BackstoreError, match=r"refuses O_DIRECT \(direct=1\)"):
            FileBackstore(direct_dir / "d.img", 64 * 1024, direct=True)
    # The descriptor and its lock were released.
    open_direct(direct_dir / "d.img", 64 * 1024).close()


def test_fs_type_of_known_mounts(tmp_path: Path) -> None:
    assert file_mod._fs_type("/proc/self/status") == "proc"
    assert file_mod._fs_type(str(tmp_path / "x")) is not None


def test_file_direct_roundtrip_aligned_is_zero_copy(direct_dir: Path, pool: Pool) -> None:
    b = open_direct(direct_dir / "d.img")
    try:
        n = 200 * 1024
        data = pattern(n, seed=41)
        sg = pool.alloc(n)
        sg.copy_in(data)
        copied = pool.stats.copied_bytes
        assert b.writev(4096 * 3, sg.views()) == n
        sg.zero()
        assert b.readv(4096 * 3, sg.views()) == n
        assert sg.to_bytes() == data
        assert pool.stats.copied_bytes == copied
        sg.release()
    finally:
        b.close()


def rw10(op: int, lba: int, n: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def direct_target(b: FileBackstore) -> ScsiTarget:
    return ScsiTarget("iqn.2024-01.test:direct", [LogicalUnit(b, runner=run_inline, identity="d")])


def test_file_direct_through_lu_aligned_reads_copy_nothing(direct_dir: Path, pool: Pool) -> None:
    b = open_direct(direct_dir / "d.img")
    try:
        target = direct_target(b)
        run(target, pool, bytes(6))  # the power-on unit attention
        data = pattern(64 * 1024, seed=43)
        task, _ = run(target, pool, rw10(0x2A, 8, 128), data_out=data)
        assert task.status == Status.GOOD, task.sense.hex()
        # The fake transport copies Data-Out into the pool; the backstore copies nothing.
        assert not any(r.startswith("bounce") for r, _ in pool.stats.copies)
        before = pool.stats.copied_bytes
        task, ch = run(target, pool, rw10(0x28, 8, 128), edtl=len(data))
        assert task.status == Status.GOOD, task.sense.hex()
        assert bytes(ch.data_in) == data
        assert pool.stats.copied_bytes == before
        assert pool.stats.zero_copy_ios == 2
        assert pool.stats.bounced_ios == 0
    finally:
        b.close()


@pytest.mark.parametrize(
    ("lba", "nblocks"),
    [(3, 5), (0, 1), (7, 2), (8, 9), (1, 16), (4095, 1), (1, 2100)],
)
def test_file_direct_through_lu_unaligned_bounces(
    direct_dir: Path, pool: Pool, lba: int, nblocks: int
) -> None:
    path = direct_dir / "d.img"
    b = open_direct(path)
    try:
        target = direct_target(b)
        run(target, pool, bytes(6))
        old = pattern(4 * MiB, seed=5)
        with open(path, "r+b") as f:
            f.write(old)
        data = pattern(nblocks * 512, seed=lba)
        task, _ = run(target, pool, rw10(0x2A, lba, nblocks), data_out=data)
        assert task.status == Status.GOOD, task.sense.hex()
        expect = bytearray(old)
        expect[lba * 512 : (lba + nblocks) * 512] = data
        assert path.read_bytes() == expect  # neighbours in the edge blocks are kept
        task, ch = run(target, pool, rw10(0x28, lba, nblocks), edtl=len(data))
        assert task.status == Status.GOOD, task.sense.hex()
        assert bytes(ch.data_in) == data
        windows = -(-len(data) // (1024 * 1024))
        assert pool.stats.bounced_ios == 2 * windows
        assert pool.stats.copies[("bounce-unaligned", "in")] == len(data)
        assert pool.stats.copies[("bounce-unaligned", "out")] == len(data)
    finally:
        b.close()


# ---- thin provisioning: discard and mapped extents --------------------------------------------


def test_file_discard_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "thin.img"
    b = FileBackstore(path, 4 * MiB)
    try:
        data = pattern(2 * MiB, seed=3)
        b.writev(0, split(data, [2 * MiB]))
        b.flush()
        before = os.stat(path).st_blocks
        assert b.mapped_extents(0, 4 * MiB) == [(0, 2 * MiB, True), (2 * MiB, 2 * MiB, False)]
        b.discard(MiB // 2, MiB)
        assert os.stat(path).st_blocks * 512 <= before * 512 - MiB
        assert os.path.getsize(path) == 4 * MiB
        out = bytearray(2 * MiB)
        b.readv(0, [memoryview(out)])
        expect = bytearray(data)
        expect[MiB // 2 : MiB // 2 + MiB] = bytes(MiB)
        assert out == expect
        assert b.mapped_extents(0, 4 * MiB) == [
            (0, MiB // 2, True),
            (MiB // 2, MiB, False),
            (MiB // 2 + MiB, MiB // 2, True),
            (2 * MiB, 2 * MiB, False),
        ]
        # Sub-page ranges cannot be freed but must still read back as zeros.
        b.discard(100 * 512, 512)
        one = bytearray(512)
        b.readv(100 * 512, [memoryview(one)])
        assert one == bytes(512)
        b.discard(0, 0)
        with pytest.raises(BackstoreError, match="out of range"):
            b.discard(4 * MiB - 512, 1024)
    finally:
        b.close()


def test_file_discard_falls_back_to_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "_punch_hole", lambda fd, off, n: errno.EOPNOTSUPP)
    b = FileBackstore(tmp_path / "z.img", MiB)
    try:
        b.writev(0, split(b"\xee" * MiB, [MiB]))
        b.discard(512, 3 * 512)
        out = bytearray(5 * 512)
        b.readv(0, [memoryview(out)])
        assert out == b"\xee" * 512 + bytes(3 * 512) + b"\xee" * 512
    finally:
        b.close()


def test_file_discard_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_mod, "_punch_hole", lambda fd, off, n: errno.EIO)
    b = FileBackstore(tmp_path / "e.img", MiB)
    try:
        with pytest.raises(BackstoreError, match="discard of 512 bytes at 0"):
            b.discard(0, 512)
    finally:
        b.close()


def test_ram_discard_zeroes_and_frees() -> None:
    b = RamBackstore(4 * MiB)
    try:
        data = pattern(4 * MiB, seed=9)
        b.writev(0, split(data, [4 * MiB]))
        # Unaligned at both ends: the whole pages inside are dropped, the edges zeroed.
        b.discard(1000, 3 * MiB)
        out = bytearray(4 * MiB)
        b.readv(0, [memoryview(out)])
        expect = bytearray(data)
        expect[1000 : 1000 + 3 * MiB] = bytes(3 * MiB)
        assert out == expect
        b.discard(10, 20)  # within one page
        b.readv(0, [memoryview(out)])
        assert out[10:30] == bytes(20)
        assert out[9] == expect[9]
        assert out[30] == expect[30]
        assert b.mapped_extents(0, 4 * MiB) == [(0, 4 * MiB, True)]
        with pytest.raises(BackstoreError, match="out of range"):
            b.discard(4 * MiB, 1)
    finally:
        b.close()
    with pytest.raises(BackstoreError, match="closed"):
        b.discard(0, 512)


def test_null_discard_is_a_no_op() -> None:
    b = NullBackstore(MiB)
    b.discard(0, MiB)
    assert b.mapped_extents(512, 1024) == [(512, 1024, True)]


def test_default_discard_writes_zeros() -> None:
    class Plain(Backstore):
        kind = "plain"

        def __init__(self) -> None:
            super().__init__(3 * MiB)
            self.data = bytearray(b"\x01" * self.size)

        def readv(self, offset: int, bufs: Sequence[memoryview]) -> int:
            raise NotImplementedError

        def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
            for v in bufs:
                self.data[offset : offset + len(v)] = v
                offset += len(v)
            return sum(len(v) for v in bufs)

    b = Plain()
    b.discard(512, 2 * MiB + 512)
    assert b.data[:512] == b"\x01" * 512
    assert b.data[512 : 2 * MiB + 1024] == bytes(2 * MiB + 512)
    assert b.data[2 * MiB + 1024 :] == b"\x01" * (MiB - 1024)


def test_file_reads_the_page_cache_has_skip_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached read is served inline (RWF_NOWAIT); a miss, and every write, go through the
    runner (the thread pool), and a miss still reads the right bytes."""
    bs = FileBackstore(str(tmp_path / "c.img"), size=1 << 20)
    calls: list[str] = []

    async def runner(fn: Callable[..., Any], /, *args: Any) -> Any:
        calls.append(fn.__name__)
        return fn(*args)

    io = bs.io(runner)
    buf = bytearray(8192)
    try:
        assert asyncio.run(io.writev(0, [memoryview(b"\x5a" * 8192)])) == 8192
        assert calls == ["writev"]
        # Just written: cached, so no thread.
        assert asyncio.run(io.readv(0, [memoryview(buf)])) == 8192
        assert buf == b"\x5a" * 8192
        assert calls == ["writev"]
        # A miss (part of the range not cached): the runner reads all of it.
        monkeypatch.setattr(bs, "read_nowait", lambda offset, bufs: None)
        buf[:] = bytes(8192)
        assert asyncio.run(io.readv(0, [memoryview(buf)])) == 8192
        assert buf == b"\x5a" * 8192
        assert calls == ["writev", "readv"]
    finally:
        bs.close()


# --- RunnerIO.writev_soon: batched writes -----------------------------------------------------


class _CountingRunner:
    """A runner that runs calls in a thread (like the server's) and counts them."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        self.calls += 1
        return await asyncio.to_thread(fn, *args)


def test_writev_soon_batches_one_loop_turn_into_one_runner_call(fb: FileBackstore) -> None:
    runner = _CountingRunner()
    io = fb.io(runner)
    results: list[tuple[int, BaseException | None]] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()
        for i in range(8):
            data = memoryview(pattern(4096, seed=i + 1))

            def finished(error: BaseException | None, i: int = i) -> None:
                results.append((i, error))
                if len(results) == 8:
                    done.set_result(None)

            assert io.writev_soon(i * 4096, [data], finished)
        await done

    asyncio.run(main())
    # Eight writes queued in one turn: one thread hand-off, each completed in order.
    assert runner.calls == 1
    assert results == [(i, None) for i in range(8)]
    for i in range(8):
        out = bytearray(4096)
        fb.readv(i * 4096, [memoryview(out)])
        assert bytes(out) == pattern(4096, seed=i + 1)


def test_writev_soon_reports_each_write_error_without_a_traceback(fb: FileBackstore) -> None:
    io = fb.io(_CountingRunner())
    errors: list[BaseException | None] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        def finished(error: BaseException | None) -> None:
            errors.append(error)
            if len(errors) == 2:
                done.set_result(None)

        # The second write runs past the end of the file: only it fails.
        assert io.writev_soon(0, [memoryview(bytes(512))], finished)
        assert io.writev_soon(fb.size, [memoryview(bytes(512))], finished)
        await done

    asyncio.run(main())
    assert errors[0] is None
    assert isinstance(errors[1], BackstoreError)
    # Its frames held the pool views: the error must not keep them alive.
    assert errors[1].__traceback__ is None


def test_writev_soon_is_not_offered_where_writev_now_applies() -> None:
    # RAM and null write inline (writev_now); they never queue behind a thread.
    io = RamBackstore(MiB).io(run_inline)
    assert io.writev_now(0, [memoryview(b"x" * 512)]) == 512
    assert not io.writev_soon(0, [memoryview(b"x" * 512)], lambda _e: None)
