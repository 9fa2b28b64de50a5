"""``ram``: volatile storage in an anonymous private mapping (``--lun ram:size=SIZE``).

``bs=512|4096`` sets the logical block size, ``pi=1|2|3`` formats it with protection
information (kept in anonymous memory beside the data, backstores/pi.py).

The kernel hands out zero pages lazily, so an unwritten RAM disk costs no memory; a size larger
than the kernel is willing to commit fails at creation instead of at the first write. Reads and
writes copy between the mapping and the buffers: that copy is the storage itself.
"""

from __future__ import annotations

import mmap

from sgtarget.backstores.base import Backstore, BackstoreError, Buffers, check_params, register
from sgtarget.backstores.pi import MemoryProtection, parse_format
from sgtarget.datapath.views import byte_view
from sgtarget.units import format_size, parse_size

SECTOR = 512


def _zero(mem: memoryview, start: int, end: int) -> None:
    # Sub-page edges of a discard: at most two partial pages, so a small temporary is fine.
    if end > start:
        mem[start:end] = bytes(end - start)


class RamBackstore(Backstore):
    """``size`` bytes of anonymous memory, zero-filled on creation."""

    kind = "ram"
    blocking = False

    def __init__(self, size: int, *, block_size: int = SECTOR, pi: int = 0) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"ram: block size {block_size} is not 512 or 4096")
        if size <= 0 or size % block_size:
            raise ValueError(f"ram: size {size} is not a positive multiple of {block_size}")
        super().__init__(size)
        self.block_size = block_size
        if pi:
            self.protection = MemoryProtection(size // block_size, pi)
        try:
            # Private, not shared: nothing else should see it, and the kernel can refuse an
            # absurd size up front under its overcommit heuristic.
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as exc:
            raise BackstoreError(f"ram: cannot map {format_size(size)} of memory: {exc}") from exc
        self._mem: memoryview | None = memoryview(self._mmap)

    def _region(self, offset: int, bufs: Buffers) -> memoryview:
        mem = self._mem
        if mem is None:
            raise BackstoreError("ram: backstore is closed")
        total = sum(b.nbytes for b in bufs)
        if offset < 0 or offset + total > self.size:
            raise BackstoreError(f"ram: {offset}+{total} out of range ({self.size} bytes)")
        return mem[offset : offset + total]

    def readv(self, offset: int, bufs: Buffers) -> int:
        region = self._region(offset, bufs)
        pos = 0
        for buf in bufs:
            n = buf.nbytes
            byte_view(buf)[:] = region[pos : pos + n]
            pos += n
        return pos

    def writev(self, offset: int, bufs: Buffers) -> int:
        region = self._region(offset, bufs)
        pos = 0
        for buf in bufs:
            n = buf.nbytes
            region[pos : pos + n] = byte_view(buf)
            pos += n
        return pos

    def discard(self, offset: int, length: int) -> None:
        """Zero the range; whole pages are handed back to the kernel.

        MADV_DONTNEED on a private anonymous mapping frees the pages, and the next touch maps
        the shared zero page, so the range reads back as zeros (LBPRZ) and costs no memory.
        """
        mem = self._mem
        if mem is None:
            raise BackstoreError("ram: backstore is closed")
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise BackstoreError(f"ram: {offset}+{length} out of range ({self.size} bytes)")
        page = mmap.PAGESIZE
        first = -(-offset // page) * page
        last = end // page * page
        if first < last:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)
            _zero(mem, offset, first)
            _zero(mem, last, end)
        else:
            _zero(mem, offset, end)

    def close(self) -> None:
        if self.protection is not None:
            self.protection.close()
        mem, self._mem = self._mem, None
        if mem is not None:
            mem.release()
            self._mmap.close()


@register("ram")
def create_ram(params: dict[str, str], /, *, readonly: bool = False) -> RamBackstore:
    params = dict(params)
    block_size, pi = parse_format("ram", params, pi=True)
    check_params("ram", params, ("bs", "pi", "size"), required=("size",))
    return RamBackstore(parse_size(params["size"]), block_size=block_size, pi=pi)
