"""Backstores in handler processes: throughput, CPU and user-space copies per data mode.

A file LUN (page-cache file) is served in-process and with ``handler=copy``, ``zerocopy`` and
``isolated`` (one handler process; ``--scaling`` adds zerocopy with ``handlers=2``), and driven
by ``qemu-img bench`` with 1 MiB and 256 KiB READs and WRITEs over a range written once before
the first run (no run pays for block allocation). For each run the table shows
MiB/s, the ratio to the in-process LUN, CPU seconds per GiB moved (sgtarget and its handler
processes together, from /proc) and user-space payload bytes copied per byte moved (the
target's copy accounting). Goals (issue 5): zerocopy WRITE >= 1.1x copy, and within 10 % of
in-process.

    python -m benchmarks.ring
    python -m benchmarks.ring --count 256 --rounds 2 --scaling
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    BenchError,
    GiB,
    MiB,
    SgTarget,
    Stats,
    cpu_seconds,
    mib,
    parse_size,
    prefill,
    print_table,
    qemu_bench,
    require,
    sparse_file,
)

NOT_PAYLOAD = ("emulated-reply",)

#: (label, extra LUN keys)
CONFIGS: tuple[tuple[str, str], ...] = (
    ("in-process", ""),
    ("copy", ",handler=copy"),
    ("zerocopy", ",handler=zerocopy"),
    ("isolated", ",handler=isolated"),
)
SCALING: tuple[tuple[str, str], ...] = (("zerocopy x2", ",handler=zerocopy,handlers=2"),)


def _payload(stats: Stats) -> int:
    return sum(v for k, v in stats.copies.items() if k.split("/")[0] not in NOT_PAYLOAD)


@dataclass
class Run:
    config: str
    op: str
    size: int
    moved: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    copied: int = 0
    error: str = ""
    rounds: list[float] = field(default_factory=list)

    @property
    def mib_s(self) -> float:
        return self.moved / MiB / self.seconds if self.seconds else 0.0


Runs = dict[tuple[str, str, int], Run]


def run_config(path: Path, label: str, keys: str, args: argparse.Namespace, runs: Runs) -> None:
    spec = f"file:{path},size={args.size}{keys}"
    for size in (MiB, 256 * 1024):
        for op in ("WRITE", "READ"):
            run = runs.setdefault((label, op, size), Run(label, op, size))
            if run.error:
                continue
            # Every run starts with no dirty pages: one that met the writeback of an earlier
            # run's writes would be throttled by the kernel, not by what it measures.
            os.sync()
            try:
                # A fresh process per run: its stats line covers this run only.
                with SgTarget(spec, pool=args.pool) as t:
                    cpu0 = cpu_seconds(t.pid)
                    seconds, client = qemu_bench(
                        t.url, size, args.depth, args.count * MiB // size, write=op == "WRITE"
                    )
                    cpu = cpu_seconds(t.pid) - cpu0
                    stats = t.stop()
            except BenchError as exc:
                run.error = str(exc).splitlines()[0][:60]
                print(f"FAILURE {label} {op} {size}: {exc}", file=sys.stderr)
                continue
            if not client.ok:
                run.error = "client failed"
                print(f"FAILURE {label} {op}:\n{client.report()}", file=sys.stderr)
                continue
            moved = (args.count * MiB // size) * size
            run.rounds.append(moved / MiB / seconds)
            # Best round for throughput; CPU and copies summed over rounds.
            if seconds and (not run.seconds or moved / seconds > run.moved / run.seconds):
                run.moved, run.seconds = moved, seconds
            run.cpu += cpu
            run.copied += _payload(stats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=512, help="MiB moved per run (512)")
    ap.add_argument("--depth", type=int, default=16, help="queue depth (16)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds, best counts (2)")
    ap.add_argument("--size", type=parse_size, default=GiB, help="file LUN size (1G)")
    ap.add_argument("--pool", default="64M", help="sgtarget --pool (64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse LUN file goes")
    ap.add_argument("--scaling", action="store_true", help="add zerocopy with handlers=2")
    ap.add_argument("--only", help="comma-separated config labels to run")
    args = ap.parse_args()
    if not 1 <= args.count <= 100_000 or args.size < MiB or args.size % MiB:
        ap.error("--count must be 1..100000 and --size a multiple of 1M")
    require("qemu-img")
    configs = CONFIGS + (SCALING if args.scaling else ())
    if args.only:
        wanted = set(args.only.split(","))
        configs = tuple(c for c in configs if c[0] in wanted)
    print(
        f"ring: qemu-img bench QD{args.depth}, {args.count} MiB per run, {args.rounds} rounds, "
        f"file LUN {mib(args.size)} in {args.dir}, {os.cpu_count()} CPUs",
        flush=True,
    )
    runs: Runs = {}
    try:
        with sparse_file(args.dir, args.size) as path:
            prefill(path, min(args.size, args.count * MiB))
            for _ in range(args.rounds):
                for label, keys in configs:
                    run_config(path, label, keys, args, runs)
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        return 1
    rows = []
    for (label, op, size), r in runs.items():
        size_s = "1M" if size == MiB else f"{size // 1024}K"
        if r.error and not r.moved:
            rows.append([label, op, size_s, "-", "-", "-", "-", "-", r.error])
            continue
        base = runs.get(("in-process", op, size))
        copy = runs.get(("copy", op, size))
        total = r.moved * len(r.rounds)
        rows.append(
            [
                label,
                op,
                size_s,
                f"{r.mib_s:.0f}",
                " ".join(f"{x:.0f}" for x in r.rounds),
                f"{r.mib_s / base.mib_s:.2f}" if base and base.mib_s else "-",
                f"{r.mib_s / copy.mib_s:.2f}" if copy and copy.mib_s else "-",
                f"{r.cpu / (total / GiB):.2f}" if total else "-",
                f"{r.copied / total:.3g}" if total else "-",
            ]
        )
    print_table(
        [
            "config",
            "op",
            "req",
            "best MiB/s",
            "rounds",
            "vs in-process",
            "vs copy",
            "CPU s/GiB",
            "copied B/B",
        ],
        rows,
        title="Handler processes: throughput, CPU and copies (file LUN, page cache)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
