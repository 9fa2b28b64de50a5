"""A tiny handler process for test_ring_core: attach a ring by fd and serve N commands.

argv: ring_fd data_fd kick_fd done_fd data_off data_size n. Each command's data-in buffers are
filled with byte 2 of its CDB; it completes GOOD with read_len = the bytes filled.
"""

from __future__ import annotations

import sys

from sgtarget.ring.shm import Doorbell, SharedMap, SharedMemory
from sgtarget.ring.user import Request, UserRing


def main(argv: list[str]) -> int:
    ring_fd, data_fd, kick_fd, done_fd, data_off, data_size, n = map(int, argv)
    ring = SharedMemory.attach(ring_fd, data_off)
    data = SharedMemory.attach(data_fd, data_size)
    kick, done = Doorbell.attach(kick_fd), Doorbell.attach(done_fd)
    user = UserRing(ring.buf)
    shared = SharedMap(ring.buf, data.buf, data_off)
    served = 0
    while served < n:
        if not kick.wait(10.0):
            return 1
        for item in user.fetch():
            if not isinstance(item, Request):
                continue
            filled = 0
            for view in shared.views(item.iovs):
                view[:] = bytes([item.cdb[2]]) * len(view)
                filled += len(view)
                view.release()
            user.complete(item.cmd_id, 0, read_len=filled)
            served += 1
        done.ring()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
