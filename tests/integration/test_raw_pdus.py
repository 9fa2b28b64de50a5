"""Hand-built PDUs over a plain socket: what a buggy or hostile initiator can send.

Everything here is built from RFC 7143 by hand (no sgtarget code), so the codec under test
cannot agree with itself by accident.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .harness import StartTarget, Target, describe, require_tool, run

pytestmark = pytest.mark.integration

BHS = 48
RESERVED_TAG = 0xFFFFFFFF
OP_NOP_OUT, OP_SCSI_CMD, OP_LOGIN_REQ = 0x00, 0x01, 0x03
OP_NOP_IN, OP_LOGIN_RSP, OP_REJECT = 0x20, 0x23, 0x3F
IMMEDIATE, FINAL = 0x40, 0x80
IO_TIMEOUT = 5.0


def pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def bhs(opcode: int, flags: int, *, dsl: int = 0, rest: bytes = b"") -> bytes:
    """A 48-byte header: opcode, flags, DataSegmentLength; ``rest`` fills bytes 8..47."""
    head = bytes([opcode, flags, 0, 0, 0]) + dsl.to_bytes(3, "big")
    return head + rest.ljust(BHS - 8, b"\0")


@dataclass
class Pdu:
    header: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.header[0] & 0x3F

    def u32(self, offset: int) -> int:
        value: int = struct.unpack_from(">I", self.header, offset)[0]
        return value


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_pdu(sock: socket.socket) -> Pdu:
    """One PDU: the header, then DataSegmentLength bytes padded to 4 (no digests, no AHS)."""
    header = recv_exact(sock, BHS)
    ahs = header[4] * 4
    dsl = int.from_bytes(header[5:8], "big")
    body = recv_exact(sock, ahs + dsl + (-dsl % 4))
    return Pdu(header, body[ahs : ahs + dsl])


def closed_or_pdu(sock: socket.socket) -> Pdu | None:
    """The next PDU, or None if the target closed the connection."""
    try:
        return read_pdu(sock)
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            raise AssertionError("the target neither answered nor closed in time") from exc
        return None


def text_keys(data: bytes) -> dict[str, str]:
    keys = {}
    for pair in data.decode().split("\0"):
        key, _, value = pair.partition("=")
        if key:
            keys[key] = value
    return keys


@dataclass
class Session:
    sock: socket.socket
    cmdsn: int
    exp_statsn: int
    max_recv: int  # the target's MaxRecvDataSegmentLength: what we may send it


def login_request(iqn: str, *, cmdsn: int = 1, itt: int = 1, t_bit: bool = True) -> bytes:
    data = pad4(
        b"InitiatorName=iqn.2026-11.test:x\0SessionType=Normal\0" + f"TargetName={iqn}\0".encode()
    )
    unpadded = len(data.rstrip(b"\0")) + 1
    isid = bytes([0x80, 0x00, 0x00, 0x01, 0x02, 0x03])  # random-qualifier format
    rest = isid + struct.pack(">HIHHII", 0, itt, 1, 0, cmdsn, 0)
    # T=1, CSG=1 (operational), NSG=3 (full feature): no security stage.
    flags = (0x80 | 0x04 | 0x03) if t_bit else 0x04 | 0x03
    return bhs(IMMEDIATE | OP_LOGIN_REQ, flags, dsl=unpadded, rest=rest) + data


def connect(t: Target) -> socket.socket:
    sock = socket.create_connection((t.host, t.port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def login(t: Target) -> Session:
    """Reach the full feature phase with the smallest legal Login Request."""
    sock = connect(t)
    sock.sendall(login_request(t.iqn))
    keys: dict[str, str] = {}
    for _ in range(4):
        rsp = read_pdu(sock)
        assert rsp.opcode == OP_LOGIN_RSP, rsp
        assert rsp.header[36] == 0, f"login failed: class {rsp.header[36]} detail {rsp.header[37]}"
        keys.update(text_keys(rsp.data))
        if rsp.header[1] & 0x83 == 0x83:  # T=1, NSG=3: full feature phase
            break
        # The target wants another round (T=0): an empty request continues the stage.
        rest = rsp.header[8:14] + struct.pack(">HIHHII", 0, 1, 1, 0, 1, rsp.u32(24) + 1)
        sock.sendall(bhs(IMMEDIATE | OP_LOGIN_REQ, 0x87, rest=rest))
    else:
        raise AssertionError("login did not reach the full feature phase")
    assert struct.unpack_from(">H", rsp.header, 14)[0] != 0, "no TSIH for a new session"
    return Session(
        sock,
        cmdsn=rsp.u32(28),  # ExpCmdSN
        exp_statsn=rsp.u32(24) + 1,
        max_recv=int(keys.get("MaxRecvDataSegmentLength", "8192")),
    )


@pytest.fixture
def session(target: Target) -> Iterator[Session]:
    s = login(target)
    try:
        yield s
    finally:
        s.sock.close()


def nop_out(s: Session, itt: int, data: bytes, *, ttt: int = RESERVED_TAG) -> bytes:
    # Immediate: a ping does not consume a CmdSN.
    rest = bytes(8) + struct.pack(">IIII", itt, ttt, s.cmdsn, s.exp_statsn)
    return bhs(IMMEDIATE | OP_NOP_OUT, FINAL, dsl=len(data), rest=rest) + pad4(data)


def ping(s: Session, itt: int, data: bytes) -> Pdu:
    s.sock.sendall(nop_out(s, itt, data))
    rsp = read_pdu(s.sock)
    s.exp_statsn = rsp.u32(24) + 1
    return rsp


def assert_server_healthy(t: Target) -> None:
    assert t.alive(), f"sgtarget died (exit {t.proc.poll()})\n{t.stderr()}"
    cp = run([require_tool("iscsi-inq"), t.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    assert "Vendor:SGTARGET" in cp.stdout, describe(cp)
    assert "Traceback" not in t.stderr(), t.stderr()


# --------------------------------------------------------------------------- before login


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(bhs(0x3A, 0x80, rest=b"\x11" * 8), id="target-opcode-0x3a"),
        pytest.param(
            bhs(OP_SCSI_CMD, FINAL | 0x40, rest=bytes(8) + struct.pack(">IIII", 1, 512, 1, 0)),
            id="scsi-command",
        ),
        # A NOP-Out announcing 329,223 bytes of data it never sends (no AHS: byte 4 is 0).
        pytest.param(bytes([0, 1, 2, 3, 0, *range(5, 48)]), id="counting-bytes"),
    ],
)
def test_garbage_before_login(target: Target, garbage: bytes) -> None:
    with connect(target) as sock:
        sock.sendall(garbage)
        rsp = closed_or_pdu(sock)
        if rsp is not None:
            # RFC 7143 §11.13.5: an initiator error is status class 2.
            assert rsp.opcode == OP_LOGIN_RSP, rsp
            assert rsp.header[36] != 0, rsp
            assert closed_or_pdu(sock) is None, "connection stayed open after a failed login"
    assert_server_healthy(target)


def test_truncated_pdu_then_close(target: Target) -> None:
    for cut in (1, 20, 47, BHS + 10):
        with connect(target) as sock:
            sock.sendall(login_request(target.iqn)[:cut])
    assert_server_healthy(target)


def login_header(dsl: int) -> bytes:
    rest = bytes([0x80, 0, 0, 1, 2, 3]) + struct.pack(">HIHHII", 0, 1, 1, 0, 1, 0)
    return bhs(IMMEDIATE | OP_LOGIN_REQ, 0x87, dsl=dsl, rest=rest)


def assert_login_ends(sock: socket.socket) -> None:
    """A failed login ends the connection: an optional error PDU, then close."""
    rsp = closed_or_pdu(sock)
    if rsp is not None:
        assert rsp.opcode in (OP_LOGIN_RSP, OP_REJECT), rsp
        if rsp.opcode == OP_LOGIN_RSP:
            assert rsp.header[36] != 0, rsp
        try:
            after = closed_or_pdu(sock)
        except AssertionError:
            after = rsp  # still open, silent
        assert after is None, (
            f"connection left open in the login phase after a PDU with header "
            f"{rsp.header[:4].hex()}... (opcode {rsp.opcode:#04x})"
        )


def test_login_text_over_8192_ends_the_login(target: Target) -> None:
    # Login PDUs carry at most 8192 bytes (MaxRecvDataSegmentLength is not negotiated yet);
    # all announced bytes are sent, so the target has no reason to wait.
    with connect(target) as sock:
        sock.sendall(login_header(8196) + b"I" * 8196)
        assert_login_ends(sock)
    assert_server_healthy(target)


def test_login_announcing_16mib_is_refused_without_reading_it(target: Target) -> None:
    # The header alone shows the PDU is illegal; a target that waits for (or buffers) the
    # 16 MiB lets any peer hold a connection and bandwidth before it has even logged in.
    with connect(target) as sock:
        sock.sendall(login_header(0xFFFFFF) + b"Init")
        assert_login_ends(sock)
    assert_server_healthy(target)


# --------------------------------------------------------------------------- full feature phase


def test_nop_out_ping_is_echoed(session: Session) -> None:
    payload = b"sgtarget ping \x00\x01\x02 odd length"
    rsp = ping(session, 0x1234, payload)
    assert rsp.opcode == OP_NOP_IN, rsp
    assert rsp.header[1] & FINAL
    assert rsp.u32(16) == 0x1234, "ITT not echoed"
    assert rsp.u32(20) == RESERVED_TAG, "TTT of a ping answer must be 0xffffffff"
    assert rsp.data == payload
    empty = ping(session, 0x1235, b"")
    assert (empty.opcode, empty.u32(16), empty.data) == (OP_NOP_IN, 0x1235, b"")


def test_unknown_opcode_is_rejected(target: Target, session: Session) -> None:
    rest = bytes(8) + struct.pack(">IIII", 0x77, RESERVED_TAG, session.cmdsn, session.exp_statsn)
    header = bhs(IMMEDIATE | 0x0B, FINAL, rest=rest)  # 0x0b: no such initiator opcode
    session.sock.sendall(header)
    rsp = closed_or_pdu(session.sock)
    assert rsp is not None, "connection closed instead of a Reject"
    assert rsp.opcode == OP_REJECT, rsp
    assert rsp.header[2] in (0x04, 0x05), f"reject reason {rsp.header[2]:#04x}"
    assert rsp.u32(16) == RESERVED_TAG
    assert rsp.data == header, "a Reject carries the rejected header as its data"
    session.exp_statsn = rsp.u32(24) + 1
    # Command-not-supported leaves the connection usable; a protocol error may end it.
    after = closed_or_pdu_after_ping(session, 0x99)
    if rsp.header[2] == 0x04:
        assert after is not None, "connection closed after a command-not-supported Reject"
    if after is not None:
        assert (after.opcode, after.u32(16)) == (OP_NOP_IN, 0x99), after
    assert_server_healthy(target)


def closed_or_pdu_after_ping(s: Session, itt: int) -> Pdu | None:
    try:
        s.sock.sendall(nop_out(s, itt, b"again"))
    except OSError:
        return None
    return closed_or_pdu(s.sock)


def test_data_segment_over_max_recv_is_refused(target: Target, session: Session) -> None:
    too_long = session.max_recv + 4
    session.sock.sendall(nop_out(session, 0x42, b"\xee" * too_long))
    rsp = closed_or_pdu(session.sock)
    if rsp is not None:
        assert rsp.opcode == OP_REJECT, f"oversized PDU answered with opcode {rsp.opcode:#x}"
        assert rsp.header[2] in (0x04, 0x05, 0x09), f"reject reason {rsp.header[2]:#04x}"
    assert_server_healthy(target)


def test_target_pings_idle_initiator(sgtarget: StartTarget) -> None:
    interval = 0.5
    t = sgtarget("--lun", "ram:size=1M", nop_interval=interval)
    s = login(t)
    with s.sock:
        s.sock.settimeout(interval + 2.5)  # the interval plus generous timer slack
        for n in ("first", "second", "third"):
            try:
                nop = read_pdu(s.sock)
            except TimeoutError:
                pytest.fail(f"no {n} NOP-In ping within {interval + 2.5}s (interval {interval}s)")
            assert nop.opcode == OP_NOP_IN, nop
            assert nop.u32(16) == RESERVED_TAG, "a target ping has no ITT"
            ttt = nop.u32(20)
            assert ttt != RESERVED_TAG, "a target ping that wants an answer has a TTT"
            s.exp_statsn = nop.u32(24)  # a ping does not advance StatSN
            s.sock.sendall(nop_out(s, RESERVED_TAG, b"", ttt=ttt))
        # Answered pings keep the session alive and useful.
        rsp = ping(s, 7, b"x")
        while rsp.opcode == OP_NOP_IN and rsp.u32(16) == RESERVED_TAG:
            rsp = read_pdu(s.sock)
        assert (rsp.opcode, rsp.u32(16), rsp.data) == (OP_NOP_IN, 7, b"x")
    assert t.alive()


def test_bad_data_sn_fails_the_command_and_keeps_the_connection(session: Session) -> None:
    s = session
    # A new I_T nexus first gets its POWER ON unit attention: collect it with TEST UNIT READY.
    rest = bytes(8) + struct.pack(">IIII", 0x50, 0, s.cmdsn, s.exp_statsn)
    s.sock.sendall(bhs(0x01, 0x80 | 0x01, rest=rest))
    s.cmdsn += 1
    tur = read_pdu(s.sock)
    assert tur.opcode == 0x21, tur
    s.exp_statsn = tur.u32(24) + 1
    itt = 0x51
    cdb = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0]).ljust(16, b"\0")  # WRITE(10) LBA 8, 1 block
    # F=1, W=1, SIMPLE; LUN 0; EDTL 512; CmdSN; ExpStatSN; CDB.
    rest = bytes(8) + struct.pack(">IIII", itt, 512, s.cmdsn, s.exp_statsn) + cdb
    s.sock.sendall(bhs(0x01, 0x80 | 0x20 | 0x01, rest=rest))
    s.cmdsn += 1
    r2t = read_pdu(s.sock)
    assert r2t.opcode == 0x31, r2t  # InitialR2T defaults to Yes: the target solicits
    ttt = r2t.u32(20)
    # Data-Out with DataSN 5 where 0 is due.
    rest = bytes(8) + struct.pack(">IIIIIII", itt, ttt, 0, s.exp_statsn, 0, 5, 0)
    s.sock.sendall(bhs(0x05, FINAL, dsl=512, rest=rest) + bytes(512))
    rsp = read_pdu(s.sock)
    assert rsp.opcode == 0x21, rsp  # a SCSI Response, promptly: the command failed
    assert rsp.header[3] == 0x02  # CHECK CONDITION
    sense = rsp.data[2:]
    assert sense[2] & 0x0F == 0x0B  # ABORTED COMMAND: the initiator retries
    s.exp_statsn = rsp.u32(24) + 1
    # The connection carries on.
    assert ping(s, 0x52, b"still here").data == b"still here"
