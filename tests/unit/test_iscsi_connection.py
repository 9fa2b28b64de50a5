"""The sans-I/O connection: login, full feature phase, data movement, malformed input."""

from __future__ import annotations

import os
import struct

import pytest

from sgtarget.datapath import Pool, PoolExhausted
from sgtarget.iscsi import pdu
from sgtarget.iscsi.conn_states import ConnState
from sgtarget.iscsi.connection import (
    CloseConnection,
    CommandAborted,
    CommandReady,
    DataFailed,
    DataReady,
    LoginComplete,
    MemoryWanted,
    TmfRequest,
    UnsolicitedDropped,
)
from sgtarget.iscsi.keys import parse_text
from sgtarget.iscsi.session import Command, sn_le, sn_lt

from .iscsi_peer import INITIATOR, TARGET, Peer, login_request, make_bhs

READ10_1BLOCK = bytes.fromhex("28000000000000000100")


def assert_closed(peer: Peer) -> None:
    """Separate function: mypy narrows ``conn.state`` across calls that change it."""
    assert peer.conn.state is ConnState.CLOSED
    assert any(isinstance(e, CloseConnection) for e in peer.take_events())


def logged_in(extra: list[tuple[str, str]] | None = None, **kw: object) -> Peer:
    peer = Peer(**kw)  # type: ignore[arg-type]
    peer.login(extra)
    assert peer.conn.state is ConnState.FULL_FEATURE
    peer.take_events()
    return peer


# ---- login -----------------------------------------------------------------------------------


def test_login_normal_session() -> None:
    peer = Peer()
    resp = peer.login([("MaxRecvDataSegmentLength", "8192")])
    hdr = resp.hdr
    assert hdr.transit
    assert (hdr.csg, hdr.nsg) == (1, 3)
    assert hdr.tsih != 0
    assert hdr.itt == 1
    assert hdr.w7 == 1  # ExpCmdSN = the login's CmdSN
    keys = dict(parse_text(resp.data))
    assert keys["TargetPortalGroupTag"] == "1"
    assert int(keys["MaxRecvDataSegmentLength"]) >= 512
    (ev,) = peer.take_events()
    assert isinstance(ev, LoginComplete)
    assert ev.session.initiator_name == INITIATOR
    assert ev.session.target_name == TARGET


def test_login_trickled_one_byte_at_a_time_matches_bulk() -> None:
    req = login_request([("InitiatorName", INITIATOR), ("TargetName", TARGET)])
    bulk, trickled = Peer(), Peer()
    bulk.send(req)
    trickled.send(req, trickle=True)
    a = bulk.conn.take_output()[0]
    b = trickled.conn.take_output()[0]
    assert b"".join(bytes(x) for x in a) == b"".join(bytes(x) for x in b)
    assert trickled.conn.state is ConnState.FULL_FEATURE


def _login_status(pairs: list[tuple[str, str]], **kw: int) -> tuple[int, Peer]:
    peer = Peer()
    peer.send(login_request(pairs, **kw))  # type: ignore[arg-type]
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.LOGIN_RESPONSE
    return resp.hdr.w9 >> 16, peer


@pytest.mark.parametrize(
    ("pairs", "kw", "status"),
    [
        ([("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.nope:x")], {}, 0x0203),
        ([("TargetName", TARGET)], {}, 0x0207),
        ([("InitiatorName", INITIATOR)], {}, 0x0207),
        ([("InitiatorName", INITIATOR), ("TargetName", TARGET)], {"version_min": 1}, 0x0205),
        ([("InitiatorName", INITIATOR), ("TargetName", TARGET)], {"csg": 3}, 0x020B),
        ([("InitiatorName", INITIATOR), ("TargetName", TARGET)], {"nsg": 2}, 0x020B),
        ([("InitiatorName", INITIATOR), ("TargetName", TARGET)], {"tsih": 9}, 0x020A),
    ],
)
def test_login_failures_answer_status_and_close(
    pairs: list[tuple[str, str]], kw: dict[str, int], status: int
) -> None:
    got, peer = _login_status(pairs, **kw)
    assert got == status
    assert peer.conn.state is ConnState.CLOSED
    assert any(isinstance(e, CloseConnection) for e in peer.take_events())


def test_login_through_security_stage() -> None:
    peer = Peer()
    peer.send(
        login_request(
            [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "None")],
            csg=0,
            nsg=1,
        )
    )
    (resp,) = peer.received()
    assert resp.hdr.w9 == 0
    assert resp.hdr.transit
    assert (resp.hdr.csg, resp.hdr.nsg) == (0, 1)
    assert dict(parse_text(resp.data))["AuthMethod"] == "None"
    peer.send(login_request([("HeaderDigest", "None")], csg=1, nsg=3))
    (resp,) = peer.received()
    assert resp.hdr.w9 == 0
    assert resp.hdr.tsih != 0
    assert peer.conn.state is ConnState.FULL_FEATURE


