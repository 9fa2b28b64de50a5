"""Pool allocator, scatter lists and the iterator: exact semantics, property-tested."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sgtarget.datapath import Pool, PoolExhausted, ScatterList, SGIter
from sgtarget.datapath.blockmap import BlockMap
from sgtarget.datapath.views import byte_view, copy_views, prefix, split_views

BS = 4096


def test_pool_is_page_aligned_shared_memory() -> None:
    pool = Pool(16 * BS, BS)
    assert pool.nblocks == 16
    sg = pool.alloc(1)
    view = sg.views()[0]
    # An anonymous mapping starts on a page boundary; blocks are page multiples.
    assert pool.block_size % mmap.PAGESIZE == 0
    assert len(view) == 1
    sg.release()


@pytest.mark.parametrize("bad", [0, 100, BS + 1])
def test_block_size_must_be_page_multiple(bad: int) -> None:
    with pytest.raises(ValueError, match="multiple"):
        Pool(16 * BS, bad)


def test_adjacent_blocks_merge_into_one_segment() -> None:
    pool = Pool(16 * BS, BS)
    sg = pool.alloc(5 * BS + 10)
    assert sg.segments == [(0, 6, 5 * BS + 10)]
    assert sg.length == 5 * BS + 10
    assert [len(v) for v in sg.views()] == [5 * BS + 10]
    sg.release()
    assert pool.stats.blocks_in_use == 0


def test_fragmented_pool_gives_several_segments() -> None:
    pool = Pool(8 * BS, BS)
    held = [pool.alloc(BS) for _ in range(8)]
    for sg in held[1::2]:
        sg.release()
    sg = pool.alloc(3 * BS)
    assert [seg[1] for seg in sg.segments] == [1, 1, 1]
    assert len(sg.views()) == 3


def test_exhaustion_is_a_typed_outcome_not_memory_error() -> None:
    pool = Pool(4 * BS, BS)
    sg = pool.alloc(3 * BS)
    assert pool.try_alloc(2 * BS) is None
    assert pool.stats.failed_allocations == 1
    with pytest.raises(PoolExhausted):
        pool.alloc(2 * BS)
    sg.release()
    assert pool.try_alloc(4 * BS) is not None


def test_double_free_is_detected() -> None:
    pool = Pool(4 * BS, BS)
    sg = pool.alloc(BS)
    first, count, _ = sg.segments[0]
    sg.release()
    sg.release()  # idempotent on the list
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_run(first, count)


def test_search_threshold_grows_only_with_demand() -> None:
    pool = Pool(1024 * BS, BS)
    for _ in range(100):
        pool.alloc(BS).release()
    # Repeated small use keeps touching the lowest block.
    assert pool.alloc(BS).segments[0][0] == 0
    big = pool.alloc(500 * BS)
    assert big.nblocks == 500


def test_copy_in_to_bytes_and_copied_bytes_accounting() -> None:
    pool = Pool(8 * BS, BS)
    sg = pool.alloc(3 * BS)
    data = bytes(range(256)) * 40
    assert sg.copy_in(data, 100) == len(data)
    assert sg.to_bytes(100, len(data)) == data
    assert pool.stats.copied_bytes == len(data)
    # A copy past the end is short and says so.
    assert sg.copy_in(b"x" * 50, 3 * BS - 10) == 10


@given(st.binary(min_size=1, max_size=700), st.integers(0, 3 * 4096))
def test_fill_repeats_the_pattern_and_counts_it(pattern: bytes, length: int) -> None:
    pool = Pool(4 * 4096, 4096)
    sg = pool.alloc(3 * 4096)
    sg.zero()
    sg.fill(pattern, length, reason="test")
    want = (pattern * (length // len(pattern) + 1))[: min(length, sg.length)]
    assert sg.to_bytes(0, len(want)) == want
    assert sg.to_bytes(len(want)) == bytes(sg.length - len(want))
    assert pool.stats.copied_bytes == len(want)
    sg.release()
    pool.close()


def test_views_of_a_range_across_segments() -> None:
    pool = Pool(8 * BS, BS)
    holes = [pool.alloc(BS) for _ in range(8)]
    for sg in holes[::2]:
        sg.release()
    sg = pool.alloc(3 * BS)
    sg.copy_in(bytes(range(256)) * (3 * BS // 256))
    views = sg.views(BS - 5, 10)
    assert [len(v) for v in views] == [5, 5]
    assert b"".join(views) == sg.to_bytes()[BS - 5 : BS + 5]
    with pytest.raises(ValueError, match="outside"):
        sg.views(3 * BS - 1, 2)


def test_truncate_keeps_blocks_until_release_and_extend_moves_them() -> None:
    pool = Pool(8 * BS, BS)
    a = pool.alloc(2 * BS)
    a.truncate(100)
    assert a.length == 100
    assert pool.stats.blocks_in_use == 2
    b = pool.alloc(BS)
    a.extend(b)
    assert a.length == 100 + BS
    assert b.length == 0
    assert b.segments == []
    assert sum(len(v) for v in a.views()) == a.length
    a.release()
    b.release()
    assert pool.stats.blocks_in_use == 0


@given(
    length=st.integers(min_value=1, max_value=6 * BS),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["advance", "copy_in", "copy_out", "revert"]),
            st.integers(min_value=0, max_value=3 * BS),
        ),
        max_size=20,
    ),
)
@settings(max_examples=150, deadline=None)
def test_iterator_against_a_bytearray_model(length: int, ops: list[tuple[str, int]]) -> None:
    pool = Pool(8 * BS, BS)
    # Fragment the pool so the list has several segments.
    spacers = [pool.alloc(BS) for _ in range(2)]
    spacers[0].release()
    sg = pool.alloc(length)
    model = bytearray(length)
    it = SGIter(sg)
    pos = 0
    counter = 0
    for op, n in ops:
        if op == "advance":
            moved = it.advance(n)
            assert moved == min(n, length - pos)
            pos += moved
        elif op == "revert":
            back = min(n, pos)
            it.revert(back)
            pos -= back
        elif op == "copy_in":
            counter += 1
            data = bytes([counter & 0xFF]) * n
            copied = it.copy_in(data)
            assert copied == min(n, length - pos)
            model[pos : pos + copied] = data[:copied]
            pos += copied
        else:
            dst = bytearray(n)
            copied = it.copy_out(memoryview(dst))
            assert copied == min(n, length - pos)
            assert dst[:copied] == model[pos : pos + copied]
            pos += copied
        assert it.pos == pos
        assert it.remaining == length - pos
    assert sg.to_bytes() == bytes(model)
    with pytest.raises(ValueError, match="revert"):
        it.revert(pos + 1)
    sg.release()
    spacers[1].release()
    assert pool.stats.blocks_in_use == 0


class PoolMachine(RuleBasedStateMachine):
    """Random alloc/free sequences never lose, double-count or overlap blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool(32 * BS, BS)
        self.held: list[ScatterList] = []

    @rule(n=st.integers(min_value=1, max_value=12 * BS))
    def alloc(self, n: int) -> None:
        free = self.pool.free_blocks
        sg = self.pool.try_alloc(n)
        need = -(-n // BS)
        if need > free:
            assert sg is None
        else:
            assert sg is not None
            assert sg.length == n
            assert sg.nblocks == need
            self.held.append(sg)

    @rule(i=st.integers(min_value=0, max_value=100))
    def free(self, i: int) -> None:
        if self.held:
            self.held.pop(i % len(self.held)).release()

    @invariant()
    def accounting(self) -> None:
        blocks = [
            b
            for sg in self.held
            for first, count, _ in sg.segments
            for b in range(first, first + count)
        ]
        assert len(blocks) == len(set(blocks)), "a block handed out twice"
        assert self.pool.stats.blocks_in_use == len(blocks)


TestPoolMachine = PoolMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=60))
def test_block_map_hands_out_each_block_once_and_shrinks_above_the_top(
    ops: list[tuple[bool, int]],
) -> None:
    bm = BlockMap(128, 16)
    held: list[tuple[int, int]] = []
    owner = [False] * 128
    for take, n in ops:
        if take and n <= bm.free:
            runs = bm.take(n)
            assert sum(c for _, c in runs) == n
            for first, count in runs:
                assert first + count <= bm.thresh <= 128
                assert not any(owner[first : first + count])
                owner[first : first + count] = [True] * count
            held += runs
        elif held:
            first, count = held.pop(n % len(held))
            bm.release(first, count)
            owner[first : first + count] = [False] * count
        assert bm.in_use == sum(owner) == 128 - bm.free
    top = max((i + 1 for i, used in enumerate(owner) if used), default=0)
    before = bm.thresh
    thresh, freed = bm.shrink()
    assert thresh == bm.thresh == (max(16, top) if max(16, top) < before else before)
    assert freed == before - thresh
    if held:
        first, count = held[0]
        bm.release(first, count)
        with pytest.raises(RuntimeError, match="double free"):
            bm.release(first, count)


@given(st.lists(st.binary(max_size=40), max_size=6), st.lists(st.integers(0, 40), max_size=6))
def test_view_helpers_copy_cut_and_prefix_across_pieces(src: list[bytes], sizes: list[int]) -> None:
    data = b"".join(src)
    dst = [memoryview(bytearray(n)) for n in sizes]
    n = copy_views(src, dst)
    assert n == min(len(data), sum(sizes))
    assert b"".join(bytes(d) for d in dst)[:n] == data[:n]
    cut = len(data) // 2
    head, tail = split_views(src, cut)
    assert (b"".join(head), b"".join(tail)) == (data[:cut], data[cut:])
    assert b"".join(prefix([memoryview(s) for s in src], cut)) == data[:cut]
    assert byte_view(memoryview(b"\x01\x02").cast("H")).tolist() == [1, 2]
