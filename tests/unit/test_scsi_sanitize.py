"""SANITIZE: CDB and parameter list decoding, the fence and its sense, the background job."""

from __future__ import annotations

import asyncio

import pytest

from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Asc, SenseKey, Status
from sgtarget.scsi.lu import COMMANDS, LogicalUnit
from sgtarget.scsi.sanitize import (
    OverwriteParams,
    SanitizeAction,
    SanitizeCdb,
    block_image,
    decode_sanitize,
    parse_overwrite,
    pass_inverted,
    progress_indication,
)
from sgtarget.scsi.sense import CheckCondition, SenseData
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Nexus, Task, run_inline

from .scsi_fakes import NEXUS, OTHER_NEXUS, FakeChannel, MemBackstore, make_task, run

BS = 512
NBLOCKS = 8192  # 4 MiB: four IO_WINDOW writes per pass
TARGET_NAME = "iqn.2024-01.test:tgt"


class ThinMem(MemBackstore):
    """Discard zeroes and records what it was asked to deallocate."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.discards: list[tuple[int, int]] = []

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))
        self.data[offset : offset + length] = bytes(length)


@pytest.fixture
def thick() -> MemBackstore:
    return MemBackstore(NBLOCKS * BS)


@pytest.fixture
def thin() -> ThinMem:
    return ThinMem(NBLOCKS * BS)


@pytest.fixture
def target(thick: MemBackstore, thin: ThinMem, pool: Pool) -> ScsiTarget:
    """LUN 0 fully provisioned, LUN 1 thin; unthrottled; power-on UAs consumed."""
    lu0 = LogicalUnit(thick, runner=run_inline, identity=f"{TARGET_NAME}/lun0")
    lu1 = LogicalUnit(thin, runner=run_inline, identity=f"{TARGET_NAME}/lun1", thin=True)
    for lu in (lu0, lu1):
        lu.sanitizer.rate = None
    tgt = ScsiTarget(TARGET_NAME, [lu0, lu1])
    for lun in (0, 1):
        for nexus in (NEXUS, OTHER_NEXUS):
            run(tgt, pool, bytes(6), lun=lun, nexus=nexus)
    return tgt


def sanitize_cdb(sa: int, plen: int = 0, *, immed: bool = False, ause: bool = False) -> bytes:
    byte1 = sa | (0x80 if immed else 0) | (0x20 if ause else 0)
    return bytes([0x48, byte1, 0, 0, 0, 0, 0]) + plen.to_bytes(2, "big") + b"\0"


def overwrite_list(pattern: bytes, count: int = 1, *, invert: bool = False) -> bytes:
    return bytes([(0x80 if invert else 0) | count, 0]) + len(pattern).to_bytes(2, "big") + pattern


def sense_of(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION, task.status
    s = task.sense
    return s[2] & 0x0F, s[12], s[13]


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


TUR = bytes(6)
READ10_0 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])


async def execute(
    target: ScsiTarget,
    pool: Pool,
    cdb: bytes,
    *,
    lun: int = 0,
    data_out: bytes = b"",
    edtl: int | None = None,
    nexus: Nexus = NEXUS,
) -> tuple[Task, FakeChannel]:
    """One command inside a test's own event loop (background jobs keep running)."""
    if edtl is None:
        edtl = len(data_out) if data_out else 255
    task = make_task(cdb, lun=lun, expected_length=edtl, nexus=nexus)
    channel = FakeChannel(pool, task, data_out)
    await target.execute(task, channel)
    return task, channel


# ---- golden vectors ----------------------------------------------------------------------------


def test_decode_sanitize_golden() -> None:
    # IMMED | AUSE | OVERWRITE, parameter list length 0x0204 (512-byte pattern + header).
    got = decode_sanitize(bytes.fromhex("48a10000000000020400"), 512)
    assert got == SanitizeCdb(True, True, SanitizeAction.OVERWRITE, 0x204)
    got = decode_sanitize(bytes.fromhex("481f0000000000000000"), 512)
    assert got == SanitizeCdb(False, False, SanitizeAction.EXIT_FAILURE_MODE, 0)