def test_discovery_send_targets() -> None:
    peer = Peer()
    peer.login(session_type="Discovery")
    data = b"SendTargets=All\0"
    bhs = make_bhs(0x04, immediate=True, b1=0x80, dsl=len(data), itt=7, words=(0xFFFFFFFF, 1, 0))
    peer.send(peer.frame(bhs, data))
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.TEXT_RESPONSE
    assert resp.hdr.itt == 7
    assert resp.hdr.final
    assert parse_text(resp.data) == [("TargetName", TARGET), ("TargetAddress", "127.0.0.1:3260,1")]


def test_discovery_session_rejects_scsi_commands() -> None:
    peer = Peer()
    peer.login(session_type="Discovery")
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True)
    (rej,) = peer.received()
    assert rej.opcode == pdu.Opcode.REJECT
    assert rej.hdr.b2 == pdu.RejectReason.PROTOCOL_ERROR
    assert not peer.ready_commands()


# ---- digests ---------------------------------------------------------------------------------


def nop_out(itt: int, data: bytes = b"", *, cmdsn: int = 1) -> tuple[bytes, bytes]:
    return make_bhs(
        0x00, immediate=True, b1=0x80, dsl=len(data), itt=itt, words=(0xFFFFFFFF, cmdsn, 0)
    ), data


def test_nop_ping_is_echoed() -> None:
    peer = logged_in()
    bhs, data = nop_out(0x42, b"hello ping")
    peer.send(peer.frame(bhs, data))
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.NOP_IN
    assert resp.hdr.itt == 0x42
    assert resp.hdr.ttt == 0xFFFFFFFF
    assert resp.data == b"hello ping"


def test_digests_negotiated_and_checked() -> None:
    peer = logged_in([("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")])
    assert peer.header_digest
    assert peer.data_digest
    bhs, data = nop_out(0x43, b"abc")
    peer.send(peer.frame(bhs, data))
    (resp,) = peer.received()  # the peer verifies both digests of the answer
    assert resp.data == b"abc"
    # Corrupt the data digest: Reject with DATA_DIGEST_ERROR, connection stays.
    framed = bytearray(peer.frame(*nop_out(0x44, b"abc")))
    framed[-1] ^= 0xFF
    peer.send(bytes(framed))
    (rej,) = peer.received()
    assert rej.opcode == pdu.Opcode.REJECT
    assert rej.hdr.b2 == pdu.RejectReason.DATA_DIGEST_ERROR
    assert rej.data[:48] == bhs[:1] + bytes(framed[1:48])
    assert peer.conn.state is ConnState.FULL_FEATURE
    # Corrupt the header digest: the length fields cannot be trusted, so the connection closes.
    framed = bytearray(peer.frame(*nop_out(0x45)))
    framed[50] ^= 0xFF
    peer.send(bytes(framed))
    assert_closed(peer)


# ---- malformed PDUs --------------------------------------------------------------------------


def test_unknown_opcode_is_rejected_with_header_echoed() -> None:
    peer = logged_in()
    bhs = make_bhs(0x1B, b1=0x80, dsl=5, itt=9)
    peer.send(peer.frame(bhs, b"12345"))
    (rej,) = peer.received()
    assert rej.opcode == pdu.Opcode.REJECT
    assert rej.hdr.b2 == pdu.RejectReason.COMMAND_NOT_SUPPORTED
    assert rej.hdr.itt == 0xFFFFFFFF
    assert rej.data == bhs
    # The data segment was skipped exactly: the next PDU is understood.
    peer.send(peer.frame(*nop_out(0x50)))
    assert [p.opcode for p in peer.received()] == [pdu.Opcode.NOP_IN]


def test_target_opcode_from_initiator_is_protocol_error() -> None:
    peer = logged_in()
    peer.send(make_bhs(0x21, b1=0x80, itt=9))
    (rej,) = peer.received()
    assert rej.hdr.b2 == pdu.RejectReason.PROTOCOL_ERROR


def test_oversize_data_segment_is_rejected_and_skipped() -> None:
    peer = logged_in([("MaxRecvDataSegmentLength", "8192")])
    limit = peer.conn.params.max_recv_data_segment_length if peer.conn.params else 0
    big = bytes(limit + 4)
    bhs, _ = nop_out(0x51, big)
    peer.send(peer.frame(bhs, big))
    (rej,) = peer.received()
    assert rej.opcode == pdu.Opcode.REJECT
    assert rej.hdr.b2 == pdu.RejectReason.PROTOCOL_ERROR
    peer.send(peer.frame(*nop_out(0x52, b"ok")))
    (resp,) = peer.received()
    assert resp.data == b"ok"


def test_garbage_before_login_gets_login_reject_and_close() -> None:
    peer = Peer()
    peer.send(make_bhs(0x01, b1=0x80, itt=1))
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.LOGIN_RESPONSE
    assert resp.hdr.w9 >> 24 == 2
    assert peer.conn.state is ConnState.CLOSED


def test_truncated_pdu_then_close_leaks_nothing() -> None:
    peer = logged_in()
    data = os.urandom(1000)
    b1 = 0x80 | 0x20
    words = (4096, 1, 0, 0x2A000000, 0, 0x00080000, 0)
    bhs = make_bhs(0x01, b1=b1, dsl=len(data), itt=5, words=words)
    peer.send(bhs + data[:300])  # cut in the middle of the immediate data
    assert peer.pool.stats.blocks_in_use > 0
    peer.conn.connection_lost()
    assert peer.pool.stats.blocks_in_use == 0


