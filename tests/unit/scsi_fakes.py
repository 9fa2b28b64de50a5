"""In-memory stand-ins for the SCSI tests: a DataChannel, a bytearray backstore, a runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar

from sgtarget.backstores.base import Backstore, BackstoreError, Buffers
from sgtarget.datapath import Pool, PoolExhausted, ScatterList
from sgtarget.scsi.lun import encode_lun
from sgtarget.scsi.target import ScsiTarget
from sgtarget.scsi.task import DataDirection, Nexus, Task


class MemBackstore(Backstore):
    """A bytearray with switchable failures."""

    kind: ClassVar[str] = "test-mem"
    blocking: ClassVar[bool] = False

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.data = bytearray(size)
        self.fail_read = False
        self.fail_write = False
        self.fail_flush = False
        self.flushes = 0
        self.writes = 0

    def readv(self, offset: int, bufs: Buffers) -> int:
        if self.fail_read:
            raise BackstoreError("injected read failure")
        pos = offset
        for b in bufs:
            b[:] = self.data[pos : pos + len(b)]
            pos += len(b)
        return pos - offset

    def writev(self, offset: int, bufs: Buffers) -> int:
        if self.fail_write:
            raise BackstoreError("injected write failure")
        self.writes += 1
        pos = offset
        for b in bufs:
            self.data[pos : pos + len(b)] = b
            pos += len(b)
        return pos - offset

    def flush(self) -> None:
        if self.fail_flush:
            raise BackstoreError("injected flush failure")
        self.flushes += 1


class FakeChannel:
    """A DataChannel over a pool, with the initiator's side held in memory.

    ``data_out`` is what the initiator sends (already clipped to EDTL, as a transport does);
    ``data_in`` collects what the target sends, clipped to EDTL.
    """

    def __init__(self, pool: Pool, task: Task, data_out: bytes = b"") -> None:
        self.pool = pool
        self.task = task
        self.data_out = data_out[: task.expected_length]
        self.data_in = bytearray()
        self.sends: list[tuple[int, int, bool]] = []
        self.receives: list[tuple[int, int]] = []
        self.exhausted = False
        #: Like a transport under memory pressure: partial allocations and receives are cut
        #: to this many bytes (0: no limit).
        self.partial_limit = 0
        #: Called before each channel operation returns (e.g. to abort the task).
        self.hook: Callable[[str], None] | None = None

    def _hook(self, what: str) -> None:
        if self.hook is not None:
            self.hook(what)

    async def alloc(self, nbytes: int, *, partial: bool = False) -> ScatterList:
        await asyncio.sleep(0)
        if self.exhausted:
            raise PoolExhausted(nbytes)
        if partial and self.partial_limit:
            nbytes = min(nbytes, self.partial_limit)
        sg = self.pool.alloc(nbytes)
        self._hook("alloc")
        return sg

    async def receive(self, offset: int, length: int) -> ScatterList:
        await asyncio.sleep(0)
        if self.exhausted:
            raise PoolExhausted(length)
        self.receives.append((offset, length))
        if self.partial_limit:
            length = min(length, self.partial_limit)
        chunk = self.data_out[offset : offset + length]
        sg = self.pool.alloc(len(chunk))
        sg.copy_in(chunk)
        self._hook("receive")
        return sg

    async def send(self, sg: ScatterList, offset: int, length: int, *, last: bool) -> None:
        await asyncio.sleep(0)
        try:
            self.sends.append((offset, length, last))
            end = min(offset + length, self.task.expected_length)
            if end > offset:
                if len(self.data_in) < end:
                    self.data_in.extend(bytes(end - len(self.data_in)))
                self.data_in[offset:end] = sg.to_bytes(0, end - offset)
        finally:
            sg.release()
        self._hook("send")


NEXUS = Nexus("iqn.2024-01.test:init", "iqn.2024-01.test:init,i,0x23d000000001")
OTHER_NEXUS = Nexus("iqn.2024-01.test:other", "iqn.2024-01.test:other,i,0x23d000000002")


def make_task(
    cdb: bytes | bytearray,
    *,
    lun: int = 0,
    expected_length: int = 0,
    direction: DataDirection = DataDirection.NONE,
    nexus: Nexus | None = NEXUS,
) -> Task:
    task = Task()
    task.cdb = bytes(cdb)
    task.lun = encode_lun(lun)
    task.expected_length = expected_length
    task.direction = direction
    task.nexus = nexus
    task.tag = 0x10
    return task


def run(
    target: ScsiTarget,
    pool: Pool,
    cdb: bytes | bytearray,
    *,
    lun: int = 0,
    edtl: int | None = None,
    data_out: bytes = b"",
    nexus: Nexus | None = NEXUS,
    lun_field: bytes | None = None,
    setup: Callable[[FakeChannel], None] | None = None,
) -> tuple[Task, FakeChannel]:
    """Execute one command; EDTL defaults to 64 KiB for reads and ``len(data_out)`` for writes."""
    if edtl is None:
        edtl = len(data_out) if data_out else 65536
    task = make_task(cdb, lun=lun, expected_length=edtl, nexus=nexus)
    if lun_field is not None:
        task.lun = lun_field
    channel = FakeChannel(pool, task, data_out)
    if setup is not None:
        setup(channel)
    asyncio.run(target.execute(task, channel))
    assert pool.stats.blocks_in_use == 0, "scatter lists leaked"
    return task, channel
