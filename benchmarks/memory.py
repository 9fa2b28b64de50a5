"""What command state costs: every window slot of 1x128 and 16x1024 sessions holding a command.

In-process, sans-I/O: each session is a ``Connection`` fed PDU bytes directly (no sockets). After
login (MaxBurstLength 8 MiB, InitialR2T=Yes, ImmediateData=No, so no payload is allocated) the
session receives 8 MiB READ(10) commands until its window is full; the CommandReady events are
kept and not executed. Each scenario runs in a child process, measured twice: once under
tracemalloc (bytes) and once without it (RSS delta, which tracing would inflate).

    python -m benchmarks.memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass

from benchmarks.common import MiB, print_table, rss_bytes
from sgtarget.datapath import DEFAULT_POOL_SIZE, Pool
from sgtarget.iscsi import pdu
from sgtarget.iscsi.connection import CommandReady, Connection, Event, LoginComplete
from sgtarget.iscsi.keys import TargetLimits, encode_text, parse_text
from sgtarget.iscsi.session import SessionTable, TargetDirectory, TargetInfo

TARGET = "iqn.2026-11.org.sgtarget:target0"
INITIATOR = "iqn.2026-11.org.example:bench"
BURST = 8 * MiB
BLOCKS = BURST // 512  # READ(10) transfer length for 8 MiB of 512-byte blocks

LOGIN_KEYS = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxBurstLength", str(BURST)),
    ("FirstBurstLength", "262144"),
    ("InitialR2T", "Yes"),
    ("ImmediateData", "No"),
    ("MaxRecvDataSegmentLength", "262144"),
]


@dataclass(frozen=True)
class Scenario:
    name: str
    sessions: int
    window: int
    goal: int


SCENARIOS = {
    "1x128": Scenario("1x128", 1, 128, 1 * MiB),
    "16x1024": Scenario("16x1024", 16, 1024, 8 * MiB),
}
#: vhost-scsi after its memory patches, for comparison (from the issue).
KERNEL = {"1x128": 8.2e6, "16x1024": 77.1e6}


def _bhs(opcode: int, b1: int, *, dsl: int, itt: int, words: tuple[int, ...]) -> bytes:
    w = list(words) + [0] * (7 - len(words))
    return struct.pack(">BBBBB3sQI7I", opcode, b1, 0, 0, 0, dsl.to_bytes(3, "big"), 0, itt, *w)


def login_pdu(isid: bytes) -> bytes:
    pairs = [("InitiatorName", INITIATOR), ("SessionType", "Normal"), ("TargetName", TARGET)]
    data = encode_text(pairs + LOGIN_KEYS)
    # Immediate Login, T=1, CSG=operational, NSG=full feature.
    bhs = bytearray(_bhs(0x43, 0x80 | (1 << 2) | 3, dsl=len(data), itt=1, words=(0, 1, 0)))
    bhs[8:14] = isid
    return bytes(bhs) + data + pdu.pad_for(len(data))


def read10_pdu(itt: int, cmdsn: int, lba: int) -> bytes:
    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, BLOCKS, 0).ljust(16, b"\x00")
    # F=1, R=1, ATTR=simple; EDTL, CmdSN, ExpStatSN, CDB.
    words = (BURST, cmdsn, 0, *struct.unpack(">4I", cdb))
    return _bhs(0x01, 0x80 | 0x40 | 0x01, dsl=0, itt=itt, words=words)


def drain(conn: Connection) -> list[Event]:
    evs = []
    while (ev := conn.next_event()) is not None:
        evs.append(ev)
    return evs


def login(conn: Connection, isid: bytes) -> None:
    conn.receive_data(login_pdu(isid))
    bufs, release = conn.take_output()
    raw = b"".join(bytes(b) for b in bufs)
    for sg in release:
        sg.release()
    hdr = pdu.Header(raw[: pdu.BHS_LEN])
    status = hdr.w9 >> 16
    if status:
        raise SystemExit(f"login refused: status {status:#06x}")
    keys = dict(parse_text(raw[pdu.BHS_LEN : pdu.BHS_LEN + hdr.data_len]))
    if keys.get("MaxBurstLength") != str(BURST):
        raise SystemExit(f"MaxBurstLength negotiated to {keys.get('MaxBurstLength')}, not 8 MiB")
    if not any(isinstance(e, LoginComplete) for e in drain(conn)):
        raise SystemExit("no LoginComplete event after the login response")


def measure(sc: Scenario, *, trace: bool) -> dict[str, int | str]:
    # The pool (payload memory, budgeted on its own) exists before the measurement starts.
    pool = Pool(DEFAULT_POOL_SIZE)
    targets = TargetDirectory([TargetInfo(TARGET, portals=("127.0.0.1:3260",))])
    table = SessionTable()
    limits = TargetLimits(max_burst_length=BURST)
    conns = []
    note = "sessions, their preallocated command slots and every in-flight command counted"
    held: list[Event] = []
    gc.collect()
    blocks0 = pool.stats.blocks_in_use
    # Measured from before the logins: the preallocated slots are command state too.
    if trace:
        tracemalloc.start()
    base_traced = tracemalloc.get_traced_memory()[0] if trace else 0
    base_rss = rss_bytes()
    for i in range(sc.sessions):
        conn = Connection(
            pool=pool,
            targets=targets,
            sessions=table,
            limits=limits,
            nop_interval=None,
            queue_depth=sc.window,
        )
        login(conn, bytes([0x80, 0, 0, 0, i >> 8, i & 0xFF]))
        assert conn.session is not None
        assert conn.session.queue_depth == sc.window
        conns.append(conn)
    for conn in conns:
        sess = conn.session
        assert sess is not None
        cmdsn = sess.exp_cmdsn
        # Bounded: one command per slot; stop early if the target closes the window.
        for n in range(sc.window):
            if not sess.in_window(cmdsn):
                break
            conn.receive_data(read10_pdu(0x1000 + n, cmdsn, n * BLOCKS))
            cmdsn = (cmdsn + 1) & 0xFFFFFFFF
            held.extend(drain(conn))
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - base_traced if trace else 0
    top = ""
    if trace:
        # Where the bytes went, so a FAIL points at the structure to slim down.
        stats = tracemalloc.take_snapshot().statistics("lineno")[:6]
        per = max(len(held), 1)
        top = "\n".join(
            f"    {s.size / per:7.0f} B/cmd  "
            f"{s.traceback[0].filename.split('/src/')[-1]}:{s.traceback[0].lineno}"
            for s in stats
        )
    rss = rss_bytes() - base_rss
    if trace:
        tracemalloc.stop()
    ready = sum(isinstance(e, CommandReady) for e in held)
    in_flight = sum(c.session.in_flight for c in conns if c.session is not None)
    # Pool pages touched by these commands would be payload, not command state.
    pool_bytes = (pool.stats.blocks_in_use - blocks0) * pool.block_size
    return {
        "commands": ready,
        "in_flight": in_flight,
        "traced": traced,
        "rss": rss - pool_bytes,
        "pool_bytes": pool_bytes,
        "note": note,
        "top": top,
    }


def child(name: str, trace: bool) -> dict[str, int | str]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", name]
        + (["--trace"] if trace else []),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if out.returncode != 0:
        raise SystemExit(f"scenario {name} failed:\n{out.stdout}{out.stderr}")
    result: dict[str, int | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--child", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(SCENARIOS[args.child], trace=args.trace)))
        return 0
    rows = []
    notes = set()
    tops = []
    failed = False
    for sc in SCENARIOS.values():
        t = child(sc.name, True)
        r = child(sc.name, False)
        n = int(t["commands"])
        traced, rss = int(t["traced"]), int(r["rss"])
        full = n == sc.sessions * sc.window
        ok = full and traced <= sc.goal and rss <= sc.goal
        failed |= not ok
        tops.append((sc.name, str(t["top"])))
        if t["note"]:
            notes.add(str(t["note"]))
        if int(t["pool_bytes"]) or int(r["pool_bytes"]):
            notes.add(f"{sc.name}: pool blocks were taken ({t['pool_bytes']} B), subtracted")
        rows.append(
            [
                sc.name,
                f"{n}/{sc.sessions * sc.window}",
                f"{traced:,}",
                f"{traced / max(n, 1):,.0f}",
                f"{rss:,}",
                f"<= {sc.goal // MiB} MiB",
                "PASS" if ok else "FAIL",
                f"{KERNEL[sc.name] / 1e6:.1f} MB",
            ]
        )
    print_table(
        [
            "scenario",
            "commands",
            "tracemalloc B",
            "B/command",
            "RSS delta B",
            "goal",
            "result",
            "vhost-scsi",
        ],
        rows,
        title="Command state, every window slot in flight (8 MiB READ(10), MaxBurstLength 8 MiB)",
    )
    for note in sorted(notes):
        print(f"note: {note}")
    for name, top in tops:
        print(f"largest allocation sites, {name} (tracemalloc, per command):\n{top}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
