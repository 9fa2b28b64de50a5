"""Zero-copy sending: ``sendmsg`` over header bytes and pool views, never a join.

asyncio's transports copy whatever the kernel does not take at once into their own buffer
(and on Python 3.11 ``writelines`` joins the buffers first). This writer keeps the unsent tail
as views of the same pool blocks instead, holds those blocks until the kernel has taken their
last byte, and finishes the send when the socket becomes writable. It works on a duplicate of
the connection's file descriptor, so the transport keeps reading undisturbed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence

from sgtarget.datapath import BytesLike, ScatterList

log = logging.getLogger(__name__)

#: Linux's IOV_MAX: the most buffers one sendmsg takes.
IOV_MAX = 1024
#: Queued bytes above which producers are paused (the blocks stay in the pool budget anyway).
HIGH_WATER = 4 * 1024 * 1024


class ZeroCopyWriter:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        *,
        on_error: Callable[[OSError], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._on_error = on_error
        self._pause = pause
        self._resume = resume
        self._queue: deque[BytesLike] = deque()
        self._queued = 0
        #: Bytes accepted by ``send`` and bytes the kernel took, since the start.
        self._accepted = 0
        self._sent = 0
        #: (accepted mark, lists): release the lists once ``_sent`` reaches the mark.
        self._release: deque[tuple[int, list[ScatterList]]] = deque()
        self._writing = False
        self._paused = False
        self._on_drained: Callable[[], None] | None = None
        self.closed = False

    @property
    def sock(self) -> socket.socket:
        """The connection's socket (a duplicate of the transport's descriptor)."""
        return self._sock

    @property
    def pending(self) -> int:
        return self._queued

    def send(self, buffers: Sequence[BytesLike], release: list[ScatterList]) -> None:
        """Send ``buffers`` in order; release ``release`` once all of them are on the wire."""
        bufs = list(buffers)
        if self.closed:
            for sg in release:
                sg.release()
            return
        nbytes = sum(len(b) for b in bufs)
        self._accepted += nbytes
        if not self._queue:
            sent = self._sendmsg(bufs)
            if sent < 0:
                for sg in release:
                    sg.release()
                return
            self._sent += sent
            bufs = _consume(bufs, sent)
        self._queue.extend(bufs)
        self._queued += sum(len(b) for b in bufs)
        if release:
            self._release.append((self._accepted, release))
        self._release_sent()
        if self._queue and not self._writing:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            self._writing = True
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = True
            self._pause()

    def _sendmsg(self, bufs: list[BytesLike]) -> int:
        """Bytes the kernel took (0 when full), -1 after an error (reported)."""
        total = 0
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                n = self._sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(exc)
                return -1
            total += n
            bufs = _consume(bufs, n)
            if n < sum(len(b) for b in chunk):
                break
        return total

    def _on_writable(self) -> None:
        bufs = list(self._queue)
        sent = self._sendmsg(bufs)
        if sent < 0:
            return
        self._sent += sent
        self._queued -= sent
        rest = _consume(bufs, sent)
        self._queue = deque(rest)
        self._release_sent()
        if not self._queue:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False
            if self._paused:
                self._paused = False
                self._resume()
            if self._on_drained is not None:
                callback, self._on_drained = self._on_drained, None
                callback()

    def _release_sent(self) -> None:
        while self._release and self._release[0][0] <= self._sent:
            for sg in self._release.popleft()[1]:
                sg.release()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything queued is sent (at once if nothing is)."""
        if self._queue:
            self._on_drained = callback
        else:
            callback()

    def _fail(self, exc: OSError) -> None:
        log.info("send failed: %s", exc)
        self.close()
        self._on_error(exc)

    def close(self) -> None:
        """Drop what is queued and give its blocks back."""
        if self.closed:
            return
        self.closed = True
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False
        self._queue.clear()
        self._queued = 0
        while self._release:
            for sg in self._release.popleft()[1]:
                sg.release()
        if self._paused:
            self._paused = False
            self._resume()
        self._sock.close()


def _consume(bufs: list[BytesLike], sent: int) -> list[BytesLike]:
    """Drop ``sent`` bytes from the front of ``bufs`` (slicing, never copying)."""
    i = 0
    while i < len(bufs) and sent >= len(bufs[i]):
        sent -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if sent and rest:
        rest[0] = memoryview(rest[0])[sent:]
    return rest
