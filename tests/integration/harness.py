"""Helpers for the integration tests: run ``sgtarget serve`` and the Debian initiator tools."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

DEFAULT_IQN = "iqn.2026-11.org.sgtarget:target0"
DEFAULT_PORT = 3260
BANNER_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# Tool -> Debian package that ships it, so a skip reason says what to install.
TOOL_PACKAGES = {
    "iscsi-ls": "libiscsi-bin",
    "iscsi-inq": "libiscsi-bin",
    "iscsi-readcapacity16": "libiscsi-bin",
    "iscsi-test-cu": "libiscsi-bin",
    "iscsi-perf": "libiscsi-bin",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
}


def require_tool(name: str) -> str:
    """Path of ``name``, or skip the test naming the Debian package that provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH (Debian package {TOOL_PACKAGES.get(name, '?')})")
    if name.startswith("qemu-") and not glob.glob("/usr/lib/*/qemu/block-iscsi.so"):
        # qemu-utils alone has no iscsi:// driver; it is a loadable module.
        pytest.skip("qemu block-iscsi.so module not found (Debian package qemu-block-extra)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the target binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a client tool, bounded in time, capturing text output."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def describe(cp: subprocess.CompletedProcess[str]) -> str:
    """Failure context for a finished client run."""
    return f"{cp.args!r} exited {cp.returncode}\n--- stdout\n{cp.stdout}\n--- stderr\n{cp.stderr}"


@dataclass
class Target:
    """A running ``sgtarget serve`` process."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    iqn: str
    stdout_path: Path
    stderr_path: Path
    banner: list[str] = field(default_factory=list)

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, lun: int = 0) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/{lun}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; kill (and fail) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            pytest.fail(
                f"sgtarget did not exit within {timeout}s of SIGTERM\n--- stderr\n{self.stderr()}"
            )

    def assert_clean_stop(self, timeout: float = STOP_TIMEOUT) -> None:
        rc = self.stop(timeout)
        context = f"--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}"
        assert rc == 0, f"sgtarget exited {rc} after SIGTERM\n{context}"
        assert "sgtarget: stopped" in self.stdout(), context
        assert "Traceback" not in self.stderr(), context


class StartTarget(Protocol):
    """The ``sgtarget`` fixture: start a target with these ``serve`` arguments."""

    def __call__(
        self,
        *args: str,
        port: int | None = None,
        portal: bool = True,
        nop_interval: float | None = 0,
        env: dict[str, str] | None = None,
        bare: bool = False,
    ) -> Target: ...


def start_target(
    workdir: Path,
    args: Sequence[str] = ("--lun", "ram:size=64M"),
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    portal: bool = True,
    nop_interval: float | None = 0,
    env: dict[str, str] | None = None,
) -> Target:
    """Start ``sgtarget serve`` and wait for its banner.

    ``portal=False`` leaves ``--portal`` out (to test the default); ``nop_interval=None``
    leaves ``--nop-interval`` out. Without ``env``, ``$SGTARGET_DATA_DIR`` points into
    ``workdir`` so that a default LUN never lands in the user's home.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    args = list(args)
    iqn = args[args.index("--target") + 1] if "--target" in args else DEFAULT_IQN
    port = free_port(host) if port is None else port
    argv = [sys.executable, "-m", "sgtarget", "serve"]
    if portal:
        argv += ["--portal", f"{host}:{port}"]
    if nop_interval is not None:
        argv += ["--nop-interval", str(nop_interval)]
    argv += list(args)
    if env is None:
        env = {**os.environ, "SGTARGET_DATA_DIR": str(workdir / "data")}
    n = len(list(workdir.glob("target*.stdout")))
    out_path = workdir / f"target{n}.stdout"
    err_path = workdir / f"target{n}.stderr"
    # Files, not pipes: nobody has to drain them while the target runs.
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=workdir
        )
    target = Target(proc, host, port, iqn, out_path, err_path)
    deadline = time.monotonic() + BANNER_TIMEOUT
    while True:
        lines = target.stdout().splitlines()
        if (
            lines
            and lines[0].startswith("sgtarget: serving")
            and any(line.startswith("  portal ") for line in lines)
        ):
            target.banner = lines
            return target
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            pytest.fail(
                f"sgtarget {argv!r} gave no banner (exit {proc.returncode})\n"
                f"--- stdout\n{target.stdout()}\n--- stderr\n{target.stderr()}"
            )
        time.sleep(0.05)


@contextlib.contextmanager
def background(argv: Sequence[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A client process that is always reaped, even when the test fails."""
    proc = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
