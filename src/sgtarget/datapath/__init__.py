"""Payload memory: the budgeted pool, scatter lists and iterators. Knows nothing of SCSI."""

from sgtarget.datapath.pool import DEFAULT_BLOCK_SIZE, DEFAULT_POOL_SIZE, Pool, PoolExhausted
from sgtarget.datapath.sglist import BytesLike, ScatterList, SGIter
from sgtarget.datapath.stats import DataPathStats

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_POOL_SIZE",
    "BytesLike",
    "DataPathStats",
    "Pool",
    "PoolExhausted",
    "SGIter",
    "ScatterList",
]

# Mapping exports are appended (not merged above) so parallel edits to this file don't collide.
from sgtarget.datapath.mapping import (
    IdentityMapping,
    MapDirection,
    Mapped,
    Mapping,
    MappingStats,
    WindowFull,
    WindowMapping,
)

__all__ += [
    "IdentityMapping",
    "MapDirection",
    "Mapped",
    "Mapping",
    "MappingStats",
    "WindowFull",
    "WindowMapping",
]
