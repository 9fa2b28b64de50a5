"""T10 protection information (SBC-4 4.22): which checks a command makes, FORMAT UNIT.

A LU with a ``ProtectionStore`` (``pi=``, backstores/pi.py) is PI-capable; its ``pi_type`` is
the current format (0: none). The CRC, tuple generation and checks are ``datapath.dif``'s; this
module decides, for one command, from its protect field (RDPROTECT, WRPROTECT, VRPROTECT) and
the format, what SBC-4's tables ask:

====  ==============  =====  ==========  =========  ===============================
code  on the wire     guard  app tag     ref tag    (reading, verifying the medium,
                                                     or checking received tuples)
====  ==============  =====  ==========  =========  ===============================
000b  data only       yes*   32-byte     type 1/2*  * reading: writing generates PI
001b  data + tuples   yes    32-byte     type 1/2
010b  data + tuples   no     32-byte     type 1/2
011b  data + tuples   no     no          no
100b  data + tuples   yes    no          no
101b  data + tuples   yes    32-byte     type 1/2
====  ==============  =====  ==========  =========  ===============================

110b and 111b are reserved (INVALID FIELD IN CDB), as is any non-zero value on a LU formatted
without PI. The application tag is checked only where a 32-byte CDB gives an expected tag and
mask (ATO is 1: the tag is the application client's). The reference tag is checked for type 1
(the low 32 bits of the LBA, +1 per block) and for type 2 where a 32-byte CDB gives the expected
initial tag; type 2 with a 10/12/16-byte CDB has no expected tag (SBC-4 asks for 32-byte CDBs
there, and a non-zero protect field in a shorter one is INVALID COMMAND OPERATION CODE), type
3's reference tag is not defined by SBC. Escape tuples skip every check (``dif.verify``).

PI the target generates (protect field 0 on a write) gets application tag 0 and the reference
tag the check would expect: the LBA's low 32 bits, or the 32-byte CDB's initial tag.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgtarget.backstores.base import BackstoreBusy, BackstoreError
from sgtarget.datapath import dif
from sgtarget.scsi.constants import Asc, Opcode, SenseKey
from sgtarget.scsi.sense import CheckCondition, SenseData, field_pointer

if TYPE_CHECKING:
    from sgtarget.scsi.lu import Cmd, LogicalUnit

log = logging.getLogger(__name__)

__all__ = [
    "VARIABLE_LENGTH",
    "PiCheck",
    "Tags32",
    "cmd_format_unit",
    "decode_tags32",
    "pi_failure",
    "protect_check",
]

#: Opcode of the variable-length (32-byte) CDBs.
VARIABLE_LENGTH = Opcode.VARIABLE_LENGTH
_REF_MASK = 0xFFFFFFFF
_TAGS32 = struct.Struct(">IHH")  # expected initial ref tag, expected app tag, app tag mask

_FAILED = {
    dif.Check.GUARD: Asc.LOGICAL_BLOCK_GUARD_CHECK_FAILED,
    dif.Check.APP: Asc.LOGICAL_BLOCK_APPLICATION_TAG_CHECK_FAILED,
    dif.Check.REF: Asc.LOGICAL_BLOCK_REFERENCE_TAG_CHECK_FAILED,
}


@dataclass(frozen=True, slots=True)
class Tags32:
    """The expected tags a 32-byte CDB carries (bytes 20..27)."""

    ref_tag: int
    app_tag: int
    app_mask: int


def decode_tags32(cdb: bytes) -> Tags32 | None:
    """Expected tags of a 32-byte CDB, ``None`` for any other CDB."""
    if cdb[0] != VARIABLE_LENGTH:
        return None
    return Tags32(*_TAGS32.unpack_from(cdb, 20))


@dataclass(frozen=True, slots=True)
class PiCheck:
    """What one command on a PI-formatted LU does with protection information."""

    ptype: int
    #: The protect field is non-zero: tuples travel interleaved after every block.
    transfer: bool
    guard: bool
    app: bool
    ref: bool
    #: The command's first LBA, block 0 of ``ref_at`` and ``verify``.
    lba: int
    #: Expected (and generated) reference tag of the command's first block.
    ref_tag: int
    app_tag: int = 0
    app_mask: int = 0

    def ref_at(self, index: int) -> int:
        """The reference tag of block ``index`` of the command."""
        return (self.ref_tag + index) & _REF_MASK

    def verify(
        self, data: dif.Buffers, pi: dif.Buffers, block_size: int, index: int
    ) -> dif.PiError | None:
        """Check the blocks from ``index`` of the command (``None``: all pass or no checks)."""
        if not (self.guard or self.app or self.ref):
            return None
        return dif.verify(
            data,
            pi,
            block_size,
            ptype=self.ptype,
            guard=self.guard,
            app=self.app,
            ref=self.ref,
            ref_tag=self.ref_at(index),
            app_tag=self.app_tag,
            app_mask=self.app_mask,
        )


def protect_check(
    ptype: int, protect: int, lba: int, tags: Tags32 | None, field: tuple[int, int]
) -> PiCheck | None:
    """The ``PiCheck`` for a command, ``None`` on a LU formatted without PI.

    ``field`` is where the protect field sits (byte, bit 7) for the INVALID FIELD IN CDB
    pointer. Writing with protect 0 makes no checks (the target generates the tuples); the
    returned checks are then those of reading the range back.
    """
    if ptype == 0:
        if protect:
            raise CheckCondition.invalid_field(*field)
        return None
    if protect > 5:
        raise CheckCondition.invalid_field(*field)
    if ptype == 2 and protect and tags is None:
        raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
    guard = protect in (0, 1, 4, 5)
    tagged = protect in (0, 1, 2, 5)
    ref = tagged and (ptype == 1 or (ptype == 2 and tags is not None))
    app = tagged and tags is not None
    if tags is not None:
        return PiCheck(ptype, protect != 0, guard, app, ref, lba, tags.ref_tag, tags.app_tag,
                       tags.app_mask)  # fmt: skip
    return PiCheck(ptype, protect != 0, guard, app, ref, lba, lba & _REF_MASK)


def default_check(ptype: int, lba: int) -> PiCheck:
    """Reading a range with no command's protect field (protect 0, no 32-byte tags)."""
    return PiCheck(ptype, False, True, False, ptype == 1, lba, lba & _REF_MASK)


