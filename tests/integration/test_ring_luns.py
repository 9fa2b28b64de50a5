"""LUNs served by handler processes behind rings (``handler=copy|zerocopy|isolated``), driven
by real initiators: byte-identical 64 MiB round trips, libiscsi's Read*/Write* suites, and a
handler SIGKILLed under a qemu-img write load."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness import StartTarget, Target, background, describe, require_tool, run
from .test_iscsi_test_cu import _run_suite

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
MODES = ["copy", "zerocopy", "isolated"]
READ_WRITE_SUITES = [
    "SCSI.Read6",
    "SCSI.Read10",
    "SCSI.Read12",
    "SCSI.Read16",
    "SCSI.ReadCapacity16",
    "SCSI.Write10",
    "SCSI.Write12",
    "SCSI.Write16",
    "SCSI.WriteVerify10",
    "SCSI.WriteVerify12",
    "SCSI.WriteVerify16",
    "SCSI.WriteSame10",
    "SCSI.WriteSame16",
    "SCSI.WriteAtomic16",
    "SCSI.CompareAndWrite",
]


def worker_pids(image: Path) -> list[int]:
    """Handler processes serving ``image``, found by their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sgtarget.ring.worker" in argv and f"path={image}".encode() in argv:
            pids.append(int(entry))
    return pids


def wait_workers(
    image: Path, n: int, exclude: set[int] | None = None, timeout: float = 10
) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in worker_pids(image) if p not in (exclude or set())]
        if len(pids) >= n:
            return pids
        assert time.monotonic() < deadline, f"no handler process for {image} after {timeout} s"
        time.sleep(0.05)


def compare(t: Target, img: Path) -> None:
    cp = run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(img), t.url()], 180
    )
    assert cp.returncode == 0, describe(cp)
    assert "Images are identical" in cp.stdout, describe(cp)


@pytest.mark.parametrize("mode", MODES)
def test_64m_round_trip(sgtarget: StartTarget, tmp_path: Path, mode: str) -> None:
    img = tmp_path / "random.img"
    img.write_bytes(random.Random(5).randbytes(64 * MiB))
    lun = tmp_path / "lun.img"
    t = sgtarget("--lun", f"file:{lun},size=64M,handler={mode}")
    assert f"handler={mode}" in "\n".join(t.banner)
    cp = run(
        [require_tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(img), t.url()],
        180,
    )
    assert cp.returncode == 0, describe(cp)
    compare(t, img)
    t.assert_clean_stop()
    assert lun.read_bytes() == img.read_bytes()  # in the file, not just in a handler
    assert worker_pids(lun) == []  # the handler processes went with the target
    stats = [line for line in t.stdout().splitlines() if line.startswith("sgtarget: stats")]
    assert stats, t.stdout()
    if mode == "zerocopy":
        assert '"ring-copy' not in stats[0], stats[0]
        assert '"window-map' not in stats[0], stats[0]
    elif mode == "copy":
        assert '"ring-copy/in": 67108864' in stats[0], stats[0]
    else:
        assert '"window-map/in"' in stats[0], stats[0]


@pytest.mark.parametrize("suite", READ_WRITE_SUITES)
def test_iscsi_test_cu_zerocopy(sgtarget: StartTarget, tmp_path: Path, suite: str) -> None:
    tool = require_tool("iscsi-test-cu")
    t = sgtarget("--lun", f"file:{tmp_path / 'lun.img'},size=64M,handler=zerocopy")
    _run_suite(tool, t.url(), tmp_path, suite)


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_handler_under_write_load(sgtarget: StartTarget, tmp_path: Path, mode: str) -> None:
    """The handler dies mid-load: BUSY is retried by QEMU, the handler is back within
    seconds, and the image reads back identical (no acknowledged write lost)."""
    qemu_img = require_tool("qemu-img")
    size = 256 * MiB
    img = tmp_path / "random.img"
    rng = random.Random(7)
    with img.open("wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(rng.randbytes(64 * MiB))
    lun = tmp_path / "lun.img"
    t = sgtarget("--lun", f"file:{lun},size=256M,handler={mode},handlers=2")
    first = wait_workers(lun, 2)
    argv = [qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(img), t.url()]
    with background(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 30
        while os.stat(lun).st_blocks * 512 < size // 8:  # a good part of the load is running
            assert proc.poll() is None, "the load ended before the kill"
            assert time.monotonic() < deadline, "the load does not start"
            time.sleep(0.01)
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        back = wait_workers(lun, 2, exclude={victim})
        assert time.monotonic() - t0 < 5
        assert victim not in back
        killed_during_load = proc.poll() is None
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"qemu-img convert failed: {err!r}"
    assert killed_during_load
    compare(t, img)
    assert f"handler process {victim} died" in t.stderr()
    t.assert_clean_stop()
    assert lun.read_bytes() == img.read_bytes()


#: Thin provisioning through the ring: UNMAP / WRITE SAME with UNMAP become WRITE SAME(16)
#: UNMAP+NDOB to the handler (a punched hole), GET LBA STATUS goes to it too.
THIN_SUITES = [
    "SCSI.Unmap",
    "SCSI.WriteSame16",
    "SCSI.GetLBAStatus.Simple,SCSI.GetLBAStatus.BeyondEol",
]


@pytest.mark.parametrize("suite", THIN_SUITES)
@pytest.mark.parametrize("mode", ["zerocopy", "isolated"])
def test_iscsi_test_cu_thin(sgtarget: StartTarget, tmp_path: Path, suite: str, mode: str) -> None:
    tool = require_tool("iscsi-test-cu")
    t = sgtarget("--lun", f"file:{tmp_path / 'thin.img'},size=64M,thin=1,handler={mode}")
    _run_suite(tool, t.url(), tmp_path, suite)
