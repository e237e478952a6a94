"""The `hpk` command. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from hpk.images import ImageError
from hpk.images_cli import add_images_commands
from hpk.process import ProcessFailed
from hpk.testbed.bed import Testbed, TestbedError
from hpk.testbed.demo import run_demo
from hpk.testbed.settings import TestbedSettings


def _progress(message: str) -> None:
    print(f"[hpk dev] {message}", flush=True)


def _dev(args: argparse.Namespace) -> int:
    bed = Testbed(TestbedSettings())
    if args.action == "up":
        bed.up(_progress)
    elif args.action == "down":
        bed.down(_progress)
    elif args.action == "status":
        status = bed.status()
        for name, pid in status:
            print(f"{name:14} {'running, pid ' + str(pid) if pid else 'stopped'}")
        return 0 if all(pid for _, pid in status) else 3
    elif args.action == "demo":
        return run_demo(bed, _progress)
    elif args.action == "env":
        for key, value in bed.env().items():
            print(f"export {key}={shlex.quote(value)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpk", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="the local Slurm test bed (needs root)")
    dev.add_argument("action", choices=["up", "down", "status", "env", "demo"])
    dev.set_defaults(func=_dev)

    add_images_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (TestbedError, ProcessFailed, ImageError) as error:
        print(f"hpk: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
