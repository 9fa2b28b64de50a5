"""T10 PI helpers: CRC-16/T10-DIF golden values, tuples, SBC-4 escapes, wire split/interleave.

Every test runs against both implementations (the C extension, with and without its
carry-less path, and the fastcrc fallback) so they cannot drift apart.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sgtarget.datapath import dif
from sgtarget.datapath.dif import Check, PiError
from tests.pi_oracle import crc16 as bitwise_crc

#: For property tests that also take the ``impl`` fixture: it is the same for every example.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]

IMPLS = ["fallback"]
if dif.NATIVE:
    IMPLS += ["native", "native-table"]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name: str = request.param
    if name == "fallback":
        monkeypatch.setattr(dif, "_native", None)
        yield name
        return
    from sgtarget.datapath import _dif  # noqa: PLC0415  (only when built)

    clmul = _dif.use_clmul(True)
    if name == "native-table":
        _dif.use_clmul(False)
    try:
        yield name
    finally:
        _dif.use_clmul(clmul)


def chop(data: bytes, cuts: Sequence[int]) -> list[memoryview]:
    """``data`` as a scatter list cut at ``cuts`` (offsets, any order, duplicates: empty piece)."""
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    view = memoryview(bytearray(data))
    return [view[a:b] for a, b in itertools.pairwise(points)]


def tuple_bytes(guard: int, app: int, ref: int) -> bytes:
    return struct.pack(">HHI", guard, app, ref)


# Golden values: the catalogue check value, and CRCs that anycrc, fastcrc, libscrc and
# bitwise_crc all agree on.
GOLDEN = [
    (b"123456789", 0xD0DB),
    (bytes(512), 0x0000),
    (b"\xff" * 512, 0xE6A1),
    (bytes(range(256)) * 2, 0x4F10),
    (b"\xff" * 4096, 0x8B5D),
    (b"\xa5" * 4096, 0x186A),
]


@pytest.mark.parametrize(("data", "crc"), GOLDEN)
def test_crc_golden(impl: str, data: bytes, crc: int) -> None:
    assert dif.crc16_t10dif(data) == crc
    assert dif.crc16_t10dif(memoryview(bytearray(data))) == crc
    assert bitwise_crc(data) == crc


def test_guards_golden(impl: str) -> None:
    data = b"\xff" * 512 + bytes(512) + bytes(range(256)) * 2
    assert dif.guards(data, 512) == bytes.fromhex("e6a1 0000 4f10")
    assert dif.guards(b"\xff" * 4096 + b"\xa5" * 4096, 4096) == bytes.fromhex("8b5d 186a")
    assert dif.guards(b"", 512) == b""


def test_generate_golden(impl: str) -> None:
    data = b"\xff" * 512 + bytes(512)
    pi = dif.generate(data, 512, ref_tag=0x12345678, app_tag=0xABCD)
    assert isinstance(pi, bytearray)
    assert pi == bytes.fromhex("e6a1abcd12345678 0000abcd12345679")
    # Type 3 style: the same reference tag for every block; the tag wraps at 2**32.
    same = dif.generate(data, 512, ref_tag=7, increment=False)
    assert same == bytes.fromhex("e6a1000000000007 0000000000000007")
    wrap = dif.generate(data, 512, ref_tag=0xFFFFFFFF)
    assert wrap == bytes.fromhex("e6a10000ffffffff 0000000000000000")


def test_generate_4096(impl: str) -> None:
    pi = dif.generate(b"\xa5" * 4096, 4096, ref_tag=0)
    assert pi == tuple_bytes(0x186A, 0, 0)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=700))
def test_crc_matches_definition(data: bytes) -> None:
    # Lengths around the 16- and 64-byte strides of the native paths, in each path.
    expect = bitwise_crc(data)
    assert dif.crc16_t10dif(data) == expect
    if dif.NATIVE:
        from sgtarget.datapath import _dif  # noqa: PLC0415

        on = _dif.use_clmul(True)
        try:
            assert _dif.crc16(data) == expect
            _dif.use_clmul(False)
            assert _dif.crc16(data) == expect
        finally:
            _dif.use_clmul(on)


def test_native_crc_continues() -> None:
    if not dif.NATIVE:
        pytest.skip("the _dif extension is not built")
    from sgtarget.datapath import _dif  # noqa: PLC0415

    data = bytes(range(256)) * 3
    for cut in (0, 1, 15, 16, 63, 64, 65, 300, len(data)):
        assert _dif.crc16(data[cut:], _dif.crc16(data[:cut])) == bitwise_crc(data)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    blocks=st.integers(0, 6),
    block_size=st.sampled_from([8, 24, 512]),
    cuts=st.lists(st.integers(0, 6 * 512), max_size=6),
    seed=st.binary(min_size=1, max_size=64),
)
def test_guards_over_a_scatter_list(
    impl: str, blocks: int, block_size: int, cuts: list[int], seed: bytes
) -> None:
    data = (seed * (blocks * block_size // len(seed) + 1))[: blocks * block_size]
    expect = b"".join(
        bitwise_crc(data[i : i + block_size]).to_bytes(2, "big")
        for i in range(0, len(data), block_size)
    )
    pieces = chop(data, cuts)
    assert dif.guards(pieces, block_size) == expect
    pi = dif.generate(pieces, block_size, ref_tag=5, app_tag=9)
    assert pi == b"".join(
        tuple_bytes(int.from_bytes(expect[2 * i : 2 * i + 2], "big"), 9, 5 + i)
        for i in range(blocks)
    )


def test_sizes_are_checked(impl: str) -> None:
    with pytest.raises(ValueError, match="multiple"):
        dif.guards(bytes(513), 512)
    with pytest.raises(ValueError, match="multiple"):
        dif.generate([bytes(512), bytes(1)], 512, ref_tag=0)
    with pytest.raises(ValueError, match="PI bytes"):
        dif.verify(bytes(512), bytes(16), 512, ptype=1, guard=True, app=True, ref=True, ref_tag=0)
    with pytest.raises(ValueError, match="not positive"):
        dif.guards(b"", 0)
    with pytest.raises(ValueError, match="32 bits"):
        dif.generate(bytes(512), 512, ref_tag=1 << 32)
    with pytest.raises(ValueError, match="16 bits"):
        dif.generate(bytes(512), 512, ref_tag=0, app_tag=0x10000)
    with pytest.raises(ValueError, match="protection type"):
        dif.verify(bytes(512), bytes(8), 512, ptype=0, guard=True, app=True, ref=True, ref_tag=0)


# --- verify ---------------------------------------------------------------------------------

BLOCK = b"\xff" * 512  # guard E6A1
ALL = {"guard": True, "app": True, "ref": True}


def check(pi: bytes, *, ptype: int = 1, ref_tag: int = 100, **kw: object) -> PiError | None:
    args: dict[str, object] = {**ALL, "app_tag": 0x1234, "app_mask": 0xFFFF, **kw}
    return dif.verify(BLOCK, pi, 512, ptype=ptype, ref_tag=ref_tag, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("ptype", [1, 2, 3])
def test_verify_good_tuple(impl: str, ptype: int) -> None:
    assert check(tuple_bytes(0xE6A1, 0x1234, 100), ptype=ptype) is None


@pytest.mark.parametrize(
    ("pi", "found"),
    [
        (tuple_bytes(0xE6A0, 0x1234, 100), Check.GUARD),
        (tuple_bytes(0xE6A1, 0x1235, 100), Check.APP),
        (tuple_bytes(0xE6A1, 0x1234, 101), Check.REF),
        # Several wrong: guard, then application tag, then reference tag.
        (tuple_bytes(0, 0, 0), Check.GUARD),
        (tuple_bytes(0xE6A1, 0, 0), Check.APP),
    ],
)
def test_verify_reports_the_failed_check(impl: str, pi: bytes, found: Check) -> None:
    assert check(pi) == PiError(0, found)
    assert int(found) in (1, 2, 3)  # the ASCQ of ASC 10h


def test_verify_only_the_checks_asked(impl: str) -> None:
    bad = tuple_bytes(0, 0, 0)
    assert check(bad, guard=False) == PiError(0, Check.APP)
    assert check(bad, guard=False, app=False) == PiError(0, Check.REF)
    assert check(bad, guard=False, app=False, ref=False) is None
    # The mask picks the application tag bits compared.
    assert check(tuple_bytes(0xE6A1, 0x12FF, 100), app_mask=0xFF00) is None
    assert check(tuple_bytes(0xE6A1, 0x12FF, 100), app_mask=0x00F0) == PiError(0, Check.APP)
    assert check(tuple_bytes(0xE6A1, 0x9999, 100), app_mask=0) is None


# SBC-4: types 1 and 2 skip every check of a block whose application tag is FFFFh; type 3 only
# when the reference tag is FFFFFFFFh as well.
ESCAPES = [
    (1, 0xFFFF, 0, None),
    (2, 0xFFFF, 0, None),
    (3, 0xFFFF, 0, PiError(0, Check.GUARD)),
    (1, 0xFFFF, 0xFFFFFFFF, None),
    (2, 0xFFFF, 0xFFFFFFFF, None),
    (3, 0xFFFF, 0xFFFFFFFF, None),
    (1, 0xFFFE, 0xFFFFFFFF, PiError(0, Check.GUARD)),
    (3, 0xFFFE, 0xFFFFFFFF, PiError(0, Check.GUARD)),
    (3, 0x0000, 0xFFFFFFFF, PiError(0, Check.GUARD)),
]


@pytest.mark.parametrize(("ptype", "app", "ref", "found"), ESCAPES)
def test_verify_escapes(impl: str, ptype: int, app: int, ref: int, found: PiError | None) -> None:
    # A wrong guard: only an escape lets it through.
    assert check(tuple_bytes(0xBAD0, app, ref), ptype=ptype) == found


def test_verify_escape_is_per_block(impl: str) -> None:
    data = BLOCK * 3
    pi = (
        tuple_bytes(0xE6A1, 1, 7)
        + tuple_bytes(0, 0xFFFF, 0)  # escaped: garbage guard and reference tag pass
        + tuple_bytes(0xE6A1, 1, 10)  # expected 9
    )
    found = dif.verify(data, pi, 512, ptype=1, **ALL, ref_tag=7, app_tag=1, app_mask=0xFFFF)
    assert found == PiError(2, Check.REF)


@pytest.mark.parametrize("guard", [True, False])
def test_verify_steps_over_skipped_blocks_across_pieces(impl: str, guard: bool) -> None:
    # Blocks cut across buffers, the middle one escaped or not guard-checked: the next block's
    # guard must still be computed over its own bytes.
    data = bytes(range(256)) * 2 + BLOCK + bytes(512)
    pi = tuple_bytes(0x4F10, 1, 7) + tuple_bytes(0, 0xFFFF, 0) + tuple_bytes(0, 1, 9)
    pieces = chop(data, [100, 700, 1300])
    flags = {"guard": guard, "app": True, "ref": True}
    assert (
        dif.verify(pieces, pi, 512, ptype=2, **flags, ref_tag=7, app_tag=1, app_mask=0xFFFF) is None
    )
    bad = pi[:-1] + b"\x0a"
    found = dif.verify(pieces, bad, 512, ptype=2, **flags, ref_tag=7, app_tag=1, app_mask=0xFFFF)
    assert found == PiError(2, Check.REF)
    if guard:
        wrong = pi[:16] + tuple_bytes(1, 1, 9)
        found = dif.verify(
            pieces, wrong, 512, ptype=2, **flags, ref_tag=7, app_tag=1, app_mask=0xFFFF
        )
        assert found == PiError(2, Check.GUARD)


def test_verify_reference_tags(impl: str) -> None:
    data = BLOCK * 3
    inc = dif.generate(data, 512, ref_tag=0xFFFFFFFE)
    assert dif.verify(data, inc, 512, ptype=1, **ALL, ref_tag=0xFFFFFFFE) is None
    assert dif.verify(data, inc, 512, ptype=1, **ALL, ref_tag=0xFFFFFFFD) == PiError(0, Check.REF)
    same = dif.generate(data, 512, ref_tag=42, increment=False)
    assert dif.verify(data, same, 512, ptype=3, **ALL, ref_tag=42, increment=False) is None
    assert dif.verify(data, same, 512, ptype=3, **ALL, ref_tag=42) == PiError(1, Check.REF)


def test_verify_takes_pi_pieces(impl: str) -> None:
    data = BLOCK * 2
    pi = bytes(dif.generate(data, 512, ref_tag=3))
    pieces = [memoryview(pi)[:5], memoryview(pi)[5:12], memoryview(pi)[12:]]
    assert dif.verify(data, pieces, 512, ptype=1, **ALL, ref_tag=3) is None


CORRUPT = st.sampled_from([Check.GUARD, Check.APP, Check.REF])


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    nblocks=st.integers(1, 12),
    block_size=st.sampled_from([16, 512]),
    seed=st.binary(min_size=1, max_size=32),
    damage=st.lists(
        st.tuples(st.integers(0, 11), CORRUPT, st.integers(1, 0xFFFF)), min_size=1, max_size=4
    ),
    where=st.sampled_from(["pi", "data"]),
    ptype=st.sampled_from([1, 2, 3]),
    cuts=st.lists(st.integers(0, 12 * 512), max_size=4),
)
def test_verify_finds_the_first_corrupted_block(  # noqa: PLR0917 - one per hypothesis strategy
    impl: str,
    nblocks: int,
    block_size: int,
    seed: bytes,
    damage: list[tuple[int, Check, int]],
    where: str,
    ptype: int,
    cuts: list[int],
) -> None:
    data = bytearray((seed * (nblocks * block_size))[: nblocks * block_size])
    app_tag = 0x0102
    pi = dif.generate(data, block_size, ref_tag=1000, app_tag=app_tag)
    # One change per block: two could cancel out.
    hits = list({i: (i, c, x) for i, c, x in reversed(damage) if i < nblocks}.values())
    assume(hits)
    for i, field, flip in hits:
        if where == "data" or field is Check.GUARD:
            if where == "data":
                data[i * block_size + flip % block_size] ^= flip & 0xFF or 1
            else:
                pi[i * 8] ^= flip >> 8
                pi[i * 8 + 1] ^= flip & 0xFF
        elif field is Check.APP:
            pi[i * 8 + 2] ^= flip >> 8
            pi[i * 8 + 3] ^= flip & 0xFF
        else:
            pi[i * 8 + 7] ^= flip & 0xFF or 1
    # The application tag never becomes the escape FFFFh: 0x0102 ^ flip != 0xFFFF unless
    # flip is 0xFEFD.
    assume(all(pi[i * 8 + 2 : i * 8 + 4] != b"\xff\xff" for i in range(nblocks)))
    # Which blocks now fail, and on which check, by the definition.
    expect = None
    for i in range(nblocks):
        got_guard, got_app, got_ref = struct.unpack_from(">HHI", pi, i * 8)
        block = bytes(data[i * block_size : (i + 1) * block_size])
        if got_guard != bitwise_crc(block):
            expect = PiError(i, Check.GUARD)
        elif got_app != app_tag:
            expect = PiError(i, Check.APP)
        elif got_ref != 1000 + i:
            expect = PiError(i, Check.REF)
        if expect is not None:
            break
    # A data flip may leave the guard right only if the CRC collides: it cannot for one byte.
    assert expect is not None
    assert expect.index == min(i for i, _, _ in hits)
    found = dif.verify(
        chop(bytes(data), cuts), pi, block_size, ptype=ptype, **ALL, ref_tag=1000,
        app_tag=app_tag, app_mask=0xFFFF,
    )  # fmt: skip
    assert found == expect


# --- split / interleave -----------------------------------------------------------------------


def wire_of(data: bytes, pi: bytes, block_size: int) -> bytes:
    n = len(data) // block_size
    return b"".join(
        data[i * block_size : (i + 1) * block_size] + pi[i * 8 : i * 8 + 8] for i in range(n)
    )


def test_split_golden(impl: str) -> None:
    wire = b"AAAA" + b"11111111" + b"BBBB" + b"22222222"
    data, pi = dif.split([wire[:6], wire[6:12], wire[12:]], 4)
    assert [bytes(p) for p in data] == [b"AAAA", b"BBBB"]
    assert [bytes(p) for p in pi] == [b"11", b"111111", b"22222222"]
    data, pi = dif.split([wire[:2], wire[2:]], 4)
    assert [bytes(p) for p in data] == [b"AA", b"AA", b"BBBB"]
    assert dif.split_segments([wire[:2], wire[2:]], 4) == 3


def test_interleave_golden(impl: str) -> None:
    out = dif.interleave([b"AAAAB", b"BBB"], b"1111111122222222", 4)
    assert [bytes(p) for p in out] == [b"AAAA", b"11111111", b"B", b"BBB", b"22222222"]


def test_split_refuses_a_cut_block(impl: str) -> None:
    with pytest.raises(ValueError, match="ends"):
        dif.split([b"x" * 13], 4)
    with pytest.raises(ValueError, match="PI bytes"):
        dif.interleave([b"x" * 8], b"y" * 8, 4)


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    nblocks=st.integers(0, 10),
    block_size=st.sampled_from([1, 4, 16, 512]),
    cuts=st.lists(st.integers(0, 10 * 520), max_size=8),
    dcuts=st.lists(st.integers(0, 10 * 512), max_size=5),
    seed=st.binary(min_size=1, max_size=16),
)
def test_split_interleave_round_trip(  # noqa: PLR0917 - one per hypothesis strategy
    impl: str, nblocks: int, block_size: int, cuts: list[int], dcuts: list[int], seed: bytes
) -> None:
    data = (seed * (nblocks * block_size))[: nblocks * block_size]
    pi = bytes((i * 37 + 5) & 0xFF for i in range(nblocks * 8))
    wire = wire_of(data, pi, block_size)
    received = chop(wire, cuts)
    dpieces, ppieces = dif.split(received, block_size)
    assert b"".join(dpieces) == data
    assert b"".join(ppieces) == pi
    assert len(dpieces) == dif.split_segments(received, block_size)
    assert all(len(p) for p in dpieces + ppieces)
    # In place: every piece is a view of the received buffer, not a copy.
    owners = {id(v.obj) for v in received}
    assert all(id(p.obj) in owners for p in dpieces + ppieces)
    # Each block's data pieces: one per buffer it meets.
    assert len(dpieces) <= nblocks + len(received)
    out = dif.interleave(chop(data, dcuts), pi, block_size)
    assert b"".join(out) == wire
    assert b"".join(dif.interleave(dpieces, b"".join(ppieces), block_size)) == wire


def test_split_1mib_of_pool_sized_buffers(impl: str) -> None:
    # 1 MiB of 512-byte blocks received into 64 KiB buffers: 2,048 blocks, a few straddle.
    block_size = 512
    data = bytes(range(256)) * 4096
    pi = bytes(dif.generate(data, block_size, ref_tag=0))
    wire = wire_of(data, pi, block_size)
    received = chop(wire, list(range(65536, len(wire), 65536)))
    dpieces, ppieces = dif.split(received, block_size)
    assert len(dpieces) == dif.split_segments(received, block_size) > 2048
    assert dif.verify(dpieces, ppieces, block_size, ptype=1, **ALL, ref_tag=0) is None


# --- segment limits -----------------------------------------------------------------------


def test_gather_within_limit_is_zero_copy() -> None:
    pieces = chop(b"abcdefgh", [2, 5])
    out = dif.gather(pieces, 3)
    assert len(out) == 3
    assert all(o.obj is p.obj for o, p in zip(out, pieces, strict=True))


def test_gather_bounces_over_the_limit() -> None:
    pieces = chop(bytes(range(100)), [10, 20, 30, 40, 50])
    out = dif.gather(pieces, 2)
    assert len(out) == 1
    assert bytes(out[0]) == bytes(range(100))
    bounce = [memoryview(bytearray(64)), memoryview(bytearray(64))]
    out = dif.gather(pieces, 2, bounce)
    assert [len(o) for o in out] == [64, 36]
    assert b"".join(out) == bytes(range(100))
    assert out[0].obj is bounce[0].obj
    # READ through the bounce: the consumer fills it, the pieces get the bytes back.
    out[0][:] = b"z" * 64
    assert dif.scatter(out, pieces) == 100
    assert b"".join(pieces) == b"z" * 64 + bytes(range(64, 100))


def test_gather_refuses_a_bad_bounce() -> None:
    pieces = chop(bytes(10), [1, 2, 3])
    with pytest.raises(ValueError, match="cannot hold"):
        dif.gather(pieces, 2, [memoryview(bytearray(9))])
    with pytest.raises(ValueError, match="exceed"):
        dif.gather(pieces, 2, [memoryview(bytearray(5))] * 3)
    with pytest.raises(ValueError, match="below 1"):
        dif.gather(pieces, 0)


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(
    nblocks=st.integers(0, 8),
    block_size=st.sampled_from([1, 4, 512]),
    cuts=st.lists(st.integers(0, 8 * 520), max_size=6),
    dcuts=st.lists(st.integers(0, 8 * 512), max_size=4),
    pcuts=st.lists(st.integers(0, 64), max_size=3),
    spare=st.integers(0, 9),
)
def test_copy_forms_match_the_views(  # noqa: PLR0917 - one per hypothesis strategy
    impl: str,
    nblocks: int,
    block_size: int,
    cuts: list[int],
    dcuts: list[int],
    pcuts: list[int],
    spare: int,
) -> None:
    data = bytes((i * 7 + i // 251) & 0xFF for i in range(nblocks * block_size))
    pi = bytes((i * 37 + 5) & 0xFF for i in range(nblocks * 8))
    wire = wire_of(data, pi, block_size)
    # Destinations cut anywhere, with room to spare: filled from the start.
    data_out = chop(bytes(len(data) + spare), dcuts)
    pi_out = chop(bytes(len(pi) + spare), pcuts)
    assert dif.split_into(chop(wire, cuts), block_size, data_out, pi_out) == nblocks
    assert b"".join(data_out)[: len(data)] == data
    assert b"".join(pi_out)[: len(pi)] == pi
    wire_out = chop(bytes(len(wire) + spare), cuts)
    assert dif.interleave_into(chop(data, dcuts), chop(pi, pcuts), block_size, wire_out) == nblocks
    assert b"".join(wire_out)[: len(wire)] == wire


def test_copy_forms_refuse_short_buffers(impl: str) -> None:
    wire = wire_of(bytes(1024), bytes(16), 512)
    with pytest.raises(ValueError, match="data buffers"):
        dif.split_into([wire], 512, [memoryview(bytearray(1023))], bytearray(16))
    with pytest.raises(ValueError, match="PI buffers"):
        dif.split_into([wire], 512, bytearray(1024), bytearray(15))
    with pytest.raises(ValueError, match="ends"):
        dif.split_into([wire[:-1]], 512, bytearray(1024), bytearray(16))
    with pytest.raises(ValueError, match="wire buffers"):
        dif.interleave_into(bytes(1024), bytes(16), 512, bytearray(len(wire) - 1))
    with pytest.raises(ValueError, match="PI buffers"):
        dif.interleave_into(bytes(1024), bytes(8), 512, bytearray(len(wire)))
