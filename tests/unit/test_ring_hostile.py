"""A hostile handler (and a hostile target) writing straight into the ring memory.

The kernel's rule: assume the user process is malicious. The target reads back only cmd_tail
and, at positions it knows to be command entries, cmd_id, uflags, status, read_len and sense;
any violation raises ``RingBroken`` (logged once) and nothing else, ever. Entry lengths and
iovecs are never read back, so rewriting them is harmless (the documented safe handling).
The other way round, ``UserRing`` raises ``RingCorrupt`` for a target that writes garbage.
All reads go through a memoryview of exactly the ring, so an out-of-bounds read would raise
IndexError/struct.error, which these tests would see.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgtarget.ring import abi
from sgtarget.ring.abi import MailboxFlag, UFlag
from sgtarget.ring.shm import SharedMemory
from sgtarget.ring.target import RingBroken, RingTarget
from sgtarget.ring.user import Request, RingCorrupt, UserRing

KiB = 1024
CMDR = 1 * KiB
DATA_OFF = abi.MAILBOX_SIZE + CMDR
READ16 = bytes([0x88]) + bytes(15)
SENSE = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10]) + bytes(10)


class Hostile:
    """A ring whose target is honest and whose 'handler' pokes bytes directly."""

    def __init__(self) -> None:
        self.shm = SharedMemory.create("hostile-ring", DATA_OFF)
        self.buf = self.shm.buf
        self.target = RingTarget(self.buf, data_off=DATA_OFF)
        self.user = UserRing(self.buf)

    def set_tail(self, tail: int) -> None:
        abi.U32.pack_into(self.buf, abi.MAILBOX_TAIL_OFF, tail)

    def set_head(self, head: int) -> None:
        abi.U32.pack_into(self.buf, abi.MAILBOX_HEAD_OFF, head)

    def tail(self) -> int:
        return int(abi.U32.unpack_from(self.buf, abi.MAILBOX_TAIL_OFF)[0])

    def entry(self, pos: int) -> int:
        """Offset in the map of the entry at ring position ``pos``."""
        return abi.CMDR_OFF + pos

    def close(self) -> None:
        self.shm.close()


@pytest.fixture
def h() -> Iterator[Hostile]:
    ring = Hostile()
    yield ring
    ring.close()


def _broken(h: Hostile, caplog: pytest.LogCaptureFixture, match: str) -> None:
    """reap raises RingBroken matching ``match``, logs it once, and stays broken."""
    with caplog.at_level(logging.ERROR, logger="sgtarget.ring.target"):
        with pytest.raises(RingBroken, match=match):
            h.target.reap()
        with pytest.raises(RingBroken, match=match):
            h.target.reap()
        with pytest.raises(RingBroken):
            h.target.submit(READ16, [])
    logged = [r for r in caplog.records if r.name == "sgtarget.ring.target"]
    assert len(logged) == 1
    assert h.target.stats.broken is not None
    assert h.target.stats.broken in logged[0].getMessage()


def _three(h: Hostile) -> list[int]:
    ids = [h.target.submit(READ16, [(DATA_OFF + 4096 * i, 4096)]) for i in range(3)]
    assert len(h.user.fetch()) == 3
    return ids  # entries at 0, 128, 256; head 384


# -- cmd_tail garbage --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (CMDR, "outside the ring"),  # one past the end
        (0xFFFFFFF8, "outside the ring"),
        (132, "aligned"),
        (64, "not an entry boundary"),  # inside the first entry
        (512, "not an entry boundary"),  # beyond cmd_head (384)
        (896, "not an entry boundary"),
    ],
)
def test_cmd_tail_garbage(
    h: Hostile, caplog: pytest.LogCaptureFixture, tail: int, match: str
) -> None:
    ids = _three(h)
    h.set_tail(tail)
    _broken(h, caplog, match)
    assert sorted(h.target.inflight()) == sorted(ids)  # the caller fails them


def test_cmd_tail_moved_backwards(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    ids = _three(h)
    h.user.complete(ids[0], 0)
    h.user.complete(ids[1], 0)
    assert len(h.target.reap()) == 2  # reaped up to 256
    h.set_tail(128)
    _broken(h, caplog, "not an entry boundary")


def test_honest_tail_on_each_boundary(h: Hostile) -> None:
    """The same checks accept every legal boundary, one batch at a time."""
    ids = _three(h)
    for cid in ids:
        h.user.complete(cid, 0)
        assert [c.cmd_id for c in h.target.reap()] == [cid]


# -- cmd_id garbage ----------------------------------------------------------------------------


def test_completion_for_unknown_cmd_id(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    _three(h)
    abi.pack_response(h.buf, h.entry(0), cmd_id=999, status=0)
    h.set_tail(128)
    _broken(h, caplog, "cmd_id 999, which is not in flight")


def test_same_cmd_id_twice_in_one_batch(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    ids = _three(h)
    abi.pack_response(h.buf, h.entry(0), cmd_id=ids[1], status=0)
    abi.pack_response(h.buf, h.entry(128), cmd_id=ids[1], status=0)
    h.set_tail(256)
    _broken(h, caplog, f"cmd_id {ids[1]} completed twice")


def test_same_cmd_id_twice_across_batches(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    ids = _three(h)
    abi.pack_response(h.buf, h.entry(0), cmd_id=ids[2], status=0)
    h.set_tail(128)
    assert [c.cmd_id for c in h.target.reap()] == [ids[2]]
    abi.pack_response(h.buf, h.entry(128), cmd_id=ids[2], status=0)
    h.set_tail(256)
    _broken(h, caplog, "not in flight")


# -- entry fields the target never reads back --------------------------------------------------


def test_rewritten_len_op_at_tail_is_ignored(h: Hostile) -> None:
    """Documented safe handling: the target walks its own records, never the ring's len_op."""
    ids = _three(h)
    h.user.complete(ids[1], 0)
    struct.pack_into("<I", h.buf, h.entry(0), 0xFFFFFFF9)  # huge CMD
    struct.pack_into("<I", h.buf, h.entry(128), 8 | 0)  # tiny PAD
    h.user.complete(ids[0], 0)
    assert [c.cmd_id for c in h.target.reap()] == [ids[1], ids[0]]
    assert h.target.free == CMDR - 128 - 1


