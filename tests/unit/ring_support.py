"""Pieces the ring backstore and supervisor tests share: a 4 MiB image and a started LUN."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sgtarget.datapath import Pool
from sgtarget.ring.backstore import RingBackstore, RingOptions

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh loop, bounded: a hung handler fails the test, not the suite."""
    return asyncio.run(asyncio.wait_for(coro, 90))


def make_image(tmp_path: Path) -> Path:
    path = tmp_path / "lun.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


@contextlib.asynccontextmanager
async def ring_lun(
    pool: Pool,
    image: Path,
    mode: str = "copy",
    *,
    handler: str = "file",
    handlers: int = 1,
    timeout: float | None = None,
    **params: str,
) -> AsyncIterator[RingBackstore]:
    """A started ``RingBackstore`` serving ``image``; closed (handlers stopped) afterwards."""
    options = RingOptions(mode=mode, handlers=handlers, timeout=timeout)
    bs = RingBackstore(handler, {"path": str(image), **params}, SIZE, options)
    await bs.start(pool)
    try:
        yield bs
    finally:
        await bs.aclose()
