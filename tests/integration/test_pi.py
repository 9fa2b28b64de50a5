"""PI-formatted LUNs through real initiators: libiscsi's tools report the format, QEMU round-trips
an image (target-generated and -checked tuples), and a raw initiator of our own moves tuples
interleaved with the data (WRPROTECT/RDPROTECT 1) through R2Ts and Data-In."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pi_oracle import crc16

from .harness import StartTarget, Target, describe, require_tool, run
from .test_raw_pdus import FINAL, Session, bhs, login, read_pdu

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def interleaved(blocks: list[bytes], first_ref: int) -> bytes:
    return b"".join(
        b + struct.pack(">HHI", crc16(b), 0, first_ref + i) for i, b in enumerate(blocks)
    )


def field(output: str, name: str) -> str:
    match = re.search(rf"{name}:\s*(\S+)", output)
    assert match is not None, output
    return match.group(1)


def test_tools_report_the_format(sgtarget: StartTarget, tmp_path: Path) -> None:
    rc16 = require_tool("iscsi-readcapacity16")
    inq = require_tool("iscsi-inq")
    t = sgtarget(
        "--lun", f"file:{tmp_path / 'a.img'},size=16M,pi=1",
        "--lun", "ram:size=16M,pi=2",
        "--lun", "ram:size=16M,pi=3,bs=4096",
        "--lun", "ram:size=16M,bs=4096",
    )  # fmt: skip
    expected = [("1", "0", "512"), ("1", "1", "512"), ("1", "2", "4096"), ("0", "0", "4096")]
    for lun, (prot_en, p_type, length) in enumerate(expected):
        cp = run([rc16, t.url(lun)], timeout=30)
        assert cp.returncode == 0, describe(cp)
        assert field(cp.stdout, "PROT_EN") == prot_en, cp.stdout
        assert field(cp.stdout, "P_TYPE") == p_type, cp.stdout
        assert field(cp.stdout, "LOGICAL BLOCK LENGTH IN BYTES") == length, cp.stdout
        cp = run([inq, t.url(lun)], timeout=30)
        assert cp.returncode == 0, describe(cp)
        assert field(cp.stdout, "Protect") == ("1" if lun < 3 else "0"), cp.stdout
    assert "PI type 1" in t.stdout()


@pytest.mark.parametrize("ring", ["", ",handler=copy,handler_pi=1"], ids=["target", "handler_pi"])
def test_qemu_img_round_trips_a_pi_lun(sgtarget: StartTarget, tmp_path: Path, ring: str) -> None:
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "pi.img"
    source = tmp_path / "source.img"
    source.write_bytes(bytes(range(256)) * (32 * MiB // 256))
    with source.open("r+b") as f:  # not one repeated block: a misplaced block would show
        for i in range(0, 32 * MiB, MiB):
            f.seek(i)
            f.write(i.to_bytes(8, "big"))
    t = sgtarget("--lun", f"file:{image},size=32M,pi=1{ring}")
    cp = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), t.url()], 300)
    assert cp.returncode == 0, describe(cp)
    cp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), t.url()], 300)
    assert cp.returncode == 0, describe(cp)
    # The sidecar holds each block's tuple, stored inverted: guard, app tag 0, ref tag = LBA.
    t.stop()
    sidecar = (tmp_path / "pi.img.pi").read_bytes()
    data = source.read_bytes()
    for lba in (0, 1, 4095, 65535):
        stored = bytes(255 - b for b in sidecar[lba * 8 : lba * 8 + 8])
        block = data[lba * 512 : (lba + 1) * 512]
        assert stored == struct.pack(">HHI", crc16(block), 0, lba)


# ---- a raw initiator moving tuples ------------------------------------------------------------


class Initiator:
    """SCSI commands over a raw session: R2Ts answered, Data-In gathered (no digests)."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.itt = 0x100

    def command(
        self, cdb: bytes, edtl: int, data_out: bytes = b"", *, lun: int = 0
    ) -> tuple[int, bytes, bytes]:
        """``(status, sense, data_in)``."""
        s = self.s
        self.itt += 1
        itt = self.itt
        flags = FINAL | (0x20 if data_out else 0x40 if edtl else 0) | 0x01
        lun_field = bytes([0, lun]) + bytes(6)  # peripheral device addressing
        rest = lun_field + struct.pack(">IIII", itt, edtl, s.cmdsn, s.exp_statsn)
        s.sock.sendall(bhs(0x01, flags, rest=rest + cdb.ljust(16, b"\0")))
        s.cmdsn += 1
        data_in = bytearray(edtl if not data_out else 0)
        while True:
            pdu = read_pdu(s.sock)
            op = pdu.opcode
            if op == 0x31:  # R2T: send what it asks for in MaxRecvDataSegmentLength pieces
                ttt, offset, length = pdu.u32(20), pdu.u32(40), pdu.u32(44)
                for sn, pos in enumerate(range(offset, offset + length, s.max_recv)):
                    chunk = data_out[pos : min(pos + s.max_recv, offset + length)]
                    last = pos + len(chunk) >= offset + length
                    hdr = lun_field + struct.pack(">IIIIIII", itt, ttt, 0, s.exp_statsn, 0, sn, pos)
                    pad = b"\0" * (-len(chunk) % 4)
                    s.sock.sendall(
                        bhs(0x05, FINAL if last else 0, dsl=len(chunk), rest=hdr) + chunk + pad
                    )
            elif op == 0x25:  # Data-In
                offset = pdu.u32(40)
                data_in[offset : offset + len(pdu.data)] = pdu.data
                if pdu.header[1] & 0x01:  # S: status in the last Data-In
                    s.exp_statsn = pdu.u32(24) + 1
                    return pdu.header[3], b"", bytes(data_in)
            elif op == 0x21:  # SCSI Response
                s.exp_statsn = pdu.u32(24) + 1
                sense = pdu.data[2 : 2 + int.from_bytes(pdu.data[:2], "big")] if pdu.data else b""
                return pdu.header[3], sense, bytes(data_in)
            else:
                raise AssertionError(f"unexpected PDU {pdu}")


