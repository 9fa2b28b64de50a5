"""Scatter lists over pool blocks and an iterator over them.

A ``ScatterList`` is a list of segments, each a run of adjacent pool blocks, and the number of
payload bytes it holds. Views are ``memoryview`` slices of the pool arena: handing them to
``os.preadv``/``os.pwritev``/``socket.sendmsg`` moves payload without a copy.

``SGIter`` is a position within a scatter list. Its copies advance it by exactly the bytes they
copied (a short copy reports how many), ``advance`` moves without copying and ``revert`` moves
back; the three compose exactly (seed 002: never advance before a copy that advances again).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sgtarget.datapath.pool import Pool
    from sgtarget.datapath.stats import DataPathStats

BytesLike = bytes | bytearray | memoryview


class ScatterList:
    """Payload buffer made of pool block runs. ``length`` bytes, block runs in ``segments``."""

    __slots__ = ("_pool", "length", "nblocks", "segments")

    def __init__(self, pool: Pool) -> None:
        self._pool: Pool | None = pool
        #: (first block, block count, bytes used) per run; only the last run may be partly used.
        self.segments: list[tuple[int, int, int]] = []
        self.length = 0
        self.nblocks = 0

    def append_blocks(self, first: int, count: int, nbytes: int) -> None:
        segs = self.segments
        if segs:
            pfirst, pcount, pbytes = segs[-1]
            if pfirst + pcount == first and pbytes == pcount * self._block_size():
                segs[-1] = (pfirst, pcount + count, pbytes + nbytes)
                self.length += nbytes
                self.nblocks += count
                return
        segs.append((first, count, nbytes))
        self.length += nbytes
        self.nblocks += count

    def extend(self, other: ScatterList) -> None:
        """Append ``other``'s blocks to this list; ``other`` is left empty (its blocks move)."""
        if other._pool is not self._pool:
            raise ValueError("scatter lists from different pools")
        for first, count, nbytes in other.segments:
            self.append_blocks(first, count, nbytes)
        other.segments = []
        other.length = other.nblocks = 0

    def truncate(self, length: int) -> None:
        """Shorten the payload to ``length`` bytes.

        The blocks stay owned until ``release``: a PDU that is still being received into the
        cut-off tail must never land in blocks someone else was given meanwhile.
        """
        if length > self.length or length < 0:
            raise ValueError(f"cannot truncate {self.length} bytes to {length}")
        keep = length
        segs: list[tuple[int, int, int]] = []
        for first, count, nbytes in self.segments:
            used = min(nbytes, keep)
            segs.append((first, count, used))
            keep -= used
        self.segments = segs
        self.length = length

    @property
    def stats(self) -> DataPathStats:
        """The counters of the pool the blocks belong to."""
        if self._pool is None:
            raise ValueError("scatter list already released")
        return self._pool.stats

    def _block_size(self) -> int:
        if self._pool is None:
            raise ValueError("scatter list already released")
        return self._pool.block_size

    def _views(self) -> Iterator[memoryview]:
        if self._pool is None:
            raise ValueError("scatter list already released")
        arena = self._pool.arena
        bs = self._pool.block_size
        for first, _count, nbytes in self.segments:
            if nbytes:
                start = first * bs
                yield arena[start : start + nbytes]

    def views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Views of ``length`` bytes starting ``offset`` bytes into the list."""
        if length is None:
            length = self.length - offset
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset}+{length} outside scatter list of {self.length}")
        pool = self._pool
        if len(self.segments) == 1 and length and pool is not None:  # one run: one slice
            start = self.segments[0][0] * pool.block_size + offset
            return [pool.arena[start : start + length]]
        out: list[memoryview] = []
        for view in self._views():
            if length == 0:
                break
            n = len(view)
            if offset >= n:
                offset -= n
                continue
            piece = view[offset : offset + length]
            out.append(piece)
            length -= len(piece)
            offset = 0
        return out

    def copy_in(
        self, data: BytesLike, offset: int = 0, *, reason: str = "copy_in", direction: str = "in"
    ) -> int:
        """Copy ``data`` into the list at ``offset``; returns bytes copied (short at the end).

        Counted in the pool's stats under ``reason``/``direction``.
        """
        src = memoryview(data).cast("B")
        done = 0
        for view in self.views(offset, min(len(src), self.length - offset)):
            n = len(view)
            view[:] = src[done : done + n]
            done += n
        if self._pool is not None:
            self._pool.stats.add_copy(reason, direction, done)
        return done

    def to_bytes(self, offset: int = 0, length: int | None = None) -> bytes:
        """A copy of the contents; for emulated commands and tests, never for payload."""
        return b"".join(self.views(offset, length))

    def fill(self, pattern: BytesLike, length: int, *, reason: str) -> None:
        """Repeat ``pattern`` over the first ``length`` bytes, copied 64 KiB at a time.

        Counted as copies under ``reason``, as ``copy_in`` counts them.
        """
        chunk = bytes(pattern) * max(1, 65536 // len(pattern))
        for off in range(0, length, len(chunk)):
            self.copy_in(memoryview(chunk)[: length - off], off, reason=reason)

    def zero(self, offset: int = 0, length: int | None = None) -> None:
        for view in self.views(offset, length):
            view[:] = bytes(len(view))

    def release(self) -> None:
        """Give the blocks back to the pool. Idempotent."""
        pool = self._pool
        if pool is None:
            return
        self._pool = None
        for first, count, _nbytes in self.segments:
            pool.free_run(first, count)

    @property
    def released(self) -> bool:
        return self._pool is None

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"ScatterList(length={self.length}, segments={self.segments!r})"


class SGIter:
    """A byte position within a ``ScatterList``."""

    __slots__ = ("pos", "sg")

    def __init__(self, sg: ScatterList, pos: int = 0) -> None:
        self.sg = sg
        self.pos = pos

    @property
    def remaining(self) -> int:
        return self.sg.length - self.pos

    def advance(self, n: int) -> int:
        n = max(0, min(n, self.remaining))
        self.pos += n
        return n

    def revert(self, n: int) -> None:
        if n < 0 or n > self.pos:
            raise ValueError(f"cannot revert {n} bytes from position {self.pos}")
        self.pos -= n

    def copy_in(self, data: BytesLike) -> int:
        n = self.sg.copy_in(data, self.pos)
        self.pos += n
        return n

    def copy_out(self, dst: memoryview) -> int:
        dst = dst.cast("B") if dst.format != "B" else dst
        done = 0
        for view in self.sg.views(self.pos, min(len(dst), self.remaining)):
            n = len(view)
            dst[done : done + n] = view
            done += n
        self.pos += done
        return done