def test_rewritten_iovecs_after_submit(h: Hostile) -> None:
    cid = h.target.submit(READ16, [(DATA_OFF, 4096), (DATA_OFF + 8192, 512)])
    before = h.target.submitted(cid)
    for i in range(2):  # point both iovecs at the mailbox and beyond the map
        abi.IOVEC.pack_into(h.buf, h.entry(0) + abi.IOV_OFF + 16 * i, 0, 1 << 40)
    abi.REQ.pack_into(h.buf, h.entry(0) + abi.REQ_OFF, 9999, 9999, 9999, 1 << 60)
    assert h.target.submitted(cid) == before == (READ16, ((DATA_OFF, 4096), (DATA_OFF + 8192, 512)))
    abi.pack_response(h.buf, h.entry(0), cmd_id=cid, status=0, read_len=4608)
    h.set_tail(128)
    (c,) = h.target.reap()
    assert (c.cmd_id, c.read_len) == (cid, 4608)  # checked against the recorded 4608 bytes


def test_scribbled_cmd_head_is_not_read(h: Hostile) -> None:
    ids = _three(h)
    h.set_head(8)
    cid = h.target.submit(READ16, [])
    assert h.user.fetch()[0] == Request(cid, READ16, (), (), ())  # the target rewrote 512
    for i in [*ids, cid]:
        h.user.complete(i, 0)
    assert len(h.target.reap()) == 4


# -- response garbage --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sense", "match"),
    [
        (bytes([0x70, 0, 3, 0, 0, 0, 0, 89]) + bytes(88), "sense claims 97 bytes"),  # fixed
        (bytes([0x70, 0, 3, 0, 0, 0, 0, 255]), "sense claims 263 bytes"),
        (bytes([0x72, 3, 0x11, 0, 0, 0, 0, 100]), "sense claims 108 bytes"),  # descriptor
        (bytes(18), "without sense data"),
        (bytes([0x7F, 0, 3, 0, 0, 0, 0, 10]), "without sense data"),
    ],
)
def test_bad_sense(h: Hostile, caplog: pytest.LogCaptureFixture, sense: bytes, match: str) -> None:
    ids = _three(h)
    abi.pack_response(h.buf, h.entry(0), cmd_id=ids[0], status=0x02, sense=sense)
    h.set_tail(128)
    _broken(h, caplog, match)


def test_largest_sense_is_accepted(h: Hostile) -> None:
    ids = _three(h)
    sense = bytes([0x72, 3, 0x11, 0, 0, 0, 0, 88]) + bytes(range(88))
    h.user.complete(ids[0], 0x02, sense)
    (c,) = h.target.reap()
    assert c.sense == sense
    assert len(c.sense) == 96


def test_sense_ignored_without_check_condition(h: Hostile) -> None:
    ids = _three(h)
    h.user.complete(ids[0], 0x08, bytes([0x70, 0, 0, 0, 0, 0, 0, 255]))
    (c,) = h.target.reap()
    assert (c.status, c.sense) == (0x08, b"")


@pytest.mark.parametrize("status", [0x01, 0x10, 0x22, 0xFF])
def test_invalid_status(h: Hostile, caplog: pytest.LogCaptureFixture, status: int) -> None:
    ids = _three(h)
    h.user.complete(ids[0], status)
    _broken(h, caplog, f"invalid SCSI status {status:#04x}")


