"""How a PI LUN reports itself: INQUIRY PROTECT, VPD 86h and 00h, READ CAPACITY(16), control
mode page ATO. Golden bytes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sgtarget.backstores.ram import RamBackstore
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Task, run_inline

from .scsi_fakes import run

NAME = "iqn.2024-01.test:pi"
SIZE = 1 << 20


def make(pi: int = 0, bs: int = 512) -> ScsiTarget:
    lu = LogicalUnit(RamBackstore(SIZE, block_size=bs, pi=pi), runner=run_inline, identity="x/0")
    return ScsiTarget(NAME, [lu])


@pytest.fixture
def targets() -> Iterator[list[ScsiTarget]]:
    made: list[ScsiTarget] = []
    yield made
    for t in made:
        for lu in t.luns.values():
            lu.backstore.close()


def ready(targets: list[ScsiTarget], pool: Pool, pi: int = 0, bs: int = 512) -> ScsiTarget:
    t = make(pi, bs)
    targets.append(t)
    run(t, pool, bytes(6))  # the power-on unit attention
    return t


def reply(t: ScsiTarget, pool: Pool, cdb: str) -> bytes:
    task, ch = run(t, pool, bytes.fromhex(cdb))
    assert task.status == Status.GOOD, task.sense.hex()
    return bytes(ch.data_in)


def sense(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION
    return task.sense[2] & 0x0F, task.sense[12], task.sense[13]


RC16 = "9e10 0000000000000000 00000020 0000"


@pytest.mark.parametrize(
    ("pi", "bs", "golden"),
    [
        (0, 512, "00000000000007ff 00000200 00 03 0000"),
        (1, 512, "00000000000007ff 00000200 01 03 0000"),
        (2, 512, "00000000000007ff 00000200 03 03 0000"),
        (3, 512, "00000000000007ff 00000200 05 03 0000"),
        (1, 4096, "00000000000000ff 00001000 01 00 0000"),
    ],
)
def test_read_capacity_16_prot_en_and_p_type(
    targets: list[ScsiTarget], pool: Pool, pi: int, bs: int, golden: str
) -> None:
    data = reply(ready(targets, pool, pi, bs), pool, RC16)
    assert data == bytes.fromhex(golden) + bytes(16)


@pytest.mark.parametrize(("pi", "byte5"), [(0, 0x08), (1, 0x09), (3, 0x09)])
def test_inquiry_protect_bit(targets: list[ScsiTarget], pool: Pool, pi: int, byte5: int) -> None:
    data = reply(ready(targets, pool, pi), pool, "12 00 00 00 ff 00")
    assert data[5] == byte5  # 3PC, PROTECT


def test_extended_inquiry_vpd_golden(targets: list[ScsiTarget], pool: Pool) -> None:
    t = ready(targets, pool, 2)
    data = reply(t, pool, "12 01 86 00 ff 00")
    assert data == bytes.fromhex("00 86 003c 3f 01 01 01") + bytes(56)
    pages = reply(t, pool, "12 01 00 00 ff 00")
    assert pages == bytes.fromhex("00 00 0007 00 80 83 86 b0 b1 b2")


def test_no_extended_inquiry_without_pi(targets: list[ScsiTarget], pool: Pool) -> None:
    t = ready(targets, pool, 0)
    assert reply(t, pool, "12 01 00 00 ff 00") == bytes.fromhex("00 00 0006 00 80 83 b0 b1 b2")
    task, _ = run(t, pool, bytes.fromhex("12 01 86 00 ff 00"))
    assert sense(task) == (0x5, 0x24, 0x00)


@pytest.mark.parametrize(("pi", "ato"), [(0, 0x00), (1, 0x80)])
def test_control_mode_page_ato(targets: list[ScsiTarget], pool: Pool, pi: int, ato: int) -> None:
    t = ready(targets, pool, pi)
    # MODE SENSE(6), DBD, control page, current values: header (4) + page (12).
    data = reply(t, pool, "1a 08 0a 00 ff 00")
    page = data[4:]
    assert page == bytes.fromhex("0a 0a 00 10 00") + bytes([ato]) + bytes.fromhex("0000 ffff 0000")
    changeable = reply(t, pool, "1a 08 4a 00 ff 00")[4:]
    assert changeable[5] == 0  # ATO is not changeable


def test_mode_select_may_repeat_ato(targets: list[ScsiTarget], pool: Pool) -> None:
    t = ready(targets, pool, 1)
    current = reply(t, pool, "1a 08 0a 00 ff 00")[4:]
    params = bytes(4) + current
    task, _ = run(t, pool, bytes([0x15, 0x10, 0, 0, len(params), 0]), data_out=params)
    assert task.status == Status.GOOD, task.sense.hex()
    flipped = bytearray(params)
    flipped[4 + 5] ^= 0x80
    task, _ = run(t, pool, bytes([0x15, 0x10, 0, 0, len(params), 0]), data_out=bytes(flipped))
    assert sense(task) == (0x5, 0x26, 0x00)


@pytest.mark.parametrize(("pi", "byte1"), [(0, 0x18), (1, 0xF8)])
def test_rsoc_usage_shows_protect_fields_on_pi_lus(
    targets: list[ScsiTarget], pool: Pool, pi: int, byte1: int
) -> None:
    t = ready(targets, pool, pi)
    data = reply(t, pool, "a3 0c 01 28 0000 00000100 00 00")  # READ(10), one command
    assert data[:4] == bytes.fromhex("0003 000a")
    assert data[4:6] == bytes([0x28, byte1])


def test_32_byte_cdbs_only_on_type_2(targets: list[ScsiTarget], pool: Pool) -> None:
    for pi, support in ((1, 0x01), (2, 0x03)):
        t = ready(targets, pool, pi)
        data = reply(t, pool, "a3 0c 02 7f 0009 00000100 00 00")  # READ(32)
        assert data[1] & 0x07 == support
        if support == 0x03:
            assert data[2:4] == b"\x00\x20"
            usage = data[4:36]
            assert usage[:11] == bytes.fromhex("7f 00 00000000 1f 18 0009 f8")
