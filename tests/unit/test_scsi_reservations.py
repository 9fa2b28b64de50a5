"""SPC-2 reservations and SPC-3 persistent reservations through ScsiTarget.execute."""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sgtarget.backstores.file import FileBackstore
from sgtarget.datapath import Pool
from sgtarget.scsi.constants import Status
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.reservations import transport_id
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import Nexus, Task, run_inline

from .scsi_fakes import MemBackstore, run

BS = 512
NAME = "iqn.2024-01.test:tgt"
A = Nexus("iqn.2024-01.test:a", "iqn.2024-01.test:a,i,0x23d000000001")
B = Nexus("iqn.2024-01.test:b", "iqn.2024-01.test:b,i,0x23d000000002")
C = Nexus("iqn.2024-01.test:c", "iqn.2024-01.test:c,i,0x23d000000003")
NEXUSES = (A, B, C)

WE, EA, WERO, EARO, WEAR, EAAR = 1, 3, 5, 6, 7, 8
TYPES = (WE, EA, WERO, EARO, WEAR, EAAR)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_ABORT, REGISTER_IGNORE = range(7)

READ10 = bytes.fromhex("28 00 00000000 00 0001 00")
WRITE10 = bytes.fromhex("2a 00 00000000 00 0001 00")
TUR = bytes(6)
REQUEST_SENSE = bytes.fromhex("03 00 00 00 12 00")


def prin(sa: int, alloc: int = 4096) -> bytes:
    return bytes([0x5E, sa, 0, 0, 0, 0, 0]) + alloc.to_bytes(2, "big") + b"\0"


