"""A SCSI logical unit: SPC-5/SBC-4 emulation over a ``Backstore``.

Every command goes through one opcode table (``COMMANDS``): opcode (+ service action) ->
handler, CDB length and CDB usage mask. Dispatch and REPORT SUPPORTED OPERATION CODES both read
it, so what we report is what we execute. Adding a command is a ``CommandSpec`` plus a handler.

Handlers raise ``CheckCondition`` to terminate a command; ``LogicalUnit.execute`` turns that
(and anything else) into status and sense and never lets an exception escape.

Payload never goes through a contiguous buffer: READ and WRITE stream through ``IO_WINDOW``-sized
scatter lists from the transport's pool, so an 8 MiB command holds at most 1 MiB at a time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import struct
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sgtarget.backstores.base import Backstore, BackstoreBusy, BackstoreError, PiBackstoreIO
from sgtarget.datapath import PoolExhausted, ScatterList, bounce, dif
from sgtarget.scsi.cdb import (
    RW10,
    RW16,
    BlockCdb,
    decode_block,
    decode_inquiry,
    decode_mode_sense,
    decode_rsoc,
    u32,
)
from sgtarget.scsi.constants import (
    DEVICE_TYPE_DISK,
    IO_WINDOW,
    MAX_PHYSICAL_BLOCK_SIZE,
    PERIPHERAL_NOT_CONNECTED,
    Asc,
    MaintenanceIn,
    ModePage,
    Opcode,
    PageControl,
    SenseKey,
    ServiceActionIn16,
    Status,
    VariableLength,
    VersionDescriptor,
    VpdPage,
    io_window,
)
from sgtarget.scsi.lun import encode_lun
from sgtarget.scsi.modeselect import check_cdb, decode_mode_select, parse_mode_select
from sgtarget.scsi.protection import (
    PiCheck,
    cmd_format_unit,
    decode_tags32,
    default_check,
    pi_failure,
    protect_check,
)
from sgtarget.scsi.provisioning import (
    cmd_get_lba_status,
    cmd_unmap,
    cmd_write_same,
    fill_block_limits,
    provisioning_vpd_body,
    rc16_provisioning,
)
from sgtarget.scsi.rangelock import Held, RangeLock
from sgtarget.scsi.reservations import (
    PROUT_PARAM_LEN,
    Conflict,
    PrinAction,
    ProutAction,
    Reservations,
    state_path_for,
)
from sgtarget.scsi.sanitize import BDC_ERASE_READS, SanitizeAction, Sanitizer, cmd_sanitize
from sgtarget.scsi.sense import NO_SENSE, CheckCondition, SenseData
from sgtarget.scsi.task import (
    NOW_DECLINED,
    NOW_DONE,
    NOW_PENDING,
    BlockingRunner,
    DataChannel,
    DataDirection,
    ImmediateChannel,
    Task,
    run_inline,
)
from sgtarget.scsi.writes import cmd_orwrite, cmd_write_atomic, fill_atomic_limits
from sgtarget.scsi.xcopy import (
    CopyResults,
    CopyResultsAction,
    cmd_extended_copy,
    cmd_receive_copy_results,
)

log = logging.getLogger(__name__)

#: Per event loop (one pool per loop): the lock PI-checked WRITEs hold their Data-Out under.
_PI_HOLDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _pi_hold() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _PI_HOLDS.get(loop)
    if lock is None:
        lock = _PI_HOLDS[loop] = asyncio.Lock()
    return lock


#: Largest single command we accept (VPD B0h MAXIMUM TRANSFER LENGTH is derived from it).
MAX_TRANSFER_BYTES = 8 * 1024 * 1024
#: Default physical block size (``physical_block_size=``; READ CAPACITY(16) LBPPBE): the
#: page size of the page caches and filesystems under the backstores, so initiators align
#: their I/O to it.
PHYSICAL_BLOCK_SIZE = 4096
#: Key for tasks that arrive without a nexus (tests, internal callers).
DEFAULT_NEXUS_KEY = "<no nexus>"
# Bound once for ``execute_now``, which compares with them per command.
_DATA_IN = DataDirection.READ
_DATA_OUT = DataDirection.WRITE
_GOOD = Status.GOOD
#: IEEE company ID in our NAA-6 designators. We hold no OUI; uniqueness comes from the 100
#: hashed bits of the vendor-specific fields, so the value only has to be stable.
NAA_COMPANY_ID = 0x000000

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_RC10 = struct.Struct(">II")
#: READ CAPACITY(16): returned LBA, block length, P_TYPE/PROT_EN, P_I_EXP/LBPPBE,
#: LBPME/LBPRZ/lowest aligned LBA, 16 reserved bytes.
_RC16 = struct.Struct(">QIBBH16x")
#: RSOC all-commands descriptor: opcode, reserved, SA, reserved, CTDP/SERVACTV, CDB length.
_RSOC_DESC = struct.Struct(">BxHxBH")
#: Command timeouts descriptor: length (0x0A), reserved, command specific, nominal, recommended.
_RSOC_TIMEOUTS = struct.Struct(">HxBII")
_MODE6_HDR = struct.Struct(">BBBB")
_MODE10_HDR = struct.Struct(">HBBBxH")
_SHORT_BLOCK_DESC = struct.Struct(">IxBH")  # block count, (block length as 3 bytes: hi, lo16)

#: ILLEGAL REQUEST conditions used more than once.
_LBA_OUT_OF_RANGE = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
_BAD_IU = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)


class LunDirectory(Protocol):
    """What an LU needs to know about the target it belongs to."""

    @property
    def name(self) -> str: ...

    @property
    def relative_port_id(self) -> int: ...

    def lun_numbers(self) -> Iterable[int]: ...

    def logical_units(self) -> Iterable[LogicalUnit]:
        """Every LU of the target (EXTENDED COPY resolves its copy targets among them)."""
        ...


class Cmd:
    """One command being executed: the task, its channel and the decoded opcode entry."""

    __slots__ = ("cdb", "channel", "nexus_key", "spec", "task")

    def __init__(self, task: Task, channel: DataChannel, spec: CommandSpec, nexus_key: str) -> None:
        self.task = task
        self.channel = channel
        self.cdb = task.cdb
        self.spec = spec
        self.nexus_key = nexus_key

    def aborted(self) -> bool:
        """Checked after every await (a call, so type checkers do not narrow it away)."""
        return self.task.aborted


Handler = Callable[["LogicalUnit", Cmd], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    opcode: int
    #: Service action (byte 1 bits 4..0) for opcodes that have them, else ``None``.
    service_action: int | None
    name: str
    #: CDB usage data for RSOC; its length is the CDB length and byte 0 the opcode.
    usage: bytes
    handler: Handler
    #: INQUIRY, REPORT LUNS and REQUEST SENSE run even with a unit attention pending.
    ua_exempt: bool = False
    #: Recommended timeout in seconds for RSOC's command timeouts descriptor (0: unknown).
    timeout: int = 0
    #: For commands only some LUs have (UNMAP where LBPU): RSOC leaves them out elsewhere,
    #: and their handler answers INVALID COMMAND OPERATION CODE there.
    supported: Callable[[LogicalUnit], bool] | None = None
    #: Modifies the medium: refused with DATA PROTECT on a write-protected (``readonly``) LU
    #: and with NOT READY while the medium is ejected. Set it on every new writing command.
    writes: bool = False
    #: Reads or needs the medium: NOT READY, MEDIUM NOT PRESENT while it is ejected.
    medium: bool = False
    #: Byte of the RDPROTECT/WRPROTECT/VRPROTECT field (bits 7..5) of commands that take
    #: protection information: RSOC shows it in the usage data of PI-capable LUs.
    protect_byte: int | None = None

    def usage_for(self, lu: LogicalUnit) -> bytes:
        """CDB usage data as ``lu`` supports the command (with or without protect fields)."""
        if self.protect_byte is None or lu.protection is None:
            return self.usage
        usage = bytearray(self.usage)
        usage[self.protect_byte] |= 0xE0
        return bytes(usage)

    def supported_by(self, lu: LogicalUnit) -> bool:
        return self.supported is None or self.supported(lu)

    @property
    def cdb_len(self) -> int:
        return len(self.usage)


class OpcodeTable:
    """The dispatch table: (opcode, service action | None) -> ``CommandSpec``."""

    def __init__(self, specs: Iterable[CommandSpec]) -> None:
        self._by_key: dict[tuple[int, int | None], CommandSpec] = {}
        self._sa_opcodes: set[int] = set()
        for spec in specs:
            key = (spec.opcode, spec.service_action)
            if key in self._by_key:
                raise ValueError(f"duplicate command {spec.name}")
            if spec.usage[0] != spec.opcode:
                raise ValueError(f"usage data of {spec.name} must start with its opcode")
            self._by_key[key] = spec
            if spec.service_action is not None:
                self._sa_opcodes.add(spec.opcode)
        if any((op, None) in self._by_key for op in self._sa_opcodes):
            raise ValueError("an opcode either has service actions or not")

    def has_service_actions(self, opcode: int) -> bool:
        return opcode in self._sa_opcodes

    def get(self, opcode: int, service_action: int | None = None) -> CommandSpec | None:
        return self._by_key.get((opcode, service_action))

    def lookup(self, cdb: bytes) -> CommandSpec:
        """The entry for ``cdb`` or the CHECK CONDITION an unsupported command gets."""
        opcode = cdb[0]
        if opcode == Opcode.VARIABLE_LENGTH:
            # 32-byte CDBs: a 16-bit service action in bytes 8..9 (SPC-5 4.2.3).
            sa = int.from_bytes(cdb[8:10], "big") if len(cdb) >= 10 else None
            spec = self._by_key.get((opcode, sa))
            if spec is None:
                raise CheckCondition.invalid_field(8)
            return spec
        if opcode in self._sa_opcodes:
            spec = self._by_key.get((opcode, cdb[1] & 0x1F)) if len(cdb) > 1 else None
            if spec is None:
                raise CheckCondition.invalid_field(1, 4)
            return spec
        spec = self._by_key.get((opcode, None))
        if spec is None:
            raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
        return spec

    def __iter__(self) -> Iterator[CommandSpec]:
        return iter(sorted(self._by_key.values(), key=lambda s: (s.opcode, s.service_action or 0)))


def _pad(text: str, n: int) -> bytes:
    return text.encode("ascii", "replace")[:n].ljust(n, b" ")


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


async def send_reply(cmd: Cmd, data: bytes, alloc_len: int) -> None:
    """Send an emulated reply truncated to the allocation length."""
    task = cmd.task
    n = min(alloc_len, len(data))
    task.transfer_length = n
    if n == 0:
        return
    sg = await cmd.channel.alloc(n)
    if task.aborted:
        sg.release()
        return
    # Emulated parameter data is built in Python, so it must be copied into the pool once.
    sg.copy_in(memoryview(data)[:n], reason="emulated-reply", direction="out")
    await cmd.channel.send(sg, 0, n, last=True)


def report_luns_data(cdb: bytes, luns: Iterable[int]) -> tuple[bytes, int]:
    """REPORT LUNS parameter data and allocation length (SPC-5 6.33)."""
    select = cdb[2]
    alloc = u32(cdb, 6)
    if select not in (0x00, 0x01, 0x02):
        raise CheckCondition.invalid_field(2)
    if alloc < 16:
        raise CheckCondition.invalid_field(6)
    # 0x01 asks for well-known LUs only; we have none.
    entries = b"" if select == 0x01 else b"".join(encode_lun(n) for n in sorted(luns))
    return _U32.pack(len(entries)) + bytes(4) + entries, alloc


def not_connected_inquiry() -> bytes:
    """Standard INQUIRY data for a LUN that does not exist (SPC-5 6.7.2: qualifier 011b)."""
    data = bytearray(36)
    data[0] = PERIPHERAL_NOT_CONNECTED
    data[3] = 0x02
    data[4] = len(data) - 5
    return bytes(data)


class _NexusState:
    """Unit attentions queued for one I_T nexus."""

    __slots__ = ("pending",)

    def __init__(self, first: Asc | None) -> None:
        self.pending: list[Asc] = [first] if first is not None else []

    def add_reset(self, asc: Asc) -> None:
        # A newer reset supersedes an older one still queued (both are ASC 29h).
        self.pending = [a for a in self.pending if a.asc != 0x29]
        self.pending.insert(0, asc)


class LogicalUnit:
    """A direct-access block device (SBC-4) on a backstore."""

    def __init__(
        self,
        backstore: Backstore,
        *,
        runner: BlockingRunner,
        identity: str,
        block_size: int | None = None,
        vendor: str = "SGTARGET",
        product: str = "VIRTUAL-DISK",
        revision: str = "0001",
        thin: bool = False,
        readonly: bool = False,
        removable: bool = False,
        unmap: bool = True,
        physical_block_size: int | None = None,
    ) -> None:
        # Default: the block size the backstore's medium is formatted with (``bs=``).
        if block_size is None:
            block_size = backstore.block_size
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        # Default: PHYSICAL_BLOCK_SIZE, or one logical block if that is larger.
        pbs = physical_block_size
        if pbs is None:
            pbs = max(PHYSICAL_BLOCK_SIZE, block_size)
        if not block_size <= pbs <= MAX_PHYSICAL_BLOCK_SIZE or pbs & (pbs - 1):
            raise ValueError(
                f"physical block size {pbs} is not a power of two from the logical block size "
                f"({block_size}) to {MAX_PHYSICAL_BLOCK_SIZE}"
            )
        self.backstore = backstore
        #: The backstore's operations as awaitables (a thread pool for blocking kinds).
        self.io = backstore.io(runner)
        #: Protection information beside the data (``pi=``); ``None``: the LU has no PI and
        #: cannot be formatted with it. Its ``ptype`` (0 when formatted without) is current.
        self.protection = backstore.protection
        #: Set when the backstore stores the tuples itself and takes them with the data in
        #: one operation (a ring LUN with ``handler_pi=1``): every read and write of a
        #: PI-formatted LU then goes through ``readv_pi``/``writev_pi`` instead of the data
        #: operation followed by ``protection.read``/``write``. The checks stay here.
        self._pi_data: PiBackstoreIO | None = None
        if backstore.pi_with_data:
            if not isinstance(self.io, PiBackstoreIO):
                raise TypeError(f"{backstore.kind}: pi_with_data without readv_pi/writev_pi")
            self._pi_data = self.io
        blocking_pi = self.protection is not None and self.protection.blocking
        self._run_pi: BlockingRunner = runner if blocking_pi else run_inline
        self.identity = identity
        self.block_size = block_size
        self.vendor = vendor
        self.product = product
        self.revision = revision
        #: Thin provisioned: UNMAP and WRITE SAME's UNMAP bit deallocate (see provisioning.py).
        self.thin = thin
        #: LBPU (VPD B2h): a thin LU has the UNMAP command unless ``unmap=False``, which
        #: leaves WRITE SAME with UNMAP as its only way to deallocate (LIO's emulate_tpu).
        self.lbpu = thin and unmap
        #: Write-protected by configuration (``readonly=1``); ``readonly`` adds SWP to it.
        self.media_readonly = readonly
        #: Software write protect, the control mode page's SWP bit (MODE SELECT): the medium is
        #: write-protected until it is cleared or a reset restores the default mode pages.
        self.swp = False
        #: Removable medium: INQUIRY RMB, PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT LOEJ.
        self.removable = removable
        #: False after an eject (START STOP UNIT LOEJ=1 START=0) until the next load.
        self.medium_present = True
        #: Nexuses that have medium removal prevented (SBC-4 PREVENT ALLOW MEDIUM REMOVAL):
        #: removal stays prevented until every one of them allows it, is lost or is reset.
        self._prevent: set[str] = set()
        self.num_blocks = backstore.size // block_size
        self.max_transfer_blocks = MAX_TRANSFER_BYTES // block_size
        self.physical_block_size = pbs
        #: Logical blocks per physical block (a power of two).
        self.lbppb = pbs // block_size
        digest = hashlib.sha256(identity.encode()).digest()
        #: VPD 80h unit serial number: stable across restarts because it comes from identity.
        self.serial = digest[:16].hex()
        #: VPD 83h NAA-6 IEEE Registered Extended designator (16 bytes).
        tail = int.from_bytes(digest[16:29], "big") >> 4  # 100 bits
        self.naa = ((0x6 << 124) | (NAA_COMPANY_ID << 100) | tail).to_bytes(16, "big")
        self._directory: LunDirectory | None = None
        #: Byte ranges in flight: atomic commands lock theirs exclusively, other I/O shared.
        self.ranges = RangeLock()
        self._nexuses: dict[str, _NexusState] = {}
        #: SANITIZE state; while one runs or has failed it fences the medium (sanitize.py).
        self.sanitizer = Sanitizer()
        #: EXTENDED COPY results held for RECEIVE COPY RESULTS (xcopy.py).
        self.copy_results = CopyResults()
        # File backstores name their image; APTPL state is kept beside it.
        path = getattr(backstore, "path", None)
        self.reservations = Reservations(
            queue_ua=self.queue_ua,
            state_path=state_path_for(path if isinstance(path, str) else None),
            relative_port_id=lambda: self._directory.relative_port_id if self._directory else 1,
        )

    @property
    def pi_type(self) -> int:
        """The protection type the medium is formatted with: 0 (none), 1, 2 or 3."""
        return self.protection.ptype if self.protection is not None else 0

    @property
    def readonly(self) -> bool:
        """Write-protected: commands with ``CommandSpec.writes`` get DATA PROTECT, MODE SENSE
        reports WP (SBC-4 6.5.2: by configuration or by SWP)."""
        return self.media_readonly or self.swp

    @readonly.setter
    def readonly(self, value: bool) -> None:
        self.media_readonly = value

    def attach(self, directory: LunDirectory) -> None:
        """Called by ``ScsiTarget``: the target name, port and LUN list for VPD and REPORT LUNS."""
        self._directory = directory

    # ---- unit attentions -------------------------------------------------------------------

    def queue_ua(self, key: str, asc: Asc) -> None:
        """Queue a (non-reset) unit attention for one nexus, e.g. RESERVATIONS PREEMPTED."""
        state = self._nexus(key)
        if asc not in state.pending:
            state.pending.append(asc)

    def queue_reset_ua(self, asc: Asc) -> None:
        """Queue a reset unit attention for every nexus this LU has seen."""
        # Every reset releases SPC-2 reservations (SPC-2 5.5.3); persistent ones survive.
        self.reservations.reset()
        self.copy_results.clear()
        # LU, warm and cold resets all end medium removal prevention (SBC-4 5.14) and bring
        # back the default mode pages, none of which is saved (SAM-5 6.3.3).
        self._prevent.clear()
        self.swp = False
        for state in self._nexuses.values():
            state.add_reset(asc)

    def forget_all_nexuses(self) -> None:
        """Power-on state: every nexus gets POWER ON, RESET at its next command."""
        self.reservations.reset()
        self.copy_results.clear()
        self._prevent.clear()
        self.swp = False
        self._nexuses.clear()

    def nexus_lost(self, key: str) -> None:
        self.reservations.nexus_lost(key)
        self.copy_results.nexus_lost(key)
        self._prevent.discard(key)
        self._nexuses.pop(key, None)

    def _nexus(self, key: str) -> _NexusState:
        state = self._nexuses.get(key)
        if state is None:
            state = self._nexuses[key] = _NexusState(Asc.POWER_ON_RESET)
        return state

    def capacity_changed(self, key: str) -> None:
        """READ CAPACITY data changed (FORMAT UNIT): every other nexus is told."""
        for other in list(self._nexuses):
            if other != key:
                self.queue_ua(other, Asc.CAPACITY_DATA_HAS_CHANGED)

    def take_ua(self, key: str) -> Asc | None:
        pending = self._nexus(key).pending
        return pending.pop(0) if pending else None

    def has_pending_ua(self, key: str) -> bool:
        return bool(self._nexus(key).pending)

    # ---- dispatch ----------------------------------------------------------------------------

    def execute_now(self, task: Task, tx: ImmediateChannel) -> int:
        """Run a plain READ or WRITE (10/16) without a coroutine, or do nothing.

        The fast path of issue 7: one decode, no task. It takes only commands whose every
        check passes and whose I/O fits one pool window, with all of a WRITE's data already
        here as immediate data. It answers ``NOW_DONE`` when the backstore did the I/O at
        once (a page-cache hit, RAM, null), ``NOW_PENDING`` for a WRITE handed to the
        backstore's batched writer (``writev_soon``: ``tx.finish`` follows). Anything else --
        an error to report, a unit attention, a reservation, PI, FUA, a cache miss, a busy
        range or pool -- is ``NOW_DECLINED`` before any side effect, and ``execute`` runs the
        command (and finds the error) as always.
        """
        cdb = task.cdb
        op = cdb[0] if cdb else -1
        if op in (0x28, 0x2A):  # READ(10), WRITE(10)
            if len(cdb) < 10:
                return NOW_DECLINED
            _op, flags, lba, _group, length, control = RW10.unpack_from(cdb)
        elif op in (0x88, 0x8A):  # READ(16), WRITE(16)
            if len(cdb) < 16:
                return NOW_DECLINED
            _op, flags, lba, length, _group, control = RW16.unpack_from(cdb)
        else:
            return NOW_DECLINED
        write = op & 0x02 == 0x02
        bs = self.block_size
        nbytes = length * bs
        # Flags (protect, DPO, FUA), NACA, an empty transfer or one that is not exactly EDTL
        # (residuals) all take the full path.
        if flags or control & 0x04 or not length or nbytes != task.expected_length:
            return NOW_DECLINED
        if nbytes > IO_WINDOW or lba >= self.num_blocks or length > self.num_blocks - lba:
            return NOW_DECLINED
        if task.direction is not (_DATA_OUT if write else _DATA_IN):
            return NOW_DECLINED
        key = task.nexus.key if task.nexus is not None else DEFAULT_NEXUS_KEY
        state = self._nexuses.get(key)
        if state is None or state.pending or not self.medium_present:
            return NOW_DECLINED
        res = self.reservations
        if res.spc2_holder is not None or res.reservation is not None:
            return NOW_DECLINED
        if self.protection is not None and self.protection.ptype:
            return NOW_DECLINED
        if not self.sanitizer.idle or self.backstore.limits is not None:
            return NOW_DECLINED
        if write and self.readonly:
            return NOW_DECLINED
        offset = lba * bs
        ranges = self.ranges
        held = ranges.try_acquire(offset, offset + nbytes)
        if held is None:
            return NOW_DECLINED
        io = self.io
        if write:
            sg = tx.data_now(task)
            if sg is None:
                ranges.release(held)
                return NOW_DECLINED
            views = sg.views(0, nbytes)
            if not self._now(io.writev_now, offset, views, sg):
                done = functools.partial(self._written, task, tx, sg, held)
                if not io.writev_soon(offset, views, done):
                    ranges.release(held)
                    return NOW_DECLINED
                tx.take_data(task)  # the write owns the blocks until it is done
                task.transfer_length = nbytes
                return NOW_PENDING
        else:
            sg = tx.alloc_now(nbytes)
            if sg is None or not self._now(io.readv_now, offset, sg.views(0, nbytes), sg):
                ranges.release(held)
                if sg is not None:
                    sg.release()
                return NOW_DECLINED
        ranges.release(held)
        task.status = _GOOD
        task.sense = b""
        task.transfer_length = nbytes
        if not write:
            tx.send_now(task, sg, nbytes)
        return NOW_DONE

    @staticmethod
    def _now(
        call: Callable[[int, Sequence[memoryview]], int | None],
        offset: int,
        views: list[memoryview],
        sg: ScatterList,
    ) -> bool:
        """One immediate backstore call on ``views`` (of ``sg``); False if it could not be
        done now.

        Any error is False too (the caller then frees what it took): the full path runs the
        I/O again and reports it, as a medium error or an internal failure.
        """
        try:
            done = call(offset, views)
        except Exception:
            return False
        if done is None:
            return False
        sg.stats.zero_copy_ios += 1
        return True

    def _written(
        self,
        task: Task,
        tx: ImmediateChannel,
        sg: ScatterList,
        held: Held,
        error: BaseException | None,
    ) -> None:
        """A ``NOW_PENDING`` WRITE is done: its status as ``execute`` would have set it."""
        self.ranges.release(held)
        if error is None:
            sg.stats.zero_copy_ios += 1
            task.status = _GOOD
            task.sense = b""
        else:
            if isinstance(error, BackstoreError) and not isinstance(error, BackstoreBusy):
                error = self._write_failed(held[0], held[1] - held[0], str(error))
            self._end_with(task, error)
        sg.release()
        tx.finish(task)

    async def execute(self, task: Task, channel: DataChannel) -> None:
        """Run ``task``; sets status, sense and transfer_length. Never raises."""
        task.status = Status.GOOD
        task.sense = b""
        task.transfer_length = 0
        key = task.nexus.key if task.nexus is not None else DEFAULT_NEXUS_KEY
        try:
            cdb = task.cdb
            if not cdb:
                raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
            state = self._nexus(key)
            # A sanitize in progress (or failed) answers before unit attentions, which wait
            # for it: an initiator polling with TEST UNIT READY must see the progress.
            fenced = self.sanitizer.fence(cdb[0])
            if fenced is not None:
                raise CheckCondition(fenced)
            exempt = cdb[0] in _UA_EXEMPT
            if state.pending and not exempt:
                ua = state.pending.pop(0)
                raise CheckCondition.of(SenseKey.UNIT_ATTENTION, ua)
            spec = COMMANDS.lookup(cdb)
            if not spec.supported_by(self):
                raise CheckCondition.illegal(Asc.INVALID_COMMAND_OPERATION_CODE)
            if len(cdb) < spec.cdb_len:
                raise CheckCondition.illegal(Asc.INVALID_FIELD_IN_CDB)
            control = 1 if cdb[0] == Opcode.VARIABLE_LENGTH else spec.cdb_len - 1
            if cdb[control] & 0x04:
                # NACA=1 asks for ACA, which we do not implement (SAM-5 5.3.2).
                raise CheckCondition.invalid_field(control, 2)
            if self.reservations.conflicts(cdb, key):
                task.status = Status.RESERVATION_CONFLICT
                return
            self._check_medium(spec)
            await spec.handler(self, Cmd(task, channel, spec, key))
        except Exception as exc:
            self._end_with(task, exc)

    def _end_with(self, task: Task, exc: BaseException) -> None:
        """The status and sense a command that failed with ``exc`` ends with: how ``execute``
        and a ``NOW_PENDING`` write (``_written``) both answer."""
        if isinstance(exc, Conflict):
            task.status = Status.RESERVATION_CONFLICT
            task.sense = b""
        elif isinstance(exc, CheckCondition):
            task.status = Status.CHECK_CONDITION
            task.sense = exc.sense.fixed()
        elif isinstance(exc, PoolExhausted):
            task.status = Status.TASK_SET_FULL
            task.sense = b""
        elif isinstance(exc, BackstoreBusy):
            log.info("BUSY for CDB %s on %s: %s", task.cdb.hex(), self.identity, str(exc))
            task.status = Status.BUSY
            task.sense = b""
        else:
            log.error(
                "internal error executing CDB %s (lun %s, tag %#x, nexus %s)",
                task.cdb.hex(),
                self.identity,
                task.tag,
                task.nexus.key if task.nexus is not None else DEFAULT_NEXUS_KEY,
                exc_info=exc,
            )
            task.status = Status.CHECK_CONDITION
            task.sense = SenseData(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE).fixed()

    # ---- helpers -----------------------------------------------------------------------------

    def _check_medium(self, spec: CommandSpec) -> None:
        """The one rule for medium state, from the opcode table's flags: ejected, then WP."""
        if not self.medium_present and (spec.medium or spec.writes):
            raise CheckCondition.of(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
        if spec.writes and self.readonly:
            raise CheckCondition.of(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)

    def _check_range(self, lba: int, nblocks: int) -> None:
        # An LBA past the last one is out of range even when no blocks are transferred.
        if lba >= self.num_blocks or nblocks > self.num_blocks - lba:
            raise CheckCondition(_LBA_OUT_OF_RANGE)

    def _check_length(self, nblocks: int, field_byte: int) -> None:
        if nblocks > self.max_transfer_blocks:
            raise CheckCondition.invalid_field(field_byte)

    @staticmethod
    def _length_byte(cdb: bytes) -> int:
        """Byte offset of the TRANSFER LENGTH field of an LBA CDB (for the field pointer)."""
        return {0: 4, 1: 7, 2: 7, 3: 28, 4: 10, 5: 6}[cdb[0] >> 5]

    async def _flush(self) -> None:
        try:
            await self.io.flush()
            return
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            log.warning("flush failed on %s: %s", self.identity, str(exc))
        raise CheckCondition.of(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)

    # Backstore errors become sense outside the ``except`` block and are logged as text: the
    # exception's traceback holds the pool views its frames were given, and chaining it (or
    # keeping it in a log record) would pin the arena.

    # Views that break the backstore's limits (O_DIRECT alignment, segment count) go through a
    # bounce from ``channel.alloc`` (pool budget and backpressure); without a channel from the
    # pool without waiting. Both count each I/O as zero-copy or bounced in the pool's stats.

    async def _read_into(
        self,
        sg: ScatterList,
        offset: int,
        n: int,
        channel: DataChannel | None = None,
        *,
        check: PiCheck | None = None,
        check_pi: bool = True,
        pi_out: bytearray | None = None,
    ) -> None:
        """Fill ``sg[0:n]`` from the medium at byte ``offset``.

        On a PI-formatted LU the blocks' tuples are checked too (``check``: the command's
        checks; default those of a protect field of 0), so every reader (VERIFY, COMPARE AND
        WRITE, EXTENDED COPY ...) sees a failed check as ABORTED COMMAND. Where the backstore
        carries tuples with the data (``_pi_data``) they come in the same operation;
        ``pi_out`` (only then) receives them without checks.
        """
        bs = self.backstore
        medium_check: PiCheck | None = None
        pi = pi_out
        if check_pi and self.pi_type and n:
            medium_check = self._medium_check(offset, n, check)
            if medium_check is not None and pi is None and self._pi_data is not None:
                if offset % self.block_size or n % self.block_size:
                    raise ValueError(f"read of {n} bytes at {offset} is not whole blocks")
                pi = bytearray(n // self.block_size * dif.TUPLE_SIZE)
        readv: bounce.Submit = self.io.readv
        if pi is not None:
            readv = self._with_pi(offset, pi, write=False)
        try:
            await bounce.read_into(
                readv,
                sg,
                n,
                offset,
                limits=bs.limits,
                alloc=channel.alloc if channel is not None else None,
            )
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            log.warning(
                "read of %d bytes at %d failed on %s: %s", n, offset, self.identity, str(exc)
            )
            error = True
        else:
            error = False
        if error:
            raise CheckCondition.of(
                SenseKey.MEDIUM_ERROR,
                Asc.UNRECOVERED_READ_ERROR,
                information=offset // self.block_size,
            )
        if medium_check is not None:
            await self._check_medium_pi(sg, offset, n, medium_check, pi)

    def _medium_check(self, offset: int, n: int, check: PiCheck | None) -> PiCheck | None:
        """The checks a read of ``n`` bytes at ``offset`` makes (``check``, default those of
        protect 0); ``None`` when there is nothing to check (no whole block, no check)."""
        bs = self.block_size
        first = -(-offset // bs)
        if (offset + n) // bs <= first:
            return None
        if check is None:
            check = default_check(self.pi_type, first)
        if not (check.guard or check.app or check.ref):
            return None
        return check

    def _with_pi(self, offset: int, pi: dif.Buffer, *, write: bool) -> bounce.Submit:
        """A readv/writev for ``bounce`` that also moves the tuples in ``pi`` (those of the
        blocks from byte ``offset``) through ``_pi_data``, the slice each call covers."""
        io = self._pi_data
        assert io is not None
        bs = self.block_size
        tuples = memoryview(pi).cast("B")
        call = io.writev_pi if write else io.readv_pi

        async def with_pi(at: int, bufs: Sequence[memoryview]) -> int:
            first = (at - offset) // bs * dif.TUPLE_SIZE
            count = sum(b.nbytes for b in bufs) // bs * dif.TUPLE_SIZE
            return await call(at, bufs, [tuples[first : first + count]])

        return with_pi

    async def _check_medium_pi(
        self,
        sg: ScatterList,
        offset: int,
        n: int,
        check: PiCheck,
        pi: bytearray | None = None,
    ) -> None:
        """Check the tuples of the whole blocks in ``sg[0:n]`` (read from byte ``offset``);
        ``pi``: those tuples if they came with the data (whole blocks), else read here."""
        bs = self.block_size
        first = -(-offset // bs)
        end = (offset + n) // bs
        if pi is None:
            pi = await self._read_pi(first, end - first)
        data = sg.views(first * bs - offset, (end - first) * bs)
        error = check.verify(data, pi, bs, first - check.lba)
        del data  # pool views must not ride along in a traceback
        if error is not None:
            raise pi_failure(error, first)

    async def _read_pi(self, lba: int, nblocks: int) -> bytearray:
        """The stored tuples of ``nblocks`` from ``lba``."""
        pi = bytearray(nblocks * dif.TUPLE_SIZE)
        store = self.protection
        if store is not None and store.blocking:
            try:
                if store.read_nowait(lba, [memoryview(pi)]):
                    return pi
            except BackstoreError:
                pass  # the blocking read below reports it
        await self._pi_io("read", lba, [memoryview(pi)])
        return pi

    async def _pi_io(self, op: str, lba: int, bufs: list[memoryview]) -> None:
        store = self.protection
        assert store is not None
        call = store.read if op == "read" else store.write
        try:
            await self._run_pi(call, lba, bufs)
            return
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            log.warning("PI %s at block %d failed on %s: %s", op, lba, self.identity, str(exc))
        asc = Asc.UNRECOVERED_READ_ERROR if op == "read" else Asc.WRITE_ERROR
        raise CheckCondition.of(SenseKey.MEDIUM_ERROR, asc, information=lba)

    async def _discard_pi(self, offset: int, length: int) -> None:
        """Deallocated blocks get escape tuples (read back unchecked, as never written)."""
        store = self.protection
        if store is None or not store.ptype:
            return
        bs = self.block_size
        try:
            await self._run_pi(store.discard, offset // bs, length // bs)
            return
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            log.warning("PI discard at %d failed on %s: %s", offset, self.identity, str(exc))
        raise CheckCondition.of(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=offset // bs)

    async def _write_from(
        self,
        sg: ScatterList,
        offset: int,
        n: int,
        channel: DataChannel | None = None,
        *,
        pi: dif.Buffer | None = None,
        ref_tag: int | None = None,
    ) -> None:
        """Store ``sg[0:n]`` at byte ``offset``.

        On a PI-formatted LU the blocks' tuples go to the protection store after the data:
        ``pi`` if given (received with the data, already checked), else generated here with
        application tag 0 and reference tag ``ref_tag`` (default: the LBA) for the first block,
        so every writer (WRITE SAME, EXTENDED COPY, SANITIZE ...) keeps data and PI in step.
        """
        bs = self.backstore
        tuples: dif.Buffer | None = None
        lba = offset // self.block_size
        if self.pi_type and n:
            if offset % self.block_size or n % self.block_size:
                raise ValueError(f"write of {n} bytes at {offset} is not whole blocks")
            if pi is None:
                ref = lba if ref_tag is None else ref_tag
                pi = dif.generate(sg.views(0, n), self.block_size, ref_tag=ref & 0xFFFFFFFF)
            tuples = pi
        writev: bounce.Submit = self.io.writev
        if tuples is not None and self._pi_data is not None:
            writev = self._with_pi(offset, tuples, write=True)  # in the same operation
            tuples = None
        try:
            await bounce.write_from(
                writev,
                sg,
                n,
                offset,
                read=self.io.readv,
                limits=bs.limits,
                alloc=channel.alloc if channel is not None else None,
                order=bounce.write_order(bs) if bs.limits is not None else None,
            )
        except BackstoreBusy:
            raise
        except BackstoreError as exc:
            why: str | None = str(exc)
        else:
            why = None
        if why is not None:
            raise self._write_failed(offset, n, why)
        if tuples is not None:
            await self._pi_io("write", lba, [memoryview(tuples)])

    def _write_failed(self, offset: int, n: int, why: str) -> CheckCondition:
        """MEDIUM ERROR / WRITE ERROR for a failed write of ``n`` bytes at ``offset`` (logged)."""
        log.warning("write of %d bytes at %d failed on %s: %s", n, offset, self.identity, why)
        return CheckCondition.of(
            SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=offset // self.block_size
        )

    def _takes(self, views: list[memoryview], offset: int) -> bool:
        """Whether the backstore takes ``views`` as they are (no alignment to keep in order
        with read-modify-writes, within its segment limits)."""
        limits = self.backstore.limits
        return limits is None or (limits.alignment == 1 and bounce.fits(views, offset, limits))

    async def _read_views(
        self,
        views: list[memoryview],
        offset: int,
        n: int,
        channel: DataChannel,
        pi: bytearray | None = None,
    ) -> None:
        """Fill ``views`` (pieces of a wire list: data between tuples) from byte ``offset``,
        and ``pi`` with their tuples (only where the backstore carries them with the data).

        Straight into them when the backstore takes them (buffered files split at IOV_MAX
        themselves); else through a bounce from the pool (O_DIRECT alignment: the pieces sit
        between 8-byte tuples; or too many segments), copied back.
        """
        if self._takes(views, offset):
            readv: bounce.Submit = self.io.readv
            if pi is not None:
                readv = self._with_pi(offset, pi, write=False)
            try:
                await readv(offset, views)
                return
            except BackstoreBusy:
                raise
            except BackstoreError as exc:
                log.warning("read at %d failed on %s: %s", offset, self.identity, str(exc))
            raise CheckCondition.of(
                SenseKey.MEDIUM_ERROR,
                Asc.UNRECOVERED_READ_ERROR,
                information=offset // self.block_size,
            )
        tmp = await channel.alloc(n)
        try:
            await self._read_into(tmp, offset, n, channel, check_pi=False, pi_out=pi)
            dif.scatter(tmp.views(0, n), views)
        finally:
            tmp.release()

    async def _write_views(
        self, views: list[memoryview], offset: int, n: int, channel: DataChannel, pi: bytes
    ) -> None:
        """Store ``views`` (data pieces of a wire list) and their tuples ``pi``."""
        if self._takes(views, offset):
            pi_data = self._pi_data
            try:
                if pi_data is not None:  # tuples in the same operation
                    await pi_data.writev_pi(offset, views, [memoryview(pi)])
                else:
                    await self.io.writev(offset, views)
            except BackstoreBusy:
                raise
            except BackstoreError as exc:
                log.warning("write at %d failed on %s: %s", offset, self.identity, str(exc))
                error = True
            else:
                error = False
            if error:
                raise CheckCondition.of(
                    SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, information=offset // self.block_size
                )
            if pi_data is None:
                await self._pi_io("write", offset // self.block_size, [memoryview(pi)])
            return
        # A consumer with limits (O_DIRECT): gather the pieces into pool blocks (counted).
        tmp = await channel.alloc(n)
        try:
            pos = 0
            for view in views:
                pos += tmp.copy_in(view, pos, reason="pi-split-bounce")
            await self._write_from(tmp, offset, n, channel, pi=pi)
        finally:
            tmp.release()

    # ---- SPC commands ------------------------------------------------------------------------

    async def _cmd_test_unit_ready(self, cmd: Cmd) -> None:
        return

    async def _cmd_request_sense(self, cmd: Cmd) -> None:
        desc = bool(cmd.cdb[1] & 0x01)
        ua = self.take_ua(cmd.nexus_key)
        sense = SenseData(SenseKey.UNIT_ATTENTION, ua) if ua is not None else NO_SENSE
        if ua is None:
            # Pollable sense: a sanitize's progress (or its failure).
            sense = self.sanitizer.sense() or sense
        await send_reply(cmd, sense.encode(descriptor=desc), cmd.cdb[4])

    async def _cmd_inquiry(self, cmd: Cmd) -> None:
        inq = decode_inquiry(cmd.cdb)
        if not inq.evpd:
            if inq.page_code:
                raise CheckCondition.invalid_field(2)
            data = self.standard_inquiry()
        else:
            builder = _VPD_PAGES.get(inq.page_code)
            if builder is None or not self._has_vpd(inq.page_code):
                raise CheckCondition.invalid_field(2)
            data = builder(self)
        await send_reply(cmd, data, inq.alloc_len)

    def standard_inquiry(self) -> bytes:
        data = bytearray(74)
        data[0] = DEVICE_TYPE_DISK
        data[1] = 0x80 if self.removable else 0x00  # RMB
        # SPC-4: iscsi-test-cu 1.19 rejects any other VERSION than 4, 5 or 6.
        data[2] = 0x06
        data[3] = 0x10 | 0x02  # HISUP, RESPONSE DATA FORMAT 2
        data[4] = len(data) - 5
        data[5] = 0x08  # 3PC: this LU is a copy manager (EXTENDED COPY)
        if self.protection is not None:
            data[5] |= 0x01  # PROTECT: may be formatted with PI (RC16 says whether it is)
        data[7] = 0x02  # CMDQUE
        data[8:16] = _pad(self.vendor, 8)
        data[16:32] = _pad(self.product, 16)
        data[32:36] = _pad(self.revision, 4)
        for i, vd in enumerate(_VERSION_DESCRIPTORS):
            _U16.pack_into(data, 58 + 2 * i, vd)
        return bytes(data)

    def _vpd(self, page: int, body: bytes) -> bytes:
        return bytes((DEVICE_TYPE_DISK, page)) + _U16.pack(len(body)) + body

    def _vpd_supported(self) -> bytes:
        pages = (p for p in sorted(_VPD_PAGES) if self._has_vpd(p))
        return self._vpd(VpdPage.SUPPORTED_PAGES, bytes(pages))

    def _has_vpd(self, page: int) -> bool:
        # Extended INQUIRY Data is about protection information: only PI-capable LUs have it.
        return page != VpdPage.EXTENDED_INQUIRY or self.protection is not None

    def _vpd_extended_inquiry(self) -> bytes:
        """Extended INQUIRY Data (SPC-5 7.7.7), for the protection fields.

        SPT 111b: FORMAT UNIT takes types 1, 2 and 3. GRD_CHK, APP_CHK, REF_CHK: we check the
        guard, the application tag (against a 32-byte CDB's expected tag and mask) and the
        reference tag, as the RDPROTECT/WRPROTECT/VRPROTECT tables allow (scsi/protection.py).
        """
        body = bytearray(0x3C)
        body[0] = 0x07 << 3 | 0x04 | 0x02 | 0x01  # SPT, GRD_CHK, APP_CHK, REF_CHK
        body[1] = 0x01  # SIMPSUP
        body[2] = 0x01  # V_SUP: a volatile cache (WCE), flushed by SYNCHRONIZE CACHE
        body[3] = 0x01  # LUICLR (SPC-5 requires it set)
        return self._vpd(VpdPage.EXTENDED_INQUIRY, bytes(body))

    def _vpd_serial(self) -> bytes:
        return self._vpd(VpdPage.UNIT_SERIAL_NUMBER, self.serial.encode("ascii"))

    def _vpd_device_id(self) -> bytes:
        def desc(code_set: int, assoc_type: int, value: bytes) -> bytes:
            return bytes((code_set, assoc_type, 0, len(value))) + value

        # LU: NAA (binary, association 0, type 3) and T10 vendor ID (ASCII, type 1).
        body = desc(0x01, 0x03, self.naa)
        body += desc(0x02, 0x01, _pad(self.vendor, 8) + self.serial.encode("ascii"))
        d = self._directory
        if d is not None:
            # Target port: relative target port identifier (association 1, type 4).
            body += desc(0x01, 0x14, bytes(2) + _U16.pack(d.relative_port_id))
            # Target device: SCSI name string (UTF-8, association 2, type 8), NUL-terminated
            # and padded to a multiple of 4 (SPC-5 7.7.6.11).
            name = d.name.encode("utf-8") + b"\0"
            body += desc(0x03, 0x28, name.ljust(_round_up(len(name), 4), b"\0"))
        return self._vpd(VpdPage.DEVICE_IDENTIFICATION, body)

    def _vpd_block_limits(self) -> bytes:
        body = bytearray(0x3C)
        # Offsets below are page offsets minus the 4-byte header.
        body[1] = MAX_COMPARE_AND_WRITE_BLOCKS  # MAXIMUM COMPARE AND WRITE LENGTH
        _U16.pack_into(body, 2, self.lbppb)  # OPTIMAL TRANSFER LENGTH GRANULARITY
        _U32.pack_into(body, 4, self.max_transfer_blocks)  # MAXIMUM TRANSFER LENGTH
        _U32.pack_into(body, 8, IO_WINDOW // self.block_size)  # OPTIMAL TRANSFER LENGTH
        fill_block_limits(self, body)
        fill_atomic_limits(self, body)
        return self._vpd(VpdPage.BLOCK_LIMITS, bytes(body))

    def _vpd_block_characteristics(self) -> bytes:
        body = bytearray(0x3C)
        _U16.pack_into(body, 0, 1)  # MEDIUM ROTATION RATE: non-rotating medium
        body[3] = BDC_ERASE_READS  # WABEREQ, WACEREQ: how reads behave after a SANITIZE
        return self._vpd(VpdPage.BLOCK_DEVICE_CHARACTERISTICS, bytes(body))

    def _vpd_provisioning(self) -> bytes:
        return self._vpd(VpdPage.LOGICAL_BLOCK_PROVISIONING, provisioning_vpd_body(self))

    async def _cmd_report_luns(self, cmd: Cmd) -> None:
        luns: Iterable[int] = self._directory.lun_numbers() if self._directory else (0,)
        data, alloc = report_luns_data(cmd.cdb, luns)
        await send_reply(cmd, data, alloc)

    async def _cmd_mode_sense(self, cmd: Cmd) -> None:
        ms = decode_mode_sense(cmd.cdb)
        if ms.pc == PageControl.SAVED:
            raise CheckCondition.illegal(Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
        if ms.page == ModePage.ALL_PAGES:
            if ms.subpage not in (0x00, 0xFF):
                raise CheckCondition.invalid_field(3)
            pages = b"".join(build(self, ms.pc) for _, build in sorted(_MODE_PAGES.items()))
        else:
            build = _MODE_PAGES.get(ms.page)
            # We have no subpages: 0xFF (page and all its subpages) is just the page.
            if build is None:
                raise CheckCondition.invalid_field(2, 5)
            if ms.subpage not in (0x00, 0xFF):
                raise CheckCondition.invalid_field(3)
            pages = build(self, ms.pc)
        bdesc = b""
        if not ms.dbd:
            # Neither capacity nor block length can be changed by MODE SELECT.
            changeable = ms.pc == PageControl.CHANGEABLE
            blocks = 0 if changeable else min(self.num_blocks, 0xFFFFFFFF)
            bs = 0 if changeable else self.block_size
            bdesc = _SHORT_BLOCK_DESC.pack(blocks, bs >> 16, bs & 0xFFFF)
        # DPOFUA: we honour DPO and FUA on READ and WRITE; WP on a write-protected LU.
        dsp = 0x10 | (0x80 if self.readonly else 0x00)
        if cmd.cdb[0] == Opcode.MODE_SENSE_6:
            total = _MODE6_HDR.size + len(bdesc) + len(pages)
            hdr = _MODE6_HDR.pack(min(total - 1, 0xFF), 0, dsp, len(bdesc))
        else:
            total = _MODE10_HDR.size + len(bdesc) + len(pages)
            hdr = _MODE10_HDR.pack(total - 2, 0, dsp, 0, len(bdesc))
        await send_reply(cmd, hdr + bdesc + pages, ms.alloc_len)

    def _mode_caching(self, pc: int) -> bytes:
        page = bytearray(20)
        page[0], page[1] = ModePage.CACHING, len(page) - 2
        if pc != PageControl.CHANGEABLE:
            page[2] = 0x04  # WCE: writes may sit in the backstore's cache until SYNC/FUA
        return bytes(page)

    def _mode_control(self, pc: int) -> bytes:
        page = bytearray(12)
        page[0], page[1] = ModePage.CONTROL, len(page) - 2
        if pc == PageControl.CHANGEABLE:
            page[4] = 0x08  # SWP: MODE SELECT may write-protect the medium
        else:
            # TST 0 (one task set), D_SENSE 0 (fixed sense), QAM 1 (unrestricted reordering:
            # commands run concurrently), QERR 0, UA_INTLCK_CTRL 0.
            page[3] = 0x10
            page[4] = 0x08 if self.swp else 0x00
            if self.protection is not None:
                # ATO: the application tag belongs to the application client; we never change
                # it (and check it only against a 32-byte CDB's expected tag). DPICZ 0: with
                # a protect field of 0 we still check what we read.
                page[5] = 0x80
            _U16.pack_into(page, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
        return bytes(page)

    async def _cmd_mode_select(self, cmd: Cmd) -> None:
        ms = decode_mode_select(cmd.cdb)
        check_cdb(ms)
        data = await self._receive_bytes(cmd, ms.param_len) if ms.param_len else b""
        if data is None:
            return

        def pages(code: int, pc: int) -> bytes | None:
            build = _MODE_PAGES.get(code)
            return None if build is None else build(self, pc)

        new = parse_mode_select(
            ms, data, pages, block_size=self.block_size, num_blocks=self.num_blocks
        )
        control = new.get(ModePage.CONTROL)
        if control is None or bool(control[4] & 0x08) == self.swp:
            return
        self.swp = bool(control[4] & 0x08)
        # Mode pages are shared by all nexuses (TST 0): the others learn of the change.
        for key in list(self._nexuses):
            if key != cmd.nexus_key:
                self.queue_ua(key, Asc.MODE_PARAMETERS_CHANGED)

    async def _cmd_rsoc(self, cmd: Cmd) -> None:
        rs = decode_rsoc(cmd.cdb)
        if rs.options == 0:
            out = bytearray()
            for each in COMMANDS:
                if not each.supported_by(self):
                    continue
                flags = (0x02 if rs.rctd else 0) | (0x01 if each.service_action is not None else 0)
                out += _RSOC_DESC.pack(each.opcode, each.service_action or 0, flags, each.cdb_len)
                if rs.rctd:
                    out += _rsoc_timeouts(each)
            data = _U32.pack(len(out)) + bytes(out)
        elif rs.options in (1, 2, 3):
            has_sa = COMMANDS.has_service_actions(rs.opcode)
            if rs.options == 1 and has_sa:
                raise CheckCondition.invalid_field(2, 2)
            if rs.options == 2 and not has_sa:
                raise CheckCondition.invalid_field(2, 2)
            spec = COMMANDS.get(rs.opcode, rs.service_action if has_sa else None)
            if spec is not None and rs.options == 3 and not has_sa and rs.service_action:
                spec = None  # option 3 names a service action this opcode does not have
            if spec is not None and not spec.supported_by(self):
                spec = None
            if spec is None:
                data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
            else:
                support = 0x03 | (0x80 if rs.rctd else 0)
                data = bytes((0, support)) + _U16.pack(spec.cdb_len) + spec.usage_for(self)
                if rs.rctd:
                    data += _rsoc_timeouts(spec)
        else:
            raise CheckCondition.invalid_field(2, 2)
        await send_reply(cmd, data, rs.alloc_len)

    # ---- reservations (state and rules in scsi/reservations.py) ------------------------------

    async def _cmd_reserve(self, cmd: Cmd) -> None:
        self.reservations.reserve(cmd.cdb, cmd.nexus_key)

    async def _cmd_release(self, cmd: Cmd) -> None:
        self.reservations.release(cmd.cdb, cmd.nexus_key)

    async def _cmd_prin(self, cmd: Cmd) -> None:
        data = self.reservations.persistent_reserve_in(cmd.cdb[1] & 0x1F, cmd.nexus_key)
        await send_reply(cmd, data, int.from_bytes(cmd.cdb[7:9], "big"))

    async def _cmd_prout(self, cmd: Cmd) -> None:
        n = u32(cmd.cdb, 5)
        cmd.task.transfer_length = n
        if n != PROUT_PARAM_LEN:
            # Checked before receiving: a huge length must not make us buffer it.
            raise CheckCondition.illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        params = await self._receive_bytes(cmd, n)
        if params is None:
            return
        self.reservations.persistent_reserve_out(cmd.cdb, cmd.nexus_key, params)

    async def _cmd_start_stop_unit(self, cmd: Cmd) -> None:
        """START STOP UNIT (SBC-4 5.25): only a removable LU's LOEJ does anything.

        The unit is always ready, so START=0 without LOEJ (stop) and every power condition are
        no-ops; a POWER CONDITION other than 0h makes START and LOEJ ignored. We finish at
        once, so IMMED changes nothing.
        """
        byte4 = cmd.cdb[4]
        power_condition, loej, start = byte4 >> 4, byte4 & 0x02, byte4 & 0x01
        if not self.removable or power_condition or not loej:
            return
        if self._prevent:
            # Loading is refused too while prevented (iscsi-test-cu's Eject test checks it).
            raise CheckCondition.illegal(Asc.MEDIUM_REMOVAL_PREVENTED)
        self.medium_present = bool(start)

    async def _cmd_prevent_allow(self, cmd: Cmd) -> None:
        """PREVENT ALLOW MEDIUM REMOVAL (SBC-4 5.14), per I_T nexus; works without medium."""
        prevent = cmd.cdb[4] & 0x03
        if prevent > 1:
            raise CheckCondition.invalid_field(4, 1)  # 10b/11b: obsolete (MMC persistent)
        if prevent:
            self._prevent.add(cmd.nexus_key)
        else:
            self._prevent.discard(cmd.nexus_key)

    def medium_removal_prevented(self) -> bool:
        return bool(self._prevent)

    # ---- SBC commands ------------------------------------------------------------------------

    async def _cmd_read_capacity_10(self, cmd: Cmd) -> None:
        last = self.num_blocks - 1
        data = _RC10.pack(min(last, 0xFFFFFFFF), self.block_size)
        await send_reply(cmd, data, len(data))

    async def _cmd_read_capacity_16(self, cmd: Cmd) -> None:
        lbppbe = self.lbppb.bit_length() - 1
        ptype = self.pi_type
        # P_TYPE (type - 1) and PROT_EN; P_I_EXPONENT 0: one tuple per logical block.
        prot = ((ptype - 1) << 1 | 0x01) if ptype else 0
        data = _RC16.pack(
            self.num_blocks - 1, self.block_size, prot, lbppbe, rc16_provisioning(self)
        )
        await send_reply(cmd, data, u32(cmd.cdb, 10))

    async def _cmd_prefetch(self, cmd: Cmd) -> None:
        """PRE-FETCH(10/16): warm the backstore's cache and answer GOOD.

        GOOD (not CONDITION MET) is what SBC-4 asks when the cache may not hold all the
        blocks, which a page cache shared with everything else never promises.
        """
        blk = decode_block(cmd.cdb)
        self._check_range(blk.lba, blk.length)
        if blk.length:
            bs = self.block_size
            await self.io.prefetch(blk.lba * bs, blk.length * bs)

    async def _cmd_read_defect_data(self, cmd: Cmd) -> None:
        """READ DEFECT DATA(10/12): a virtual medium has no defects, so an empty list.

        PLISTV/GLISTV stay 0 (no list of either kind is kept) and the requested format is
        echoed, as SBC-4 allows for a device with no defect lists.
        """
        cdb = cmd.cdb
        if cdb[0] == Opcode.READ_DEFECT_DATA_10:
            fmt = cdb[2] & 0x07
            data = bytes([0, fmt, 0, 0])
            alloc = int.from_bytes(cdb[7:9], "big")
        else:
            fmt = cdb[1] & 0x07
            data = bytes([0, fmt, 0, 0, 0, 0, 0, 0])
            alloc = u32(cdb, 6)
        await send_reply(cmd, data, alloc)

    async def _cmd_compare_and_write(self, cmd: Cmd) -> None:
        """COMPARE AND WRITE (SBC-4 5.3): compare N blocks, write N blocks if they matched.

        The Data-Out buffer holds the verify instance then the write instance. The read,
        compare and write run with the range locked exclusively, so no other command of
        this target (READ, WRITE, WRITE SAME, UNMAP, another COMPARE AND WRITE) sees or
        changes the range in between.
        """
        task, cdb = cmd.task, cmd.cdb
        if cdb[1] & 0xE0:
            # WRPROTECT: not with PI (a PI LU generates and checks tuples as for protect 0).
            raise CheckCondition.invalid_field(1, 7)
        lba = int.from_bytes(cdb[2:10], "big")
        nblocks = cdb[13]
        bs = self.block_size
        half = nblocks * bs
        task.transfer_length = 2 * half
        if nblocks > MAX_COMPARE_AND_WRITE_BLOCKS:
            raise CheckCondition.invalid_field(13)
        self._check_range(lba, nblocks)
        if task.expected_length != 2 * half:
            # Both instances or nothing: a Data-Out of another size (also with NUMBER OF
            # LOGICAL BLOCKS 0, e.g. a 256-block request wrapped to 0) is refused, as LIO does.
            raise CheckCondition.invalid_field(13)
        if nblocks == 0:
            return
        # One receive for both halves: unsolicited data must be asked for in one window.
        sent = await self._receive(cmd, 0, 2 * half)
        if sent is None:
            return
        try:
            # Memory before the lock: waiting for it with the range locked would stall others.
            medium = await cmd.channel.alloc(half)
            try:
                async with self.ranges.hold(lba * bs, lba * bs + half):
                    await self._read_into(medium, lba * bs, half, cmd.channel)
                    at = _first_difference(sent.to_bytes(0, half), medium.to_bytes(0, half))
                    if at is not None:
                        raise CheckCondition.of(
                            SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=at
                        )
                    # The write instance sits behind the verify one in the same list; the
                    # backstore takes lists from their start, so it moves (a small copy).
                    medium.copy_in(
                        sent.to_bytes(half, half), reason="compare-and-write", direction="in"
                    )
                    await self._write_from(medium, lba * bs, half, cmd.channel)
            finally:
                medium.release()
        finally:
            sent.release()
        if cdb[1] & 0x08:  # FUA
            await self._flush()

    async def _cmd_synchronize_cache(self, cmd: Cmd) -> None:
        blk = decode_block(cmd.cdb)
        # NUMBER OF LOGICAL BLOCKS 0 means "to the end of the medium".
        self._check_range(blk.lba, blk.length or (self.num_blocks - blk.lba))
        await self._flush()

    def _protect(self, cmd: Cmd, blk: BlockCdb) -> PiCheck | None:
        """The command's protection checks (``protection.protect_check``); ``None`` without PI."""
        cdb = cmd.cdb
        field = (10, 7) if cdb[0] == Opcode.VARIABLE_LENGTH else (1, 7)
        return protect_check(self.pi_type, blk.protect, blk.lba, decode_tags32(cdb), field)

    def _unit(self, check: PiCheck | None) -> int:
        """Bytes per block on the wire: the block, and its tuple when PI is transferred."""
        if check is not None and check.transfer:
            return self.block_size + dif.TUPLE_SIZE
        return self.block_size

    async def _cmd_read(self, cmd: Cmd) -> None:
        task = cmd.task
        blk = decode_block(cmd.cdb)
        bs = self.block_size
        check = self._protect(cmd, blk)
        unit = self._unit(check)
        total = blk.length * unit
        task.transfer_length = total
        self._check_range(blk.lba, blk.length)
        self._check_length(blk.length, self._length_byte(cmd.cdb))
        # The transport clips Data-In to EDTL, so reading past it is wasted work.
        limit = min(total, _round_up(task.expected_length, unit))
        if unit != bs:
            assert check is not None
            await self._read_with_pi(cmd, blk.lba, limit // unit, check)
            return
        base = blk.lba * bs
        off = 0
        while off < limit:
            # A smaller window when the pool is short: reads stream through what there is.
            sg = await cmd.channel.alloc(min(IO_WINDOW, limit - off), partial=True)
            n = sg.length
            # Shared, so an atomic write to the range is seen whole or not at all.
            ranges = self.ranges
            held = ranges.try_acquire(base + off, base + off + n)
            try:
                if held is None:
                    held = await ranges.acquire(base + off, base + off + n)
                if not cmd.aborted():
                    await self._read_into(sg, base + off, n, cmd.channel, check=check)
            except BaseException:
                sg.release()
                raise
            finally:
                if held is not None:
                    ranges.release(held)
            if cmd.aborted():
                sg.release()
                return
            off += n
            # send() owns sg from here on.
            await cmd.channel.send(sg, off - n, n, last=off >= limit)
            if cmd.aborted():
                return

    async def _read_with_pi(self, cmd: Cmd, lba: int, nblocks: int, check: PiCheck) -> None:
        """READ with RDPROTECT != 0: every block followed by its tuple on the wire.

        Each window is one pool list in the wire layout: ``dif.split`` gives its data pieces,
        which the backstore fills in place, and its tuple slots, filled from the store after
        the checks (no copy of the data).
        """
        bs = self.block_size
        unit = bs + dif.TUPLE_SIZE
        per = max(1, IO_WINDOW // bs)
        done = 0
        while done < nblocks:
            sg = await cmd.channel.alloc(min(per, nblocks - done) * unit, partial=True)
            k = sg.length // unit
            if k == 0:  # a pool shorter than one block and tuple: wait for a whole unit
                sg.release()
                sg = await cmd.channel.alloc(unit)
                k = 1
            start = lba + done
            try:
                async with self.ranges.hold(start * bs, (start + k) * bs, exclusive=False):
                    if cmd.aborted():
                        sg.release()
                        return
                    data, slots = dif.split(sg.views(0, k * unit), bs)
                    if self._pi_data is not None:  # the tuples come with the data
                        pi = bytearray(k * dif.TUPLE_SIZE)
                        await self._read_views(data, start * bs, k * bs, cmd.channel, pi)
                    else:
                        await self._read_views(data, start * bs, k * bs, cmd.channel)
                        pi = await self._read_pi(start, k)
                error = check.verify(data, pi, bs, done)
                if error is None:
                    dif.scatter([pi], slots)
                # Views of pool blocks must not ride along in a traceback.
                del data, slots
                if error is not None:
                    raise pi_failure(error, start)
            except BaseException:
                sg.release()
                raise
            if cmd.aborted():
                sg.release()
                return
            done += k
            await cmd.channel.send(sg, (done - k) * unit, k * unit, last=done >= nblocks)
            if cmd.aborted():
                return

    async def _receive(
        self, cmd: Cmd, off: int, n: int, *, partial: bool = False
    ) -> ScatterList | None:
        """Data-Out bytes from ``off`` (caller releases); ``None`` if the task was aborted.

        With ``partial`` the list may hold fewer than ``n`` bytes (at least one): the transport
        hands out what it could fit in the pool, and streaming callers simply loop. Otherwise
        the pieces are gathered into one list of exactly ``n`` bytes.
        """
        sg = await cmd.channel.receive(off, n)
        try:
            while True:
                if cmd.aborted():
                    sg.release()
                    return None
                if not sg.length:
                    # The initiator's buffer ended before the CDB's (EDTL was checked before,
                    # so this is a transport that ended the buffer early).
                    raise CheckCondition(_BAD_IU)
                if partial or sg.length >= n:
                    return sg
                more = await cmd.channel.receive(off + sg.length, n - sg.length)
                empty = not more.length
                sg.extend(more)
                more.release()
                if empty:
                    raise CheckCondition(_BAD_IU)
        except BaseException:
            sg.release()
            raise

    async def _receive_units(self, cmd: Cmd, off: int, n: int, unit: int) -> ScatterList | None:
        """Like ``_receive(partial=True)``, topped up to whole ``unit``s (blocks, or blocks and
        their tuples): PI is generated or checked per block, never for part of one."""
        sg = await self._receive(cmd, off, n, partial=True)
        if sg is None:
            return None
        rest = sg.length % unit
        if rest:
            try:
                more = await self._receive(cmd, off + sg.length, unit - rest)
            except BaseException:
                sg.release()
                raise
            if more is None:
                sg.release()
                return None
            sg.extend(more)
            more.release()
        return sg

    async def _receive_bytes(self, cmd: Cmd, n: int) -> bytes | None:
        """A small Data-Out buffer (one block, a parameter list) as bytes; None if aborted."""
        sg = await self._receive(cmd, 0, n)
        if sg is None:
            return None
        try:
            return sg.to_bytes(0, n)
        finally:
            sg.release()

    async def _write_blocks(
        self, cmd: Cmd, lba: int, nblocks: int, check: PiCheck | None = None
    ) -> bool:
        """Receive ``nblocks`` of Data-Out and store them at ``lba``; False if aborted."""
        if check is not None and check.transfer:
            return await self._write_with_pi(cmd, lba, nblocks, check)
        bs = self.block_size
        total = nblocks * bs
        base = lba * bs
        off = 0
        while off < total:
            want = min(IO_WINDOW, total - off)
            if self.pi_type:
                sg = await self._receive_units(cmd, off, want, bs)
            else:
                sg = await self._receive(cmd, off, want, partial=True)
            if sg is None:
                return False
            n = sg.length
            # Shared: a window waits only for an atomic command on an overlapping range. With
            # PI exclusive: data and tuples land in two steps, which no reader may see apart.
            ranges = self.ranges
            pi = bool(self.pi_type)
            held = ranges.try_acquire(base + off, base + off + n, pi)
            try:
                if held is None:
                    held = await ranges.acquire(base + off, base + off + n, pi)
                # Generated PI: the reference tag the command's checks would expect.
                ref = check.ref_at(off // bs) if check is not None else None
                await self._write_from(sg, base + off, n, cmd.channel, ref_tag=ref)
            finally:
                if held is not None:
                    ranges.release(held)
                sg.release()
            if cmd.aborted():
                return False
            off += n
        return True

    async def _write_with_pi(self, cmd: Cmd, lba: int, nblocks: int, check: PiCheck) -> bool:
        """WRITE with WRPROTECT != 0: blocks interleaved with their tuples on the wire.

        Every tuple of the command is checked before anything is written, so a failed check
        leaves the medium as it was; that holds the command's whole Data-Out (at most
        ``MAX_TRANSFER_BYTES`` and its tuples) in pool blocks. ``dif.split`` references the
        received blocks in place: the data pieces go to the backstore as they are.
        """
        # Commands that hold their Data-Out while waiting for more pool could wait on each
        # other for ever: one holder per process at a time, and only once the whole command
        # fits the pool (TASK SET FULL if it never could).
        async with _pi_hold():
            probe = await cmd.channel.alloc(nblocks * (self.block_size + dif.TUPLE_SIZE))
            probe.release()
            return await self._hold_and_write_pi(cmd, lba, nblocks, check)

    async def _hold_and_write_pi(self, cmd: Cmd, lba: int, nblocks: int, check: PiCheck) -> bool:
        bs = self.block_size
        unit = bs + dif.TUPLE_SIZE
        per = max(1, IO_WINDOW // bs)
        windows: list[ScatterList] = []
        try:
            done = 0
            while done < nblocks:
                sg = await self._receive_units(
                    cmd, done * unit, min(per, nblocks - done) * unit, unit
                )
                if sg is None:
                    return False
                windows.append(sg)
                k = sg.length // unit
                data, pi = dif.split(sg.views(0, k * unit), bs)
                error = check.verify(data, pi, bs, done)
                del data, pi
                if error is not None:
                    raise pi_failure(error, lba + done)
                done += k
            done = 0
            for sg in windows:
                k = sg.length // unit
                start = lba + done
                data, pi = dif.split(sg.views(0, k * unit), bs)
                tuples = b"".join(pi)
                del pi
                # Exclusive: no reader may see the data without its tuples.
                async with self.ranges.hold(start * bs, (start + k) * bs):
                    await self._write_views(data, start * bs, k * bs, cmd.channel, tuples)
                del data
                if cmd.aborted():
                    return False
                done += k
        finally:
            for sg in windows:
                sg.release()
        return True

    async def _cmd_write(self, cmd: Cmd) -> None:
        task = cmd.task
        blk = decode_block(cmd.cdb)
        check = self._protect(cmd, blk)
        unit = self._unit(check)
        task.transfer_length = blk.length * unit
        self._check_range(blk.lba, blk.length)
        self._check_length(blk.length, self._length_byte(cmd.cdb))
        nblocks = self._blocks_within_edtl(task, blk.length, unit)
        if await self._write_blocks(cmd, blk.lba, nblocks, check) and blk.fua and nblocks:
            await self._flush()

    def _blocks_within_edtl(self, task: Task, nblocks: int, unit: int | None = None) -> int:
        """How many blocks a write processes when EDTL may be shorter than the CDB (overflow).

        FCP-4 option a (which libiscsi 1.19 requires): process the command but write only the
        whole blocks the initiator sends. An EDTL that ends inside a block cannot be honoured
        exactly, so that case takes option b: CHECK CONDITION, INVALID FIELD IN INFORMATION
        UNIT, nothing transferred. ``unit``: bytes per block on the wire (with its tuple).
        """
        unit = unit or self.block_size
        edtl = task.expected_length
        if edtl >= nblocks * unit:
            return nblocks
        if edtl % unit:
            raise CheckCondition(_BAD_IU)
        return edtl // unit

    async def _cmd_write_and_verify(self, cmd: Cmd) -> None:
        task = cmd.task
        blk = decode_block(cmd.cdb)
        check = self._protect(cmd, blk)
        unit = self._unit(check)
        task.transfer_length = blk.length * unit
        if blk.bytchk > 1:
            raise CheckCondition.invalid_field(self._flags_byte(cmd.cdb), 2)
        self._check_range(blk.lba, blk.length)
        self._check_length(blk.length, self._length_byte(cmd.cdb))
        nblocks = self._blocks_within_edtl(task, blk.length, unit)
        # The data just written is what the medium holds, so verification cannot fail; flush
        # so it is the medium and not a cache that holds it.
        if await self._write_blocks(cmd, blk.lba, nblocks, check) and nblocks:
            await self._flush()

    @staticmethod
    def _flags_byte(cdb: bytes) -> int:
        """Where byte 1's flags (protect, DPO, FUA, BYTCHK) are: byte 10 of a 32-byte CDB."""
        return 10 if cdb[0] == Opcode.VARIABLE_LENGTH else 1

    async def _cmd_verify(self, cmd: Cmd) -> None:
        task = cmd.task
        blk = decode_block(cmd.cdb)
        bytchk = blk.bytchk
        check = self._protect(cmd, blk)
        unit = self._unit(check)
        if bytchk == 1:
            task.transfer_length = blk.length * unit
        elif bytchk == 3:
            task.transfer_length = unit if blk.length else 0
        if bytchk == 2:
            raise CheckCondition.invalid_field(self._flags_byte(cmd.cdb), 2)
        self._check_range(blk.lba, blk.length)
        if bytchk == 1:
            self._check_length(blk.length, self._length_byte(cmd.cdb))
        if blk.length == 0:
            return
        if bytchk == 0:
            if check is not None:
                await self._verify_medium(cmd, blk, check)
            return
        if task.expected_length < task.transfer_length:
            raise CheckCondition(_BAD_IU)
        if check is not None and check.transfer:
            if bytchk == 1:
                await self._verify_bytes_pi(cmd, blk, check)
            else:
                await self._verify_same_pi(cmd, blk, check)
        elif bytchk == 1:
            await self._verify_bytes(cmd, blk, check)
        else:
            await self._verify_same(cmd, blk, check)

    async def _verify_medium(self, cmd: Cmd, blk: BlockCdb, check: PiCheck) -> None:
        """BYTCHK 00b on a PI-formatted LU: read the range and check its tuples."""
        bs = self.block_size
        total = blk.length * bs
        base = blk.lba * bs
        off = 0
        while off < total:
            sg = await cmd.channel.alloc(min(io_window(bs), total - off), partial=True)
            try:
                n = sg.length - sg.length % bs
                if n == 0 or cmd.aborted():
                    return
                await self._read_into(sg, base + off, n, cmd.channel, check=check)
            finally:
                sg.release()
            off += n

    async def _verify_bytes(self, cmd: Cmd, blk: BlockCdb, check: PiCheck | None = None) -> None:
        """BYTCHK 01b: compare the Data-Out buffer with the medium."""
        bs = self.block_size
        total = blk.length * bs
        base = blk.lba * bs
        off = 0
        while off < total:
            # Both sides in whatever windows the pool allows: a short pool slows the compare
            # down instead of failing it. With PI, whole blocks: their tuples are checked.
            want = min(IO_WINDOW, total - off)
            if self.pi_type:
                sent = await self._receive_units(cmd, off, want, bs)
            else:
                sent = await self._receive(cmd, off, want, partial=True)
            if sent is None:
                return
            n = sent.length
            try:
                pos = 0
                while pos < n:
                    medium = await cmd.channel.alloc(n - pos, partial=True)
                    try:
                        if cmd.aborted():
                            return
                        m = medium.length
                        if self.pi_type and m % bs:
                            m -= m % bs  # at least one block: pool blocks hold whole ones
                        await self._read_into(medium, base + off + pos, m, cmd.channel, check=check)
                        if cmd.aborted():
                            return
                        at = _first_difference(sent.to_bytes(pos, m), medium.to_bytes(0, m))
                    finally:
                        medium.release()
                    if at is not None:
                        raise CheckCondition.of(
                            SenseKey.MISCOMPARE,
                            Asc.MISCOMPARE_DURING_VERIFY,
                            information=off + pos + at,
                        )
                    pos += m
            finally:
                sent.release()
            off += n

    async def _verify_same(self, cmd: Cmd, blk: BlockCdb, check: PiCheck | None = None) -> None:
        """BYTCHK 11b: one block was sent; every block in the range must equal it."""
        bs = self.block_size
        pattern = await self._receive_bytes(cmd, bs)
        if pattern is None:
            return
        await self._compare_same(cmd, blk, pattern, check=check)

    async def _compare_same(
        self, cmd: Cmd, blk: BlockCdb, pattern: bytes, *, check: PiCheck | None
    ) -> None:
        bs = self.block_size
        total = blk.length * bs
        base = blk.lba * bs
        window = io_window(bs)
        off = 0
        while off < total:
            n = min(window, total - off)
            medium = await cmd.channel.alloc(n)
            try:
                if cmd.aborted():
                    return
                await self._read_into(
                    medium, base + off, n, cmd.channel, check=check, check_pi=check is not None
                )
                if cmd.aborted():
                    return
                data = medium.to_bytes(0, n)
            finally:
                medium.release()
            for b in range(0, n, bs):
                at = _first_difference(pattern, data[b : b + bs])
                if at is not None:
                    # The offset is into the Data-Out buffer, i.e. within the one block sent.
                    raise CheckCondition.of(
                        SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=at
                    )
            off += n

    async def _verify_bytes_pi(self, cmd: Cmd, blk: BlockCdb, check: PiCheck) -> None:
        """BYTCHK 01b, VRPROTECT != 0: the Data-Out's tuples are checked (SBC-4 VRPROTECT
        table), then its data is compared with the medium's. A MISCOMPARE's INFORMATION is
        the offset into the Data-Out buffer, tuples included."""
        bs = self.block_size
        unit = bs + dif.TUPLE_SIZE
        per = max(1, IO_WINDOW // bs)
        done = 0
        while done < blk.length:
            sent = await self._receive_units(
                cmd, done * unit, min(per, blk.length - done) * unit, unit
            )
            if sent is None:
                return
            try:
                k = sent.length // unit
                data, pi = dif.split(sent.views(0, k * unit), bs)
                error = check.verify(data, pi, bs, done)
                wanted = b"".join(data) if error is None else b""
                del data, pi  # pool views must not ride along in a traceback
                if error is not None:
                    raise pi_failure(error, blk.lba + done)
                medium = await cmd.channel.alloc(k * bs)
                try:
                    if cmd.aborted():
                        return
                    start = (blk.lba + done) * bs
                    await self._read_into(medium, start, k * bs, cmd.channel, check_pi=False)
                    at = _first_difference(wanted, medium.to_bytes(0, k * bs))
                finally:
                    medium.release()
                if at is not None:
                    raise CheckCondition.of(
                        SenseKey.MISCOMPARE,
                        Asc.MISCOMPARE_DURING_VERIFY,
                        information=(done + at // bs) * unit + at % bs,
                    )
            finally:
                sent.release()
            done += k

    async def _verify_same_pi(self, cmd: Cmd, blk: BlockCdb, check: PiCheck) -> None:
        """BYTCHK 11b, VRPROTECT != 0: one block and its tuple sent; the tuple is checked as
        the first block's, the data compared with every block of the range."""
        bs = self.block_size
        sent = await self._receive_bytes(cmd, bs + dif.TUPLE_SIZE)
        if sent is None:
            return
        error = check.verify(sent[:bs], sent[bs:], bs, 0)
        if error is not None:
            raise pi_failure(error, blk.lba)
        await self._compare_same(cmd, blk, sent[:bs], check=None)


#: VPD B0 MAXIMUM COMPARE AND WRITE LENGTH (a one-byte CDB field caps it at 255).
MAX_COMPARE_AND_WRITE_BLOCKS = 255


def _first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    # Narrow down in C-speed chunks before the byte loop.
    step = 4096
    start = 0
    while a[start : start + step] == b[start : start + step]:
        start += step
    for i in range(start, min(start + step, len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def _rsoc_timeouts(spec: CommandSpec) -> bytes:
    return _RSOC_TIMEOUTS.pack(0x0A, 0, 0, spec.timeout)


_VERSION_DESCRIPTORS = (
    VersionDescriptor.SAM_5,
    VersionDescriptor.SPC_4,
    VersionDescriptor.SBC_3,
    VersionDescriptor.ISCSI,
)

_VPD_PAGES: dict[int, Callable[[LogicalUnit], bytes]] = {
    VpdPage.SUPPORTED_PAGES: LogicalUnit._vpd_supported,
    VpdPage.UNIT_SERIAL_NUMBER: LogicalUnit._vpd_serial,
    VpdPage.DEVICE_IDENTIFICATION: LogicalUnit._vpd_device_id,
    VpdPage.BLOCK_LIMITS: LogicalUnit._vpd_block_limits,
    VpdPage.BLOCK_DEVICE_CHARACTERISTICS: LogicalUnit._vpd_block_characteristics,
    VpdPage.LOGICAL_BLOCK_PROVISIONING: LogicalUnit._vpd_provisioning,
    VpdPage.EXTENDED_INQUIRY: LogicalUnit._vpd_extended_inquiry,
}

_MODE_PAGES: dict[int, Callable[[LogicalUnit, int], bytes]] = {
    ModePage.CACHING: LogicalUnit._mode_caching,
    ModePage.CONTROL: LogicalUnit._mode_control,
}


def _usage(*data: int) -> bytes:
    return bytes(data)


_L = LogicalUnit
#: PROUT service actions that read SCOPE and TYPE.
_PROUT_TYPED = (
    ProutAction.RESERVE,
    ProutAction.RELEASE,
    ProutAction.PREEMPT,
    ProutAction.PREEMPT_AND_ABORT,
)
_FF4 = (0xFF, 0xFF, 0xFF, 0xFF)
_FF8 = _FF4 + _FF4


def _rw32(sa: int, flags: int) -> bytes:
    """Usage data of a 32-byte CDB: group, additional length 18h, service action, byte 10's
    flags, LBA, expected initial reference tag, expected application tag, mask, length."""
    return _usage(0x7F, 0, 0, 0, 0, 0, 0x1F, 0x18, sa >> 8, sa & 0xFF, flags, 0, *_FF8, *_FF4,
                  0xFF, 0xFF, 0xFF, 0xFF, *_FF4)  # fmt: skip


def _type2(lu: LogicalUnit) -> bool:
    # SBC-4: the 32-byte READ/WRITE/VERIFY commands exist only on a type 2 medium.
    return lu.pi_type == 2


_V = VariableLength

#: The one table. CDB usage bits follow SPC-5/SBC-4; protect fields (``protect_byte``) show
#: only on PI-capable LUs, the others reject any non-zero value.
COMMANDS = OpcodeTable(
    [
        CommandSpec(Opcode.FORMAT_UNIT, None, "FORMAT UNIT",
                    _usage(0x04, 0xFF, 0, 0, 0, 0), cmd_format_unit, timeout=60, writes=True),
        CommandSpec(Opcode.VARIABLE_LENGTH, _V.READ_32, "READ(32)", _rw32(_V.READ_32, 0xF8),
                    _L._cmd_read, timeout=30, medium=True, supported=_type2),
        CommandSpec(Opcode.VARIABLE_LENGTH, _V.VERIFY_32, "VERIFY(32)",
                    _rw32(_V.VERIFY_32, 0xF6), _L._cmd_verify, timeout=30, medium=True,
                    supported=_type2),
        CommandSpec(Opcode.VARIABLE_LENGTH, _V.WRITE_32, "WRITE(32)", _rw32(_V.WRITE_32, 0xF8),
                    _L._cmd_write, timeout=30, writes=True, supported=_type2),
        CommandSpec(Opcode.VARIABLE_LENGTH, _V.WRITE_AND_VERIFY_32, "WRITE AND VERIFY(32)",
                    _rw32(_V.WRITE_AND_VERIFY_32, 0xF2), _L._cmd_write_and_verify, timeout=30,
                    writes=True, supported=_type2),
        CommandSpec(Opcode.VARIABLE_LENGTH, _V.WRITE_SAME_32, "WRITE SAME(32)",
                    _rw32(_V.WRITE_SAME_32, 0xE9), cmd_write_same, timeout=60, writes=True,
                    supported=_type2),
        CommandSpec(Opcode.TEST_UNIT_READY, None, "TEST UNIT READY",
                    _usage(0x00, 0, 0, 0, 0, 0), _L._cmd_test_unit_ready, medium=True),
        CommandSpec(Opcode.REQUEST_SENSE, None, "REQUEST SENSE",
                    _usage(0x03, 0x01, 0, 0, 0xFF, 0), _L._cmd_request_sense, ua_exempt=True),
        CommandSpec(Opcode.READ_6, None, "READ(6)",
                    _usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), _L._cmd_read, timeout=30,
                    medium=True),
        CommandSpec(Opcode.WRITE_6, None, "WRITE(6)",
                    _usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), _L._cmd_write, timeout=30,
                    writes=True),
        CommandSpec(Opcode.INQUIRY, None, "INQUIRY",
                    _usage(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0), _L._cmd_inquiry, ua_exempt=True),
        CommandSpec(Opcode.MODE_SELECT_6, None, "MODE SELECT(6)",
                    _usage(0x15, 0x11, 0, 0, 0xFF, 0), _L._cmd_mode_select),
        CommandSpec(Opcode.MODE_SENSE_6, None, "MODE SENSE(6)",
                    _usage(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0), _L._cmd_mode_sense),
        CommandSpec(Opcode.START_STOP_UNIT, None, "START STOP UNIT",
                    _usage(0x1B, 0x01, 0, 0x0F, 0xF7, 0), _L._cmd_start_stop_unit),
        CommandSpec(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL",
                    _usage(0x1E, 0, 0, 0, 0x03, 0), _L._cmd_prevent_allow,
                    supported=lambda lu: lu.removable),
        CommandSpec(Opcode.READ_CAPACITY_10, None, "READ CAPACITY(10)",
                    _usage(0x25, 0, *_FF4, 0, 0, 0x01, 0), _L._cmd_read_capacity_10, medium=True),
        CommandSpec(Opcode.READ_10, None, "READ(10)",
                    _usage(0x28, 0x18, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_read, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_10, None, "WRITE(10)",
                    _usage(0x2A, 0x18, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_write, timeout=30,
                    writes=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_AND_VERIFY_10, None, "WRITE AND VERIFY(10)",
                    _usage(0x2E, 0x12, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_write_and_verify,
                    timeout=30, writes=True, protect_byte=1),
        CommandSpec(Opcode.VERIFY_10, None, "VERIFY(10)",
                    _usage(0x2F, 0x16, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_verify, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.PRE_FETCH_10, None, "PRE-FETCH(10)",
                    _usage(0x34, 0x02, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_prefetch, medium=True),
        CommandSpec(Opcode.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)",
                    _usage(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0), _L._cmd_read_defect_data,
                    medium=True),
        CommandSpec(Opcode.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)",
                    _usage(0x35, 0x02, *_FF4, 0x3F, 0xFF, 0xFF, 0), _L._cmd_synchronize_cache,
                    timeout=60, medium=True),
        CommandSpec(Opcode.WRITE_SAME_10, None, "WRITE SAME(10)",
                    _usage(0x41, 0x08, *_FF4, 0x3F, 0xFF, 0xFF, 0), cmd_write_same, timeout=60,
                    writes=True, protect_byte=1),
        CommandSpec(Opcode.UNMAP, None, "UNMAP",
                    _usage(0x42, 0, 0, 0, 0, 0, 0x3F, 0xFF, 0xFF, 0), cmd_unmap, timeout=60,
                    supported=lambda lu: lu.lbpu, writes=True),
        CommandSpec(Opcode.MODE_SELECT_10, None, "MODE SELECT(10)",
                    _usage(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), _L._cmd_mode_select),
        CommandSpec(Opcode.MODE_SENSE_10, None, "MODE SENSE(10)",
                    _usage(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0), _L._cmd_mode_sense),
        CommandSpec(Opcode.READ_16, None, "READ(16)",
                    _usage(0x88, 0x18, *_FF8, *_FF4, 0x3F, 0), _L._cmd_read, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_16, None, "WRITE(16)",
                    _usage(0x8A, 0x18, *_FF8, *_FF4, 0x3F, 0), _L._cmd_write, timeout=30,
                    writes=True, protect_byte=1),
        CommandSpec(Opcode.COMPARE_AND_WRITE, None, "COMPARE AND WRITE",
                    _usage(0x89, 0x18, *_FF8, 0, 0, 0, 0xFF, 0x3F, 0),
                    _L._cmd_compare_and_write, timeout=30, writes=True),
        CommandSpec(Opcode.ORWRITE_16, None, "ORWRITE(16)",
                    _usage(0x8B, 0x18, *_FF8, *_FF4, 0x3F, 0), cmd_orwrite,
                    timeout=30, writes=True),
        CommandSpec(Opcode.WRITE_AND_VERIFY_16, None, "WRITE AND VERIFY(16)",
                    _usage(0x8E, 0x12, *_FF8, *_FF4, 0x3F, 0), _L._cmd_write_and_verify,
                    timeout=30, writes=True, protect_byte=1),
        CommandSpec(Opcode.VERIFY_16, None, "VERIFY(16)",
                    _usage(0x8F, 0x16, *_FF8, *_FF4, 0x3F, 0), _L._cmd_verify, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.PRE_FETCH_16, None, "PRE-FETCH(16)",
                    _usage(0x90, 0x02, *_FF8, *_FF4, 0x3F, 0), _L._cmd_prefetch, medium=True),
        CommandSpec(Opcode.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)",
                    _usage(0x91, 0x02, *_FF8, *_FF4, 0x3F, 0), _L._cmd_synchronize_cache,
                    timeout=60, medium=True),
        CommandSpec(Opcode.WRITE_SAME_16, None, "WRITE SAME(16)",
                    _usage(0x93, 0x09, *_FF8, *_FF4, 0x3F, 0), cmd_write_same, timeout=60,
                    writes=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_ATOMIC_16, None, "WRITE ATOMIC(16)",
                    _usage(0x9C, 0x18, *_FF8, *_FF4, 0x3F, 0), cmd_write_atomic,
                    timeout=30, writes=True),
        CommandSpec(Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS,
                    "GET LBA STATUS",
                    _usage(0x9E, 0x12, *_FF8, *_FF4, 0, 0), cmd_get_lba_status, medium=True),
        CommandSpec(Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16,
                    "READ CAPACITY(16)",
                    _usage(0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0),
                    _L._cmd_read_capacity_16, medium=True),
        CommandSpec(Opcode.REPORT_LUNS, None, "REPORT LUNS",
                    _usage(0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, 0), _L._cmd_report_luns,
                    ua_exempt=True),
        CommandSpec(Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
                    "REPORT SUPPORTED OPERATION CODES",
                    _usage(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0), _L._cmd_rsoc),
        CommandSpec(Opcode.READ_12, None, "READ(12)",
                    _usage(0xA8, 0x18, *_FF4, *_FF4, 0x3F, 0), _L._cmd_read, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_12, None, "WRITE(12)",
                    _usage(0xAA, 0x18, *_FF4, *_FF4, 0x3F, 0), _L._cmd_write, timeout=30,
                    writes=True, protect_byte=1),
        CommandSpec(Opcode.WRITE_AND_VERIFY_12, None, "WRITE AND VERIFY(12)",
                    _usage(0xAE, 0x12, *_FF4, *_FF4, 0x3F, 0), _L._cmd_write_and_verify,
                    timeout=30, writes=True, protect_byte=1),
        CommandSpec(Opcode.VERIFY_12, None, "VERIFY(12)",
                    _usage(0xAF, 0x16, *_FF4, *_FF4, 0x3F, 0), _L._cmd_verify, timeout=30,
                    medium=True, protect_byte=1),
        CommandSpec(Opcode.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)",
                    _usage(0xB7, 0x1F, 0, 0, 0, 0, *_FF4, 0, 0), _L._cmd_read_defect_data,
                    medium=True),
        CommandSpec(Opcode.RESERVE_6, None, "RESERVE(6)",
                    _usage(0x16, 0, 0, 0, 0, 0), _L._cmd_reserve),
        CommandSpec(Opcode.RELEASE_6, None, "RELEASE(6)",
                    _usage(0x17, 0, 0, 0, 0, 0), _L._cmd_release),
        CommandSpec(Opcode.RESERVE_10, None, "RESERVE(10)",
                    _usage(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0), _L._cmd_reserve),
        CommandSpec(Opcode.RELEASE_10, None, "RELEASE(10)",
                    _usage(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0), _L._cmd_release),
        *(CommandSpec(Opcode.PERSISTENT_RESERVE_IN, sa, f"PERSISTENT RESERVE IN ({sa.name})",
                      _usage(0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), _L._cmd_prin)
          for sa in PrinAction),
        *(CommandSpec(Opcode.PERSISTENT_RESERVE_OUT, sa, f"PERSISTENT RESERVE OUT ({sa.name})",
                      _usage(0x5F, sa, 0xFF if sa in _PROUT_TYPED else 0, 0, 0, *_FF4, 0),
                      _L._cmd_prout)
          for sa in ProutAction),
        CommandSpec(Opcode.EXTENDED_COPY, 0x00, "EXTENDED COPY(LID1)",
                    _usage(0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0),
                    cmd_extended_copy, timeout=60),
        *(CommandSpec(Opcode.RECEIVE_COPY_RESULTS, sa, f"RECEIVE COPY RESULTS ({sa.name})",
                      _usage(0x84, sa, 0 if sa == CopyResultsAction.OPERATING_PARAMETERS
                             else 0xFF, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0),
                      cmd_receive_copy_results)
          for sa in CopyResultsAction),
        # IMMED, AUSE and the service action in byte 1; ZNR (zoned only) is reserved here.
        *(CommandSpec(Opcode.SANITIZE, sa, f"SANITIZE ({sa.name})",
                      _usage(0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), cmd_sanitize,
                      writes=sa != SanitizeAction.EXIT_FAILURE_MODE)
          for sa in SanitizeAction),
    ]
)  # fmt: skip

#: Opcodes that never report a unit attention (SPC-5 5.14): derived from the table.
_UA_EXEMPT = frozenset(spec.opcode for spec in COMMANDS if spec.ua_exempt)