# ---- CmdSN window ------------------------------------------------------------------------------


def test_serial_number_arithmetic_wraps() -> None:
    assert sn_lt(0xFFFFFFFF, 0)
    assert sn_le(5, 5)
    assert not sn_lt(0, 0xFFFFFFFF)


def test_cmdsn_outside_window_is_silently_ignored() -> None:
    peer = logged_in()
    session = peer.conn.session
    assert session is not None
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, cmdsn=session.max_cmdsn + 1)
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, cmdsn=session.exp_cmdsn - 1)
    assert peer.received() == []
    assert peer.ready_commands() == []


def test_commands_are_delivered_in_cmdsn_order() -> None:
    peer = logged_in()
    first = peer.cmdsn
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, itt=0x2, cmdsn=first + 1)
    assert peer.ready_commands() == []
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, itt=0x1, cmdsn=first)
    assert [e.command.itt for e in peer.ready_commands()] == [0x1, 0x2]


# ---- reads -------------------------------------------------------------------------------------


def test_read_is_split_by_initiator_mrdsl_and_status_folded() -> None:
    peer = logged_in([("MaxRecvDataSegmentLength", "4096")])
    payload = os.urandom(10000)
    peer.scsi_command(READ10_1BLOCK, edtl=12000, read=True, itt=0x77)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    sg = peer.pool.alloc(len(payload))
    sg.copy_in(payload)
    cmd.task.transfer_length = len(payload)
    peer.conn.send_data_in(cmd, sg, 0, len(payload), last=True)
    peer.conn.complete(cmd)
    pdus = peer.received()
    assert [p.opcode for p in pdus] == [pdu.Opcode.DATA_IN] * 3
    assert [len(p.data) for p in pdus] == [4096, 4096, 1808]
    assert [p.hdr.datasn for p in pdus] == [0, 1, 2]
    assert [p.hdr.buffer_offset for p in pdus] == [0, 4096, 8192]
    assert b"".join(p.data for p in pdus) == payload
    last = pdus[-1].hdr
    assert last.b1 & pdu.F_STATUS
    assert last.final
    assert last.b3 == 0
    assert last.b1 & pdu.F_UNDERFLOW
    assert last.w11 == 2000
    assert not pdus[0].hdr.b1 & pdu.F_STATUS
    assert peer.pool.stats.blocks_in_use == 0


def test_read_overflow_clips_to_edtl() -> None:
    peer = logged_in()
    peer.scsi_command(READ10_1BLOCK, edtl=200, read=True)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    sg = peer.pool.alloc(512)
    sg.copy_in(b"x" * 512)
    cmd.task.transfer_length = 512
    peer.conn.send_data_in(cmd, sg, 0, 512, last=True)
    peer.conn.complete(cmd)
    (din,) = peer.received()
    assert len(din.data) == 200
    assert din.hdr.b1 & pdu.F_OVERFLOW
    assert din.hdr.w11 == 312


def test_check_condition_goes_in_scsi_response_with_sense() -> None:
    peer = logged_in()
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, itt=0x99)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    cmd.task.status = 2
    cmd.task.sense = sense
    cmd.task.transfer_length = 512
    peer.conn.complete(cmd)
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.SCSI_RESPONSE
    assert resp.hdr.itt == 0x99
    assert resp.hdr.b3 == 2
    assert resp.data == len(sense).to_bytes(2, "big") + sense


# ---- writes ------------------------------------------------------------------------------------


WRITE_KEYS = [
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("FirstBurstLength", "8192"),
    ("MaxBurstLength", "16384"),
    ("MaxRecvDataSegmentLength", "8192"),
]


def answer_r2ts(peer: Peer, itt: int, payload: bytes, mrdsl: int = 8192) -> int:
    """Answer every R2T the target sent with Data-Out PDUs; returns bytes sent."""
    sent = 0
    while True:
        r2ts = [p for p in peer.received() if p.opcode == pdu.Opcode.R2T]
        if not r2ts:
            return sent
        for r2t in r2ts:
            off, n = r2t.hdr.buffer_offset, r2t.hdr.w11
            assert n <= 16384
            for datasn, pos in enumerate(range(off, off + n, mrdsl)):
                end = min(pos + mrdsl, off + n)
                peer.data_out(
                    itt, r2t.hdr.ttt, pos, payload[pos:end], datasn=datasn, final=end == off + n
                )
            sent += n


def receive_all(peer: Peer, cmd: Command, itt: int, payload: bytes, start: int = 0) -> bytes:
    """Drive request_data like the SCSI layer does, window by window, from ``start``; return
    what arrived."""
    got = b""
    while start + len(got) < len(payload):
        pos = start + len(got)
        sg = peer.conn.request_data(cmd, pos, len(payload) - pos)
        if sg is None:
            answer_r2ts(peer, itt, payload)
            (ev,) = [e for e in peer.take_events() if isinstance(e, DataReady)]
            assert ev.command is cmd
            sg = ev.sg
        assert sg.length > 0
        got += sg.to_bytes()
        sg.release()
    return got


