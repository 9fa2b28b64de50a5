"""Connection states (RFC 7143 §8.1, target side, reduced to what ERL 0 needs).

Every state, every transition and the PDUs legal in each state live in this module.
"""

from __future__ import annotations

import enum

from sgtarget.iscsi.pdu import Opcode


class ConnState(enum.Enum):
    #: Transport up, login PDUs only (RFC S3/S4).
    LOGIN = "login"
    #: Login done: full feature phase (S5).
    FULL_FEATURE = "full-feature"
    #: Logout accepted; the response is on its way and the connection then closes (S7).
    LOGGED_OUT = "logged-out"
    #: Closed or being closed; nothing more is read or sent (S1).
    CLOSED = "closed"


class ConnEvent(enum.Enum):
    LOGIN_SUCCEEDED = "login-succeeded"
    LOGIN_FAILED = "login-failed"
    LOGOUT_ACCEPTED = "logout-accepted"
    PROTOCOL_ERROR = "protocol-error"
    TRANSPORT_CLOSED = "transport-closed"


TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (ConnState.LOGIN, ConnEvent.LOGIN_SUCCEEDED): ConnState.FULL_FEATURE,
    (ConnState.LOGIN, ConnEvent.LOGIN_FAILED): ConnState.CLOSED,
    (ConnState.LOGIN, ConnEvent.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.LOGIN, ConnEvent.TRANSPORT_CLOSED): ConnState.CLOSED,
    (ConnState.FULL_FEATURE, ConnEvent.LOGOUT_ACCEPTED): ConnState.LOGGED_OUT,
    (ConnState.FULL_FEATURE, ConnEvent.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.FULL_FEATURE, ConnEvent.TRANSPORT_CLOSED): ConnState.CLOSED,
    (ConnState.LOGGED_OUT, ConnEvent.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.LOGGED_OUT, ConnEvent.TRANSPORT_CLOSED): ConnState.CLOSED,
    (ConnState.CLOSED, ConnEvent.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.CLOSED, ConnEvent.TRANSPORT_CLOSED): ConnState.CLOSED,
}

#: Initiator opcodes accepted in each state; anything else is a protocol error.
LEGAL_OPCODES: dict[ConnState, frozenset[int]] = {
    ConnState.LOGIN: frozenset({Opcode.LOGIN_REQUEST}),
    ConnState.FULL_FEATURE: frozenset(
        {
            Opcode.NOP_OUT,
            Opcode.SCSI_COMMAND,
            Opcode.TASK_MGMT_REQUEST,
            Opcode.TEXT_REQUEST,
            Opcode.DATA_OUT,
            Opcode.LOGOUT_REQUEST,
            Opcode.SNACK_REQUEST,
        }
    ),
    # Data-Out may still trail a command that completed while the logout was in flight.
    ConnState.LOGGED_OUT: frozenset({Opcode.DATA_OUT}),
    ConnState.CLOSED: frozenset(),
}


class IllegalTransition(Exception):
    pass


def transition(state: ConnState, event: ConnEvent) -> ConnState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} in state {state.value}") from None