@pytest.fixture(params=["ram", "handler", "handler_pi"])
def initiator(
    request: pytest.FixtureRequest, sgtarget: StartTarget, tmp_path: Path
) -> Iterator[Initiator]:
    """LUN 0: 512-byte blocks, LUN 1: 4096, both type 1; in memory, or files served by
    handler processes: PI kept by the target (the handlers see data only), or with
    ``handler_pi=1`` stored by the handlers (tuples travel as the ring's dif iovecs)."""
    if request.param == "ram":
        luns = ["ram:size=16M,pi=1", "ram:size=16M,pi=1,bs=4096"]
    elif request.param == "handler":
        luns = [
            f"file:{tmp_path / 'a.img'},size=16M,pi=1,handler=zerocopy",
            f"file:{tmp_path / 'b.img'},size=16M,pi=1,bs=4096,handler=copy",
        ]
    else:
        luns = [
            f"file:{tmp_path / 'a.img'},size=16M,pi=1,handler=isolated,handler_pi=1",
            f"file:{tmp_path / 'b.img'},size=16M,pi=1,bs=4096,handler=zerocopy,handler_pi=1",
        ]
    t: Target = sgtarget("--lun", luns[0], "--lun", luns[1])
    s = login(t)
    try:
        ini = Initiator(s)
        for lun in (0, 1):  # each LU's power-on unit attention
            status, _, _ = ini.command(bytes(6), 0, lun=lun)
            assert status == 0x02
        yield ini
    finally:
        s.sock.close()


def rw10(op: int, lba: int, n: int, protect: int) -> bytes:
    return bytes([op, protect << 5]) + struct.pack(">IBHB", lba, 0, n, 0)


