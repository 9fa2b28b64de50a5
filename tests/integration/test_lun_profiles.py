"""LUN profiles against real clients: readonly=1 (qemu-io, a read-only image file), and
physical_block_size= and unmap= as libiscsi's tools read them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import StartTarget, Target, describe, require_tool, run

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _open_mode(t: Target, path: Path) -> int:
    """O_ACCMODE of the server's descriptor for ``path`` (from /proc/PID/fdinfo)."""
    fds = Path(f"/proc/{t.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) != str(path):
                continue
        except OSError:
            continue
        for line in Path(f"/proc/{t.proc.pid}/fdinfo/{fd.name}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE
    raise AssertionError(f"sgtarget (pid {t.proc.pid}) has no descriptor for {path}")


def test_readonly_lun_refuses_qemu_io_write(sgtarget: StartTarget, tmp_path: Path) -> None:
    qio = require_tool("qemu-io")
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x3c" * MiB)
    t = sgtarget("--lun", f"file:{path},readonly=1", "--lun", "ram:size=16M,readonly=1")
    for lun in (0, 1):
        # QEMU reads the WP bit (MODE SENSE) and refuses to open the LUN for writing.
        cp = run([qio, "-f", "raw", "-c", "write -P 0x5a 0 64k", t.url(lun)], timeout=60)
        assert cp.returncode != 0, describe(cp)
        assert "LUN is write protected" in cp.stderr, describe(cp)
    # Read-only it opens, and reads what the image holds.
    cp = run([qio, "-r", "-f", "raw", "-c", "read -P 0x3c 0 1M", t.url(0)], timeout=60)
    assert cp.returncode == 0, describe(cp)
    assert "read 1048576/1048576 bytes" in cp.stdout, describe(cp)
    assert "Pattern verification failed" not in cp.stdout, describe(cp)
    assert path.read_bytes() == b"\x3c" * MiB


def test_read_only_image_file_is_served(sgtarget: StartTarget, tmp_path: Path) -> None:
    qio = require_tool("qemu-io")
    path = tmp_path / "image.img"
    path.write_bytes(b"\xa5" * (2 * MiB))
    path.chmod(0o444)
    t = sgtarget("--lun", f"file:{path},readonly=1")
    # O_RDONLY (checked directly: as root, mode 0444 would not stop a read-write open).
    assert _open_mode(t, path) == os.O_RDONLY
    assert "read-only" in t.stdout()
    cp = run([qio, "-r", "-f", "raw", "-c", "read -P 0xa5 1M 1M", t.url()], timeout=60)
    assert cp.returncode == 0, describe(cp)
    assert "read 1048576/1048576 bytes" in cp.stdout, describe(cp)
    assert "Pattern verification failed" not in cp.stdout, describe(cp)


def test_readonly_never_creates_a_file(tmp_path: Path) -> None:
    sgtarget_bin = require_tool("sgtarget")
    path = tmp_path / "missing.img"
    cp = run([sgtarget_bin, "serve", "--lun", f"file:{path},size=1M,readonly=1"], timeout=30)
    assert cp.returncode == 2, describe(cp)
    assert cp.stderr.count("\n") == 1, describe(cp)
    assert "readonly=1 never creates it" in cp.stderr, describe(cp)
    assert not path.exists()


def test_physical_block_size_and_unmap_keys_as_libiscsi_sees_them(sgtarget: StartTarget) -> None:
    rc16 = require_tool("iscsi-readcapacity16")
    inq = require_tool("iscsi-inq")
    t = sgtarget(
        "--lun",
        "ram:size=16M,thin=1,physical_block_size=512",
        "--lun",
        "ram:size=16M,thin=1,unmap=0",
    )
    exponents = []
    for lun in (0, 1):
        cp = run([rc16, t.url(lun)], timeout=30)
        assert cp.returncode == 0, describe(cp)
        exponents.append(
            cp.stdout.split("LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:")[1].split()[0]
        )
    assert exponents == ["0", "3"]  # 512-byte physical blocks (LBPPB 1); the 4K default
    lbpu = []
    for lun in (0, 1):
        # iscsi-inq reads the page code as a decimal number: 178 is VPD B2h.
        cp = run([inq, "-e", "1", "-c", "178", t.url(lun)], timeout=30)
        assert cp.returncode == 0, describe(cp)
        lines = cp.stdout.splitlines()
        assert "lbpws:1" in lines, describe(cp)  # WRITE SAME with UNMAP either way
        lbpu.append(next(x for x in lines if x.startswith("lbpu:")))
    assert lbpu == ["lbpu:1", "lbpu:0"]
