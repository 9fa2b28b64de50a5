"""Handlers that worker processes load by ``--handler tests.unit.ring_handlers:CLASS``."""

from __future__ import annotations

import os
import time

from sgtarget.backstores.base import Backstore
from sgtarget.ring.handler import BackstoreHandler, HandlerConfig, open_file


class SlowFileHandler(BackstoreHandler):
    """The ``file`` handler, but reads of the LBAs in ``slow`` (comma-separated) first sleep
    ``delay`` seconds; with ``started=PATH`` a slow read creates PATH when it begins."""

    def __init__(self) -> None:
        super().__init__(self._open_file)
        self.slow: frozenset[int] = frozenset()
        self.delay = 0.0
        self.started = ""

    def _open_file(self, config: HandlerConfig) -> Backstore:
        params = dict(config.params)
        self.slow = frozenset(int(x) for x in params.pop("slow", "").split(",") if x)
        self.delay = float(params.pop("delay", "0.5"))
        self.started = params.pop("started", "")
        return open_file(HandlerConfig(config.size, config.block_size, params))

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        if offset // self.config.block_size in self.slow:
            if self.started:
                os.close(os.open(self.started, os.O_CREAT | os.O_WRONLY, 0o644))
            time.sleep(self.delay)
        return super().read(offset, bufs)


class SerialSlowFileHandler(SlowFileHandler):
    """``SlowFileHandler`` that is not thread-safe: the worker runs one command at a time."""

    concurrent = False