@pytest.mark.parametrize(
    ("cdb_hex", "sks_hex"),
    [
        ("48420000000000000000", "ce0001"),  # ZNR (reserved on a non-zoned LU): byte 1 bit 6
        ("48020100000000000000", "c00002"),  # reserved byte 2
        ("48020000000006000000", "c00006"),  # reserved byte 6
        ("48020000000000000800", "c00007"),  # BLOCK ERASE takes no parameter list
        ("48030000000000000100", "c00007"),  # nor does CRYPTOGRAPHIC ERASE
        ("481f0000000000000800", "c00007"),  # nor EXIT FAILURE MODE
        ("48010000000000000400", "c00007"),  # OVERWRITE: header only, no pattern
        ("48010000000000020500", "c00007"),  # OVERWRITE: longer than block length + 4
    ],
)
def test_decode_sanitize_errors(cdb_hex: str, sks_hex: str) -> None:
    with pytest.raises(CheckCondition) as exc:
        decode_sanitize(bytes.fromhex(cdb_hex), 512)
    assert exc.value.sense.fixed() == bytes.fromhex("700005000000000a00000000240000" + sks_hex)


def test_parse_overwrite_golden() -> None:
    assert parse_overwrite(bytes.fromhex("8300000255aa"), 512) == OverwriteParams(
        True, 3, b"\x55\xaa"
    )
    # Bytes past the pattern length are ignored.
    assert parse_overwrite(bytes.fromhex("01000001ff00"), 512) == OverwriteParams(False, 1, b"\xff")


@pytest.mark.parametrize(
    ("data_hex", "sks_hex"),
    [
        ("00000001aa", "8c0000"),  # OVERWRITE COUNT 0: byte 0 bit 4
        ("21000001aa", "8e0000"),  # TEST 01b: byte 0 bit 6
        ("01000000aa", "800002"),  # pattern length 0
        ("01000002aa", "800002"),  # pattern longer than the list carries
    ],
)
def test_parse_overwrite_errors(data_hex: str, sks_hex: str) -> None:
    with pytest.raises(CheckCondition) as exc:
        parse_overwrite(bytes.fromhex(data_hex), 512)
    sense = exc.value.sense
    assert (sense.key, sense.asc) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert sense.sks == bytes.fromhex(sks_hex)


def test_block_image_and_passes() -> None:
    assert block_image(b"abc", 8) == b"abcabcab"
    assert block_image(b"x" * 8, 8) == b"x" * 8
    even = OverwriteParams(True, 4, b"\x0f")
    assert [pass_inverted(even, i) for i in range(4)] == [True, False, True, False]
    odd = OverwriteParams(True, 3, b"\x0f")
    assert [pass_inverted(odd, i) for i in range(3)] == [False, True, False]
    plain = OverwriteParams(False, 2, b"\x0f")
    assert not any(pass_inverted(plain, i) for i in range(2))


def test_progress_sense_golden() -> None:
    assert progress_indication(0, 100) == bytes.fromhex("800000")
    assert progress_indication(1, 4) == bytes.fromhex("804000")
    assert progress_indication(4, 4) == bytes.fromhex("80ffff")
    sense = SenseData(SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)
    with_progress = SenseData(sense.key, sense.asc, sks=progress_indication(3, 4))
    assert with_progress.fixed() == bytes.fromhex("700002000000000a00000000041b00" + "80c000")


# ---- what the LU reports -------------------------------------------------------------------------


def test_rsoc_has_one_descriptor_per_service_action(target: ScsiTarget, pool: Pool) -> None:
    specs = [s for s in COMMANDS if s.opcode == 0x48]
    assert sorted(s.service_action or 0 for s in specs) == [1, 2, 3, 0x1F]
    # One command, option 2 (opcode + service action): the CDB usage data.
    rsoc = bytes([0xA3, 0x0C, 0x02, 0x48, 0, 0x02, 0, 0, 1, 0, 0, 0])
    task, ch = run(target, pool, rsoc, edtl=256)
    good(task)
    assert bytes(ch.data_in) == bytes.fromhex("0003000a" + "48a20000000000ffff00")