def prout_cdb(sa: int, type_: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return bytes([0x5F, sa, scope << 4 | type_, 0, 0]) + length.to_bytes(4, "big") + b"\0"


def params(rk: int = 0, sark: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">QQ4xBx2x", rk, sark, flags)


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(size=4 * 1024 * 1024, block_size=64 * 1024)
    yield p
    gc.collect()
    p.close()


def make_target(store: MemBackstore | FileBackstore | None = None) -> ScsiTarget:
    lu = LogicalUnit(store or MemBackstore(64 * BS), runner=run_inline, identity=f"{NAME}/lun0")
    return ScsiTarget(NAME, [lu])


@pytest.fixture
def target(pool: Pool) -> ScsiTarget:
    t = make_target()
    for n in NEXUSES:  # consume each nexus's POWER ON unit attention
        run(t, pool, TUR, nexus=n)
    return t


def do(t: ScsiTarget, pool: Pool, cdb: bytes, nexus: Nexus, data: bytes = b"") -> Task:
    task, _ = run(t, pool, cdb, nexus=nexus, data_out=data, edtl=len(data) if data else 4096)
    return task


def prout(
    t: ScsiTarget, pool: Pool, nexus: Nexus, sa: int, *, rk: int = 0, sark: int = 0, **kw: int
) -> int:
    flags = kw.pop("flags", 0)
    task = do(t, pool, prout_cdb(sa, **kw), nexus, params(rk, sark, flags))
    return task.status


def prin_data(t: ScsiTarget, pool: Pool, sa: int, nexus: Nexus = A) -> bytes:
    task, ch = run(t, pool, prin(sa), nexus=nexus)
    assert task.status == Status.GOOD, task.sense.hex()
    return bytes(ch.data_in)


def sense(task: Task) -> tuple[int, int, int]:
    assert task.status == Status.CHECK_CONDITION
    return task.sense[2] & 0x0F, task.sense[12], task.sense[13]


# ---- PERSISTENT RESERVE IN: golden parameter data --------------------------------------------


def test_prin_empty_golden(target: ScsiTarget, pool: Pool) -> None:
    assert prin_data(target, pool, 0) == bytes.fromhex("00000000 00000000")
    assert prin_data(target, pool, 1) == bytes.fromhex("00000000 00000000")
    assert prin_data(target, pool, 3) == bytes.fromhex("00000000 00000000")


def test_report_capabilities_golden(target: ScsiTarget, pool: Pool) -> None:
    # Length 8, CRH, no SIP_C/ATP_C, PTPL_C=0 (RAM LUN), TMV + ALLOW COMMANDS 001b, all six types.
    assert prin_data(target, pool, 2) == bytes.fromhex("0008 10 90 ea01 0000")


def test_read_keys_and_reservation_golden(target: ScsiTarget, pool: Pool) -> None:
    assert prout(target, pool, A, REGISTER, sark=0xAAAA) == Status.GOOD
    assert prout(target, pool, B, REGISTER_IGNORE, sark=0xBBBB) == Status.GOOD
    assert prin_data(target, pool, 0) == bytes.fromhex(
        "00000002 00000010 000000000000aaaa 000000000000bbbb"
    )
    assert prout(target, pool, A, RESERVE, rk=0xAAAA, type_=WE) == Status.GOOD
    assert prin_data(target, pool, 1) == bytes.fromhex(
        "00000002 00000010 000000000000aaaa 00000000 00 01 0000"
    )
    # All-registrants reservations report key 0.
    assert prout(target, pool, A, RELEASE, rk=0xAAAA, type_=WE) == Status.GOOD
    assert prout(target, pool, B, RESERVE, rk=0xBBBB, type_=EAAR) == Status.GOOD
    assert prin_data(target, pool, 1) == bytes.fromhex(
        "00000002 00000010 0000000000000000 00000000 00 08 0000"
    )


def test_read_full_status_golden(target: ScsiTarget, pool: Pool) -> None:
    prout(target, pool, A, REGISTER, sark=0x11)
    prout(target, pool, B, REGISTER, sark=0x22)
    prout(target, pool, B, RESERVE, rk=0x22, type_=EA)
    tid_a, tid_b = transport_id(A.key), transport_id(B.key)
    # "iqn.2024-01.test:a,i,0x23d000000001" is 35 bytes + NUL -> 36, a multiple of 4.
    assert tid_a == bytes.fromhex("45 00 0024") + A.key.encode() + b"\0"
    desc_a = bytes.fromhex("0000000000000011 00000000 00 00 00000000 0001") + b"\0\0\0\x28" + tid_a
    desc_b = bytes.fromhex("0000000000000022 00000000 01 03 00000000 0001") + b"\0\0\0\x28" + tid_b
    body = desc_a + desc_b
    expect = bytes.fromhex("00000002") + len(body).to_bytes(4, "big") + body
    assert prin_data(target, pool, 3) == expect


def test_prin_truncated_and_bad_service_action(target: ScsiTarget, pool: Pool) -> None:
    prout(target, pool, A, REGISTER, sark=0x11)
    task, ch = run(target, pool, prin(0, alloc=10), nexus=A)
    assert bytes(ch.data_in) == bytes.fromhex("00000001 00000008 0000")
    task, _ = run(target, pool, prin(4), nexus=A)
    assert sense(task) == (0x5, 0x24, 0x00)


# ---- PERSISTENT RESERVE OUT: errors and the basic rules --------------------------------------


def test_prout_parameter_list_errors(target: ScsiTarget, pool: Pool) -> None:
    task = do(target, pool, prout_cdb(REGISTER, length=20), A, params(sark=1)[:20])
    assert sense(task) == (0x5, 0x1A, 0x00)
    for flags, sks in ((0x08, "8b0014"), (0x04, "8a0014"), (0x01, "880014")):
        task = do(target, pool, prout_cdb(REGISTER), A, params(sark=1, flags=flags))
        assert sense(task) == (0x5, 0x26, 0x00)
        assert task.sense[15:18] == bytes.fromhex(sks)  # APTPL: a RAM LUN cannot persist
    prout(target, pool, A, REGISTER, sark=1)
    task = do(target, pool, prout_cdb(RESERVE, type_=2), A, params(rk=1))
    assert sense(task) == (0x5, 0x24, 0x00)
    task = do(target, pool, prout_cdb(RESERVE, type_=WE, scope=1), A, params(rk=1))
    assert sense(task) == (0x5, 0x24, 0x00)
    task = do(target, pool, prout_cdb(7), A, params(rk=1))  # REGISTER AND MOVE
    assert sense(task) == (0x5, 0x24, 0x00)


def test_register_key_rules_and_generation(target: ScsiTarget, pool: Pool) -> None:
    assert prout(target, pool, A, REGISTER, rk=5, sark=1) == Status.RESERVATION_CONFLICT
    assert prout(target, pool, A, REGISTER, sark=0) == Status.GOOD  # no-op, no generation
    assert prin_data(target, pool, 0)[:4] == bytes(4)
    assert prout(target, pool, A, REGISTER, sark=1) == Status.GOOD
    assert prout(target, pool, A, REGISTER, rk=2, sark=3) == Status.RESERVATION_CONFLICT
    assert prout(target, pool, A, REGISTER, rk=1, sark=3) == Status.GOOD
    assert prout(target, pool, A, REGISTER_IGNORE, rk=99, sark=4) == Status.GOOD
    assert prin_data(target, pool, 0) == bytes.fromhex("00000003 00000008 0000000000000004")
    assert prout(target, pool, B, RESERVE, rk=0, type_=WE) == Status.RESERVATION_CONFLICT
    assert prout(target, pool, A, RESERVE, rk=3, type_=WE) == Status.RESERVATION_CONFLICT


def test_release_with_wrong_type(target: ScsiTarget, pool: Pool) -> None:
    prout(target, pool, A, REGISTER, sark=1)
    prout(target, pool, A, RESERVE, rk=1, type_=EA)
    task = do(target, pool, prout_cdb(RELEASE, type_=WE), A, params(rk=1))
    assert sense(task) == (0x5, 0x26, 0x04)


def test_preempt_and_abort_calls_the_hook(target: ScsiTarget, pool: Pool) -> None:
    aborted: list[set[str]] = []
    target.luns[0].reservations.abort_hook = aborted.append
    prout(target, pool, A, REGISTER, sark=1)
    prout(target, pool, B, REGISTER, sark=2)
    prout(target, pool, B, RESERVE, rk=2, type_=WE)
    assert prout(target, pool, A, PREEMPT_ABORT, rk=1, sark=2, type_=EA) == Status.GOOD
    assert aborted == [{B.key}]
    assert prin_data(target, pool, 1)[8:] == bytes.fromhex("0000000000000001 00000000 00 03 0000")
    assert sense(do(target, pool, TUR, B)) == (0x6, 0x2A, 0x05)


def test_preempt_unknown_key_conflicts(target: ScsiTarget, pool: Pool) -> None:
    prout(target, pool, A, REGISTER, sark=1)
    assert prout(target, pool, A, PREEMPT, rk=1, sark=7, type_=WE) == Status.RESERVATION_CONFLICT
    task = do(target, pool, prout_cdb(PREEMPT, type_=WE), A, params(rk=1, sark=0))
    assert sense(task) == (0x5, 0x26, 0x00)


# ---- SPC-2 RESERVE / RELEASE -----------------------------------------------------------------

RESERVE6 = bytes.fromhex("16 00 00 00 00 00")
RELEASE6 = bytes.fromhex("17 00 00 00 00 00")
RESERVE10 = bytes.fromhex("56 00 00 00 00 00 00 00 00 00")
RELEASE10 = bytes.fromhex("57 00 00 00 00 00 00 00 00 00")


@pytest.mark.parametrize(("reserve", "release"), [(RESERVE6, RELEASE6), (RESERVE10, RELEASE10)])
def test_spc2_reserve_release(
    target: ScsiTarget, pool: Pool, reserve: bytes, release: bytes
) -> None:
    assert do(target, pool, reserve, A).status == Status.GOOD
    assert do(target, pool, reserve, A).status == Status.GOOD  # again by the holder
    assert do(target, pool, reserve, B).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, READ10, B).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, TUR, B).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, prin(0), B).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, bytes.fromhex("12 00 00 00 24 00"), B).status == Status.GOOD
    assert do(target, pool, release, B).status == Status.GOOD  # not the holder: no effect
    assert do(target, pool, READ10, B).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, WRITE10, A, bytes(BS)).status == Status.GOOD
    assert do(target, pool, release, A).status == Status.GOOD
    assert do(target, pool, READ10, B).status == Status.GOOD
    assert sense(do(target, pool, bytes.fromhex("16 10 00 00 00 00"), A)) == (0x5, 0x24, 0x00)


