"""sgtarget beside tgt: the clients users run, on identical LUNs, in the same run (issue 7).

Per LUN kind (a 1 GiB sparse file, written once before the first run so no run pays for block
allocation, tgt's default ``rdwr`` backing store; and null, sgtarget ``null:size=1G`` and tgt
``--bstype null``) one tgtd is started, and one sgtarget per event loop (``--loops``) in turn
(sgtarget locks its file). Every test runs on sgtarget, then on tgt, test after test, round after
round (A/B/A/B, ``--rounds`` rounds; the best round counts):

    qemu-img bench -f raw -t none   4K read QD32, 4K write QD32, 1M write QD16, 1M read QD16
    iscsi-perf -m 32 -b 8 | -b 256  sequential 4K / 128K reads for --seconds

The table gives ops/s and MiB/s per target, the ratio sgtarget/tgt (best rounds, and each
round's own), the issue's goal for that ratio and whether it is met, the CPU seconds each target
spent per GiB moved (user + system of the process and its descendants from /proc, around each
run, summed over rounds) and, when iperf3 is installed, sgtarget's MiB/s as a share of the
loopback figure (``iperf3 -c 127.0.0.1 -t 3``, one stream). sgtarget runs on uvloop when it is
importable; the asyncio rows run ``sgtarget serve --loop asyncio``, and /proc/PID/maps confirms
which loop each server runs.

    python -m benchmarks.vs_tgt
    python -m benchmarks.vs_tgt --quick
    python -m benchmarks.vs_tgt --only 4k-read,perf-256 --luns null --loops uvloop --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    BenchError,
    GiB,
    MiB,
    SgTarget,
    TgtTarget,
    cpu_seconds,
    free_port,
    mib,
    parse_size,
    prefill,
    print_table,
    qemu_bench_argv,
    qemu_seconds,
    require,
    run_clients,
    sparse_file,
)

#: Slack on top of a client's expected run time before it is killed.
CLIENT_SLACK = 120.0
IPERF_SECONDS = 3
LOOPS = ("uvloop", "asyncio")
KINDS = ("file", "null")


@dataclass(frozen=True)
class Test:
    """One client run: ``key`` for --only, ``goal`` names the issue's goal it is judged by."""

    key: str
    label: str
    goal: str
    size: int
    depth: int
    write: bool = False
    perf: bool = False


TESTS = (
    Test("4k-read", "qemu-img 4K read QD32", "4K read", 4096, 32),
    Test("4k-write", "qemu-img 4K write QD32", "4K write", 4096, 32, write=True),
    Test("1m-write", "qemu-img 1M write QD16", "1M write", MiB, 16, write=True),
    Test("1m-read", "qemu-img 1M read QD16", "1M read", MiB, 16),
    Test("perf-8", "iscsi-perf -m 32 -b 8", "4K read", 4096, 32, perf=True),
    Test("perf-256", "iscsi-perf -m 32 -b 256", "128K read", 128 * 1024, 32, perf=True),
)

#: Issue 7's goals: ratio sgtarget/tgt per LUN kind, same run, best of rounds.
GOALS: dict[str, dict[str, float]] = {
    "file": {"4K read": 1.3, "4K write": 1.2, "128K read": 1.3, "1M read": 1.2, "1M write": 1.2},
    "null": {"4K read": 0.8, "128K read": 0.9},
}

_PERF_AVERAGE = re.compile(r"iops average (\d+) \((\d+) MB/s\)")


def perf_iops(output: str) -> int | None:
    """The last ``iops average N (M MB/s)`` of ``iscsi-perf`` (the whole run's average)."""
    found = _PERF_AVERAGE.findall(output)
    return int(found[-1][0]) if found else None


def iperf3_bps(output: str) -> float | None:
    """Bits per second received, from ``iperf3 -c ... -J``; None if it reports an error."""
    try:
        data = json.loads(output)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("error"):
        return None
    end = data.get("end", {})
    for key in ("sum_received", "sum_sent", "sum"):
        part = end.get(key) if isinstance(end, dict) else None
        if isinstance(part, dict) and isinstance(part.get("bits_per_second"), int | float):
            return float(part["bits_per_second"])
    return None


def loopback_mib_s(seconds: int) -> float | None:
    """One ``iperf3`` stream over 127.0.0.1 on a free port, in MiB/s (None: no iperf3)."""
    if shutil.which("iperf3") is None:
        return None
    port = str(free_port())
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # No probe connection before: ``-1`` would take it as its one client.
            client = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", port, "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
                timeout=seconds + 30,
                check=False,
            )
            bps = iperf3_bps(client.stdout)
            if bps is not None:
                return bps / 8 / MiB
            if server.poll() is not None:
                return None
            time.sleep(0.1)
        return None
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)


@dataclass
class Side:
    """A running target as the clients see it."""

    label: str
    url: str
    pid: int


@dataclass
class Result:
    rounds: list[float] = field(default_factory=list)  # ops/s per round (0: failed)
    moved: int = 0  # bytes, summed over rounds
    cpu: float = 0.0  # seconds, summed over rounds
    error: str = ""

    @property
    def best(self) -> float:
        return max(self.rounds, default=0.0)


