"""The physical_block_size= and unmap= LUN keys: READ CAPACITY(16), VPD B0/B2, UNMAP, RSOC, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgtarget.backstores.ram import RamBackstore
from sgtarget.cli.main import main as cli_main
from sgtarget.cli.specs import lun_flags, lun_physical_block_size, parse_lun_spec
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import COMMANDS, LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline
from sgtarget.server.target import LunOptions, TargetConfig, TargetServer

from .scsi_fakes import MemBackstore, run

BS = 512
NBLOCKS = 2048
TARGET_NAME = "iqn.2024-01.test:geometry"
#: Fixed-format sense: ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (20h/00h).
INVALID_OPCODE = bytes.fromhex("70 00 05 00000000 0a 00000000 20 00 00 000000")

READ_CAPACITY_16 = bytes.fromhex("9e 10 0000000000000000 00000020 00 00")
VPD_B0 = bytes.fromhex("12 01 b0 00 ff 00")
VPD_B2 = bytes.fromhex("12 01 b2 00 ff 00")
RSOC_UNMAP = bytes.fromhex("a3 0c 01 42 0000 00000010 00 00")
RSOC_ALL = bytes.fromhex("a3 0c 00 00 0000 00001000 00 00")


class DiscardMem(MemBackstore):
    """A MemBackstore that records discards."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.discards: list[tuple[int, int]] = []

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))
        self.data[offset : offset + length] = bytes(length)


def make_target(pool: Pool, **keys: bool | int) -> tuple[ScsiTarget, DiscardMem]:
    """One LU with the given ``LogicalUnit`` keywords; its power-on unit attention consumed."""
    store = DiscardMem(NBLOCKS * BS)
    lu = LogicalUnit(store, runner=run_inline, identity=f"{TARGET_NAME}/lun0", **keys)  # type: ignore[arg-type]
    tgt = ScsiTarget(TARGET_NAME, [lu])
    run(tgt, pool, bytes(6))
    return tgt, store


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


# ---- physical_block_size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pbs", "exponent"), [(512, 0), (1024, 1), (4096, 3), (8192, 4), (65536, 7), (None, 3)]
)
def test_read_capacity_16_exponent(pool: Pool, pbs: int | None, exponent: int) -> None:
    keys: dict[str, bool | int] = {"thin": True}
    if pbs is not None:
        keys["physical_block_size"] = pbs
    tgt, _ = make_target(pool, **keys)
    task, ch = run(tgt, pool, READ_CAPACITY_16)
    good(task)
    # Last LBA, block length, P_TYPE/PROT_EN 0, LBPPBE, LBPME|LBPRZ and lowest aligned LBA 0.
    assert bytes(ch.data_in) == (
        bytes.fromhex("00000000000007ff 00000200 00") + bytes([exponent]) + b"\xc0\x00" + bytes(16)
    )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # LBPPB 1, UNMAP: granularities 1, UNMAP limits, OPTIMAL UNMAP GRANULARITY 1.
        (
            {"thin": True, "physical_block_size": 512},
            "00 b0 003c 00 ff 0001 00004000 00000800 00000000"
            "00100000 00000100 00000001 80000000 000000000000ffff"
            "00000800 00000001 00000001 00000800 00000800",
        ),
        # unmap=0 (LBPU 0): MAXIMUM UNMAP LBA COUNT and DESCRIPTOR COUNT 0 (SBC-4 6.6.4); the
        # granularity stays, it applies to WRITE SAME with UNMAP as well.
        (
            {"thin": True, "unmap": False},
            "00 b0 003c 00 ff 0008 00004000 00000800 00000000"
            "00000000 00000000 00000008 80000000 000000000000ffff"
            "00000800 00000008 00000008 00000800 00000800",
        ),
        # 64K physical blocks, fully provisioned: no UNMAP fields at all.
        (
            {"physical_block_size": 65536},
            "00 b0 003c 00 ff 0080 00004000 00000800 00000000"
            "00000000 00000000 00000000 00000000 000000000000ffff"
            "00000800 00000080 00000080 00000800 00000800",
        ),
    ],
)
def test_vpd_block_limits(pool: Pool, keys: dict[str, bool | int], expected: str) -> None:
    tgt, _ = make_target(pool, **keys)
    task, ch = run(tgt, pool, VPD_B0)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex(expected)


