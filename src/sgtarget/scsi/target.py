"""A SCSI target device: its logical units, LUN routing, and resets (SAM-5 4.6, 6.3)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from sgtarget.datapath import PoolExhausted
from sgtarget.scsi.constants import Asc, Opcode, SenseKey, Status
from sgtarget.scsi.lu import (
    COMMANDS,
    Cmd,
    LogicalUnit,
    not_connected_inquiry,
    report_luns_data,
    send_reply,
)
from sgtarget.scsi.lun import decode_lun
from sgtarget.scsi.sense import CheckCondition, SenseData
from sgtarget.scsi.task import NOW_DECLINED, DataChannel, ImmediateChannel, Nexus, Task

log = logging.getLogger(__name__)

_LU_NOT_SUPPORTED = SenseData(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)


class ScsiTarget:
    """Routes tasks to logical units by LUN and answers for LUNs that do not exist."""

    def __init__(
        self, name: str, luns: Sequence[LogicalUnit], *, relative_port_id: int = 1
    ) -> None:
        self._name = name
        self._relative_port_id = relative_port_id
        self.luns: dict[int, LogicalUnit] = dict(enumerate(luns))
        for lu in self.luns.values():
            lu.attach(self)
        #: LUN fields as initiators send them -> LU, decoded once (``execute_now``).
        self._by_field: dict[bytes, LogicalUnit] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def relative_port_id(self) -> int:
        return self._relative_port_id

    def lun_numbers(self) -> Iterable[int]:
        return self.luns.keys()

    def logical_units(self) -> Iterable[LogicalUnit]:
        return self.luns.values()

    def execute_now(self, task: Task, tx: ImmediateChannel) -> int:
        """``LogicalUnit.execute_now`` for ``task``'s LU; ``NOW_DECLINED`` for no LU."""
        lu = self._by_field.get(task.lun)
        if lu is None:
            lun = decode_lun(task.lun)
            found = self.luns.get(lun) if lun is not None else None
            if found is None:
                return NOW_DECLINED
            lu = self._by_field[task.lun] = found
        return lu.execute_now(task, tx)

    async def execute(self, task: Task, channel: DataChannel) -> None:
        """Run ``task``; sets status, sense and transfer_length. Never raises for SCSI errors."""
        lun = decode_lun(task.lun)
        lu = self.luns.get(lun) if lun is not None else None
        if lu is not None:
            await lu.execute(task, channel)
            return
        task.status = Status.GOOD
        task.sense = b""
        task.transfer_length = 0
        try:
            await self._no_such_lun(task, channel)
        except CheckCondition as cc:
            task.status = Status.CHECK_CONDITION
            task.sense = cc.sense.fixed()
        except PoolExhausted:
            task.status = Status.TASK_SET_FULL
        except Exception:
            log.exception(
                "internal error on CDB %s for absent LUN %s (tag %#x)",
                task.cdb.hex(),
                task.lun.hex(),
                task.tag,
            )
            task.status = Status.CHECK_CONDITION
            task.sense = SenseData(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE).fixed()

    async def _no_such_lun(self, task: Task, channel: DataChannel) -> None:
        """SPC-5 / SAM-5 behaviour for an incorrect logical unit number."""
        cdb = task.cdb
        opcode = cdb[0] if cdb else -1
        spec = COMMANDS.get(opcode) if opcode >= 0 else None
        if spec is None or len(cdb) < spec.cdb_len:
            raise CheckCondition(_LU_NOT_SUPPORTED)
        cmd = Cmd(task, channel, spec, "")
        if opcode == Opcode.REPORT_LUNS:
            data, alloc = report_luns_data(cdb, self.luns.keys())
            await send_reply(cmd, data, alloc)
        elif opcode == Opcode.INQUIRY and not cdb[1] & 0x01:
            if cdb[2]:
                raise CheckCondition.invalid_field(2)
            await send_reply(cmd, not_connected_inquiry(), int.from_bytes(cdb[3:5], "big"))
        elif opcode == Opcode.REQUEST_SENSE:
            # The sense data describes why this LUN cannot be used (SPC-5 6.39).
            await send_reply(cmd, _LU_NOT_SUPPORTED.encode(descriptor=bool(cdb[1] & 1)), cdb[4])
        else:
            raise CheckCondition(_LU_NOT_SUPPORTED)

    def lun_reset(self, lun: int) -> bool:
        """LOGICAL UNIT RESET: queue BUS DEVICE RESET FUNCTION OCCURRED for every nexus."""
        lu = self.luns.get(lun)
        if lu is None:
            return False
        lu.queue_reset_ua(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        return True

    def target_reset(self, *, cold: bool) -> None:
        """TARGET WARM/COLD RESET: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED everywhere."""
        for lu in self.luns.values():
            if cold:
                # A cold reset is a power cycle: all nexus state goes, and every nexus gets
                # the power-on unit attention at its next command.
                lu.forget_all_nexuses()
            else:
                lu.queue_reset_ua(Asc.POWER_ON_RESET)

    def nexus_lost(self, nexus: Nexus) -> None:
        """Forget per-nexus state (unit attentions; later reservations)."""
        for lu in self.luns.values():
            lu.nexus_lost(nexus.key)
