"""Memory budget end to end: a tiny pool forces TASK SET FULL, the initiator's retries finish
the work, and nothing is lost."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from .harness import StartTarget, describe, require_tool, run

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def stats_of(stdout: str) -> dict[str, object]:
    """The ``sgtarget: stats {json}`` line the target prints when it stops."""
    for line in stdout.splitlines():
        if line.startswith("sgtarget: stats "):
            parsed: dict[str, object] = json.loads(line.removeprefix("sgtarget: stats "))
            return parsed
    raise AssertionError(f"no stats line in:\n{stdout}")


def test_tiny_pool_task_set_full_then_retries_keep_every_byte(
    sgtarget: StartTarget, tmp_path: Path
) -> None:
    img = tmp_path / "random.img"
    img.write_bytes(random.Random(3).randbytes(32 * MiB))
    # Four 64 KiB blocks: far less than 16 parallel 1-2 MiB writes with immediate data want.
    t = sgtarget("--lun", "ram:size=64M", "--pool", "256K")
    qemu_img = require_tool("qemu-img")
    cp = run(
        [qemu_img, "convert", "-n", "-m", "16", "-W", "-f", "raw", "-O", "raw", str(img), t.url()],
        180,
    )
    assert cp.returncode == 0, describe(cp)
    # QEMU says so each time it retries a command the target answered with TASK SET FULL.
    assert "TASK_SET_FULL" in cp.stderr, describe(cp)
    cp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), t.url()], 180)
    assert cp.returncode == 0, describe(cp)
    assert "Images are identical" in cp.stdout, describe(cp)
    assert t.stop() == 0
    stats = stats_of(t.stdout())
    assert isinstance(stats["task_set_full"], int)
    assert stats["task_set_full"] > 0
    assert stats["blocks_in_use"] == 0, "pool blocks leaked"
    assert stats["peak_blocks_in_use"] == 4


def test_large_writes_stream_through_a_small_pool(sgtarget: StartTarget, tmp_path: Path) -> None:
    # 8 MiB writes through a 1 MiB pool: R2Ts only for what fits, no TASK SET FULL needed
    # once the unsolicited part fits the reserve.
    t = sgtarget("--lun", "ram:size=64M", "--pool", "1M")
    qemu_io = require_tool("qemu-io")
    cp = run(
        [qemu_io, "-f", "raw", "-c", "write -P 0x3c 0 8M", "-c", "read -P 0x3c 0 8M", t.url()], 120
    )
    assert cp.returncode == 0, describe(cp)
    assert "Pattern verification failed" not in cp.stdout, describe(cp)
    assert t.stop() == 0
    stats = stats_of(t.stdout())
    assert stats["blocks_in_use"] == 0
    peak = stats["peak_blocks_in_use"]
    assert isinstance(peak, int)
    assert peak <= 16
