"""Fixtures shared by the unit tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sgtarget.datapath import Pool


@pytest.fixture
def pool() -> Iterator[Pool]:
    """An 8 MiB pool of 64 KiB blocks; modules that need another size define their own."""
    p = Pool(size=8 * 1024 * 1024, block_size=64 * 1024)
    yield p
    gc.collect()  # tracebacks kept by logging capture may still reference arena views
    p.close()
