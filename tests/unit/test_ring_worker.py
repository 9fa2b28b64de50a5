"""ring/worker.py: a real handler process behind a memfd ring, driven by RingTarget.

Each test starts ``python -m sgtarget.ring.worker`` with the contract's command line and
``pass_fds``, plays the target in this process (RingTarget, eventfds, the lifeline pipe), and
kills the child in a ``finally`` whatever happens. Every wait is bounded.
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from sgtarget.backstores.file import FileBackstore
from sgtarget.datapath.dif import generate
from sgtarget.ring.abi import TmrType
from sgtarget.ring.handler import HandlerConfig, load_handler
from sgtarget.ring.shm import Doorbell, SharedMemory
from sgtarget.ring.target import Completion, RingTarget

ROOT = Path(__file__).resolve().parents[2]
BS = 512
IMAGE = 1 << 20
CMDR_SIZE = 64 * 1024 - 8  # not a multiple of 16: the first wrap needs a PAD
DATA_OFF = 128 + CMDR_SIZE
DATA_SIZE = 2 << 20
SLOW = "tests.unit.ring_handlers:SlowFileHandler"
TIMEOUT = 10.0


def cdb16(op: int, lba: int, count: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, byte1, lba, count, 0, 0)


def read16(lba: int, count: int) -> bytes:
    return cdb16(0x88, lba, count)


def write16(lba: int, count: int) -> bytes:
    return cdb16(0x8A, lba, count)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) % 251 for i in range(n))


class Ring:
    """The target's side of one worker: ring, data area, doorbells, lifeline, the process."""

    def __init__(
        self,
        image: Path,
        handler: str,
        params: dict[str, str],
        threads: int,
        extra: Sequence[str] = (),
    ) -> None:
        self.ring_mem = SharedMemory.create("test-ring", DATA_OFF)
        self.data_mem = SharedMemory.create("test-data", DATA_SIZE)
        self.target = RingTarget(self.ring_mem.buf, data_off=DATA_OFF)
        self.kick = Doorbell.create()
        self.done = Doorbell.create()
        life_r, self.life_w = os.pipe()
        argv = [
            sys.executable,
            "-m",
            "sgtarget.ring.worker",
            *("--ring-fd", str(self.ring_mem.fd), "--ring-size", str(DATA_OFF)),
            *("--data-fd", str(self.data_mem.fd), "--data-size", str(DATA_SIZE)),
            *("--data-off", str(DATA_OFF)),
            *("--kick-fd", str(self.kick.fd), "--done-fd", str(self.done.fd)),
            *("--handler", handler),
            *(a for k, v in params.items() for a in ("--param", f"{k}={v}")),
            *("--size", str(IMAGE), "--block-size", str(BS)),
            *("--lifeline-fd", str(life_r), "--threads", str(threads)),
            *extra,
        ]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(self.ring_mem.fd, self.data_mem.fd, self.kick.fd, self.done.fd, life_r),
                stderr=subprocess.PIPE,
                env=env,
                cwd=ROOT,
            )
        finally:
            os.close(life_r)  # only the target holds the write end: EOF when it closes

    @property
    def data(self) -> memoryview:
        return self.data_mem.buf

    def iov(self, offset: int, length: int) -> tuple[int, int]:
        """An iovec of the data area at ``offset`` within it."""
        return (DATA_OFF + offset, length)

    def submit(
        self,
        cdb: bytes,
        iovs: Sequence[tuple[int, int]] = (),
        dif_iovs: Sequence[tuple[int, int]] = (),
    ) -> int:
        cmd_id = self.target.submit(cdb, iovs, dif_iovs=dif_iovs)
        self.kick.ring()
        return cmd_id

    def reap(self, n: int, timeout: float = TIMEOUT) -> list[Completion]:
        """Exactly ``n`` completions, in the order the handler made them."""
        out: list[Completion] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out += self.target.reap()
            if len(out) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(
                    f"{len(out)} of {n} completions; worker rc {self.proc.poll()}: {self.stderr()}"
                )
            self.done.wait(min(left, 0.5))
        assert len(out) == n, out
        return out

    def run(
        self,
        cdb: bytes,
        iovs: Sequence[tuple[int, int]] = (),
        dif_iovs: Sequence[tuple[int, int]] = (),
    ) -> Completion:
        cmd_id = self.submit(cdb, iovs, dif_iovs)
        (c,) = self.reap(1)
        assert c.cmd_id == cmd_id
        return c

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s") from None

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self.life_w >= 0:
            os.close(self.life_w)
            self.life_w = -1
        self.kick.close()
        self.done.close()
        del self.target
        self.ring_mem.close()
        self.data_mem.close()


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB image, locked by this process as the target's own FileBackstore locks it."""
    path = tmp_path / "lun.img"
    owner = FileBackstore(path, IMAGE)
    yield path
    owner.close()


