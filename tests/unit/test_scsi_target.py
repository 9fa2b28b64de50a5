"""ScsiTarget: LUN routing, absent LUNs, and the table the transport relies on."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline

from .scsi_fakes import MemBackstore, run

BS = 512


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(size=2 * 1024 * 1024, block_size=64 * 1024)
    yield p
    gc.collect()
    p.close()


def make_target(n: int = 2) -> ScsiTarget:
    luns = [
        LogicalUnit(MemBackstore((i + 1) * 64 * BS), runner=run_inline, identity=f"iqn.t:x/lun{i}")
        for i in range(n)
    ]
    return ScsiTarget("iqn.t:x", luns, relative_port_id=3)


def key_asc(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION
    return task.sense[2] & 0x0F, task.sense[12], task.sense[13]


def test_luns_numbered_in_order() -> None:
    tgt = make_target(3)
    assert sorted(tgt.luns) == [0, 1, 2]
    assert [lu.identity for lu in tgt.luns.values()] == [f"iqn.t:x/lun{i}" for i in range(3)]


def test_routing_by_lun_field(pool: Pool) -> None:
    tgt = make_target()
    for lun in (0, 1):
        run(tgt, pool, bytes(6), lun=lun)
    _, ch = run(tgt, pool, bytes.fromhex("25 00 00000000 0000 00 00"), lun=1)
    assert bytes(ch.data_in) == bytes.fromhex("0000007f 00000200")  # 128 blocks
    # Flat-space addressing of LUN 1 reaches the same LU.
    flat = bytes.fromhex("4001000000000000")
    _, ch = run(tgt, pool, bytes.fromhex("25 00 00000000 0000 00 00"), lun_field=flat)
    assert bytes(ch.data_in) == bytes.fromhex("0000007f 00000200")


def test_inquiry_to_absent_lun(pool: Pool) -> None:
    task, ch = run(make_target(), pool, bytes.fromhex("12 00 00 00 ff 00"), lun=5)
    assert task.status == Status.GOOD
    assert ch.data_in[0] == 0x7F
    assert bytes(ch.data_in) == bytes.fromhex("7f 00 00 02 1f") + bytes(31)
    assert task.transfer_length == 36


def test_other_commands_to_absent_lun(pool: Pool) -> None:
    tgt = make_target()
    for command in ("00 00 00 00 00 00", "28 00 00000000 00 0001 00", "12 01 00 00 ff 00", "42"):
        task, ch = run(tgt, pool, bytes.fromhex(command), lun=9)
        assert key_asc(task) == (0x5, 0x25, 0x00)
        assert ch.sends == []
    # Unservable address forms are absent LUNs too.
    task, _ = run(tgt, pool, bytes(6), lun_field=bytes.fromhex("0105000000000000"))
    assert key_asc(task) == (0x5, 0x25, 0x00)
    task, _ = run(tgt, pool, b"", lun=9)
    assert key_asc(task) == (0x5, 0x25, 0x00)


def test_request_sense_to_absent_lun(pool: Pool) -> None:
    task, ch = run(make_target(), pool, bytes.fromhex("03 00 00 00 ff 00"), lun=4)
    assert task.status == Status.GOOD
    assert bytes(ch.data_in) == bytes.fromhex("70 00 05 00000000 0a 00000000 25 00 00 000000")


def test_report_luns_on_any_lun(pool: Pool) -> None:
    tgt = make_target(3)
    expected = bytes.fromhex("00000018 00000000") + b"".join(
        bytes([0, i]) + bytes(6) for i in range(3)
    )
    report = bytes.fromhex("a0 00 00 00 00 00 00 00 01 00 00 00")
    for field in (bytes(8), bytes.fromhex("0007000000000000"), bytes.fromhex("c101000000000000")):
        task, ch = run(tgt, pool, report, lun_field=field)
        assert task.status == Status.GOOD
        assert bytes(ch.data_in) == expected
    task, _ = run(tgt, pool, bytes.fromhex("a0 00 00 00 00 00 00 00 00 08 00 00"), lun=7)
    assert key_asc(task) == (0x5, 0x24, 0x00)


def test_device_identification_names_target_and_port(pool: Pool) -> None:
    tgt = make_target()
    _, ch = run(tgt, pool, bytes.fromhex("12 01 83 01 00 00"), lun=1)
    data = bytes(ch.data_in)
    assert bytes.fromhex("01 14 00 04 0000 0003") in data
    assert bytes.fromhex("03 28 00 08") + b"iqn.t:x\0" in data  # 8 bytes: already a multiple of 4


def test_reset_of_absent_lun(pool: Pool) -> None:
    assert make_target().lun_reset(2) is False
