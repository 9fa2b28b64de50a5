"""The handler API: a backstore written in Python, served from its own process through a ring.

Like tcmu-runner's handler API. A handler subclasses ``Handler`` and implements block
operations on byte offsets and lists of buffers (views of the shared map):

- ``open(config)`` / ``close()``; ``config`` is a ``HandlerConfig`` (size, block size, the
  ``--param KEY=VALUE`` pairs);
- ``read(offset, bufs)`` (returns the bytes produced, ``None`` for all of them),
  ``write(offset, bufs)``, ``flush()``;
- optional, with correct defaults: ``unmap`` (writes zeros), ``prefetch`` (nothing),
  ``mapped_extents`` (everything mapped), ``write_same`` (the block repeated through
  ``write``), ``compare_and_write`` (``read``, compare, ``write``).

Protection information (TCMU's ``iov_dif_cnt``): a handler that stores T10 PI tuples itself sets
``protection = True`` (class or instance, by the end of ``open``) and implements
``read_pi(offset, bufs, pi_bufs)`` / ``write_pi(offset, bufs, pi_bufs)`` (``pi_bufs``: the 8-byte
tuples of the blocks in ``bufs``, as on the wire; the target has checked what it writes and
checks what it reads) and ``discard_pi(offset, length)`` (the range's tuples become the escape
value, all 0xFF, as never written). A READ(16)/WRITE(16) with dif iovecs goes to ``read_pi``/
``write_pi``; WRITE SAME(16) UNMAP calls ``unmap`` then ``discard_pi``; FORMAT UNIT (no
parameter list; the target keeps the format type itself) calls ``discard_pi`` over the whole
medium. ``config.protection`` is the type the LUN was created with (0: the target keeps PI or
there is none). A worker refuses dif iovecs for a handler that is not PI-aware (INVALID FIELD IN
CDB), and a handler asked to store PI (``--pi``, the LUN's ``handler_pi=1``) that is not
PI-aware does not start. A PI-aware handler that overrides ``handle_cmd`` takes the tuples
as a fourth argument, ``pi_bufs`` (passed only when the command has dif iovecs).

Or it overrides ``handle_cmd(cdb, bufs, bidi_bufs)`` to see raw CDBs; the default decodes the
CDB and calls the block operations. Commands decoded (SBC-4), the ones the target sends through
a ring plus those a kernel's TCMU ring would pass for plain block I/O:

==========================  ====================================================================
READ(10/16)                 ``read``; a short count becomes the completion's ``read_len``
WRITE(10/16)                ``write`` (and ``flush`` when FUA is set)
SYNCHRONIZE CACHE(10/16)    ``flush`` (always all of the cache)
PRE-FETCH(16)               ``prefetch`` (PREFETCH LENGTH 0: to the end of the medium)
WRITE SAME(16)              UNMAP + NDOB: ``unmap``; UNMAP with a block of zeros: ``unmap``;
                            otherwise ``write_same`` with the one block (NDOB: zeros).
                            NUMBER OF LOGICAL BLOCKS 0 is refused (WSNZ, as LIO does)
GET LBA STATUS(16)          ``mapped_extents`` answered as SBC-4 LBA status descriptors
COMPARE AND WRITE           ``compare_and_write``; a mismatch is MISCOMPARE with the offset of
                            the first differing byte in INFORMATION
FORMAT UNIT                 ``discard_pi`` of the whole medium (PI-aware handlers only)
==========================  ====================================================================

Errors become CHECK CONDITION with fixed-format sense (18 bytes), in ``execute``:
``HandlerError(key, asc_ascq)`` exactly as given; ``OSError`` (and a backstore's
``BackstoreError``) MEDIUM ERROR — UNRECOVERED READ ERROR for commands that read, WRITE ERROR
otherwise; ``BackstoreBusy`` the status BUSY (retryable); any other exception HARDWARE ERROR /
INTERNAL TARGET FAILURE, logged with its traceback. A CDB the handler does not know completes
with the ring's UNKNOWN_OP flag.

Handler methods are called from several threads at once (the worker's ``--threads``); a
handler that cannot take that sets ``concurrent = False`` and gets one command at a time.

``BackstoreHandler`` adapts any ``sgtarget.backstores.base.Backstore``; the built-in handler
names are ``file`` (params ``path``, ``direct``, ``readonly``; the file is opened without the
target's exclusive lock, which the target process holds for the LUN; PI-aware: with
``config.protection`` it opens the LUN's sidecar ``PATH.pi`` and stores tuples there, as the
target's own ``file`` LUN does) and ``null``. Any other
name is ``MODULE:CLASS``, a ``Handler`` subclass constructed without arguments.
"""