def test_read_len_larger_than_submitted(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    ids = _three(h)
    h.user.complete(ids[0], 0, read_len=4096)  # exactly the buffer: fine
    assert h.target.reap()[0].read_len == 4096
    h.user.complete(ids[1], 0, read_len=4097)
    _broken(h, caplog, "read_len 4097 exceeds the 4096 bytes submitted")


def test_read_len_without_data_buffer(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    cid = h.target.submit(bytes(6), [])
    h.user.fetch()
    h.user.complete(cid, 0, read_len=1)
    _broken(h, caplog, "exceeds the 0 bytes")


def test_unknown_uflags(h: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    ids = _three(h)
    h.user.complete(ids[0], 0)
    h.buf[h.entry(0) + abi.UFLAGS_OFF] = UFlag.KEEP_BUF  # not offered
    _broken(h, caplog, "unknown uflags 0x4")


def test_unknown_op_ignores_status_and_sense(h: Hostile) -> None:
    ids = _three(h)
    abi.pack_response(h.buf, h.entry(0), cmd_id=ids[0], status=0xFF, sense=b"\xff" * 96)
    h.buf[h.entry(0) + abi.UFLAGS_OFF] = UFlag.UNKNOWN_OP
    h.set_tail(128)
    (c,) = h.target.reap()
    assert (c.unknown_op, c.status, c.sense, c.read_len) == (True, 0x02, b"", None)


# -- random scribbling -------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, DATA_OFF - 1), st.binary(min_size=1, max_size=16)),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 6),
)
@settings(max_examples=300, deadline=None)
def test_random_scribbles_only_ever_break_the_ring(
    writes: list[tuple[int, bytes]], n_complete: int
) -> None:
    """Whatever a handler writes, reap returns valid completions or raises RingBroken."""
    h = Hostile()
    try:
        ids = [h.target.submit(READ16, [(DATA_OFF + 4096 * i, 512)]) for i in range(6)]
        h.user.fetch()
        for cid in ids[:n_complete]:
            h.user.complete(cid, 0)
        for off, data in writes:
            end = min(DATA_OFF, off + len(data))
            h.buf[off:end] = data[: end - off]
        try:
            done = h.target.reap()
        except RingBroken:
            assert h.target.stats.broken
            return
        assert len({c.cmd_id for c in done}) == len(done)
        for c in done:
            assert c.cmd_id in ids
            assert c.status in abi.SCSI_STATUSES
            assert len(c.sense) <= abi.SENSE_BUFFERSIZE
            assert c.read_len is None or c.read_len <= 512
        assert sorted(h.target.inflight() + [c.cmd_id for c in done]) == sorted(ids)
    finally:
        h.close()


# -- a hostile target, seen from the handler ---------------------------------------------------


class Target:
    """A ring laid out by an honest RingTarget that the test then corrupts."""

    def __init__(self) -> None:
        self.shm = SharedMemory.create("hostile-target", DATA_OFF)
        self.buf = self.shm.buf
        self.target = RingTarget(self.buf, data_off=DATA_OFF)

    def close(self) -> None:
        self.shm.close()


@pytest.fixture
def t() -> Iterator[Target]:
    ring = Target()
    yield ring
    ring.close()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", 1, "version"),
        ("cmdr_off", 0, "cmdr_off"),
        ("cmdr_size", 1001, "cmdr_size"),
        ("cmdr_size", 64, "cmdr_size"),
        ("cmdr_size", 4096, "runs past"),
        ("tail", 12, "cmd_tail"),
    ],
)
def test_mailbox_checked(t: Target, field: str, value: int, match: str) -> None:
    offsets = {"version": (0, "<H"), "cmdr_off": (4, "<I"), "cmdr_size": (8, "<I")}
    off, fmt = offsets.get(field, (abi.MAILBOX_TAIL_OFF, "<I"))
    struct.pack_into(fmt, t.buf, off, value)
    with pytest.raises(RingCorrupt, match=match):
        UserRing(t.buf)


def test_mailbox_flags_read(t: Target) -> None:
    assert UserRing(t.buf).flags == (
        MailboxFlag.CAP_OOOC | MailboxFlag.CAP_READ_LEN | MailboxFlag.CAP_TMR
    )


def _corrupt_first(t: Target, off: int, fmt: str, value: int) -> UserRing:
    user = UserRing(t.buf)
    t.target.submit(READ16, [(DATA_OFF, 512)])
    struct.pack_into(fmt, t.buf, abi.CMDR_OFF + off, value)
    return user