@pytest.mark.parametrize(
    ("block_size", "pbs"), [(512, 256), (512, 3072), (512, 128 * 1024), (4096, 2048), (512, 0)]
)
def test_lu_refuses_bad_physical_block_size(block_size: int, pbs: int) -> None:
    with pytest.raises(ValueError, match=f"physical block size {pbs} is not a power of two"):
        LogicalUnit(
            MemBackstore(NBLOCKS * BS),
            runner=run_inline,
            identity="x",
            block_size=block_size,
            physical_block_size=pbs,
        )


def test_default_physical_block_size_grows_with_the_logical_one() -> None:
    lu = LogicalUnit(MemBackstore(1 << 20), runner=run_inline, identity="x", block_size=8192)
    assert (lu.physical_block_size, lu.lbppb) == (8192, 1)


# ---- unmap ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "body"),
    [
        ({"thin": True}, "00 e4 02 00"),  # LBPU, LBPWS, LBPWS10, LBPRZ 001b, thin
        ({"thin": True, "unmap": False}, "00 64 02 00"),  # the same without LBPU
        ({"unmap": False}, "00 00 00 00"),  # fully provisioned either way
        ({}, "00 00 00 00"),
    ],
)
def test_vpd_provisioning(pool: Pool, keys: dict[str, bool], body: str) -> None:
    tgt, _ = make_target(pool, **keys)
    task, ch = run(tgt, pool, VPD_B2)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("00 b2 0004" + body)


def test_unmap_refused_without_lbpu(pool: Pool) -> None:
    tgt, store = make_target(pool, thin=True, unmap=False)
    params = bytes.fromhex("0016 0010 00000000 0000000000000000 00000008 00000000")
    task, _ = run(tgt, pool, bytes.fromhex("42 00 000000 00 0018 00"), data_out=params)
    assert task.status == Status.CHECK_CONDITION
    assert task.sense == INVALID_OPCODE
    assert store.discards == []


@pytest.mark.parametrize("opcode", [0x41, 0x93])
def test_write_same_unmap_still_deallocates(pool: Pool, opcode: int) -> None:
    tgt, store = make_target(pool, thin=True, unmap=False)
    store.data[:] = b"\xaa" * len(store.data)
    if opcode == 0x41:  # WRITE SAME(10), UNMAP bit, LBA 16, 8 blocks
        cdb = bytes.fromhex("41 08 00000010 00 0008 00")
    else:  # WRITE SAME(16), UNMAP and NDOB, LBA 16, 8 blocks
        cdb = bytes.fromhex("93 09 0000000000000010 00000008 00 00")
    out = b"" if opcode == 0x93 else b"\xaa" * BS
    task, _ = run(tgt, pool, cdb, data_out=out, edtl=len(out))
    good(task)
    assert store.discards == [(16 * BS, 8 * BS)]
    assert store.data[16 * BS : 24 * BS] == bytes(8 * BS)


def test_rsoc_omits_unmap_without_lbpu(pool: Pool) -> None:
    with_unmap, _ = make_target(pool, thin=True)
    without, _ = make_target(pool, thin=True, unmap=False)
    _, ch = run(with_unmap, pool, RSOC_UNMAP)
    assert bytes(ch.data_in) == bytes.fromhex("00 03 000a 42 00 00000000 3f ffff 00")
    _, ch = run(without, pool, RSOC_UNMAP)
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")  # SUPPORT 001b: not supported
    _, all_with = run(with_unmap, pool, RSOC_ALL)
    _, all_without = run(without, pool, RSOC_ALL)
    n = sum(1 for c in COMMANDS if c.supported_by(with_unmap.luns[0]))
    assert len(all_with.data_in) == 4 + 8 * n
    assert len(all_without.data_in) == 4 + 8 * (n - 1)
    opcodes = {all_without.data_in[i] for i in range(4, len(all_without.data_in), 8)}
    assert 0x42 not in opcodes
    assert {0x41, 0x93} <= opcodes  # WRITE SAME stays


