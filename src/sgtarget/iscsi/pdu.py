"""iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment and what follows it.

Every BHS is unpacked with one precompiled struct into the fields common to all opcodes::

    byte 0      I bit (0x40) | opcode (0x3f)
    byte 1      F bit (0x80) | opcode-specific flags
    bytes 2-3   opcode specific
    byte 4      TotalAHSLength (4-byte words)
    bytes 5-7   DataSegmentLength
    bytes 8-15  LUN or opcode specific
    bytes 16-19 Initiator Task Tag
    bytes 20-47 seven opcode-specific 32-bit words (w5 .. w11)

Opcode-specific meaning of ``w5..w11`` is given by the accessor properties on ``Header``. A PDU on
the wire is: BHS, AHS, header digest (4 bytes, if negotiated), data segment padded to 4 bytes,
data digest (if negotiated and the segment is not empty).
"""

from __future__ import annotations

import enum
import struct

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF

#: (b0, b1, b2, b3, ahs_dsl, lun, itt, w5, w6, w7, w8, w9, w10, w11)
BHS = struct.Struct(">BBBBIQIIIIIIII")


class Opcode(enum.IntEnum):
    # initiator -> target
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # target -> initiator
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPCODES = frozenset(
    {
        Opcode.NOP_OUT,
        Opcode.SCSI_COMMAND,
        Opcode.TASK_MGMT_REQUEST,
        Opcode.LOGIN_REQUEST,
        Opcode.TEXT_REQUEST,
        Opcode.DATA_OUT,
        Opcode.LOGOUT_REQUEST,
        Opcode.SNACK_REQUEST,
    }
)


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponse(enum.IntEnum):
    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


# Flag bits of byte 1.
F_FINAL = 0x80
F_READ = 0x40  # SCSI Command R
F_WRITE = 0x20  # SCSI Command W
F_ATTR_MASK = 0x07
F_CONTINUE = 0x40  # Login/Text C
F_TRANSIT = 0x80  # Login T
F_ACK = 0x40  # Data-In A
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_STATUS = 0x01  # Data-In S
I_BIT = 0x40


