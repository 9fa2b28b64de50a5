"""PI-formatted media: ``bs=``/``pi=`` keys, the protection stores (sidecar file, memory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgtarget.backstores.base import BackstoreError, create
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.pi import (
    TUPLE_SIZE,
    FileProtection,
    MemoryProtection,
    ProtectionStore,
    sidecar_path,
)
from sgtarget.backstores.ram import RamBackstore
from sgtarget.cli.specs import build_backstore, parse_lun_spec
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.task import run_inline

ESCAPE = b"\xff" * TUPLE_SIZE


def read(store: ProtectionStore, lba: int, n: int) -> bytes:
    buf = bytearray(n * TUPLE_SIZE)
    store.read(lba, [memoryview(buf)])
    return bytes(buf)


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ProtectionStore:
    if request.param == "file":
        return FileProtection(str(tmp_path / "x.pi"), 4096, 1)
    return MemoryProtection(4096, 1)


def test_unwritten_blocks_read_escape(store: ProtectionStore) -> None:
    assert read(store, 0, 4096) == ESCAPE * 4096


def test_write_read_back_and_discard(store: ProtectionStore) -> None:
    tuples = bytes(range(8)) + bytes(range(8, 16))
    store.write(10, [memoryview(tuples)[:5], memoryview(tuples)[5:]])
    assert read(store, 9, 4) == ESCAPE + tuples + ESCAPE
    store.discard(11, 1)
    assert read(store, 10, 2) == tuples[:8] + ESCAPE


def test_cached_sidecar_tuples_are_read_without_blocking(tmp_path: Path) -> None:
    store = FileProtection(str(tmp_path / "n.pi"), 4096, 1)
    try:
        tuples = bytes(range(16, 40))
        store.write(100, [memoryview(tuples)])  # just written: in the page cache
        buf = bytearray(len(tuples))
        assert store.read_nowait(100, [memoryview(buf)])
        assert buf == tuples
        with pytest.raises(BackstoreError, match="out of range"):
            store.read_nowait(4095, [memoryview(bytearray(16))])
    finally:
        store.close()
    assert not MemoryProtection(8, 1).read_nowait(0, [memoryview(bytearray(8))])


def test_format_resets_every_tuple_and_sets_the_type(store: ProtectionStore) -> None:
    store.write(0, [memoryview(bytes(8 * 600))])
    store.format(3)
    assert store.ptype == 3
    assert read(store, 0, 4096) == ESCAPE * 4096
    store.format(0)
    assert store.ptype == 0
    with pytest.raises(ValueError, match="not 0, 1, 2 or 3"):
        store.format(4)


def test_out_of_range_and_partial_tuples_are_refused(store: ProtectionStore) -> None:
    with pytest.raises(BackstoreError):
        store.write(4095, [memoryview(bytes(16))])
    with pytest.raises(BackstoreError):
        store.write(0, [memoryview(bytes(7))])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.binary(min_size=8, max_size=8)), max_size=20))
def test_memory_store_is_a_map_of_tuples(writes: list[tuple[int, bytes]]) -> None:
    store = MemoryProtection(64, 2)
    model = [ESCAPE] * 64
    for lba, tup in writes:
        store.write(lba, [memoryview(tup)])
        model[lba] = tup
    assert read(store, 0, 64) == b"".join(model)
    store.close()


def test_sidecar_is_sparse_and_stored_inverted(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    bs = FileBackstore(path, 1 << 20, pi=1)
    try:
        side = sidecar_path(str(path))
        assert os.path.getsize(side) == (1 << 20) // 512 * 8
        assert os.stat(side).st_blocks == 0
        assert bs.protection is not None
        assert bs.protection.ptype == 1
        bs.protection.write(1, [memoryview(b"\x00\x01\x02\x03\x04\x05\x06\x07")])
    finally:
        bs.close()
    with open(side, "rb") as f:
        raw = f.read(16)
    assert raw == bytes(8) + bytes(255 - i for i in range(8))
    # Reopened: the tuple is still there.
    again = FileBackstore(path, pi=1)
    try:
        assert again.protection is not None
        assert read(again.protection, 0, 2) == ESCAPE + bytes(range(8))
    finally:
        again.close()


def test_readonly_without_sidecar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="never creates the PI sidecar"):
        FileBackstore(path, readonly=True, pi=1)


@pytest.mark.parametrize(
    ("spec", "block_size", "ptype"),
    [
        ("ram:size=1M", 512, None),
        ("ram:size=1M,bs=4096", 4096, None),
        ("ram:size=1M,pi=2", 512, 2),
        ("ram:size=1M,bs=4096,pi=3", 4096, 3),
        ("null:size=1M,bs=4096", 4096, None),
        ("file:{dir}/a.img,size=1M,pi=1", 512, 1),
        ("file:{dir}/b.img,size=1M,bs=4096,pi=2", 4096, 2),
    ],
)
def test_spec_keys_reach_the_backstore_and_the_lu(
    spec: str, block_size: int, ptype: int | None, tmp_path: Path
) -> None:
    backstore = build_backstore(parse_lun_spec(spec.format(dir=tmp_path)))
    try:
        assert backstore.block_size == block_size
        pi = backstore.protection
        assert (pi.ptype if pi is not None else None) == ptype
        lu = LogicalUnit(backstore, runner=run_inline, identity="x")
        assert lu.block_size == block_size
        assert lu.num_blocks == (1 << 20) // block_size
    finally:
        backstore.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ram:size=1M,bs=1024", "bs='1024' is not 512 or 4096"),
        ("ram:size=1M,bs=4k", "bs='4k' is not 512 or 4096"),
        ("ram:size=1M,pi=4", "pi='4' is not 1, 2 or 3"),
        ("ram:size=1M,pi=0", "pi='0' is not 1, 2 or 3"),
        ("null:size=1M,pi=1", "pi=1 needs a medium that keeps what is written"),
        ("ram:size=6K,bs=4096", "ram: size 6144 is not a positive multiple of 4096"),
        ("file:{dir}/c.img,size=6K,bs=4096", "not a positive multiple of 4096"),
    ],
)
def test_bad_format_keys_are_refused_in_one_line(spec: str, message: str, tmp_path: Path) -> None:
    text = spec.format(dir=tmp_path)
    with pytest.raises(ValueError, match="invalid LUN spec") as info:
        build_backstore(parse_lun_spec(text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not any(p.name.endswith(".img") for p in tmp_path.iterdir())


def test_file_without_size_must_be_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(4096 + 512))
    with pytest.raises(ValueError, match="not a positive multiple of 4096"):
        create("file", {"path": str(path), "bs": "4096"})


def test_ram_close_releases_the_store() -> None:
    ram = RamBackstore(1 << 20, pi=1)
    assert isinstance(ram.protection, MemoryProtection)
    ram.close()


def test_handler_luns_keep_the_format_and_the_tuples_in_the_target(tmp_path: Path) -> None:
    from sgtarget.ring.backstore import RingBackstore  # noqa: PLC0415

    path = tmp_path / "r.img"
    bs = build_backstore(parse_lun_spec(f"file:{path},size=1M,pi=2,bs=4096,handler=copy"))
    try:
        assert isinstance(bs, RingBackstore)
        assert bs.block_size == 4096
        assert bs.handler_command.block_size == 4096
        assert bs.protection is not None
        assert bs.protection is bs.inner.protection  # type: ignore[union-attr]
        assert bs.protection.ptype == 2
        assert (tmp_path / "r.img.pi").exists()
        assert "4096-byte blocks, PI type 2" in bs.describe()
    finally:
        bs.close()
    null = build_backstore(parse_lun_spec("null:size=1M,bs=4096,handler=zerocopy"))
    try:
        assert null.block_size == 4096
        assert null.protection is None
    finally:
        null.close()
