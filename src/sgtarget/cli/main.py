"""``sgtarget`` command line. Parses arguments, builds the configuration, hands over."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import sgtarget
from sgtarget.cli.specs import (
    LunSpec,
    build_backstore,
    lun_flags,
    lun_physical_block_size,
    parse_iqn,
    parse_lun_spec,
    parse_portal,
)
from sgtarget.cli.specs import parse_size as _parse_size
from sgtarget.datapath import DEFAULT_BLOCK_SIZE, DEFAULT_POOL_SIZE

DEFAULT_LUN_SIZE = "1G"
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, exit status 2 (what argparse uses, without the usage dump).
        self.exit(2, f"sgtarget: error: {message}\n")


def _arg(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def default_data_dir() -> Path:
    env = os.environ.get("SGTARGET_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "sgtarget"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgtarget", description="A user-space SCSI target (iSCSI).")
    parser.add_argument("--version", action="version", version=f"sgtarget {sgtarget.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve LUNs over iSCSI",
        description="Serve LUNs over iSCSI. With no arguments: 127.0.0.1:3260, one target, "
        "LUN 0 a persistent 1 GiB sparse file in the data directory.",
    )
    serve.error = _Parser.error.__get__(serve)  # type: ignore[method-assign]
    serve.add_argument(
        "--portal",
        action="append",
        type=_arg(parse_portal, "portal"),
        metavar="HOST:PORT",
        help="address to listen on (repeatable; default 127.0.0.1:3260)",
    )
    serve.add_argument("--target", type=_arg(parse_iqn, "iqn"), metavar="IQN", help="target name")
    serve.add_argument(
        "--lun",
        action="append",
        type=_arg(parse_lun_spec, "lun"),
        metavar="SPEC",
        help="file:PATH[,size=SIZE][,direct=1][,pi=1|2|3] | ram:size=SIZE[,pi=1|2|3] | "
        "null:size=SIZE, each with ,bs=512|4096 (logical block size; pi= formats the LUN "
        "with T10 protection information of that type, a file's kept in PATH.pi) and "
        "optional LUN flags ,thin=1 (UNMAP / thin provisioning), ,readonly=1 "
        "(write-protected; a file is opened read-only), ,removable=1 (removable medium: "
        "PREVENT ALLOW MEDIUM REMOVAL, eject/load with START STOP UNIT), ,unmap=0 (with "
        "thin=1: no UNMAP command, WRITE SAME with UNMAP only) and ,physical_block_size=SIZE "
        "(512 to 64K, default 4K); file and null LUNs take ,handler=copy|zerocopy|isolated "
        "(served by handler processes behind TCMU rings) with ,handlers=N, "
        ",handler_timeout=SECONDS, ,handler_threads=N and, with pi=, ,handler_pi=1 (the "
        "handler stores the tuples) (repeatable; LUNs are numbered from 0 in order)",
    )
    serve.add_argument(
        "--pool",
        type=_arg(_parse_size, "size"),
        metavar="SIZE",
        default=DEFAULT_POOL_SIZE,
        help="payload memory budget (default 64M)",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="where the default LUN lives (default $SGTARGET_DATA_DIR or ~/.local/share/sgtarget)",
    )
    serve.add_argument(
        "--nop-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="ping idle initiators with NOP-In this often (0 disables)",
    )
    serve.add_argument(
        "--queue-depth",
        type=int,
        default=128,
        metavar="N",
        help="commands each session may have in flight (default 128)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto, the default), uvloop, or asyncio's own",
    )
    serve.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from sgtarget.server.daemon import run  # noqa: PLC0415 - keep --help fast
    from sgtarget.server.target import (  # noqa: PLC0415
        DEFAULT_IQN,
        DEFAULT_PORT,
        LunOptions,
        TargetConfig,
    )

    if args.nop_interval < 0:
        print(
            "sgtarget: error: --nop-interval must be 0 (off) or a positive number of seconds",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.queue_depth <= 65536:
        print("sgtarget: error: --queue-depth must be between 1 and 65536", file=sys.stderr)
        return 2
    if args.pool < DEFAULT_BLOCK_SIZE:
        print(
            f"sgtarget: error: --pool must be at least one {DEFAULT_BLOCK_SIZE // 1024}K block",
            file=sys.stderr,
        )
        return 2
    banner: list[str] = []
    specs: list[LunSpec] = args.lun or []
    if not specs:
        data_dir = args.data_dir or default_data_dir()
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"sgtarget: error: cannot create data directory {data_dir}: {exc}", file=sys.stderr
            )
            return 2
        path = data_dir / "lun0.img"
        specs = [parse_lun_spec(f"file:{path},size={DEFAULT_LUN_SIZE}")]
        banner.append(f"  data directory {data_dir}")
    backstores = []
    options = []
    try:
        for spec in specs:
            # LUN keys first: a bad value should not leave a file created behind it.
            pbs = lun_physical_block_size(spec)
            options.append(LunOptions(**lun_flags(spec), physical_block_size=pbs))
            backstores.append(build_backstore(spec))
    except ValueError as exc:
        for bs in backstores:
            bs.close()
        print(f"sgtarget: error: {exc}", file=sys.stderr)
        return 2
    config = TargetConfig(
        iqn=args.target or DEFAULT_IQN,
        portals=args.portal or [("127.0.0.1", DEFAULT_PORT)],
        backstores=backstores,
        lun_options=options,
        pool_size=args.pool,
        nop_interval=args.nop_interval or None,
        queue_depth=args.queue_depth,
    )
    return run(config, banner=banner, loop=args.loop)


if __name__ == "__main__":
    sys.exit(main())
