"""The `hpk` command. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from hpk import cluster
from hpk.addons import add_addons_commands
from hpk.controlplane import job
from hpk.controlplane.image import ControlPlaneImageError, ensure_image
from hpk.home import HpkHome
from hpk.images import ImageError
from hpk.images_cli import add_images_commands
from hpk.process import ProcessFailed
from hpk.slurm import SlurmUnavailable, SubmissionFailed
from hpk.testbed.bed import Testbed, TestbedError
from hpk.testbed.demo import run_demo
from hpk.testbed.settings import TestbedSettings
from hpk.toolchain import ToolchainMissing


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


def _control_plane(args: argparse.Namespace) -> int:
    if args.action == "build-image":
        print(ensure_image(progress=_say))
        return 0
    image = os.environ.get("HPK_CONTROL_PLANE_IMAGE")
    return job.run(HpkHome.default(), image=Path(image) if image else None)


def _up(args: argparse.Namespace) -> int:
    return cluster.up(
        HpkHome.default(), flags=args.sbatch_flags, progress=_say, timeout=args.timeout
    )


def _down(args: argparse.Namespace) -> int:
    return cluster.down(HpkHome.default(), progress=_say)


def _status(args: argparse.Namespace) -> int:
    return cluster.status(HpkHome.default(), show=print)


def _kubeconfig(args: argparse.Namespace) -> int:
    print(f"export KUBECONFIG={shlex.quote(str(HpkHome.default().kubeconfig))}")
    return 0


def _say(message: str) -> None:
    print(f"[hpk] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpk", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up",
        help="submit the control-plane job and wait until kubectl works",
        description="Extra arguments are passed to sbatch, e.g. `hpk up --time=2:00:00 -p debug`.",
    )
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    up.set_defaults(func=_up)
    commands.add_parser("down", help="stop the control-plane job in order").set_defaults(func=_down)
    commands.add_parser(
        "status", help="the control plane's job, health and certificates"
    ).set_defaults(func=_status)
    commands.add_parser("kubeconfig", help="print the export KUBECONFIG line").set_defaults(
        func=_kubeconfig
    )
    plane = commands.add_parser(
        "control-plane",
        help="run: what the control-plane job runs; build-image: build the control-plane image",
        description="`run` starts the components from the Apptainer image named by "
        "$HPK_CONTROL_PLANE_IMAGE, or from the tool folder when it is unset.",
    )
    plane.add_argument("action", choices=["run", "build-image"])
    plane.set_defaults(func=_control_plane)

    dev = commands.add_parser("dev", help="the local Slurm test bed (needs root)")
    dev.add_argument("action", choices=["up", "down", "status", "env", "demo"])
    dev.set_defaults(func=_dev)

    add_images_commands(commands)
    add_addons_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.func is not _up:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    args.sbatch_flags = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (
        job.AlreadyRunning,
        TestbedError,
        ProcessFailed,
        ImageError,
        SlurmUnavailable,
        SubmissionFailed,
        ControlPlaneImageError,
        ToolchainMissing,
    ) as error:
        print(f"hpk: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
