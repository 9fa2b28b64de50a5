"""Reservations of one logical unit: SPC-2 RESERVE/RELEASE and SPC-3 persistent reservations.

Sans-I/O: ``LogicalUnit`` decodes nothing here; it hands over CDBs, the nexus key and the
PERSISTENT RESERVE OUT parameter list, and gets back parameter data, a ``Conflict`` (status
RESERVATION CONFLICT) or a ``CheckCondition``. Unit attentions for other nexuses go through the
``queue_ua`` callback, so they land in the LU's per-nexus queues.

Registrations are per I_T nexus, keyed by the nexus key (iSCSI: "<initiator>,i,0x<isid>", which
is also the TransportID READ FULL STATUS reports). One target port, so ALL_TG_PT and SPEC_I_PT
are not supported (REPORT CAPABILITIES says ATP_C=0, SIP_C=0).

PREEMPT AND ABORT: SPC-4 wants the preempted nexuses' tasks aborted. ``abort_hook`` is called with
their keys (synchronously, inside the PROUT command); the iSCSI server implements it like ABORT
TASK SET for those sessions on this LUN (``TargetServer._abort_preempted``), so a WRITE that
passed the conflict check before the preemption cannot land after it. Without a hook (unit
tests, other transports) it is a no-op: the preempted nexus still gets RESERVATION CONFLICT from
its next command, but commands already running finish.

APTPL: with a ``state_path`` (beside a file backstore's image), registrations and the
reservation are written as JSON on every change while APTPL is set and loaded at creation. RAM
LUNs have no path, so REPORT CAPABILITIES shows PTPL_C=0 and APTPL=1 is INVALID FIELD IN
PARAMETER LIST (SPC-4 6.16.3).
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sgtarget.scsi.constants import Asc, Opcode, SenseKey
from sgtarget.scsi.sense import CheckCondition, SenseData, field_pointer

log = logging.getLogger(__name__)

PRIN = 0x5E
PROUT = 0x5F
RESERVE_6 = 0x16
RELEASE_6 = 0x17
RESERVE_10 = 0x56
RELEASE_10 = 0x57

#: PROUT parameter list: reservation key, service action reservation key, obsolete,
#: flags (SPEC_I_PT, ALL_TG_PT, APTPL), reserved, obsolete.
_PROUT_PARAMS = struct.Struct(">QQ4xBx2x")
PROUT_PARAM_LEN = _PROUT_PARAMS.size  # 24
_SPEC_I_PT = 0x08
_ALL_TG_PT = 0x04
_APTPL = 0x01
_HDR = struct.Struct(">II")  # PRGENERATION, ADDITIONAL LENGTH
#: READ RESERVATION descriptor: key, obsolete, reserved, scope/type, obsolete.
_RES_DESC = struct.Struct(">Q4xxB2x")
#: READ FULL STATUS descriptor: key, reserved, ALL_TG_PT/R_HOLDER, scope/type, reserved,
#: relative target port id, additional descriptor length.
_FULL_DESC = struct.Struct(">Q4xBB4xHI")


class PrType(enum.IntEnum):
    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        return self >= PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS

    @property
    def registrants_only(self) -> bool:
        """Registered nexuses get holder access (RO and AR types)."""
        return self >= PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY

    @property
    def exclusive_access(self) -> bool:
        return self in (
            PrType.EXCLUSIVE_ACCESS,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )


class PrinAction(enum.IntEnum):
    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class ProutAction(enum.IntEnum):
    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06


#: Type mask of REPORT CAPABILITIES (SPC-4 6.15.4): all six types.
TYPE_MASK = 0xEA01
#: ALLOW COMMANDS 001b: TEST UNIT READY passes WRITE EXCLUSIVE and EXCLUSIVE ACCESS.
_ALLOW_COMMANDS = 0x1

# Which commands a reservation held by someone else lets through (SPC-4 5.13.1 table 65,
# SBC-4 4.17). Opcodes not listed (writes, MODE SELECT, SYNCHRONIZE CACHE, anything new, ...)
# conflict under every type, which is the safe default for commands added later.
_ALWAYS_ALLOWED = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.TEST_UNIT_READY,
        Opcode.READ_CAPACITY_10,
        Opcode.MAINTENANCE_IN,  # REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS
        0x4D,  # LOG SENSE
        0xAB,  # READ MEDIA SERIAL NUMBER
        PRIN,
        PROUT,  # checked by its own rules (reservation key)
    }
)
#: Allowed through WRITE EXCLUSIVE types, conflicting under EXCLUSIVE ACCESS types.
_READS = frozenset(
    {
        Opcode.READ_6,
        Opcode.READ_10,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.VERIFY_10,
        Opcode.VERIFY_12,
        Opcode.VERIFY_16,
        Opcode.PRE_FETCH_10,
        Opcode.PRE_FETCH_16,
        Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10,
        Opcode.READ_DEFECT_DATA_10,
        Opcode.READ_DEFECT_DATA_12,
        0x3C,  # READ BUFFER
        0x1C,  # RECEIVE DIAGNOSTIC RESULTS
    }
)
#: What a nexus may still do while another holds an SPC-2 reservation (SPC-2 5.5.1).
_SPC2_ALLOWED = frozenset(
    {
        Opcode.INQUIRY,
        Opcode.REQUEST_SENSE,
        Opcode.REPORT_LUNS,
        Opcode.MAINTENANCE_IN,
        0x4D,  # LOG SENSE
        0xAB,  # READ MEDIA SERIAL NUMBER
        RELEASE_6,
        RELEASE_10,
    }
)
_SERVICE_ACTION_IN_16 = 0x9E
_READ_CAPACITY_16 = 0x10


class Conflict(Exception):
    """The command ends with status RESERVATION CONFLICT (no sense data)."""


def _bad_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        SenseData(
            SenseKey.ILLEGAL_REQUEST,
            Asc.INVALID_FIELD_IN_PARAMETER_LIST,
            None,
            field_pointer(byte, bit, in_cdb=False),
        )
    )


def transport_id(nexus_key: str) -> bytes:
    """iSCSI TransportID, initiator port format (SPC-4 7.6.4.6): the key is the port name."""
    name = nexus_key.encode("utf-8") + b"\0"
    name = name.ljust(max(20, -(-len(name) // 4) * 4), b"\0")
    return bytes((0x40 | 0x05, 0)) + len(name).to_bytes(2, "big") + name


@dataclass(slots=True)
class _Reservation:
    #: Holding nexus; ``None`` for the all-registrants types (every registrant holds it).
    holder: str | None
    type: PrType


class Reservations:
    """SPC-2 and persistent reservation state of one logical unit."""

    def __init__(
        self,
        *,
        queue_ua: Callable[[str, Asc], None],
        state_path: str | None = None,
        relative_port_id: Callable[[], int] = lambda: 1,
    ) -> None:
        self._queue_ua = queue_ua
        self.state_path = state_path
        self._relative_port_id = relative_port_id
        #: SPC-2 RESERVE holder.
        self.spc2_holder: str | None = None
        #: nexus key -> reservation key, in registration order.
        self.registrations: dict[str, int] = {}
        self.reservation: _Reservation | None = None
        self.generation = 0
        self.aptpl = False
        #: Called with the nexus keys whose tasks PREEMPT AND ABORT aborts (see module doc).
        self.abort_hook: Callable[[set[str]], None] | None = None
        if state_path is not None:
            self._load()

    # ---- conflicts -----------------------------------------------------------------------

    def conflicts(self, cdb: bytes, key: str) -> bool:
        """Whether ``cdb`` from nexus ``key`` must end in RESERVATION CONFLICT."""
        op = cdb[0]
        if self.spc2_holder is not None and self.spc2_holder != key:
            return op not in _SPC2_ALLOWED
        if op in (RESERVE_6, RESERVE_10, RELEASE_6, RELEASE_10):
            # SPC-4 5.13.3: while anyone is registered, SPC-2 commands conflict for everyone.
            return bool(self.registrations)
        res = self.reservation
        if res is None or self._holds(res, key):
            return False
        if op in _ALWAYS_ALLOWED:
            return False
        reads = _READS
        if op == _SERVICE_ACTION_IN_16:
            if len(cdb) > 1 and cdb[1] & 0x1F == _READ_CAPACITY_16:
                return False
            reads = _READS | {op}  # GET LBA STATUS reads like READ does
        if op == Opcode.VARIABLE_LENGTH and cdb[8:10] in (b"\x00\x09", b"\x00\x0a"):
            reads = _READS | {op}  # READ(32), VERIFY(32) read like READ does
        if op == Opcode.START_STOP_UNIT and len(cdb) > 4 and cdb[4] & 0xF1 == 0x01:
            return False  # START=1 with no power condition is allowed; stopping is not
        if res.type.registrants_only and key in self.registrations:
            return False
        return res.type.exclusive_access or op not in reads

    def _holds(self, res: _Reservation, key: str) -> bool:
        if res.holder is None:
            return key in self.registrations
        return res.holder == key

    # ---- SPC-2 RESERVE / RELEASE ---------------------------------------------------------

    def reserve(self, cdb: bytes, key: str) -> None:
        if cdb[1] & 0x13:
            # 3RDPTY / LONGID (and RESERVE(6)'s obsolete extents): not supported.
            raise CheckCondition.invalid_field(1)
        if self.spc2_holder not in (None, key):
            raise Conflict
        self.spc2_holder = key

    def release(self, cdb: bytes, key: str) -> None:
        if cdb[1] & 0x13:
            raise CheckCondition.invalid_field(1)
        # Releasing a reservation one does not hold is GOOD and changes nothing (SPC-2 7.17).
        if self.spc2_holder == key:
            self.spc2_holder = None

    def reset(self) -> None:
        """LUN reset, target warm or cold reset: SPC-2 reservations go, persistent ones stay."""
        self.spc2_holder = None

    def nexus_lost(self, key: str) -> None:
        """I_T nexus loss (and logout): its SPC-2 reservation goes; registrations stay."""
        if self.spc2_holder == key:
            self.spc2_holder = None

    # ---- PERSISTENT RESERVE IN -----------------------------------------------------------

    def persistent_reserve_in(self, action: int, key: str) -> bytes:
        if action == PrinAction.READ_KEYS:
            keys = b"".join(k.to_bytes(8, "big") for k in self.registrations.values())
            return _HDR.pack(self.generation, len(keys)) + keys
        if action == PrinAction.READ_RESERVATION:
            res = self.reservation
            if res is None:
                return _HDR.pack(self.generation, 0)
            rkey = 0 if res.holder is None else self.registrations[res.holder]
            return _HDR.pack(self.generation, _RES_DESC.size) + _RES_DESC.pack(rkey, res.type)
        if action == PrinAction.REPORT_CAPABILITIES:
            # CRH=1 (SPC-4 5.13.3 exceptions to RESERVE/RELEASE), SIP_C=0, ATP_C=0.
            flags = 0x10 | (0x01 if self.state_path is not None else 0)
            allow = 0x80 | (_ALLOW_COMMANDS << 4) | (0x01 if self.aptpl else 0)
            return struct.pack(">HBBH2x", 8, flags, allow, TYPE_MASK)
        if action == PrinAction.READ_FULL_STATUS:
            body = bytearray()
            res = self.reservation
            port = self._relative_port_id()
            for nexus, rkey in self.registrations.items():
                holder = res is not None and self._holds(res, nexus)
                tid = transport_id(nexus)
                body += _FULL_DESC.pack(
                    rkey,
                    0x01 if holder else 0x00,
                    res.type if holder and res is not None else 0,
                    port,
                    len(tid),
                )
                body += tid
            return _HDR.pack(self.generation, len(body)) + bytes(body)
        raise CheckCondition.invalid_field(1, 4)

    # ---- PERSISTENT RESERVE OUT ----------------------------------------------------------

    def persistent_reserve_out(self, cdb: bytes, key: str, params: bytes) -> None:
        action = cdb[1] & 0x1F
        scope, type_ = cdb[2] >> 4, cdb[2] & 0x0F
        if len(params) != PROUT_PARAM_LEN:
            raise CheckCondition.illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        rk, sark, flags = _PROUT_PARAMS.unpack(params)
        if flags & _SPEC_I_PT:
            raise _bad_param(20, 3)
        if flags & _ALL_TG_PT:
            raise _bad_param(20, 2)
        if self.spc2_holder is not None and self.spc2_holder != key:
            raise Conflict
        registering = action in (
            ProutAction.REGISTER,
            ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
        )
        if registering and flags & _APTPL and self.state_path is None:
            raise _bad_param(20, 0)  # PTPL_C=0: this LU cannot persist
        if action == ProutAction.REGISTER:
            self._register(key, rk, sark, bool(flags & _APTPL), ignore=False)
        elif action == ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY:
            self._register(key, rk, sark, bool(flags & _APTPL), ignore=True)
        else:
            if self.registrations.get(key) != rk:
                raise Conflict  # not registered, or the wrong key (SPC-4 5.13.5)
            if action == ProutAction.RESERVE:
                self._reserve(key, self._type(scope, type_))
            elif action == ProutAction.RELEASE:
                self._release(key, scope, type_)
            elif action == ProutAction.CLEAR:
                self._clear(key)
            elif action in (ProutAction.PREEMPT, ProutAction.PREEMPT_AND_ABORT):
                abort = action == ProutAction.PREEMPT_AND_ABORT
                self._preempt(key, sark, scope, type_, abort=abort)
            else:
                raise CheckCondition.invalid_field(1, 4)
        self._save()

    @staticmethod
    def _type(scope: int, type_: int) -> PrType:
        if scope != 0:
            raise CheckCondition.invalid_field(2, 7)  # LU_SCOPE only
        try:
            return PrType(type_)
        except ValueError:
            raise CheckCondition.invalid_field(2, 3) from None

    def _register(self, key: str, rk: int, sark: int, aptpl: bool, *, ignore: bool) -> None:
        current = self.registrations.get(key)
        if not ignore and rk != (current if current is not None else 0):
            raise Conflict
        if current is None:
            if sark == 0:
                return  # unregistering an unregistered nexus: GOOD, nothing changes
            self.registrations[key] = sark
        elif sark == 0:
            self._unregister(key)
        else:
            self.registrations[key] = sark
        self.aptpl = aptpl
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def _unregister(self, key: str) -> None:
        del self.registrations[key]
        res = self.reservation
        if res is None:
            return
        if res.holder == key or (res.holder is None and not self.registrations):
            self.reservation = None
            # SPC-4 5.13.11.2.2: losing a registrants-only reservation this way is news to the
            # remaining registrants.
            if res.type in (
                PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            ):
                self._ua(self.registrations, Asc.RESERVATIONS_RELEASED)

    def _reserve(self, key: str, type_: PrType) -> None:
        res = self.reservation
        if res is not None:
            if self._holds(res, key) and res.type == type_:
                return
            raise Conflict
        self.reservation = _Reservation(None if type_.all_registrants else key, type_)

    def _release(self, key: str, scope: int, type_: int) -> None:
        res = self.reservation
        if res is None or not self._holds(res, key):
            return  # GOOD, nothing to release (SPC-4 5.13.11.2.2)
        if scope != 0 or type_ != res.type:
            raise CheckCondition.illegal(Asc.INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self.reservation = None
        if res.type not in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
            self._ua((k for k in self.registrations if k != key), Asc.RESERVATIONS_RELEASED)

    def _clear(self, key: str) -> None:
        others = [k for k in self.registrations if k != key]
        self.registrations.clear()
        self.reservation = None
        self._ua(others, Asc.RESERVATIONS_PREEMPTED)
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def _preempt(self, key: str, sark: int, scope: int, type_: int, *, abort: bool) -> None:
        res = self.reservation
        if res is not None and res.holder is None and sark == 0:
            # All-registrants reservation, SARK 0: everyone else goes, a new reservation is made.
            new_type = self._type(scope, type_)
            victims = {k for k in self.registrations if k != key}
            self.reservation = _Reservation(None if new_type.all_registrants else key, new_type)
        elif res is not None and res.holder is not None and sark == self.registrations[res.holder]:
            # Preempting the holder: its registrations go and we take over the reservation.
            new_type = self._type(scope, type_)
            victims = {k for k, v in self.registrations.items() if v == sark and k != key}
            self.reservation = _Reservation(None if new_type.all_registrants else key, new_type)
            if new_type != res.type:
                survivors = set(self.registrations) - victims - {key}
                self._ua(survivors, Asc.RESERVATIONS_RELEASED)
        else:
            if sark == 0:
                raise _bad_param(8)
            victims = {k for k, v in self.registrations.items() if v == sark}
            if not victims:
                raise Conflict
            victims.discard(key)
        for victim in victims:
            del self.registrations[victim]
        self._ua(victims, Asc.REGISTRATIONS_PREEMPTED)
        self.generation = (self.generation + 1) & 0xFFFFFFFF
        if abort and victims and self.abort_hook is not None:
            self.abort_hook(victims)

    def _ua(self, keys: Iterable[str], asc: Asc) -> None:
        for k in list(keys):
            self._queue_ua(k, asc)

    # ---- APTPL ---------------------------------------------------------------------------

    def _save(self) -> None:
        path = self.state_path
        if path is None:
            return
        if not self.aptpl:
            # Nothing may survive a restart: drop what an earlier APTPL=1 left behind.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        res = self.reservation
        state = {
            "generation": self.generation,
            "registrations": [[k, v] for k, v in self.registrations.items()],
            "reservation": None if res is None else {"holder": res.holder, "type": int(res.type)},
        }
        tmp = f"{path}.tmp"
        # Small and rare (PROUT only): written inline, atomically, so a crash leaves old or new.
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self) -> None:
        assert self.state_path is not None
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
            regs = {str(k): int(v) for k, v in state["registrations"]}
            raw = state["reservation"]
            res = None if raw is None else _Reservation(raw["holder"], PrType(raw["type"]))
            generation = int(state["generation"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable reservation state %s: %s", self.state_path, exc)
            return
        self.registrations = regs
        self.reservation = res if res is None or res.holder in (None, *regs) else None
        self.generation = generation
        self.aptpl = True


def state_path_for(backing_path: str | None) -> str | None:
    """Where APTPL state of a LU on ``backing_path`` lives: beside it."""
    return None if backing_path is None else f"{backing_path}.pr.json"