def test_vpd_b1_erase_read_behaviour(target: ScsiTarget, pool: Pool) -> None:
    task, ch = run(target, pool, bytes([0x12, 0x01, 0xB1, 0x00, 0xFF, 0]))
    good(task)
    assert ch.data_in[7] == 0x50  # WABEREQ 01b, WACEREQ 01b


# ---- running sanitizes ---------------------------------------------------------------------------


def test_overwrite_writes_pattern_everywhere(
    target: ScsiTarget, pool: Pool, thick: MemBackstore
) -> None:
    thick.data[:] = b"a" * len(thick.data)
    params = overwrite_list(b"\x12\x34\x56", count=2, invert=True)
    task, _ = run(target, pool, sanitize_cdb(1, len(params)), data_out=params)
    good(task)
    # The last pass writes the pattern itself, restarted at every block.
    assert thick.data == block_image(b"\x12\x34\x56", BS) * NBLOCKS
    assert thick.flushes == 1


def test_block_erase_thin_deallocates(target: ScsiTarget, pool: Pool, thin: ThinMem) -> None:
    thin.data[:] = b"a" * len(thin.data)
    good(run(target, pool, sanitize_cdb(2), lun=1)[0])
    assert thin.discards == [(0, NBLOCKS * BS)]
    assert not any(thin.data)


@pytest.mark.parametrize("sa", [2, 3])
def test_erase_thick_writes_zeros(
    target: ScsiTarget, pool: Pool, thick: MemBackstore, sa: int
) -> None:
    thick.data[:] = b"a" * len(thick.data)
    good(run(target, pool, sanitize_cdb(sa))[0])
    assert not any(thick.data)


def test_invalid_service_actions(target: ScsiTarget, pool: Pool) -> None:
    for sa in (0, 4, 0x10, 0x1E):
        task, _ = run(target, pool, sanitize_cdb(sa))
        assert sense_of(task) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)


