"""Real initiators against a real target: libiscsi utilities and qemu over iscsi:// URLs."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from .harness import StartTarget, Target, background, describe, require_tool, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


def iscsi_ls_size(nbytes: int, block: int = 512) -> str:
    """What ``iscsi-ls -s`` prints for a LUN of ``nbytes``.

    iscsi-ls multiplies READ CAPACITY(10)'s *last* LBA by the block length and truncates while
    dividing by 1024, so a correct 256 MiB LUN shows as ``255M``.
    """
    size = (nbytes // block - 1) * block
    unit = 0
    while unit < 4 and size > 1024:
        size //= 1024
        unit += 1
    return f"{size}{' KMGT'[unit]}".replace(" ", "")


def qemu_io(url: str, *commands: str, timeout: float = 60) -> str:
    """Run qemu-io commands on ``url``; fail on any pattern mismatch or error."""
    argv = [require_tool("qemu-io"), "-f", "raw", url]
    for command in commands:
        argv += ["-c", command]
    cp = run(argv, timeout=timeout)
    out = cp.stdout + cp.stderr
    assert "Pattern verification failed" not in out, describe(cp)
    assert cp.returncode == 0, describe(cp)
    # qemu-io reports I/O errors per command and may still exit 0.
    done = re.findall(r"^(?:wrote|read) (\d+)/(\d+) bytes", cp.stdout, re.MULTILINE)
    assert len(done) == len(commands), describe(cp)
    assert all(a == b for a, b in done), describe(cp)
    return out


def test_iscsi_ls_lists_target_and_luns(sgtarget: StartTarget) -> None:
    ls = require_tool("iscsi-ls")
    t = sgtarget("--lun", "ram:size=256M", "--lun", "null:size=1G", "--lun", "ram:size=3M")
    cp = run([ls, "-s", f"iscsi://{t.portal}"], timeout=30)
    assert cp.returncode == 0, describe(cp)
    assert re.search(rf"^Target:{re.escape(t.iqn)} Portal:{re.escape(t.portal)}", cp.stdout, re.M)
    luns = re.findall(r"^Lun:(\d+)\s+Type:(\S+) \(Size:(\S+)\)", cp.stdout, re.MULTILINE)
    expected = [
        ("0", "DIRECT_ACCESS", iscsi_ls_size(256 * MiB)),
        ("1", "DIRECT_ACCESS", iscsi_ls_size(1024 * MiB)),
        ("2", "DIRECT_ACCESS", iscsi_ls_size(3 * MiB)),
    ]
    assert luns == expected, describe(cp)


def test_iscsi_inq_standard_inquiry(target: Target) -> None:
    cp = run([require_tool("iscsi-inq"), target.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    fields = dict(line.split(":", 1) for line in cp.stdout.splitlines() if ":" in line)
    assert fields.get("Vendor", "").strip() == "SGTARGET", describe(cp)
    assert fields.get("Peripheral Device Type") == "DIRECT_ACCESS", describe(cp)
    assert fields.get("Peripheral Qualifier") == "CONNECTED", describe(cp)
    assert fields.get("Removable") == "0", describe(cp)


def test_iscsi_inq_supported_vpd_pages(target: Target) -> None:
    cp = run([require_tool("iscsi-inq"), "-e", "1", "-c", "0", target.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    pages = set(re.findall(r"^Page:0x([0-9a-f]{2})", cp.stdout, re.MULTILINE))
    assert {"00", "80", "83"} <= pages, describe(cp)


def test_iscsi_inq_unit_serial_number(sgtarget: StartTarget) -> None:
    inq = require_tool("iscsi-inq")
    t = sgtarget("--lun", "ram:size=8M", "--lun", "ram:size=8M")
    # iscsi-inq parses -c with popt as decimal: 0x80 would silently become page 0.
    serials = []
    for lun in (0, 1):
        cp = run([inq, "-e", "1", "-c", str(0x80), t.url(lun)], timeout=30)
        assert cp.returncode == 0, describe(cp)
        m = re.search(r"^Unit Serial Number:\[(.+)\]$", cp.stdout, re.MULTILINE)
        assert m, describe(cp)
        serial = m.group(1)
        assert serial.isprintable(), describe(cp)
        assert serial.strip() == serial, describe(cp)
        serials.append(serial)
    assert serials[0] != serials[1], "two LUNs report the same unit serial number"


def test_iscsi_inq_device_identification(target: Target) -> None:
    cp = run([require_tool("iscsi-inq"), "-e", "1", "-c", str(0x83), target.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    assert "Page Code:(0x83) DEVICE_IDENTIFICATION" in cp.stdout, describe(cp)
    designators = re.findall(
        r"Association:\(\d\) (\w+)\nDesignator Type:\(\d+\) (\w+)\nDesignator:\[(.*)\]",
        cp.stdout,
    )
    assert ("TARGET_DEVICE", "SCSI_NAME_STRING", target.iqn) in designators, describe(cp)
    # A logical-unit designator is what hosts use to tell LUNs apart (SPC-4 7.8.6).
    assert any(assoc == "LOGICAL_UNIT" for assoc, _, _ in designators), describe(cp)


@pytest.mark.parametrize(
    ("spec", "nbytes"),
    [("ram:size=256M", 256 * MiB), ("null:size=1G", 1024 * MiB), ("ram:size=1536k", 1536 << 10)],
)
def test_iscsi_readcapacity16(sgtarget: StartTarget, spec: str, nbytes: int) -> None:
    t = sgtarget("--lun", spec)
    cp = run([require_tool("iscsi-readcapacity16"), t.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    assert "LOGICAL BLOCK LENGTH IN BYTES:512\n" in cp.stdout, describe(cp)
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{nbytes // 512 - 1}\n" in cp.stdout, describe(cp)
    assert f"Total size:{nbytes}\n" in cp.stdout, describe(cp)


def test_qemu_img_convert_and_compare_64m(sgtarget: StartTarget, tmp_path: Path) -> None:
    img = tmp_path / "random.img"
    img.write_bytes(random.Random(20261101).randbytes(64 * MiB))
    t = sgtarget("--lun", "ram:size=64M")
    qemu_img = require_tool("qemu-img")
    cp = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(img), t.url()], 120)
    assert cp.returncode == 0, describe(cp)
    cp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), t.url()], 120)
    assert cp.returncode == 0, describe(cp)
    assert "Images are identical" in cp.stdout, describe(cp)


def test_file_lun_reads_back_after_the_page_cache_is_dropped(
    sgtarget: StartTarget, tmp_path: Path
) -> None:
    """Cached reads are served on the event loop (RWF_NOWAIT), misses in the thread pool: with
    the LUN file's pages dropped between writing and reading, compare takes the miss path."""
    img = tmp_path / "random.img"
    img.write_bytes(random.Random(20261121).randbytes(32 * MiB))
    lun = tmp_path / "lun.img"
    t = sgtarget("--lun", f"file:{lun},size=32M")
    qemu_img = require_tool("qemu-img")
    cp = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(img), t.url()], 120)
    assert cp.returncode == 0, describe(cp)
    fd = os.open(lun, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped; dirty ones could not
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    cp = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(img), t.url()], 120)
    assert cp.returncode == 0, describe(cp)
    assert "Images are identical" in cp.stdout, describe(cp)


