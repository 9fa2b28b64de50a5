"""Shared pieces of the benchmarks: tools, ports, targets (sgtarget and tgt), RSS, tables.

Everything here is bounded in time and binds to 127.0.0.1 only; nothing installs anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

MiB = 1024 * 1024
GiB = 1024 * MiB
SG_IQN = "iqn.2026-11.org.sgtarget:target0"
TGT_IQN = "iqn.2026-11.org.sgtarget:tgt-peer"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

#: Tool -> Debian package that provides it.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "tgtd": "tgt",
    "tgtadm": "tgt",
    "iscsi-ls": "libiscsi-bin",
    "iscsi-perf": "libiscsi-bin",
}


class BenchError(Exception):
    """A target or client misbehaved; the message says how."""


def require(*tools: str) -> None:
    """Exit 2 naming the Debian package when a tool is missing (benchmarks install nothing)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({PACKAGES.get(t, t) for t in missing})
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        print(f"install them with: apt-get install {' '.join(pkgs)}", file=sys.stderr)
        if "qemu-img" in missing:
            # iscsi:// URLs need the block driver from qemu-block-extra as well.
            print("  (and qemu-block-extra for iscsi:// URLs)", file=sys.stderr)
        sys.exit(2)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


def proc_status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/PID/status in KiB (0 if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int | None = None) -> int:
    return proc_status_kib(os.getpid() if pid is None else pid, "VmRSS") * 1024