def pi_failure(error: dif.PiError, first_lba: int) -> CheckCondition:
    """ABORTED COMMAND, 10/01..03, the failing LBA in INFORMATION (SBC-4 4.22.3)."""
    return CheckCondition.of(
        SenseKey.ABORTED_COMMAND, _FAILED[error.check], information=first_lba + error.index
    )


# ---- FORMAT UNIT -----------------------------------------------------------------------------

#: FORMAT UNIT CDB byte 1.
_FMTPINFO_SHIFT = 6
_LONGLIST = 0x20
_FMTDATA = 0x10
#: Parameter list header byte 1.
_FOV = 0x80
_IP = 0x08
#: Longest defect list we take (and ignore: a virtual medium has no defects).
_MAX_DEFECT_LIST = 64 * 1024


def _param_error(byte: int, bit: int | None = None) -> CheckCondition:
    sks = field_pointer(byte, bit, in_cdb=False)
    return CheckCondition(
        SenseData(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, None, sks)
    )


def new_format(protect_capable: bool, fmtpinfo: int, pfu: int) -> int:
    """The protection type FORMAT UNIT asks for (SBC-4 table "FMTPINFO field and PROTECTION
    FIELD USAGE field"), or the CHECK CONDITION it gets. Types 1, 2 and 3 (SPT 111b)."""
    if fmtpinfo == 0:
        if pfu:
            raise _param_error(0, 2)
        return 0
    if fmtpinfo == 1 or not protect_capable:
        raise CheckCondition.invalid_field(1, 7)
    if fmtpinfo == 2:
        if pfu:
            raise _param_error(0, 2)
        return 1
    if pfu > 1:
        raise _param_error(0, 2)
    return 2 if pfu == 0 else 3


async def cmd_format_unit(lu: LogicalUnit, cmd: Cmd) -> None:
    """FORMAT UNIT (SBC-4 5.4): set or remove the protection format.

    Every tuple becomes the escape value (FFFFFFFF_FFFFFFFFh) whatever the new format; the
    user data is kept (a virtual medium has nothing to certify, and erasing is SANITIZE's
    job). An initialization pattern is not supported; a defect list is read and ignored. The
    range lock is held over the whole medium, so no command sees half a format.
    """
    cdb = cmd.cdb
    fmtpinfo = cdb[1] >> _FMTPINFO_SHIFT
    if cdb[4] & 0x03:
        raise CheckCondition.invalid_field(4, 1)  # FFMT: no fast format
    pfu = 0
    if cdb[1] & _FMTDATA:
        long = bool(cdb[1] & _LONGLIST)
        size = 8 if long else 4
        cmd.task.transfer_length = size
        header = await lu._receive_bytes(cmd, size)
        if header is None:
            return
        pfu = header[0] & 0x07
        if header[0] & 0xF8:
            raise _param_error(0)
        if header[1] & _IP:
            raise _param_error(1, 3)  # no initialization pattern
        if not header[1] & _FOV and header[1] & 0x70:
            raise _param_error(1)  # DPRY/DCRT/STPF need FOV
        if long and header[3]:
            raise _param_error(3)  # P_I_INFORMATION / PROTECTION INTERVAL EXPONENT: 0 only
        defects = int.from_bytes(header[4:8] if long else header[2:4], "big")
        if defects > _MAX_DEFECT_LIST:
            raise CheckCondition.illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        cmd.task.transfer_length = size + defects
        if defects:
            sg = await lu._receive(cmd, size, defects)
            if sg is None:
                return
            sg.release()
    ptype = new_format(lu.protection is not None, fmtpinfo, pfu)
    store = lu.protection
    if store is None:
        return  # formatted without PI, as it was
    changed = ptype != store.ptype
    end = lu.num_blocks * lu.block_size
    failure: str | None = None
    async with lu.ranges.hold(0, end):
        try:
            await lu._run_pi(store.format, ptype)
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            failure = str(exc)
    if failure is not None:
        log.warning("FORMAT UNIT failed on %s: %s", lu.identity, failure)
        raise CheckCondition.of(SenseKey.MEDIUM_ERROR, Asc.FORMAT_COMMAND_FAILED)
    if changed:
        # READ CAPACITY(16) now says something else: tell the other nexuses.
        lu.capacity_changed(cmd.nexus_key)
