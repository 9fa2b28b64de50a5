"""benchmarks/vs_tgt.py: parsing the clients' output (samples from qemu-img 7.2, libiscsi 1.19's
iscsi-perf and iperf3 3.12), the argv it builds, and the goal table. Nothing here is timed."""

from __future__ import annotations

import argparse
import json

from benchmarks.common import MiB, qemu_seconds
from benchmarks.vs_tgt import GOALS, TESTS, client_argv, iperf3_bps, perf_iops

QEMU = (
    "Sending 20000 read requests, 4096 bytes each, 32 in parallel "
    "(starting at offset 0, step size 4096)\nRun completed in 0.251 seconds.\n"
)

PERF = (
    "iscsi-perf version 0.1 - (c) 2014-2015 by Peter Lieven <pl@kamp.de>\n\n"
    "connected to iscsi://127.0.0.1:45395/iqn.2026-11.org.sgtarget:tgt-peer/1\n"
    "capacity is 2147483648 blocks or 1099511627776 byte (1048576 MB)\n"
    "performing SEQUENTIAL READ with 32 parallel requests\n"
    "FIXED transfer size of 8 blocks (4096 byte)\nwill run for 2 seconds.\n\n\n"
    "00:00:01 - lba 836808, iops current 104568 (408 MB/s), iops average 104568 (408 MB/s), "
    "in_flight 32, busy 0        \r"
    "iops average 107498 (419 MB/s)                                                        \n\n"
    "finished.\n"
)


def test_qemu_seconds() -> None:
    assert qemu_seconds(QEMU) == 0.251
    assert qemu_seconds("qemu-img: Could not open 'iscsi://...': Connection refused\n") is None


def test_perf_iops_takes_the_last_average() -> None:
    assert perf_iops(PERF) == 107498
    assert perf_iops(PERF.split("iops average 107498", maxsplit=1)[0]) == 104568
    assert perf_iops("Failed to connect\n") is None


def test_iperf3_bps() -> None:
    end = {
        "sum_sent": {"bytes": 1934622720, "bits_per_second": 15461844614.1, "retransmits": 11},
        "sum_received": {"bytes": 1934622720, "bits_per_second": 15459327208.3},
    }
    assert iperf3_bps(json.dumps({"start": {}, "intervals": [], "end": end})) == 15459327208.3
    refused = {"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}
    assert iperf3_bps(json.dumps(refused)) is None
    assert iperf3_bps("iperf3: error - unable to connect") is None


def test_client_argv() -> None:
    args = argparse.Namespace(count_4k=100, count_1m=10, seconds=3)
    by_key = {t.key: t for t in TESTS}
    url = "iscsi://127.0.0.1:1/iqn.x/0"
    assert client_argv(by_key["4k-write"], url, args) == [
        *("qemu-img", "bench", "-f", "raw", "-t", "none", "-s", "4096", "-d", "32", "-c", "100"),
        *("-w", url),
    ]
    assert client_argv(by_key["1m-read"], url, args)[-5:] == ["-d", "16", "-c", "10", url]
    assert client_argv(by_key["perf-256"], url, args) == [
        *("iscsi-perf", "-m", "32", "-b", "256", "-t", "3", url)
    ]
    assert by_key["perf-256"].size == 128 * 1024
    assert by_key["1m-write"].size == MiB


def test_every_goal_names_a_test() -> None:
    names = {t.goal for t in TESTS}
    for goals in GOALS.values():
        assert set(goals) <= names
