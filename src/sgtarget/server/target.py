"""The running target: portals, the pool, the SCSI target and its LUNs, lifecycle."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sgtarget.backstores.base import Backstore
from sgtarget.datapath import DEFAULT_POOL_SIZE, Pool
from sgtarget.iscsi import pdu
from sgtarget.iscsi.connection import TmfRequest
from sgtarget.iscsi.keys import TargetLimits
from sgtarget.iscsi.session import (
    DEFAULT_QUEUE_DEPTH,
    Command,
    Session,
    SessionTable,
    TargetDirectory,
    TargetInfo,
)
from sgtarget.scsi.lu import LogicalUnit
from sgtarget.scsi.lun import decode_lun
from sgtarget.scsi.target import ScsiTarget
from sgtarget.server.memory import MemoryGate
from sgtarget.server.portal import IscsiProtocol

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_IQN = "iqn.2026-11.org.sgtarget:target0"
DEFAULT_PORT = 3260
#: Seconds without a pool allocation after which idle pool pages are given back.
RECLAIM_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class LunOptions:
    """LU settings that are not the backstore's: the ``--lun`` keys (``cli.specs.LUN_KEYS``).

    Each field is a keyword of ``LogicalUnit`` of the same name.
    """

    thin: bool = False
    readonly: bool = False
    removable: bool = False
    #: With ``thin``: the UNMAP command (off: WRITE SAME with UNMAP only).
    unmap: bool = True
    #: ``None``: the LU's default (``scsi.lu.PHYSICAL_BLOCK_SIZE``).
    physical_block_size: int | None = None


@dataclass
class TargetConfig:
    iqn: str = DEFAULT_IQN
    portals: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", DEFAULT_PORT)])
    backstores: list[Backstore] = field(default_factory=list)
    #: Per LUN, in the order of ``backstores``; missing entries are the defaults.
    lun_options: list[LunOptions] = field(default_factory=list)
    pool_size: int = DEFAULT_POOL_SIZE
    io_threads: int = 8
    nop_interval: float | None = 30.0
    #: Commands each session may have in flight (advertised through MaxCmdSN).
    queue_depth: int = DEFAULT_QUEUE_DEPTH


def format_portal(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TargetServer:
    def __init__(self, config: TargetConfig) -> None:
        self.config = config
        self.pool = Pool(config.pool_size)
        # A sixteenth of the pool (at least one block) is kept for unsolicited data, which
        # arrives whether or not there is room and cannot wait.
        self.pool.reserve_blocks = max(1, self.pool.nblocks // 16)
        self.memory = MemoryGate(self.pool)
        self.limits = TargetLimits()
        self.sessions = SessionTable()
        self.nop_interval = config.nop_interval
        self.directory = TargetDirectory()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.io_threads, thread_name_prefix="sgtarget-io"
        )
        options = [*config.lun_options, *[LunOptions()] * len(config.backstores)]
        luns = [
            LogicalUnit(
                bs,
                runner=self._run_blocking,
                identity=f"{config.iqn}/lun{i}",
                **dataclasses.asdict(options[i]),
            )
            for i, bs in enumerate(config.backstores)
        ]
        self.scsi = ScsiTarget(config.iqn, luns)
        for lun, lu in self.scsi.luns.items():
            lu.reservations.abort_hook = functools.partial(self._abort_preempted, lun)
        self.connections: set[IscsiProtocol] = set()
        self.background: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._reclaimer: asyncio.Task[None] | None = None
        self.bound: list[tuple[str, int]] = []

    async def _run_blocking(self, fn: Callable[..., T], /, *args: Any) -> T:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread is still reading or writing pool blocks: the caller may release
            # them only after it is done, or another command could be handed live memory.
            with contextlib.suppress(BaseException):
                await fut
            raise

    def scsi_target_for(self, session: Session) -> ScsiTarget | None:
        return self.scsi if session.target_name == self.scsi.name else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for bs in self.config.backstores:  # handler processes, before anyone can log in
            await bs.start(self.pool)
        for host, port in self.config.portals:
            server = await loop.create_server(
                lambda: IscsiProtocol(self), host, port, reuse_address=True
            )
            self._servers.append(server)
            for sock in server.sockets:
                addr = sock.getsockname()
                self.bound.append((addr[0], addr[1]))
        portals = tuple(format_portal(h, p) for h, p in self.bound)
        self.directory.add(TargetInfo(self.config.iqn, portals=portals))
        self._reclaimer = loop.create_task(self._reclaim_when_idle())

    async def _reclaim_when_idle(self) -> None:
        """Give pool pages back to the kernel after a quiet interval (TCMU's unmap worker)."""
        stats = self.pool.stats
        last = stats.allocations
        while True:
            await asyncio.sleep(RECLAIM_INTERVAL)
            if stats.allocations == last:
                freed = self.pool.reclaim()
                if freed:
                    log.debug("reclaimed %d idle pool blocks", freed)
            last = stats.allocations

    async def task_management(self, proto: IscsiProtocol, req: TmfRequest) -> int:
        fn = req.function
        scsi = self.scsi
        cmds_by_proto: dict[IscsiProtocol, list[Command]] = {proto: list(req.commands)}
        if fn in (
            pdu.TmfFunction.LOGICAL_UNIT_RESET,
            pdu.TmfFunction.ABORT_TASK_SET,
            pdu.TmfFunction.CLEAR_TASK_SET,
        ):
            lun = decode_lun(req.lun)
            if lun is None or lun not in scsi.luns:
                return pdu.TmfResponse.LUN_DOES_NOT_EXIST
        if fn in (pdu.TmfFunction.LOGICAL_UNIT_RESET, pdu.TmfFunction.CLEAR_TASK_SET):
            for other in self.connections:
                if other is not proto and other.session is not None:
                    cmds = [c for c in list(other.session.commands.values()) if c.lun == req.lun]
                    for c in cmds:
                        other.conn.abort(c)
                    cmds_by_proto[other] = cmds
        elif fn in (pdu.TmfFunction.TARGET_WARM_RESET, pdu.TmfFunction.TARGET_COLD_RESET):
            for other in self.connections:
                if other is not proto and other.session is not None:
                    cmds = list(other.session.commands.values())
                    for c in cmds:
                        other.conn.abort(c)
                    cmds_by_proto[other] = cmds
        await asyncio.gather(*(p.wait_commands(c) for p, c in cmds_by_proto.items()))
        for p in cmds_by_proto:
            p.flush()
        if fn == pdu.TmfFunction.LOGICAL_UNIT_RESET:
            scsi.lun_reset(decode_lun(req.lun) or 0)
        elif fn == pdu.TmfFunction.TARGET_WARM_RESET:
            scsi.target_reset(cold=False)
        elif fn == pdu.TmfFunction.TARGET_COLD_RESET:
            scsi.target_reset(cold=True)
        return pdu.TmfResponse.COMPLETE

    def _abort_preempted(self, lun: int, keys: set[str]) -> None:
        """PREEMPT AND ABORT: abort the preempted nexuses' commands on ``lun`` (SPC-4 5.13.11.2.6).

        Like ABORT TASK SET on their behalf: no status for them, and their data waits end now,
        so a WRITE that passed the reservation check before the preemption cannot land after.
        """
        waits: dict[IscsiProtocol, list[Command]] = {}
        for proto in self.connections:
            session = proto.session
            if session is None or session.nexus.key not in keys:
                continue
            cmds = [c for c in list(session.commands.values()) if decode_lun(c.lun) == lun]
            waits[proto] = [c for c in cmds if proto.conn.abort(c)]
        if any(waits.values()):
            task = asyncio.get_running_loop().create_task(self._finish_aborts(waits))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _finish_aborts(self, waits: dict[IscsiProtocol, list[Command]]) -> None:
        await asyncio.gather(*(p.wait_commands(c) for p, c in waits.items()))
        for p in waits:
            p.flush()

    def close_session(self, session: Session) -> None:
        for proto in list(self.connections):
            if proto.session is session:
                proto.abort()

    def close_all(self) -> None:
        for proto in list(self.connections):
            proto.close()

    async def shutdown(self, grace: float = 3.0) -> None:
        """Stop accepting, let running commands finish (briefly), close, flush, release."""
        if self._reclaimer is not None:
            self._reclaimer.cancel()
        for server in self._servers:
            server.close()
        running = [t for p in self.connections for t in p.running.values()]
        if running:
            await asyncio.wait(running, timeout=grace)
        for proto in list(self.connections):
            proto.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=grace)
        if self.background:
            await asyncio.wait(list(self.background), timeout=grace)
        # A sanitize outlives its command but not the backstore it writes to.
        for lu in self.scsi.luns.values():
            await lu.sanitizer.stop()
        loop = asyncio.get_running_loop()
        for bs in self.config.backstores:
            try:
                await loop.run_in_executor(self.executor, bs.close)
            except Exception:
                log.exception("closing backstore %s failed", bs.describe())
        self.executor.shutdown(wait=True)


def describe_luns(backstores: Sequence[Backstore]) -> list[str]:
    return [f"LUN {i}: {bs.describe()}" for i, bs in enumerate(backstores)]