@contextmanager
def worker(
    image: Path,
    handler: str = "file",
    threads: int = 4,
    extra: Sequence[str] = (),
    **params: str,
) -> Iterator[Ring]:
    ring = Ring(image, handler, {"path": str(image), **params}, threads, extra)
    try:
        yield ring
    finally:
        ring.close()


def sense(key: int, asc: int, ascq: int) -> bytes:
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


def test_write_then_read_through_the_worker(image: Path) -> None:
    data = pattern(8192, 3)
    with worker(image) as w:
        w.data[0:4096] = data[:4096]
        w.data[65536 : 65536 + 4096] = data[4096:]
        c = w.run(write16(10, 16), [w.iov(0, 4096), w.iov(65536, 4096)])
        assert (c.status, c.sense, c.unknown_op) == (0, b"", False)
        assert image.read_bytes()[10 * BS : 26 * BS] == data

        w.data[131072 : 131072 + 8192] = bytes(8192)
        c = w.run(read16(10, 16), [w.iov(131072, 3000), w.iov(200000, 5192)])
        assert (c.status, c.read_len) == (0, None)
        assert bytes(w.data[131072 : 131072 + 3000]) + bytes(w.data[200000:205192]) == data
        assert w.run(cdb16(0x91, 0, 0)).status == 0  # SYNCHRONIZE CACHE(16)


def test_unmap_and_get_lba_status_through_the_worker(image: Path) -> None:
    with worker(image) as w:
        w.data[0:65536] = b"\x11" * 65536
        assert w.run(write16(0, 512), [w.iov(0, 65536)] * 4).status == 0
        c = w.run(cdb16(0x93, 128, 128, byte1=0x09))  # WRITE SAME(16) UNMAP NDOB
        assert c.status == 0
        w.data[0:64] = b"\xee" * 64
        c = w.run(struct.pack(">BBQIBB", 0x9E, 0x12, 0, 64, 0, 0), [w.iov(0, 64)])
        assert c.status == 0
        assert c.read_len == 56  # header and the three descriptors 64 bytes hold
        raw = bytes(w.data[0:56])
        assert raw[:8] == (52).to_bytes(4, "big") + bytes(4)
        assert raw[8:24] == (0).to_bytes(8, "big") + (128).to_bytes(4, "big") + bytes(4)
        assert raw[24:40] == (128).to_bytes(8, "big") + (128).to_bytes(4, "big") + b"\1\0\0\0"
        assert raw[40:56] == (256).to_bytes(8, "big") + (256).to_bytes(4, "big") + bytes(4)


