"""The login stage machine (RFC 7143 §6.3): every legal stage and transition lives here.

A login moves SECURITY -> OPERATIONAL -> FULL FEATURE; either of the first two may be skipped
by the initiator (it may start in the operational stage, and it may transit from security
straight to full feature). A stage never goes back.
"""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


#: Stages a Login Request's CSG may name, given the stage the login is in (None: first request).
LEGAL_CSG: dict[Stage | None, frozenset[Stage]] = {
    None: frozenset({Stage.SECURITY, Stage.OPERATIONAL}),
    Stage.SECURITY: frozenset({Stage.SECURITY}),
    Stage.OPERATIONAL: frozenset({Stage.OPERATIONAL}),
}

#: Stages a transit (T bit) from CSG may go to.
LEGAL_NSG: dict[Stage, frozenset[Stage]] = {
    Stage.SECURITY: frozenset({Stage.OPERATIONAL, Stage.FULL_FEATURE}),
    Stage.OPERATIONAL: frozenset({Stage.FULL_FEATURE}),
}


def next_stage(current: Stage | None, csg: int, transit: bool, nsg: int) -> Stage | None:
    """The stage after this request, or None if the request's stage fields are illegal."""
    try:
        csg_stage = Stage(csg)
    except ValueError:
        return None
    if csg_stage not in LEGAL_CSG.get(current, frozenset()):
        return None
    if not transit:
        return csg_stage
    try:
        nsg_stage = Stage(nsg)
    except ValueError:
        return None
    if nsg_stage not in LEGAL_NSG[csg_stage]:
        return None
    return nsg_stage
