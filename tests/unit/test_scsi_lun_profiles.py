"""The readonly=1 and removable=1 LUN profiles: spec parsing, the LU's answers, PREVENT state."""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import inspect
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sgtarget.backstores.base import BackstoreError
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.cli.main import main as cli_main
from sgtarget.cli.specs import (
    LUN_FLAGS,
    LUN_KEYS,
    LUN_SIZES,
    build_backstore,
    lun_flags,
    parse_lun_spec,
)
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import COMMANDS, CommandSpec, LogicalUnit
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Nexus, Task, run_inline
from sgtarget.server.target import LunOptions, TargetConfig, TargetServer

from .scsi_fakes import NEXUS, OTHER_NEXUS, MemBackstore, run

BS = 512
NBLOCKS = 2048
TARGET_NAME = "iqn.2024-01.test:profiles"
#: LUN 0 plain, 1 readonly (and thin, so UNMAP exists), 2 removable.
PLAIN, READONLY, REMOVABLE = 0, 1, 2

#: Fixed-format sense data, byte for byte (SPC-5 4.4.3): key, ASC, ASCQ, nothing else set.
WRITE_PROTECTED = bytes.fromhex("70 00 07 00000000 0a 00000000 27 00 00 000000")
MEDIUM_NOT_PRESENT = bytes.fromhex("70 00 02 00000000 0a 00000000 3a 00 00 000000")
REMOVAL_PREVENTED = bytes.fromhex("70 00 05 00000000 0a 00000000 53 02 00 000000")
INVALID_OPCODE = bytes.fromhex("70 00 05 00000000 0a 00000000 20 00 00 000000")

TUR = bytes(6)
EJECT = bytes.fromhex("1b 00 00 00 02 00")
LOAD = bytes.fromhex("1b 00 00 00 03 00")
PREVENT = bytes.fromhex("1e 00 00 00 01 00")
ALLOW = bytes.fromhex("1e 00 00 00 00 00")
READ_CAPACITY_10 = bytes.fromhex("25 00 00000000 0000 00 00")
READ_10 = bytes.fromhex("28 00 00000000 00 0001 00")
WRITE_10 = bytes.fromhex("2a 00 00000000 00 0001 00")


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(size=4 * 1024 * 1024, block_size=64 * 1024)
    yield p
    gc.collect()
    p.close()


@pytest.fixture
def stores() -> list[MemBackstore]:
    return [MemBackstore(NBLOCKS * BS) for _ in range(3)]


@pytest.fixture
def target(stores: list[MemBackstore], pool: Pool) -> ScsiTarget:
    """Three LUs; both nexuses have consumed their power-on unit attentions."""

    def lu(i: int, *, readonly: bool = False, removable: bool = False) -> LogicalUnit:
        # The readonly LU is thin too, so UNMAP exists there.
        return LogicalUnit(
            stores[i],
            runner=run_inline,
            identity=f"{TARGET_NAME}/lun{i}",
            thin=readonly,
            readonly=readonly,
            removable=removable,
        )

    luns = [lu(PLAIN), lu(READONLY, readonly=True), lu(REMOVABLE, removable=True)]
    tgt = ScsiTarget(TARGET_NAME, luns)
    for nexus in (NEXUS, OTHER_NEXUS):
        for lun in (PLAIN, READONLY, REMOVABLE):
            clear_ua(tgt, pool, lun, nexus)
    return tgt


def clear_ua(tgt: ScsiTarget, pool: Pool, lun: int, nexus: Nexus = NEXUS) -> None:
    task, _ = run(tgt, pool, TUR, lun=lun, nexus=nexus)
    assert task.status == Status.CHECK_CONDITION
    assert task.sense[2] == 0x06  # UNIT ATTENTION


def good(task: Task) -> None:
    assert task.status == Status.GOOD, task.sense.hex()


def sense(task: Task) -> bytes:
    assert task.status == Status.CHECK_CONDITION
    return task.sense


def cdb_for(spec: CommandSpec) -> bytes:
    """The shortest valid-looking CDB of ``spec``: opcode, service action, zeros."""
    cdb = bytearray(spec.cdb_len)
    cdb[0] = spec.opcode
    if spec.opcode == 0x7F:  # 32-byte CDBs: additional length, 16-bit service action at 8
        assert spec.service_action is not None
        cdb[7] = 0x18
        cdb[8:10] = spec.service_action.to_bytes(2, "big")
    elif spec.service_action is not None:
        cdb[1] = spec.service_action
    return bytes(cdb)


WRITING = [s for s in COMMANDS if s.writes]
MEDIUM = [s for s in COMMANDS if s.medium or s.writes]


