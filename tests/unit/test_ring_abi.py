"""Golden bytes for the TCMU user ABI (target_core_user.h, TCMU_VERSION "2.0").

Entries are built by hand with ``struct.pack_into`` at the offsets a C compiler gives the kernel
header and compared with ``abi``'s encoders. The outer ``tcmu_cmd_entry`` is packed but its
nested ``req``/``rsp`` structs are not, so ``req`` keeps its natural alignment:

    hdr.len_op u32 @0, hdr.cmd_id u16 @4, hdr.kflags u8 @6, hdr.uflags u8 @7
    req.iov_cnt u32 @8, iov_bidi_cnt u32 @12, iov_dif_cnt u32 @16, (hole @20),
    req.cdb_off u64 @24 (not 20), __pad1 u64 @32, __pad2 u64 @40, iov[] @48 (16 bytes each)
    rsp.scsi_status u8 @8, __pad1 @9, __pad2 u16 @10, read_len u32 @12, sense_buffer[96] @16
    sizeof(struct tcmu_cmd_entry) = 8 + max(40, 104) = 112

``struct tcmu_tmr_entry`` is packed: tmr_type u8 @8, __pad1 @9, __pad2 u16 @10, cmd_cnt u32
@12, __pad3 u64 @16, __pad4 u64 @24, cmd_ids u16[] @32.

The mailbox: version u16 @0, flags u16 @2, cmdr_off u32 @4, cmdr_size u32 @8, cmd_head u32
@12, cmd_tail u32 @64 (____cacheline_aligned), sizeof 128.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest

from sgtarget.ring import abi
from sgtarget.ring.abi import MailboxFlag, Opcode, TmrType, UFlag


def test_constants() -> None:
    assert abi.TCMU_VERSION == "2.0"
    assert abi.MAILBOX_VERSION == 2
    assert abi.MAILBOX_SIZE == abi.CMDR_OFF == 128
    assert abi.MAILBOX_TAIL_OFF == 64
    assert abi.CMD_ENTRY_SIZE == 112
    assert abi.SENSE_BUFFERSIZE == 96
    assert abi.HDR.size == 8
    assert [int(f) for f in MailboxFlag] == [1, 2, 4, 8]
    assert (Opcode.PAD, Opcode.CMD, Opcode.TMR) == (0, 1, 2)
    assert (UFlag.UNKNOWN_OP, UFlag.READ_LEN, UFlag.KEEP_BUF) == (1, 2, 4)
    assert {t.name: int(t) for t in TmrType} == {
        "UNKNOWN": 0,
        "ABORT_TASK": 1,
        "ABORT_TASK_SET": 2,
        "CLEAR_ACA": 3,
        "CLEAR_TASK_SET": 4,
        "LUN_RESET": 5,
        "TARGET_WARM_RESET": 6,
        "TARGET_COLD_RESET": 7,
        "LUN_RESET_PRO": 128,
    }


def test_mailbox_golden() -> None:
    flags = MailboxFlag.CAP_OOOC | MailboxFlag.CAP_READ_LEN | MailboxFlag.CAP_TMR
    want = bytearray(128)
    struct.pack_into("<H", want, 0, 2)
    struct.pack_into("<H", want, 2, 7)
    struct.pack_into("<I", want, 4, 128)
    struct.pack_into("<I", want, 8, 8 * 1024 * 1024)
    got = bytearray(b"\xff" * 128)
    abi.pack_mailbox(got, int(flags), 8 * 1024 * 1024)
    assert got == want
    assert got.hex()[:32] == "02000700800000000000800000000000"


@pytest.mark.parametrize(
    ("n_iov", "cdb_len", "size"),
    [
        (0, 6, 120),  # 112 + 6 -> 118 -> 120
        (1, 16, 128),  # max(64, 112) + 16
        (4, 16, 128),  # 48 + 64 = 112 exactly
        (5, 16, 144),  # 48 + 80 = 128, + 16
        (5, 10, 144),  # 128 + 10 -> 138 -> 144
        (8, 32, 208),  # 176 + 32
        (2, 12, 128),  # 112 + 12 = 124 -> 128
    ],
)
def test_cmd_entry_size(n_iov: int, cdb_len: int, size: int) -> None:
    assert abi.cmd_entry_size(n_iov, cdb_len) == size
    assert size % 8 == 0


@pytest.mark.parametrize(("n", "size"), [(0, 32), (1, 40), (4, 40), (5, 48), (8, 48), (9, 56)])
def test_tmr_entry_size(n: int, size: int) -> None:
    assert abi.tmr_entry_size(n) == size  # 32 + 2n rounded up to 8


def test_len_op_helpers() -> None:
    lo = abi.make_len_op(128, Opcode.CMD)
    assert lo == 0x81
    assert abi.len_op_length(lo) == 128
    assert abi.len_op_op(lo) == Opcode.CMD
    assert abi.set_op(lo, Opcode.TMR) == 0x82
    assert abi.set_len(lo, 256) == 0x101
    assert abi.len_op_length(0xFFFFFFFF) == 0xFFFFFFF8
    assert abi.len_op_op(0xFFFFFFFF) == 7
    with pytest.raises(ValueError, match="multiple"):
        abi.make_len_op(12, Opcode.CMD)


def test_cmd_entry_golden() -> None:
    """READ(16) with two data-in iovecs and one bidi iovec, at ring position 256."""
    cdb = bytes.fromhex("88 00 0000000000001000 00000010 00 00".replace(" ", ""))
    assert len(cdb) == 16
    pos = abi.CMDR_OFF + 256
    iovs = [(0x10000, 4096), (0x30000, 4096)]
    bidi = [(0x50000, 512)]
    n = 3
    length = 128  # max(48 + 48, 112) + 16
    want = bytearray(1024)
    struct.pack_into("<I", want, pos + 0, length | 1)  # len_op
    struct.pack_into("<H", want, pos + 4, 77)  # cmd_id
    struct.pack_into("<I", want, pos + 8, 2)  # iov_cnt
    struct.pack_into("<I", want, pos + 12, 1)  # iov_bidi_cnt
    struct.pack_into("<I", want, pos + 16, 0)  # iov_dif_cnt
    struct.pack_into("<Q", want, pos + 24, pos + 112)  # cdb_off, from the map start
    for i, (base, ln) in enumerate(iovs + bidi):
        struct.pack_into("<QQ", want, pos + 48 + 16 * i, base, ln)
    want[pos + 112 : pos + 128] = cdb
    got = bytearray(b"\xa5" * 1024)
    got[:pos] = want[:pos]
    got[pos + length :] = want[pos + length :]
    assert abi.pack_cmd_entry(got, pos, cmd_id=77, cdb=cdb, iovs=iovs, bidi_iovs=bidi) == length
    assert got == want
    assert abi.cmd_entry_size(n, 16) == length


def test_cmd_entry_many_iovs_golden() -> None:
    """Ten iovecs push the CDB past the 112-byte minimum: base 48 + 160 = 208."""
    iovs = [(i * 4096, 4096) for i in range(10)]
    cdb = bytes([0x28]) + bytes(9)  # READ(10)
    want = bytearray(512)
    struct.pack_into("<IHBB", want, 0, 224 | 1, 5, 0, 0)
    struct.pack_into("<III", want, 8, 10, 0, 0)
    struct.pack_into("<Q", want, 24, 208)
    for i, (b, ln) in enumerate(iovs):
        struct.pack_into("<QQ", want, 48 + 16 * i, b, ln)
    want[208:218] = cdb
    got = bytearray(512)
    assert abi.pack_cmd_entry(got, 0, cmd_id=5, cdb=cdb, iovs=iovs) == 224
    assert got == want


def test_response_golden() -> None:
    sense = bytes([0x70, 0, 0x03, 0, 0, 0, 0, 10]) + bytes(10)
    entry = bytearray(b"\x11" * 128)
    struct.pack_into("<I", entry, 0, 128 | 1)
    want = bytearray(entry)
    struct.pack_into("<H", want, 4, 9)  # cmd_id rewritten
    want[7] = UFlag.READ_LEN  # uflags
    want[8] = 0x02  # scsi_status
    want[9:12] = bytes(3)  # pads
    struct.pack_into("<I", want, 12, 4096)  # read_len
    want[16:112] = sense + bytes(96 - len(sense))
    abi.pack_response(entry, 0, cmd_id=9, status=0x02, sense=sense, read_len=4096)
    assert entry == want
    assert entry[112:] == b"\x11" * 16  # the CDB area past the union is not touched
    with pytest.raises(ValueError, match="sense"):
        abi.pack_response(entry, 0, cmd_id=9, status=2, sense=bytes(97))


def test_unknown_op_response_flags() -> None:
    entry = bytearray(112)
    abi.pack_response(entry, 0, cmd_id=1, status=0, unknown_op=True)
    assert entry[7] == UFlag.UNKNOWN_OP
    abi.pack_response(entry, 0, cmd_id=1, status=0, unknown_op=True, read_len=0)
    assert entry[7] == UFlag.UNKNOWN_OP | UFlag.READ_LEN


def test_tmr_entry_golden() -> None:
    ids = [3, 0x1234, 65535]
    want = bytearray(64)
    struct.pack_into("<IHBB", want, 8, 40 | 2, 0, 0, 0)
    want[16] = TmrType.LUN_RESET  # tmr_type @8
    struct.pack_into("<I", want, 8 + 12, 3)  # cmd_cnt @12
    struct.pack_into("<3H", want, 8 + 32, *ids)  # cmd_ids @32
    got = bytearray(b"\xee" * 64)
    got[:8] = want[:8]
    got[48:] = want[48:]
    assert abi.pack_tmr_entry(got, 8, TmrType.LUN_RESET, ids) == 40
    assert got == want


def test_pad_entry_golden() -> None:
    buf = bytearray(b"\x77" * 64)
    abi.pack_pad_entry(buf, 16, 48)
    assert buf[16:24] == struct.pack("<IHBB", 48, 0, 0, 0)
    assert buf[24:] == b"\x77" * 40


@pytest.mark.parametrize(
    ("cdb", "n"),
    [
        (b"\x00", 6),  # TEST UNIT READY, group 0
        (b"\x28", 10),  # READ(10), group 1
        (b"\x5a", 10),  # MODE SENSE(10), group 2
        (b"\x60", 12),  # group 3 (reserved)
        (b"\x88", 16),  # READ(16), group 4
        (b"\xa8", 12),  # READ(12), group 5
        (b"\xc0", 10),  # vendor, group 6
        (b"\xe0", 10),  # vendor, group 7
        (b"\x7f\x00\x00\x00\x00\x00\x00\x18", 32),  # variable length: 8 + 24
    ],
)
def test_cdb_length(cdb: bytes, n: int) -> None:
    assert abi.cdb_length(cdb) == n


def test_sense_length() -> None:
    assert abi.sense_length(bytes([0x70, 0, 5, 0, 0, 0, 0, 10])) == 18
    assert abi.sense_length(bytes([0xF0, 0, 5, 0, 0, 0, 0, 10])) == 18  # VALID bit
    assert abi.sense_length(bytes([0x72, 5, 0x24, 0, 0, 0, 0, 0])) == 8
    assert abi.sense_length(bytes([0x73, 0, 0, 0, 0, 0, 0, 200])) == 208
    assert abi.sense_length(bytes(8)) is None
    assert abi.sense_length(b"\x70") is None


def test_index_words_are_single_stores_across_processes() -> None:
    """cmd_head/cmd_tail stores are never seen half done by the other process.

    struct.pack_into zero-fills before it writes: a handler read cmd_head 0 mid-ring under
    load. A forked writer stores rising values until the reader has seen 1,000 of them change
    (on a busy machine the two may take turns on one CPU for a while); the reader must only
    ever see them rise.
    """
    shm = mmap.mmap(-1, abi.MAILBOX_SIZE, flags=mmap.MAP_SHARED)
    ctl_map = mmap.mmap(-1, 64, flags=mmap.MAP_SHARED)
    words = abi.index_words(memoryview(shm))
    ctl = memoryview(ctl_map).cast("Q")
    go, stop = 0, 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        deadline = time.monotonic() + 60
        while not ctl[go] and time.monotonic() < deadline:
            pass
        v = 8
        while not ctl[stop] and v < 1 << 40:
            words[abi.HEAD_WORD] = v
            v += 8
            if not v & 0xFFFF and time.monotonic() > deadline:
                break
        os._exit(0)
    try:
        prev = seen = 0
        ctl[go] = 1
        deadline = time.monotonic() + 60  # bounded; an idle machine needs milliseconds
        while seen < 1000:
            v = words[abi.HEAD_WORD]
            assert v >= prev, f"cmd_head went from {prev} to {v}: a torn or zero-filled store"
            seen += v != prev
            prev = v
            if not seen & 0x3F and time.monotonic() > deadline:
                break
        assert seen >= 1000, f"the reader saw only {seen} stores in 60 s"
    finally:
        ctl[stop] = 1
        os.waitpid(pid, 0)
        words.release()
        ctl.release()
        ctl_map.close()
        shm.close()