@pytest.mark.parametrize("how", ["lun", "warm", "cold", "nexus"])
def test_spc2_reservation_released_by(target: ScsiTarget, pool: Pool, how: str) -> None:
    assert do(target, pool, RESERVE6, A).status == Status.GOOD
    prout(target, pool, B, REGISTER, sark=0)  # not a registration: RESERVE still works
    if how == "lun":
        target.lun_reset(0)
    elif how == "warm":
        target.target_reset(cold=False)
    elif how == "cold":
        target.target_reset(cold=True)
    else:
        target.nexus_lost(A)
    do(target, pool, TUR, B)  # the reset unit attention
    assert do(target, pool, RESERVE6, B).status == Status.GOOD


def test_spc2_commands_conflict_while_registered(target: ScsiTarget, pool: Pool) -> None:
    prout(target, pool, A, REGISTER, sark=1)
    assert do(target, pool, RESERVE6, A).status == Status.RESERVATION_CONFLICT
    assert do(target, pool, RELEASE10, B).status == Status.RESERVATION_CONFLICT


def test_persistent_reservation_survives_resets_and_nexus_loss(
    target: ScsiTarget, pool: Pool
) -> None:
    prout(target, pool, A, REGISTER, sark=1)
    prout(target, pool, A, RESERVE, rk=1, type_=EA)
    target.lun_reset(0)
    target.nexus_lost(A)
    do(target, pool, TUR, B)
    assert do(target, pool, READ10, B).status == Status.RESERVATION_CONFLICT
    assert prin_data(target, pool, 1, nexus=B)[8:16] == (1).to_bytes(8, "big")