def test_tuples_written_are_read_back_and_bad_ones_refused(initiator: Initiator) -> None:
    ini = initiator
    bs, n, lba = 512, 40, 1000
    blocks = [bytes([i]) * 200 + bytes(range(256)) + bytes(56) for i in range(n)]
    wire = interleaved(blocks, lba)
    assert len(wire) == n * (bs + 8)  # 20800 bytes: R2Ts and several Data-Outs
    status, sense, _ = ini.command(rw10(0x2A, lba, n, 1), len(wire), wire)
    assert status == 0, sense.hex()
    status, sense, data = ini.command(rw10(0x28, lba, n, 1), len(wire))
    assert status == 0, sense.hex()
    assert data == wire
    # RDPROTECT 0: data only.
    status, sense, data = ini.command(rw10(0x28, lba, n, 0), n * bs)
    assert status == 0, sense.hex()
    assert data == b"".join(blocks)
    # A bad guard in block 17: ABORTED COMMAND 10/01, LBA in INFORMATION, medium unchanged.
    bad = bytearray(interleaved([bytes(bs)] * n, lba))
    bad[17 * (bs + 8)] ^= 0xFF
    status, sense, _ = ini.command(rw10(0x2A, lba, n, 1), len(bad), bytes(bad))
    assert status == 0x02
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x0B, 0x10, 0x01)
    assert int.from_bytes(sense[3:7], "big") == lba + 17
    status, _, data = ini.command(rw10(0x28, lba, n, 1), len(wire))
    assert status == 0
    assert data == wire


def test_4096_byte_blocks_with_tuples(initiator: Initiator) -> None:
    ini = initiator
    bs, n, lba = 4096, 5, 33
    blocks = [bytes([0xA0 + i]) * 1000 + bytes(range(256)) * 12 + bytes(24) for i in range(n)]
    wire = interleaved(blocks, lba)
    status, sense, _ = ini.command(rw10(0x2A, lba, n, 1), len(wire), wire, lun=1)
    assert status == 0, sense.hex()
    status, sense, data = ini.command(rw10(0x28, lba, n, 1), len(wire), lun=1)
    assert status == 0, sense.hex()
    assert data == wire
    # Reference tag one off in the last block: 10/03 at its LBA.
    bad = interleaved(blocks[:4], lba) + interleaved(blocks[4:], lba + 5)
    status, sense, _ = ini.command(rw10(0x2A, lba, n, 1), len(bad), bad, lun=1)
    assert status == 0x02
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (0x0B, 0x10, 0x03)
    assert int.from_bytes(sense[3:7], "big") == lba + 4
    # A block written without tuples (WRPROTECT 0) gets generated ones.
    status, sense, _ = ini.command(rw10(0x2A, 100, 1, 0), bs, blocks[0], lun=1)
    assert status == 0, sense.hex()
    status, sense, data = ini.command(rw10(0x28, 100, 1, 1), bs + 8, lun=1)
    assert status == 0, sense.hex()
    assert data == interleaved(blocks[:1], 100)


