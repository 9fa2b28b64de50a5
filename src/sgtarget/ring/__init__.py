"""Backstores in their own processes behind a TCMU-compatible shared command ring.

Linux's TCMU (target_core_user) hands SCSI commands from the kernel's target core to a
user-space handler through a shared mapping: a 128-byte mailbox, a command ring of entries and a
data area; ``cmd_head`` is the kernel's, ``cmd_tail`` the handler's, and a UIO interrupt / a
write to the UIO fd are the two doorbells. sgtarget implements that user ABI byte-exact
(``abi``, TCMU_VERSION "2.0") with sgtarget's core in the kernel's role, so a backstore can be a
Python class running in a process of its own: it uses another core, and it crashes alone.

Pieces:

- ``abi``: the mailbox, command/TMR/PAD entries and responses at the offsets the kernel header
  gives (the nested request/response structs are not packed: ``cdb_off`` sits at 24).
- ``shm``: memfd shared memory, eventfd doorbells, and ``SharedMap``, which resolves an iovec's
  offset to memory and refuses anything outside the ring or the data area.
- ``target`` (the kernel's side, ``RingTarget``): writes entries at ``cmd_head`` (a PAD first
  when an entry would cross the end), allocates cmd_ids, reaps completions at ``cmd_tail``.
- ``user`` (the handler's side, ``UserRing``): snapshots each request when it fetches it and
  completes commands out of order (OOOC) into whichever command entry sits at ``cmd_tail``.
- ``handler``/``worker``: the handler API (tcmu-runner-like) and the handler process main loop;
  ``dataarea``/``backstore``/``supervisor``: the target's Backstore that goes through rings, the
  copy-mode data area, and the processes' lifecycle.

The shared map is ``[mailbox | command ring][data area]``; iovec bases are offsets from its start
and the data area begins at ``data_off = 128 + cmdr_size``. Here the two parts are two memfds, and
what the data area is decides the data mode:

- ``copy``: a data area of its own, in blocks with a bitmap allocator; payload is copied between
  the command's pool blocks and the data area, as the kernel does. The baseline.
- ``zerocopy``: the data area *is* the target's pool arena (``Pool.fd``): iovecs point at the very
  blocks the socket filled, so no payload is copied between socket and handler. Opt-in, as the
  kernel's review asked; READ buffers handed to a handler are zeroed or freshly owned.
- ``isolated``: the data area is a bounce window (swiotlb rules); the handler maps nothing else of
  the target's memory. For handlers trusted with nothing.

The handler is assumed malicious (the kernel header says so). The target never reads back what it
wrote: entry lengths, positions, CDBs and iovecs come from its own records made at submit; from
the ring it reads only ``cmd_tail`` (which must land on an entry boundary it wrote) and, at
positions it knows to be command entries, cmd_id (in flight, once), uflags, status (a SAM status),
read_len (within the data-in bytes submitted) and sense (at most 96 bytes by its own length
field). Any violation raises ``RingBroken`` and the ring is retired; the caller fails or re-queues
what was in flight. Whatever a handler writes, the target neither reads nor writes outside the
ring or the command's own buffers. The handler side is defensive the same way
(``RingCorrupt``): no read outside the ring whatever the target writes.

Memory ordering: entries are stored before ``cmd_head`` and responses before ``cmd_tail``, and a
doorbell (an eventfd write, a system call and so a full barrier) is rung after that store. On
x86-64 (TSO) stores through a shared mapping become visible in program order, which is all the
ring needs. Python cannot issue the barriers a weakly ordered CPU (arm64) would need between the
entry stores and the head store, so there a reader could see a newer ``cmd_head`` before the
entry it covers; sgtarget's rings are only claimed correct on x86-64.

Running the same handler code against a real kernel (not testable here: it needs target_core_user
loaded, a configured LIO backstore and root). The kernel exposes one ring as /dev/uioN with a
single memory map (its size in /sys/class/uio/uioN/maps/map0/size). A handler would open
/dev/uioN, ``mmap`` the whole map once, read ``cmdr_size`` from the mailbox and split the map at
``data_off = 128 + cmdr_size`` into the two views ``SharedMap(ring, data, data_off)`` takes;
``UserRing`` takes the first view as it is. Instead of waiting on the kick eventfd it would
``read()`` 4 bytes (the interrupt count) from the uio fd, and instead of ringing the done eventfd
it would ``write()`` 4 bytes to it, which makes the kernel process completions. Device
configuration (block size, size, handler parameters) comes from the uio device's name and
configfs, which tcmu-runner parses and sgtarget's worker takes as command-line flags instead.
"""