# ---- APTPL -----------------------------------------------------------------------------------


def test_aptpl_persists_across_a_fresh_lu(tmp_path: Path, pool: Pool) -> None:
    image = tmp_path / "disk.img"
    store = FileBackstore(image, 64 * BS)
    t = make_target(store)
    for n in (A, B):
        run(t, pool, TUR, nexus=n)
    assert prin_data(t, pool, 2)[2] == 0x11  # CRH + PTPL_C
    assert prout(t, pool, A, REGISTER, sark=0xA1, flags=0x01) == Status.GOOD
    assert prout(t, pool, B, REGISTER, sark=0xB2, flags=0x01) == Status.GOOD
    assert prout(t, pool, A, RESERVE, rk=0xA1, type_=WERO) == Status.GOOD
    keys, res = prin_data(t, pool, 0), prin_data(t, pool, 1)
    state = json.loads((tmp_path / "disk.img.pr.json").read_text())
    assert state["reservation"] == {"holder": A.key, "type": WERO}
    store.close()

    store = FileBackstore(image)
    t = make_target(store)
    run(t, pool, TUR, nexus=C)
    assert prin_data(t, pool, 0, nexus=C) == keys
    assert prin_data(t, pool, 1, nexus=C) == res
    assert prin_data(t, pool, 2, nexus=C)[3] & 0x01  # PTPL_A
    assert do(t, pool, WRITE10, C, bytes(BS)).status == Status.RESERVATION_CONFLICT
    # APTPL=0 on a later registration: nothing survives the next restart.
    run(t, pool, TUR, nexus=A)
    assert prout(t, pool, A, REGISTER, rk=0xA1, sark=0xA3) == Status.GOOD
    assert not (tmp_path / "disk.img.pr.json").exists()
    store.close()
    t = make_target(FileBackstore(image))
    run(t, pool, TUR, nexus=A)
    assert prin_data(t, pool, 0) == bytes.fromhex("00000000 00000000")
    t.luns[0].backstore.close()


# ---- state machine: 3 nexuses, conflicts and unit attentions against a model -----------------


