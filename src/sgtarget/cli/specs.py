"""Pure parsers for command-line values: sizes, portals, iSCSI names and ``--lun`` specs.

Nothing here touches argparse, files or sockets; every parser returns a value or raises
``ValueError`` with a one-line message that quotes the offending text, so the CLI can print it
as is. Sizes are parsed by ``sgtarget.units``, which the backstores share.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Importing the package registers every backstore kind.
import sgtarget.backstores  # noqa: F401
from sgtarget.backstores.base import Backstore, BackstoreError, create, registered_kinds
from sgtarget.ring.backstore import RingBackstore, pop_ring_options
from sgtarget.scsi.constants import MAX_PHYSICAL_BLOCK_SIZE
from sgtarget.units import format_size, parse_size

__all__ = [
    "DEFAULT_ISCSI_PORT",
    "LUN_FLAGS",
    "LUN_KEYS",
    "LUN_SIZES",
    "LunSpec",
    "build_backstore",
    "format_size",
    "lun_flag",
    "lun_flags",
    "lun_physical_block_size",
    "parse_iqn",
    "parse_lun_spec",
    "parse_portal",
    "parse_size",
]

DEFAULT_ISCSI_PORT = 3260

# ---------------------------------------------------------------------------------------------
# Portals

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _parse_port(text: str, port: str) -> int:
    # isdigit() alone would accept "²" and int() would accept "+80" or " 80".
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"invalid portal {text!r}: port {port!r} is not a number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise ValueError(f"invalid portal {text!r}: port {value} outside 1..65535")
    return value


def parse_portal(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``, ``HOST``, ``[IPV6]:PORT`` or ``[IPV6]``.

    The port defaults to 3260. IPv6 addresses must be bracketed: ``::1:3260`` is itself a valid
    address, so an unbracketed form would be ambiguous. The brackets are removed from the
    returned host. Listen on every interface with ``0.0.0.0`` or ``[::]``.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid portal {text!r}: missing ']' after the IPv6 address")
        host = text[1:end]
        rest = text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid portal {text!r}: {host!r} is not an IPv6 address") from None
        if not rest:
            return host, DEFAULT_ISCSI_PORT
        if not rest.startswith(":"):
            raise ValueError(f"invalid portal {text!r}: expected ':PORT' after ']'")
        return host, _parse_port(text, rest[1:])
    if text.count(":") > 1:
        raise ValueError(f"invalid portal {text!r}: write IPv6 addresses in brackets, [ADDR]:PORT")
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"invalid portal {text!r}: empty host (use 0.0.0.0 or [::] for all)")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid portal {text!r}: {host!r} is not a host name or IPv4 address")
    return host, (_parse_port(text, port) if sep else DEFAULT_ISCSI_PORT)


# ---------------------------------------------------------------------------------------------
# iSCSI names (RFC 7143 section 4.2.7, RFC 3722)

_IQN_RE = re.compile(
    r"iqn\.\d{4}-(?:0[1-9]|1[0-2])"  # iqn.YYYY-MM
    r"\.[a-z0-9-]+(?:\.[a-z0-9-]+)*"  # .reversed.domain
    r"(?::[a-z0-9.:-]+)?"  # optional :suffix chosen by the naming authority
)
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}")
_NAA_RE = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})")
_NAME_CHARS_RE = re.compile(r"[a-z0-9.:-]+")
#: RFC 7143: iSCSI names are at most 223 bytes.
MAX_ISCSI_NAME = 223


def parse_iqn(text: str) -> str:
    """A normalised iSCSI name: ``iqn.YYYY-MM.reversed.domain[:suffix]``, ``eui.`` + 16 hex
    digits or ``naa.`` + 16 or 32 hex digits.

    RFC 3722 stringprep reduces to lower-casing for ASCII; anything outside ``[a-z0-9.:-]``
    afterwards (spaces, ``_``, non-ASCII) is refused rather than mapped.
    """
    name = text.lower()
    if not name:
        raise ValueError("invalid iSCSI name '': empty")
    if not (name.isascii() and _NAME_CHARS_RE.fullmatch(name)):
        raise ValueError(
            f"invalid iSCSI name {text!r}: only letters, digits, '.', '-' and ':' are allowed"
        )
    if len(name) > MAX_ISCSI_NAME:
        raise ValueError(f"invalid iSCSI name {text!r}: longer than {MAX_ISCSI_NAME} bytes")
    if name.startswith("iqn."):
        if not _IQN_RE.fullmatch(name):
            raise ValueError(
                f"invalid iSCSI name {text!r}: expected iqn.YYYY-MM.reversed.domain[:suffix]"
            )
    elif name.startswith("eui."):
        if not _EUI_RE.fullmatch(name):
            raise ValueError(f"invalid iSCSI name {text!r}: expected eui. and 16 hex digits")
    elif name.startswith("naa."):
        if not _NAA_RE.fullmatch(name):
            raise ValueError(f"invalid iSCSI name {text!r}: expected naa. and 16 or 32 hex digits")
    else:
        raise ValueError(f"invalid iSCSI name {text!r}: must start with iqn., eui. or naa.")
    return name


# ---------------------------------------------------------------------------------------------
# Backstore parameters and --lun specs

#: Keys of a ``--lun`` spec that configure the LUN rather than its backstore: on/off flags,
#: with what they turn on, and sizes (``LUN_SIZES``). They are split off into
#: ``LunSpec.lun_params``, never reach the backstore factory as parameters, and are the fields
#: of ``server.target.LunOptions``.
LUN_FLAGS: Mapping[str, str] = MappingProxyType(
    {
        "thin": "thin provisioning (UNMAP, WRITE SAME with UNMAP)",
        "readonly": "write-protected: every command that would modify the medium is refused",
        "removable": "removable medium (PREVENT ALLOW MEDIUM REMOVAL, eject and load)",
        "unmap": "with thin=1, the UNMAP command (on unless unmap=0; WRITE SAME with UNMAP "
        "deallocates either way)",
    }
)
#: Flags that are on unless the spec turns them off.
_FLAGS_ON = frozenset({"unmap"})
#: LUN keys whose value is a size in bytes, with what they set.
LUN_SIZES: Mapping[str, str] = MappingProxyType(
    {
        "physical_block_size": "physical block size reported to initiators (a power of two "
        f"from 512 to {format_size(MAX_PHYSICAL_BLOCK_SIZE)}; default 4K)",
    }
)
LUN_KEYS: frozenset[str] = frozenset(LUN_FLAGS) | frozenset(LUN_SIZES)
_BOOLS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}

#: Kinds whose first element may be a bare value, and the key it stands for.
_POSITIONAL_KEY = {"file": "path"}
_KEY_RE = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class LunSpec:
    """A parsed ``--lun KIND:ARGS``.

    ``params`` (backstore keys) and ``lun_params`` (keys in ``LUN_KEYS``) are read-only
    mappings of unparsed strings in spec order; pass ``dict(spec.params)`` to a factory.
    Read-only mappings are not hashable, so neither is a ``LunSpec``; equality works.
    """

    kind: str
    params: Mapping[str, str]
    lun_params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: The original text, for error messages raised after parsing.
    text: str = field(default="", compare=False)


def parse_lun_spec(text: str) -> LunSpec:
    """Parse ``KIND:ARGS``: ``ram:size=1G``, ``null:size=1T``, ``file:/tmp/x.img,size=1G``.

    ARGS is a comma-separated list of ``key=value``. For ``file`` the first element may be a
    bare path (a first element is a path unless it starts with ``key=`` for a lower-case key, so
    ``file:./size=1`` or ``file:path=size=1`` name a file called ``size=1``). Paths cannot
    contain commas. Only the grammar and the kind are checked here; the factory checks keys and
    values when ``build_backstore`` runs.
    """
    # Lazy: the backstores import this module for parse_size, and importing the registry
    # here also registers every kind (sgtarget.backstores imports them all).

    def fail(reason: str) -> ValueError:
        return ValueError(f"invalid LUN spec {text!r}: {reason}")

    kind, sep, args = text.partition(":")
    if not sep:
        raise fail("expected KIND:ARGS, e.g. ram:size=1G or file:/path/disk.img,size=10G")
    kinds = registered_kinds()
    if kind not in kinds:
        raise fail(f"unknown kind {kind!r} (known: {', '.join(kinds)})")
    params: dict[str, str] = {}
    lun_params: dict[str, str] = {}
    elements = args.split(",") if args else []
    for i, element in enumerate(elements):
        if not element:
            raise fail(f"empty element at position {i + 1}")
        key, eq, value = element.partition("=")
        if i == 0 and kind in _POSITIONAL_KEY and not (eq and _KEY_RE.fullmatch(key)):
            key, value = _POSITIONAL_KEY[kind], element
        elif not eq:
            raise fail(f"expected key=value, got {element!r}")
        elif not key:
            raise fail(f"empty key in {element!r}")
        elif not _KEY_RE.fullmatch(key):
            raise fail(f"invalid key {key!r} (lower-case letters, digits, '_' and '-')")
        elif not value:
            raise fail(f"empty value for key {key!r}")
        target = lun_params if key in LUN_KEYS else params
        if key in params or key in lun_params:
            raise fail(f"duplicate key {key!r}")
        target[key] = value
    return LunSpec(kind, MappingProxyType(params), MappingProxyType(lun_params), text)


def lun_flag(spec: LunSpec, key: str) -> bool:
    """One LUN key of ``spec`` (``thin``, ``readonly``, ...) as a flag; when not given, off
    (on for ``unmap``)."""
    if key not in LUN_FLAGS:
        raise KeyError(key)
    raw = spec.lun_params.get(key, "1" if key in _FLAGS_ON else "0")
    value = _BOOLS.get(raw.lower())
    if value is None:
        raise ValueError(
            f"invalid LUN spec {spec.text or spec.kind!r}: {key}={raw!r} is not one of "
            f"{', '.join(_BOOLS)}"
        )
    return value


def lun_flags(spec: LunSpec) -> dict[str, bool]:
    """Every LUN flag, keyed like ``LunOptions``'s fields: ``LunOptions(**flags)``.

    ``unmap=1`` given without ``thin=1`` is refused: only a thin LUN has UNMAP (``unmap=0`` on
    a fully provisioned LUN says what it is anyway, and is accepted).
    """
    flags = {key: lun_flag(spec, key) for key in LUN_FLAGS}
    if "unmap" in spec.lun_params and flags["unmap"] and not flags["thin"]:
        raise ValueError(
            f"invalid LUN spec {spec.text or spec.kind!r}: unmap=1 needs thin=1 (only a thin "
            "LUN has UNMAP)"
        )
    return flags


def lun_physical_block_size(spec: LunSpec) -> int | None:
    """``physical_block_size=SIZE`` in bytes: a power of two from 512 (the logical block size)
    to ``MAX_PHYSICAL_BLOCK_SIZE``; ``None`` when not given (the LU's default, 4K)."""
    raw = spec.lun_params.get("physical_block_size")
    if raw is None:
        return None

    def fail(reason: str) -> ValueError:
        return ValueError(
            f"invalid LUN spec {spec.text or spec.kind!r}: physical_block_size={raw!r} {reason}"
        )

    try:
        size = parse_size(raw)
    except ValueError:
        raise fail("is not a size (e.g. 512, 4K)") from None
    if size & (size - 1) or not 512 <= size <= MAX_PHYSICAL_BLOCK_SIZE:
        raise fail(f"is not a power of two from 512 to {format_size(MAX_PHYSICAL_BLOCK_SIZE)}")
    return size


def build_backstore(spec: LunSpec) -> Backstore:
    """Create the backstore a spec names; any refusal becomes one ``ValueError`` quoting it.

    ``readonly=1`` also reaches the factory, so a file is opened read-only (a read-only image
    can be served). ``handler=copy|zerocopy|isolated`` (``ring.backstore.RING_KEYS``) wraps it
    in a ``RingBackstore`` whose handler processes start with the server; with ``pi=`` and
    ``handler_pi=1`` the handler, not the target, stores the LUN's PI tuples (the target still
    creates the sidecar).
    """
    params = dict(spec.params)
    try:
        # Handler keys first: a bad value should not leave a file created behind it.
        ring = pop_ring_options(spec.kind, params)
        inner = create(spec.kind, params, readonly=lun_flag(spec, "readonly"))
        return inner if ring is None else RingBackstore.around(inner, ring)
    except (ValueError, BackstoreError) as exc:
        raise ValueError(f"invalid LUN spec {spec.text or spec.kind!r}: {exc}") from exc