def command32(ini: Initiator, cdb: bytes, edtl: int, data_out: bytes = b"") -> tuple[int, bytes]:
    """A 32-byte CDB: bytes 16..31 in an Extended CDB AHS (RFC 7143 11.3.1.2); R2Ts answered
    by sending everything asked for in one Data-Out per R2T (the data here is small)."""
    s = ini.s
    ini.itt += 1
    itt = ini.itt
    flags = FINAL | (0x20 if data_out else 0x40) | 0x01
    rest = bytes(8) + struct.pack(">IIII", itt, edtl, s.cmdsn, s.exp_statsn) + cdb[:16]
    header = bytearray(bhs(0x01, flags, rest=rest))
    header[4] = 5  # TotalAHSLength in words: 2 + 1 + 1 + 16 bytes
    ahs = struct.pack(">HBx", 17, 0x01) + cdb[16:32]
    s.sock.sendall(bytes(header) + ahs)
    s.cmdsn += 1
    data_in = bytearray(edtl if not data_out else 0)
    while True:
        pdu = read_pdu(s.sock)
        if pdu.opcode == 0x31:
            ttt, offset, length = pdu.u32(20), pdu.u32(40), pdu.u32(44)
            assert length <= s.max_recv
            hdr = bytes(8) + struct.pack(">IIIIIII", itt, ttt, 0, s.exp_statsn, 0, 0, offset)
            chunk = data_out[offset : offset + length]
            s.sock.sendall(bhs(0x05, FINAL, dsl=len(chunk), rest=hdr) + chunk)
        elif pdu.opcode == 0x25:
            data_in[pdu.u32(40) : pdu.u32(40) + len(pdu.data)] = pdu.data
            if pdu.header[1] & 0x01:
                s.exp_statsn = pdu.u32(24) + 1
                return pdu.header[3], bytes(data_in)
        else:
            assert pdu.opcode == 0x21, pdu
            s.exp_statsn = pdu.u32(24) + 1
            return pdu.header[3], pdu.data


def rw32(sa: int, lba: int, n: int, protect: int, ref: int) -> bytes:
    cdb = bytearray(32)
    cdb[0], cdb[7] = 0x7F, 0x18
    cdb[8:10] = sa.to_bytes(2, "big")
    cdb[10] = protect << 5
    cdb[12:20] = lba.to_bytes(8, "big")
    struct.pack_into(">IHH", cdb, 20, ref, 0, 0)
    cdb[28:32] = n.to_bytes(4, "big")
    return bytes(cdb)


def test_type2_32_byte_cdbs_over_iscsi(sgtarget: StartTarget) -> None:
    t = sgtarget("--lun", "ram:size=16M,pi=2")
    s = login(t)
    try:
        ini = Initiator(s)
        assert ini.command(bytes(6), 0)[0] == 0x02  # the power-on unit attention
        blocks = [bytes([i]) * 512 for i in range(4)]
        wire = interleaved(blocks, 0x7000)
        status, sense = command32(ini, rw32(0x000B, 9, 4, 1, 0x7000), len(wire), wire)
        assert status == 0, sense.hex()
        status, data = command32(ini, rw32(0x0009, 9, 4, 1, 0x7000), len(wire))
        assert status == 0, data.hex()
        assert data == wire
    finally:
        s.sock.close()


def test_a_checked_write_bigger_than_the_pool_gets_task_set_full(sgtarget: StartTarget) -> None:
    """A WRITE with WRPROTECT holds its whole Data-Out until every tuple is checked: one that
    could never fit the pool is TASK SET FULL at once (it used to wait for memory for ever),
    and the LUN goes on serving checked writes that fit."""
    t = sgtarget("--pool", "4M", "--lun", "ram:size=16M,pi=1")
    s = login(t)
    try:
        ini = Initiator(s)
        assert ini.command(bytes(6), 0)[0] == 0x02  # the power-on unit attention
        n = 8192  # 4 MiB of data + 64 KiB of tuples: more than the 4 MiB pool
        cdb = bytes([0x2A, 1 << 5]) + struct.pack(">IBHB", 0, 0, n, 0)
        status, _, _ = ini.command(cdb, n * 520, bytes(n * 520))
        assert status == 0x28  # TASK SET FULL
        blocks = [bytes([i]) * 512 for i in range(64)]
        wire = interleaved(blocks, 0)
        status, sense, _ = ini.command(rw10(0x2A, 0, 64, 1), len(wire), wire)
        assert status == 0, sense.hex()
        status, sense, data = ini.command(rw10(0x28, 0, 64, 1), len(wire))
        assert (status, data) == (0, wire), sense.hex()
    finally:
        s.sock.close()
