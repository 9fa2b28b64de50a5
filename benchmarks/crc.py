"""CRC-16/T10-DIF throughput: sgtarget's PI helpers and the PyPI libraries considered for them.

Issue 6 item 5: the guard of every block of a 1 MiB transfer must cost one call, not 2,048
Python calls. Two tables, GB/s (10^9 bytes/s of block data, best of ``--rounds``):

- ``sgtarget.datapath.dif``: ``guards()``, ``generate()`` and ``verify()`` (all three checks)
  over ``--size`` bytes at 512- and 4096-byte blocks, for each implementation: the native
  ``_dif`` extension with carry-less multiplication (``clmul``) and with its slicing-by-16 table
  only (``table``, what a CPU without PCLMULQDQ gets), and the fastcrc fallback (one call per
  block). Then, in microseconds, ``split()`` and ``interleave()`` (views) and their copy forms
  ``split_into()`` and ``interleave_into()`` of the same transfer, in 64 KiB buffers.
- Candidate libraries: one call over the whole buffer (what the library can do at best), and
  one call per block in a list comprehension (the best a Python caller gets from it: no library
  computes one CRC per block of a buffer). A library not installed is listed as such; the
  check column is its CRC of b"123456789" (must be 0xD0DB).

    python -m benchmarks.crc [--size 1M] [--rounds 5]
    pip install anycrc fastcrc libscrc crcmod-plus crcengine crcc   # to measure them all

Exit status 0, or 1 when an implementation's result differs from the native one's.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
import time
from collections.abc import Callable

from benchmarks.common import parse_size, print_table
from sgtarget.datapath import dif

BLOCK_SIZES = (512, 4096)
RECEIVE_BUFFER = 64 * 1024
CHECK = b"123456789"

Crc = Callable[[memoryview], int]


def best_rate(fn: Callable[[], object], nbytes: int, rounds: int) -> float:
    """GB/s of the fastest of ``rounds`` timings, each repeating ``fn`` for at least 50 ms."""
    best = float("inf")
    for _ in range(rounds):
        reps = 0
        start = time.perf_counter()
        while True:
            fn()
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= 0.05:
                break
        best = min(best, elapsed / reps)
    return nbytes / best / 1e9


def best_seconds(fn: Callable[[], object], rounds: int) -> float:
    """Seconds per call of ``fn``, best of ``rounds``."""
    return 1.0 / best_rate(fn, 1_000_000_000, rounds)


def dif_ops(data: memoryview, bs: int) -> list[Callable[[], object]]:
    """guards(), generate() and verify() of ``data`` at block size ``bs``."""
    pi = dif.generate(data, bs, ref_tag=0)
    checks = {"guard": True, "app": True, "ref": True}
    return [
        lambda: dif.guards(data, bs),
        lambda: dif.generate(data, bs, ref_tag=0),
        lambda: dif.verify(data, pi, bs, ptype=1, **checks, ref_tag=0),
    ]


def library_crcs() -> dict[str, Crc | str]:
    """CRC-16/T10-DIF from each candidate, or why not."""
    found: dict[str, Crc | str] = {}

    def load(name: str) -> object | None:
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    fastcrc = load("fastcrc")
    found["fastcrc"] = fastcrc.crc16.t10_dif if fastcrc else "not installed"  # type: ignore[attr-defined]
    anycrc = load("anycrc")
    found["anycrc"] = anycrc.Model("CRC16-T10-DIF").calc if anycrc else "not installed"  # type: ignore[attr-defined]
    libscrc = load("libscrc")
    found["libscrc"] = libscrc.t10_dif if libscrc else "not installed"  # type: ignore[attr-defined]
    crcmod = load("crcmod")
    found["crcmod(-plus)"] = (
        crcmod.mkCrcFun(0x18BB7, initCrc=0, rev=False, xorOut=0)  # type: ignore[attr-defined]
        if crcmod
        else "not installed"
    )
    crcengine = load("crcengine")
    found["crcengine"] = (
        crcengine.create(0x8BB7, 16, 0, ref_in=False, ref_out=False, xor_out=0, name="t10dif")  # type: ignore[attr-defined]
        if crcengine
        else "not installed"
    )
    crcc = load("crcc")
    if crcc is None:
        found["crcc"] = "not installed"
    else:
        model = crcc.predefined_model_by_name(b"CRC-16/T10-DIF")  # type: ignore[attr-defined]

        def crcc_t10dif(data: memoryview) -> int:
            # ctypes wants an address; copying into a ctypes buffer is part of the cost.
            buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
            crc = crcc.update(model, buf, len(data), crcc.init(model))  # type: ignore[attr-defined]
            return int(crcc.final(model, crc))  # type: ignore[attr-defined]

        found["crcc"] = crcc_t10dif
    return found


def chop(buf: bytearray, piece: int) -> list[memoryview]:
    view = memoryview(buf)
    return [view[o : o + piece] for o in range(0, len(buf), piece)]


def per_block(crc: Crc, view: memoryview, block_size: int) -> list[int]:
    return [crc(view[o : o + block_size]) for o in range(0, len(view), block_size)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 20, help="bytes per call (1M)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    size: int = args.size
    rounds: int = args.rounds
    data = memoryview(bytearray(os.urandom(size)))
    failed = False

    native = None
    if dif.NATIVE:
        native = importlib.import_module("sgtarget.datapath._dif")
    impls: list[tuple[str, Callable[[], None]]] = []
    saved = dif._native
    if native is not None:
        impls.append(("native clmul", lambda: native.use_clmul(True)))
        impls.append(("native table", lambda: native.use_clmul(False)))

    def fallback() -> None:
        dif._native = None

    impls.append(("fastcrc per block", fallback))
    rows: list[list[object]] = []
    reference: dict[int, bytes] = {}
    for label, select in impls:
        dif._native = saved
        select()
        if label == "native clmul" and not native.use_clmul(True):  # type: ignore[union-attr]
            rows.append([label, "-", "CPU has no PCLMULQDQ", "", ""])
            continue
        for bs in BLOCK_SIZES:
            g = dif.guards(data, bs)
            if reference.setdefault(bs, g) != g:
                print(f"{label}: guards at {bs} differ from the first implementation's")
                failed = True
            rates = [best_rate(op, size, rounds) for op in dif_ops(data, bs)]
            rows.append([label, bs, *(f"{r:.2f}" for r in rates)])
    dif._native = saved
    if native is not None:
        native.use_clmul(True)
    print_table(
        ["implementation", "block", "guards GB/s", "generate GB/s", "verify GB/s"],
        rows,
        title=f"sgtarget.datapath.dif, {size} bytes per call (native: {dif.NATIVE})",
    )

    rows = []
    for bs in BLOCK_SIZES:
        pi = bytes(dif.generate(data, bs, ref_tag=0))
        wire = b"".join(dif.interleave(data, pi, bs))
        received = [
            memoryview(wire)[o : o + RECEIVE_BUFFER] for o in range(0, len(wire), RECEIVE_BUFFER)
        ]
        pieces, tuples = dif.split(received, bs)
        # The copy forms write into pool-sized buffers, as a bounce would.
        data_out = chop(bytearray(size), RECEIVE_BUFFER)
        pi_out = bytearray(len(pi))
        wire_out = chop(bytearray(len(wire)), RECEIVE_BUFFER)
        times = [
            best_seconds(lambda: dif.split(received, bs), rounds),  # noqa: B023
            best_seconds(lambda: dif.interleave(data, pi, bs), rounds),  # noqa: B023
            best_seconds(lambda: dif.split_into(received, bs, data_out, pi_out), rounds),  # noqa: B023
            best_seconds(lambda: dif.interleave_into(data, pi, bs, wire_out), rounds),  # noqa: B023
        ]
        rows.append([bs, *(f"{t * 1e6:.0f}" for t in times), len(pieces), len(tuples)])
    print()
    print_table(
        [
            "block",
            "split us",
            "interleave us",
            "split_into us",
            "interleave_into us",
            "data pieces",
            "PI pieces",
        ],
        rows,
        title=f"split/interleave of {size} bytes received in {RECEIVE_BUFFER // 1024} KiB buffers",
    )

    rows = []
    for name, crc in library_crcs().items():
        if isinstance(crc, str):
            rows.append([name, crc, "", "", ""])
            continue
        check = crc(memoryview(CHECK))
        whole = best_rate(lambda: crc(data), size, rounds)  # noqa: B023
        blocks = [
            f"{best_rate(lambda: per_block(crc, data, bs), size, rounds):.2f}"  # noqa: B023
            for bs in BLOCK_SIZES
        ]
        rows.append([name, f"{check:#06x}", f"{whole:.2f}", *blocks])
        if check != 0xD0DB:
            failed = True
    print()
    print_table(
        ["library", "check", "whole GB/s", "per-512 GB/s", "per-4096 GB/s"],
        rows,
        title="candidate libraries (per-N: one Python call per block)",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