@pytest.mark.parametrize(
    ("off", "fmt", "value", "match"),
    [
        (0, "<I", 0 | 1, "length 0"),  # len_op: zero length
        (0, "<I", 0xFFFFFFF8 | 1, "runs past"),
        (0, "<I", 256 | 1, "runs past the ring or cmd_head"),  # longer than head allows
        (0, "<I", 128 | 5, "unknown opcode 5"),
        (0, "<I", 64 | 1, "64-byte command entry"),
        (8, "<I", 0xFFFFFFFF, "iovecs overflow"),  # iov_cnt
        (24, "<Q", 0, "cdb_off 0 is outside"),
        (24, "<Q", abi.CMDR_OFF + 128, "is outside its entry"),  # one past the entry
        (24, "<Q", 1 << 63, "is outside its entry"),
    ],
)
def test_garbage_entries_raise_ring_corrupt(
    t: Target, off: int, fmt: str, value: int, match: str
) -> None:
    user = _corrupt_first(t, off, fmt, value)
    with pytest.raises(RingCorrupt, match=match):
        user.fetch()


def test_cdb_overflowing_its_entry(t: Target) -> None:
    user = UserRing(t.buf)
    t.target.submit(bytes([0x28]) + bytes(9), [])  # 112 + 10 -> 128-byte entry, CDB at 112
    t.buf[abi.CMDR_OFF + 112] = 0x7F  # now a variable-length CDB ...
    t.buf[abi.CMDR_OFF + 119] = 200  # ... of 208 bytes
    with pytest.raises(RingCorrupt, match="208-byte CDB overflows"):
        user.fetch()


def test_garbage_cmd_head(t: Target) -> None:
    user = UserRing(t.buf)
    for head in (CMDR, 4, 1 << 31):
        abi.U32.pack_into(t.buf, abi.MAILBOX_HEAD_OFF, head)
        with pytest.raises(RingCorrupt, match="cmd_head"):
            user.fetch()


def test_duplicate_cmd_id_from_target(t: Target) -> None:
    user = UserRing(t.buf)
    t.target.submit(READ16, [])
    t.target.submit(READ16, [])
    struct.pack_into("<H", t.buf, abi.CMDR_OFF + 128 + 4, 1)
    with pytest.raises(RingCorrupt, match="cmd_id 1 is already in flight"):
        user.fetch()


def test_tmr_count_overflow(t: Target) -> None:
    user = UserRing(t.buf)
    t.target.submit_tmr(5, [1, 2])
    struct.pack_into("<I", t.buf, abi.CMDR_OFF + 12, 1000)
    with pytest.raises(RingCorrupt, match="TMR of 1000"):
        user.fetch()


@given(
    st.lists(
        st.tuples(st.integers(0, DATA_OFF - 1), st.binary(min_size=1, max_size=16)),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_random_target_garbage_only_raises_ring_corrupt(writes: list[tuple[int, bytes]]) -> None:
    r = Target()
    try:
        user = UserRing(r.buf)
        for i in range(4):
            r.target.submit(READ16, [(DATA_OFF + 512 * j, 512) for j in range(i)])
        for off, data in writes:
            if off < abi.MAILBOX_HEAD_OFF:
                continue  # the mailbox's fixed fields are only checked at attach
            end = min(DATA_OFF, off + len(data))
            r.buf[off:end] = data[: end - off]
        try:
            items = user.fetch()
        except RingCorrupt:
            return
        for item in items:
            if isinstance(item, Request):
                assert 1 <= len(item.cdb) <= 263
    finally:
        r.close()


def test_read_len_flag_not_offered() -> None:
    shm = SharedMemory.create("no-read-len", DATA_OFF)
    try:
        target = RingTarget(shm.buf, data_off=DATA_OFF, flags=MailboxFlag.CAP_OOOC)
        user = UserRing(shm.buf)
        cid = target.submit(READ16, [(DATA_OFF, 512)])
        user.fetch()
        user.complete(cid, 0, read_len=512)
        with pytest.raises(RingBroken, match="unknown uflags 0x2"):
            target.reap()
    finally:
        shm.close()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (MailboxFlag.CAP_OOOC | MailboxFlag.CAP_KEEP_BUF, "KEEP_BUF"),
        (MailboxFlag.CAP_READ_LEN, "OOOC"),
        (MailboxFlag.CAP_OOOC | 0x10, "unknown mailbox flags"),
    ],
)
def test_target_flags_checked(flags: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RingTarget(memoryview(bytearray(DATA_OFF)), data_off=DATA_OFF, flags=flags)


def test_tmr_refused_without_cap() -> None:
    target = RingTarget(
        memoryview(bytearray(DATA_OFF)), data_off=DATA_OFF, flags=MailboxFlag.CAP_OOOC
    )
    with pytest.raises(ValueError, match="CAP_TMR"):
        target.submit_tmr(1, [])
