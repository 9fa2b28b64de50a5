"""Identity and window (swiotlb-style bounce) mappings: golden examples and a stateful model."""

from __future__ import annotations

import itertools
import mmap

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sgtarget.datapath import Pool, PoolExhausted, ScatterList
from sgtarget.datapath.mapping import (
    COPY_REASON,
    IdentityMapping,
    MapDirection,
    Mapped,
    Mapping,
    WindowFull,
    WindowMapping,
)

BS = 4096
PAGE = mmap.PAGESIZE
SLOT = 2048
KiB = 1024


def _fill(sg: ScatterList, seed: int) -> bytes:
    data = bytes((seed + i * 7) & 0xFF for i in range(sg.length))
    sg.copy_in(data, reason="test", direction="in")
    return data


def _pieces(
    pool: Pool, sg: ScatterList, off: int, length: int, limit: int
) -> list[tuple[int, int]]:
    """Independent model: (arena offset, length) per scatter entry, split at ``limit``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for first, _count, nbytes in sg.segments:
        lo, hi = max(off, pos), min(off + length, pos + nbytes)
        if lo < hi:
            base = first * pool.block_size + (lo - pos)
            out.extend((base + s, min(limit, hi - lo - s)) for s in range(0, hi - lo, limit))
        pos += nbytes
    return out


def _map_and_check(m: Mapping, sg: ScatterList, off: int, n: int) -> Mapped:
    # Callers only see the Protocol.
    mapped = m.map(sg, off, n, MapDirection.TO_CONSUMER)
    assert b"".join(mapped.views()) == sg.to_bytes(off, n)
    return mapped


# --- golden examples -----------------------------------------------------------------------


def test_300k_segment_splits_into_two_mappings() -> None:
    pool = Pool(512 * KiB, BS)
    sg = pool.alloc(300 * KiB)
    assert len(sg.segments) == 1
    data = _fill(sg, 3)
    win = WindowMapping(pool, 1024 * KiB)
    assert win.max_mapping_size == 256 * KiB
    mapped = win.map(sg, 0, 300 * KiB, MapDirection.TO_CONSUMER)
    assert [n for _off, n in mapped.entries] == [256 * KiB, 44 * KiB]
    assert all(off % PAGE == 0 for off, _n in mapped.entries)
    assert b"".join(mapped.views()) == data
    assert mapped.copied == 300 * KiB
    assert win.stats.slots_in_use == 128 + 22
    win.unmap(mapped)
    assert win.stats.slots_in_use == 0
    sg.release()


def test_min_align_mask_preserves_offset_within_page() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(3 * BS)
    win = WindowMapping(pool, 256 * KiB, min_align_mask=0xFFF)
    # Short and page-sized mappings both keep the offset within the page.
    for n in (100, 2 * BS):
        mapped = win.map(sg, 0x234, n, MapDirection.TO_CONSUMER)
        ((off, length),) = mapped.entries
        assert (off & 0xFFF, length) == (0x234, n)
        win.unmap(mapped)
    # 0xFFF rounds up to two slots of preserved offset.
    assert win.max_mapping_size == 256 * KiB - 4 * KiB


def test_min_align_mask_above_a_slot_chooses_the_slot() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(4 * BS)
    win = WindowMapping(pool, 256 * KiB, min_align_mask=0x1FFF)
    orig_block = sg.segments[0][0] * BS
    mapped = win.map(sg, BS + 0x234, 300, MapDirection.TO_CONSUMER)
    ((off, _n),) = mapped.entries
    assert off & 0x1FFF == (orig_block + BS + 0x234) & 0x1FFF
    win.unmap(mapped)


def test_no_mask_short_mapping_is_slot_aligned_and_page_mapping_page_aligned() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(4 * BS)
    win = WindowMapping(pool, 64 * KiB)
    small = win.map(sg, 5, 10, MapDirection.TO_CONSUMER)  # takes slot 0
    big = win.map(sg, 7, PAGE, MapDirection.TO_CONSUMER)
    assert small.entries == [(0, 10)]
    assert big.entries[0][0] % PAGE == 0
    assert big.entries[0][0] > 0
    win.unmap(small)
    win.unmap(big)


def test_identity_mapping_returns_arena_offsets_of_segments() -> None:
    pool = Pool(16 * BS, BS)
    held = [pool.alloc(BS) for _ in range(8)]
    for sg in held[1::2]:
        sg.release()
    sg = pool.alloc(3 * BS - 100)
    blocks = [first for first, _c, _n in sg.segments]
    assert len(blocks) == 3
    data = _fill(sg, 9)
    ident = IdentityMapping(pool)
    mapped = ident.map(sg, 10, 3 * BS - 120, MapDirection.FROM_CONSUMER)
    assert mapped.entries == [
        (blocks[0] * BS + 10, BS - 10),
        (blocks[1] * BS, BS),
        (blocks[2] * BS, BS - 110),
    ]
    assert mapped.buffer is pool.arena
    assert b"".join(mapped.views()) == data[10:-10]
    assert mapped.copied == 0
    assert pool.stats.copies.get((COPY_REASON, "in"), 0) == 0
    ident.unmap(mapped)
    with pytest.raises(ValueError, match="not a live"):
        ident.unmap(mapped)
    assert ident.stats.live_mappings == 0


def test_both_mappings_satisfy_the_protocol() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(2 * BS)
    _fill(sg, 1)
    mappings: list[Mapping] = [IdentityMapping(pool), WindowMapping(pool, 64 * KiB)]
    for m in mappings:
        mapped = _map_and_check(m, sg, 3, BS)
        m.unmap(mapped)
        assert m.stats.live_mappings == 0


def test_window_full_is_pool_exhausted_and_frees_partial_mapping() -> None:
    pool = Pool(64 * KiB, BS)
    held = [pool.alloc(BS) for _ in range(4)]
    held[1].release()
    sg = pool.alloc(2 * BS)  # two segments, each needs 2 slots
    assert len(sg.segments) == 2
    win = WindowMapping(pool, 8 * KiB)
    blocker = win.map(sg, 0, 1, MapDirection.TO_CONSUMER)
    with pytest.raises(PoolExhausted) as err:
        win.map(sg, 0, 2 * BS, MapDirection.TO_CONSUMER)
    assert isinstance(err.value, WindowFull)
    assert win.stats.slots_in_use == 1
    assert win.stats.map_failures == 1
    win.unmap(blocker)
    mapped = win.map(sg, 0, 2 * BS, MapDirection.TO_CONSUMER)  # transient: fits now
    win.unmap(mapped)
    assert win.stats.slots_in_use == 0


def test_injected_failure_on_second_piece_leaks_nothing() -> None:
    pool = Pool(512 * KiB, BS)
    sg = pool.alloc(300 * KiB)
    calls = 0

    def fail_second() -> bool:
        nonlocal calls
        calls += 1
        return calls == 2

    win = WindowMapping(pool, 1024 * KiB, fail_alloc=fail_second)
    with pytest.raises(WindowFull):
        win.map(sg, 0, 300 * KiB, MapDirection.BIDIRECTIONAL)
    assert win.stats.slots_in_use == 0
    # A failed map copies nothing.
    assert pool.stats.copies.get((COPY_REASON, "in"), 0) == 0


def test_mapping_larger_than_window_is_not_transient() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(4 * BS)
    win = WindowMapping(pool, 8 * KiB)
    with pytest.raises(ValueError, match="slots"):
        win.map(sg, 0, 4 * BS + 0, MapDirection.TO_CONSUMER)
    assert win.stats.slots_in_use == 0


def test_from_consumer_copies_back_and_keeps_unwritten_bytes() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(2 * BS)
    data = bytearray(_fill(sg, 5))
    win = WindowMapping(pool, 64 * KiB)
    mapped = win.map(sg, 100, 1000, MapDirection.FROM_CONSUMER)
    (view,) = mapped.views()
    assert bytes(view) == data[100:1100]  # pre-copied: no stale window bytes
    view[10:20] = b"\xee" * 10
    view.release()
    win.unmap(mapped)
    data[110:120] = b"\xee" * 10
    assert sg.to_bytes() == data
    assert pool.stats.copies[(COPY_REASON, "in")] == 1000
    assert pool.stats.copies[(COPY_REASON, "out")] == 1000
    assert mapped.copied == 2000
    with pytest.raises(ValueError, match="not a live"):
        win.unmap(mapped)
    with pytest.raises(ValueError, match="unmapped"):
        mapped.views()


def test_to_consumer_writes_are_discarded() -> None:
    pool = Pool(64 * KiB, BS)
    sg = pool.alloc(BS)
    data = _fill(sg, 2)
    win = WindowMapping(pool, 64 * KiB)
    mapped = win.map(sg, 0, BS, MapDirection.TO_CONSUMER)
    (view,) = mapped.views()
    view[:] = bytes(BS)
    view.release()
    win.unmap(mapped)
    assert sg.to_bytes() == data
    assert (COPY_REASON, "out") not in pool.stats.copies


@pytest.mark.parametrize(
    ("slot_size", "max_slots", "mask", "match"),
    [
        (3000, 128, 0, "power of two"),
        (2048, 100, 0, "power of two"),
        (2048, 128, 0x234, "2\\*\\*k"),
        (2048, 128, 0x3FFFF, "no room"),
    ],
)
def test_bad_window_parameters(slot_size: int, max_slots: int, mask: int, match: str) -> None:
    pool = Pool(64 * KiB, BS)
    with pytest.raises(ValueError, match=match):
        WindowMapping(
            pool, 256 * KiB, slot_size=slot_size, max_slots=max_slots, min_align_mask=mask
        )


@settings(max_examples=60, deadline=None)
@given(
    keep=st.lists(st.booleans(), min_size=16, max_size=16),
    nbytes=st.integers(1, 6 * BS),
    data=st.data(),
)
def test_identity_entries_are_views_of_the_arena(
    keep: list[bool], nbytes: int, data: st.DataObject
) -> None:
    pool = Pool(32 * BS, BS)
    held = [pool.alloc(BS) for _ in range(16)]
    for sg, k in zip(held, keep, strict=True):
        if not k:
            sg.release()
    sg = pool.alloc(nbytes)
    _fill(sg, nbytes)
    off = data.draw(st.integers(0, nbytes))
    n = data.draw(st.integers(0, nbytes - off))
    ident = IdentityMapping(pool)
    mapped = ident.map(sg, off, n, MapDirection.BIDIRECTIONAL)
    assert mapped.entries == _pieces(pool, sg, off, n, 1 << 40)
    assert b"".join(mapped.views()) == sg.to_bytes(off, n)
    ident.unmap(mapped)


# --- stateful model of the window ----------------------------------------------------------

POOL_BLOCKS = 96
DIRECTIONS = list(MapDirection)


class _Live:
    __slots__ = ("length", "mapped", "offset", "pieces", "sg", "window_model")

    def __init__(
        self, sg: int, offset: int, length: int, mapped: Mapped, pieces: list[tuple[int, int]]
    ) -> None:
        self.sg = sg
        self.offset = offset
        self.length = length
        self.mapped = mapped
        self.pieces = pieces
        #: What the consumer should see in the window for this mapping.
        self.window_model = bytearray(b"".join(mapped.views()))


class WindowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(POOL_BLOCKS * BS, BS)
        self.sgs: dict[int, ScatterList] = {}
        self.model: dict[int, bytearray] = {}
        self.busy: set[int] = set()
        self.live: dict[int, _Live] = {}
        self.next_id = 0
        self.copied_in = 0
        self.copied_out = 0
        self.calls = 0
        self.fail_at: int | None = None
        self.dead: list[Mapped] = []
        self.win: WindowMapping | None = None
        self.fragmenters: list[ScatterList] = []

    def _hook(self) -> bool:
        self.calls += 1
        return self.calls == self.fail_at

    @initialize(
        mask=st.sampled_from([0, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF]),
        nslots=st.sampled_from([16, 40, 64, 130, 256]),
        max_slots=st.sampled_from([16, 64, 128]),
        holes=st.lists(st.booleans(), min_size=POOL_BLOCKS // 2, max_size=POOL_BLOCKS // 2),
    )
    def setup(self, mask: int, nslots: int, max_slots: int, holes: list[bool]) -> None:
        run = min(max_slots, nslots) * SLOT
        if run - (-(-mask // SLOT) * SLOT) <= 0:
            mask = 0
        self.win = WindowMapping(
            self.pool,
            nslots * SLOT,
            max_slots=max_slots,
            min_align_mask=mask,
            fail_alloc=self._hook,
        )
        # Fragment the pool: take half of it block by block and give some back, so later
        # scatter lists are made of several segments.
        taken = [self.pool.alloc(BS) for _ in holes]
        for sg, hole in zip(taken, holes, strict=True):
            if hole:
                sg.release()
            else:
                self.fragmenters.append(sg)

    @property
    def window(self) -> WindowMapping:
        assert self.win is not None
        return self.win

    def _adopt(self, sg: ScatterList) -> None:
        sid = self.next_id
        self.next_id += 1
        self.sgs[sid] = sg
        self.model[sid] = bytearray(_fill(sg, sid))

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        idle = sorted(set(self.sgs) - self.busy)
        if not idle:
            return
        sid = data.draw(st.sampled_from(idle))
        self.sgs.pop(sid).release()
        del self.model[sid]

    @rule(
        data=st.data(),
        direction=st.sampled_from(DIRECTIONS),
        fail_at=st.none() | st.integers(1, 4),
        new=st.none() | st.integers(1, 40 * BS),
    )
    def map(
        self, data: st.DataObject, direction: MapDirection, fail_at: int | None, new: int | None
    ) -> None:
        # Map a fresh scatter list (allocated over the fragmented pool) or an idle one.
        win = self.window
        if new is not None and (sg_new := self.pool.try_alloc(new)) is not None:
            self._adopt(sg_new)
        idle = sorted(set(self.sgs) - self.busy)
        if not idle:
            return
        sid = idle[-1] if new is not None else data.draw(st.sampled_from(idle))
        sg = self.sgs[sid]
        off = data.draw(st.integers(0, min(sg.length, 3 * BS)))
        rest = sg.length - off
        n = data.draw(st.just(rest) | st.integers(0, rest))
        pieces = _pieces(self.pool, sg, off, n, win.max_mapping_size)
        before = win.stats.slots_in_use
        failures = win.stats.map_failures
        self.calls, self.fail_at = 0, fail_at
        try:
            mapped = win.map(sg, off, n, direction)
        except WindowFull:
            event("window full" if fail_at is None or fail_at > len(pieces) else "injected")
            # Nothing partly mapped survives a failure, and it was counted.
            assert win.stats.slots_in_use == before
            assert win.stats.map_failures == failures + 1
            return
        except ValueError:
            event("never fits")
            assert win.stats.slots_in_use == before
            # Only a mapping that can never fit is refused outright (the in-slot offset of a
            # piece is below a page).
            assert sum(-(-(p_n + PAGE - 1) // SLOT) for _o, p_n in pieces) > win.nslots
            return
        finally:
            self.fail_at = None
        # A failure injected at an allocation that happened must have failed the map.
        assert fail_at is None or fail_at > len(pieces)
        event(f"mapped {min(len(pieces), 3)}+ pieces")
        mid = self.next_id
        self.next_id += 1
        self.busy.add(sid)
        self.live[mid] = _Live(sid, off, n, mapped, pieces)
        self.copied_in += n
        assert mapped.copied == n
        # Per scatter entry, split only at the largest mapping.
        assert [e_n for _w, e_n in mapped.entries] == [p_n for _o, p_n in pieces]
        # Every direction sees the original bytes first (TO_CONSUMER and the pre-copy).
        assert bytes(self.live[mid].window_model) == bytes(self.model[sid][off : off + n])

    def _pick(self, data: st.DataObject) -> int | None:
        if not self.live:
            return None
        return data.draw(st.sampled_from(sorted(self.live)))

    @rule(data=st.data())
    def consumer_writes(self, data: st.DataObject) -> None:
        mid = self._pick(data)
        if mid is None or self.live[mid].length == 0:
            return
        live = self.live[mid]
        lo = data.draw(st.integers(0, live.length - 1))
        hi = data.draw(st.integers(lo + 1, min(live.length, lo + 3 * BS)))
        patch = data.draw(st.binary(min_size=hi - lo, max_size=hi - lo))
        live.window_model[lo:hi] = patch
        pos = 0
        for view in live.mapped.views():
            a, b = max(lo, pos), min(hi, pos + len(view))
            if a < b:
                view[a - pos : b - pos] = patch[a - lo : b - lo]
            pos += len(view)

    @rule(data=st.data())
    def unmap_one(self, data: st.DataObject) -> None:
        mid = self._pick(data)
        if mid is not None:
            self.unmap(mid)

    def unmap(self, mid: int) -> None:
        live = self.live.pop(mid)
        self.window.unmap(live.mapped)
        self.busy.discard(live.sg)
        if live.mapped.direction is not MapDirection.TO_CONSUMER:
            self.model[live.sg][live.offset : live.offset + live.length] = live.window_model
            self.copied_out += live.length
        self.dead.append(live.mapped)

    @rule(data=st.data())
    def double_unmap_raises(self, data: st.DataObject) -> None:
        if self.dead:
            mapped = data.draw(st.sampled_from(self.dead))
            with pytest.raises(ValueError, match="not a live"):
                self.window.unmap(mapped)

    @invariant()
    def window_rules(self) -> None:
        if self.win is None:
            return
        win = self.win
        mask = win.min_align_mask
        spans: list[tuple[int, int]] = []
        slots = 0
        for live in self.live.values():
            m = live.mapped
            assert len(m._slots) == len(m.entries)
            for (w, n), (orig, _n), (first, count) in zip(
                m.entries, live.pieces, m._slots, strict=True
            ):
                assert w & mask == orig & mask
                if n >= PAGE:
                    assert (w & ~mask) % PAGE == 0
                assert count <= win.max_slots
                assert first // win.max_slots == (first + count - 1) // win.max_slots
                assert first * SLOT <= w
                assert w + n <= (first + count) * SLOT
                assert n <= win.max_mapping_size
                spans.append((first, first + count))
                slots += count
            # Nothing else wrote into this mapping's part of the window.
            assert b"".join(m.views()) == live.window_model
        spans.sort()
        for (_a, end), (start, _b) in itertools.pairwise(spans):
            assert end <= start, "live mappings overlap in the window"
        assert win.stats.slots_in_use == slots
        assert win.stats.live_mappings == len(self.live)
        assert win.stats.peak_slots_in_use >= slots

    @invariant()
    def originals_and_copies(self) -> None:
        for sid, sg in self.sgs.items():
            assert sg.to_bytes() == self.model[sid]
        copies = self.pool.stats.copies
        assert copies.get((COPY_REASON, "in"), 0) == self.copied_in
        assert copies.get((COPY_REASON, "out"), 0) == self.copied_out

    def teardown(self) -> None:
        if self.win is not None:
            for mid in list(self.live):
                self.unmap(mid)
            assert self.win.stats.slots_in_use == 0
            assert self.win.stats.live_mappings == 0
            self.originals_and_copies()
            self.win.close()
        for sg in [*self.sgs.values(), *self.fragmenters]:
            sg.release()
        assert self.pool.stats.blocks_in_use == 0
        self.pool.close()


TestWindowMachine = WindowMachine.TestCase
TestWindowMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