# ---- spec parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ram:size=1M", {"readonly": False, "removable": False}),
        ("ram:size=1M,readonly=1", {"readonly": True, "removable": False}),
        ("ram:removable=yes,size=1M", {"readonly": False, "removable": True}),
        ("file:/x.img,readonly=TRUE,removable=1,thin=1", {"readonly": True, "removable": True}),
        ("null:size=1M,readonly=0,removable=no", {"readonly": False, "removable": False}),
    ],
)
def test_lun_flags(text: str, expected: dict[str, bool]) -> None:
    spec = parse_lun_spec(text)
    assert not LUN_KEYS & set(spec.params)  # never handed to the factory as parameters
    thin = "thin=1" in text
    assert lun_flags(spec) == {"thin": thin, **expected, "unmap": True}


@pytest.mark.parametrize("key", ["readonly", "removable"])
@pytest.mark.parametrize("value", ["2", "on", "maybe"])
def test_lun_flag_bad_value_is_one_clear_error(key: str, value: str) -> None:
    text = f"ram:size=1M,{key}={value}"
    with pytest.raises(ValueError, match=f"{key}='{value}' is not one of 1, yes, true") as info:
        lun_flags(parse_lun_spec(text))
    assert str(info.value).startswith(f"invalid LUN spec {text!r}: ")
    assert "\n" not in str(info.value)


def test_empty_and_duplicate_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="empty value for key 'readonly'"):
        parse_lun_spec("ram:size=1M,readonly=")
    with pytest.raises(ValueError, match="duplicate key 'removable'"):
        parse_lun_spec("ram:size=1M,removable=1,removable=0")


def test_flags_are_lun_options_and_lu_keywords() -> None:
    fields = {f.name for f in dataclasses.fields(LunOptions)}
    assert fields == set(LUN_FLAGS) | set(LUN_SIZES) == LUN_KEYS
    params = inspect.signature(LogicalUnit).parameters
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in fields)


