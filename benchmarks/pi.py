"""T10 PI cost: 1 MiB WRITE and READ on a ``pi=1`` file LUN against the same LUN without PI.

Issue 6's goal: with RDPROTECT/WRPROTECT 0 (an initiator that knows nothing of PI, so the
target generates tuples on every write and checks them on every read) throughput stays within
30 % of the LUN without PI. ``qemu-img bench`` drives 1 MiB requests (and 4 KiB ones, where the
per-command cost shows) over a range written once before the first run; the two LUN kinds
alternate over ``--rounds`` and the best round counts. The table shows MiB/s, the ratio PI/no
PI, and CPU seconds per GiB of the target (from /proc); then the guard CRC's own rate
(``dif.guards``, GB/s) for reference — ``benchmarks/crc.py`` has the full CRC comparison.

    python -m benchmarks.pi
    python -m benchmarks.pi --count 512 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    BenchError,
    GiB,
    MiB,
    SgTarget,
    cpu_seconds,
    mib,
    parse_size,
    prefill,
    print_table,
    qemu_bench,
    require,
    sparse_file,
)
from benchmarks.crc import best_rate
from sgtarget.datapath import dif

#: (label, extra LUN keys)
CONFIGS = (("no PI", ""), ("pi=1", ",pi=1"))
#: (request size, queue depth)
SIZES = ((MiB, 16), (4096, 32))
GOAL = 0.7


@dataclass
class Run:
    moved: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    total: int = 0
    rounds: list[float] = field(default_factory=list)

    @property
    def mib_s(self) -> float:
        return self.moved / MiB / self.seconds if self.seconds else 0.0


def run_one(
    path: Path, keys: str, op: str, size: int, *, depth: int, args: argparse.Namespace
) -> Run:
    spec = f"file:{path},size={args.size}{keys}"
    count = args.count * MiB // size if size >= 65536 else args.count_small
    # Whole MiB of requests (at least one), as the other benchmarks move.
    requests = (count * size // MiB or 1) * MiB // size
    run = Run()
    os.sync()  # no run meets the writeback of an earlier run's dirty pages
    with SgTarget(spec, pool=args.pool) as t:
        cpu0 = cpu_seconds(t.pid)
        seconds, client = qemu_bench(t.url, size, depth, requests, write=op == "WRITE")
        run.cpu = cpu_seconds(t.pid) - cpu0
        t.stop()
    if not client.ok:
        raise BenchError(f"{op} {size}: client failed\n{client.report()}")
    run.moved = requests * size
    run.seconds = seconds
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=256, help="MiB moved per 1 MiB run (256)")
    ap.add_argument("--count-small", type=int, default=20000, help="4 KiB requests per run")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds, best counts (2)")
    ap.add_argument("--size", type=parse_size, default=GiB, help="file LUN size (1G)")
    ap.add_argument("--pool", default="64M", help="sgtarget --pool (64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the LUN files go")
    args = ap.parse_args()
    if not 1 <= args.count <= 100_000 or args.size < MiB or args.size % MiB:
        ap.error("--count must be 1..100000 and --size a multiple of 1M")
    require("qemu-img")
    print(
        f"pi: qemu-img bench, {args.count} MiB per 1 MiB run, {args.count_small} x 4 KiB, "
        f"{args.rounds} rounds, file LUN {mib(args.size)} in {args.dir}, {os.cpu_count()} CPUs",
        flush=True,
    )
    runs: dict[tuple[str, str, int], Run] = {}
    try:
        with sparse_file(args.dir, args.size) as path:
            prefill(path, min(args.size, args.count * MiB))
            for _ in range(args.rounds):
                for label, keys in CONFIGS:
                    for size, depth in SIZES:
                        for op in ("WRITE", "READ"):
                            r = run_one(path, keys, op, size, depth=depth, args=args)
                            best = runs.setdefault((label, op, size), Run())
                            best.rounds.append(r.mib_s)
                            best.cpu += r.cpu
                            best.total += r.moved
                            if r.mib_s > best.mib_s:
                                best.moved, best.seconds = r.moved, r.seconds
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        return 1
    rows = []
    for (label, op, size), r in runs.items():
        base = runs[("no PI", op, size)]
        ratio = r.mib_s / base.mib_s if base.mib_s else 0.0
        judged = label != "no PI" and size == MiB
        rows.append(
            [
                label,
                op,
                "1M" if size == MiB else f"{size // 1024}K",
                f"{r.mib_s:.0f}",
                " ".join(f"{x:.0f}" for x in r.rounds),
                f"{ratio:.2f}",
                (">=0.70 " + ("PASS" if ratio >= GOAL else "FAIL")) if judged else "-",
                f"{r.cpu / (r.total / GiB):.2f}" if r.total else "-",
            ]
        )
    print_table(
        ["LUN", "op", "req", "best MiB/s", "rounds", "vs no PI", "goal", "CPU s/GiB"],
        rows,
        title="PI generated and checked by the target (RD/WRPROTECT 0), file LUN, page cache",
    )
    data = memoryview(os.urandom(MiB))
    rates = [
        [f"{bs}", f"{best_rate(functools.partial(dif.guards, data, bs), MiB, 5):.1f}"]
        for bs in (512, 4096)
    ]
    impl = "native _dif" if dif.NATIVE else "fastcrc per block"
    print_table(["block", "guards GB/s"], rates, title=f"guard CRC over 1 MiB ({impl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