def test_errors_and_unknown_commands_complete_with_sense(image: Path) -> None:
    with worker(image) as w:
        c = w.run(read16(IMAGE // BS, 1), [w.iov(0, BS)])
        assert (c.status, c.sense) == (2, sense(5, 0x21, 0))
        c = w.run(bytes([0x12, 0, 0, 0, 36, 0]), [w.iov(0, 36)])  # INQUIRY: not a handler's
        assert c.unknown_op


@pytest.mark.parametrize(
    "iov",
    [
        (DATA_OFF + DATA_SIZE - 100, 4096),  # runs past the data area
        (DATA_OFF + DATA_SIZE + 4096, 512),  # beyond it
        (0, 512),  # the mailbox
        (DATA_OFF - 256, 512),  # the command ring, across into the data area
        ((1 << 64) - 512, 512),
    ],
)
def test_garbage_iov_is_invalid_field_and_the_worker_keeps_serving(
    image: Path, iov: tuple[int, int]
) -> None:
    with worker(image) as w:
        c = w.run(read16(0, 1), [iov])
        assert (c.status, c.sense) == (2, sense(5, 0x24, 0))
        w.data[0:BS] = b"\x42" * BS
        assert w.run(write16(0, 1), [w.iov(0, BS)]).status == 0
        assert image.read_bytes()[:BS] == b"\x42" * BS


def test_completions_come_out_of_order(image: Path, tmp_path: Path) -> None:
    with worker(image, SLOW, threads=4, slow="5", delay="0.6") as w:
        slow = w.submit(read16(5, 1), [w.iov(0, BS)])
        fast = [w.submit(read16(10 + i, 1), [w.iov(BS * (i + 1), BS)]) for i in range(3)]
        done = w.reap(4)
        assert [c.cmd_id for c in done][-1] == slow
        assert {c.cmd_id for c in done[:3]} == set(fast)
        assert all(c.status == 0 for c in done)


def test_one_thread_completes_in_order(image: Path) -> None:
    with worker(image, SLOW, threads=1, slow="5", delay="0.2") as w:
        ids = [w.submit(read16(5, 1), [w.iov(0, BS)])]
        ids += [w.submit(read16(10 + i, 1), [w.iov(BS * (i + 1), BS)]) for i in range(3)]
        assert [c.cmd_id for c in w.reap(4)] == ids


def test_no_threads_runs_blocking_commands_in_the_loop_in_order(image: Path) -> None:
    """--threads 0: the slow read runs first and the others wait for it (no pool)."""
    with worker(image, SLOW, threads=0, slow="5", delay="0.3") as w:
        w.data[0:BS] = b"\x17" * BS
        assert w.run(write16(5, 1), [w.iov(0, BS)]).status == 0  # the slow LBA, written
        start = time.monotonic()
        ids = [w.submit(read16(5, 1), [w.iov(BS, BS)])]
        ids += [w.submit(read16(10 + i, 1), [w.iov(BS * (i + 2), BS)]) for i in range(3)]
        done = w.reap(4)
        assert [c.cmd_id for c in done] == ids
        assert all(c.status == 0 for c in done)
        assert time.monotonic() - start >= 0.25
        assert bytes(w.data[BS : 2 * BS]) == b"\x17" * BS


def test_a_handler_that_is_not_concurrent_gets_one_command_at_a_time(image: Path) -> None:
    handler = "tests.unit.ring_handlers:SerialSlowFileHandler"
    with worker(image, handler, threads=4, slow="5,6,7,8", delay="0.2") as w:
        assert w.run(cdb16(0x91, 0, 0)).status == 0  # up and serving
        start = time.monotonic()
        ids = [w.submit(read16(5 + i, 1), [w.iov(BS * i, BS)]) for i in range(4)]
        done = w.reap(4)
        assert time.monotonic() - start >= 0.75  # four 0.2 s reads, one after another
        assert {c.cmd_id for c in done} == set(ids)


@pytest.mark.parametrize("threads", [4, 0])
def test_many_commands_wrap_the_ring(image: Path, threads: int) -> None:
    """Far more entries than the ring holds at once: PADs, wrap-around, cmd_id reuse."""
    with worker(image, threads=threads) as w:
        expect = bytearray(IMAGE)
        sent = 0
        completed: list[Completion] = []
        inflight = 0
        for i in range(600):
            lba = (i * 37) % (IMAGE // BS - 8)
            off = (i % 64) * 8 * BS
            chunk = pattern(8 * BS, i)
            w.data[off : off + len(chunk)] = chunk
            while inflight >= 32:
                got = w.target.reap() or (w.done.wait(1.0) and w.target.reap()) or []
                completed += got
                inflight -= len(got)
            # 1 to 6 iovecs: entries of 128 and 144 bytes, so the ring wraps with PADs.
            cuts = [off + k * 8 * BS // (1 + i % 6) for k in range(1 + i % 6)] + [off + 8 * BS]
            w.submit(write16(lba, 8), [w.iov(a, b - a) for a, b in itertools.pairwise(cuts)])
            # Commands in flight write disjoint data slots; wait for the slot's previous user.
            expect[lba * BS : (lba + 8) * BS] = chunk
            sent += 1
            inflight += 1
            if i % 64 == 63:  # the next 64 reuse the data slots: drain first
                completed += w.reap(inflight)
                inflight = 0
        completed += w.reap(inflight)
        assert len(completed) == sent
        assert all(c.status == 0 for c in completed)
        assert w.target.stats.pads > 0
        assert image.read_bytes() == bytes(expect)


def test_lifeline_eof_exits_zero_within_a_second(image: Path) -> None:
    with worker(image) as w:
        assert w.run(cdb16(0x91, 0, 0)).status == 0  # up and serving
        start = time.monotonic()
        os.close(w.life_w)
        w.life_w = -1
        assert w.wait_exit(2.0) == 0
        assert time.monotonic() - start < 1.0
        assert w.stderr() == ""


def test_sigterm_exits_zero_after_in_flight_commands_complete(image: Path, tmp_path: Path) -> None:
    image.write_bytes(pattern(IMAGE, 9))
    started = tmp_path / "started"
    with worker(image, SLOW, slow="5", delay="0.5", started=str(started)) as w:
        cmd_id = w.submit(read16(5, 2), [w.iov(0, 2 * BS)])
        deadline = time.monotonic() + TIMEOUT
        while not started.exists():
            assert time.monotonic() < deadline, w.stderr()
            time.sleep(0.01)
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait_exit(TIMEOUT) == 0
        (c,) = w.target.reap()
        assert (c.cmd_id, c.status) == (cmd_id, 0)
        assert bytes(w.data[: 2 * BS]) == pattern(IMAGE, 9)[5 * BS : 7 * BS]
        assert w.stderr() == ""


def test_tmr_abort_lets_running_commands_finish(image: Path, tmp_path: Path) -> None:
    started = tmp_path / "started"
    with worker(image, SLOW, slow="5", delay="0.3", started=str(started)) as w:
        cmd_id = w.submit(read16(5, 1), [w.iov(0, BS)])
        deadline = time.monotonic() + TIMEOUT
        while not started.exists():
            assert time.monotonic() < deadline, w.stderr()
            time.sleep(0.01)
        w.target.submit_tmr(TmrType.ABORT_TASK, [cmd_id])
        w.kick.ring()
        (c,) = w.reap(1)
        assert (c.cmd_id, c.status) == (cmd_id, 0)
        assert w.run(cdb16(0x91, 0, 0)).status == 0
        assert w.target.stats.tmrs == 1


def test_idle_worker_does_not_spin(image: Path) -> None:
    with worker(image) as w:
        assert w.run(cdb16(0x91, 0, 0)).status == 0

        def cpu() -> float:
            fields = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu()
        time.sleep(0.5)
        assert cpu() - before < 0.05


def test_bad_handler_exits_1_with_one_error_line(image: Path) -> None:
    with worker(image, "nosuch") as w:
        assert w.wait_exit(TIMEOUT) == 1
        err = w.stderr()
        assert "cannot open handler nosuch: unknown handler 'nosuch'" in err
        assert len(err.strip().splitlines()) == 1


def test_corrupt_ring_exits_3(image: Path) -> None:
    with worker(image) as w:
        assert w.run(cdb16(0x91, 0, 0)).status == 0
        # A cmd_head that is not 8-aligned: the target broke the ABI.
        struct.pack_into("<I", w.ring_mem.buf, 12, 13)
        w.kick.ring()
        assert w.wait_exit(TIMEOUT) == 3
        assert "ring failure: fetch: cmd_head 13" in w.stderr()


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sgtarget.ring.worker", "--size", "1000", "--handler", "null"],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 2
    assert b"required" in proc.stderr


def test_a_non_blocking_handler_runs_its_batch_inline(image: Path) -> None:
    """null never blocks: the worker runs a fetched batch in its poll loop, in ring order."""
    handler = load_handler("null")
    handler.open(HandlerConfig(size=IMAGE, block_size=BS, params={}))
    assert handler.blocking is False
    ring = Ring(image, "null", {}, threads=4)
    try:
        ring.data[0:65536] = b"\xa5" * 65536
        ids = [ring.target.submit(read16(i, 8), [ring.iov(i * 4096, 4096)]) for i in range(16)]
        ring.kick.ring()
        done = ring.reap(16)
        assert [c.cmd_id for c in done] == ids  # no thread pool: completed as fetched
        assert all(c.status == 0 for c in done)
        assert bytes(ring.data[0:65536]) == bytes(65536)
    finally:
        ring.close()
    file_handler = load_handler("file")
    file_handler.open(HandlerConfig(size=IMAGE, block_size=BS, params={"path": str(image)}))
    try:
        assert file_handler.blocking is True
    finally:
        file_handler.close()


# ---- protection information (dif iovecs) ---------------------------------------------------


def sidecar(image: Path) -> bytes:
    """The tuples in the image's PI sidecar, in wire form (it stores them inverted)."""
    return bytes(255 - b for b in (image.parent / (image.name + ".pi")).read_bytes())


def tuples_for(data: bytes, lba: int) -> bytes:
    return bytes(generate(data, BS, ref_tag=lba))


def test_dif_iovecs_reach_a_pi_aware_handler(image: Path) -> None:
    """The file handler with --pi stores the tuples in PATH.pi and reads them back; UNMAP and
    FORMAT UNIT make them escape."""
    data = pattern(8 * BS, 5)
    pi = tuples_for(data, 16)
    with worker(image, extra=("--pi", "1")) as w:
        w.data[0 : len(data)] = data
        w.data[65536 : 65536 + 64] = pi
        c = w.run(write16(16, 8), [w.iov(0, 3000), w.iov(3000, len(data) - 3000)],
                  [w.iov(65536, 24), w.iov(65536 + 24, 40)])  # fmt: skip
        assert (c.status, c.sense) == (0, b"")
        assert image.read_bytes()[16 * BS : 24 * BS] == data
        assert sidecar(image)[16 * 8 : 24 * 8] == pi
        assert sidecar(image)[: 16 * 8] == b"\xff" * 128  # never written: escape

        w.data[0 : 2 * len(data)] = bytes(2 * len(data))
        c = w.run(read16(16, 8), [w.iov(4096, len(data))], [w.iov(131072, 64)])
        assert (c.status, c.read_len) == (0, None)
        assert bytes(w.data[4096 : 4096 + len(data)]) == data
        assert bytes(w.data[131072 : 131072 + 64]) == pi

        assert w.run(cdb16(0x93, 16, 4, byte1=0x09)).status == 0  # WRITE SAME UNMAP NDOB
        assert sidecar(image)[16 * 8 : 24 * 8] == b"\xff" * 32 + pi[32:]
        assert w.run(bytes([0x04, 0x80, 0, 0, 0, 0])).status == 0  # FORMAT UNIT
        assert sidecar(image) == b"\xff" * (IMAGE // BS * 8)
        assert image.read_bytes()[20 * BS : 24 * BS] == data[4 * BS :]  # user data stays


def test_dif_iovecs_too_short_or_on_other_commands_are_invalid_field(image: Path) -> None:
    with worker(image, extra=("--pi", "1")) as w:
        c = w.run(write16(0, 2), [w.iov(0, 2 * BS)], [w.iov(65536, 8)])  # one tuple of two
        assert (c.status, c.sense) == (2, sense(5, 0x24, 0))
        c = w.run(cdb16(0x91, 0, 0), (), [w.iov(65536, 8)])  # SYNCHRONIZE CACHE with tuples
        assert (c.status, c.sense) == (2, sense(5, 0x24, 0))


def test_dif_iovecs_are_refused_for_a_handler_without_pi(image: Path) -> None:
    with worker(image) as w:
        w.data[0:BS] = b"\x33" * BS
        c = w.run(write16(0, 1), [w.iov(0, BS)], [w.iov(65536, 8)])
        assert (c.status, c.sense) == (2, sense(5, 0x24, 0))
        assert image.read_bytes()[:BS] == bytes(BS)  # never reached the handler
        assert w.run(write16(0, 1), [w.iov(0, BS)]).status == 0  # and it keeps serving
        assert w.run(bytes([0x04, 0, 0, 0, 0, 0])).unknown_op  # FORMAT UNIT: not its business


def test_a_handler_that_cannot_store_pi_does_not_start_with_pi(image: Path) -> None:
    w = Ring(image, "null", {}, 4, ("--pi", "1"))
    try:
        assert w.wait_exit(TIMEOUT) == 1
        err = w.stderr()
        assert "cannot open handler null: it does not store protection information" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        w.close()
