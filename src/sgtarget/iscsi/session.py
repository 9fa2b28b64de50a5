"""Sessions, the targets a portal offers, and per-command iSCSI state.

A session is identified by the initiator name + ISID (the I_T nexus) and numbered by a TSIH.
It owns the command sequence window (ExpCmdSN/MaxCmdSN). With MaxConnections=1 a session has
exactly one connection, but the window and the task table live here so that more connections
per session need no change to the command path.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sgtarget.datapath import Pool, ScatterList
from sgtarget.iscsi.keys import OperationalParams, SessionType
from sgtarget.scsi.task import Nexus, Task

#: Commands one session may have in flight; advertised through MaxCmdSN.
DEFAULT_QUEUE_DEPTH = 128


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """What a portal group knows about one target: its name and where it listens."""

    name: str
    alias: str | None = None
    #: "host:port" of each portal serving the target (IPv6 hosts bracketed).
    portals: tuple[str, ...] = ()
    tpgt: int = 1


class TargetDirectory:
    """The targets a portal group serves, by IQN."""

    def __init__(self, targets: Sequence[TargetInfo] = ()) -> None:
        self._targets = {t.name: t for t in targets}

    def add(self, target: TargetInfo) -> None:
        self._targets[target.name] = target

    def lookup(self, name: str) -> TargetInfo | None:
        return self._targets.get(name)

    def __iter__(self) -> Iterator[TargetInfo]:
        return iter(self._targets.values())


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982, 32 bits): a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


class WriteState:
    """Data-Out bookkeeping, allocated only for commands that carry Data-Out."""

    __slots__ = (
        "no_buffer",
        "r2t_end",
        "r2t_next",
        "r2ts",
        "r2tsn",
        "rx_base",
        "rx_have",
        "rx_len",
        "rx_sg",
        "rx_waiting",
        "unsol_datasn",
        "unsol_expected",
        "unsol_received",
        "want",
    )

    def __init__(self) -> None:
        #: The LU's last window request: the size the next window is prefetched at.
        self.want = 0
        # One receive window [rx_base, rx_base + rx_len) at a time.
        self.rx_sg: ScatterList | None = None
        self.rx_base = 0
        self.rx_len = 0
        self.rx_have = 0
        self.rx_waiting = False
        #: The unsolicited data found no room and was dropped (the command gets TASK SET FULL).
        self.no_buffer = False
        self.unsol_expected = 0
        self.unsol_received = 0
        self.unsol_datasn = 0
        #: Outstanding R2Ts: TTT -> [buffer offset, length, received, next DataSN].
        self.r2ts: dict[int, list[int]] = {}
        self.r2t_next = 0
        self.r2t_end = 0
        self.r2tsn = 0


class Command(Task):
    """One command slot: the SCSI ``Task`` plus its iSCSI state, in one slotted object.

    Sessions preallocate one per slot of their command window and reuse them (seed 000:
    small per-command descriptors, allocated up front). Everything a command only sometimes
    needs hangs off it lazily: ``wr`` exists only for commands with Data-Out, the held Data-In
    only while a READ's last PDU waits for its status, ``sense`` only on errors.
    """

    __slots__ = (
        "cmdsn",
        "data_error",
        "datasn",
        "held_offset",
        "held_sg",
        "held_views",
        "immediate",
        "read_edtl",
        "wr",
        "write_edtl",
    )

    def __init__(self) -> None:
        super().__init__()
        self.clear()

    def clear(self) -> None:
        """Back to an idle slot (``Task.reset`` plus the iSCSI fields)."""
        self.reset()
        self.cmdsn = 0
        self.immediate = False
        self.read_edtl = 0
        self.write_edtl = 0
        self.wr: WriteState | None = None
        self.datasn = 0
        #: The final Data-In PDU, held back so the status can ride on it.
        self.held_sg: ScatterList | None = None
        self.held_views: list[memoryview] | None = None
        self.held_offset = 0
        #: Sense data when the data phase failed (bad DataSN, offset, length): the command
        #: ends with CHECK CONDITION while the connection carries on.
        self.data_error: bytes | None = None

    @property
    def itt(self) -> int:
        return self.tag

    @property
    def task(self) -> Task:
        """The SCSI view of this command (the same object)."""
        return self


@dataclass(eq=False)
class Session:
    tsih: int
    initiator_name: str
    isid: bytes
    session_type: SessionType
    target_name: str | None
    params: OperationalParams
    nexus: Nexus
    exp_cmdsn: int = 0
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    #: Non-immediate commands received and not yet answered (they hold window slots).
    in_flight: int = 0
    commands: dict[int, Command] = field(default_factory=dict)
    #: Idle command slots, preallocated for the whole window (see ``Command``).
    free_slots: list[Command] = field(default_factory=list)

    #: The pool whose pressure closes the window (None: never).
    pool: Pool | None = None
    #: Highest MaxCmdSN advertised so far: the window may stop growing, never move back.
    advertised: int | None = None
    #: True while the window is held small because the pool is short.
    shrunk: bool = False

    @property
    def max_cmdsn(self) -> int:
        """The MaxCmdSN to advertise now.

        The window is the queue depth less the commands in flight. While the pool is under
        pressure it is cut to an eighth of the queue depth, so initiators send fewer new
        commands before TASK SET FULL is ever needed (backpressure step b). A session with
        nothing in flight always keeps one slot, so it can never be shut out for good.
        """
        depth = self.queue_depth
        pressure = self.pool is not None and self.pool.under_pressure()
        if pressure:
            depth = max(1, depth // 8)
            if not self.shrunk and self.pool is not None:
                self.pool.stats.window_shrinks += 1
        self.shrunk = pressure
        free = depth - self.in_flight
        if free <= 0:
            free = 0 if self.in_flight else 1
        new = (self.exp_cmdsn + free - 1) & 0xFFFFFFFF
        adv = self.advertised
        # sn_lt(new, adv), inline: asked for every PDU the target sends.
        if adv is not None and new != adv and ((adv - new) & 0xFFFFFFFF) < 0x80000000:
            return adv
        self.advertised = new
        return new

    def __post_init__(self) -> None:
        self.free_slots = [Command() for _ in range(self.queue_depth)]

    def take_slot(self) -> Command:
        """An idle command slot; immediate commands beyond the window get a fresh one."""
        return self.free_slots.pop() if self.free_slots else Command()

    def return_slot(self, cmd: Command) -> None:
        if len(self.free_slots) < self.queue_depth:
            cmd.clear()
            self.free_slots.append(cmd)

    def has_room(self) -> bool:
        """``in_window(exp_cmdsn)`` without recomputing MaxCmdSN while the advertised
        window still covers ExpCmdSN (every in-order command asks)."""
        adv = self.advertised
        if adv is not None and ((adv - self.exp_cmdsn) & 0xFFFFFFFF) < 0x80000000:
            return True
        return self.in_window(self.exp_cmdsn)

    def in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)


class SessionTable:
    """All sessions of a target process: TSIH allocation and reinstatement by I_T nexus."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._tsih = itertools.count(1)

    def new_tsih(self) -> int:
        while True:
            tsih = next(self._tsih) & 0xFFFF
            if tsih and tsih not in self._by_tsih:
                return tsih

    def add(self, session: Session) -> None:
        self._by_tsih[session.tsih] = session

    def remove(self, session: Session) -> None:
        self._by_tsih.pop(session.tsih, None)

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def find(self, initiator_name: str, isid: bytes, target_name: str | None) -> Session | None:
        for s in self._by_tsih.values():
            if (s.initiator_name, s.isid, s.target_name) == (initiator_name, isid, target_name):
                return s
        return None

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))
