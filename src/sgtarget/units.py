"""Byte sizes as people write them (``64M``, ``1GiB``) and back.

Shared by the CLI and the backstores' parameter parsing, so it sits below both.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE_RE = re.compile(r"(\d+)(?:\.(\d+))?\s*(?:([kmgtpe])(i?)b?|b)?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_UNITS["e"] = 1 << 60
#: off_t is signed 64-bit; nothing larger can be a file or a device size.
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """Bytes from ``"512"``, ``"4k"``, ``"64M"``, ``"1GiB"``, ``"1.5G"``, ``"2T"``, ``"512B"``.

    Units are binary (K = 1024) whatever the spelling (``K``, ``KB``, ``KiB``, ``Ki``), case
    insensitive. A fraction is accepted only when it names a whole number of bytes
    (``"1.5K"`` = 1536, ``"0.3K"`` is refused) so a size never silently rounds.
    Zero is refused unless ``allow_zero``; negative numbers and garbage always are.
    """
    stripped = text.strip()
    m = _SIZE_RE.fullmatch(stripped)
    if m is None:
        if stripped.startswith("-"):
            raise ValueError(f"invalid size {text!r}: must not be negative")
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional unit K, M, G, T, P, E "
            "(binary, e.g. 512, 4K, 64MiB, 1.5G)"
        )
    whole, frac, unit, _i = m.groups()
    number = Fraction(int(whole))
    if frac:
        number += Fraction(int(frac), 10 ** len(frac))
    value = number * _SIZE_UNITS[(unit or "").lower()]
    if value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    size = int(value)
    if size == 0 and not allow_zero:
        raise ValueError(f"invalid size {text!r}: must be greater than zero")
    if size > MAX_SIZE:
        raise ValueError(f"invalid size {text!r}: larger than 2^63-1 bytes")
    return size


def format_size(size: int) -> str:
    """The shortest exact spelling ``parse_size`` reads back: ``1536`` -> ``"1536"``, ``"1G"``."""
    if size < 0:
        raise ValueError(f"invalid size {size}: must not be negative")
    for unit in "EPTGMK":
        mult = _SIZE_UNITS[unit.lower()]
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    return str(size)
