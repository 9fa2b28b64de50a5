"""What a transport hands the SCSI layer: a task and a channel to move its data.

The SCSI layer never sees PDUs or sockets. A frontend (iSCSI today, vhost-user later) fills a
``Task`` from its command, gives the SCSI target a ``DataChannel`` that moves data between the
initiator and pool scatter lists, and reads ``status``/``sense`` and ``transfer_length`` back when
``ScsiTarget.execute`` returns.

Residuals are the transport's business but need the SCSI view: ``transfer_length`` is the number
of bytes the command wanted to move according to its CDB (SPDTL). The transport compares it with
the initiator's expected length (EDTL) and reports overflow or underflow.
"""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

from sgtarget.backstores.base import Runner, run_inline
from sgtarget.datapath import ScatterList

__all__ = [
    "BlockingRunner",
    "DataChannel",
    "DataDirection",
    "Nexus",
    "Task",
    "run_inline",
]

T = TypeVar("T")


class DataDirection(enum.IntEnum):
    NONE = 0
    #: Data-In: target to initiator (READ, INQUIRY, ...).
    READ = 1
    #: Data-Out: initiator to target (WRITE, ...).
    WRITE = 2
    BIDI = 3


class Nexus:
    """An I_T nexus: one initiator port talking to one target port.

    Unit attentions and (later) reservations are kept per nexus. ``key`` identifies it
    stably across reconnects of the same initiator session (iSCSI: initiator name + ISID).
    """

    __slots__ = ("initiator", "key")

    def __init__(self, initiator: str, key: str) -> None:
        self.initiator = initiator
        self.key = key

    def __repr__(self) -> str:
        return f"Nexus({self.key!r})"


class Task:
    """Per-command state the SCSI layer sees. Slotted and reusable (``reset``)."""

    __slots__ = (
        "aborted",
        "cdb",
        "direction",
        "expected_length",
        "lun",
        "nexus",
        "sense",
        "status",
        "tag",
        "transfer_length",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cdb: bytes = b""
        #: The 8-byte SAM LUN field as sent by the initiator.
        self.lun: bytes = bytes(8)
        self.direction = DataDirection.NONE
        #: EDTL: bytes the initiator expects to transfer.
        self.expected_length = 0
        #: SPDTL: bytes the CDB asked to transfer; set by the SCSI layer.
        self.transfer_length = 0
        self.tag = 0
        self.nexus: Nexus | None = None
        self.status = 0
        self.sense: bytes = b""
        #: Set by task management; the LU stops at its next await point.
        self.aborted = False


class DataChannel(Protocol):
    """Moves a task's data between the initiator and pool scatter lists.

    Offsets are byte offsets within the command's data buffer (iSCSI's Buffer Offset). Both
    directions clip to the initiator's expected length: ``send`` drops bytes past it, ``receive``
    returns fewer bytes than asked.
    """

    async def alloc(self, nbytes: int, *, partial: bool = False) -> ScatterList:
        """Pool blocks for ``nbytes`` (waiting for memory if need be).

        With ``partial`` the list may be shorter (at least one block, or ``nbytes`` if that is
        less) when the pool is short, so streaming callers take what there is and loop.
        Raises ``PoolExhausted`` when nothing can be had in time (TASK SET FULL).
        """
        ...

    async def receive(self, offset: int, length: int) -> ScatterList:
        """Data-Out bytes ``[offset, offset + length)`` of the command's buffer.

        The transport owns where payload lands: immediate and unsolicited data are already in
        pool blocks when the command starts, and solicited data is received straight into
        blocks it allocates, so the bytes are never copied. The caller owns the returned list
        and releases it. It is shorter than ``length`` when the initiator's expected length
        ends earlier. Raises ``PoolExhausted`` when no blocks can be had.
        """
        ...

    async def send(self, sg: ScatterList, offset: int, length: int, *, last: bool) -> None:
        """Send ``sg[0:length]`` as Data-In at buffer ``offset``. Takes ownership of ``sg``.

        ``last`` marks the final data of the command, letting the transport fold the status
        into it.
        """
        ...


#: What ``LogicalUnit.execute_now`` did: nothing (run ``execute``), all of the command, or
#: started it (its WRITE completes later and calls ``ImmediateChannel.finish``).
NOW_DECLINED = 0
NOW_DONE = 1
NOW_PENDING = 2


class ImmediateChannel(Protocol):
    """The synchronous side of a transport, for commands that finish without yielding
    (``LogicalUnit.execute_now``): nothing here waits, so each call either does its work at
    once or says it cannot (``None``) and the command takes the ``DataChannel`` path."""

    def alloc_now(self, nbytes: int) -> ScatterList | None:
        """Pool blocks for ``nbytes`` if they are free now (and nobody waits for memory)."""
        ...

    def data_now(self, task: Task) -> ScatterList | None:
        """All of ``task``'s Data-Out if it is already here (immediate data), still owned by
        the transport (released when the task completes); else ``None``."""
        ...

    def send_now(self, task: Task, sg: ScatterList, length: int) -> None:
        """Send ``sg[0:length]``, all of ``task``'s Data-In (ownership passes), the status
        folded in at completion."""
        ...

    def take_data(self, task: Task) -> ScatterList:
        """``data_now``'s list, now the caller's: the transport forgets it (so a lost
        connection cannot free it under a write still in flight)."""
        ...

    def finish(self, task: Task) -> None:
        """A ``NOW_PENDING`` command is done: send its status."""
        ...


#: Runs a blocking backstore call: a thread pool in the server, inline in tests.
BlockingRunner = Runner
