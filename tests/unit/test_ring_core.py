"""Both sides of a TCMU ring in one process (and one test across a process boundary)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sgtarget.ring import abi
from sgtarget.ring.abi import TmrType
from sgtarget.ring.shm import Doorbell, SharedMap, SharedMemory
from sgtarget.ring.target import Completion, RingFull, RingTarget
from sgtarget.ring.user import Request, TmrNotice, UserRing

KiB = 1024
READ16 = bytes([0x88]) + bytes(15)
WRITE10 = bytes([0x2A]) + bytes(9)
TUR = bytes(6)


def _cdb(n: int, tag: int = 0) -> bytes:
    """A CDB of length ``n`` (6, 10, 12, 16 or variable) whose byte 2 carries ``tag``."""
    if n == 6:
        cdb = bytearray(6)
    elif n == 10:
        cdb = bytearray([0x28]) + bytearray(9)
    elif n == 12:
        cdb = bytearray([0xA8]) + bytearray(11)
    elif n == 16:
        cdb = bytearray([0x88]) + bytearray(15)
    else:
        cdb = bytearray([0x7F]) + bytearray(n - 1)
        cdb[7] = n - 8
    cdb[2] = tag & 0xFF
    return bytes(cdb)


class Rig:
    def __init__(self, cmdr_size: int) -> None:
        self.data_off = abi.MAILBOX_SIZE + cmdr_size
        self.shm = SharedMemory.create("test-ring", self.data_off)
        self.data = SharedMemory.create("test-data", 64 * KiB)
        self.target = RingTarget(self.shm.buf, data_off=self.data_off)
        self.user = UserRing(self.shm.buf)
        self.map = SharedMap(self.shm.buf, self.data.buf, self.data_off)

    def mailbox(self) -> tuple[int, int]:
        head = abi.U32.unpack_from(self.shm.buf, abi.MAILBOX_HEAD_OFF)[0]
        tail = abi.U32.unpack_from(self.shm.buf, abi.MAILBOX_TAIL_OFF)[0]
        return head, tail

    def close(self) -> None:
        self.shm.close()
        self.data.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(1 * KiB)
    yield r
    r.close()


def _requests(items: list[Request | TmrNotice]) -> list[Request]:
    return [i for i in items if isinstance(i, Request)]


def test_round_trip(rig: Rig) -> None:
    off = rig.data_off + 4096
    cid = rig.target.submit(READ16, [(off, 512), (off + 1024, 512)])
    assert rig.target.inflight() == [cid]
    (req,) = rig.user.fetch()
    assert req == Request(cid, READ16, ((off, 512), (off + 1024, 512)), (), ())
    assert rig.user.pending() == 1
    for i, view in enumerate(rig.map.views(req.iovs)):
        view[:] = bytes([i + 1]) * len(view)
    rig.user.complete(cid, 0, read_len=1024)
    assert rig.user.pending() == 0
    assert rig.target.reap() == [Completion(cid, 0, b"", 1024, False)]
    assert rig.target.inflight() == []
    assert bytes(rig.data.buf[4096:4608]) == b"\x01" * 512
    assert bytes(rig.data.buf[5120:5632]) == b"\x02" * 512
    assert rig.target.reap() == []
    assert rig.target.stats.submitted == rig.target.stats.completed == 1


def test_check_condition_and_unknown_op(rig: Rig) -> None:
    a = rig.target.submit(WRITE10, [(rig.data_off, 512)])
    b = rig.target.submit(_cdb(32), [])
    assert len(rig.user.fetch()) == 2
    sense = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10]) + bytes([0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0])
    rig.user.complete(a, 0x02, sense)
    rig.user.complete(b, 0, unknown_op=True)
    assert rig.target.reap() == [
        Completion(a, 0x02, sense, None, False),
        Completion(b, 0x02, b"", None, True),
    ]


def test_bidi_and_dif_iovs_round_trip(rig: Rig) -> None:
    d = rig.data_off
    cid = rig.target.submit(
        _cdb(16), [(d, 512)], bidi_iovs=[(d + 512, 256), (d + 1024, 256)], dif_iovs=[(d + 2048, 8)]
    )
    (req,) = rig.user.fetch()
    assert isinstance(req, Request)
    assert req.iovs == ((d, 512),)
    assert req.bidi_iovs == ((d + 512, 256), (d + 1024, 256))
    assert req.dif_iovs == ((d + 2048, 8),)
    rig.user.complete(cid, 0, read_len=512)  # data-in is the bidi buffers: 512 bytes
    assert rig.target.reap()[0].read_len == 512


def test_wrap_around_with_pad() -> None:
    r = Rig(1 * KiB)
    try:
        for i in range(200):
            ids = [r.target.submit(_cdb(16, i), [(r.data_off, 512)] * (i % 9)) for _ in range(2)]
            got = _requests(r.user.fetch())
            assert [g.cmd_id for g in got] == ids
            assert all(g.cdb == _cdb(16, i) for g in got)
            for cid in reversed(ids):
                r.user.complete(cid, 0)
            assert sorted(c.cmd_id for c in r.target.reap()) == sorted(ids)
            head, tail = r.mailbox()
            assert head % 8 == 0
            assert tail % 8 == 0
            assert tail == head  # trailing PADs were skipped too
        assert r.target.stats.pads > 10
    finally:
        r.close()


def test_out_of_order_completion(rig: Rig) -> None:
    ids = [rig.target.submit(_cdb(10, i), [(rig.data_off + i * 512, 512)]) for i in range(6)]
    reqs = _requests(rig.user.fetch())
    order = [3, 0, 5, 1, 4, 2]
    for k, i in enumerate(order):
        rig.user.complete(reqs[i].cmd_id, 0, read_len=k)
    done = rig.target.reap()
    assert [c.cmd_id for c in done] == [ids[i] for i in order]
    assert [c.read_len for c in done] == list(range(6))


def test_reap_in_batches(rig: Rig) -> None:
    ids = [rig.target.submit(TUR, []) for _ in range(5)]
    rig.user.fetch()
    rig.user.complete(ids[4], 0)
    assert [c.cmd_id for c in rig.target.reap()] == [ids[4]]
    rig.user.complete(ids[0], 0)
    rig.user.complete(ids[2], 0)
    assert [c.cmd_id for c in rig.target.reap()] == [ids[0], ids[2]]
    assert sorted(rig.target.inflight()) == sorted([ids[1], ids[3]])


def test_ring_full_then_progress(rig: Rig) -> None:
    ids = [rig.target.submit(READ16, [(rig.data_off, 4096)]) for _ in range(7)]
    with pytest.raises(RingFull):
        rig.target.submit(READ16, [(rig.data_off, 4096)])
    assert len(ids) == 7  # 1024 bytes, 128 per entry, one slot kept free
    assert rig.target.free < 128
    rig.user.fetch()
    rig.user.complete(ids[3], 0)
    with pytest.raises(RingFull):
        rig.target.submit(READ16, [(rig.data_off, 4096)])  # not reaped yet
    assert len(rig.target.reap()) == 1
    ids.append(rig.target.submit(READ16, [(rig.data_off, 4096)]))
    with pytest.raises(RingFull):
        rig.target.submit(READ16, [(rig.data_off, 4096)])


def test_entry_larger_than_half_the_ring_is_refused(rig: Rig) -> None:
    with pytest.raises(ValueError, match="half"):
        rig.target.submit(READ16, [(rig.data_off, 512)] * 30)


def test_cdb_length_must_match_opcode(rig: Rig) -> None:
    with pytest.raises(ValueError, match="CDB"):
        rig.target.submit(READ16[:10], [])


def test_tmr_entries_are_skipped_by_completions(rig: Rig) -> None:
    a = rig.target.submit(TUR, [])
    rig.target.submit_tmr(TmrType.ABORT_TASK, [a])
    b = rig.target.submit(TUR, [])
    items = rig.user.fetch()
    assert items[1] == TmrNotice(TmrType.ABORT_TASK, (a,))
    assert [type(i) for i in items] == [Request, TmrNotice, Request]
    rig.user.complete(b, 0x40)
    rig.user.complete(a, 0)
    assert [(c.cmd_id, c.status) for c in rig.target.reap()] == [(b, 0x40), (a, 0)]
    assert rig.target.stats.tmrs == 1
    head, tail = rig.mailbox()
    assert head == tail


def test_tmr_alone_is_passed_at_fetch(rig: Rig) -> None:
    rig.target.submit_tmr(TmrType.LUN_RESET, [])
    assert rig.user.fetch() == [TmrNotice(TmrType.LUN_RESET, ())]
    head, tail = rig.mailbox()
    assert head == tail
    assert rig.target.reap() == []
    assert rig.target.free == 1 * KiB - 1


def test_cmd_ids_not_reused_while_in_flight(rig: Rig) -> None:
    seen: set[int] = set()
    held = rig.target.submit(TUR, [])
    rig.user.fetch()
    for _ in range(300):
        cid = rig.target.submit(TUR, [])
        assert cid != held
        assert cid not in seen  # FIFO free list: no reuse for 65534 more submits
        seen.add(cid)
        rig.user.fetch()
        rig.user.complete(cid, 0)
        rig.target.reap()
    assert rig.target.inflight() == [held]


def test_shared_map_bounds(rig: Rig) -> None:
    m = rig.map
    d = rig.data_off
    assert len(m.view(d, 64 * KiB)) == 64 * KiB
    assert len(m.view(0, 128)) == 128
    for off, n in [(d - 8, 16), (d + 64 * KiB - 1, 2), (d + 64 * KiB, 1), (-1, 1), (0, -1)]:
        with pytest.raises(ValueError, match=r"outside|negative"):
            m.view(off, n)


def test_shared_map_gap_between_ring_and_data() -> None:
    ring = memoryview(bytearray(4096))
    data = memoryview(bytearray(4096))
    m = SharedMap(ring[:1024], data, 8192)
    assert len(m.view(1000, 24)) == 24
    for off in (1024, 4096, 8191):
        with pytest.raises(ValueError, match="outside"):
            m.view(off, 1)
    with pytest.raises(ValueError, match="outside"):
        m.view(1020, 8)


def test_doorbell() -> None:
    bell = Doorbell.create()
    try:
        assert bell.drain() == 0
        assert not bell.wait(0)
        bell.ring()
        bell.ring()
        assert bell.drain() == 2
        bell.ring()
        assert bell.wait(1.0)
        assert bell.drain() == 0
    finally:
        bell.close()


@given(
    st.lists(
        st.tuples(st.sampled_from([6, 10, 12, 16, 32, 64]), st.integers(0, 12)),
        min_size=1,
        max_size=60,
    ),
    st.randoms(use_true_random=False),
)
@settings(max_examples=60, deadline=None)
def test_random_completion_order(cmds: list[tuple[int, int]], rnd: random.Random) -> None:
    r = Rig(2 * KiB)
    try:
        want: dict[int, tuple[bytes, tuple[tuple[int, int], ...]]] = {}
        pending = list(cmds)
        while pending or r.target.inflight():
            while pending:
                n, k = pending[0]
                iovs = tuple((r.data_off + 512 * i, 512) for i in range(k))
                try:
                    cid = r.target.submit(_cdb(n, len(want)), iovs)
                except RingFull:
                    break
                want[cid] = (_cdb(n, len(want)), iovs)
                pending.pop(0)
            reqs = _requests(r.user.fetch())
            for q in reqs:
                assert want[q.cmd_id] == (q.cdb, q.iovs)
            rnd.shuffle(reqs)
            for q in reqs:
                r.user.complete(q.cmd_id, 0x08 if q.cmd_id % 3 else 0)
            for c in r.target.reap():
                assert c.status == (0x08 if c.cmd_id % 3 else 0)
                del want[c.cmd_id]
        assert not want
    finally:
        r.close()


STATUSES = sorted(abi.SCSI_STATUSES - {abi.STATUS_CHECK_CONDITION})


class RingMachine(RuleBasedStateMachine):
    """Random submit / fetch / complete-any / reap against a model of who owes what."""

    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(1 * KiB)
        self.status: dict[int, int] = {}  # submitted, not reaped: the status it will get
        self.fetched: list[int] = []  # fetched, not completed
        self.completed: set[int] = set()  # completed, not reaped
        self.reaped = 0
        self.submitted = 0

    @rule(
        n=st.sampled_from([6, 10, 12, 16, 24, 40]),
        k=st.integers(0, 10),
        status=st.sampled_from(STATUSES),
        tmr=st.booleans(),
    )
    def submit(self, n: int, k: int, status: int, tmr: bool) -> None:
        t = self.rig.target
        free = t.free
        try:
            if tmr:
                t.submit_tmr(TmrType.ABORT_TASK_SET, list(self.status)[:k])
                return
            cid = t.submit(_cdb(n), [(self.rig.data_off + 8 * i, 8) for i in range(k)])
        except RingFull:
            size = abi.tmr_entry_size(k) if tmr else abi.cmd_entry_size(k, n)
            head, _ = self.rig.mailbox()
            assert size + (0 if t.cmdr_size - head >= size else t.cmdr_size - head) > free
            return
        assert cid not in self.status
        self.status[cid] = status
        self.submitted += 1

    @rule()
    def fetch(self) -> None:
        for item in self.rig.user.fetch():
            if isinstance(item, Request):
                assert item.cmd_id in self.status
                assert item.cmd_id not in self.fetched
                self.fetched.append(item.cmd_id)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        if not self.fetched:
            return
        cid = self.fetched.pop(data.draw(st.integers(0, len(self.fetched) - 1)))
        self.rig.user.complete(cid, self.status[cid])
        self.completed.add(cid)

    @rule()
    def reap(self) -> None:
        for c in self.rig.target.reap():
            assert c.cmd_id in self.completed
            self.completed.discard(c.cmd_id)
            assert c.status == self.status.pop(c.cmd_id)
            self.reaped += 1

    @invariant()
    def accounting(self) -> None:
        t = self.rig.target
        head, tail = self.rig.mailbox()
        assert head % 8 == 0
        assert tail % 8 == 0
        assert 0 <= t.free <= t.cmdr_size - 1
        assert sorted(t.inflight()) == sorted(self.status)
        assert self.rig.user.pending() == len(self.fetched)
        assert t.stats.submitted == self.submitted
        assert t.stats.completed == self.reaped

    def teardown(self) -> None:
        # Drain: everything submitted completes exactly once.
        self.fetch()
        while self.fetched:
            cid = self.fetched.pop()
            self.rig.user.complete(cid, self.status[cid])
            self.completed.add(cid)
        self.reap()
        assert not self.status
        assert not self.completed
        self.rig.close()


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=80, stateful_step_count=60, deadline=None)


CHILD = Path(__file__).with_name("ring_echo_child.py")


def test_across_processes() -> None:
    """A child process attaches the ring and data memfds by fd and serves N commands."""
    n = 300
    r = Rig(1 * KiB)
    kick, done = Doorbell.create(), Doorbell.create()
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    fds = (r.shm.fd, r.data.fd, kick.fd, done.fd)
    child = subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, fds), str(r.data_off), str(r.data.size), str(n)],
        pass_fds=fds,
        env=env,
    )
    try:
        sent = served = 0
        tags: dict[int, tuple[int, int]] = {}  # cmd_id -> (tag, data offset)
        while served < n:
            while sent < n:
                base = (sent % 16) * 4096
                try:
                    cid = r.target.submit(_cdb(16, sent), [(r.data_off + base, 4096)])
                except RingFull:
                    break
                tags[cid] = (sent & 0xFF, base)
                sent += 1
            kick.ring()
            assert done.wait(10.0), "the child did not answer"
            for c in r.target.reap():
                tag, base = tags.pop(c.cmd_id)
                assert (c.status, c.read_len) == (0, 4096)
                assert bytes(r.data.buf[base : base + 4096]) == bytes([tag]) * 4096
                served += 1
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kick.close()
        done.close()
        r.close()