class PduFormatError(Exception):
    """A header that cannot be a valid PDU; the answer is a Reject or closing the connection."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


#: AHS types (RFC 7143 11.2.2.1).
AHS_EXTENDED_CDB = 0x01
AHS_BIDI_READ_LENGTH = 0x02


def extended_cdb(ahs: bytes) -> bytes:
    """The CDB bytes beyond the BHS's 16 that an Extended CDB AHS carries (RFC 7143
    11.2.2.3), or ``b""``. ``ahs`` is the whole TotalAHSLength; entries of other types are
    skipped. ``PduFormatError`` when the entries do not fit it or two Extended CDBs come.

    Each entry is AHSLength (2 bytes: the bytes after AHSType, padding excluded), AHSType,
    then AHSLength bytes padded to 4; an Extended CDB's first byte is reserved.
    """
    pos, ext, found = 0, b"", False
    while pos < len(ahs):
        if pos + 4 > len(ahs):
            raise PduFormatError(RejectReason.INVALID_PDU_FIELD, "truncated AHS")
        length = (ahs[pos] << 8) | ahs[pos + 1]
        end = pos + 3 + length
        if end > len(ahs):
            raise PduFormatError(
                RejectReason.INVALID_PDU_FIELD, f"AHSLength {length} past TotalAHSLength"
            )
        if ahs[pos + 2] == AHS_EXTENDED_CDB:
            if found or length < 2:
                raise PduFormatError(RejectReason.INVALID_PDU_FIELD, "bad Extended CDB AHS")
            found = True
            ext = ahs[pos + 4 : end]
        pos = (end + 3) & ~3
    return ext


class Header:
    """A decoded BHS. ``raw`` keeps the 48 bytes (Reject echoes them); ``cdb_ext`` the CDB
    bytes an Extended CDB AHS added (set by whoever read the AHS)."""

    __slots__ = (
        "ahs_len",
        "b1",
        "b2",
        "b3",
        "cdb_ext",
        "data_len",
        "immediate",
        "itt",
        "lun",
        "opcode",
        "raw",
        "w5",
        "w6",
        "w7",
        "w8",
        "w9",
        "w10",
        "w11",
    )

    def __init__(self, raw: bytes) -> None:
        fields: tuple[int, ...] = BHS.unpack(raw)
        b0, b1, b2, b3, ahs_dsl, lun, itt, w5, w6, w7, w8, w9, w10, w11 = fields
        self.raw = raw
        self.opcode: int = b0 & 0x3F
        self.immediate = bool(b0 & I_BIT)
        self.b1: int = b1
        self.b2: int = b2
        self.b3: int = b3
        self.ahs_len: int = (ahs_dsl >> 24) * 4
        self.data_len: int = ahs_dsl & 0xFFFFFF
        self.lun: int = lun
        self.itt: int = itt
        self.w5: int = w5
        self.w6: int = w6
        self.w7: int = w7
        self.w8: int = w8
        self.w9: int = w9
        self.w10: int = w10
        self.w11: int = w11
        self.cdb_ext = b""

    @property
    def final(self) -> bool:
        return bool(self.b1 & F_FINAL)

    @property
    def lun_bytes(self) -> bytes:
        return self.raw[8:16]

    # SCSI Command
    @property
    def expected_length(self) -> int:
        return self.w5

    @property
    def cmdsn(self) -> int:
        """CmdSN of SCSI Command, NOP-Out, TMF, Login, Text and Logout requests."""
        return self.w6

    @property
    def exp_statsn(self) -> int:
        return self.w7

    @property
    def cdb(self) -> bytes:
        return self.raw[32:48] + self.cdb_ext if self.cdb_ext else self.raw[32:48]

    # Data-Out / NOP-Out / Text: Target Transfer Tag
    @property
    def ttt(self) -> int:
        return self.w5

    @property
    def datasn(self) -> int:
        return self.w9

    @property
    def buffer_offset(self) -> int:
        return self.w10

    # Task management
    @property
    def tmf_function(self) -> int:
        return self.b1 & 0x7F

    @property
    def referenced_task_tag(self) -> int:
        return self.w5

    @property
    def ref_cmdsn(self) -> int:
        return self.w8

    # Login
    @property
    def isid(self) -> bytes:
        return self.raw[8:14]

    @property
    def tsih(self) -> int:
        return int.from_bytes(self.raw[14:16], "big")

    @property
    def cid(self) -> int:
        """CID of Login and Logout requests."""
        return self.w5 >> 16

    @property
    def csg(self) -> int:
        return (self.b1 >> 2) & 3

    @property
    def nsg(self) -> int:
        return self.b1 & 3

    @property
    def transit(self) -> bool:
        return bool(self.b1 & F_TRANSIT)

    @property
    def cont(self) -> bool:
        return bool(self.b1 & F_CONTINUE)

    # Logout
    @property
    def logout_reason(self) -> int:
        return self.b1 & 0x7F

    def __repr__(self) -> str:
        try:
            name = Opcode(self.opcode).name
        except ValueError:
            name = hex(self.opcode)
        return f"<{name} itt={self.itt:#x} dsl={self.data_len}>"


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (data segments are padded to 4 bytes)."""
    return (n + 3) & ~3


PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad_for(n: int) -> bytes:
    return PAD[n & 3]


def build(
    opcode: int,
    *,
    b1: int = F_FINAL,
    b2: int = 0,
    b3: int = 0,
    data_len: int = 0,
    lun: int = 0,
    itt: int = RESERVED_TAG,
    w5: int = 0,
    w6: int = 0,
    w7: int = 0,
    w8: int = 0,
    w9: int = 0,
    w10: int = 0,
    w11: int = 0,
) -> bytearray:
    """A 48-byte BHS (no AHS: the target never sends one)."""
    buf = bytearray(BHS_LEN)
    BHS.pack_into(buf, 0, opcode, b1, b2, b3, data_len, lun, itt, w5, w6, w7, w8, w9, w10, w11)
    return buf


def build_login_response(
    *,
    transit: bool,
    cont: bool,
    csg: int,
    nsg: int,
    isid: bytes,
    tsih: int,
    itt: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    status_class: int,
    status_detail: int,
    data_len: int,
) -> bytearray:
    b1 = (F_TRANSIT if transit else 0) | (F_CONTINUE if cont else 0) | (csg << 2) | nsg
    buf = build(
        Opcode.LOGIN_RESPONSE,
        b1=b1,
        b2=0,  # Version-max
        b3=0,  # Version-active
        data_len=data_len,
        itt=itt,
        w6=statsn,
        w7=exp_cmdsn,
        w8=max_cmdsn,
        w9=(status_class << 24) | (status_detail << 16),
    )
    buf[8:14] = isid
    buf[14:16] = tsih.to_bytes(2, "big")
    return buf


def sense_segment(sense: bytes) -> bytes:
    """SCSI Response data segment: 2-byte SenseLength then the sense data (§11.4.7)."""
    return len(sense).to_bytes(2, "big") + sense
