"""A tiny in-memory initiator for driving the sans-I/O ``Connection`` in tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from sgtarget.datapath import Pool
from sgtarget.iscsi import pdu
from sgtarget.iscsi.connection import (
    CommandReady,
    Connection,
    DataReady,
    Event,
)
from sgtarget.iscsi.digest import digest, digest_of
from sgtarget.iscsi.keys import TargetLimits, encode_text, parse_text
from sgtarget.iscsi.session import SessionTable, TargetDirectory, TargetInfo

TARGET = "iqn.2026-11.org.sgtarget:unit"
INITIATOR = "iqn.2026-11.org.example:initiator"
ISID = bytes([0x80, 0x12, 0x34, 0x56, 0x00, 0x01])


@dataclass
class Pdu:
    hdr: pdu.Header
    data: bytes

    @property
    def opcode(self) -> int:
        return int(self.hdr.opcode)


def make_bhs(
    opcode: int,
    *,
    immediate: bool = False,
    b1: int = 0x80,
    b2: int = 0,
    b3: int = 0,
    dsl: int = 0,
    lun: int = 0,
    itt: int = 0,
    words: tuple[int, ...] = (),
    ahs_words: int = 0,
) -> bytes:
    """A BHS built field by field with struct (independent of the code under test)."""
    w = list(words) + [0] * (7 - len(words))
    return struct.pack(
        ">BBBBB3sQI7I",
        opcode | (0x40 if immediate else 0),
        b1,
        b2,
        b3,
        ahs_words,
        dsl.to_bytes(3, "big"),
        lun,
        itt,
        *w,
    )


def login_request(
    pairs: list[tuple[str, str]],
    *,
    csg: int = 1,
    nsg: int = 3,
    transit: bool = True,
    itt: int = 1,
    cmdsn: int = 1,
    tsih: int = 0,
    isid: bytes = ISID,
    version_min: int = 0,
) -> bytes:
    data = encode_text(pairs)
    b1 = (0x80 if transit else 0) | (csg << 2) | nsg
    bhs = bytearray(
        make_bhs(
            0x03, immediate=True, b1=b1, b3=version_min, dsl=len(data), itt=itt, words=(0, cmdsn, 0)
        )
    )
    bhs[8:14] = isid
    bhs[14:16] = tsih.to_bytes(2, "big")
    return bytes(bhs) + data + pdu.pad_for(len(data))


@dataclass
class Peer:
    """Drives one Connection; collects what it sends back."""

    pool: Pool = field(default_factory=lambda: Pool(4 * 1024 * 1024, 64 * 1024))
    limits: TargetLimits = field(default_factory=TargetLimits)
    header_digest: bool = False
    data_digest: bool = False
    cmdsn: int = 1
    itt: int = 0x100
    conn: Connection = field(init=False)
    events: list[Event] = field(default_factory=list)
    _rx: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        targets = TargetDirectory([TargetInfo(TARGET, portals=("127.0.0.1:3260",))])
        self.conn = Connection(
            pool=self.pool,
            targets=targets,
            sessions=SessionTable(),
            limits=self.limits,
            nop_interval=None,
        )

    # -- sending ------------------------------------------------------------------------
    def send(self, raw: bytes, *, trickle: bool = False) -> None:
        if trickle:
            for i in range(len(raw)):
                self.conn.receive_data(raw[i : i + 1])
        else:
            self.conn.receive_data(raw)
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)

    def frame(self, bhs: bytes, data: bytes = b"") -> bytes:
        """Add digests (if on) and padding to a BHS and data segment."""
        out = bhs
        if self.header_digest:
            out += digest(bhs)
        if data:
            pad = pdu.pad_for(len(data))
            out += data + pad
            if self.data_digest:
                out += digest_of([data, pad])
        return out

    def login(
        self, extra: list[tuple[str, str]] | None = None, *, session_type: str = "Normal"
    ) -> Pdu:
        pairs = [("InitiatorName", INITIATOR), ("SessionType", session_type)]
        if session_type == "Normal":
            pairs.append(("TargetName", TARGET))
        pairs += extra or []
        self.send(login_request(pairs, cmdsn=self.cmdsn))
        (resp,) = self.received()
        assert resp.opcode == pdu.Opcode.LOGIN_RESPONSE
        assert resp.hdr.w9 >> 16 == 0, f"login failed: {resp.hdr.w9 >> 16:#06x}"
        keys = dict(parse_text(resp.data))
        self.header_digest = keys.get("HeaderDigest") == "CRC32C"
        self.data_digest = keys.get("DataDigest") == "CRC32C"
        return resp

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def scsi_command(
        self,
        cdb: bytes,
        *,
        edtl: int,
        read: bool = False,
        write: bool = False,
        data: bytes = b"",
        lun: int = 0,
        immediate: bool = False,
        itt: int | None = None,
        cmdsn: int | None = None,
    ) -> int:
        itt = self.next_itt() if itt is None else itt
        if cmdsn is None:
            cmdsn = self.cmdsn
            if not immediate:
                self.cmdsn += 1
        b1 = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
        words = (edtl, cmdsn, 0, *struct.unpack(">4I", cdb.ljust(16, b"\x00")))
        bhs = make_bhs(
            0x01, immediate=immediate, b1=b1, dsl=len(data), lun=lun << 48, itt=itt, words=words
        )
        self.send(self.frame(bhs, data))
        return itt

    def data_out(
        self,
        itt: int,
        ttt: int,
        offset: int,
        data: bytes,
        *,
        datasn: int,
        final: bool = True,
        lun: int = 0,
    ) -> None:
        bhs = make_bhs(
            0x05,
            b1=0x80 if final else 0,
            dsl=len(data),
            lun=lun << 48,
            itt=itt,
            words=(ttt, 0, 0, 0, datasn, offset, 0),
        )
        self.send(self.frame(bhs, data))

    # -- receiving ----------------------------------------------------------------------
    def received(self) -> list[Pdu]:
        """Parse everything the connection queued (and release its buffers)."""
        bufs, release = self.conn.take_output()
        for b in bufs:
            self._rx += bytes(b)
        for sg in release:
            sg.release()
        out = []
        while True:
            hlen = pdu.BHS_LEN + (4 if self.header_digest else 0)
            if len(self._rx) < hlen:
                break
            hdr = pdu.Header(bytes(self._rx[: pdu.BHS_LEN]))
            if self.header_digest:
                assert self._rx[48:52] == digest(self._rx[:48]), "bad header digest"
            n = hdr.data_len
            dlen = pdu.padded(n) + (4 if self.data_digest and n else 0)
            if len(self._rx) < hlen + dlen:
                break
            data = bytes(self._rx[hlen : hlen + n])
            if self.data_digest and n:
                seg = self._rx[hlen : hlen + pdu.padded(n)]
                assert self._rx[hlen + pdu.padded(n) : hlen + dlen] == digest(seg)
            del self._rx[: hlen + dlen]
            out.append(Pdu(hdr, data))
        return out

    def take_events(self) -> list[Event]:
        evs, self.events = self.events, []
        return evs

    def ready_commands(self) -> list[CommandReady]:
        return [e for e in self.take_events() if isinstance(e, CommandReady)]

    def data_ready(self) -> list[DataReady]:
        return [e for e in self.events if isinstance(e, DataReady)]
