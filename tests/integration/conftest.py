"""Fixtures that run a real ``sgtarget serve`` process; the helpers live in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import StartTarget, Target, start_target


@pytest.fixture
def sgtarget(tmp_path: Path) -> Iterator[StartTarget]:
    """Factory: ``sgtarget(args..., **kw)`` starts a target; teardown stops each cleanly."""
    started: list[Target] = []

    def start(
        *args: str,
        port: int | None = None,
        portal: bool = True,
        nop_interval: float | None = 0,
        env: dict[str, str] | None = None,
        bare: bool = False,
    ) -> Target:
        target = start_target(
            tmp_path / "targets",
            args if args or bare else ("--lun", "ram:size=64M"),
            port=port,
            portal=portal,
            nop_interval=nop_interval,
            env=env,
        )
        started.append(target)
        return target

    yield start
    failures: list[str] = []
    for target in started:
        if target.proc.returncode is not None:
            continue  # the test stopped it and checked the outcome itself
        try:
            target.assert_clean_stop()
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.fixture
def target(sgtarget: StartTarget) -> Target:
    """One target with a 64 MiB ram LUN 0."""
    return sgtarget()