def test_qemu_img_compare_detects_a_difference(sgtarget: StartTarget, tmp_path: Path) -> None:
    # Guards the test above: compare must really read the LUN, not trust it.
    img = tmp_path / "ones.img"
    img.write_bytes(b"\x01" * (4 * MiB))
    t = sgtarget("--lun", "ram:size=4M")
    cp = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(img), t.url()])
    assert cp.returncode == 1, describe(cp)
    assert "Content mismatch at offset 0" in cp.stdout, describe(cp)


def test_qemu_io_odd_offsets_keep_neighbours(target: Target) -> None:
    url = target.url()
    qemu_io(url, "write -P 0x11 0 64k")
    qemu_io(url, "write -P 0x5a 1000 3333")
    qemu_io(
        url,
        "read -P 0x11 0 1000",
        "read -P 0x5a 1000 3333",
        "read -P 0x11 4333 61203",  # up to the 64 KiB end of the background
        "read -P 0 65536 512",  # never written: a ram LUN starts zeroed
    )
    # A write straddling a block boundary from an offset that is not block aligned, then
    # one ending exactly at the end of the LUN.
    qemu_io(url, "write -P 0xa5 511 2", "read -P 0x11 0 511", "read -P 0xa5 511 2")
    qemu_io(url, "read -P 0x11 513 487")
    last = 64 * MiB - 777
    qemu_io(url, f"write -P 0xc3 {last} 777", f"read -P 0xc3 {last} 777")


def test_qemu_io_pattern_mismatch_is_detected(target: Target) -> None:
    # Guards qemu_io(): a wrong pattern must fail, or the tests above prove nothing.
    qemu_io(target.url(), "write -P 0x11 0 4k")
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        qemu_io(target.url(), "read -P 0x22 0 4k")


def test_target_name_override(sgtarget: StartTarget) -> None:
    iqn = "iqn.2026-11.test.example:other-name"
    t = sgtarget("--target", iqn, "--lun", "ram:size=1M")
    assert t.banner[0] == f"sgtarget: serving {iqn}", t.banner
    cp = run([require_tool("iscsi-ls"), f"iscsi://{t.portal}"], timeout=30)
    assert f"Target:{iqn} Portal:{t.portal}" in cp.stdout, describe(cp)
    inq = require_tool("iscsi-inq")
    cp = run([inq, t.url()], timeout=30)
    assert cp.returncode == 0, describe(cp)
    # Logging in to a name the target does not serve must fail, not reach some LUN.
    wrong = t.url().replace(iqn, "iqn.2026-11.org.sgtarget:target0")
    cp = run([inq, wrong], timeout=30)
    assert cp.returncode != 0, describe(cp)
    assert "Vendor:" not in cp.stdout, describe(cp)


def test_concurrent_qemu_io_writers(target: Target) -> None:
    # Four sessions at once, each on its own 1 MiB region at an odd offset, then one reader
    # checks every region and the gaps between them.
    qio = require_tool("qemu-io")
    url = target.url()
    regions = [(i * 3 * MiB + 4095, 0x30 + i) for i in range(4)]
    outputs: list[tuple[int, str]] = []
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                background(
                    [qio, "-f", "raw", url, "-c", f"write -P {pat:#x} {off} 1M"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            for off, pat in regions
        ]
        for p in procs:
            raw, _ = p.communicate(timeout=60)
            outputs.append((p.returncode, raw.decode(errors="replace")))
    for rc, text in outputs:
        assert rc == 0, text
        assert "wrote 1048576/1048576 bytes" in text, text
    checks = [f"read -P {pat:#x} {off} 1M" for off, pat in regions]
    checks += [f"read -P 0 {off + MiB} {2 * MiB}" for off, _ in regions]
    qemu_io(url, "read -P 0 0 4095", *checks)