Results = dict[tuple[str, str, str, str], Result]  # (kind, loop, "sgtarget"/"tgt", test key)


def qemu_count(test: Test, args: argparse.Namespace) -> int:
    return int(args.count_4k if test.size < MiB else args.count_1m)


def client_argv(test: Test, url: str, args: argparse.Namespace) -> list[str]:
    if test.perf:
        # -b counts logical blocks: both targets' LUNs have 512-byte blocks.
        argv = ["iscsi-perf", "-m", str(test.depth), "-b", str(test.size // 512)]
        return [*argv, "-t", str(args.seconds), url]
    return qemu_bench_argv(url, test.size, test.depth, qemu_count(test, args), write=test.write)


def run_test(test: Test, side: Side, args: argparse.Namespace, result: Result) -> None:
    """One client run on one target; ops/s, bytes and CPU go into ``result``."""
    argv = client_argv(test, side.url, args)
    timeout = (args.seconds if test.perf else 0) + CLIENT_SLACK
    cpu0 = cpu_seconds(side.pid)
    (client,), _ = run_clients([argv], timeout)
    cpu = cpu_seconds(side.pid) - cpu0
    ops: float | None = None
    seconds = 0.0
    if test.perf:
        iops = perf_iops(client.stdout)
        if iops is not None:
            ops, seconds = float(iops * args.seconds), float(args.seconds)
    else:
        taken = qemu_seconds(client.stdout)
        if taken:
            ops, seconds = float(qemu_count(test, args)), taken
    if not client.ok or ops is None or not seconds:
        result.rounds.append(0.0)
        result.error = "client failed"
        print(f"FAILURE {side.label} {test.label}:\n{client.report()}", file=sys.stderr)
        return
    result.rounds.append(ops / seconds)
    result.moved += int(ops) * test.size
    result.cpu += cpu


def server_loop(pid: int) -> str:
    """Which event loop a running sgtarget uses: uvloop's extension is mapped or it is not."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "?"
    return "uvloop" if "/uvloop/" in maps else "asyncio"


@contextlib.contextmanager
def sgtarget(spec: str, loop: str) -> Iterator[Side]:
    with SgTarget(spec, args=["--loop", loop]) as t:
        running = server_loop(t.pid)
        if running != loop:
            raise BenchError(f"sgtarget was asked for {loop} and runs {running}")
        yield Side("sgtarget", t.url, t.pid)


def run_kind(
    kind: str,
    *,
    loops: list[str],
    tests: list[Test],
    args: argparse.Namespace,
    results: Results,
) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "file":
            path = stack.enter_context(sparse_file(args.dir, args.size))
            t0 = time.monotonic()
            prefill(path, args.size)
            print(f"  file LUN {path}: written once in {time.monotonic() - t0:.1f} s", flush=True)
            spec, tgt = f"file:{path},size={args.size}", TgtTarget(path)
        else:
            # tgt's null backstore ignores the path and is 1 TiB; neither keeps data.
            spec, tgt = f"null:size={args.size}", TgtTarget(Path("/dev/null"), bstype="null")
        stack.enter_context(tgt)
        tgt_side = Side("tgt", tgt.url, tgt.pid)
        # One sgtarget at a time: it locks the file (flock), tgt does not.
        for loop in loops:
            with sgtarget(spec, loop) as sg_side:
                for n in range(args.rounds):
                    t0 = time.monotonic()
                    for test in tests:
                        for side in (sg_side, tgt_side):
                            key = (kind, loop, side.label, test.key)
                            run_test(test, side, args, results.setdefault(key, Result()))
                    took = time.monotonic() - t0
                    print(f"  {kind} {loop} round {n + 1}: {took:.0f} s", flush=True)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}" if x else "-"


def print_kind(
    kind: str,
    *,
    loops: list[str],
    missing: dict[str, str],
    tests: list[Test],
    results: Results,
    loopback: float | None,
    args: argparse.Namespace,
) -> tuple[int, int]:
    """The table of one LUN kind; returns (goals met, goals judged)."""
    met = judged = 0
    rows: list[list[str]] = []
    for test in tests:
        goal = GOALS[kind].get(test.goal)
        for loop in [*loops, *missing]:
            tgt = results.get((kind, loop, "tgt", test.key), Result())
            tgt_cells = [fmt(tgt.best), fmt(tgt.best * test.size / MiB)]
            tgt_cpu = fmt(tgt.cpu / (tgt.moved / GiB), 2) if tgt.moved else "-"
            if loop in missing:
                na = [test.label, loop, missing[loop], "-", *tgt_cells, "-", "-"]
                rows.append([*na, f">={goal}" if goal else "-", "-", "-", tgt_cpu])
                continue
            sg = results.get((kind, loop, "sgtarget", test.key), Result())
            ratio = sg.best / tgt.best if sg.best and tgt.best else 0.0
            per_round = " ".join(
                f"{a / b:.2f}" if a and b else "-"
                for a, b in zip(sg.rounds, tgt.rounds, strict=False)
            )
            verdict = "-"
            if goal is not None and ratio:
                judged += 1
                met += ratio >= goal
                verdict = "PASS" if ratio >= goal else "FAIL"
            row = [
                test.label,
                loop,
                fmt(sg.best),
                fmt(sg.best * test.size / MiB),
                *tgt_cells,
                f"{ratio:.3f}" if ratio else "-",
                per_round or "-",
                f">={goal}" if goal is not None else "-",
                verdict,
                fmt(sg.cpu / (sg.moved / GiB), 2) if sg.moved else "-",
                tgt_cpu,
            ]
            if loopback:
                row.append(f"{sg.best * test.size / MiB / loopback:.0%}" if sg.best else "-")
            rows.append(row)
    headers = ["test", "loop", "sg ops/s", "sg MiB/s", "tgt ops/s", "tgt MiB/s", "sg/tgt"]
    headers += ["per round", "goal", "met", "sg CPU s/GiB", "tgt CPU s/GiB"]
    if loopback:
        headers.append("sg/loopback")
    what = (
        f"{mib(args.size)} sparse file in {args.dir} (tgt rdwr)"
        if kind == "file"
        else f"null (sgtarget null:size={args.size // MiB}M, tgt --bstype null: 1 TiB)"
    )
    if loopback:
        rows = [r if len(r) == len(headers) else [*r, "-"] for r in rows]
    print_table(headers, rows, title=f"{kind} LUN: {what}, best of {args.rounds} rounds")
    return met, judged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds, best counts (2)")
    ap.add_argument("--count-4k", type=int, help="qemu-img 4K requests per run (100000)")
    ap.add_argument("--count-1m", type=int, help="qemu-img 1M requests per run (2048)")
    ap.add_argument("--seconds", type=int, help="iscsi-perf run time in seconds (4)")
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run")
    ap.add_argument("--only", help="tests to run: " + ",".join(t.key for t in TESTS))
    ap.add_argument("--luns", default="file,null", help="LUN kinds: file,null")
    ap.add_argument("--loops", default="uvloop,asyncio", help="sgtarget event loops")
    ap.add_argument("--size", type=parse_size, default=GiB, help="LUN size (1G)")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse LUN file goes")
    args = ap.parse_args()
    quick = args.quick
    args.count_4k = args.count_4k or (8192 if quick else 100_000)
    args.count_1m = args.count_1m or (128 if quick else 2048)
    args.seconds = args.seconds or (1 if quick else 4)
    tests = list(TESTS)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {t.key for t in TESTS}
        if unknown:
            ap.error(f"unknown tests {', '.join(sorted(unknown))}")
        tests = [t for t in TESTS if t.key in wanted]
    kinds = args.luns.split(",")
    loops = args.loops.split(",")
    if set(kinds) - set(KINDS) or set(loops) - set(LOOPS):
        ap.error(f"--luns takes {','.join(KINDS)} and --loops {','.join(LOOPS)}")
    if not 1 <= args.rounds <= 20 or min(args.count_4k, args.count_1m, args.seconds) < 1:
        ap.error("--rounds must be 1..20, counts and --seconds at least 1")
    if args.size < MiB or args.size % MiB:
        ap.error("--size must be a multiple of 1M")
    tools = ["tgtd", "tgtadm", "iscsi-ls"]
    tools += ["qemu-img"] if any(not t.perf for t in tests) else []
    tools += ["iscsi-perf"] if any(t.perf for t in tests) else []
    require(*tools)
    missing: dict[str, str] = {}
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        loops.remove("uvloop")
        missing["uvloop"] = "n/a (uvloop not installed)"
    print(
        f"vs_tgt: {args.rounds} rounds, qemu-img {args.count_4k} x 4K / {args.count_1m} x 1M, "
        f"iscsi-perf {args.seconds} s; {os.cpu_count()} CPUs, load "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        flush=True,
    )
    loopback = loopback_mib_s(1 if quick else IPERF_SECONDS)
    if loopback:
        print(f"iperf3 loopback (127.0.0.1, one stream): {loopback:,.0f} MiB/s", flush=True)
    else:
        print("iperf3 loopback: n/a (iperf3 not installed or failed)", flush=True)
    results: Results = {}
    goals = [0, 0]
    try:
        for kind in kinds:
            run_kind(kind, loops=loops, tests=tests, args=args, results=results)
            met, judged = print_kind(
                kind,
                loops=loops,
                missing=missing,
                tests=tests,
                results=results,
                loopback=loopback,
                args=args,
            )
            goals = [goals[0] + met, goals[1] + judged]
    except BenchError as exc:
        print(f"benchmark error: {exc}", file=sys.stderr)
        return 1
    print(f"\ngoals met: {goals[0]} of {goals[1]} judged (ratios sgtarget/tgt, best rounds)")
    failed = sorted({" ".join(key) for key, r in results.items() if r.error})
    if failed:
        print(f"client failures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
