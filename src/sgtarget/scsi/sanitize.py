"""SANITIZE (SBC-4 4.11, 5.30): overwrite, block erase, cryptographic erase, exit failure mode.

A sanitize is an operation of the logical unit, not of the command that asked for it: it runs
as a background job of the LU's ``Sanitizer``, keeps going when its command is aborted, the
LUN or target is reset or the initiator logs out, and only a target shutdown stops it. The
command returns when the job ends (IMMED=0) or once the CDB and parameter list are validated
(IMMED=1).

While a job runs, the dispatcher asks ``Sanitizer.fence`` first: every command but INQUIRY,
REPORT LUNS and REQUEST SENSE gets NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS
with a progress indication, and REQUEST SENSE returns the same sense (GOOD) for polling. A job
that fails (a backstore error) leaves the LU in failure mode: the same commands then get
MEDIUM ERROR, SANITIZE COMMAND FAILED until a later sanitize succeeds or, if the failed one
had AUSE set, EXIT FAILURE MODE is sent.

How the medium is sanitized: OVERWRITE writes the initialization pattern (repeated to fill
each block, inverted between passes if asked) over every block, OVERWRITE COUNT times. BLOCK
ERASE and CRYPTOGRAPHIC ERASE deallocate everything on a thin LUN (reads return zeros: LBPRZ)
and write zeros elsewhere. Writes stream one pool window through the executor at
``SANITIZE_BYTES_PER_SECOND`` at most, like md's resync speed limit: a sanitize is background
maintenance and leaves the backstore (and the shared I/O threads) to the foreground I/O of this
and other LUNs. Reads after an erase succeed (VPD B1h WABEREQ = WACEREQ = 01b).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sgtarget.backstores.base import BackstoreError
from sgtarget.datapath import PoolExhausted
from sgtarget.scsi.cdb import u16
from sgtarget.scsi.constants import Asc, Opcode, SenseKey, io_window
from sgtarget.scsi.sense import CheckCondition, SenseData, field_pointer

if TYPE_CHECKING:
    from sgtarget.datapath import ScatterList
    from sgtarget.scsi.lu import Cmd, LogicalUnit

log = logging.getLogger(__name__)

#: Ceiling on sanitize writes per LU. A 256 MiB LUN takes 8 s per overwrite pass.
SANITIZE_BYTES_PER_SECOND = 32 * 1024 * 1024
#: Bytes deallocated per backstore call on thin LUNs: progress moves and other commands on the
#: same executor get their turn in between.
DISCARD_CHUNK = 64 * 1024 * 1024
#: How often a command waiting for its sanitize looks at its abort flag (seconds).
ABORT_POLL = 0.05
#: VPD B1h byte 7: WABEREQ 01b and WACEREQ 01b (reads after an erase complete without error).
BDC_ERASE_READS = 0x50
#: Commands a sanitize in progress or failed leaves alone (SBC-4 4.11.2); SANITIZE itself is
#: also allowed in failure mode, to start the sanitize that ends it.
_ALLOWED = frozenset((Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE))

#: Overwrite parameter list header: INVERT|TEST|OVERWRITE COUNT, reserved, PATTERN LENGTH.
_OVERWRITE_HDR = struct.Struct(">BxH")
_INVERT = bytes(b ^ 0xFF for b in range(256))

_IN_PROGRESS = Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS
_FAILED = SenseData(SenseKey.MEDIUM_ERROR, Asc.SANITIZE_COMMAND_FAILED)


class SanitizeAction(enum.IntEnum):
    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTOGRAPHIC_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


@dataclass(frozen=True, slots=True)
class SanitizeCdb:
    immed: bool
    #: Allow unrestricted sanitize exit: EXIT FAILURE MODE may end this sanitize's failure.
    ause: bool
    action: SanitizeAction
    param_len: int


def decode_sanitize(cdb: bytes, block_size: int) -> SanitizeCdb:
    """Checks every CDB field: reserved bits, and the parameter list length each action needs.

    ZNR (byte 1 bit 6) is for zoned devices only, so on ours it is reserved.
    """
    if cdb[1] & 0x40:
        raise CheckCondition.invalid_field(1, 6)
    for i in range(2, 7):
        if cdb[i]:
            raise CheckCondition.invalid_field(i)
    action = SanitizeAction(cdb[1] & 0x1F)  # the opcode table only routes known ones here
    param_len = u16(cdb, 7)
    if action == SanitizeAction.OVERWRITE:
        # Header plus 1 .. block length pattern bytes.
        ok = _OVERWRITE_HDR.size < param_len <= _OVERWRITE_HDR.size + block_size
    else:
        ok = param_len == 0
    if not ok:
        raise CheckCondition.invalid_field(7)
    return SanitizeCdb(bool(cdb[1] & 0x80), bool(cdb[1] & 0x20), action, param_len)


def _bad_param(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        SenseData(
            SenseKey.ILLEGAL_REQUEST,
            Asc.INVALID_FIELD_IN_PARAMETER_LIST,
            sks=field_pointer(byte, bit, in_cdb=False),
        )
    )


@dataclass(frozen=True, slots=True)
class OverwriteParams:
    invert: bool
    count: int
    pattern: bytes


def parse_overwrite(data: bytes, block_size: int) -> OverwriteParams:
    """The OVERWRITE parameter list (SBC-4 5.30.2.2); ``data`` is the whole list."""
    flags, length = _OVERWRITE_HDR.unpack_from(data)
    if flags & 0x60:
        raise _bad_param(0, 6)  # TEST: we have no test modes
    count = flags & 0x1F
    if count == 0:
        raise _bad_param(0, 4)
    if length == 0 or length > block_size or length > len(data) - _OVERWRITE_HDR.size:
        raise _bad_param(2)
    start = _OVERWRITE_HDR.size
    return OverwriteParams(bool(flags & 0x80), count, bytes(data[start : start + length]))


def block_image(pattern: bytes, block_size: int) -> bytes:
    """One logical block as written: the pattern repeated from the block's first byte."""
    return (pattern * -(-block_size // len(pattern)))[:block_size]


def pass_inverted(params: OverwriteParams, index: int) -> bool:
    """Whether pass ``index`` (0-based) writes the inverted pattern.

    With INVERT the passes alternate and the last one writes the pattern itself, so an even
    count starts inverted (SBC-4 5.30.2.2).
    """
    return params.invert and (params.count - 1 - index) % 2 == 1


def progress_indication(done: int, total: int) -> bytes:
    """Sense-key specific PROGRESS INDICATION (SPC-5 4.4.2.4.4): SKSV and done/total x 65536."""
    value = min(0xFFFF, done * 0x10000 // total) if total else 0
    return bytes((0x80, value >> 8, value & 0xFF))


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    FAILED = "failed"


class Sanitizer:
    """One LU's sanitize state: idle, running (with progress) or failed."""

    def __init__(self) -> None:
        self._state = _State.IDLE
        self._done = 0
        self._total = 0
        #: AUSE of the sanitize that failed (whether EXIT FAILURE MODE may end the failure).
        self._failed_ause = False
        self._job: asyncio.Task[bool] | None = None
        #: Write pace in bytes per second; ``None`` writes as fast as the backstore goes.
        self.rate: float | None = SANITIZE_BYTES_PER_SECOND

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    @property
    def idle(self) -> bool:
        """Neither running nor failed: nothing is fenced."""
        return self._state is _State.IDLE

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    def sense(self) -> SenseData | None:
        """What a fenced command gets, and what REQUEST SENSE reports; None when idle."""
        if self._state is _State.RUNNING:
            sks = progress_indication(self._done, self._total)
            return SenseData(SenseKey.NOT_READY, _IN_PROGRESS, sks=sks)
        if self._state is _State.FAILED:
            return _FAILED
        return None

    def fence(self, opcode: int) -> SenseData | None:
        """The sense that ends a command with ``opcode`` now, or None if it may run."""
        if self._state is _State.IDLE or opcode in _ALLOWED:
            return None
        if self._state is _State.FAILED and opcode == Opcode.SANITIZE:
            return None
        return self.sense()

    def exit_failure_mode(self) -> None:
        """EXIT FAILURE MODE: leave failure mode if the failed sanitize allowed it (AUSE)."""
        if self._state is not _State.FAILED:
            return  # nothing failed: nothing to do
        if not self._failed_ause:
            # Restricted completion mode: only a successful sanitize ends the failure.
            raise CheckCondition.invalid_field(1, 4)
        self._state = _State.IDLE

    def check_start(self, ause: bool) -> None:
        """After a restricted-mode failure, a new sanitize must not ask for unrestricted mode."""
        if self._state is _State.FAILED and not self._failed_ause and ause:
            raise CheckCondition.invalid_field(1, 5)

    async def stop(self) -> None:
        """Cancel a running job (target shutdown); the LU is left in failure mode."""
        job = self._job
        if job is not None and not job.done():
            job.cancel()
            await asyncio.wait([job])

    def _start(self, lu: LogicalUnit, plan: _Plan) -> asyncio.Task[bool]:
        self._state = _State.RUNNING
        self._done, self._total = 0, plan.total
        self._job = asyncio.get_running_loop().create_task(self._run(lu, plan))
        return self._job

    async def _run(self, lu: LogicalUnit, plan: _Plan) -> bool:
        """The job: True when the medium is sanitized, False (failure mode) otherwise."""
        ok = False
        try:
            await plan.execute(lu, self)
            await lu._flush()
            ok = True
        except CheckCondition as cc:
            log.warning("sanitize of %s failed: %s", lu.identity, cc)
        except asyncio.CancelledError:
            log.warning("sanitize of %s interrupted at %d/%d", lu.identity, self._done, self._total)
            raise
        finally:
            plan.release()
            self._failed_ause = plan.ause
            self._state = _State.IDLE if ok else _State.FAILED
            log.info("sanitize of %s %s", lu.identity, "done" if ok else "failed")
        return ok

    def _advance(self, n: int) -> None:
        self._done += n

    async def _pace(self, loop: asyncio.AbstractEventLoop, started: float, written: int) -> None:
        rate = self.rate
        ahead = written / rate - (loop.time() - started) if rate else 0.0
        # Always yield: inline (non-blocking) backstores run on the event loop.
        await asyncio.sleep(max(ahead, 0.0))


class _Plan:
    """What one sanitize does to the medium, and the pool window it writes from."""

    def __init__(
        self,
        lu: LogicalUnit,
        cdb: SanitizeCdb,
        params: OverwriteParams | None,
        window: ScatterList | None,
    ) -> None:
        self.ause = cdb.ause
        self.params = params
        self.window = window
        self.discard = params is None and lu.thin
        size = lu.num_blocks * lu.block_size
        self.size = size
        self.total = size * (params.count if params is not None else 1)

    def release(self) -> None:
        if self.window is not None:
            self.window.release()

    async def execute(self, lu: LogicalUnit, sanitizer: Sanitizer) -> None:
        if self.discard:
            await self._deallocate(lu, sanitizer)
            return
        params = self.params
        if params is None:
            await self._write_all(lu, sanitizer, None)
            return
        image = block_image(params.pattern, lu.block_size)
        for index in range(params.count):
            inverted = image.translate(_INVERT) if pass_inverted(params, index) else image
            await self._write_all(lu, sanitizer, inverted)

    async def _deallocate(self, lu: LogicalUnit, sanitizer: Sanitizer) -> None:
        off = 0
        while off < self.size:
            n = min(DISCARD_CHUNK, self.size - off)
            try:
                await lu.io.discard(off, n)
            except BackstoreError as exc:
                # Text only: the exception must not outlive this frame (see lu.py).
                log.warning("sanitize discard at %d failed on %s: %s", off, lu.identity, exc)
                raise CheckCondition(_FAILED) from None
            await lu._discard_pi(off, n)  # deallocated: escape tuples, as never written
            sanitizer._advance(n)
            off += n
            await asyncio.sleep(0)

    async def _write_all(self, lu: LogicalUnit, sanitizer: Sanitizer, image: bytes | None) -> None:
        """One pass: ``image`` (None: zeros) in every block, one window at a time."""
        sg = self.window
        assert sg is not None
        n = sg.length
        if image is None:
            sg.zero(0, n)
        else:
            sg.fill(image, n, reason="sanitize")
        loop = asyncio.get_running_loop()
        started = loop.time()
        pos = 0
        while pos < self.size:
            m = min(n, self.size - pos)
            await lu._write_from(sg, pos, m)
            pos += m
            sanitizer._advance(m)
            await sanitizer._pace(loop, started, pos)


async def cmd_sanitize(lu: LogicalUnit, cmd: Cmd) -> None:
    """SANITIZE: validate, start the LU's job, and wait for it unless IMMED."""
    task = cmd.task
    bs = lu.block_size
    sc = decode_sanitize(cmd.cdb, bs)
    task.transfer_length = sc.param_len
    san = lu.sanitizer
    if sc.action == SanitizeAction.EXIT_FAILURE_MODE:
        san.exit_failure_mode()
        return
    san.check_start(sc.ause)
    params = None
    if sc.action == SanitizeAction.OVERWRITE:
        data = await lu._receive_bytes(cmd, sc.param_len)
        if data is None:
            return
        params = parse_overwrite(data, bs)
    window = None
    if params is not None or not lu.thin:
        size = lu.num_blocks * bs
        want = min(size, io_window(bs))
        window = await cmd.channel.alloc(want, partial=True)
        window.truncate(window.length - window.length % bs)
        if not window.length:
            window.release()
            raise PoolExhausted(want)
        if cmd.aborted() or san.running:
            # Aborted, or another SANITIZE started while we waited for memory.
            window.release()
            if san.running:
                raise CheckCondition(san.sense() or _FAILED)
            return
    job = san._start(lu, _Plan(lu, sc, params, window))
    if sc.immed:
        return
    while not job.done():
        await asyncio.wait([job], timeout=ABORT_POLL)
        if cmd.aborted():
            return  # the sanitize goes on without its command
    if job.cancelled() or not job.result():
        raise CheckCondition(_FAILED)