def hwm_bytes(pid: int) -> int:
    return proc_status_kib(pid, "VmHWM") * 1024


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds on a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Stats:
    """The ``sgtarget: stats {json}`` line; missing keys read as 0."""

    raw: dict[str, object] = field(default_factory=dict)

    @classmethod
    def parse(cls, output: str) -> Stats | None:
        for line in output.splitlines():
            if line.startswith("sgtarget: stats "):
                data = json.loads(line[len("sgtarget: stats ") :])
                return cls(data if isinstance(data, dict) else {})
        return None

    def get(self, key: str) -> int:
        value = self.raw.get(key, 0)
        return value if isinstance(value, int) else 0

    @property
    def copies(self) -> dict[str, int]:
        value = self.raw.get("copies", {})
        if not isinstance(value, dict):
            return {}
        return {str(k): v for k, v in value.items() if isinstance(v, int)}


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class SgTarget:
    """A private ``sgtarget serve`` on 127.0.0.1:PORT with one file LUN; stopped with SIGTERM."""

    def __init__(
        self,
        lun_spec: str,
        *,
        pool: str | None = None,
        portals: int = 1,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.ports = [free_port() for _ in range(portals)]
        #: More ``sgtarget serve`` arguments (``--loop asyncio``).
        self.args = list(args)
        self.port = self.ports[0]
        self.lun_spec = lun_spec
        self.pool = pool
        #: The server's environment (default: ours).
        self.env = env
        #: One URL per portal (several portals serve the same LUN: multipath).
        self.urls = [f"iscsi://127.0.0.1:{p}/{SG_IQN}/0" for p in self.ports]
        self.url = self.urls[0]
        self._logdir = tempfile.TemporaryDirectory(prefix="sgtarget-bench-")
        self._out = Path(self._logdir.name) / "stdout"
        self._err = Path(self._logdir.name) / "stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stats: Stats | None = None
        self.name = "sgtarget"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd = [sys.executable, "-m", "sgtarget", "serve"]
        for port in self.ports:
            cmd += ["--portal", f"127.0.0.1:{port}"]
        cmd += ["--lun", self.lun_spec, "--nop-interval", "0"]
        if self.pool:
            cmd += ["--pool", self.pool]
        cmd += self.args
        # Output goes to files, not pipes: nobody reads while it serves, and a full pipe blocks.
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if f"sgtarget: serving {SG_IQN}" in self._out.read_text():
                break
            if self.proc.poll() is not None:
                raise BenchError(f"sgtarget refused to start: {self.stderr().strip()}")
            time.sleep(0.05)
        else:
            self.kill()
            raise BenchError("sgtarget printed no banner within 30 s")
        for port in self.ports:
            if not wait_port(port, deadline):
                self.kill()
                raise BenchError(f"sgtarget is not accepting on port {port}")

    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def stop(self) -> Stats:
        """SIGTERM, expect exit 0 and the stats line."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise BenchError("sgtarget did not stop within 30 s of SIGTERM") from None
        out = self._out.read_text(errors="replace")
        stats = Stats.parse(out)
        if self.proc.returncode != 0 or stats is None:
            raise BenchError(
                f"sgtarget exited {self.proc.returncode} without a clean stats line\n"
                f"stdout:\n{out}\nstderr:\n{self.stderr()}"
            )
        self.stats = stats
        return stats

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> SgTarget:
        try:
            self.start()
        except BaseException:
            self._logdir.cleanup()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if et is None and self.stats is None:
                self.stop()
        finally:
            self.kill()
            self._logdir.cleanup()


def _free_control_port() -> int:
    # -C only names tgtd's management socket /var/run/tgtd/socket.N (N <= 32767); pick an unused N.
    for _ in range(1000):
        n = 1024 + free_port() % 31000
        if not Path(f"/var/run/tgtd/socket.{n}").exists():
            return n
    raise BenchError("no free tgtd control port")


class TgtTarget:
    """A private tgtd (foreground, own iSCSI and control port) with the file as LUN 1."""

    def __init__(
        self,
        path: Path,
        *,
        bstype: str | None = None,
        params: str | None = None,
        portals: int = 1,
    ) -> None:
        self.ports = [free_port() for _ in range(portals)]
        self.port = self.ports[0]
        self.control = _free_control_port()
        self.path = path
        self.bstype = bstype
        #: tgtadm logical-unit parameters, e.g. "readonly=1" or "thin_provisioning=1".
        self.params = params
        self.urls = [f"iscsi://127.0.0.1:{p}/{TGT_IQN}/1" for p in self.ports]
        self.url = self.urls[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tgtd-bench-", suffix=".log")  # noqa: SIM115
        self.name = "tgt"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def adm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tgtadm", "-C", str(self.control), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def _adm_ok(self, *args: str) -> None:
        r = self.adm(*args)
        if r.returncode != 0:
            raise BenchError(f"tgtadm {' '.join(args)} failed: {r.stderr.strip()}")

    def start(self) -> None:
        cmd = ["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{self.port}", "-C", str(self.control)]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while self.adm("--op", "show", "--mode", "target").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"tgtd did not come up: {self.log()}")
            time.sleep(0.1)
        self._adm_ok(
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN
        )
        lun = ["--lld", "iscsi", "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1"]
        lun += ["-b", str(self.path)]
        if self.bstype:
            lun += ["--bstype", self.bstype]
        self._adm_ok(*lun)
        if self.params:
            lun_id = ["--tid", "1", "--lun", "1", "--params", self.params]
            self._adm_ok("--lld", "iscsi", "--op", "update", "--mode", "logicalunit", *lun_id)
        for port in self.ports[1:]:
            self._adm_ok(
                "--lld", "iscsi", "--op", "new", "--mode", "portal",
                "--param", f"portal=127.0.0.1:{port}",
            )  # fmt: skip
        self._adm_ok(
            "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"
        )
        for port in self.ports:
            if not wait_port(port, deadline):
                self.kill()
                raise BenchError(f"tgtd is not accepting connections on port {port}")
        ls = subprocess.run(
            ["iscsi-ls", "-s", f"iscsi://127.0.0.1:{self.port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if TGT_IQN not in ls.stdout or "Lun:1" not in ls.stdout:
            self.kill()
            raise BenchError(f"iscsi-ls does not see tgt's LUN 1:\n{ls.stdout}{ls.stderr}")

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # tgtd ignores SIGTERM: ask it to go, then make sure.
        self.adm("--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force")
        self.adm("--op", "delete", "--mode", "system")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            self.proc.wait(STOP_TIMEOUT)
        for suffix in ("", ".lock"):
            with contextlib.suppress(OSError):
                Path(f"/var/run/tgtd/socket.{self.control}{suffix}").unlink()

    def __enter__(self) -> TgtTarget:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill()
        finally:
            self._log.close()


@contextlib.contextmanager
def sparse_file(directory: str, size: int, name: str = "lun.img") -> Iterator[Path]:
    """A sparse file of ``size`` bytes in a fresh directory under ``directory``, removed after."""
    with tempfile.TemporaryDirectory(prefix="sgtarget-bench-", dir=directory) as d:
        path = Path(d) / name
        with path.open("wb") as f:
            f.truncate(size)
        yield path


@dataclass
class Client:
    """A client process with a time limit; output captured."""

    argv: list[str]
    proc: subprocess.Popen[str] | None = None
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait(self, deadline: float) -> None:
        assert self.proc is not None
        try:
            self.stdout, self.stderr = self.proc.communicate(
                timeout=max(deadline - time.monotonic(), 0.1)
            )
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
            self.stderr += "\n(benchmark: killed at the time limit)"
        self.returncode = self.proc.returncode

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def report(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
            f"stdout:\n{self.stdout.strip()}\nstderr:\n{self.stderr.strip()}"
        )


def run_clients(argvs: Sequence[list[str]], timeout: float) -> tuple[list[Client], float]:
    """Start all clients at once, wait for all (bounded); returns them and the wall time."""
    clients = [Client(list(a)) for a in argvs]
    t0 = time.monotonic()
    for c in clients:
        c.start()
    deadline = t0 + timeout
    for c in clients:
        c.wait(deadline)
    return clients, time.monotonic() - t0


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    for n, row in enumerate(cells):
        line = "  ".join(
            c.rjust(w) if n and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


_TICK = os.sysconf("SC_CLK_TCK")
_QEMU_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")
QEMU_TIMEOUT = 600.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/PID/task/TID/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants (handler processes)."""
    total = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def prefill(path: Path, length: int) -> None:
    """Write the range the runs touch once, so no run pays for the file system allocating
    blocks (the first run on a sparse file would) and every run overwrites cached pages."""
    chunk = b"\xa5" * MiB
    with path.open("r+b") as f:
        for _ in range(length // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def qemu_bench_argv(url: str, size: int, depth: int, count: int, *, write: bool) -> list[str]:
    """``qemu-img bench`` of ``count`` requests of ``size`` bytes at queue depth ``depth``."""
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-s", str(size)]
    argv += ["-d", str(depth), "-c", str(count)]
    return [*argv, "-w", url] if write else [*argv, url]


def qemu_seconds(output: str) -> float | None:
    """``qemu-img bench``'s own timing ("Run completed in 2.345 seconds.")."""
    m = _QEMU_DONE.search(output)
    return float(m.group(1)) if m else None


def qemu_bench(
    url: str, size: int, depth: int, count: int, *, write: bool, timeout: float = QEMU_TIMEOUT
) -> tuple[float, Client]:
    """Run ``qemu-img bench``: its own timing (which excludes process start and login, else
    the wall time) and the client."""
    (client,), wall = run_clients([qemu_bench_argv(url, size, depth, count, write=write)], timeout)
    seconds = qemu_seconds(client.stdout)
    return (wall if seconds is None else seconds), client
