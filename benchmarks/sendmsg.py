"""What ``transport.writelines`` would cost the data path (issue 7): join + send vs ``sendmsg``.

On Python 3.11 asyncio's stock transports implement ``writelines`` as ``write(b"".join(...))``:
a header and a payload view become one new bytes object, a copy of the payload, before the
kernel copies it again. ``server/sender.py`` sends the list as it is with ``sendmsg``. This
compares the two on a socketpair (a thread drains the far end), per PDU size: MiB/s and the
sender thread's CPU seconds per GiB (user + system, ``RUSAGE_THREAD``).

    python -m benchmarks.sendmsg [--gib 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import resource
import socket
import threading
import time
from collections.abc import Callable

from benchmarks.common import print_table

HEADER = bytes(48)
SIZES = (4096, 128 * 1024, 1024 * 1024)


def _join_send(sock: socket.socket, payload: memoryview) -> None:
    sock.sendall(b"".join([HEADER, payload]))


def _sendmsg(sock: socket.socket, payload: memoryview) -> None:
    total = len(HEADER) + len(payload)
    sent = sock.sendmsg([HEADER, payload])
    if sent < total:  # a blocking socket rarely sends short; finish without a join
        if sent < len(HEADER):
            sock.sendall(HEADER[sent:])
            sent = len(HEADER)
        sock.sendall(payload[sent - len(HEADER) :])


def run(
    send: Callable[[socket.socket, memoryview], None], size: int, count: int
) -> tuple[float, float]:
    """MiB/s and sender CPU s/GiB of ``count`` sends of a 48-byte header and ``size`` bytes."""
    payload = memoryview(bytearray(size))
    a, b = socket.socketpair()

    def drain() -> None:
        buf = bytearray(1 << 20)
        while b.recv_into(buf):
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    before = resource.getrusage(resource.RUSAGE_THREAD)
    start = time.perf_counter()
    for _ in range(count):
        send(a, payload)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_THREAD)
    a.close()
    reader.join(timeout=30)
    b.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    moved = count * size
    return moved / elapsed / 2**20, cpu / (moved / 2**30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=0.5, help="payload per run (GiB)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the best counts")
    args = ap.parse_args()
    if not 0 < args.gib <= 8 or not 1 <= args.rounds <= 20:
        ap.error("--gib must be in (0, 8] and --rounds in [1, 20]")
    rows = []
    for size in SIZES:
        count = max(1000, int(args.gib * 2**30) // size)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, send in (("join+send", _join_send), ("sendmsg", _sendmsg)):
                mib, cpu = run(send, size, count)
                if name not in best or mib > best[name][0]:
                    best[name] = (mib, cpu)
        (jm, jc), (sm, sc) = best["join+send"], best["sendmsg"]
        rows.append(
            [
                f"{size // 1024}K",
                f"{jm:,.0f}",
                f"{sm:,.0f}",
                f"{sm / jm:.2f}",
                f"{jc:.2f}",
                f"{sc:.2f}",
            ]
        )
    print_table(
        [
            "PDU payload",
            "join+send MiB/s",
            "sendmsg MiB/s",
            "ratio",
            "join CPU s/GiB",
            "sendmsg CPU s/GiB",
        ],
        rows,
        title=f"48-byte header + payload over a socketpair, best of {args.rounds} rounds",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
