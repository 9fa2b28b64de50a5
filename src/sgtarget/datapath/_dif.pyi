from collections.abc import Sequence

_Buffer = bytes | bytearray | memoryview

def crc16(data: _Buffer, crc: int = 0, /) -> int: ...
def guards(data: _Buffer | Sequence[_Buffer], block_size: int, /) -> bytes: ...
def generate(
    data: _Buffer | Sequence[_Buffer],
    block_size: int,
    ref_tag: int,
    increment: bool,
    app_tag: int,
    /,
) -> bytearray: ...
def verify(
    data: _Buffer | Sequence[_Buffer],
    pi: _Buffer,
    block_size: int,
    ptype: int,
    guard: bool,
    app: bool,
    ref: bool,
    increment: bool,
    ref_tag: int,
    app_tag: int,
    app_mask: int,
    /,
) -> tuple[int, int] | None: ...
def copy_split(
    wire: Sequence[_Buffer],
    block_size: int,
    data: Sequence[memoryview],
    pi: Sequence[memoryview],
    /,
) -> int: ...
def copy_interleave(
    data: Sequence[_Buffer], block_size: int, pi: Sequence[_Buffer], wire: Sequence[memoryview], /
) -> int: ...
def use_clmul(on: bool, /) -> bool: ...
