"""The pure CLI parsers: sizes, portals, iSCSI names and --lun specs."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget import units
from sgtarget.backstores.file import FileBackstore
from sgtarget.backstores.ram import RamBackstore
from sgtarget.cli import specs
from sgtarget.cli.specs import (
    LUN_KEYS,
    LunSpec,
    build_backstore,
    format_size,
    parse_iqn,
    parse_lun_spec,
    parse_portal,
    parse_size,
)

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1073741824", G),
        ("512", 512),
        ("512B", 512),
        ("512b", 512),
        ("1K", K),
        ("1k", K),
        ("1KB", K),
        ("1KiB", K),
        ("1kib", K),
        ("1Ki", K),
        ("64M", 64 * M),
        ("64MiB", 64 * M),
        ("1G", G),
        ("1T", T),
        ("2P", 2 << 50),
        ("1E", 1 << 60),
        ("1.5G", 3 * G // 2),
        ("1.5K", 1536),
        ("0.5K", 512),
        ("1.0", 1),
        ("1.25M", 1310720),
        (" 4K ", 4 * K),
        ("4 K", 4 * K),
        ("007", 7),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected a number"),
        ("  ", "expected a number"),
        ("G", "expected a number"),
        ("-1", "must not be negative"),
        ("-1G", "must not be negative"),
        ("0", "must be greater than zero"),
        ("0K", "must be greater than zero"),
        ("0.0G", "must be greater than zero"),
        ("1.5", "not a whole number of bytes"),
        ("0.3K", "not a whole number of bytes"),
        ("1e9", "expected a number"),
        ("1X", "expected a number"),
        ("1iB", "expected a number"),
        ("1KK", "expected a number"),
        ("1 G B", "expected a number"),
        ("0x10", "expected a number"),
        ("1_000", "expected a number"),
        ("+5", "expected a number"),
        (".5K", "expected a number"),
        ("5.K", "expected a number"),
        ("\u0661\u0662", "expected a number"),  # Arabic-Indic digits
        ("8E", "larger than 2^63-1"),
    ],
)
def test_parse_size_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_parse_size_allow_zero() -> None:
    assert parse_size("0", allow_zero=True) == 0
    assert parse_size("0M", allow_zero=True) == 0


UNITS = {"": 1, "K": K, "M": M, "G": G, "T": T, "P": 1 << 50}


@given(
    n=st.integers(min_value=1, max_value=(1 << 13) - 1),  # 8191P still fits in 63 bits
    unit=st.sampled_from(sorted(UNITS)),
    lower=st.booleans(),
    suffix=st.sampled_from(["", "B", "iB", "i"]),
)
def test_parse_size_units(n: int, unit: str, lower: bool, suffix: str) -> None:
    if not unit and suffix != "B":
        suffix = ""
    text = f"{n}{unit}{suffix}"
    assert parse_size(text.lower() if lower else text) == n * UNITS[unit]


@given(st.integers(min_value=1, max_value=units.MAX_SIZE))
def test_format_size_round_trips(size: int) -> None:
    text = format_size(size)
    assert parse_size(text) == size
    assert format_size(parse_size(text)) == text


@given(
    whole=st.integers(min_value=0, max_value=1 << 20),
    frac=st.integers(min_value=0, max_value=999),
    unit=st.sampled_from(["K", "M", "G"]),
)
def test_parse_size_fractions_exact_or_refused(whole: int, frac: int, unit: str) -> None:
    text = f"{whole}.{frac:03d}{unit}"
    numerator = (whole * 1000 + frac) * UNITS[unit]
    if numerator == 0:
        with pytest.raises(ValueError, match="greater than zero"):
            parse_size(text)
    elif numerator % 1000:
        with pytest.raises(ValueError, match="not a whole number of bytes"):
            parse_size(text)
    else:
        assert parse_size(text) == numerator // 1000


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1, 1536, K, 3 * G, T + K)] == [
        "0",
        "1",
        "1536",
        "1K",
        "3G",
        "1073741825K",
    ]


# --- portals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3260", ("127.0.0.1", 3260)),
        ("0.0.0.0:3261", ("0.0.0.0", 3261)),
        ("localhost", ("localhost", 3260)),
        ("target.example.com:1", ("target.example.com", 1)),
        ("host-1.lan:65535", ("host-1.lan", 65535)),
        ("[::1]:3260", ("::1", 3260)),
        ("[::1]", ("::1", 3260)),
        ("[::]:860", ("::", 860)),
        ("[fe80::1%eth0]:3260", ("fe80::1%eth0", 3260)),
        ("[2001:db8::7]", ("2001:db8::7", 3260)),
    ],
)
def test_parse_portal(text: str, expected: tuple[str, int]) -> None:
    assert parse_portal(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty host"),
        (":3260", "empty host"),
        ("host:", "port '' is not a number"),
        ("host:0", "port 0 outside 1..65535"),
        ("host:65536", "port 65536 outside 1..65535"),
        ("host:-1", "port '-1' is not a number"),
        ("host:+80", "port '+80' is not a number"),
        ("host: 80", "port ' 80' is not a number"),
        ("host:http", "port 'http' is not a number"),
        ("host:\u00b2", "is not a number"),
        ("::1", "write IPv6 addresses in brackets"),
        ("::1:3260", "write IPv6 addresses in brackets"),
        ("[::1", "missing ']'"),
        ("[::1]3260", "expected ':PORT' after ']'"),
        ("[::1]:", "port '' is not a number"),
        ("[127.0.0.1]:3260", "is not an IPv6 address"),
        ("[]:3260", "is not an IPv6 address"),
        ("bad host:3260", "is not a host name"),
        ("-host:3260", "is not a host name"),
        ("a..b", "is not a host name"),
        ("host/24", "is not a host name"),
    ],
)
def test_parse_portal_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        parse_portal(text)
    assert repr(text) in str(info.value)


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=65535))
def test_parse_portal_ipv4(addr: ipaddress.IPv4Address, port: int) -> None:
    assert parse_portal(f"{addr}:{port}") == (str(addr), port)
    assert parse_portal(str(addr)) == (str(addr), 3260)


@given(st.ip_addresses(v=6), st.integers(min_value=1, max_value=65535))
def test_parse_portal_ipv6(addr: ipaddress.IPv6Address, port: int) -> None:
    assert parse_portal(f"[{addr}]:{port}") == (str(addr), port)
    assert parse_portal(f"[{addr}]") == (str(addr), 3260)
    with pytest.raises(ValueError, match="brackets"):
        parse_portal(f"{addr}:{port}")


@given(st.integers().filter(lambda p: not 1 <= p <= 65535))
def test_parse_portal_port_range(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        parse_portal(f"localhost:{port}")


# --- iSCSI names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iqn.2003-01.org.linux-iscsi.host:sn.1234", "iqn.2003-01.org.linux-iscsi.host:sn.1234"),
        ("IQN.2024-05.Org.Example:Disk-1", "iqn.2024-05.org.example:disk-1"),
        ("iqn.1991-05.com.microsoft", "iqn.1991-05.com.microsoft"),
        ("iqn.2001-04.com.example:storage:diskarrays-sn-a8675309", None),
        ("eui.02004567A425678D", "eui.02004567a425678d"),
        ("naa.52004567BA64678D", "naa.52004567ba64678d"),
        ("naa.62004567BA64678D0123456789ABCDEF", "naa.62004567ba64678d0123456789abcdef"),
    ],
)
def test_parse_iqn(text: str, expected: str | None) -> None:
    assert parse_iqn(text) == (expected or text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("iqn.2003-01.org.example:has space", "only letters, digits"),
        ("iqn.2003-01.org.example:under_score", "only letters, digits"),
        ("iqn.2003-01.org.exämple", "only letters, digits"),
        ("iqn.2003-1.org.example", "expected iqn.YYYY-MM"),
        ("iqn.2003-13.org.example", "expected iqn.YYYY-MM"),
        ("iqn.2003-00.org.example", "expected iqn.YYYY-MM"),
        ("iqn.03-01.org.example", "expected iqn.YYYY-MM"),
        ("iqn.2003-01", "expected iqn.YYYY-MM"),
        ("iqn.2003-01.", "expected iqn.YYYY-MM"),
        ("iqn.2003-01.org..example", "expected iqn.YYYY-MM"),
        ("iqn.2003-01.org.example:", "expected iqn.YYYY-MM"),
        ("iqn.2003-01:org.example", "expected iqn.YYYY-MM"),
        ("eui.02004567a425678", "eui. and 16 hex digits"),
        ("eui.02004567a425678g", "eui. and 16 hex digits"),
        ("naa.52004567ba64678d00", "naa. and 16 or 32 hex digits"),
        ("iqn.2003-01.org.example:" + "x" * 200, "longer than 223 bytes"),
        ("org.example:target", "must start with iqn., eui. or naa."),
        ("iqn", "must start with iqn., eui. or naa."),
    ],
)
def test_parse_iqn_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_iqn(text)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:"))
def test_parse_iqn_lowercases_valid_names(suffix: str) -> None:
    text = f"iqn.2024-01.com.Example:x{suffix}"
    if len(text) > 223:
        return
    assert parse_iqn(text) == text.lower()


# --- --lun specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "params"),
    [
        ("ram:size=1G", "ram", {"size": "1G"}),
        ("null:size=1T", "null", {"size": "1T"}),
        ("file:/tmp/x.img,size=1G", "file", {"path": "/tmp/x.img", "size": "1G"}),
        ("file:/tmp/x.img", "file", {"path": "/tmp/x.img"}),
        ("file:path=/tmp/x.img,size=1G", "file", {"path": "/tmp/x.img", "size": "1G"}),
        ("file:size=1G,path=/tmp/x.img", "file", {"size": "1G", "path": "/tmp/x.img"}),
        ("file:disk.img", "file", {"path": "disk.img"}),
        ("file:/tmp/a=b.img", "file", {"path": "/tmp/a=b.img"}),
        ("file:./size=1", "file", {"path": "./size=1"}),
        ("file:path=size=1", "file", {"path": "size=1"}),
        ("file:/dev/shm/x:y.img", "file", {"path": "/dev/shm/x:y.img"}),
        ("ram:", "ram", {}),
        ("ram:size=1G,pi=2,handler=zerocopy", "ram", None),
    ],
)
def test_parse_lun_spec(text: str, kind: str, params: dict[str, str] | None) -> None:
    spec = parse_lun_spec(text)
    assert spec.kind == kind
    if params is not None:
        assert dict(spec.params) == params
        assert list(spec.params) == list(params)  # spec order kept
    assert dict(spec.lun_params) == {}
    assert spec.text == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ram", "expected KIND:ARGS"),
        ("", "expected KIND:ARGS"),
        ("/tmp/x.img", "expected KIND:ARGS"),
        ("disk:size=1G", "unknown kind 'disk' (known: file, null, ram)"),
        (":size=1G", "unknown kind ''"),
        ("RAM:size=1G", "unknown kind 'RAM'"),
        ("ram:size=1G,size=2G", "duplicate key 'size'"),
        ("file:/x,path=/y", "duplicate key 'path'"),
        ("ram:=1G", "empty key in '=1G'"),
        ("ram:size=1G,,thin=1", "empty element at position 2"),
        ("ram:size=1G,", "empty element at position 2"),
        ("file:,size=1G", "empty element at position 1"),
        ("ram:size", "expected key=value, got 'size'"),
        ("null:1T", "expected key=value, got '1T'"),
        ("file:/x,/y", "expected key=value, got '/y'"),
        ("ram:size=", "empty value for key 'size'"),
        ("ram:Size=1G", "invalid key 'Size'"),
        ("ram:si ze=1G", "invalid key 'si ze'"),
        ("file:/x, size=1G", "invalid key ' size'"),
    ],
)
def test_parse_lun_spec_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        parse_lun_spec(text)
    msg = str(info.value)
    assert msg.startswith(f"invalid LUN spec {text!r}: ")
    assert "\n" not in msg


def test_lun_spec_is_read_only() -> None:
    spec = parse_lun_spec("ram:size=1G")
    with pytest.raises(TypeError):
        spec.params["size"] = "2G"  # type: ignore[index]
    assert spec == LunSpec("ram", {"size": "1G"})  # text does not take part in equality
    assert {"thin", "readonly", "removable", "unmap", "physical_block_size"} == LUN_KEYS


def test_lun_keys_are_split_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(specs, "LUN_KEYS", frozenset({"removable", "readonly"}))
    spec = parse_lun_spec("file:/x.img,size=1G,readonly=1,removable=0")
    assert dict(spec.params) == {"path": "/x.img", "size": "1G"}
    assert dict(spec.lun_params) == {"readonly": "1", "removable": "0"}
    with pytest.raises(ValueError, match="duplicate key 'readonly'"):
        parse_lun_spec("ram:size=1G,readonly=1,readonly=0")


def test_build_backstore(tmp_path: Path) -> None:
    ram = build_backstore(parse_lun_spec("ram:size=1M"))
    assert isinstance(ram, RamBackstore)
    assert ram.size == M
    ram.close()
    path = tmp_path / "d.img"
    disk = build_backstore(parse_lun_spec(f"file:{path},size=64K"))
    assert isinstance(disk, FileBackstore)
    assert disk.size == 64 * K
    disk.close()
    again = build_backstore(parse_lun_spec(f"file:{path}"))
    assert again.size == 64 * K
    again.close()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ram:size=1G,pii=1", "ram: unknown key 'pii' (accepted: bs, pi, size)"),
        ("ram:", "ram: missing required key 'size'"),
        ("null:size=lots", "invalid size 'lots'"),
        ("ram:size=1000", "not a positive multiple of 512"),
        ("file:{tmp}/none.img", "does not exist (give size= to create it)"),
        ("file:{tmp}/nodir/x.img,size=1M", "directory missing"),
    ],
)
def test_build_backstore_rejects(tmp_path: Path, text: str, fragment: str) -> None:
    text = text.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        build_backstore(parse_lun_spec(text))
    msg = str(info.value)
    assert msg.startswith(f"invalid LUN spec {text!r}: ")
    assert "\n" not in msg


def test_build_backstore_lock_conflict(tmp_path: Path) -> None:
    path = tmp_path / "busy.img"
    held = FileBackstore(path, 4096)
    try:
        with pytest.raises(ValueError, match="already in use"):
            build_backstore(parse_lun_spec(f"file:{path}"))
    finally:
        held.close()
