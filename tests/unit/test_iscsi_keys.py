"""iSCSI text keys: codec, negotiation rules (RFC 7143 §6, §12, §13) and SendTargets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgtarget.iscsi.keys import (
    KEYS,
    Kind,
    NegotiationError,
    Negotiator,
    OperationalParams,
    SessionType,
    Stage,
    TargetLimits,
    TextFormatError,
    encode_text,
    format_target_address,
    parse_number,
    parse_text,
    send_targets_response,
)

INAME = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
TNAME = "iqn.2024-01.org.example:disk1"
OP = Stage.OPERATIONAL
SEC = Stage.SECURITY

#: What libiscsi (lib/login.c) sends when it starts directly in the operational stage (no
#: CHAP user): exact spellings and order.
LIBISCSI_OPERATIONAL = [
    ("InitiatorName", INAME),
    ("TargetName", TNAME),
    ("SessionType", "Normal"),
    ("HeaderDigest", "None,CRC32C"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
    ("OFMarker", "No"),
    ("MaxConnections", "1"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
]


def answers_of(
    pairs: list[tuple[str, str]],
    *,
    limits: TargetLimits | None = None,
    stage: Stage = OP,
    leading: bool = True,
    session: str | None = None,
) -> tuple[dict[str, str], Negotiator]:
    """Run one first request (InitiatorName added) and return its answers as a dict."""
    neg = Negotiator(limits or TargetLimits())
    first = [("InitiatorName", INAME)]
    if session is not None:
        first.append(("SessionType", session))
    answers = neg.process(first + pairs, stage=stage, leading=leading)
    keys = [k for k, _ in answers]
    assert len(keys) == len(set(keys)), answers
    return dict(answers), neg


# ----------------------------------------------------------------------------- text codec


def test_parse_text_pairs_in_order() -> None:
    data = b"InitiatorName=iqn.a\0SessionType=Normal\0X-odd=a=b\0"
    assert parse_text(data) == [
        ("InitiatorName", "iqn.a"),
        ("SessionType", "Normal"),
        ("X-odd", "a=b"),  # split at the first '='
    ]


def test_parse_text_accepts_memoryview_and_empty() -> None:
    assert parse_text(b"") == []
    assert parse_text(memoryview(b"A=1\0")) == [("A", "1")]


def test_parse_text_tolerates_missing_final_nul_and_padding_nuls() -> None:
    assert parse_text(b"A=1\0B=2") == [("A", "1"), ("B", "2")]
    assert parse_text(b"A=1\0\0\0B=\0\0") == [("A", "1"), ("B", "")]


@pytest.mark.parametrize(
    "data",
    [
        b"NoEquals\0",
        b"A=1\0junk",
        b"=value\0",
        b"A=\xff\xfe\0",  # not UTF-8
        b"K" * 64 + b"=1\0",  # key over 63 bytes
        b"A=" + b"v" * 256 + b"\0",  # value over 255 bytes
        b"A=x," + b"v" * 256 + b"\0",  # one list element over 255 bytes
        b"CHAP_C=" + b"f" * 8193 + b"\0",  # even long binary values stop at 8192
    ],
)
def test_parse_text_rejects_malformed(data: bytes) -> None:
    with pytest.raises(TextFormatError):
        parse_text(data)


def test_parse_text_limits_are_inclusive() -> None:
    key = "K" * 63
    assert parse_text(f"{key}={'v' * 255}\0".encode()) == [(key, "v" * 255)]
    assert parse_text(b"CHAP_C=0x" + b"f" * 2048 + b"\0")[0][0] == "CHAP_C"
    assert parse_text(("A=" + "é" * 127 + "\0").encode()) == [("A", "é" * 127)]  # 254 bytes


def test_encode_text_terminates_every_pair() -> None:
    assert encode_text([("A", "1"), ("B", "")]) == b"A=1\0B=\0"
    assert encode_text([]) == b""


@pytest.mark.parametrize(
    "pair", [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y"), ("K" * 64, "x")]
)
def test_encode_text_refuses_pairs_that_cannot_round_trip(pair: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="key"):
        encode_text([pair])


_key_chars = st.characters(codec="utf-8", exclude_characters="=\0")
_value_chars = st.characters(codec="utf-8", exclude_characters="\0")


@given(
    st.lists(
        st.tuples(
            st.text(_key_chars, min_size=1, max_size=15),
            st.text(_value_chars, max_size=60),
        ),
        max_size=10,
    )
)
def test_parse_encode_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_text(encode_text(pairs)) == pairs


@pytest.mark.parametrize(
    ("text", "number"),
    [("0", 0), ("512", 512), ("0x200", 512), ("0X1f", 31), ("007", 7)],
)
def test_parse_number_decimal_and_hex(text: str, number: int) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize("text", ["", "-1", "+1", " 1", "1 ", "1_000", "0x", "1e3", "١٢", "abc"])
def test_parse_number_rejects_ill_formed(text: str) -> None:
    assert parse_number(text) is None


# ----------------------------------------------------------------------------- libiscsi


def test_libiscsi_operational_first_login() -> None:
    neg = Negotiator(TargetLimits(target_alias="disk one"))
    answers = neg.process(LIBISCSI_OPERATIONAL, stage=OP, leading=True)
    assert answers == [
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"),  # the target keeps unsolicited bursts small
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("MaxOutstandingR2T", "1"),
        ("ErrorRecoveryLevel", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("TargetAlias", "disk one"),
    ]
    assert (neg.initiator_name, neg.target_name) == (INAME, TNAME)
    assert neg.session_type is SessionType.NORMAL
    assert neg.finish() == OperationalParams(
        header_digest=False,
        data_digest=False,
        max_recv_data_segment_length=262144,
        max_xmit_data_segment_length=262144,
        max_burst_length=262144,
        first_burst_length=65536,
        initial_r2t=False,
        immediate_data=True,
        max_outstanding_r2t=1,
        data_pdu_in_order=True,
        data_sequence_in_order=True,
        error_recovery_level=0,
        default_time2wait=2,
        default_time2retain=0,
        max_connections=1,
    )
    # the encoded answer is what libiscsi's parser expects: exact names, NUL-terminated
    assert encode_text(answers).startswith(b"HeaderDigest=None\0DataDigest=None\0")


def test_libiscsi_security_then_operational_repeats_identity_keys() -> None:
    """With a CHAP user libiscsi offers CHAP,None, then repeats its declarations."""
    neg = Negotiator(TargetLimits())
    security = [
        ("InitiatorName", INAME),
        ("InitiatorAlias", "host1"),
        ("TargetName", TNAME),
        ("SessionType", "Normal"),
        ("AuthMethod", "CHAP,None"),
    ]
    assert neg.process(security, stage=SEC, leading=True) == [("AuthMethod", "None")]
    assert neg.auth_method_none_chosen
    operational = [*security[:4], *LIBISCSI_OPERATIONAL[3:]]
    answers = dict(neg.process(operational, stage=OP, leading=True))
    assert "InitiatorName" not in answers
    assert "SessionType" not in answers
    assert answers["MaxRecvDataSegmentLength"] == "262144"
    assert neg.initiator_alias == "host1"


def test_libiscsi_discovery_login() -> None:
    pairs = [(k, v) for k, v in LIBISCSI_OPERATIONAL if k != "TargetName"]
    pairs[1] = ("SessionType", "Discovery")
    neg = Negotiator(TargetLimits(target_alias="ignored in discovery"))
    answers = dict(neg.process(pairs, stage=OP, leading=True))
    assert neg.session_type is SessionType.DISCOVERY
    for key in (
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "MaxConnections",
        "DataPDUInOrder",
        "DataSequenceInOrder",
    ):
        assert answers[key] == "Irrelevant", key
    assert answers["ErrorRecoveryLevel"] == "0"
    assert answers["HeaderDigest"] == "None"
    assert "TargetAlias" not in answers
    assert neg.finish().max_burst_length == 262144  # defaults kept


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize(
    ("offer", "answer", "none_chosen"),
    [
        ("None", "None", True),
        ("CHAP,None", "None", True),
        ("KRB5,SRP,None", "None", True),
        ("CHAP", "Reject", False),
        ("SRP,CHAP", "Reject", False),
        ("Bogus", "Reject", False),
    ],
)
def test_auth_method(offer: str, answer: str, none_chosen: bool) -> None:
    answers, neg = answers_of([("AuthMethod", offer)], stage=SEC)
    assert answers == {"AuthMethod": answer}
    assert neg.auth_method_none_chosen is none_chosen


def test_auth_method_in_operational_stage_is_irrelevant() -> None:
    answers, neg = answers_of([("AuthMethod", "None")])
    assert answers["AuthMethod"] == "Irrelevant"
    assert not neg.auth_method_none_chosen


def test_operational_key_in_security_stage_is_irrelevant_and_can_be_offered_later() -> None:
    neg = Negotiator(TargetLimits())
    first = neg.process(
        [("InitiatorName", INAME), ("MaxBurstLength", "4096"), ("AuthMethod", "None")],
        stage=SEC,
        leading=True,
    )
    assert first == [("MaxBurstLength", "Irrelevant"), ("AuthMethod", "None")]
    later = dict(neg.process([("MaxBurstLength", "4096")], stage=OP, leading=True))
    assert later["MaxBurstLength"] == "4096"


def test_security_stage_sends_no_declarations() -> None:
    answers, _ = answers_of([("AuthMethod", "None")], stage=SEC)
    assert "MaxRecvDataSegmentLength" not in answers


# ----------------------------------------------------------------------------- identity


def test_initiator_name_missing_from_first_request() -> None:
    neg = Negotiator(TargetLimits())
    with pytest.raises(NegotiationError) as info:
        neg.process([("SessionType", "Normal")], stage=OP, leading=True)
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x07)


def test_initiator_name_empty() -> None:
    neg = Negotiator(TargetLimits())
    with pytest.raises(NegotiationError) as info:
        neg.process([("InitiatorName", "")], stage=SEC, leading=True)
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x07)


def test_initiator_name_needed_only_in_first_request() -> None:
    neg = Negotiator(TargetLimits())
    neg.process([("InitiatorName", INAME)], stage=SEC, leading=True)
    assert neg.process([("AuthMethod", "None")], stage=SEC, leading=True) == [
        ("AuthMethod", "None")
    ]


def test_names_are_recorded_without_answers() -> None:
    answers, neg = answers_of([("TargetName", TNAME), ("InitiatorAlias", "alias")], stage=SEC)
    assert answers == {}
    assert (neg.initiator_name, neg.target_name, neg.initiator_alias) == (INAME, TNAME, "alias")
    assert neg.session_type is None  # not declared: the login layer treats it as Normal


@pytest.mark.parametrize(
    ("value", "session"), [("Normal", SessionType.NORMAL), ("Discovery", SessionType.DISCOVERY)]
)
def test_session_type(value: str, session: SessionType) -> None:
    answers, neg = answers_of([], session=value, stage=SEC)
    assert answers == {}
    assert neg.session_type is session


@pytest.mark.parametrize("value", ["normal", "Bogus", ""])
def test_session_type_unsupported(value: str) -> None:
    with pytest.raises(NegotiationError) as info:
        answers_of([], session=value, stage=SEC)
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x09)


def test_session_type_ignored_on_non_leading_connection() -> None:
    answers, neg = answers_of([], session="Discovery", stage=SEC, leading=False)
    assert answers == {}
    assert neg.session_type is None


def test_session_type_after_other_keys_still_makes_them_irrelevant() -> None:
    answers, _ = answers_of([("MaxBurstLength", "8192"), ("SessionType", "Discovery")])
    assert answers["MaxBurstLength"] == "Irrelevant"


# ----------------------------------------------------------------------------- numbers

NUMERIC = [
    # (key, offer, target limits, answer)
    ("MaxBurstLength", "65536", {}, "65536"),
    ("MaxBurstLength", "16777215", {}, "8388608"),
    ("MaxBurstLength", "0x100000", {"max_burst_length": 524288}, "524288"),
    ("FirstBurstLength", "512", {}, "512"),
    ("FirstBurstLength", "1048576", {}, "65536"),
    ("MaxConnections", "8", {}, "1"),
    ("MaxConnections", "8", {"max_connections": 4}, "4"),
    ("MaxConnections", "2", {"max_connections": 4}, "2"),
    ("DefaultTime2Retain", "0", {}, "0"),
    ("DefaultTime2Retain", "3600", {}, "20"),
    ("MaxOutstandingR2T", "1", {}, "1"),
    ("MaxOutstandingR2T", "65535", {}, "16"),
    ("ErrorRecoveryLevel", "2", {}, "0"),
    ("ErrorRecoveryLevel", "2", {"error_recovery_level": 1}, "1"),
    ("DefaultTime2Wait", "0", {}, "2"),  # maximum
    ("DefaultTime2Wait", "3600", {}, "3600"),
    ("DefaultTime2Wait", "1", {"default_time2wait": 0}, "1"),
    ("iSCSIProtocolLevel", "2", {}, "1"),
    ("iSCSIProtocolLevel", "0", {}, "0"),
]


@pytest.mark.parametrize(("key", "offer", "limits", "answer"), NUMERIC)
def test_numeric_negotiation(key: str, offer: str, limits: dict[str, Any], answer: str) -> None:
    answers, neg = answers_of([(key, offer)], limits=TargetLimits(**limits))
    assert answers[key] == answer
    field = KEYS[key].field
    if field is not None:
        assert getattr(neg.finish(), field) == int(answer)


BAD_VALUES = [
    ("MaxBurstLength", "511"),
    ("MaxBurstLength", "16777216"),
    ("FirstBurstLength", "0"),
    ("MaxConnections", "0"),
    ("MaxConnections", "65536"),
    ("DefaultTime2Wait", "3601"),
    ("DefaultTime2Retain", "-1"),
    ("MaxOutstandingR2T", "0"),
    ("ErrorRecoveryLevel", "3"),
    ("ErrorRecoveryLevel", "one"),
    ("MaxBurstLength", ""),
    ("MaxBurstLength", "1e6"),
    ("iSCSIProtocolLevel", "32"),
    ("InitialR2T", "yes"),
    ("ImmediateData", "1"),
    ("DataPDUInOrder", "True"),
    ("IFMarker", "Maybe"),
    ("HeaderDigest", "MD5"),
    ("DataDigest", "crc32c"),
    ("TaskReporting", "FastAbort"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_out_of_range_or_ill_formed_is_rejected_and_default_kept(key: str, value: str) -> None:
    answers, neg = answers_of([(key, value)])
    assert answers[key] == "Reject"
    assert neg.finish() == dataclasses.replace(
        OperationalParams(), max_recv_data_segment_length=262144
    )


# ----------------------------------------------------------------------------- booleans

BOOLEANS = [
    # (key, offer, target limits, answer)
    ("InitialR2T", "No", {"initial_r2t": False}, "No"),  # OR
    ("InitialR2T", "No", {"initial_r2t": True}, "Yes"),
    ("InitialR2T", "Yes", {"initial_r2t": False}, "Yes"),
    ("ImmediateData", "Yes", {"immediate_data": True}, "Yes"),  # AND
    ("ImmediateData", "Yes", {"immediate_data": False}, "No"),
    ("ImmediateData", "No", {"immediate_data": True}, "No"),
    ("DataPDUInOrder", "No", {"data_pdu_in_order": False}, "No"),  # OR (§13.18)
    ("DataPDUInOrder", "No", {}, "Yes"),
    ("DataPDUInOrder", "Yes", {"data_pdu_in_order": False}, "Yes"),
    ("DataSequenceInOrder", "No", {"data_sequence_in_order": False}, "No"),  # OR (§13.19)
    ("DataSequenceInOrder", "No", {}, "Yes"),
    ("IFMarker", "Yes", {}, "No"),  # AND with No
    ("OFMarker", "Yes", {}, "No"),
    ("OFMarker", "No", {}, "No"),
    ("RDMAExtensions", "Yes", {}, "No"),
]


@pytest.mark.parametrize(("key", "offer", "limits", "answer"), BOOLEANS)
def test_boolean_negotiation(key: str, offer: str, limits: dict[str, Any], answer: str) -> None:
    answers, neg = answers_of([(key, offer)], limits=TargetLimits(**limits))
    assert answers[key] == answer
    field = KEYS[key].field
    if field is not None:
        assert getattr(neg.finish(), field) is (answer == "Yes")


@pytest.mark.parametrize("key", ["IFMarkInt", "OFMarkInt"])
@pytest.mark.parametrize("value", ["2048", "1~65535", "junk"])
def test_marker_intervals_are_irrelevant(key: str, value: str) -> None:
    answers, _ = answers_of([(key, value)])
    assert answers[key] == "Irrelevant"


# ----------------------------------------------------------------------------- lists

DIGESTS = [
    # (offer, target digests, answer, negotiated CRC32C)
    ("None", ("CRC32C", "None"), "None", False),
    ("CRC32C", ("CRC32C", "None"), "CRC32C", True),
    ("CRC32C,None", ("CRC32C", "None"), "CRC32C", True),
    ("None,CRC32C", ("CRC32C", "None"), "None", False),  # the initiator's order wins
    ("Fletcher,CRC32C", ("CRC32C", "None"), "CRC32C", True),  # unknown values ignored
    ("CRC32C", ("None",), "Reject", False),
    ("CRC32C,None", ("None",), "None", False),
    ("None", ("CRC32C",), "Reject", False),
]


@pytest.mark.parametrize("key", ["HeaderDigest", "DataDigest"])
@pytest.mark.parametrize(("offer", "digests", "answer", "crc"), DIGESTS)
def test_digest_negotiation(
    key: str, offer: str, digests: tuple[str, ...], answer: str, crc: bool
) -> None:
    answers, neg = answers_of([(key, offer)], limits=TargetLimits(digests=digests))
    assert answers[key] == answer
    params = neg.finish()
    assert (params.header_digest if key == "HeaderDigest" else params.data_digest) is crc


def test_task_reporting_only_rfc3720() -> None:
    answers, _ = answers_of([("TaskReporting", "FastAbort,RFC3720")])
    assert answers["TaskReporting"] == "RFC3720"


# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("value", ["511", "16777216", "big", ""])
def test_bad_max_recv_data_segment_length_dropped(value: str) -> None:
    answers, neg = answers_of([("MaxRecvDataSegmentLength", value)])
    assert answers == {"MaxRecvDataSegmentLength": "262144"}  # only our declaration
    assert neg.finish().max_xmit_data_segment_length == 8192


def test_max_recv_data_segment_length_is_declarative() -> None:
    limits = TargetLimits(max_recv_data_segment_length=65536)
    answers, neg = answers_of([("MaxRecvDataSegmentLength", "0x2000")], limits=limits)
    assert answers == {"MaxRecvDataSegmentLength": "65536"}  # our declaration, not an answer
    params = neg.finish()
    assert params.max_xmit_data_segment_length == 8192
    assert params.max_recv_data_segment_length == 65536


def test_declarations_once_per_connection_in_operational_stage() -> None:
    neg = Negotiator(TargetLimits(target_alias="alias"))
    assert neg.process([("InitiatorName", INAME)], stage=SEC, leading=True) == []
    first = neg.process([], stage=OP, leading=True)
    assert first == [("MaxRecvDataSegmentLength", "262144"), ("TargetAlias", "alias")]
    assert neg.process([], stage=OP, leading=True) == []


def test_without_operational_stage_defaults_apply() -> None:
    neg = Negotiator(TargetLimits())
    neg.process([("InitiatorName", INAME), ("AuthMethod", "None")], stage=SEC, leading=True)
    assert neg.finish() == OperationalParams()  # nothing declared: RFC defaults, 8192 each


# ----------------------------------------------------------------------------- misc rules


@pytest.mark.parametrize(
    "key", ["X-com.example.Foo", "X#vendor", "Bogus", "CHAP_A", "TargetAddress", "TargetAlias"]
)
def test_unknown_keys_not_understood(key: str) -> None:
    answers, _ = answers_of([(key, "1")])
    assert answers[key] == "NotUnderstood"


@pytest.mark.parametrize("value", ["Reject", "Irrelevant", "NotUnderstood"])
@pytest.mark.parametrize("key", ["MaxBurstLength", "HeaderDigest", "X-foo", "InitialR2T"])
def test_reserved_answers_are_accepted_silently(key: str, value: str) -> None:
    answers, neg = answers_of([(key, value)])
    assert key not in answers
    assert neg.finish().max_burst_length == 262144


def test_key_repeated_in_one_request() -> None:
    with pytest.raises(NegotiationError) as info:
        answers_of([("MaxBurstLength", "8192"), ("MaxBurstLength", "8192")])
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x00)


@pytest.mark.parametrize(
    ("key", "value"),
    [("MaxBurstLength", "8192"), ("HeaderDigest", "None"), ("X-foo", "1"), ("AuthMethod", "None")],
)
def test_key_renegotiated_in_a_later_request(key: str, value: str) -> None:
    stage = SEC if key == "AuthMethod" else OP
    neg = Negotiator(TargetLimits())
    neg.process([("InitiatorName", INAME), (key, value)], stage=stage, leading=True)
    with pytest.raises(NegotiationError) as info:
        neg.process([(key, value)], stage=stage, leading=True)
    assert (info.value.status_class, info.value.status_detail) == (0x02, 0x00)


def test_identity_redeclared_with_another_value() -> None:
    neg = Negotiator(TargetLimits())
    neg.process([("InitiatorName", INAME), ("TargetName", TNAME)], stage=SEC, leading=True)
    with pytest.raises(NegotiationError):
        neg.process([("TargetName", TNAME + "x")], stage=OP, leading=True)


def test_identity_repeated_in_one_request() -> None:
    neg = Negotiator(TargetLimits())
    with pytest.raises(NegotiationError):
        neg.process([("InitiatorName", INAME), ("InitiatorName", INAME)], stage=OP, leading=True)


LEADING_ONLY = [
    key for key, rule in KEYS.items() if rule.leading_only and rule.kind is not Kind.NAME
]


@pytest.mark.parametrize("key", LEADING_ONLY)
def test_leading_only_keys_irrelevant_on_other_connections(key: str) -> None:
    answers, _ = answers_of([(key, "1")], leading=False)
    assert answers[key] == "Irrelevant"


def test_per_connection_keys_negotiated_on_other_connections() -> None:
    answers, neg = answers_of(
        [("HeaderDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "65536")], leading=False
    )
    assert answers["HeaderDigest"] == "CRC32C"
    assert neg.finish().max_xmit_data_segment_length == 65536


def test_leading_only_table_matches_rfc() -> None:
    assert set(LEADING_ONLY) >= {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
    }
    assert KEYS["SessionType"].leading_only


def test_first_burst_answer_clamped_to_max_burst() -> None:
    answers, neg = answers_of([("FirstBurstLength", "131072"), ("MaxBurstLength", "65536")])
    assert answers["FirstBurstLength"] == "65536"
    assert answers["MaxBurstLength"] == "65536"
    params = neg.finish()
    assert params.first_burst_length == params.max_burst_length == 65536


def test_first_burst_clamped_when_max_burst_comes_later() -> None:
    neg = Negotiator(TargetLimits(first_burst_length=262144))
    first = dict(
        neg.process([("InitiatorName", INAME), ("FirstBurstLength", "200000")], stage=OP,
                    leading=True)
    )  # fmt: skip
    assert first["FirstBurstLength"] == "200000"  # below the default MaxBurstLength
    later = dict(neg.process([("MaxBurstLength", "100000")], stage=OP, leading=True))
    assert later["MaxBurstLength"] == "100000"
    params = neg.finish()
    assert params.first_burst_length == params.max_burst_length == 100000


def test_process_refuses_full_feature_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        Negotiator(TargetLimits()).process([], stage=Stage.FULL_FEATURE, leading=True)


def test_stage_values_match_csg() -> None:
    assert (Stage.SECURITY, Stage.OPERATIONAL, Stage.FULL_FEATURE) == (0, 1, 3)


def test_send_targets_in_login_is_irrelevant() -> None:
    answers, _ = answers_of([("SendTargets", "All")])
    assert answers["SendTargets"] == "Irrelevant"


@pytest.mark.parametrize(
    "limits",
    [
        {"max_burst_length": 511},
        {"max_recv_data_segment_length": 2**24},
        {"first_burst_length": 524288, "max_burst_length": 262144},
        {"max_connections": 0},
        {"error_recovery_level": 3},
        {"digests": ()},
        {"digests": ("MD5",)},
    ],
)
def test_target_limits_validated(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"range|exceeds|digests"):
        TargetLimits(**limits)


# ----------------------------------------------------------------------------- properties

_NUMERIC_KEYS = [k for k, r in KEYS.items() if r.kind in (Kind.NUMERIC_MIN, Kind.NUMERIC_MAX)]
_NUMERIC_LIMITS = {k: KEYS[k].target for k in _NUMERIC_KEYS if isinstance(KEYS[k].target, str)}


@st.composite
def _limits(draw: st.DrawFn) -> TargetLimits:
    values: dict[str, Any] = {}
    for key, attr in _NUMERIC_LIMITS.items():
        rng = KEYS[key].range
        assert rng is not None
        assert isinstance(attr, str)
        values[attr] = draw(st.integers(*rng))
    values["first_burst_length"] = min(values["first_burst_length"], values["max_burst_length"])
    values["max_recv_data_segment_length"] = draw(st.integers(512, 2**24 - 1))
    return TargetLimits(**values)


@given(_limits(), st.sampled_from(_NUMERIC_KEYS), st.data())
def test_numeric_result_within_both_sides_and_rfc_range(
    limits: TargetLimits, key: str, data: st.DataObject
) -> None:
    rule = KEYS[key]
    assert rule.range is not None
    lo, hi = rule.range
    offer = data.draw(st.integers(lo, hi))
    text = data.draw(st.sampled_from([str(offer), hex(offer)]))
    answers, _ = answers_of([(key, text)], limits=limits)
    result = int(answers[key])
    ours = getattr(limits, rule.target) if isinstance(rule.target, str) else rule.target
    assert isinstance(ours, int)
    assert lo <= result <= hi
    if rule.kind is Kind.NUMERIC_MIN:
        assert result <= offer
        assert result <= ours or key == "FirstBurstLength"
    else:
        assert result >= max(offer, ours)
    if key == "FirstBurstLength" and result not in (offer, ours):
        # Clamped to the MaxBurstLength in effect (its default: it was not negotiated here).
        assert result == KEYS["MaxBurstLength"].default
    else:
        assert result in (offer, ours)


_NEGOTIABLE = sorted(k for k, r in KEYS.items() if r.kind is not Kind.NAME)
_VALUES = st.one_of(
    st.integers(-1, 2**25).map(str),
    st.sampled_from(["Yes", "No", "None", "CRC32C", "CRC32C,None", "All", "RFC3720", "", "0x10"]),
    st.text(max_size=8),
)


@given(
    _limits(),
    st.dictionaries(st.sampled_from(_NEGOTIABLE), _VALUES, max_size=len(_NEGOTIABLE)),
    st.sampled_from(["Normal", "Discovery"]),
    st.booleans(),
)
def test_any_operational_request_gets_one_answer_per_key_and_sane_params(
    limits: TargetLimits, offers: dict[str, str], session: str, leading: bool
) -> None:
    pairs = list(offers.items())
    answers, neg = answers_of(pairs, limits=limits, session=session, leading=leading)
    for key, value in pairs:
        if value in ("Reject", "Irrelevant", "NotUnderstood"):
            assert key not in answers
        elif key != "MaxRecvDataSegmentLength":
            assert key in answers
    params = neg.finish()
    assert params.first_burst_length <= params.max_burst_length
    for rule in KEYS.values():
        if rule.field is not None and rule.range is not None:
            assert rule.range[0] <= getattr(params, rule.field) <= rule.range[1]
    assert params.max_burst_length <= max(limits.max_burst_length, 262144)
    assert params.max_connections <= limits.max_connections


# ----------------------------------------------------------------------------- SendTargets

TARGETS = [
    ("iqn.2024-01.org.example:a", ["192.0.2.1:3260,1", "fe80::1:3260,1"]),
    ("iqn.2024-01.org.example:b", ["[2001:db8::5]:3261,2"]),
    ("iqn.2024-01.org.example:c", []),
]


def test_send_targets_all_in_discovery() -> None:
    assert send_targets_response("All", TARGETS, current_target=None, discovery=True) == [
        ("TargetName", "iqn.2024-01.org.example:a"),
        ("TargetAddress", "192.0.2.1:3260,1"),
        ("TargetAddress", "[fe80::1]:3260,1"),
        ("TargetName", "iqn.2024-01.org.example:b"),
        ("TargetAddress", "[2001:db8::5]:3261,2"),
        ("TargetName", "iqn.2024-01.org.example:c"),
    ]


def test_send_targets_all_in_normal_session_is_rejected() -> None:
    assert send_targets_response(
        "All", TARGETS, current_target="iqn.2024-01.org.example:a", discovery=False
    ) == [("SendTargets", "Reject")]


def test_send_targets_named() -> None:
    pairs = send_targets_response(
        "iqn.2024-01.org.example:b", TARGETS, current_target=None, discovery=True
    )
    assert pairs == [
        ("TargetName", "iqn.2024-01.org.example:b"),
        ("TargetAddress", "[2001:db8::5]:3261,2"),
    ]


@pytest.mark.parametrize("value", ["", "iqn.2024-01.org.example:a"])
def test_send_targets_normal_session_current_target(value: str) -> None:
    pairs = send_targets_response(
        value, TARGETS, current_target="iqn.2024-01.org.example:a", discovery=False
    )
    assert pairs[0] == ("TargetName", "iqn.2024-01.org.example:a")
    assert len(pairs) == 3


@pytest.mark.parametrize(
    ("value", "current", "discovery"),
    [
        ("iqn.2024-01.org.example:zzz", None, True),  # unknown
        ("", None, True),  # discovery sessions have no current target
        ("iqn.2024-01.org.example:b", "iqn.2024-01.org.example:a", False),  # not this session's
    ],
)
def test_send_targets_empty_answers(value: str, current: str | None, discovery: bool) -> None:
    assert send_targets_response(value, TARGETS, current_target=current, discovery=discovery) == []


@pytest.mark.parametrize(
    ("host", "port", "tpgt", "text"),
    [
        ("192.0.2.7", 3260, 1, "192.0.2.7:3260,1"),
        ("2001:db8::7", 3260, 1, "[2001:db8::7]:3260,1"),
        ("::1", 860, 5, "[::1]:860,5"),
        ("target.example.org", 3260, 1, "target.example.org:3260,1"),
    ],
)
def test_format_target_address(host: str, port: int, tpgt: int, text: str) -> None:
    assert format_target_address(host, port, tpgt) == text


def test_send_targets_brackets_bare_ipv6_without_port() -> None:
    pairs = send_targets_response(
        "All", [("iqn.x:y", ["2001:db8::9,3"])], current_target=None, discovery=True
    )
    assert pairs[1] == ("TargetAddress", "[2001:db8::9],3")