def test_write_immediate_unsolicited_and_solicited_data_land_in_place() -> None:
    peer = logged_in(WRITE_KEYS)
    params = peer.conn.params
    assert params is not None
    assert not params.initial_r2t
    assert params.first_burst_length == 8192
    payload = os.urandom(60000)
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=len(payload), write=True, data=payload[:4096])
    peer.data_out(itt, 0xFFFFFFFF, 4096, payload[4096:8192], datasn=0)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    # The unsolicited part is handed over as it is, without waiting for the rest.
    first = peer.conn.request_data(cmd, 0, len(payload))
    assert first is not None
    assert first.to_bytes() == payload[:8192]
    first.release()
    assert receive_all(peer, cmd, itt, payload, start=8192) == payload[8192:]
    cmd.task.transfer_length = len(payload)
    peer.conn.complete(cmd)
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.SCSI_RESPONSE
    assert resp.hdr.b3 == 0
    assert resp.hdr.b1 & (pdu.F_OVERFLOW | pdu.F_UNDERFLOW) == 0
    assert peer.pool.stats.blocks_in_use == 0
    # Immediate and unsolicited data were received in place: nothing was copied.
    assert peer.pool.stats.copied_bytes == 0


def test_write_trickled_byte_by_byte() -> None:
    peer = logged_in(WRITE_KEYS)
    payload = os.urandom(3000)
    itt = peer.next_itt()
    b1 = 0x80 | 0x20
    words = (3000, peer.cmdsn, 0, 0x2A000000, 0, 0)
    bhs = make_bhs(0x01, b1=b1, dsl=3000, itt=itt, words=words)
    peer.send(peer.frame(bhs, payload), trickle=True)
    (ready,) = peer.ready_commands()
    sg = peer.conn.request_data(ready.command, 0, 3000)
    assert sg is not None
    assert sg.to_bytes() == payload
    sg.release()


NO_IMMEDIATE = [*WRITE_KEYS[:1], ("ImmediateData", "No"), *WRITE_KEYS[2:]]


def test_wrong_unsolicited_datasn_fails_the_command_not_the_connection() -> None:
    peer = logged_in(NO_IMMEDIATE)
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=1024, write=True)
    peer.data_out(itt, 0xFFFFFFFF, 0, bytes(512), datasn=0, final=False)
    peer.data_out(itt, 0xFFFFFFFF, 512, bytes(512), datasn=0)
    assert peer.received() == []
    assert peer.conn.state is ConnState.FULL_FEATURE
    (ready,) = peer.ready_commands()
    with pytest.raises(CommandAborted):
        peer.conn.request_data(ready.command, 0, 1024)
    peer.conn.complete(ready.command)
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.SCSI_RESPONSE
    assert resp.hdr.b3 == 2
    sense = resp.data[2:]
    assert (sense[2], sense[12], sense[13]) == (0x0B, 0x4B, 0x00)
    assert peer.pool.stats.blocks_in_use == 0
    # The connection still works.
    peer.send(peer.frame(*nop_out(0x53)))
    assert [p.opcode for p in peer.received()] == [pdu.Opcode.NOP_IN]


def test_wrong_solicited_datasn_wakes_the_waiting_command() -> None:
    peer = logged_in([("InitialR2T", "Yes"), ("ImmediateData", "No")])
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=1024, write=True)
    (ready,) = peer.ready_commands()
    assert peer.conn.request_data(ready.command, 0, 1024) is None
    (r2t,) = peer.received()
    assert r2t.opcode == pdu.Opcode.R2T
    assert (r2t.hdr.buffer_offset, r2t.hdr.w11) == (0, 1024)
    peer.data_out(itt, r2t.hdr.ttt, 0, bytes(1024), datasn=27)
    (ev,) = peer.take_events()
    assert isinstance(ev, DataFailed)
    assert ev.command is ready.command
    # Later Data-Out PDUs of the failed command are dropped quietly.
    peer.data_out(itt, r2t.hdr.ttt, 0, bytes(1024), datasn=0)
    assert peer.received() == []
    peer.conn.complete(ready.command)
    (resp,) = peer.received()
    assert resp.hdr.b3 == 2
    assert peer.pool.stats.blocks_in_use == 0


def test_write_edtl_shorter_than_immediate_request_truncates() -> None:
    peer = logged_in(WRITE_KEYS)
    payload = os.urandom(4000)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=4000, write=True, data=payload)
    (ready,) = peer.ready_commands()
    sg = peer.conn.request_data(ready.command, 0, 512)
    assert sg is not None
    assert sg.to_bytes() == payload[:512]
    sg.release()
    ready.command.task.transfer_length = 512
    peer.conn.complete(ready.command)
    (resp,) = peer.received()
    assert resp.hdr.b1 & pdu.F_UNDERFLOW
    assert resp.hdr.w11 == 3488
    assert peer.pool.stats.blocks_in_use == 0


def blocked(peer: Peer) -> bool:
    """A function, so mypy does not narrow ``reading_blocked`` across calls that change it."""
    return peer.conn.reading_blocked


