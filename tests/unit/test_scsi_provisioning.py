"""Thin provisioning: UNMAP, WRITE SAME(10/16), GET LBA STATUS, VPD B0/B2, READ CAPACITY(16)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.cli.main import main as cli_main
from sgtarget.cli.specs import build_backstore, lun_flag, parse_lun_spec
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lbastatus import block_runs, lba_status_data
from sgtarget.scsi.lu import COMMANDS, LogicalUnit
from sgtarget.scsi.provisioning import (
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BLOCKS,
)
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline
from sgtarget.server.target import LunOptions, TargetConfig, TargetServer

from .scsi_fakes import MemBackstore, run

BS = 512
NBLOCKS = 8192  # 4 MiB
TARGET_NAME = "iqn.2024-01.test:tgt"


class ThinMem(MemBackstore):
    """A MemBackstore that remembers discards and models allocation per block."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.discards: list[tuple[int, int]] = []
        self.unmapped = bytearray(size // BS)  # 1: deallocated

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))
        self.data[offset : offset + length] = bytes(length)
        self.unmapped[offset // BS : (offset + length) // BS] = b"\1" * (length // BS)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:  # type: ignore[override]
        n = super().writev(offset, bufs)
        self.unmapped[offset // BS : (offset + n) // BS] = bytes(n // BS)
        return n

    def mapped_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        for b in range(offset // BS, (offset + length) // BS):
            mapped = not self.unmapped[b]
            if out and out[-1][2] == mapped:
                o, n, m = out[-1]
                out[-1] = (o, n + BS, m)
            else:
                out.append((b * BS, BS, mapped))
        return out


@pytest.fixture
def store() -> ThinMem:
    return ThinMem(NBLOCKS * BS)


@pytest.fixture
def target(store: ThinMem, pool: Pool) -> ScsiTarget:
    """LUN 0 thin on ``store``, LUN 1 fully provisioned; power-on UAs consumed."""
    lu0 = LogicalUnit(store, runner=run_inline, identity=f"{TARGET_NAME}/lun0", thin=True)
    lu1 = LogicalUnit(MemBackstore(64 * BS), runner=run_inline, identity=f"{TARGET_NAME}/lun1")
    tgt = ScsiTarget(TARGET_NAME, [lu0, lu1])
    for lun in (0, 1):
        run(tgt, pool, bytes(6), lun=lun)
    return tgt


def sense_of(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION
    s = task.sense
    return s[2] & 0x0F, s[12], s[13]


def sks_of(task: Task) -> bytes:
    return task.sense[15:18]


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


def unmap_cdb(plen: int, anchor: bool = False) -> bytes:
    return bytes([0x42, int(anchor), 0, 0, 0, 0, 0]) + plen.to_bytes(2, "big") + b"\0"


def unmap_list(*descs: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def ws10(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([0x41, flags]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def ws16(lba: int, n: int, flags: int = 0) -> bytes:
    return bytes([0x93, flags]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


def lba_status_cdb(lba: int, alloc: int = 24) -> bytes:
    return bytes([0x9E, 0x12]) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + b"\0\0"


# ---- what thin and fully provisioned LUNs report ---------------------------------------------


def test_vpd_block_limits_thin(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, bytes([0x12, 0x01, 0xB0, 0x01, 0x00, 0]))
    good(task)
    assert bytes(ch.data_in) == (
        bytes.fromhex("00 b0 003c 00 ff 0008 00004000 00000800 00000000")
        # OPTIMAL UNMAP GRANULARITY: one physical block; UGAVALID, alignment 0.
        + bytes.fromhex("00100000 00000100 00000008 80000000 000000000000ffff")
        + bytes.fromhex("00000800 00000008 00000008 00000800 00000800")
    )
    assert MAX_UNMAP_LBA_COUNT == 0x100000
    assert MAX_UNMAP_DESCRIPTORS == 0x100
    assert MAX_WRITE_SAME_BLOCKS == 0xFFFF


@pytest.mark.parametrize(("lun", "body"), [(0, "00 e4 02 00"), (1, "00 00 00 00")])
def test_vpd_provisioning(target: ScsiTarget, pool: Pool, lun: int, body: str) -> None:
    task, ch = run(target, pool, bytes([0x12, 0x01, 0xB2, 0x01, 0x00, 0]), lun=lun)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00 b2 0004" + body)


@pytest.mark.parametrize(("lun", "last", "bits"), [(0, NBLOCKS - 1, 0xC0), (1, 63, 0x00)])
def test_read_capacity_16_lbpme_lbprz(
    target: ScsiTarget, pool: Pool, lun: int, last: int, bits: int
) -> None:
    cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0"
    task, ch = run(target, pool, cdb, lun=lun)
    good(task)
    expect = last.to_bytes(8, "big") + BS.to_bytes(4, "big") + bytes([0, 3, bits, 0])
    assert bytes(ch.data_in) == expect + bytes(16)


def test_rsoc_lists_unmap_only_on_thin(target: ScsiTarget, pool: Pool) -> None:
    rsoc_unmap = bytes([0xA3, 0x0C, 0x01, 0x42, 0, 0, 0, 0, 0x10, 0, 0, 0])
    _, ch = run(target, pool, rsoc_unmap)
    assert bytes(ch.data_in) == bytes.fromhex("00 03 000a 42 00 00000000 3f ffff 00")
    _, ch = run(target, pool, rsoc_unmap, lun=1)
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")
    rsoc_ws16 = bytes([0xA3, 0x0C, 0x01, 0x93, 0, 0, 0, 0, 0x20, 0, 0, 0])
    _, ch = run(target, pool, rsoc_ws16, lun=1)
    assert bytes(ch.data_in) == bytes.fromhex("00 03 0010 93 09 ffffffffffffffff ffffffff 3f 00")
    all_ops = bytes([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
    _, thin = run(target, pool, all_ops)
    _, full = run(target, pool, all_ops, lun=1)
    n = sum(1 for c in COMMANDS if c.supported_by(target.luns[0]))
    assert len(thin.data_in) == 4 + 8 * n
    assert len(full.data_in) == 4 + 8 * (n - 1)  # no UNMAP


# ---- UNMAP -----------------------------------------------------------------------------------


def test_unmap_golden(target: ScsiTarget, pool: Pool, store: ThinMem) -> None:
    store.data[:] = b"\xaa" * len(store.data)
    params = unmap_list((2, 3), (100, 1), (NBLOCKS - 1, 1), (7, 0))
    assert params == bytes.fromhex(
        "0046 0040 00000000"
        "0000000000000002 00000003 00000000"
        "0000000000000064 00000001 00000000"
        "0000000000001fff 00000001 00000000"
        "0000000000000007 00000000 00000000"
    )
    task, _ = run(target, pool, unmap_cdb(len(params)), data_out=params)
    good(task)
    assert task.transfer_length == len(params)
    assert store.discards == [(2 * BS, 3 * BS), (100 * BS, BS), ((NBLOCKS - 1) * BS, BS)]
    assert store.data[2 * BS : 5 * BS] == bytes(3 * BS)
    assert store.data[BS : 2 * BS] == b"\xaa" * BS
    assert store.data[5 * BS : 6 * BS] == b"\xaa" * BS


@pytest.mark.parametrize(
    "params",
    [b"", unmap_list(), unmap_list((NBLOCKS, 0)), unmap_list((0, 0)) + b"\x01" * 8],
    ids=["no-list", "no-descriptors", "0-blocks-at-end", "truncated-tail"],
)
def test_unmap_nothing_to_do(target: ScsiTarget, pool: Pool, store: ThinMem, params: bytes) -> None:
    task, _ = run(target, pool, unmap_cdb(len(params)), data_out=params, edtl=len(params))
    good(task)
    assert store.discards == []


def _bad_header(udl: int, bddl: int) -> bytes:
    return struct.pack(">HH4x", udl, bddl) + bytes(16)


@pytest.mark.parametrize(
    ("params", "plen", "asc", "sks"),
    [
        (bytes(7), 7, 0x1A, None),  # shorter than the header
        (bytes(1), 1, 0x1A, None),
        (_bad_header(22, 32), 24, 0x1A, None),  # more descriptors than the list holds
        (_bad_header(6, 16), 24, 0x26, "800000"),  # data length below the descriptors
        (
            unmap_list(*[(i, 1) for i in range(MAX_UNMAP_DESCRIPTORS + 1)]),
            8 + 16 * (MAX_UNMAP_DESCRIPTORS + 1),
            0x26,
            "800002",
        ),
        (unmap_list((0, MAX_UNMAP_LBA_COUNT), (0, 1)), 40, 0x26, "800020"),
        (unmap_list((NBLOCKS - 1, 2)), 24, 0x21, None),
        (unmap_list((0, 1), (NBLOCKS, 1)), 40, 0x21, None),
        (unmap_list((2**64 - 1, 1)), 24, 0x21, None),
    ],
)
def test_unmap_parameter_errors(  # noqa: PLR0917 - one per parametrized field
    target: ScsiTarget, pool: Pool, store: ThinMem, params: bytes, plen: int, asc: int, sks: str
) -> None:
    store.unmapped[:] = bytes(len(store.unmapped))
    big = ThinMem(2 * MAX_UNMAP_LBA_COUNT * BS) if asc == 0x26 and sks == "800020" else None
    tgt = target
    if big is not None:
        tgt = ScsiTarget(
            TARGET_NAME, [LogicalUnit(big, runner=run_inline, identity="x/lun0", thin=True)]
        )
        run(tgt, pool, bytes(6))
    task, _ = run(tgt, pool, unmap_cdb(plen), data_out=params, edtl=plen)
    assert sense_of(task) == (0x5, asc, 0)
    if sks is not None:
        assert sks_of(task) == bytes.fromhex(sks)
    assert store.discards == []  # nothing deallocated before every descriptor is checked
    if big is not None:
        assert big.discards == []


def test_unmap_cdb_errors(target: ScsiTarget, pool: Pool, store: ThinMem) -> None:
    params = unmap_list((0, 1))
    task, _ = run(target, pool, unmap_cdb(len(params), anchor=True), data_out=params)
    assert sense_of(task) == (0x5, 0x24, 0)
    assert sks_of(task) == bytes.fromhex("c80001")
    task, _ = run(target, pool, unmap_cdb(len(params)), data_out=params, lun=1)
    assert sense_of(task) == (0x5, 0x20, 0)  # not thin: no UNMAP
    # EDTL ends inside the parameter list.
    task, _ = run(target, pool, unmap_cdb(len(params)), data_out=params, edtl=16)
    assert sense_of(task) == (0x5, 0x0E, 0x03)
    assert store.discards == []


def test_unmap_backstore_failure(target: ScsiTarget, pool: Pool, store: ThinMem) -> None:
    def fail(offset: int, length: int) -> None:
        from sgtarget.backstores.base import BackstoreError  # noqa: PLC0415

        raise BackstoreError("injected")

    store.discard = fail  # type: ignore[method-assign]
    params = unmap_list((8, 1))
    task, _ = run(target, pool, unmap_cdb(len(params)), data_out=params)
    assert sense_of(task) == (0x3, 0x0C, 0)
    assert task.sense[3:7] == (8).to_bytes(4, "big")


# ---- WRITE SAME ------------------------------------------------------------------------------


@pytest.mark.parametrize("sixteen", [False, True])
def test_write_same_streams_one_block(
    target: ScsiTarget, pool: Pool, store: ThinMem, sixteen: bool
) -> None:
    block = bytes(range(256)) * 2
    n = 5000  # 2.4 MiB: more than one window
    cdb = ws16(10, n) if sixteen else ws10(10, n)
    blocks_before = pool.stats.blocks_in_use

    def small(ch: object) -> None:
        ch.partial_limit = 128 * 1024  # type: ignore[attr-defined]

    task, ch = run(target, pool, cdb, data_out=block, setup=small)
    good(task)
    assert task.transfer_length == BS
    assert store.data[10 * BS : (10 + n) * BS] == block * n
    assert store.data[9 * BS : 10 * BS] == bytes(BS)
    assert store.data[(10 + n) * BS : (11 + n) * BS] == bytes(BS)
    assert ch.receives == [(0, BS)]
    assert store.writes >= n * BS // (128 * 1024)  # went through small windows
    assert pool.stats.blocks_in_use == blocks_before


def test_write_same_zero_blocks_is_to_the_end(target: ScsiTarget, pool: Pool) -> None:
    lu1 = target.luns[1]
    store1 = lu1.backstore
    assert isinstance(store1, MemBackstore)
    task, _ = run(target, pool, ws10(60, 0), data_out=b"\x5a" * BS, lun=1)
    good(task)
    assert store1.data[60 * BS :] == b"\x5a" * (4 * BS)
    assert store1.data[: 60 * BS] == bytes(60 * BS)


def test_write_same_16_ndob_writes_zeros(target: ScsiTarget, pool: Pool) -> None:
    store1 = target.luns[1].backstore
    assert isinstance(store1, MemBackstore)
    store1.data[:] = b"\xff" * len(store1.data)
    task, ch = run(target, pool, ws16(4, 8, flags=0x01), lun=1, edtl=0)
    good(task)
    assert task.transfer_length == 0
    assert ch.receives == []
    assert store1.data[4 * BS : 12 * BS] == bytes(8 * BS)
    assert store1.data[3 * BS : 4 * BS] == b"\xff" * BS


@pytest.mark.parametrize("sixteen", [False, True])
@pytest.mark.parametrize("data", [bytes(BS), b"\xff" * BS])
def test_write_same_unmap_deallocates(
    target: ScsiTarget, pool: Pool, store: ThinMem, sixteen: bool, data: bytes
) -> None:
    store.data[:] = b"\xaa" * len(store.data)
    cdb = ws16(3, 5, 0x08) if sixteen else ws10(3, 5, 0x08)
    task, _ = run(target, pool, cdb, data_out=data)
    good(task)
    assert store.discards == [(3 * BS, 5 * BS)]
    assert store.data[3 * BS : 8 * BS] == bytes(5 * BS)  # LBPRZ


def test_write_same_16_ndob_unmap_until_end(target: ScsiTarget, pool: Pool, store: ThinMem) -> None:
    task, _ = run(target, pool, ws16(NBLOCKS - 7, 0, 0x09), edtl=0)
    good(task)
    assert store.discards == [((NBLOCKS - 7) * BS, 7 * BS)]


@pytest.mark.parametrize(
    ("cdb", "lun", "asc", "sks"),
    [
        (ws10(0, 1, 0x20), 0, 0x24, "cf0001"),  # WRPROTECT
        (ws16(0, 1, 0xE0), 0, 0x24, "cf0001"),
        (ws10(0, 1, 0x18), 0, 0x24, "cc0001"),  # ANCHOR (ANC_SUP 0)
        (ws16(0, 1, 0x10), 0, 0x24, "cc0001"),  # ANCHOR without UNMAP
        (ws10(0, 1, 0x08), 1, 0x24, "cb0001"),  # UNMAP on a fully provisioned LUN
        (ws16(0, 1, 0x08), 1, 0x24, "cb0001"),
        (ws10(NBLOCKS, 1), 0, 0x21, None),
        (ws10(NBLOCKS - 1, 2), 0, 0x21, None),
        (ws10(NBLOCKS + 1, 0), 0, 0x21, None),
        (ws10(0xFFFFFFFF, 0), 0, 0x21, None),
        (ws16(2**63, 0), 0, 0x21, None),
        (ws16(2**64 - 1, 1), 0, 0x21, None),
        (ws10(0, 0), 0, 0x24, "c00007"),  # 0 = to the end: more than MAXIMUM WRITE SAME
        (ws16(0, MAX_WRITE_SAME_BLOCKS + 1), 0, 0x24, "c0000a"),
    ],
)
def test_write_same_errors(  # noqa: PLR0917 - one per parametrized field
    pool: Pool, store: ThinMem, cdb: bytes, lun: int, asc: int, sks: str | None
) -> None:
    # A LUN larger than MAXIMUM WRITE SAME LENGTH, so the limit can be hit.
    big = (
        ThinMem((MAX_WRITE_SAME_BLOCKS + 2) * BS)
        if asc == 0x24
        and sks
        in (
            "c00007",
            "c0000a",
        )
        else store
    )
    full = MemBackstore(64 * BS)
    tgt = ScsiTarget(
        TARGET_NAME,
        [
            LogicalUnit(big, runner=run_inline, identity="t/lun0", thin=True),
            LogicalUnit(full, runner=run_inline, identity="t/lun1"),
        ],
    )
    run(tgt, pool, bytes(6), lun=lun)
    ndob = cdb[0] == 0x93 and cdb[1] & 0x01
    task, ch = run(tgt, pool, cdb, data_out=b"" if ndob else b"\x11" * BS, lun=lun, edtl=BS)
    assert sense_of(task) == (0x5, asc, 0)
    if sks is not None:
        assert sks_of(task) == bytes.fromhex(sks)
    assert ch.receives == []
    assert big.discards == []
    assert big.writes == 0


def test_write_same_max_length_accepted(pool: Pool) -> None:
    big = ThinMem((MAX_WRITE_SAME_BLOCKS + 2) * BS)
    tgt = ScsiTarget(TARGET_NAME, [LogicalUnit(big, runner=run_inline, identity="t/0", thin=True)])
    run(tgt, pool, bytes(6))
    task, _ = run(tgt, pool, ws16(2, 0), data_out=b"\x01" * BS)  # exactly the maximum
    good(task)
    assert big.data[2 * BS :] == b"\x01" * (MAX_WRITE_SAME_BLOCKS * BS)


@pytest.mark.parametrize("edtl", [0, BS // 2, BS - 1, BS + 1, 2 * BS])
def test_write_same_data_out_must_be_one_block(
    target: ScsiTarget, pool: Pool, store: ThinMem, edtl: int
) -> None:
    task, ch = run(target, pool, ws10(0, 4, 0x08), data_out=b"\xa6" * edtl, edtl=edtl)
    assert sense_of(task) == (0x5, 0x0E, 0x03)
    assert ch.receives == []
    assert store.discards == []


# ---- GET LBA STATUS --------------------------------------------------------------------------


def test_get_lba_status_golden(target: ScsiTarget, pool: Pool, store: ThinMem) -> None:
    store.unmapped[10:20] = b"\1" * 10
    task, ch = run(target, pool, lba_status_cdb(4, alloc=8 + 3 * 16))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex(
        "00000034 00000000"
        "0000000000000004 00000006 00 000000"
        "000000000000000a 0000000a 01 000000"
        "0000000000000014 00001fec 00 000000"
    )
    # A smaller allocation length: fewer descriptors, the header says how many were sent.
    task, ch = run(target, pool, lba_status_cdb(10, alloc=24))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex(
        "00000014 00000000 000000000000000a 0000000a 01 000000"
    )
    task, ch = run(target, pool, lba_status_cdb(10, alloc=12))
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00000014 00000000 00000000")


def test_get_lba_status_fully_provisioned(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, lba_status_cdb(63), lun=1)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex(
        "00000014 00000000 000000000000003f 00000001 00 000000"
    )


@pytest.mark.parametrize("lba", [NBLOCKS, NBLOCKS + 1, 2**63, 2**64 - 1])
def test_get_lba_status_beyond_eol(target: ScsiTarget, pool: Pool, lba: int) -> None:
    task, _ = run(target, pool, lba_status_cdb(lba))
    assert sense_of(task) == (0x5, 0x21, 0)


def test_lba_status_data_golden() -> None:
    assert lba_status_data([(0, 1, True), (1, 2, False)], 8) == bytes.fromhex(
        "00000024 000000000000000000000000 00000001 00 0000000000000000000001 00000002 01 000000"
    )


def test_block_runs_partial_blocks() -> None:
    # A block with any data is mapped; a hole inside one block does not deallocate it.
    extents = [(0, 700, True), (700, 2000, False), (2700, 1396, True)]
    assert block_runs(extents, 512, 0, 8) == [(0, 2, True), (2, 3, False), (5, 3, True)]
    assert block_runs([(0, 100, False), (100, 412, True)], 512, 0, 1) == [(0, 1, True)]


@given(
    st.lists(st.tuples(st.integers(1, 3000), st.booleans()), min_size=1, max_size=20),
    st.sampled_from([512, 4096]),
)
def test_block_runs_property(pieces: list[tuple[int, bool]], bs: int) -> None:
    extents: list[tuple[int, int, bool]] = []
    pos = 0
    for length, mapped in pieces:
        if extents and extents[-1][2] == mapped:
            o, n, m = extents[-1]
            extents[-1] = (o, n + length, m)
        else:
            extents.append((pos, length, mapped))
        pos += length
    end = pos // bs
    if end == 0:
        return
    runs = block_runs(extents, bs, 0, end)
    # Contiguous, merged, covering [0, end).
    at = 0
    for i, (lba, n, mapped) in enumerate(runs):
        assert lba == at
        assert n > 0
        if i:
            assert runs[i - 1][2] != mapped
        at += n
    assert at == end
    # A block is mapped iff any byte of it is.
    for b in range(end):
        any_mapped = any(m and o < (b + 1) * bs and o + n > b * bs for o, n, m in extents)
        status = next(m for lba, n, m in runs if lba <= b < lba + n)
        assert status == any_mapped


# ---- a real sparse file ----------------------------------------------------------------------


def test_unmap_on_sparse_file_frees_blocks(tmp_path: Path, pool: Pool) -> None:
    path = tmp_path / "thin.img"
    bs = FileBackstore(path, 8 * 1024 * 1024)
    try:
        tgt = ScsiTarget(
            TARGET_NAME, [LogicalUnit(bs, runner=run_inline, identity="t/0", thin=True)]
        )
        run(tgt, pool, bytes(6))
        data = b"\x77" * (2 * 1024 * 1024)
        n = len(data) // BS
        write = bytes([0x8A, 0]) + (0).to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"
        good(run(tgt, pool, write, data_out=data)[0])
        good(run(tgt, pool, bytes([0x35]) + bytes(9))[0])  # SYNCHRONIZE CACHE
        allocated = os.stat(path).st_blocks
        assert allocated * 512 >= len(data)
        task, ch = run(tgt, pool, lba_status_cdb(0))
        assert ch.data_in[8:21] == (0).to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0"
        # Deallocate the first MiB (and one 512-byte block that shares a 4 KiB page).
        params = unmap_list((0, n // 2), (n - 1, 1))
        good(run(tgt, pool, unmap_cdb(len(params)), data_out=params)[0])
        after = os.stat(path).st_blocks
        assert after * 512 <= allocated * 512 - 1024 * 1024
        assert os.path.getsize(path) == 8 * 1024 * 1024  # KEEP_SIZE
        read = bytes([0x88, 0]) + (0).to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"
        task, ch = run(tgt, pool, read, edtl=len(data))
        good(task)
        expect = bytes(len(data) // 2) + b"\x77" * (len(data) // 2 - BS) + bytes(BS)
        assert bytes(ch.data_in) == expect
        task, ch = run(tgt, pool, lba_status_cdb(0, alloc=8 + 16 * 4))
        good(task)
        first = ch.data_in[8:24]
        assert first == (0).to_bytes(8, "big") + (n // 2).to_bytes(4, "big") + b"\x01\0\0\0"
        second = ch.data_in[24:40]
        assert second[:8] == (n // 2).to_bytes(8, "big")
        assert second[12] == 0  # mapped
        # WRITE SAME with UNMAP frees too.
        good(run(tgt, pool, ws16(n // 2, n // 2, 0x09), edtl=0)[0])
        assert os.stat(path).st_blocks * 512 <= 64 * 1024
    finally:
        bs.close()


# ---- the thin LUN key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "thin"),
    [
        ("ram:size=1M", False),
        ("ram:size=1M,thin=1", True),
        ("ram:size=1M,thin=YES", True),
        ("ram:thin=true,size=1M", True),
        ("ram:size=1M,thin=0", False),
        ("ram:size=1M,thin=no", False),
        ("file:/x.img,size=1G,thin=false", False),
    ],
)
def test_thin_key(text: str, thin: bool) -> None:
    spec = parse_lun_spec(text)
    assert "thin" not in spec.params  # never reaches the backstore factory
    assert lun_flag(spec, "thin") is thin


def test_thin_key_errors() -> None:
    with pytest.raises(ValueError, match=r"thin='maybe' is not one of 1, yes, true") as info:
        lun_flag(parse_lun_spec("ram:size=1M,thin=maybe"), "thin")
    assert str(info.value).startswith("invalid LUN spec 'ram:size=1M,thin=maybe': ")
    with pytest.raises(ValueError, match="unknown key 'thick'"):
        build_backstore(parse_lun_spec("ram:size=1M,thick=1"))


def test_cli_rejects_bad_thin_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "never.img"
    assert cli_main(["serve", "--lun", f"file:{path},size=1M,thin=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "thin='2' is not one of" in err
    assert not path.exists()  # the LUN key is checked before the file is created


def test_target_server_passes_thin() -> None:
    config = TargetConfig(
        backstores=[RamBackstore(1 << 20), RamBackstore(1 << 20)],
        lun_options=[LunOptions(thin=True)],
        pool_size=1 << 20,
    )
    server = TargetServer(config)
    try:
        assert server.scsi.luns[0].thin
        assert not server.scsi.luns[1].thin  # missing options: defaults
    finally:
        server.executor.shutdown()
        server.pool.close()
        for b in config.backstores:
            b.close()
