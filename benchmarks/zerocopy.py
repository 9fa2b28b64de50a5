"""Zero copy: user-space bytes copied per payload byte for aligned 1 MiB READ and WRITE.

A file LUN is driven by ``qemu-img bench -s 1M -d 16 -c 512`` (with ``-w`` for WRITE), once as
a plain file LUN and once with ``direct=1`` (O_DIRECT; "n/a" if sgtarget refuses the key), and
tgt on the same file as a throughput reference. sgtarget is restarted per direction so each
stats line covers one direction. Goal: 0 payload bytes copied in user space. Replies to emulated
commands (INQUIRY, READ CAPACITY, ...) are built in Python and always copied; they are shown but
are not payload.

    python -m benchmarks.zerocopy
    python -m benchmarks.zerocopy --count 64
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    BenchError,
    GiB,
    MiB,
    SgTarget,
    Stats,
    TgtTarget,
    mib,
    parse_size,
    print_table,
    qemu_bench,
    require,
    sparse_file,
)

REQUEST = MiB
#: Copy reasons that are not payload (emulated command replies).
NOT_PAYLOAD = ("emulated-reply",)


@dataclass
class Run:
    config: str
    op: str
    moved: int = 0
    seconds: float = 0.0
    stats: Stats | None = None
    error: str = ""

    @property
    def mib_s(self) -> float:
        return self.moved / MiB / self.seconds if self.seconds else 0.0

    def payload_copied(self) -> int:
        if self.stats is None:
            return 0
        return sum(v for k, v in self.stats.copies.items() if k.split("/")[0] not in NOT_PAYLOAD)


def run_sgtarget(path: Path, size: int, direct: bool, args: argparse.Namespace) -> list[Run]:
    config = "sgtarget direct=1" if direct else "sgtarget"
    spec = f"file:{path},size={size}" + (",direct=1" if direct else "")
    runs = []
    for op in ("WRITE", "READ"):
        run = Run(config, op)
        runs.append(run)
        try:
            # A fresh process per direction: its stats line then covers this direction only.
            with SgTarget(spec, pool=args.pool) as t:
                run.seconds, client = qemu_bench(
                    t.url, REQUEST, args.depth, args.count, write=op == "WRITE"
                )
                run.stats = t.stop()
        except BenchError as exc:
            if direct and "refused to start" in str(exc):
                run.error = "n/a (direct=1 refused)"
                continue
            raise
        if client.ok:
            run.moved = args.count * REQUEST
        else:
            run.error = "client failed"
            print(f"FAILURE {config} {op}:\n{client.report()}", file=sys.stderr)
    return runs


def run_tgt(path: Path, args: argparse.Namespace) -> list[Run]:
    runs = []
    with TgtTarget(path) as t:
        for op in ("WRITE", "READ"):
            run = Run("tgt", op)
            run.seconds, client = qemu_bench(
                t.url, REQUEST, args.depth, args.count, write=op == "WRITE"
            )
            if client.ok:
                run.moved = args.count * REQUEST
            else:
                run.error = "client failed"
                print(f"FAILURE tgt {op}:\n{client.report()}", file=sys.stderr)
            runs.append(run)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=512, help="1 MiB requests per run (512)")
    ap.add_argument("--depth", type=int, default=16, help="queue depth (16)")
    ap.add_argument("--size", type=parse_size, default=GiB, help="file LUN size (1G)")
    ap.add_argument("--pool", default="64M", help="sgtarget --pool (64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse LUN file goes")
    ap.add_argument("--no-tgt", action="store_true", help="skip the tgt reference")
    args = ap.parse_args()
    if not 1 <= args.count <= 100_000 or args.size < REQUEST or args.size % REQUEST:
        ap.error("--count must be 1..100000 and --size a multiple of 1M")
    require("qemu-img", *(() if args.no_tgt else ("tgtd", "tgtadm", "iscsi-ls")))
    print(
        f"zerocopy: aligned 1 MiB READ/WRITE, QD{args.depth}, {args.count} requests "
        f"({mib(args.count * REQUEST)}) per run, file LUN {mib(args.size)} in {args.dir}",
        flush=True,
    )
    runs: list[Run] = []
    try:
        with sparse_file(args.dir, args.size) as path:
            runs += run_sgtarget(path, args.size, False, args)
            runs += run_sgtarget(path, args.size, True, args)
            if not args.no_tgt:
                runs += run_tgt(path, args)
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        return 1
    tgt = {r.op: r for r in runs if r.config == "tgt" and not r.error}
    rows = []
    failed = False
    for r in runs:
        if r.config == "tgt":
            continue
        if r.error:
            rows.append([r.config, r.op, *["-"] * 6, r.error])
            failed |= not r.error.startswith("n/a")
            continue
        st = r.stats or Stats()
        payload = r.payload_copied()
        ok = payload == 0
        failed |= not ok
        ref = tgt.get(r.op)
        rows.append(
            [
                r.config,
                r.op,
                f"{payload / r.moved:.3g}" if r.moved else "-",
                f"{st.get('copied_bytes'):,}",
                f"{st.get('zero_copy_ios'):,}",
                f"{st.get('bounced_ios'):,}",
                f"{r.mib_s:.0f}",
                f"{ref.mib_s:.0f}" if ref else "-",
                "PASS" if ok else "FAIL",
            ]
        )
    print_table(
        [
            "config",
            "op",
            "payload copied B/B",
            "all copied B",
            "zero_copy_ios",
            "bounced_ios",
            "MiB/s",
            "tgt MiB/s",
            "goal 0",
        ],
        rows,
        title="Bytes copied in user space per byte moved",
    )
    copy_rows = [
        [r.config, r.op, k, f"{v:,}"]
        for r in runs
        if r.stats is not None
        for k, v in sorted(r.stats.copies.items())
    ]
    if copy_rows:
        print_table(["config", "op", "copy reason/direction", "bytes"], copy_rows, "Copies")
    print(
        "note: READ runs follow WRITE runs on the same file, so buffered reads (sgtarget "
        "without direct=1, tgt) are served from the page cache; direct=1 reads are not."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