def test_immediate_data_waits_for_memory_with_reading_paused() -> None:
    peer = logged_in(WRITE_KEYS, pool=Pool(64 * 1024, 64 * 1024))
    hog = peer.pool.alloc(64 * 1024)
    payload = os.urandom(4096)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=4096, write=True, data=payload)
    # The header was read, the data not: the adapter must stop reading until memory frees.
    (wanted,) = peer.take_events()
    assert isinstance(wanted, MemoryWanted)
    assert wanted.blocks == 1
    assert blocked(peer)
    peer.send(peer.frame(*nop_out(0x54)))  # more bytes wait in the backlog meanwhile
    assert peer.received() == []
    hog.release()
    peer.conn.retry_rx(give_up=False)
    peer.send(b"")  # collect the events it queued
    assert not blocked(peer)
    (ready,) = peer.ready_commands()
    sg = peer.conn.request_data(ready.command, 0, 4096)
    assert sg is not None
    assert sg.to_bytes() == payload  # nothing dropped
    sg.release()
    assert [p.opcode for p in peer.received()] == [pdu.Opcode.NOP_IN]  # backlog processed
    assert peer.pool.stats.unsolicited_dropped == 0


def test_immediate_data_without_pool_space_fails_typed() -> None:
    peer = logged_in(WRITE_KEYS, pool=Pool(64 * 1024, 64 * 1024))
    hog = peer.pool.alloc(64 * 1024)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=4096, write=True, data=bytes(4096))
    (wanted,) = peer.take_events()
    assert isinstance(wanted, MemoryWanted)
    peer.conn.retry_rx(give_up=True)  # the adapter waited long enough
    peer.send(b"")  # collect the events it queued
    (ready,) = peer.ready_commands()
    with pytest.raises(PoolExhausted):
        peer.conn.request_data(ready.command, 0, 4096)
    hog.release()
    ready.command.task.status = 0x28
    peer.conn.complete(ready.command)
    (resp,) = peer.received()
    assert resp.hdr.b3 == 0x28
    assert peer.pool.stats.blocks_in_use == 0


# ---- task management and logout ------------------------------------------------------------------


def tmf(function: int, *, itt: int, rtt: int = 0xFFFFFFFF, lun: int = 0) -> bytes:
    return make_bhs(
        0x02, immediate=True, b1=0x80 | function, lun=lun << 48, itt=itt, words=(rtt, 1, 0, 0, 0)
    )


def test_abort_unknown_task_answers_task_does_not_exist() -> None:
    peer = logged_in()
    peer.send(tmf(pdu.TmfFunction.ABORT_TASK, itt=0x60, rtt=0x1234))
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.TASK_MGMT_RESPONSE
    assert resp.hdr.itt == 0x60
    assert resp.hdr.b2 == pdu.TmfResponse.TASK_DOES_NOT_EXIST


def test_abort_task_suppresses_the_status() -> None:
    peer = logged_in()
    itt = peer.scsi_command(READ10_1BLOCK, edtl=512, read=True)
    (ready,) = peer.ready_commands()
    peer.send(tmf(pdu.TmfFunction.ABORT_TASK, itt=0x61, rtt=itt))
    (ev,) = peer.take_events()
    assert isinstance(ev, TmfRequest)
    assert ev.commands == [ready.command]
    assert ready.command.task.aborted
    peer.conn.complete(ready.command)
    peer.conn.tmf_done(ev.itt, pdu.TmfResponse.COMPLETE)
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.TASK_MGMT_RESPONSE
    assert resp.hdr.b2 == 0


def test_task_reassign_is_not_supported_at_erl0() -> None:
    peer = logged_in()
    peer.send(tmf(pdu.TmfFunction.TASK_REASSIGN, itt=0x62, rtt=1))
    (resp,) = peer.received()
    assert resp.hdr.b2 == pdu.TmfResponse.REASSIGNMENT_NOT_SUPPORTED


def test_logout_answers_and_closes() -> None:
    peer = logged_in()
    statsn = peer.conn.statsn
    peer.send(make_bhs(0x06, immediate=True, b1=0x80, itt=0x70, words=(0, 1, 0)))
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.LOGOUT_RESPONSE
    assert resp.hdr.b2 == 0
    assert resp.hdr.w6 == statsn
    assert peer.conn.state is ConnState.LOGGED_OUT
    assert any(isinstance(e, CloseConnection) for e in peer.take_events())


# ---- target-initiated pings --------------------------------------------------------------------


def test_nop_in_ping_and_timeout() -> None:
    peer = logged_in()
    conn = peer.conn
    conn._nop_interval = 10.0
    conn.note_activity(100.0)
    assert conn.get_timer() == 110.0
    conn.handle_timer(110.0)
    (ping,) = peer.received()
    assert ping.opcode == pdu.Opcode.NOP_IN
    assert ping.hdr.itt == 0xFFFFFFFF
    assert ping.hdr.ttt != 0xFFFFFFFF
    # The initiator answers: no timeout.
    reply = make_bhs(0x00, immediate=True, b1=0x80, itt=0xFFFFFFFF, words=(ping.hdr.ttt, 1, 0))
    peer.send(reply)
    assert conn.get_timer() == 110.0  # activity clock unchanged in this test; deadline cleared
    conn.handle_timer(121.0)
    (ping2,) = peer.received()
    conn.handle_timer(121.0 + 16.0)
    assert conn.state is ConnState.CLOSED
    assert ping2.hdr.ttt != ping.hdr.ttt