from __future__ import annotations

import abc
import enum
import importlib
import logging
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from sgtarget.backstores.base import Backstore, BackstoreBusy, BackstoreError
from sgtarget.backstores.pi import ProtectionStore
from sgtarget.datapath.views import byte_view, copy_views, split_views
from sgtarget.scsi.lbastatus import (
    LBA_STATUS_DESC,
    LBA_STATUS_HDR,
    LBA_STATUS_SCAN_BYTES,
    block_runs,
    lba_status_data,
)

log = logging.getLogger(__name__)

Buffers = Sequence[memoryview]
#: ``(offset, length, mapped)`` runs of a byte range, as ``Backstore.mapped_extents``.
Extents = list[tuple[int, int, bool]]


class Status(enum.IntEnum):
    """SCSI status bytes a handler completes with (SAM-5)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    TASK_SET_FULL = 0x28


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Asc(enum.IntEnum):
    """Additional sense code and qualifier as one value, ``ASC << 8 | ASCQ``."""

    WRITE_ERROR = 0x0C00
    UNRECOVERED_READ_ERROR = 0x1100
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    INTERNAL_TARGET_FAILURE = 0x4400


class Opcode(enum.IntEnum):
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    FORMAT_UNIT = 0x04


#: Bytes of protection information per logical block.
PI_TUPLE_SIZE = 8
#: FORMAT UNIT byte 1: FMTDATA (a parameter list follows).
_FMTDATA = 0x10
#: SERVICE ACTION IN(16) service action of GET LBA STATUS.
SA_GET_LBA_STATUS = 0x12
#: Fixed-format sense: response code, obsolete, key, INFORMATION, additional length,
#: command-specific information, ASC, ASCQ, FRU, sense-key specific. 18 bytes.
_FIXED_SENSE = struct.Struct(">BBBIBIBBB3s")
SENSE_LENGTH = _FIXED_SENSE.size
_VALID = 0x80
#: ``write_same`` writes at most this many copies of its block per ``write`` (IOV_MAX).
_WRITE_SAME_IOVS = 1024
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_BE16 = struct.Struct(">H")
#: Commands that may carry dif iovecs.
_PI_OPS = frozenset({Opcode.READ_10, Opcode.READ_16, Opcode.WRITE_10, Opcode.WRITE_16})
#: Commands whose failure is a read error; every other one's is a write error.
_READS = frozenset(
    {Opcode.READ_10, Opcode.READ_16, Opcode.PRE_FETCH_16, Opcode.SERVICE_ACTION_IN_16}
)


def fixed_sense(key: int, asc_ascq: int, information: int | None = None) -> bytes:
    """Fixed-format sense data (SPC-5 4.4.3), 18 bytes; VALID set when INFORMATION fits."""
    valid = information is not None and 0 <= information <= 0xFFFFFFFF
    return _FIXED_SENSE.pack(
        0x70 | (_VALID if valid else 0),
        0,
        key & 0x0F,
        information if valid and information is not None else 0,
        SENSE_LENGTH - 8,
        0,
        (asc_ascq >> 8) & 0xFF,
        asc_ascq & 0xFF,
        0,
        b"\0\0\0",
    )


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    """What a handler serves: ``size`` bytes in blocks of ``block_size``, and its parameters."""

    size: int
    block_size: int = 512
    params: Mapping[str, str] = field(default_factory=dict)
    #: The T10 protection type whose tuples the handler stores (``--pi``; the LUN's
    #: ``handler_pi=1``), 0: none (the target keeps the LUN's PI, if it has any).
    protection: int = 0

    @property
    def num_blocks(self) -> int:
        return self.size // self.block_size


@dataclass(frozen=True, slots=True)
class Result:
    """How a command completes: SCSI status, sense (CHECK CONDITION only), data-in length.

    ``read_len`` is the data-in bytes produced when fewer than the buffers hold (the ring's
    READ_LEN), else ``None``. ``unknown_op``: the handler does not know the CDB (UNKNOWN_OP).
    """

    status: int = Status.GOOD
    sense: bytes = b""
    read_len: int | None = None
    unknown_op: bool = False

    @classmethod
    def check_condition(cls, key: int, asc_ascq: int, information: int | None = None) -> Result:
        return cls(Status.CHECK_CONDITION, fixed_sense(key, asc_ascq, information))


GOOD = Result()
UNKNOWN_OP = Result(
    Status.CHECK_CONDITION,
    fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE),
    unknown_op=True,
)
BUSY = Result(Status.BUSY)


class HandlerError(Exception):
    """Raised by a handler for a precise CHECK CONDITION (``execute`` builds the sense)."""

    def __init__(
        self, sense_key: int, asc_ascq: int, information: int | None = None, msg: str = ""
    ) -> None:
        super().__init__(msg or f"sense {sense_key:X}/{asc_ascq >> 8:02X}/{asc_ascq & 0xFF:02X}")
        self.sense_key = sense_key
        self.asc_ascq = asc_ascq
        self.information = information

    def result(self) -> Result:
        return Result.check_condition(self.sense_key, self.asc_ascq, self.information)


class Miscompare(HandlerError):
    """COMPARE AND WRITE's verify data differs; ``offset`` is the first differing byte's
    position in the data-out buffer (SBC-4 5.3: reported in INFORMATION)."""

    def __init__(self, offset: int) -> None:
        super().__init__(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, offset)
        self.offset = offset


def _invalid_field() -> HandlerError:
    return HandlerError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def _out_of_range() -> HandlerError:
    return HandlerError(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


# ---- buffers -------------------------------------------------------------------------------


def total_length(bufs: Buffers) -> int:
    return sum(b.nbytes for b in bufs)


def split_buffers(bufs: Buffers, n: int) -> tuple[list[memoryview], list[memoryview]]:
    """``bufs`` cut after ``n`` bytes: views of the first ``n`` bytes and of the rest."""
    return split_views(bufs, n)


def copy_to_buffers(data: bytes | bytearray | memoryview, bufs: Buffers) -> int:
    """Copy ``data`` into consecutive ``bufs`` as far as they reach; bytes copied."""
    return copy_views([data], bufs)


def _first_difference(current: memoryview, bufs: Buffers) -> int | None:
    pos = 0
    for buf in bufs:
        view = byte_view(buf)
        here = current[pos : pos + len(view)]
        if here != view:
            for i in range(len(view)):  # short: COMPARE AND WRITE moves at most 255 blocks
                if here[i] != view[i]:
                    return pos + i
        pos += len(view)
    return None


# ---- the handler API -----------------------------------------------------------------------


class Handler(abc.ABC):
    """A block device served through a ring; see the module docstring.

    ``config`` is set before ``open`` is called. Methods take byte offsets; the default
    ``handle_cmd`` has already checked ranges against ``config.size``.
    """

    #: False: the worker runs one command at a time (the handler is not thread-safe).
    concurrent: ClassVar[bool] = True
    #: True: commands may block (file I/O) and run on the worker's threads. False: they are
    #: cheap and never block (null, RAM): the worker runs them in its poll loop, saving two
    #: thread hand-offs per command.
    blocking: bool = True
    #: True: the handler stores protection information (``read_pi``/``write_pi``/
    #: ``discard_pi``; the module docstring). Decided by the end of ``open``.
    protection: bool = False
    config: HandlerConfig
    # COMPARE AND WRITE's read-compare-write runs under this lock, so two of them in one
    # process never interleave (a target serialises it against other writes itself).
    _caw_lock: ClassVar[threading.Lock] = threading.Lock()

    def open(self, config: HandlerConfig) -> None:
        """Open the backing storage. The default only records ``config``."""
        self.config = config

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release everything ``open`` took; flush first where that matters."""

    @abc.abstractmethod
    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        """Fill ``bufs`` from ``offset``; bytes produced, ``None`` for all of them."""

    @abc.abstractmethod
    def write(self, offset: int, bufs: list[memoryview]) -> None:
        """Store ``bufs`` at ``offset``."""

    def flush(self) -> None:  # noqa: B027 - nothing cached by default
        """Make everything written durable."""

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate the range; it reads back as zeros. The default writes zeros."""
        self.write_same(offset, length, memoryview(bytes(self.config.block_size)))

    def prefetch(self, offset: int, length: int) -> None:  # noqa: B027 - a hint
        """The range will be read soon."""

    def mapped_extents(self, offset: int, length: int) -> Extents:
        """``(offset, length, mapped)`` runs covering the range, in order. Default: mapped."""
        return [(offset, length, True)]

    def write_same(self, offset: int, length: int, block: memoryview) -> None:
        """Write ``block`` (one logical block) repeatedly over ``[offset, offset + length)``.

        The default hands ``write`` up to 1024 views of the same block per call: nothing is
        allocated, and a file handler's ``pwritev`` takes them as they are.
        """
        bs = len(block)
        if not bs or length % bs:
            raise ValueError(
                f"write_same: {length} bytes is not a whole number of {bs}-byte blocks"
            )
        end = offset + length
        while offset < end:
            count = min((end - offset) // bs, _WRITE_SAME_IOVS)
            self.write(offset, [block] * count)
            offset += count * bs

    def compare_and_write(
        self, offset: int, verify: list[memoryview], write: list[memoryview]
    ) -> None:
        """Write ``write`` at ``offset`` if the medium there equals ``verify``, else raise
        ``Miscompare`` (nothing written). The default reads, compares and writes under a
        lock that serialises COMPARE AND WRITEs of this process."""
        length = total_length(verify)
        current = memoryview(bytearray(length))
        with self._caw_lock:
            self.read(offset, [current])
            diff = _first_difference(current, verify)
            if diff is not None:
                raise Miscompare(diff)
            self.write(offset, write)

    def read_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> int | None:
        """Fill ``bufs`` from ``offset`` and ``pi_bufs`` with their blocks' tuples (PI-aware
        handlers); bytes of data produced, ``None`` for all of them."""
        raise _invalid_field()

    def write_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> None:
        """Store ``bufs`` at ``offset`` and ``pi_bufs`` as their blocks' tuples (PI-aware
        handlers)."""
        raise _invalid_field()

    def discard_pi(self, offset: int, length: int) -> None:
        """Give the blocks of the range the escape tuple, all 0xFF (PI-aware handlers)."""
        raise _invalid_field()

    def handle_cmd(
        self,
        cdb: bytes,
        bufs: list[memoryview],
        bidi_bufs: list[memoryview],
        pi_bufs: list[memoryview] | None = None,
    ) -> Result:
        """Run one command. The default decodes the CDB and calls the block operations; an
        override sees raw CDBs (and may call this for the ones it leaves alone). It may raise
        as the block operations do (``execute`` maps exceptions to sense). ``pi_bufs``: the
        tuples of a command with dif iovecs (given only then, and only to PI-aware handlers)."""
        return dispatch(self, cdb, bufs, pi_bufs or ())


def execute(
    handler: Handler,
    cdb: bytes,
    bufs: list[memoryview],
    bidi_bufs: list[memoryview],
    pi_bufs: list[memoryview] | None = None,
) -> Result:
    """``handler.handle_cmd`` with every exception mapped to a completion; never raises.

    ``pi_bufs`` (dif iovecs) reach ``handle_cmd`` only when there are some, so overrides
    written for handlers without PI keep their three-argument signature."""
    try:
        if pi_bufs:
            return handler.handle_cmd(cdb, bufs, bidi_bufs, pi_bufs)
        return handler.handle_cmd(cdb, bufs, bidi_bufs)
    except HandlerError as exc:
        return exc.result()
    except BackstoreBusy:
        return BUSY
    except (OSError, BackstoreError) as exc:
        reads = bool(cdb) and cdb[0] in _READS
        log.warning("medium error on CDB %s: %s", cdb.hex(), exc)
        asc = Asc.UNRECOVERED_READ_ERROR if reads else Asc.WRITE_ERROR
        return Result.check_condition(SenseKey.MEDIUM_ERROR, asc)
    except Exception:
        log.exception("handler %s failed on CDB %s", type(handler).__name__, cdb.hex())
        return Result.check_condition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


# ---- CDB decoding --------------------------------------------------------------------------


def _need(cdb: bytes, n: int) -> None:
    if len(cdb) < n:
        raise _invalid_field()


def _range(handler: Handler, lba: int, blocks: int) -> tuple[int, int]:
    """Byte offset and length of ``blocks`` blocks at ``lba``, checked against the medium."""
    cfg = handler.config
    if lba + blocks > cfg.num_blocks:
        raise _out_of_range()
    return lba * cfg.block_size, blocks * cfg.block_size


def _or_to_end(handler: Handler, lba: int, blocks: int) -> int:
    """``blocks``, or for 0 the blocks from ``lba`` to the end (SYNCHRONIZE CACHE, PRE-FETCH);
    an ``lba`` past the last block is out of range either way."""
    if lba >= handler.config.num_blocks:
        raise _out_of_range()
    return blocks or handler.config.num_blocks - lba


def _data(bufs: Buffers, length: int) -> list[memoryview]:
    """The first ``length`` bytes of the data buffers; INVALID FIELD IN CDB if they are
    shorter than the transfer the CDB asks for."""
    head, _ = split_buffers(bufs, length)
    if total_length(head) < length:
        raise _invalid_field()
    return head


def _rw10(cdb: bytes) -> tuple[int, int]:
    _need(cdb, 10)
    return _BE32.unpack_from(cdb, 2)[0], _BE16.unpack_from(cdb, 7)[0]


def _rw16(cdb: bytes) -> tuple[int, int]:
    _need(cdb, 16)
    return _BE64.unpack_from(cdb, 2)[0], _BE32.unpack_from(cdb, 10)[0]


def _tuples(handler: Handler, blocks: int, pi_bufs: Buffers) -> list[memoryview]:
    """The tuples of ``blocks`` blocks from the dif buffers; INVALID FIELD IN CDB for a
    handler that does not store PI or buffers too short."""
    if not handler.protection:
        raise _invalid_field()
    return _data(pi_bufs, blocks * PI_TUPLE_SIZE)


def _read(handler: Handler, lba: int, blocks: int, bufs: Buffers, pi_bufs: Buffers) -> Result:
    offset, length = _range(handler, lba, blocks)
    if not length:
        return GOOD
    if pi_bufs:
        n = handler.read_pi(offset, _data(bufs, length), _tuples(handler, blocks, pi_bufs))
    else:
        n = handler.read(offset, _data(bufs, length))
    if n is None or n >= length:
        return GOOD
    return Result(read_len=max(0, n))


def _write(
    handler: Handler, lba: int, blocks: int, bufs: Buffers, pi_bufs: Buffers, *, fua: bool
) -> Result:
    offset, length = _range(handler, lba, blocks)
    if length:
        if pi_bufs:
            handler.write_pi(offset, _data(bufs, length), _tuples(handler, blocks, pi_bufs))
        else:
            handler.write(offset, _data(bufs, length))
        if fua:
            handler.flush()
    return GOOD


def _format_unit(handler: Handler, cdb: bytes) -> Result:
    """FORMAT UNIT without a parameter list: every tuple back to escape (the target keeps
    the format type and user data stays); only PI-aware handlers know it."""
    if not handler.protection:
        return UNKNOWN_OP
    _need(cdb, 6)
    if cdb[1] & _FMTDATA:
        raise _invalid_field()
    handler.discard_pi(0, handler.config.num_blocks * handler.config.block_size)
    return GOOD


def _write_same(handler: Handler, cdb: bytes, bufs: Buffers) -> Result:
    lba, blocks = _rw16(cdb)
    flags = cdb[1]
    unmap, ndob = bool(flags & 0x08), bool(flags & 0x01)
    if flags & 0x10 or blocks == 0:  # ANCHOR (no anchored state); WSNZ
        raise _invalid_field()
    offset, length = _range(handler, lba, blocks)
    bs = handler.config.block_size
    if ndob:
        block = memoryview(bytes(bs))
    else:
        head = _data(bufs, bs)
        block = head[0] if len(head) == 1 else memoryview(b"".join(head))
    if unmap and not any(block):
        handler.unmap(offset, length)
        if handler.protection:  # deallocated blocks read back as never written
            handler.discard_pi(offset, length)
    else:
        handler.write_same(offset, length, block)
    return GOOD


def _get_lba_status(handler: Handler, cdb: bytes, bufs: Buffers) -> Result:
    _need(cdb, 16)
    lba = _BE64.unpack_from(cdb, 2)[0]
    alloc = _BE32.unpack_from(cdb, 10)[0]
    cfg = handler.config
    if lba >= cfg.num_blocks:
        raise _out_of_range()
    bs = cfg.block_size
    end = min(cfg.num_blocks, lba + max(1, LBA_STATUS_SCAN_BYTES // bs))
    room = min(alloc, total_length(bufs))
    extents = handler.mapped_extents(lba * bs, (end - lba) * bs)
    runs = block_runs(extents, bs, lba, end)
    max_desc = max(1, (room - LBA_STATUS_HDR.size) // LBA_STATUS_DESC.size)
    data = lba_status_data(runs, max_desc)
    n = copy_to_buffers(memoryview(data)[:room], bufs)
    return Result(read_len=n) if n < total_length(bufs) else GOOD


def _compare_and_write(handler: Handler, cdb: bytes, bufs: Buffers) -> Result:
    _need(cdb, 16)
    lba = _BE64.unpack_from(cdb, 2)[0]
    blocks = cdb[13]
    offset, length = _range(handler, lba, blocks)
    if not length:
        return GOOD
    verify, write = split_buffers(_data(bufs, 2 * length), length)
    handler.compare_and_write(offset, verify, write)
    return GOOD


def dispatch(handler: Handler, cdb: bytes, bufs: Buffers, pi_bufs: Buffers = ()) -> Result:
    """Decode ``cdb`` and call ``handler``'s block operations (``Handler.handle_cmd``);
    ``pi_bufs`` (dif iovecs) send READ/WRITE to ``read_pi``/``write_pi``."""
    if not cdb:
        return UNKNOWN_OP
    op = cdb[0]
    if pi_bufs and op not in _PI_OPS:
        raise _invalid_field()  # tuples only travel with READ and WRITE
    if op == Opcode.READ_16:
        return _read(handler, *_rw16(cdb), bufs, pi_bufs)
    if op == Opcode.WRITE_16:
        return _write(handler, *_rw16(cdb), bufs, pi_bufs, fua=bool(cdb[1] & 0x08))
    if op == Opcode.READ_10:
        return _read(handler, *_rw10(cdb), bufs, pi_bufs)
    if op == Opcode.WRITE_10:
        return _write(handler, *_rw10(cdb), bufs, pi_bufs, fua=bool(cdb[1] & 0x08))
    if op == Opcode.FORMAT_UNIT:
        return _format_unit(handler, cdb)
    if op in (Opcode.SYNCHRONIZE_CACHE_16, Opcode.SYNCHRONIZE_CACHE_10):
        lba, blocks = _rw16(cdb) if op == Opcode.SYNCHRONIZE_CACHE_16 else _rw10(cdb)
        _range(handler, lba, _or_to_end(handler, lba, blocks))
        handler.flush()
        return GOOD
    if op == Opcode.PRE_FETCH_16:
        lba, blocks = _rw16(cdb)
        offset, length = _range(handler, lba, _or_to_end(handler, lba, blocks))
        handler.prefetch(offset, length)
        return GOOD
    if op == Opcode.WRITE_SAME_16:
        return _write_same(handler, cdb, bufs)
    if op == Opcode.COMPARE_AND_WRITE:
        return _compare_and_write(handler, cdb, bufs)
    if op == Opcode.SERVICE_ACTION_IN_16 and len(cdb) > 1 and cdb[1] & 0x1F == SA_GET_LBA_STATUS:
        return _get_lba_status(handler, cdb, bufs)
    return UNKNOWN_OP


# ---- backstores as handlers ----------------------------------------------------------------


class BackstoreHandler(Handler):
    """A ``Backstore`` served as a handler: ``opener(config)`` builds it at ``open``.

    read/write/flush/prefetch/unmap/mapped_extents go to readv/writev/flush/prefetch/
    discard/mapped_extents; write_same and compare_and_write use the generic defaults. The
    backstore must be at least ``config.size`` bytes. PI-aware when the backstore has a
    ``protection`` store: read_pi/write_pi/discard_pi move the data, then the tuples.
    """

    def __init__(self, opener: Callable[[HandlerConfig], Backstore]) -> None:
        self._opener = opener
        self.backstore: Backstore | None = None

    def open(self, config: HandlerConfig) -> None:
        super().open(config)
        backstore = self._opener(config)
        if backstore.size < config.size:
            backstore.close()
            raise ValueError(
                f"{backstore.describe()} is smaller than the {config.size} bytes to serve"
            )
        self.backstore = backstore
        self.blocking = backstore.blocking
        self.protection = backstore.protection is not None

    def _bs(self) -> Backstore:
        if self.backstore is None:
            raise RuntimeError("handler is not open")
        return self.backstore

    def close(self) -> None:
        backstore, self.backstore = self.backstore, None
        if backstore is not None:
            backstore.close()

    def read(self, offset: int, bufs: list[memoryview]) -> int | None:
        return self._bs().readv(offset, bufs)

    def write(self, offset: int, bufs: list[memoryview]) -> None:
        self._bs().writev(offset, bufs)

    def flush(self) -> None:
        self._bs().flush()

    def prefetch(self, offset: int, length: int) -> None:
        self._bs().prefetch(offset, length)

    def unmap(self, offset: int, length: int) -> None:
        self._bs().discard(offset, length)

    def mapped_extents(self, offset: int, length: int) -> Extents:
        return self._bs().mapped_extents(offset, length)

    def _store(self) -> ProtectionStore:
        store = self._bs().protection
        if store is None:
            raise _invalid_field()
        return store

    def read_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> int | None:
        store = self._store()
        n = self._bs().readv(offset, bufs)
        store.read(offset // self.config.block_size, pi_bufs)
        return n

    def write_pi(self, offset: int, bufs: list[memoryview], pi_bufs: list[memoryview]) -> None:
        store = self._store()
        # Data first, then tuples, like the target's own LUs: the target holds the range
        # exclusively until both are written, so no reader sees one without the other.
        self._bs().writev(offset, bufs)
        store.write(offset // self.config.block_size, pi_bufs)

    def discard_pi(self, offset: int, length: int) -> None:
        bs = self.config.block_size
        self._store().discard(offset // bs, length // bs)


_BOOLS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}


def _flag(kind: str, params: Mapping[str, str], key: str) -> bool:
    raw = params.get(key, "0")
    value = _BOOLS.get(raw.lower())
    if value is None:
        raise ValueError(f"{kind}: {key}={raw!r} is not one of {', '.join(_BOOLS)}")
    return value


def _check(kind: str, params: Mapping[str, str], accepted: Sequence[str]) -> None:
    for key in params:
        if key not in accepted:
            raise ValueError(f"{kind}: unknown parameter {key!r} (accepted: {', '.join(accepted)})")


def open_file(config: HandlerConfig) -> Backstore:
    """``file``: the LUN's file, opened without the lock the target process holds."""
    from sgtarget.backstores.file import FileBackstore  # noqa: PLC0415 - only file handlers

    params = config.params
    _check("file", params, ("direct", "path", "readonly"))
    if "path" not in params:
        raise ValueError("file: missing parameter 'path'")
    return FileBackstore(
        params["path"],
        direct=_flag("file", params, "direct"),
        readonly=_flag("file", params, "readonly"),
        lock=False,
        block_size=config.block_size,
        pi=config.protection,  # the sidecar PATH.pi, which the target created
    )


def open_null(config: HandlerConfig) -> Backstore:
    """``null``: reads zeros, forgets writes."""
    from sgtarget.backstores.null import NullBackstore  # noqa: PLC0415

    _check("null", config.params, ())
    return NullBackstore(config.size)


BUILTIN: dict[str, Callable[[HandlerConfig], Backstore]] = {"file": open_file, "null": open_null}


def load_handler(name: str) -> Handler:
    """A handler instance for ``--handler NAME``: ``file``, ``null`` or ``MODULE:CLASS``."""
    if name in BUILTIN:
        return BackstoreHandler(BUILTIN[name])
    module_name, sep, class_name = name.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(
            f"unknown handler {name!r} (built in: {', '.join(sorted(BUILTIN))}; "
            "or MODULE:CLASS for a Handler subclass)"
        )
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise ValueError(f"{name}: {class_name} is not a Handler subclass in {module_name}")
    return cls()


def open_handler(name: str, config: HandlerConfig) -> Handler:
    """Load and open a handler; ``config`` is set even if a subclass's ``open`` forgets."""
    handler = load_handler(name)
    handler.config = config
    handler.open(config)
    return handler
