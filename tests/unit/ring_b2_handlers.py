"""Handlers the ring backstore and supervisor tests load into worker processes
(``--handler tests.unit.ring_b2_handlers:CLASS``)."""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

from sgtarget.backstores.base import Backstore
from sgtarget.ring.abi import MAILBOX_TAIL_OFF
from sgtarget.ring.handler import BackstoreHandler, Handler, HandlerConfig, open_file


def _arg(name: str) -> int:
    """An integer option of the worker's command line (``--ring-fd`` ...)."""
    argv = sys.argv
    return int(argv[argv.index(name) + 1])


def _touch(path: str) -> None:
    if path:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


class QuirkyFileHandler(BackstoreHandler):
    """The ``file`` handler with misbehaviours chosen by parameters:

    - ``write_delay=SECONDS``: every write first sleeps (a hung or slow handler);
    - ``slow_offset=BYTES``: with ``write_delay``, only writes at this offset sleep;
    - ``started=PATH``: created when a write begins (the test knows it is in flight);
    - ``short_read=1``: reads fill the whole buffer with 0xEE but report half of it;
    - ``check_zeroed=1``: a read whose buffer is not all zeros when it arrives fails;
    - ``hostile=1``: a write corrupts the ring's cmd_tail, rings done and hangs;
    - ``helper=PATH``: at open, forks a helper process (it inherits every mapping) that writes
      its pid to PATH and sleeps.
    """

    def __init__(self) -> None:
        super().__init__(self._open_file)
        self.write_delay = 0.0
        self.slow_offset: int | None = None
        self.started = ""
        self.short_read = False
        self.check_zeroed = False
        self.hostile = False

    def _open_file(self, config: HandlerConfig) -> Backstore:
        params = dict(config.params)
        self.write_delay = float(params.pop("write_delay", "0"))
        slow = params.pop("slow_offset", "")
        self.slow_offset = int(slow) if slow else None
        self.started = params.pop("started", "")
        self.short_read = params.pop("short_read", "0") == "1"
        self.check_zeroed = params.pop("check_zeroed", "0") == "1"
        self.hostile = params.pop("hostile", "0") == "1"
        helper = params.pop("helper", "")
        if helper and os.fork() == 0:
            try:
                with open(helper + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(helper + ".tmp", helper)
                time.sleep(60)
            finally:
                os._exit(0)
        return open_file(HandlerConfig(config.size, config.block_size, params))

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        if self.check_zeroed and any(any(b) for b in bufs):
            raise RuntimeError("read buffer handed over with stale bytes")
        if self.short_read:
            total = 0
            for b in bufs:
                b[:] = b"\xee" * len(b)
                total += len(b)
            return total // 2
        return super().read(offset, bufs)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        if self.slow_offset is not None and offset != self.slow_offset:
            super().write(offset, bufs)
            return
        _touch(self.started)
        if self.hostile:
            ring = mmap.mmap(_arg("--ring-fd"), _arg("--ring-size"))
            struct.pack_into("<I", ring, MAILBOX_TAIL_OFF, 3)  # not an entry boundary
            os.eventfd_write(_arg("--done-fd"), 1)
            time.sleep(60)
        if self.write_delay:
            time.sleep(self.write_delay)
        super().write(offset, bufs)


class FailingOpenHandler(Handler):
    """A handler that cannot open: its process exits at once, every time."""

    def open(self, config: HandlerConfig) -> None:
        raise RuntimeError("this handler never opens")

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        raise AssertionError("unreachable")

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        raise AssertionError("unreachable")