def test_ready_command_carries_scsi_task_fields() -> None:
    peer = logged_in()
    peer.scsi_command(READ10_1BLOCK, edtl=512, read=True, lun=3)
    (ev,) = peer.ready_commands()
    assert isinstance(ev, CommandReady)
    task = ev.command.task
    assert task.cdb[:10] == READ10_1BLOCK
    assert task.lun == bytes([0, 3, 0, 0, 0, 0, 0, 0])
    assert task.expected_length == 512
    assert task.nexus is not None
    assert INITIATOR in task.nexus.key


def test_request_data_after_abort_or_connection_loss_raises_typed() -> None:
    peer = logged_in(WRITE_KEYS)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=1024, write=True)
    (ready,) = peer.ready_commands()
    peer.conn.connection_lost()
    with pytest.raises(CommandAborted):
        peer.conn.request_data(ready.command, 0, 1024)
    peer.conn.complete(ready.command)
    assert peer.pool.stats.blocks_in_use == 0


def test_login_with_oversize_text_is_refused_from_the_header_alone() -> None:
    peer = Peer()
    bhs = bytearray(make_bhs(0x03, immediate=True, b1=0x87, dsl=(1 << 24) - 1, itt=1))
    bhs[8:14] = bytes(6)
    peer.send(bytes(bhs) + b"abcd")
    (resp,) = peer.received()
    assert resp.opcode == pdu.Opcode.LOGIN_RESPONSE
    assert resp.hdr.w9 >> 16 == 0x0200
    assert_closed(peer)


def test_r2ts_only_for_blocks_the_pool_can_hold() -> None:
    pool = Pool(2 * 4096, 4096)
    peer = logged_in([("InitialR2T", "Yes"), ("ImmediateData", "No")], pool=pool)
    payload = os.urandom(30000)
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=len(payload), write=True)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    got = b""
    while len(got) < len(payload):
        assert peer.conn.request_data(cmd, len(got), len(payload) - len(got)) is None
        (r2t,) = peer.received()
        # Solicited: exactly what two 4 KiB blocks hold, never the whole transfer.
        assert r2t.hdr.buffer_offset == len(got)
        assert r2t.hdr.w11 == min(8192, len(payload) - len(got))
        # While the window is out, nothing else can be had: typed exhaustion, not an error.
        with pytest.raises(PoolExhausted):
            peer.pool.alloc(1)
        off, n = r2t.hdr.buffer_offset, r2t.hdr.w11
        peer.data_out(itt, r2t.hdr.ttt, off, payload[off : off + n], datasn=0)
        (ev,) = [e for e in peer.take_events() if isinstance(e, DataReady)]
        got += ev.sg.to_bytes()
        ev.sg.release()
    assert got == payload
    assert pool.stats.peak_blocks_in_use == 2


def test_unsolicited_data_uses_the_reserve_and_is_dropped_only_when_it_is_gone() -> None:
    pool = Pool(4 * 4096, 4096)
    pool.reserve_blocks = 2
    peer = logged_in(WRITE_KEYS, pool=pool)
    hog = pool.alloc(2 * 4096)  # everything but the reserve
    peer.scsi_command(b"\x2a" + bytes(9), edtl=8192, write=True, data=bytes(4096))
    (first,) = peer.ready_commands()
    assert first.command.wr is not None
    assert first.command.wr.rx_sg is not None  # held in the reserve
    # The first command still waits for its unsolicited Data-Out on this connection, so
    # pausing the read is no option: the second command's data is dropped at once.
    peer.scsi_command(b"\x2a" + bytes(9), edtl=8192, write=True, data=bytes(4096))
    (second,) = peer.ready_commands()
    assert pool.stats.unsolicited_dropped == 1
    with pytest.raises(UnsolicitedDropped):
        peer.conn.request_data(second.command, 0, 8192)
    second.command.task.status = 0x28
    peer.conn.complete(second.command)
    (resp,) = peer.received()
    assert resp.hdr.b3 == 0x28
    assert pool.stats.task_set_full == 1
    hog.release()
    first.command.task.status = 0x28
    peer.conn.complete(first.command)
    peer.received()
    assert pool.stats.blocks_in_use == 0


def test_command_window_shrinks_under_pool_pressure_and_never_moves_back() -> None:
    pool = Pool(64 * 4096, 4096)
    peer = logged_in(pool=pool)
    session = peer.conn.session
    assert session is not None
    before = session.max_cmdsn
    hog = pool.alloc(60 * 4096)
    assert pool.under_pressure()
    for _ in range(20):
        peer.scsi_command(READ10_1BLOCK, edtl=512, read=True)
    # Twenty commands in flight: the window has stopped growing (16 slots under pressure).
    assert session.max_cmdsn == before
    assert pool.stats.window_shrinks == 1
    hog.release()
    assert session.max_cmdsn == (session.exp_cmdsn + session.queue_depth - 20 - 1) & 0xFFFFFFFF


