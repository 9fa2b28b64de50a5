"""T10 protection information (PI, "DIF"): guard CRCs, tuples, checks and the wire layout.

Every logical block of a PI-formatted LUN carries an 8-byte tuple::

    0      2      4              8
    +------+------+--------------+
    | guard| app  |  reference   |   big-endian: CRC-16/T10-DIF of the block (poly 0x8BB7,
    +------+------+--------------+   init 0, not reflected), application tag, reference tag

This module knows nothing of SCSI commands: callers say which checks to make (the
RDPROTECT/WRPROTECT/VRPROTECT tables of SBC-4 decide that) and what the expected tags are.

- ``crc16_t10dif(data)``: one buffer's CRC.
- ``guards(data, block_size)``: the big-endian guard of every block, in one native call.
- ``generate(data, block_size, ref_tag=..., increment=..., app_tag=...)``: the tuples.
- ``verify(data, pi, block_size, ptype=..., guard=..., app=..., ref=..., ...)``: the first
  failing block as a ``PiError`` (``check`` is the ASCQ of ASC 10h), or ``None``. Checks within
  a block run guard, application tag, reference tag; the first that fails is reported. Escape
  values turn every check of a block off (SBC-4, RDPROTECT table footnote): application tag
  FFFFh for types 1 and 2; application tag FFFFh *and* reference tag FFFFFFFFh for type 3.
  ``app_mask`` selects the application tag bits compared (0: none, so ``app`` has no effect).
- ``split(wire, block_size)``: interleaved data+PI as received -> (data pieces, PI pieces),
  ``memoryview`` slices of the received buffers (no copy). A block or tuple that straddles two
  buffers becomes two pieces.
- ``interleave(data, pi, block_size)``: the scatter list for the wire, block then its tuple.

Additions to the contract (issue 6):

- ``data`` arguments take one buffer or a sequence of them (a scatter list); blocks may
  straddle its buffers. ``verify``'s ``pi`` takes a sequence too (``split``'s PI pieces).
- ``split_segments(wire, block_size)``: how many data pieces ``split`` would return, counted
  from the buffer lengths alone, so a caller can choose the bounce path before splitting.
- ``gather(pieces, limit, bounce=None)``: the pieces themselves when there are at most
  ``limit`` of them (zero copy), else a bounce copy into ``bounce`` (e.g. pool blocks'
  views) or a new buffer: a consumer's segment limit (IOV_MAX) never fails a command (seed 003).
  ``scatter(src, dst)`` copies back the other way (READ through a bounce).
- ``split_into(wire, block_size, data, pi)`` / ``interleave_into(data, pi, block_size,
  wire)``: the same layouts as ``split``/``interleave`` copied into caller buffers (a bounce
  from the pool) in one native call. A ``memoryview`` per block costs about 0.2 us, more than
  copying a 512-byte block: with 512-byte blocks a 1 MiB transfer is ~2,060 data pieces, over
  IOV_MAX, and copying is both the fallback and the cheaper path; with 4096-byte blocks views
  are cheap and stay within the limit (benchmarks/crc.py prints both costs).
- ``NATIVE``: whether the C extension ``_dif`` is in use.

Two implementations give the same results: the C extension ``_dif`` (built at install when a
compiler is there), one call per transfer, carry-less multiplication where the CPU has it; and
a fallback that calls fastcrc once per block (no PyPI library computes one CRC per block of a
buffer). ``python -m benchmarks.crc`` measures both and the libraries considered.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import fastcrc

from sgtarget.datapath.views import Buffer as Buffer  # noqa: PLC0414 - re-exported
from sgtarget.datapath.views import byte_view, copy_views, prefix

_native: ModuleType | None
try:
    from sgtarget.datapath import _dif as _native
except ImportError:  # built without a compiler: the fastcrc path below does the same work
    _native = None

#: Bytes of one PI tuple: guard (BE u16), application tag (BE u16), reference tag (BE u32).
TUPLE_SIZE = 8
ESCAPE_APP = 0xFFFF
ESCAPE_REF = 0xFFFFFFFF
NATIVE = _native is not None

Buffers = Buffer | Sequence[Buffer]

_TUPLE = struct.Struct(">HHI")
_crc = fastcrc.crc16.t10_dif


class Check(enum.IntEnum):
    """What failed; the value is the ASCQ that goes with ASC 10h."""

    GUARD = 1
    APP = 2
    REF = 3


@dataclass(frozen=True, slots=True)
class PiError:
    """The first failing block of a transfer (``index`` counts from its first block)."""

    index: int
    check: Check


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _as_list(data: Buffers) -> Sequence[Buffer]:
    if isinstance(data, bytes | bytearray | memoryview):
        return (data,)
    return data


def _count_blocks(data: Sequence[Buffer], block_size: int) -> int:
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    total = sum(_nbytes(b) for b in data)
    if total % block_size:
        raise ValueError(f"{total} bytes are not a multiple of the block size {block_size}")
    return total // block_size


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")


def crc16_t10dif(data: Buffer) -> int:
    """CRC-16/T10-DIF of ``data`` (check value of b"123456789": 0xD0DB)."""
    if _native is not None:
        result: int = _native.crc16(data)
        return result
    return _crc(data)


def _guard_list(data: Sequence[Buffer], block_size: int) -> list[int]:
    """Fallback: one fastcrc call per block; a block across two buffers continues its CRC."""
    out: list[int] = []
    crc = 0
    need = block_size  # bytes the current block still lacks
    for buf in data:
        view = byte_view(buf)
        n = len(view)
        off = 0
        if need < block_size:
            off = min(need, n)
            crc = _crc(view[:off], crc)
            need -= off
            if need:
                continue
            out.append(crc)
            need = block_size
        end = off + (n - off) // block_size * block_size
        out.extend([_crc(view[o : o + block_size]) for o in range(off, end, block_size)])
        if end < n:
            crc = _crc(view[end:])
            need = block_size - (n - end)
    return out


def guards(data: Buffers, block_size: int) -> bytes:
    """The guard of every block, 2 bytes each, big-endian, in block order."""
    pieces = _as_list(data)
    if _native is not None:  # it checks the sizes itself: no Python pass over the pieces
        return _native.guards(pieces, block_size)  # type: ignore[no-any-return]
    count = _count_blocks(pieces, block_size)
    return struct.pack(f">{count}H", *_guard_list(pieces, block_size))


def generate(
    data: Buffers, block_size: int, *, ref_tag: int, increment: bool = True, app_tag: int = 0
) -> bytearray:
    """The PI tuples of ``data``: computed guards, ``app_tag``, and ``ref_tag`` for the first
    block, +1 per block (mod 2**32) when ``increment`` (types 1 and 2), the same for all if not.
    """
    _check_range("reference tag", ref_tag, 32)
    _check_range("application tag", app_tag, 16)
    pieces = _as_list(data)
    if _native is not None:
        return _native.generate(pieces, block_size, ref_tag, increment, app_tag)  # type: ignore[no-any-return]
    out = bytearray(_count_blocks(pieces, block_size) * TUPLE_SIZE)
    step = 1 if increment else 0
    for i, g in enumerate(_guard_list(pieces, block_size)):
        _TUPLE.pack_into(out, i * TUPLE_SIZE, g, app_tag, (ref_tag + i * step) & ESCAPE_REF)
    return out


def verify(
    data: Buffers,
    pi: Buffers,
    block_size: int,
    *,
    ptype: int,
    guard: bool,
    app: bool,
    ref: bool,
    ref_tag: int,
    increment: bool = True,
    app_tag: int = 0,
    app_mask: int = 0,
) -> PiError | None:
    """Check ``data`` against its tuples ``pi``; the first failing block, or ``None``.

    ``ref_tag`` is the expected reference tag of block 0 (type 1: the low 32 bits of the LBA;
    type 2: the CDB's expected initial reference tag), +1 per block when ``increment``.
    ``app_tag``/``app_mask``: expected application tag and the bits of it to compare.
    """
    if ptype not in (1, 2, 3):
        raise ValueError(f"protection type {ptype} is not 1, 2 or 3")
    _check_range("reference tag", ref_tag, 32)
    _check_range("application tag", app_tag, 16)
    _check_range("application tag mask", app_mask, 16)
    pieces = _as_list(data)
    tuples = pi if isinstance(pi, bytes | bytearray | memoryview) else b"".join(pi)
    if _native is not None:
        found = _native.verify(
            pieces, tuples, block_size, ptype, guard, app, ref, increment, ref_tag, app_tag,
            app_mask,
        )  # fmt: skip
        return None if found is None else PiError(found[0], Check(found[1]))
    count = _count_blocks(pieces, block_size)
    if _nbytes(tuples) != count * TUPLE_SIZE:
        raise ValueError(f"{_nbytes(tuples)} PI bytes for {count} blocks")
    computed = _guard_list(pieces, block_size) if guard else None
    step = 1 if increment else 0
    for i, (got_guard, got_app, got_ref) in enumerate(_TUPLE.iter_unpack(tuples)):
        if got_app == ESCAPE_APP and (ptype != 3 or got_ref == ESCAPE_REF):
            continue
        if computed is not None and computed[i] != got_guard:
            return PiError(i, Check.GUARD)
        if app and (got_app ^ app_tag) & app_mask:
            return PiError(i, Check.APP)
        if ref and got_ref != (ref_tag + i * step) & ESCAPE_REF:
            return PiError(i, Check.REF)
    return None


def split(wire: Sequence[Buffer], block_size: int) -> tuple[list[memoryview], list[memoryview]]:
    """Interleaved wire data (block, its 8 PI bytes, next block ...) -> (data, PI) pieces.

    The pieces are slices of the wire buffers (no copy): keep those alive while they are used.
    """
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    views = [byte_view(buf) for buf in wire]
    unit = block_size + TUPLE_SIZE
    data: list[memoryview] = []
    pi: list[memoryview] = []
    pos = 0  # position within the current block+tuple unit, carried across buffers
    for view in views:
        n = len(view)
        off = 0
        if pos:  # finish the unit the previous buffer began
            if pos < block_size and n:
                off = min(block_size - pos, n)
                data.append(view[:off])
                pos += off
            if pos >= block_size and off < n:
                k = min(unit - pos, n - off)
                pi.append(view[off : off + k])
                off += k
                pos += k
            if pos < unit:
                continue
            pos = 0
        end = off + (n - off) // unit * unit
        data.extend([view[o : o + block_size] for o in range(off, end, unit)])
        pi.extend([view[o + block_size : o + unit] for o in range(off, end, unit)])
        if end < n:  # a unit begins here and goes on in the next buffer
            pos = n - end
            data.append(view[end : end + min(pos, block_size)])
            if pos > block_size:
                pi.append(view[end + block_size :])
    if pos:
        raise ValueError(f"wire data ends {pos} bytes into a {unit}-byte block and tuple")
    return data, pi


def split_segments(wire: Sequence[Buffer], block_size: int) -> int:
    """How many data pieces ``split(wire, block_size)`` returns, from the lengths alone."""
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    unit = block_size + TUPLE_SIZE
    count = 0
    start = 0  # wire offset of this buffer
    for buf in wire:
        end = start + _nbytes(buf)
        # Units whose data bytes [u * unit, u * unit + block_size) meet [start, end).
        first = max(0, (start - block_size) // unit + 1)
        last = (end - 1) // unit
        if end > start:
            count += max(0, last - first + 1)
        start = end
    return count


def interleave(data: Buffers, pi: Buffer, block_size: int) -> list[memoryview]:
    """The wire scatter list for ``data`` and its tuples: block, its tuple, next block ...

    Views of ``data`` and ``pi`` (no copy); a block across two data buffers is two pieces.
    """
    pieces = _as_list(data)
    count = _count_blocks(pieces, block_size)
    tuples = byte_view(pi)
    if len(tuples) != count * TUPLE_SIZE:
        raise ValueError(f"{len(tuples)} PI bytes for {count} blocks")
    views = [byte_view(buf) for buf in pieces]
    out: list[memoryview] = []
    block = 0
    pos = 0  # data bytes of the current block already placed
    for view in views:
        n = len(view)
        off = 0
        if pos and n:
            off = min(block_size - pos, n)
            out.append(view[:off])
            pos += off
            if pos < block_size:
                continue
            out.append(tuples[block * TUPLE_SIZE : (block + 1) * TUPLE_SIZE])
            block += 1
            pos = 0
        whole = (n - off) // block_size
        if whole:
            pair: list[memoryview] = [view] * (2 * whole)  # placeholders, all replaced below
            pair[0::2] = [
                view[o : o + block_size] for o in range(off, off + whole * block_size, block_size)
            ]
            t = block * TUPLE_SIZE
            pair[1::2] = [
                tuples[o : o + TUPLE_SIZE] for o in range(t, t + whole * TUPLE_SIZE, TUPLE_SIZE)
            ]
            out.extend(pair)
            block += whole
            off += whole * block_size
        if off < n:
            out.append(view[off:])
            pos = n - off
    return out


def split_into(wire: Sequence[Buffer], block_size: int, data: Buffers, pi: Buffers) -> int:
    """``split``'s bounce form: copy the blocks' bytes into ``data`` and the tuples into ``pi``.

    ``data`` and ``pi`` (e.g. pool blocks' views) are filled from their start and must hold
    them. Returns the number of blocks. Cheaper than ``split`` when its pieces would exceed the
    consumer's segment limit anyway: a view costs more than copying 512 bytes (benchmarks/crc.py).
    """
    dst_data, dst_pi = _as_list(data), _as_list(pi)
    count = _wire_blocks(wire, block_size)
    _check_room(dst_data, count * block_size, "data")
    _check_room(dst_pi, count * TUPLE_SIZE, "PI")
    if _native is not None:
        done: int = _native.copy_split(wire, block_size, dst_data, dst_pi)
        return done
    pieces, tuples = split(wire, block_size)
    scatter(pieces, [byte_view(d) for d in dst_data])
    scatter(tuples, [byte_view(p) for p in dst_pi])
    return count


def interleave_into(data: Buffers, pi: Buffers, block_size: int, wire: Buffers) -> int:
    """``interleave``'s bounce form: copy blocks and tuples, interleaved, into ``wire``.

    ``wire`` is filled from its start and must hold them. Returns the number of blocks.
    """
    src_data, src_pi, dst = _as_list(data), _as_list(pi), _as_list(wire)
    count = _count_blocks(src_data, block_size)
    _check_room(src_pi, count * TUPLE_SIZE, "PI")
    _check_room(dst, count * (block_size + TUPLE_SIZE), "wire")
    if _native is not None:
        done: int = _native.copy_interleave(src_data, block_size, src_pi, dst)
        return done
    tuples = b"".join(src_pi)[: count * TUPLE_SIZE]
    scatter(interleave(src_data, tuples, block_size), [byte_view(w) for w in dst])
    return count


def _wire_blocks(wire: Sequence[Buffer], block_size: int) -> int:
    if block_size <= 0:
        raise ValueError(f"block size {block_size} is not positive")
    unit = block_size + TUPLE_SIZE
    total = sum(_nbytes(b) for b in wire)
    if total % unit:
        raise ValueError(f"wire data ends {total % unit} bytes into a {unit}-byte block and tuple")
    return total // unit


def _check_room(views: Sequence[Buffer], need: int, what: str) -> None:
    room = sum(_nbytes(v) for v in views)
    if room < need:
        raise ValueError(f"{what} buffers of {room} bytes cannot hold {need}")


def gather(
    pieces: Sequence[Buffer], limit: int, bounce: Sequence[memoryview] | None = None
) -> list[memoryview]:
    """``pieces`` for a consumer that takes at most ``limit`` segments per call.

    At most ``limit`` pieces: the pieces themselves (no copy). More: their bytes copied, in
    order, into ``bounce`` (views of pool blocks, at most ``limit`` of them, holding at least the
    total; the result is trimmed to the total) or, without one, into a new buffer. Whether it
    bounces is known beforehand (``len(pieces) > limit``; before a split, ``split_segments``):
    the caller counts the copy and, for a READ, copies the consumer's bytes back with
    ``scatter(result, pieces)``.
    """
    if limit < 1:
        raise ValueError(f"segment limit {limit} is below 1")
    views = [byte_view(p) for p in pieces]
    if len(views) <= limit:
        return views
    total = sum(len(v) for v in views)
    if bounce is None:
        target = [memoryview(bytearray(total))]
    else:
        target = [byte_view(b) for b in bounce]
        if len(target) > limit:
            raise ValueError(f"{len(target)} bounce segments exceed the limit of {limit}")
        room = sum(len(t) for t in target)
        if room < total:
            raise ValueError(f"bounce of {room} bytes cannot hold {total}")
        target = prefix(target, total)
    scatter(views, target)
    return target


def scatter(src: Sequence[Buffer], dst: Sequence[memoryview]) -> int:
    """Copy the bytes of ``src`` into ``dst`` in order; returns the bytes copied."""
    return copy_views(src, dst)
