"""Persistent reservations over two hand-built iSCSI sessions: PREEMPT AND ABORT and APTPL."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from .harness import StartTarget, Target
from .test_raw_pdus import (
    FINAL,
    IMMEDIATE,
    OP_LOGIN_REQ,
    OP_LOGIN_RSP,
    Pdu,
    Session,
    bhs,
    connect,
    pad4,
    read_pdu,
)

pytestmark = pytest.mark.integration

OP_SCSI_RSP, OP_R2T = 0x21, 0x31
EA, WE = 3, 1


def login(t: Target, isid_tail: int) -> Session:
    """Full feature phase as initiator iqn.2026-11.test:pr with its own ISID (own I_T nexus)."""
    sock = connect(t)
    data = pad4(
        b"InitiatorName=iqn.2026-11.test:pr\0SessionType=Normal\0"
        + f"TargetName={t.iqn}\0".encode()
    )
    isid = bytes([0x80, 0, 0, 0, 0, isid_tail])
    rest = isid + struct.pack(">HIHHII", 0, 1, 1, 0, 1, 0)
    dsl = len(data.rstrip(b"\0")) + 1
    sock.sendall(bhs(IMMEDIATE | OP_LOGIN_REQ, 0x87, dsl=dsl, rest=rest) + data)
    rsp = read_pdu(sock)
    assert rsp.opcode == OP_LOGIN_RSP, rsp
    assert rsp.header[36] == 0, rsp
    assert rsp.header[1] & 0x83 == 0x83, "expected the full feature phase in one round"
    return Session(sock, cmdsn=rsp.u32(28), exp_statsn=rsp.u32(24) + 1, max_recv=8192)


def command(
    s: Session, itt: int, cdb: bytes, *, edtl: int = 0, data: bytes = b"", write: bool = False
) -> None:
    """Send a SCSI Command (immediate data if ``data``)."""
    flags = FINAL | (0x20 if write else 0x40 if edtl else 0) | 0x01  # SIMPLE
    rest = bytes(8) + struct.pack(">IIII", itt, edtl, s.cmdsn, s.exp_statsn) + cdb.ljust(16, b"\0")
    s.sock.sendall(bhs(0x01, flags, dsl=len(data), rest=rest) + pad4(data))
    s.cmdsn += 1


def response(s: Session, itt: int) -> Pdu:
    """The SCSI Response for ``itt`` (Data-In before it is skipped)."""
    while True:
        rsp = read_pdu(s.sock)
        if rsp.opcode == OP_SCSI_RSP:
            assert rsp.u32(16) == itt, f"response for {rsp.u32(16):#x}, expected {itt:#x}"
            s.exp_statsn = rsp.u32(24) + 1
            return rsp
        assert rsp.opcode == 0x25, rsp  # Data-In


def run(s: Session, itt: int, cdb: bytes, **kw: object) -> tuple[int, bytes]:
    command(s, itt, cdb, **kw)  # type: ignore[arg-type]
    rsp = response(s, itt)
    return rsp.header[3], rsp.data[2:]


def prout(
    s: Session, itt: int, sa: int, rk: int, sark: int, *, type_: int = 0, flags: int = 0
) -> int:
    cdb = bytes([0x5F, sa, type_, 0, 0, 0, 0, 0, 24, 0])
    params = struct.pack(">QQ4xBx2x", rk, sark, flags)
    status, _ = run(s, itt, cdb, edtl=24, data=params, write=True)
    return status


def read_keys(s: Session, itt: int) -> bytes:
    command(s, itt, bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), edtl=4096)
    data = b""
    while True:
        rsp = read_pdu(s.sock)
        if rsp.opcode == 0x25:
            data += rsp.data
            if rsp.header[1] & 0x01:  # S bit: status in the Data-In
                s.exp_statsn = rsp.u32(24) + 1
                return data
            continue
        assert rsp.opcode == OP_SCSI_RSP, rsp
        assert rsp.header[3] == 0, rsp
        s.exp_statsn = rsp.u32(24) + 1
        return data


TUR = bytes(6)


def test_preempt_and_abort_aborts_the_preempted_write(sgtarget: StartTarget) -> None:
    t = sgtarget("--lun", "ram:size=16M")
    a, b = login(t, 1), login(t, 2)
    try:
        for s in (a, b):
            assert run(s, 0x10, TUR)[0] == 0x02  # POWER ON unit attention
        assert prout(a, 0x11, 0, 0, 0xA) == 0
        assert prout(b, 0x11, 0, 0, 0xB) == 0
        assert prout(b, 0x12, 1, 0xB, 0, type_=WE) == 0
        # B starts a WRITE(10) of LBA 0; the target solicits its data and waits.
        command(b, 0x13, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), edtl=512, write=True)
        r2t = read_pdu(b.sock)
        assert r2t.opcode == OP_R2T, r2t
        assert prout(a, 0x12, 5, 0xA, 0xB, type_=EA) == 0  # PREEMPT AND ABORT
        # B's data arrives too late: the command was aborted and must not write.
        rest = bytes(8) + struct.pack(">IIIIIII", 0x13, r2t.u32(20), 0, b.exp_statsn, 0, 0, 0)
        b.sock.sendall(bhs(0x05, FINAL, dsl=512, rest=rest) + b"\x5a" * 512)
        status, sense = run(b, 0x14, TUR)
        assert (status, sense[2] & 0x0F, sense[12], sense[13]) == (0x02, 0x6, 0x2A, 0x05)
        assert run(b, 0x15, TUR)[0] == 0x00  # TEST UNIT READY passes EXCLUSIVE ACCESS
        command(a, 0x13, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), edtl=512)
        data = b""
        while True:
            rsp = read_pdu(a.sock)
            if rsp.opcode == 0x25:
                data += rsp.data
                if rsp.header[1] & 0x01:
                    break
            else:
                assert rsp.opcode == OP_SCSI_RSP, rsp
                assert rsp.header[3] == 0, rsp
                break
        assert data == bytes(512), "the aborted WRITE reached the medium"
    finally:
        a.sock.close()
        b.sock.close()
    assert t.alive()


def test_aptpl_survives_a_restart(sgtarget: StartTarget, tmp_path: Path) -> None:
    image = tmp_path / "pr.img"
    t = sgtarget("--lun", f"file:{image},size=16M")
    a = login(t, 1)
    try:
        assert run(a, 0x10, TUR)[0] == 0x02
        assert prout(a, 0x11, 0, 0, 0x1234, flags=0x01) == 0  # REGISTER, APTPL
        before = read_keys(a, 0x12)
    finally:
        a.sock.close()
    t.assert_clean_stop()
    assert (tmp_path / "pr.img.pr.json").exists()
    t = sgtarget("--lun", f"file:{image}")
    a = login(t, 1)
    try:
        run(a, 0x10, TUR)
        assert read_keys(a, 0x11) == before
        assert before[8:16] == (0x1234).to_bytes(8, "big")
    finally:
        a.sock.close()
