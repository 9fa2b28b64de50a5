"""Helpers over plain lists of byte views (scatter lists of ordinary memory), one copy each.

Backstores, the bounce path, T10 PI and the ring all move bytes between lists of
``memoryview``s; these are the few operations they share.
"""

from __future__ import annotations

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


def byte_view(buf: Buffer) -> memoryview:
    """``buf`` as a one-dimensional view of bytes (the same view when it already is one)."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def copy_views(src: Sequence[Buffer], dst: Sequence[memoryview]) -> int:
    """Copy the bytes of ``src`` into ``dst`` in order; returns bytes copied (the shorter)."""
    done = di = doff = 0
    for s in src:
        sv = byte_view(s)
        soff = 0
        n = len(sv)
        while soff < n and di < len(dst):
            d = byte_view(dst[di])
            k = min(len(d) - doff, n - soff)
            d[doff : doff + k] = sv[soff : soff + k]
            soff += k
            doff += k
            done += k
            if doff == len(d):
                di += 1
                doff = 0
        if soff < n:
            break
    return done


def prefix(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views`` (views sliced, not copied)."""
    out: list[memoryview] = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out


def split_views(views: Sequence[Buffer], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """``views`` cut after ``n`` bytes: byte views of the first ``n`` bytes and of the rest."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for buf in views:
        view = byte_view(buf)
        if n >= len(view):
            head.append(view)
            n -= len(view)
        elif n > 0:
            head.append(view[:n])
            tail.append(view[n:])
            n = 0
        else:
            tail.append(view)
    return head, tail
