"""EXTENDED COPY between LUNs of one target, driven by real clients.

QEMU's ``qemu-img convert -C`` offloads the copy with EXTENDED COPY (LID1) when source and
destination are iSCSI LUNs, and fails rather than falling back to reads and writes: a good
exit means the target copied the data itself. iscsi-test-cu's suites run on a file LUN here
(the SUITES list covers a RAM LUN), with LUN 1 beside it so LUN numbering is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import StartTarget, describe, require_tool, run
from .test_iscsi_test_cu import _run_suite

pytestmark = pytest.mark.integration


def test_qemu_img_copy_offload_between_luns(sgtarget: StartTarget, tmp_path: Path) -> None:
    qemu_io, qemu_img = require_tool("qemu-io"), require_tool("qemu-img")
    t = sgtarget("--lun", f"file:{tmp_path / 'a.img'},size=64M", "--lun", "ram:size=64M")
    src, dst = t.url(0), t.url(1)
    cp = run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0xa5 9M 3M", src])
    assert cp.returncode == 0, describe(cp)
    cp = run([qemu_img, "convert", "-C", "-n", "-f", "raw", "-O", "raw", src, dst], timeout=120)
    assert cp.returncode == 0, describe(cp)
    cp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", src, dst])
    assert cp.returncode == 0, describe(cp)
    cp = run([qemu_io, "-f", "raw", "-c", "read -P 0xa5 9M 3M", "-c", "read -P 0 12M 1M", dst])
    assert cp.returncode == 0, describe(cp)
    assert "verification failed" not in cp.stdout, describe(cp)
    t.assert_clean_stop()


@pytest.mark.parametrize("suite", ["SCSI.ExtendedCopy", "SCSI.ReceiveCopyResults"])
def test_iscsi_test_cu_on_a_file_lun(sgtarget: StartTarget, tmp_path: Path, suite: str) -> None:
    tool = require_tool("iscsi-test-cu")
    t = sgtarget("--lun", "ram:size=16M", "--lun", f"file:{tmp_path / 'b.img'},size=128M")
    _run_suite(tool, t.url(1), tmp_path, suite)
    text = (tmp_path / f"iscsi-test-cu-{suite}.log").read_text(errors="replace")
    assert "[SKIPPED]" not in text, text