@pytest.mark.parametrize("key", ["readonly", "removable"])
def test_cli_rejects_bad_flag_in_one_line(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "never.img"
    assert cli_main(["serve", "--lun", f"file:{path},size=1M,{key}=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sgtarget: error: invalid LUN spec")
    assert f"{key}='2' is not one of" in err
    assert not path.exists()


def test_cli_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "readonly=1" in out
    assert "removable=1" in out


def test_target_server_passes_the_flags() -> None:
    config = TargetConfig(
        backstores=[RamBackstore(1 << 20), RamBackstore(1 << 20)],
        lun_options=[LunOptions(readonly=True, removable=True)],
        pool_size=1 << 20,
    )
    server = TargetServer(config)
    try:
        lu0, lu1 = server.scsi.luns[0], server.scsi.luns[1]
        assert (lu0.readonly, lu0.removable, lu0.thin) == (True, True, False)
        assert (lu1.readonly, lu1.removable) == (False, False)  # missing options: defaults
    finally:
        server.executor.shutdown()
        server.pool.close()
        for b in config.backstores:
            b.close()


# ---- the file backstore, read-only --------------------------------------------------------------


def test_readonly_file_opens_o_rdonly(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x5a" * 4096)
    path.chmod(0o444)
    bs = build_backstore(parse_lun_spec(f"file:{path},readonly=1"))
    try:
        assert isinstance(bs, FileBackstore)
        fd = bs._fd  # the open mode is the point of the test
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert bs.size == 4096
        assert "read-only" in bs.describe()
        buf = bytearray(512)
        assert bs.readv(0, [memoryview(buf)]) == 512
        assert buf == b"\x5a" * 512
        with pytest.raises(BackstoreError):
            bs.writev(0, [memoryview(bytes(512))])
    finally:
        bs.close()  # nothing to flush, nothing raised
    assert path.read_bytes() == b"\x5a" * 4096


def test_readonly_file_is_never_created_or_grown(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(ValueError, match=r"does not exist \(readonly=1 never creates it\)"):
        build_backstore(parse_lun_spec(f"file:{missing},size=1M,readonly=1"))
    assert not missing.exists()
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="readonly=1 cannot grow it"):
        build_backstore(parse_lun_spec(f"file:{small},size=1M,readonly=1"))
    assert small.stat().st_size == 4096
    same = build_backstore(parse_lun_spec(f"file:{small},size=4K,readonly=1"))
    assert same.size == 4096
    same.close()


# ---- readonly=1: DATA PROTECT and WP -----------------------------------------------------------


@pytest.mark.parametrize("spec", WRITING, ids=lambda s: s.name)
def test_readonly_refuses_every_writing_command(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore], spec: CommandSpec
) -> None:
    lu = target.luns[READONLY]
    task, ch = run(target, pool, cdb_for(spec), lun=READONLY, data_out=bytes(2 * BS))
    if not spec.supported_by(lu):
        assert sense(task) == INVALID_OPCODE
        return
    assert sense(task) == WRITE_PROTECTED
    assert ch.receives == []  # refused before any Data-Out is asked for
    assert stores[READONLY].writes == 0


def test_readonly_reads_and_writes_elsewhere(
    target: ScsiTarget, pool: Pool, stores: list[MemBackstore]
) -> None:
    stores[READONLY].data[:BS] = b"\x11" * BS
    task, ch = run(target, pool, READ_10, lun=READONLY)
    good(task)
    assert bytes(ch.data_in) == b"\x11" * BS
    task, _ = run(target, pool, WRITE_10, lun=PLAIN, data_out=b"\x22" * BS)
    good(task)
    assert stores[PLAIN].data[:BS] == b"\x22" * BS


@pytest.mark.parametrize(
    ("cdb", "offset"),
    [(bytes.fromhex("1a 08 08 00 ff 00"), 2), (bytes.fromhex("5a 08 08 00 00 00 00 00 ff 00"), 3)],
    ids=["MODE SENSE(6)", "MODE SENSE(10)"],
)
def test_mode_sense_wp_bit(target: ScsiTarget, pool: Pool, cdb: bytes, offset: int) -> None:
    """DEVICE-SPECIFIC PARAMETER: WP (bit 7) only on the readonly LU; DPOFUA (bit 4) on all."""
    for lun, dsp in ((PLAIN, 0x10), (READONLY, 0x90), (REMOVABLE, 0x10)):
        task, ch = run(target, pool, cdb, lun=lun)
        good(task)
        assert ch.data_in[offset] == dsp, lun


# ---- removable=1: RMB, eject and load ----------------------------------------------------------


def test_inquiry_rmb(target: ScsiTarget, pool: Pool) -> None:
    inquiry = bytes.fromhex("12 00 00 00 ff 00")
    _, plain = run(target, pool, inquiry, lun=PLAIN)
    _, removable = run(target, pool, inquiry, lun=REMOVABLE)
    assert plain.data_in[:2] == b"\x00\x00"
    assert removable.data_in[:2] == b"\x00\x80"  # direct access, RMB
    assert plain.data_in[2:] == removable.data_in[2:]


def test_prevent_allow_only_on_removable(target: ScsiTarget, pool: Pool) -> None:
    task, _ = run(target, pool, PREVENT, lun=PLAIN)
    assert sense(task) == INVALID_OPCODE
    rsoc = bytes.fromhex("a3 0c 01 1e 0000 00000010 00 00")
    _, ch = run(target, pool, rsoc, lun=PLAIN)
    assert bytes(ch.data_in) == bytes.fromhex("00 01 0000")  # not supported
    _, ch = run(target, pool, rsoc, lun=REMOVABLE)
    assert bytes(ch.data_in) == bytes.fromhex("00 03 0006 1e 00 00 00 03 00")


def test_prevent_field_obsolete_values(target: ScsiTarget, pool: Pool) -> None:
    for value in (2, 3):
        task, _ = run(target, pool, bytes([0x1E, 0, 0, 0, value, 0]), lun=REMOVABLE)
        assert sense(task)[2] == 0x05  # ILLEGAL REQUEST
        assert task.sense[12:14] == b"\x24\x00"  # INVALID FIELD IN CDB
        assert task.sense[15:18] == bytes.fromhex("c9 0004")  # byte 4, bit 1


def test_eject_and_load(target: ScsiTarget, pool: Pool) -> None:
    good(run(target, pool, EJECT, lun=REMOVABLE)[0])
    assert not target.luns[REMOVABLE].medium_present
    for cdb in (TUR, READ_CAPACITY_10, READ_10):
        assert sense(run(target, pool, cdb, lun=REMOVABLE)[0]) == MEDIUM_NOT_PRESENT
    task, ch = run(target, pool, WRITE_10, lun=REMOVABLE, data_out=bytes(BS))
    assert sense(task) == MEDIUM_NOT_PRESENT
    assert ch.receives == []
    # Still answered without a medium: INQUIRY, MODE SENSE, PREVENT ALLOW, START STOP UNIT.
    for cdb in (bytes.fromhex("12 00 00 00 24 00"), bytes.fromhex("1a 00 3f 00 ff 00"), ALLOW):
        good(run(target, pool, cdb, lun=REMOVABLE)[0])
    good(run(target, pool, EJECT, lun=REMOVABLE)[0])  # ejecting again is fine
    good(run(target, pool, LOAD, lun=REMOVABLE)[0])
    good(run(target, pool, TUR, lun=REMOVABLE)[0])
    # Other LUs never noticed.
    good(run(target, pool, TUR, lun=PLAIN)[0])


@pytest.mark.parametrize("spec", MEDIUM, ids=lambda s: s.name)
def test_every_medium_command_needs_the_medium(
    target: ScsiTarget, pool: Pool, spec: CommandSpec
) -> None:
    good(run(target, pool, EJECT, lun=REMOVABLE)[0])
    task, _ = run(target, pool, cdb_for(spec), lun=REMOVABLE, data_out=bytes(2 * BS))
    expected = MEDIUM_NOT_PRESENT if spec.supported_by(target.luns[REMOVABLE]) else INVALID_OPCODE
    assert sense(task) == expected


def test_stop_start_and_power_conditions_do_not_eject(target: ScsiTarget, pool: Pool) -> None:
    for byte4 in (0x00, 0x01, 0x04, 0x05, 0x12, 0x32, 0xF2):  # no LOEJ, or a POWER CONDITION
        good(run(target, pool, bytes([0x1B, 0x01, 0, 0, byte4, 0]), lun=REMOVABLE)[0])
        good(run(target, pool, TUR, lun=REMOVABLE)[0])


def test_non_removable_ignores_loej(target: ScsiTarget, pool: Pool) -> None:
    good(run(target, pool, EJECT, lun=PLAIN)[0])
    good(run(target, pool, TUR, lun=PLAIN)[0])


# ---- PREVENT ALLOW MEDIUM REMOVAL: per nexus, ended by resets and nexus loss ------------------


def prevent(target: ScsiTarget, pool: Pool, nexus: Nexus = NEXUS) -> None:
    good(run(target, pool, PREVENT, lun=REMOVABLE, nexus=nexus)[0])


def eject(target: ScsiTarget, pool: Pool, nexus: Nexus = NEXUS) -> Task:
    return run(target, pool, EJECT, lun=REMOVABLE, nexus=nexus)[0]


def test_prevent_blocks_eject_and_load(target: ScsiTarget, pool: Pool) -> None:
    prevent(target, pool)
    assert sense(eject(target, pool)) == REMOVAL_PREVENTED
    good(run(target, pool, TUR, lun=REMOVABLE)[0])  # still loaded
    good(run(target, pool, ALLOW, lun=REMOVABLE)[0])
    good(eject(target, pool))
    prevent(target, pool)
    assert sense(run(target, pool, LOAD, lun=REMOVABLE)[0]) == REMOVAL_PREVENTED
    good(run(target, pool, ALLOW, lun=REMOVABLE)[0])
    good(run(target, pool, LOAD, lun=REMOVABLE)[0])


def test_prevent_is_per_nexus(target: ScsiTarget, pool: Pool) -> None:
    prevent(target, pool, NEXUS)
    assert sense(eject(target, pool, OTHER_NEXUS)) == REMOVAL_PREVENTED
    # The other nexus's ALLOW does not undo this one's PREVENT.
    good(run(target, pool, ALLOW, lun=REMOVABLE, nexus=OTHER_NEXUS)[0])
    assert sense(eject(target, pool, OTHER_NEXUS)) == REMOVAL_PREVENTED
    prevent(target, pool, OTHER_NEXUS)
    good(run(target, pool, ALLOW, lun=REMOVABLE, nexus=NEXUS)[0])
    assert sense(eject(target, pool, NEXUS)) == REMOVAL_PREVENTED
    good(run(target, pool, ALLOW, lun=REMOVABLE, nexus=OTHER_NEXUS)[0])
    good(eject(target, pool, NEXUS))


def test_prevent_survives_the_other_nexus_loss(target: ScsiTarget, pool: Pool) -> None:
    prevent(target, pool, NEXUS)
    target.nexus_lost(OTHER_NEXUS)
    assert sense(eject(target, pool)) == REMOVAL_PREVENTED


def test_nexus_loss_ends_prevent(target: ScsiTarget, pool: Pool) -> None:
    prevent(target, pool, NEXUS)
    target.nexus_lost(NEXUS)
    clear_ua(target, pool, REMOVABLE)  # a new nexus: power-on unit attention first
    good(eject(target, pool))


@pytest.mark.parametrize("reset", ["lun", "warm", "cold"])
def test_resets_end_prevent(target: ScsiTarget, pool: Pool, reset: str) -> None:
    prevent(target, pool, NEXUS)
    prevent(target, pool, OTHER_NEXUS)
    if reset == "lun":
        assert target.lun_reset(REMOVABLE)
    else:
        target.target_reset(cold=reset == "cold")
    clear_ua(target, pool, REMOVABLE)  # the reset's unit attention
    good(eject(target, pool))
    # A reset does not load the medium: it stays where it was.
    assert sense(run(target, pool, TUR, lun=REMOVABLE)[0]) == MEDIUM_NOT_PRESENT


def test_lun_reset_of_another_lu_keeps_prevent(target: ScsiTarget, pool: Pool) -> None:
    prevent(target, pool)
    target.lun_reset(PLAIN)
    assert sense(eject(target, pool)) == REMOVAL_PREVENTED
