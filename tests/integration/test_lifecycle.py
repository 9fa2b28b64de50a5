"""Process lifecycle: persistence across restarts, the default LUN, shutdown, CLI errors."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import (
    DEFAULT_PORT,
    StartTarget,
    Target,
    background,
    describe,
    free_port,
    port_is_free,
    require_tool,
    run,
)
from .test_clients import qemu_io

pytestmark = pytest.mark.integration

MiB = 1 << 20
GiB = 1 << 30


def assert_sparse(path: Path, size: int) -> None:
    st = path.stat()
    assert st.st_size == size, f"{path} is {st.st_size} bytes, expected {size}"
    allocated = st.st_blocks * 512
    assert allocated < 16 * MiB, f"{path} is not sparse: {allocated} bytes allocated"


def test_file_lun_persists_across_restart(sgtarget: StartTarget, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    spec = f"file:{disk},size=64M"
    first = sgtarget("--lun", spec)
    assert disk.stat().st_size == 64 * MiB
    qemu_io(first.url(), "write -P 0x11 0 1M", "write -P 0x7e 12345 6789")
    qemu_io(first.url(), f"write -P 0x3c {64 * MiB - 4096} 4096")
    first.assert_clean_stop()

    second = sgtarget("--lun", spec)
    qemu_io(
        second.url(),
        "read -P 0x11 0 12345",
        "read -P 0x7e 12345 6789",
        f"read -P 0x11 {12345 + 6789} {MiB - 12345 - 6789}",
        f"read -P 0x3c {64 * MiB - 4096} 4096",
    )
    assert disk.stat().st_size == 64 * MiB, "restart changed the file's size"


def test_default_lun_in_data_dir(sgtarget: StartTarget, tmp_path: Path) -> None:
    data = tmp_path / "data"  # does not exist yet: serve creates it
    first = sgtarget("--data-dir", str(data))
    lun0 = data / "lun0.img"
    assert_sparse(lun0, GiB)
    assert f"  data directory {data}" in first.banner, first.banner
    cp = run([require_tool("iscsi-readcapacity16"), first.url()], timeout=30)
    assert f"Total size:{GiB}\n" in cp.stdout, describe(cp)
    qemu_io(first.url(), f"write -P 0x42 {GiB // 2 + 3} 5000")
    first.assert_clean_stop()

    second = sgtarget("--data-dir", str(data))
    qemu_io(second.url(), f"read -P 0x42 {GiB // 2 + 3} 5000", f"read -P 0 {GiB // 2 - 512} 515")
    assert_sparse(lun0, GiB)


def test_zero_argument_serve(sgtarget: StartTarget, tmp_path: Path) -> None:
    # `sgtarget serve` with no arguments listens on 127.0.0.1:3260, which a dev machine may
    # already use (another target); only the data directory comes from the environment.
    if not port_is_free("127.0.0.1", DEFAULT_PORT):
        pytest.skip(f"127.0.0.1:{DEFAULT_PORT} is in use; the zero-argument form needs it")
    data = tmp_path / "env-data"
    env = {**os.environ, "SGTARGET_DATA_DIR": str(data)}
    t = sgtarget(port=DEFAULT_PORT, portal=False, nop_interval=None, env=env, bare=True)
    assert t.banner[0] == f"sgtarget: serving {t.iqn}", t.banner
    assert f"  portal 127.0.0.1:{DEFAULT_PORT}" in t.banner, t.banner
    assert_sparse(data / "lun0.img", GiB)
    qemu_io(t.url(), "write -P 0x99 4097 100")
    t.assert_clean_stop()

    again = sgtarget(port=DEFAULT_PORT, portal=False, nop_interval=None, env=env, bare=True)
    qemu_io(again.url(), "read -P 0x99 4097 100", "read -P 0 0 4097")


def read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """Read a pipe until ``marker`` shows up (qemu-io's prompt has no newline)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {seen!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"pipe closed before {marker!r}; got {seen!r}")
        seen += chunk
    return seen


def assert_stops_quickly(t: Target, within: float) -> None:
    start = time.monotonic()
    t.assert_clean_stop(timeout=within)
    elapsed = time.monotonic() - start
    assert elapsed < within, f"shutdown took {elapsed:.1f}s"


def test_sigterm_with_idle_qemu_io_session(target: Target) -> None:
    argv = [require_tool("qemu-io"), "-f", "raw", target.url()]
    with background(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as qio:
        assert qio.stdin is not None
        assert qio.stdout is not None
        # One round trip proves the session is logged in before the signal.
        qio.stdin.write(b"read -P 0 0 512\n")
        qio.stdin.flush()
        read_until(qio.stdout.fileno(), b"read 512/512 bytes", timeout=30)
        assert_stops_quickly(target, within=5.0)


def test_sigterm_during_iscsi_perf(target: Target) -> None:
    argv = [require_tool("iscsi-perf"), "-m", "16", "-b", "16", target.url()]
    with background(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as perf:
        assert perf.stdout is not None
        # iscsi-perf prints a progress line per second once I/O is flowing.
        read_until(perf.stdout.fileno(), b"iops current", timeout=30)
        assert_stops_quickly(target, within=5.0)


def test_sigint_stops_cleanly(target: Target) -> None:
    qemu_io(target.url(), "write -P 1 0 4k")
    target.proc.send_signal(2)  # SIGINT, as from Ctrl-C
    assert target.proc.wait(timeout=10) == 0, target.stderr()
    assert "sgtarget: stopped" in target.stdout()
    assert "Traceback" not in target.stderr(), target.stderr()


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_event_loop_choice(sgtarget: StartTarget, loop: str) -> None:
    t = sgtarget("--loop", loop, "--lun", "ram:size=16M")
    qemu_io(t.url(), "write -P 7 0 4k", "read -P 7 0 4k")
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        expect = "asyncio"
    else:
        expect = "uvloop" if loop == "auto" else "asyncio"
    assert f"event loop: {expect}" in t.stdout()
    t.assert_clean_stop()


@pytest.mark.parametrize(
    "args",
    [
        ["--loop", "trio"],
        ["--lun", "bogus:x"],
        ["--portal", "nonsense:99999"],
        ["--lun", "ram:size=1G,colour=red"],
        ["--lun", "ram:size=0"],
        ["--lun", "null:size=513"],
        ["--lun", "file:/nonexistent-dir/disk.img,size=1M"],
        ["--target", "not-an-iqn"],
        ["--pool", "lots"],
        ["--bogus-option"],
        # The help says "0 disables"; a negative interval is as meaningless as a bad size.
        ["--nop-interval", "-1"],
    ],
    ids=" ".join,
)
def test_cli_error_exits_2_with_one_line(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "SGTARGET_DATA_DIR": str(tmp_path / "data")}
    # A free portal, so a wrongly accepted command line serves instead of failing to bind.
    portal = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "sgtarget", "serve", "--portal", portal, *args]
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=5, env=env, check=False, cwd=tmp_path
        )
    except subprocess.TimeoutExpired as exc:
        # run() killed it; it was serving, i.e. it accepted the bad argument.
        pytest.fail(f"{args!r} was accepted: sgtarget kept serving\n{exc.stdout!r}")
    assert cp.returncode == 2, describe(cp)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, describe(cp)
    assert lines[0].startswith("sgtarget: error: "), describe(cp)
    assert cp.stdout == "", describe(cp)