def test_next_window_is_solicited_while_the_lu_writes_the_current_one() -> None:
    peer = logged_in([("InitialR2T", "Yes"), ("ImmediateData", "No")])
    payload = os.urandom(3 * 16384)
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=len(payload), write=True)
    (ready,) = peer.ready_commands()
    cmd = ready.command
    cmd.transfer_length = len(payload)
    assert peer.conn.request_data(cmd, 0, 16384) is None
    (first,) = peer.received()
    assert (first.hdr.buffer_offset, first.hdr.w11) == (0, 16384)
    peer.data_out(itt, first.hdr.ttt, 0, payload[:16384], datasn=0)
    # Handing over window 1 already sent the R2T for window 2 (prefetch)...
    (ev,) = [e for e in peer.take_events() if isinstance(e, DataReady)]
    r2ts = [p for p in peer.received() if p.opcode == pdu.Opcode.R2T]
    assert [(r.hdr.buffer_offset, r.hdr.w11) for r in r2ts] == [(16384, 16384)]
    ev.sg.release()
    off, n = r2ts[0].hdr.buffer_offset, r2ts[0].hdr.w11
    peer.data_out(itt, r2ts[0].hdr.ttt, off, payload[off : off + n], datasn=0)
    # ...so it is already here when the LU asks, and window 3 goes out in turn.
    sg = peer.conn.request_data(cmd, 16384, 16384)
    assert sg is not None
    assert sg.to_bytes() == payload[16384:32768]
    sg.release()
    (r2t,) = peer.received()
    assert (r2t.hdr.buffer_offset, r2t.hdr.w11) == (32768, 16384)
    # Nothing is solicited past the CDB's transfer length.
    peer.data_out(itt, r2t.hdr.ttt, 32768, payload[32768:], datasn=0)
    sg = peer.conn.request_data(cmd, 32768, 16384)
    assert sg is not None
    sg.release()
    assert peer.received() == []
    peer.conn.complete(cmd)
    assert peer.pool.stats.blocks_in_use == 0


def test_under_pressure_a_window_is_only_what_its_r2ts_can_solicit_at_once() -> None:
    pool = Pool(64 * 4096, 4096)
    keys = [("InitialR2T", "Yes"), ("ImmediateData", "No"), ("MaxBurstLength", "8192"),
            ("FirstBurstLength", "8192"), ("MaxOutstandingR2T", "1")]  # fmt: skip
    peer = logged_in(keys, pool=pool)
    itt = peer.scsi_command(b"\x2a" + bytes(9), edtl=65536, write=True)
    (ready,) = peer.ready_commands()
    hog = pool.alloc(50 * 4096)
    assert pool.under_pressure()
    assert peer.conn.request_data(ready.command, 0, 65536) is None
    (r2t,) = peer.received()
    assert (r2t.hdr.buffer_offset, r2t.hdr.w11) == (0, 8192)
    assert pool.stats.blocks_in_use == 50 + 2
    hog.release()
    peer.data_out(itt, r2t.hdr.ttt, 0, bytes(8192), datasn=0)
    (ev,) = [e for e in peer.take_events() if isinstance(e, DataReady)]
    ev.sg.release()
    # Memory to spare again: the prefetched next window is as large as the LU asked.
    wr = ready.command.wr
    assert wr is not None
    assert (wr.rx_base, wr.rx_len) == (8192, 57344)
    (r2t,) = peer.received()
    assert (r2t.hdr.buffer_offset, r2t.hdr.w11) == (8192, 8192)
    peer.conn.complete(ready.command)
    assert pool.stats.blocks_in_use == 0


def test_immediate_data_is_not_held_up_behind_this_connections_own_windows() -> None:
    # Pausing the read would starve the R2T window the other write waits for: drop instead.
    pool = Pool(4 * 4096, 4096)
    keys = [("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("FirstBurstLength", "8192")]
    peer = logged_in(keys, pool=pool)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=16384, write=True, data=bytes(4096))
    (ready,) = peer.ready_commands()
    sg = peer.conn.request_data(ready.command, 0, 16384)
    assert sg is not None
    assert sg.length == 4096  # the immediate data
    sg.release()
    assert peer.conn.request_data(ready.command, 4096, 12288) is None  # a window waits
    hog = pool.alloc(pool.free_blocks * 4096)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=8192, write=True, data=bytes(4096))
    assert not blocked(peer)
    assert pool.stats.unsolicited_dropped == 1
    hog.release()


def test_asking_for_dropped_unsolicited_bytes_fails_loudly_instead_of_hanging() -> None:
    peer = logged_in(WRITE_KEYS)
    peer.scsi_command(b"\x2a" + bytes(9), edtl=4096, write=True, data=bytes(4096))
    (ready,) = peer.ready_commands()
    head = peer.conn.request_data(ready.command, 0, 8)  # truncates the unsolicited window
    assert head is not None
    head.release()
    with pytest.raises(RuntimeError, match="unsolicited"):
        peer.conn.request_data(ready.command, 8, 4088)
    peer.conn.complete(ready.command)
    assert peer.pool.stats.blocks_in_use == 0


def _ext_cdb_ahs(cdb: bytes) -> bytes:
    """An Extended CDB AHS by hand (RFC 7143 11.2.2.3): AHSLength, type 1, reserved, CDB[16:],
    padded to 4 bytes."""
    rest = cdb[16:]
    ahs = struct.pack(">HBB", len(rest) + 1, 1, 0) + rest
    return ahs + bytes(-len(ahs) % 4)


