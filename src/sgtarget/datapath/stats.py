"""Data path accounting, cheap enough to leave on: plain integer counters, no locks.

Every byte of payload that user space copies is counted under a reason and a direction, so a
benchmark (or the shutdown log) can say exactly how far from zero copy a workload ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Directions: "in" = towards the backstore (Data-Out), "out" = towards the initiator (Data-In).
IN = "in"
OUT = "out"


@dataclass(slots=True)
class DataPathStats:
    allocations: int = 0
    failed_allocations: int = 0
    blocks_in_use: int = 0
    peak_blocks_in_use: int = 0
    #: Blocks given back to the kernel by ``Pool.reclaim``.
    reclaimed_blocks: int = 0
    #: (reason, direction) -> bytes copied in user space.
    copies: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Backstore I/Os (one per window of a command) whose payload moved without a user-space
    #: copy, and those that went through a bounce buffer.
    zero_copy_ios: int = 0
    bounced_ios: int = 0
    #: Allocations that had to wait for blocks (R2T pacing, read windows).
    alloc_waits: int = 0
    #: Times a session advertised a smaller command window because the pool was short.
    window_shrinks: int = 0
    task_set_full: int = 0
    #: Unsolicited data that found even the reserve empty (dropped; command got TASK SET FULL).
    unsolicited_dropped: int = 0

    def add_copy(self, reason: str, direction: str, nbytes: int) -> None:
        key = (reason, direction)
        self.copies[key] = self.copies.get(key, 0) + nbytes

    @property
    def copied_bytes(self) -> int:
        return sum(self.copies.values())

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly copy."""
        out: dict[str, object] = {
            name: getattr(self, name)
            for name in (
                "allocations",
                "failed_allocations",
                "blocks_in_use",
                "peak_blocks_in_use",
                "reclaimed_blocks",
                "zero_copy_ios",
                "bounced_ios",
                "alloc_waits",
                "window_shrinks",
                "task_set_full",
                "unsolicited_dropped",
            )
        }
        out["copied_bytes"] = self.copied_bytes
        out["copies"] = {f"{r}/{d}": n for (r, d), n in sorted(self.copies.items())}
        return out
