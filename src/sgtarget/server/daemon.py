"""Process lifecycle: event loop choice, startup banner, clean shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from sgtarget.server.target import TargetConfig, TargetServer, describe_luns, format_portal

log = logging.getLogger("sgtarget")


def _use_loop(choice: str) -> str:
    """Install the event loop policy for ``choice``; the loop's name. ``RuntimeError`` for
    ``uvloop`` when it is not installed."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(config: TargetConfig, *, banner: list[str] | None = None) -> None:
    server = TargetServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lines = [
        f"sgtarget: serving {config.iqn}",
        *(f"  portal {format_portal(h, p)}" for h, p in server.bound),
        *(f"  {line}" for line in describe_luns(config.backstores)),
        *(banner or []),
    ]
    print("\n".join(lines), flush=True)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    # One machine-readable line for benchmarks and operators: what the data path did.
    print(f"sgtarget: stats {json.dumps(server.pool.stats.snapshot(), sort_keys=True)}")
    print("sgtarget: stopped", flush=True)


def run(config: TargetConfig, *, banner: list[str] | None = None, loop: str = "auto") -> int:
    try:
        loop_name = _use_loop(loop)
    except RuntimeError as exc:
        print(f"sgtarget: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, banner=[*(banner or []), f"  event loop: {loop_name}"]))
    except OSError as exc:
        print(f"sgtarget: error: {exc}", file=sys.stderr)
        return 1
    return 0