READ32 = bytes.fromhex("7f000000000000180009" + "00" * 2 + "0000000000000009" + "00" * 12)


def test_extended_cdb_ahs_makes_a_32_byte_cdb() -> None:
    assert len(READ32) == 32
    ahs = _ext_cdb_ahs(READ32)
    # AHSLength 17 (reserved byte + 16 CDB bytes), type 1, reserved, then CDB bytes 16-31.
    assert ahs == bytes.fromhex("00110100" + "00000009" + "00" * 12)
    assert pdu.extended_cdb(ahs) == READ32[16:]
    # A BIDI read length AHS (type 2) before it is skipped.
    bidi = struct.pack(">HBBI", 5, 2, 0, 4096)
    assert pdu.extended_cdb(bidi + ahs) == READ32[16:]
    assert pdu.extended_cdb(bidi) == b""
    peer = logged_in()
    itt = peer.next_itt()
    words = (512, peer.cmdsn, 0, *struct.unpack(">4I", READ32[:16]))
    bhs = make_bhs(0x01, b1=0xC1, itt=itt, words=words, ahs_words=len(ahs) // 4)
    peer.send(peer.frame(bhs + ahs))
    (ev,) = peer.ready_commands()
    assert isinstance(ev, CommandReady)
    assert ev.command.task.cdb == READ32


@pytest.mark.parametrize(
    "ahs",
    [
        struct.pack(">HBB", 40, 1, 0) + bytes(16),  # AHSLength past TotalAHSLength
        struct.pack(">HBB", 1, 1, 0),  # an Extended CDB without a CDB byte
        _ext_cdb_ahs(READ32) * 2,  # two of them
    ],
)
def test_a_malformed_ahs_is_rejected_and_the_connection_goes_on(ahs: bytes) -> None:
    peer = logged_in()
    words = (512, peer.cmdsn, 0, *struct.unpack(">4I", READ32[:16]))
    bhs = make_bhs(0x01, b1=0xC1, itt=7, words=words, ahs_words=len(ahs) // 4)
    peer.send(peer.frame(bhs + ahs))
    (rej,) = peer.received()
    assert rej.opcode == pdu.Opcode.REJECT
    assert rej.hdr.b2 == pdu.RejectReason.INVALID_PDU_FIELD
    assert peer.ready_commands() == []
    peer.send(peer.frame(*nop_out(0x53)))
    assert [p.opcode for p in peer.received()] == [pdu.Opcode.NOP_IN]


def _read_cmd(itt: int, cmdsn: int) -> bytes:
    cdb = bytes.fromhex("28000000000000000800").ljust(16, b"\0")
    return make_bhs(0x01, b1=0xC1, itt=itt, words=(4096, cmdsn, 0, *struct.unpack(">4I", cdb)))


def test_headers_ahead_counts_only_whole_data_less_pdus() -> None:
    peer = logged_in()
    conn = peer.conn
    a, b = _read_cmd(1, 1), _read_cmd(2, 2)
    write = make_bhs(0x01, b1=0xA1, dsl=512, itt=3, words=(512, 3))
    # Two READs, then a WRITE with immediate data: only the READs may be read in one go.
    assert conn.headers_ahead(a + b + write + bytes(512)) == 96
    # A header cut short is left to the ordinary reads.
    assert conn.headers_ahead(a + b[:20]) == 48
    # An AHS (a 32-byte CDB) counts as data to come too.
    assert conn.headers_ahead(make_bhs(0x01, ahs_words=5, itt=4)) == 0
    assert conn.headers_ahead(b"") == 0
    # Mid-PDU (a header half read) nothing is ahead: the bytes belong to the current PDU.
    half = conn.get_buffer()
    half[:10] = a[:10]
    conn.buffer_updated(10)
    assert conn.headers_ahead(a) == 0


def test_headers_ahead_steps_over_header_digests() -> None:
    peer = logged_in([("HeaderDigest", "CRC32C")])
    assert peer.header_digest
    framed = peer.frame(_read_cmd(1, 1)) + peer.frame(_read_cmd(2, 2))
    assert peer.conn.headers_ahead(framed) == 2 * 52
    # What it counts is exactly what receive_data then takes as two whole commands.
    peer.send(framed)
    assert [ev.command.itt for ev in peer.ready_commands()] == [1, 2]


def test_headers_ahead_is_zero_before_the_login_completes() -> None:
    peer = Peer()
    assert peer.conn.headers_ahead(_read_cmd(1, 1)) == 0


def test_headers_only_says_whether_the_last_pdu_had_a_data_segment() -> None:
    # The portal peeks for queued headers only after a data-less PDU: after a WRITE's data
    # the next PDU is probably another WRITE, and a peek would be a wasted system call.
    peer = logged_in()
    peer.scsi_command(bytes.fromhex("28000000000000000800"), edtl=4096, read=True)
    assert peer.conn.headers_only
    peer.scsi_command(bytes.fromhex("2a000000000000000100"), edtl=512, write=True, data=bytes(512))
    assert not peer.conn.headers_only