def test_bad_parameter_list_changes_nothing(
    target: ScsiTarget, pool: Pool, thick: MemBackstore
) -> None:
    thick.data[:] = b"a" * len(thick.data)
    params = overwrite_list(b"\xaa", count=0)
    task, _ = run(target, pool, sanitize_cdb(1, len(params)), data_out=params)
    assert sense_of(task) == (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
    assert thick.data == b"a" * len(thick.data)
    good(run(target, pool, TUR)[0])


def test_reservation_conflict(target: ScsiTarget, pool: Pool) -> None:
    good(run(target, pool, bytes([0x16, 0, 0, 0, 0, 0]), nexus=OTHER_NEXUS)[0])
    task, _ = run(target, pool, sanitize_cdb(2))
    assert task.status == Status.RESERVATION_CONFLICT


def test_in_progress_fences_and_reports_progress(
    target: ScsiTarget, pool: Pool, thick: MemBackstore
) -> None:
    lu = target.luns[0]
    lu.sanitizer.rate = NBLOCKS * BS  # one second for the whole LUN, a window every 0.25 s

    async def scenario() -> None:
        params = overwrite_list(b"\x5a")
        task, _ = await execute(
            target, pool, sanitize_cdb(1, len(params), immed=True), data_out=params
        )
        good(task)  # IMMED: status once the parameter list is validated
        await asyncio.sleep(0.05)
        for cdb in (TUR, READ10_0, sanitize_cdb(2), bytes([0x1B, 0, 0, 0, 1, 0])):
            task, _ = await execute(target, pool, cdb)
            assert sense_of(task) == (SenseKey.NOT_READY, 0x04, 0x1B)
            assert task.sense[15] == 0x80  # SKSV: progress indication
        # Other nexuses are fenced too; the sanitize belongs to the LU.
        task, _ = await execute(target, pool, TUR, nexus=OTHER_NEXUS)
        assert sense_of(task) == (SenseKey.NOT_READY, 0x04, 0x1B)
        first = int.from_bytes(task.sense[16:18], "big")
        # REQUEST SENSE polls: GOOD, with the progress in its data.
        task, ch = await execute(target, pool, bytes([0x03, 0, 0, 0, 18, 0]))
        good(task)
        assert ch.data_in[2] & 0x0F == SenseKey.NOT_READY
        assert (ch.data_in[12], ch.data_in[13], ch.data_in[15]) == (0x04, 0x1B, 0x80)
        good((await execute(target, pool, bytes([0x12, 0, 0, 0, 36, 0])))[0])
        good((await execute(target, pool, bytes([0xA0] + [0] * 5 + [0, 0, 1, 0, 0, 0])))[0])
        # Other LUNs are not affected.
        good((await execute(target, pool, TUR, lun=1))[0])
        await asyncio.sleep(0.3)
        task, _ = await execute(target, pool, TUR)
        assert int.from_bytes(task.sense[16:18], "big") > first
        while lu.sanitizer.running:
            await asyncio.sleep(0.02)
        good((await execute(target, pool, TUR))[0])
        task, ch = await execute(target, pool, bytes([0x03, 0, 0, 0, 18, 0]))
        assert (ch.data_in[2], ch.data_in[12]) == (0, 0)

    asyncio.run(scenario())
    assert thick.data == b"\x5a" * len(thick.data)
    assert pool.stats.blocks_in_use == 0


def test_aborted_command_leaves_sanitize_running(
    target: ScsiTarget, pool: Pool, thick: MemBackstore
) -> None:
    lu = target.luns[0]
    lu.sanitizer.rate = NBLOCKS * BS * 5

    async def scenario() -> None:
        task = make_task(sanitize_cdb(3), expected_length=0)
        run_it = asyncio.create_task(target.execute(task, FakeChannel(pool, task)))
        await asyncio.sleep(0.05)
        assert lu.sanitizer.running
        task.aborted = True
        await asyncio.wait_for(run_it, 1)  # returns promptly, no status for it
        assert lu.sanitizer.running
        # LUN and target resets do not stop it either.
        target.lun_reset(0)
        target.target_reset(cold=True)
        assert lu.sanitizer.running
        while lu.sanitizer.running:
            await asyncio.sleep(0.02)

    thick.data[:] = b"a" * len(thick.data)
    asyncio.run(scenario())
    assert not any(thick.data)
    assert pool.stats.blocks_in_use == 0


def test_failure_mode_and_exit(target: ScsiTarget, pool: Pool, thick: MemBackstore) -> None:
    thick.fail_write = True
    task, _ = run(target, pool, sanitize_cdb(2))  # AUSE 0: restricted completion mode
    assert sense_of(task) == (SenseKey.MEDIUM_ERROR, 0x31, 0x03)
    task, _ = run(target, pool, READ10_0)
    assert sense_of(task) == (SenseKey.MEDIUM_ERROR, 0x31, 0x03)
    # REQUEST SENSE reports the failure; INQUIRY still works.
    task, ch = run(target, pool, bytes([0x03, 0, 0, 0, 18, 0]))
    good(task)
    assert (ch.data_in[2], ch.data_in[12], ch.data_in[13]) == (SenseKey.MEDIUM_ERROR, 0x31, 0x03)
    good(run(target, pool, bytes([0x12, 0, 0, 0, 36, 0]))[0])
    # Restricted: EXIT FAILURE MODE and an unrestricted sanitize are refused.
    task, _ = run(target, pool, sanitize_cdb(0x1F))
    assert sense_of(task) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    task, _ = run(target, pool, sanitize_cdb(2, ause=True))
    assert sense_of(task) == (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    # A failed unrestricted one may be left with EXIT FAILURE MODE.
    task, _ = run(target, pool, sanitize_cdb(3))
    assert sense_of(task) == (SenseKey.MEDIUM_ERROR, 0x31, 0x03)
    thick.fail_write = False
    good(run(target, pool, sanitize_cdb(3, ause=False))[0])  # a successful one ends it
    good(run(target, pool, READ10_0)[0])
    thick.fail_write = True
    run(target, pool, sanitize_cdb(2, ause=True))
    assert target.luns[0].sanitizer.failed
    good(run(target, pool, sanitize_cdb(0x1F))[0])
    good(run(target, pool, READ10_0)[0])
    # With nothing failed, EXIT FAILURE MODE has nothing to do.
    good(run(target, pool, sanitize_cdb(0x1F))[0])
