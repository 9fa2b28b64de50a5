"""``null``: discards writes, reads zeros (``--lun null:size=SIZE[,bs=512|4096]``); for
benchmarks and tests. It takes no ``pi=``: PI it forgot could never be read back.

Reads must overwrite the buffers: pool blocks are recycled, and leaving their old bytes in place
would hand one initiator data from another's command.
"""

from __future__ import annotations

from sgtarget.backstores.base import Backstore, BackstoreError, Buffers, check_params, register
from sgtarget.backstores.pi import parse_format
from sgtarget.datapath.views import byte_view
from sgtarget.units import parse_size

SECTOR = 512
# Zeroing from a shared constant avoids allocating a zero buffer as large as each read.
_ZEROS = memoryview(bytes(64 * 1024))


class NullBackstore(Backstore):
    """``size`` bytes that read as zeros and forget what is written."""

    kind = "null"
    blocking = False

    def __init__(self, size: int, *, block_size: int = SECTOR) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"null: block size {block_size} is not 512 or 4096")
        if size <= 0 or size % block_size:
            raise ValueError(f"null: size {size} is not a positive multiple of {block_size}")
        super().__init__(size)
        self.block_size = block_size

    def _extent(self, offset: int, bufs: Buffers) -> int:
        total = bufs[0].nbytes if len(bufs) == 1 else sum(b.nbytes for b in bufs)
        if offset < 0 or offset + total > self.size:
            raise BackstoreError(f"null: {offset}+{total} out of range ({self.size} bytes)")
        return total

    def readv(self, offset: int, bufs: Buffers) -> int:
        total = self._extent(offset, bufs)
        chunk = len(_ZEROS)
        for buf in bufs:
            view = byte_view(buf)
            n = len(view)
            if n <= chunk:  # pool views are at most a block: one slice assignment
                view[:] = _ZEROS[:n]
                continue
            for pos in range(0, n, chunk):
                end = min(pos + chunk, n)
                view[pos:end] = _ZEROS[: end - pos]
        return total

    def writev(self, offset: int, bufs: Buffers) -> int:
        return self._extent(offset, bufs)

    def discard(self, offset: int, length: int) -> None:
        """Nothing is stored, so nothing to free (reads are zeros already)."""


@register("null")
def create_null(params: dict[str, str], /, *, readonly: bool = False) -> NullBackstore:
    params = dict(params)
    # No pi=: PI written to a medium that forgets the data could never be read back.
    block_size, _ = parse_format("null", params, pi=False)
    check_params("null", params, ("bs", "size"), required=("size",))
    return NullBackstore(parse_size(params["size"]), block_size=block_size)