# ---- the LUN keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pbs"),
    [
        ("ram:size=1M", None),
        ("ram:size=1M,physical_block_size=512", 512),
        ("ram:size=1M,physical_block_size=4K", 4096),
        ("ram:physical_block_size=64KiB,size=1M", 65536),
    ],
)
def test_physical_block_size_key(text: str, pbs: int | None) -> None:
    spec = parse_lun_spec(text)
    assert "physical_block_size" not in spec.params  # never reaches the backstore factory
    assert lun_physical_block_size(spec) == pbs


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("256", "is not a power of two from 512 to 64K"),
        ("3K", "is not a power of two from 512 to 64K"),
        ("128K", "is not a power of two from 512 to 64K"),
        ("big", "is not a size (e.g. 512, 4K)"),
        ("0", "is not a size (e.g. 512, 4K)"),
    ],
)
def test_physical_block_size_key_errors(value: str, reason: str) -> None:
    text = f"ram:size=1M,physical_block_size={value}"
    with pytest.raises(ValueError, match="physical_block_size=") as info:
        lun_physical_block_size(parse_lun_spec(text))
    assert str(info.value) == f"invalid LUN spec {text!r}: physical_block_size={value!r} {reason}"


@pytest.mark.parametrize(
    ("text", "unmap"),
    [
        ("ram:size=1M,thin=1", True),
        ("ram:size=1M,thin=1,unmap=1", True),
        ("ram:size=1M,thin=1,unmap=no", False),
        ("ram:size=1M,unmap=0", False),  # a fully provisioned LUN has no UNMAP anyway
        ("ram:size=1M", True),  # the default; without thin it changes nothing
    ],
)
def test_unmap_key(text: str, unmap: bool) -> None:
    assert lun_flags(parse_lun_spec(text))["unmap"] is unmap


def test_unmap_key_needs_thin() -> None:
    text = "ram:size=1M,unmap=1"
    with pytest.raises(ValueError, match="needs thin=1") as info:
        lun_flags(parse_lun_spec(text))
    assert str(info.value) == (
        f"invalid LUN spec {text!r}: unmap=1 needs thin=1 (only a thin LUN has UNMAP)"
    )


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ("physical_block_size=1000", "physical_block_size='1000' is not a power of two"),
        ("physical_block_size=256", "physical_block_size='256' is not a power of two"),
        ("unmap=1", "unmap=1 needs thin=1"),
        ("thin=1,unmap=maybe", "unmap='maybe' is not one of"),
    ],
)
def test_cli_rejects_bad_keys_in_one_line(
    keys: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "never.img"
    assert cli_main(["serve", "--lun", f"file:{path},size=1M,{keys}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sgtarget: error: invalid LUN spec")
    assert fragment in err
    assert not path.exists()  # the LUN keys are checked before the file is created


def test_cli_help_names_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "unmap=0" in out
    assert "physical_block_size=SIZE" in out


def test_target_server_passes_the_keys() -> None:
    config = TargetConfig(
        backstores=[RamBackstore(1 << 20), RamBackstore(1 << 20)],
        lun_options=[LunOptions(thin=True, unmap=False, physical_block_size=512)],
        pool_size=1 << 20,
    )
    server = TargetServer(config)
    try:
        lu0, lu1 = server.scsi.luns[0], server.scsi.luns[1]
        assert (lu0.thin, lu0.lbpu, lu0.lbppb) == (True, False, 1)
        assert (lu1.thin, lu1.lbpu, lu1.lbppb) == (False, False, 8)  # defaults
    finally:
        server.executor.shutdown()
        server.pool.close()
        for b in config.backstores:
            b.close()