class PrModel(RuleBasedStateMachine):
    """A reference model of SPC-4 5.13 for one LU, checked against the target after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(size=2 * 1024 * 1024, block_size=64 * 1024)
        self.t = make_target()
        self.regs: dict[str, int] = {}
        self.res: tuple[str | None, int] | None = None  # (holder or None for AR, type)
        self.uas: dict[str, list[tuple[int, int]]] = {n.key: [] for n in NEXUSES}
        self.gen = 0

    def teardown(self) -> None:
        gc.collect()
        self.pool.close()

    @initialize()
    def power_on(self) -> None:
        for n in NEXUSES:
            run(self.t, self.pool, TUR, nexus=n)

    def _holds(self, key: str) -> bool:
        if self.res is None:
            return False
        holder, _ = self.res
        return key in self.regs if holder is None else holder == key

    def _ua(self, keys: Iterable[str], ascq: int) -> None:
        for k in keys:
            if (0x2A, ascq) not in self.uas[k]:
                self.uas[k].append((0x2A, ascq))

    def _prout(self, n: Nexus, sa: int, rk: int, sark: int = 0, type_: int = 0) -> int:
        return prout(self.t, self.pool, n, sa, rk=rk, sark=sark, type_=type_)

    @rule(n=st.sampled_from(NEXUSES), sark=st.integers(0, 3), ignore=st.booleans())
    def register(self, n: Nexus, sark: int, ignore: bool) -> None:
        cur = self.regs.get(n.key)
        rk = cur if cur is not None else 0
        status = self._prout(n, REGISTER_IGNORE if ignore else REGISTER, rk, sark)
        assert status == Status.GOOD
        if cur is None and sark == 0:
            return
        self.gen += 1
        if sark:
            self.regs[n.key] = sark
            return
        del self.regs[n.key]
        if self.res is not None and (
            self.res[0] == n.key or (self.res[0] is None and not self.regs)
        ):
            if self.res[1] in (WERO, EARO):
                self._ua(self.regs, 0x04)
            self.res = None

    @rule(n=st.sampled_from(NEXUSES), rk=st.integers(0, 3))
    def wrong_key(self, n: Nexus, rk: int) -> None:
        if self.regs.get(n.key) == rk:
            return
        assert self._prout(n, RESERVE, rk, type_=WE) == Status.RESERVATION_CONFLICT
        if n.key in self.regs or rk:
            assert self._prout(n, REGISTER, rk, 1) == Status.RESERVATION_CONFLICT

    @rule(n=st.sampled_from(NEXUSES), type_=st.sampled_from(TYPES))
    def reserve(self, n: Nexus, type_: int) -> None:
        if n.key not in self.regs:
            return
        status = self._prout(n, RESERVE, self.regs[n.key], type_=type_)
        if self.res is None:
            assert status == Status.GOOD
            self.res = (None if type_ >= WEAR else n.key, type_)
        elif self._holds(n.key) and self.res[1] == type_:
            assert status == Status.GOOD
        else:
            assert status == Status.RESERVATION_CONFLICT

    @rule(n=st.sampled_from(NEXUSES))
    def release(self, n: Nexus) -> None:
        if n.key not in self.regs:
            return
        type_ = self.res[1] if self.res is not None else WE
        assert self._prout(n, RELEASE, self.regs[n.key], type_=type_) == Status.GOOD
        if self.res is not None and self._holds(n.key):
            if type_ not in (WE, EA):
                self._ua((k for k in self.regs if k != n.key), 0x04)
            self.res = None

    @rule(n=st.sampled_from(NEXUSES))
    def clear(self, n: Nexus) -> None:
        if n.key not in self.regs:
            return
        assert self._prout(n, CLEAR, self.regs[n.key]) == Status.GOOD
        self._ua((k for k in self.regs if k != n.key), 0x03)
        self.regs.clear()
        self.res = None
        self.gen += 1

    @rule(n=st.sampled_from(NEXUSES), sark=st.integers(0, 3), type_=st.sampled_from(TYPES))
    def preempt(self, n: Nexus, sark: int, type_: int) -> None:
        if n.key not in self.regs:
            return
        status = self._prout(n, PREEMPT, self.regs[n.key], sark, type_)
        res = self.res
        if res is not None and res[0] is None and sark == 0:
            victims = {k for k in self.regs if k != n.key}
            self.res = (None if type_ >= WEAR else n.key, type_)
        elif res is not None and res[0] is not None and sark == self.regs[res[0]]:
            victims = {k for k, v in self.regs.items() if v == sark and k != n.key}
            self.res = (None if type_ >= WEAR else n.key, type_)
            if type_ != res[1]:
                self._ua(set(self.regs) - victims - {n.key}, 0x04)
        else:
            if sark == 0:
                assert status == Status.CHECK_CONDITION
                return
            victims = {k for k, v in self.regs.items() if v == sark}
            if not victims:
                assert status == Status.RESERVATION_CONFLICT
                return
            victims.discard(n.key)
        assert status == Status.GOOD
        for v in victims:
            del self.regs[v]
        self._ua(victims, 0x05)
        self.gen += 1

    @invariant()
    def target_matches_model(self) -> None:
        t, pool = self.t, self.pool
        # Unit attentions first: REQUEST SENSE hands them out one at a time, in order.
        for n in NEXUSES:
            seen = []
            while True:
                _, ch = run(t, pool, REQUEST_SENSE, nexus=n)
                if ch.data_in[2] & 0x0F != 0x6:
                    break
                seen.append((ch.data_in[12], ch.data_in[13]))
            assert seen == self.uas[n.key], n
            self.uas[n.key] = []
        keys = prin_data(t, pool, 0)
        assert int.from_bytes(keys[:4], "big") == self.gen
        listed = [int.from_bytes(keys[i : i + 8], "big") for i in range(8, len(keys), 8)]
        assert sorted(listed) == sorted(self.regs.values())
        rr = prin_data(t, pool, 1)
        if self.res is None:
            assert rr[4:8] == bytes(4)
        else:
            holder, type_ = self.res
            assert rr[21] == type_
            assert int.from_bytes(rr[8:16], "big") == (0 if holder is None else self.regs[holder])
        for n in NEXUSES:
            for cdb, write in ((READ10, False), (WRITE10, True)):
                task = do(t, pool, cdb, n, bytes(BS) if write else b"")
                assert task.status == (
                    Status.GOOD if self._allowed(n.key, write) else Status.RESERVATION_CONFLICT
                ), (n, write, self.res, self.regs)

    def _allowed(self, key: str, write: bool) -> bool:
        if self.res is None or self._holds(key):
            return True
        type_ = self.res[1]
        if type_ in (WERO, EARO, WEAR, EAAR) and key in self.regs:
            return True
        return type_ in (WE, WERO, WEAR) and not write


PrModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pr_state_machine = PrModel.TestCase
