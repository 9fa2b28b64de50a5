"""iSCSI text keys: the key=value codec and the target side of login negotiation (RFC 7143).

Sans-I/O: pairs in, answer pairs out. The login layer owns PDUs, stages, T/C bits and status
codes; this module owns what each key means.

Text format (§6.1). Every pair is ``key=value`` followed by one NUL, UTF-8. The login/text
layer joins the data segments of a C-bit sequence before calling :func:`parse_text`. On input we
are lenient where it costs nothing (a missing final NUL, and empty strings between NULs, which
some initiators leave as padding, are accepted) and strict where the data is ambiguous (a pair
without ``=``, an empty or over-long key or value, bad UTF-8 -> :class:`TextFormatError`). On
output every pair is NUL-terminated.

Negotiation (§6.2, §13). Every key the target understands is one row of :data:`KEYS`. Decisions
where the RFC leaves a choice or the brief was ambiguous:

* Answers are always sent, even where §6.2.2 makes them optional (AND with "No", OR with "Yes"):
  the initiator then never has to infer a result.
* Out-of-range or ill-formed values answer ``Reject`` (§6.2: "Reject" for values the acceptor
  may not use) and the key keeps its default; the login goes on. A bad MaxRecvDataSegmentLength
  (declarative: never answered) is dropped and the safe default 8192 kept.
* A key may be negotiated or declared only once per login (§6.1/§6.2: "An attempt to
  renegotiate/redeclare parameters not specifically allowed MUST be detected ... Login reject
  (initiator error)"): :class:`NegotiationError` 0x02/0x00. Exception for real initiators:
  libiscsi repeats InitiatorName, InitiatorAlias, TargetName and SessionType in the first
  operational request after a security stage; an identical re-declaration of those is ignored.
* A key used outside its stage (an operational key in the security stage, AuthMethod in the
  operational stage, SendTargets during login) answers ``Irrelevant`` and does not count as
  negotiated, so it may be offered again in the right stage.
* Leading-only (LO) keys on a non-leading connection answer ``Irrelevant`` (the session already
  holds their values); SessionType there is ignored (declarations get no answer).
* Keys §13 calls irrelevant for discovery sessions answer ``Irrelevant`` and keep defaults.
* DataPDUInOrder and DataSequenceInOrder use OR, as §13.18/§13.19 say (the brief said AND).
* The obsoleted marker keys (§13.26): IFMarker/OFMarker answer ``No``, IFMarkInt/OFMarkInt
  answer ``Irrelevant`` (both permitted alternatives to "Reject"; "No" keeps RFC 3720
  initiators happy).
* Unknown keys, vendor keys (``X-...``, ``X#...``), target-only keys sent by the initiator and
  the CHAP/SRP/Kerberos/SPKM keys (no such method is ever selected) answer ``NotUnderstood``.
* ``Reject``/``Irrelevant``/``NotUnderstood`` received as values are answers to the target, so
  they are accepted silently and change nothing.
* FirstBurstLength never exceeds MaxBurstLength: the answer is clamped to the MaxBurstLength
  known when the request is processed, and :meth:`Negotiator.finish` clamps again.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# One Stage enum for the whole login (numbered as CSG/NSG); re-exported from here.
from sgtarget.iscsi.login_states import Stage

__all__ = [
    "KEYS",
    "Answer",
    "AuthMethod",
    "Digest",
    "Key",
    "KeyRule",
    "Kind",
    "NegotiationError",
    "Negotiator",
    "OperationalParams",
    "SessionType",
    "Stage",
    "TargetLimits",
    "TextFormatError",
    "encode_text",
    "format_target_address",
    "parse_text",
    "send_targets_response",
]


class TextFormatError(Exception):
    """Malformed key=value data; the login layer answers Initiator Error 0x0200 (or Reject)."""


class NegotiationError(Exception):
    """A negotiation problem that ends the login with the given Login Response status."""

    def __init__(self, message: str, status_class: int = 0x02, status_detail: int = 0x00) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail


#: Login status detail codes (class 0x02, initiator error) used here.
INITIATOR_ERROR = 0x00
MISSING_PARAMETER = 0x07
SESSION_TYPE_NOT_SUPPORTED = 0x09


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


class Key(enum.StrEnum):
    """Key names exactly as spelled on the wire (case matters, §6.1)."""

    AUTH_METHOD = "AuthMethod"
    HEADER_DIGEST = "HeaderDigest"
    DATA_DIGEST = "DataDigest"
    MAX_CONNECTIONS = "MaxConnections"
    SEND_TARGETS = "SendTargets"
    TARGET_NAME = "TargetName"
    INITIATOR_NAME = "InitiatorName"
    TARGET_ALIAS = "TargetAlias"
    INITIATOR_ALIAS = "InitiatorAlias"
    TARGET_ADDRESS = "TargetAddress"
    TARGET_PORTAL_GROUP_TAG = "TargetPortalGroupTag"
    INITIAL_R2T = "InitialR2T"
    IMMEDIATE_DATA = "ImmediateData"
    MAX_RECV_DATA_SEGMENT_LENGTH = "MaxRecvDataSegmentLength"
    MAX_BURST_LENGTH = "MaxBurstLength"
    FIRST_BURST_LENGTH = "FirstBurstLength"
    DEFAULT_TIME2WAIT = "DefaultTime2Wait"
    DEFAULT_TIME2RETAIN = "DefaultTime2Retain"
    MAX_OUTSTANDING_R2T = "MaxOutstandingR2T"
    DATA_PDU_IN_ORDER = "DataPDUInOrder"
    DATA_SEQUENCE_IN_ORDER = "DataSequenceInOrder"
    ERROR_RECOVERY_LEVEL = "ErrorRecoveryLevel"
    SESSION_TYPE = "SessionType"
    IF_MARKER = "IFMarker"
    OF_MARKER = "OFMarker"
    IF_MARK_INT = "IFMarkInt"
    OF_MARK_INT = "OFMarkInt"
    TASK_REPORTING = "TaskReporting"
    PROTOCOL_LEVEL = "iSCSIProtocolLevel"
    RDMA_EXTENSIONS = "RDMAExtensions"


class Answer(enum.StrEnum):
    """Reserved constants (§6.2); a received one is an answer, never an offer."""

    REJECT = "Reject"
    IRRELEVANT = "Irrelevant"
    NOT_UNDERSTOOD = "NotUnderstood"


_ANSWERS = frozenset(a.value for a in Answer)

YES = "Yes"
NO = "No"


class Digest(enum.StrEnum):
    CRC32C = "CRC32C"
    NONE = "None"


class AuthMethod(enum.StrEnum):
    NONE = "None"


# --------------------------------------------------------------------------- text codec

MAX_KEY_LEN = 63  # bytes (§6.1)
MAX_VALUE_LEN = 255  # bytes per value, i.e. per list element (§6.1)
MAX_LONG_VALUE_LEN = 8192  # binary-valued security keys may be longer (§6.1, §12)
#: Keys whose values are long binary strings (challenges, responses, tickets).
LONG_VALUE_KEYS = frozenset(
    {
        "CHAP_C",
        "CHAP_R",
        "SRP_A",
        "SRP_B",
        "SRP_M",
        "SRP_HM",
        "SRP_s",
        "KRB_AP_REQ",
        "KRB_AP_REP",
        "SPKM_REQ",
        "SPKM_ERROR",
        "SPKM_REP_TI",
        "SPKM_REP_IT",
    }
)


def _check_value_len(key: str, value: str) -> None:
    limit = MAX_LONG_VALUE_LEN if key in LONG_VALUE_KEYS else MAX_VALUE_LEN
    if len(value.encode()) > MAX_LONG_VALUE_LEN:
        raise TextFormatError(f"value of {key!r} longer than {MAX_LONG_VALUE_LEN} bytes")
    for element in value.split(","):
        if len(element.encode()) > limit:
            raise TextFormatError(f"value of {key!r} longer than {limit} bytes")


def parse_text(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Split a (joined) text data segment into (key, value) pairs, in order.

    Lenient: the final NUL may be missing and empty strings (extra NULs) are skipped.
    """
    raw = bytes(data)
    pairs: list[tuple[str, str]] = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextFormatError(f"text is not UTF-8: {item[:40]!r}") from exc
        key, sep, value = text.partition("=")
        if not sep:
            raise TextFormatError(f"no '=' in {text[:40]!r}")
        if not key:
            raise TextFormatError(f"empty key in {text[:40]!r}")
        if len(key.encode()) > MAX_KEY_LEN:
            raise TextFormatError(f"key longer than {MAX_KEY_LEN} bytes: {key[:40]!r}")
        _check_value_len(key, value)
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` each. Raises ValueError for pairs that cannot round-trip."""
    out = bytearray()
    for key, value in pairs:
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"cannot encode key/value {key!r}={value!r}")
        if len(key.encode()) > MAX_KEY_LEN:
            raise ValueError(f"key longer than {MAX_KEY_LEN} bytes: {key!r}")
        out += f"{key}={value}".encode()
        out += b"\0"
    return bytes(out)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class OperationalParams:
    """Results of a login (RFC defaults for keys never negotiated)."""

    header_digest: bool = False  # per connection: True when CRC32C was negotiated
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # what the target declared it accepts
    max_xmit_data_segment_length: int = 8192  # what the initiator declared: our send limit
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_connections: int = 1


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What the target offers/supports; each negotiated result is bounded by these.

    MaxBurstLength 1 MiB: large enough that R2T round trips are rare, small enough to be a
    sensible flow-control unit for the pool window. MaxOutstandingR2T 16 only bounds what the
    target may issue (the target decides how many R2Ts it sends), so a high value costs nothing.
    """

    max_recv_data_segment_length: int = 262144
    # Large bursts cost nothing here: R2Ts never ask for more than the pool window at hand.
    max_burst_length: int = 8 * 1024 * 1024
    # Unsolicited data cannot wait for memory (it comes from the pool's reserve), so keep each
    # command's share small; the rest is solicited with R2Ts as windows free up.
    first_burst_length: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 16
    max_connections: int = 1
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    digests: tuple[str, ...] = (Digest.CRC32C, Digest.NONE)
    target_alias: str | None = None

    def __post_init__(self) -> None:
        for key, attr in _LIMIT_ATTRS.items():
            rule = KEYS[key]
            value = getattr(self, attr)
            assert rule.range is not None
            lo, hi = rule.range
            if not lo <= value <= hi:
                raise ValueError(f"{attr}={value} outside {key} range {lo}..{hi}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("first_burst_length exceeds max_burst_length")
        if not self.digests or not set(self.digests) <= set(Digest):
            raise ValueError(f"digests must be a non-empty subset of {[d.value for d in Digest]}")


class Kind(enum.Enum):
    """How a key's answer is computed."""

    NAME = "name"  # declarative string (identity); recorded, no answer
    DECLARATIVE = "declarative"  # declarative number; recorded, no answer
    NUMERIC_MIN = "numeric-min"
    NUMERIC_MAX = "numeric-max"
    BOOL_AND = "bool-and"
    BOOL_OR = "bool-or"
    LIST = "list"  # first value of the initiator's list that the target supports
    IRRELEVANT = "irrelevant"  # always answered Irrelevant (obsolete marker intervals)
    TEXT = "text"  # full-feature-phase requests (SendTargets), handled elsewhere


_LOGIN = frozenset({Stage.SECURITY, Stage.OPERATIONAL})
_SEC = frozenset({Stage.SECURITY})
_OPER = frozenset({Stage.OPERATIONAL})
_FFP = frozenset({Stage.FULL_FEATURE})
_LEN = (512, 2**24 - 1)
_TIME = (0, 3600)
_SHORT = (1, 65535)


@dataclass(frozen=True, slots=True)
class KeyRule:
    """One row of the key table.

    ``target`` is the TargetLimits attribute holding the target's own value (numbers, booleans,
    supported list values), a literal for fixed choices, or None. ``field`` is the
    OperationalParams attribute the result lands in (None: not kept).
    """

    kind: Kind
    stages: frozenset[Stage]
    range: tuple[int, int] | None = None
    default: int | bool | str | None = None
    leading_only: bool = False
    discovery_irrelevant: bool = False
    target: str | bool | int | tuple[str, ...] | None = None
    field: str | None = None


def _negotiated(
    kind: Kind,
    attr: str,
    default: int | bool,
    rng: tuple[int, int] | None = None,
    *,
    discovery_irrelevant: bool = True,
) -> KeyRule:
    """A leading-only session-wide operational key whose target value is TargetLimits.<attr>."""
    return KeyRule(
        kind,
        _OPER,
        range=rng,
        default=default,
        leading_only=True,
        discovery_irrelevant=discovery_irrelevant,
        target=attr,
        field=attr,
    )


#: The one table of keys the target understands (RFC 7143 §12.1, §13; RFC 7145 for RDMA).
#: Adding a key is adding a row.
KEYS: dict[str, KeyRule] = {
    # security stage (§12.1); only AuthMethod=None is supported
    Key.AUTH_METHOD: KeyRule(Kind.LIST, _SEC, target=(AuthMethod.NONE.value,)),
    # identity declarations, any login stage (§13.4-13.7, §13.21)
    Key.INITIATOR_NAME: KeyRule(Kind.NAME, _LOGIN, field="initiator_name"),
    Key.INITIATOR_ALIAS: KeyRule(Kind.NAME, _LOGIN, field="initiator_alias"),
    Key.TARGET_NAME: KeyRule(Kind.NAME, _LOGIN, field="target_name"),
    Key.SESSION_TYPE: KeyRule(Kind.NAME, _LOGIN, leading_only=True, field="session_type"),
    # per-connection operational keys (§13.1, §13.12)
    Key.HEADER_DIGEST: KeyRule(
        Kind.LIST, _OPER, default=Digest.NONE.value, target="digests", field="header_digest"
    ),
    Key.DATA_DIGEST: KeyRule(
        Kind.LIST, _OPER, default=Digest.NONE.value, target="digests", field="data_digest"
    ),
    Key.MAX_RECV_DATA_SEGMENT_LENGTH: KeyRule(
        Kind.DECLARATIVE, _OPER, range=_LEN, default=8192, field="max_xmit_data_segment_length"
    ),
    # session-wide, leading-only operational keys (§13.2, §13.10-13.20)
    Key.MAX_CONNECTIONS: _negotiated(Kind.NUMERIC_MIN, "max_connections", 1, _SHORT),
    Key.INITIAL_R2T: _negotiated(Kind.BOOL_OR, "initial_r2t", True),
    Key.IMMEDIATE_DATA: _negotiated(Kind.BOOL_AND, "immediate_data", True),
    Key.MAX_BURST_LENGTH: _negotiated(Kind.NUMERIC_MIN, "max_burst_length", 262144, _LEN),
    Key.FIRST_BURST_LENGTH: _negotiated(Kind.NUMERIC_MIN, "first_burst_length", 65536, _LEN),
    Key.DEFAULT_TIME2WAIT: _negotiated(Kind.NUMERIC_MAX, "default_time2wait", 2, _TIME),
    Key.DEFAULT_TIME2RETAIN: _negotiated(Kind.NUMERIC_MIN, "default_time2retain", 20, _TIME),
    Key.MAX_OUTSTANDING_R2T: _negotiated(Kind.NUMERIC_MIN, "max_outstanding_r2t", 1, _SHORT),
    Key.DATA_PDU_IN_ORDER: _negotiated(Kind.BOOL_OR, "data_pdu_in_order", True),
    Key.DATA_SEQUENCE_IN_ORDER: _negotiated(Kind.BOOL_OR, "data_sequence_in_order", True),
    Key.ERROR_RECOVERY_LEVEL: _negotiated(
        Kind.NUMERIC_MIN, "error_recovery_level", 0, (0, 2), discovery_irrelevant=False
    ),
    # obsoleted markers (§13.26): never on
    Key.IF_MARKER: KeyRule(Kind.BOOL_AND, _OPER, default=False, target=False),
    Key.OF_MARKER: KeyRule(Kind.BOOL_AND, _OPER, default=False, target=False),
    Key.IF_MARK_INT: KeyRule(Kind.IRRELEVANT, _OPER),
    Key.OF_MARK_INT: KeyRule(Kind.IRRELEVANT, _OPER),
    # §13.23, §13.24: only the RFC 7143 behaviour is offered; results are not kept
    Key.TASK_REPORTING: KeyRule(
        Kind.LIST, _OPER, default="RFC3720", leading_only=True, target=("RFC3720",)
    ),
    Key.PROTOCOL_LEVEL: KeyRule(
        Kind.NUMERIC_MIN, _OPER, range=(0, 31), default=1, leading_only=True, target=1
    ),
    # RFC 7145: a TCP portal never does iSER
    Key.RDMA_EXTENSIONS: KeyRule(
        Kind.BOOL_AND, _OPER, default=False, leading_only=True, target=False
    ),
    # full feature phase only (§13.3); answered by send_targets_response
    Key.SEND_TARGETS: KeyRule(Kind.TEXT, _FFP),
}

#: TargetLimits numeric attributes validated against their key's RFC range.
_LIMIT_ATTRS: dict[str, str] = {
    key: rule.target
    for key, rule in KEYS.items()
    if rule.kind in (Kind.NUMERIC_MIN, Kind.NUMERIC_MAX) and isinstance(rule.target, str)
} | {Key.MAX_RECV_DATA_SEGMENT_LENGTH: "max_recv_data_segment_length"}

#: Identity declarations libiscsi repeats after the security stage; identical repeats are fine.
_REDECLARABLE = frozenset(key for key, rule in KEYS.items() if rule.kind is Kind.NAME)

_NUMBER = re.compile(r"(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<dec>[0-9]+))")


def parse_number(value: str) -> int | None:
    """A decimal-constant or hex-constant (§6.1), else None. ASCII only, no sign or spaces."""
    m = _NUMBER.fullmatch(value)
    if m is None:
        return None
    hex_digits = m.group("hex")
    return int(hex_digits, 16) if hex_digits is not None else int(m.group("dec"), 10)


def _parse_bool(value: str) -> bool | None:
    return True if value == YES else False if value == NO else None


def _bool_text(value: bool) -> str:
    return YES if value else NO


# --------------------------------------------------------------------------- negotiator


class Negotiator:
    """Target side of one connection's login negotiation.

    Call :meth:`process` once per Login Request (after :func:`parse_text`), send the returned
    pairs in the Login Response, and call :meth:`finish` once the login completes.
    """

    def __init__(self, limits: TargetLimits) -> None:
        self.limits = limits
        self.initiator_name: str | None = None
        self.initiator_alias: str | None = None
        self.target_name: str | None = None
        self.session_type: SessionType | None = None
        self.auth_method_none_chosen = False
        self._requests = 0
        self._seen: dict[str, str] = {}  # key -> value, for keys offered in earlier requests
        self._values: dict[str, int | bool | str] = {}  # negotiated results by key
        self._declared = False  # the target's own declarations went out

    # ------------------------------------------------------------------ public

    @property
    def discovery(self) -> bool:
        return self.session_type is SessionType.DISCOVERY

    def process(
        self, pairs: list[tuple[str, str]], *, stage: Stage, leading: bool
    ) -> list[tuple[str, str]]:
        """Answer one Login Request's pairs; raises NegotiationError for fatal problems."""
        if stage not in _LOGIN:
            raise ValueError(f"not a login negotiation stage: {stage!r}")
        first = self._requests == 0
        self._requests += 1
        keys = [key for key, _ in pairs]
        if first and Key.INITIATOR_NAME not in keys:
            raise NegotiationError(
                "InitiatorName missing from the first Login Request",
                0x02,
                MISSING_PARAMETER,
            )
        # SessionType decides which keys are irrelevant, whatever its position in the request.
        discovery = self.discovery or (
            leading and (Key.SESSION_TYPE, SessionType.DISCOVERY.value) in pairs
        )
        answers: list[tuple[str, str]] = []
        this_request: set[str] = set()
        for key, value in pairs:
            answer = self._one(
                key, value, stage=stage, leading=leading, discovery=discovery, seen=this_request
            )
            if answer is not None:
                answers.append((key, answer))
        self._clamp_first_burst(answers)
        if stage is Stage.OPERATIONAL and not self._declared:
            self._declared = True
            answers.append(
                (Key.MAX_RECV_DATA_SEGMENT_LENGTH, str(self.limits.max_recv_data_segment_length))
            )
            if self.limits.target_alias is not None and not self.discovery:
                answers.append((Key.TARGET_ALIAS, self.limits.target_alias))
        return [(str(key), str(answer)) for key, answer in answers]  # plain str, not enums

    def finish(self) -> OperationalParams:
        """The negotiated parameters, defaults for keys never negotiated."""
        values: dict[str, int | bool] = {}
        for key, rule in KEYS.items():
            if rule.field is None or rule.kind is Kind.NAME or key not in self._values:
                continue
            value = self._values[key]
            # the digests are kept as the chosen name
            values[rule.field] = value == Digest.CRC32C if isinstance(value, str) else value
        if self._declared:
            values["max_recv_data_segment_length"] = self.limits.max_recv_data_segment_length
        params = OperationalParams(**values)  # type: ignore[arg-type]
        if params.first_burst_length > params.max_burst_length:
            values["first_burst_length"] = params.max_burst_length
            params = OperationalParams(**values)  # type: ignore[arg-type]
        return params

    # ------------------------------------------------------------------ one key

    def _one(
        self,
        key: str,
        value: str,
        *,
        stage: Stage,
        leading: bool,
        discovery: bool,
        seen: set[str],
    ) -> str | None:
        """The answer to one pair, or None when none is due."""
        if value in _ANSWERS:
            return None  # an answer to something we sent: nothing to negotiate
        rule = KEYS.get(key)
        if rule is not None and stage not in rule.stages:
            return Answer.IRRELEVANT
        if self._repeated(key, value, seen):
            return None
        if rule is None:
            return Answer.NOT_UNDERSTOOD
        if rule.leading_only and not leading:
            return None if rule.kind is Kind.NAME else Answer.IRRELEVANT
        if discovery and rule.discovery_irrelevant:
            return Answer.IRRELEVANT
        return _HANDLERS[rule.kind](self, key, value, rule)

    def _repeated(self, key: str, value: str, this_request: set[str]) -> bool:
        """True for a harmless identical re-declaration; raises for a renegotiation."""
        if key in this_request:
            raise NegotiationError(f"key {key} repeated in one request", 0x02, INITIATOR_ERROR)
        this_request.add(key)
        previous = self._seen.get(key)
        if previous is None:
            self._seen[key] = value
            return False
        if key in _REDECLARABLE and previous == value:
            return True
        raise NegotiationError(f"key {key} negotiated twice", 0x02, INITIATOR_ERROR)

    def _target_value(self, rule: KeyRule) -> int | bool | str | tuple[str, ...]:
        target = rule.target
        assert target is not None
        if isinstance(target, str):
            result: int | bool | str | tuple[str, ...] = getattr(self.limits, target)
            return result
        return target

    def _name(self, key: str, value: str, rule: KeyRule) -> str | None:
        if key == Key.SESSION_TYPE:
            try:
                self.session_type = SessionType(value)
            except ValueError:
                raise NegotiationError(
                    f"unsupported SessionType {value!r}", 0x02, SESSION_TYPE_NOT_SUPPORTED
                ) from None
            return None
        if key == Key.INITIATOR_NAME and not value:
            raise NegotiationError("empty InitiatorName", 0x02, MISSING_PARAMETER)
        assert rule.field is not None
        setattr(self, rule.field, value)
        return None

    def _declarative(self, key: str, value: str, rule: KeyRule) -> str | None:
        # A declaration gets no answer (our own MaxRecvDataSegmentLength declaration goes out
        # under the same key), so a bad value is dropped: the default (8192) is always safe.
        number = parse_number(value)
        assert rule.range is not None
        if number is not None and rule.range[0] <= number <= rule.range[1]:
            self._values[key] = number
        return None

    def _numeric(self, key: str, value: str, rule: KeyRule) -> str | None:
        number = parse_number(value)
        assert rule.range is not None
        if number is None or not rule.range[0] <= number <= rule.range[1]:
            return Answer.REJECT
        ours = self._target_value(rule)
        assert isinstance(ours, int)
        result = min(number, ours) if rule.kind is Kind.NUMERIC_MIN else max(number, ours)
        self._values[key] = result
        return str(result)

    def _boolean(self, key: str, value: str, rule: KeyRule) -> str | None:
        offered = _parse_bool(value)
        if offered is None:
            return Answer.REJECT
        ours = self._target_value(rule)
        assert isinstance(ours, bool)
        result = (offered and ours) if rule.kind is Kind.BOOL_AND else (offered or ours)
        self._values[key] = result
        return _bool_text(result)

    def _list(self, key: str, value: str, rule: KeyRule) -> str | None:
        supported = self._target_value(rule)
        assert isinstance(supported, tuple)
        # §6.2.1: the first value of the originator's list that we support; unknown ones ignored.
        choice = next((v for v in value.split(",") if v in supported), None)
        if choice is None:
            return Answer.REJECT
        if key == Key.AUTH_METHOD:
            self.auth_method_none_chosen = choice == AuthMethod.NONE
        self._values[key] = choice
        return choice

    def _irrelevant(self, key: str, value: str, rule: KeyRule) -> str | None:
        return Answer.IRRELEVANT

    def _clamp_first_burst(self, answers: list[tuple[str, str]]) -> None:
        """Keep an answered FirstBurstLength <= MaxBurstLength (§13.14)."""
        first = self._values.get(Key.FIRST_BURST_LENGTH)
        if first is None:
            return
        burst = self._values.get(Key.MAX_BURST_LENGTH, KEYS[Key.MAX_BURST_LENGTH].default)
        assert isinstance(first, int)
        assert isinstance(burst, int)
        if first <= burst:
            return
        self._values[Key.FIRST_BURST_LENGTH] = burst
        for i, (key, _) in enumerate(answers):
            if key == Key.FIRST_BURST_LENGTH:
                answers[i] = (key, str(burst))


_HANDLERS = {
    Kind.NAME: Negotiator._name,
    Kind.DECLARATIVE: Negotiator._declarative,
    Kind.NUMERIC_MIN: Negotiator._numeric,
    Kind.NUMERIC_MAX: Negotiator._numeric,
    Kind.BOOL_AND: Negotiator._boolean,
    Kind.BOOL_OR: Negotiator._boolean,
    Kind.LIST: Negotiator._list,
    Kind.IRRELEVANT: Negotiator._irrelevant,
    Kind.TEXT: Negotiator._irrelevant,  # only reachable outside its stage; kept for totality
}


# --------------------------------------------------------------------------- SendTargets


def format_target_address(host: str, port: int, tpgt: int) -> str:
    """``host:port,tpgt`` with IPv6 literals bracketed (§13.8)."""
    if _is_ipv6(host):
        host = f"[{host}]"
    return f"{host}:{port},{tpgt}"


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False  # a domain name or IPv4


def _normalize_address(address: str) -> str:
    """Bracket a bare IPv6 literal in an already formatted ``host[:port],tpgt``."""
    if address.startswith("["):
        return address
    where, comma, tpgt = address.rpartition(",")
    if not comma:
        where, tpgt = address, ""
    # "fe80::1:3260" is ambiguous; addresses are normally formatted with a port, so try that
    # reading first and fall back to "no port".
    candidates = []
    if ":" in where:
        host, port = where.rsplit(":", 1)
        candidates.append((host, f":{port}"))
    candidates.append((where, ""))
    for host, port in candidates:
        if _is_ipv6(host):
            return f"[{host}]{port}{comma}{tpgt}"
    return address


def send_targets_response(
    value: str,
    targets: Sequence[tuple[str, Sequence[str]]],
    *,
    current_target: str | None,
    discovery: bool,
) -> list[tuple[str, str]]:
    """The Text Response pairs for ``SendTargets=value`` (§13.3? see RFC 7143 Appendix C).

    ``targets`` lists (target name, addresses) the initiator may see, each address as made by
    :func:`format_target_address` (a bare IPv6 literal is bracketed here too). ``All`` is for
    discovery sessions only: the RFC says it MUST NOT be supported in a normal session, which
    answers ``SendTargets=Reject``. An empty value means the session's own target. A name
    the initiator may not see (or, in a normal session, any target but the current one) gives
    an empty response.
    """
    if value == "All":
        if not discovery:
            return [(Key.SEND_TARGETS.value, Answer.REJECT.value)]
        chosen = list(targets)
    else:
        name = value or current_target
        if name is None or (not discovery and name != current_target):
            return []
        chosen = [t for t in targets if t[0] == name]
    pairs: list[tuple[str, str]] = []
    for name, addresses in chosen:
        pairs.append((Key.TARGET_NAME.value, name))
        pairs.extend((Key.TARGET_ADDRESS.value, _normalize_address(a)) for a in addresses)
    return pairs
