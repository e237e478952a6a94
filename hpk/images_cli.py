"""`hpk images`: the command-line face of the image cache (hpk.images).

Kept apart from hpk.cli so that the cache's commands can grow without touching the rest of the
CLI; hpk.cli calls `add_images_commands` to register them. Each action returns an exit code
and reports the cache's typed errors itself, as one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpk.images import (
    ImageConfig,
    ImageError,
    image_cache_dir,
    image_config,
    import_image,
    list_images,
    remove_image,
)


def run_import(args: argparse.Namespace) -> int:
    """`hpk images import REF FILE`: seed the cache with a SIF file, a sandbox folder or a
    docker-archive tarball, for air-gapped sites."""
    try:
        path = import_image(args.reference, args.file)
    except ImageError as error:
        print(f"hpk: {error}", file=sys.stderr)
        return 1
    print(f"{args.reference} -> {path}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """`hpk images rm REF...`: take images out of the cache; pods that use them then wait."""
    status = 0
    for reference in args.references:
        try:
            path = remove_image(reference)
        except ImageError as error:
            print(f"hpk: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"removed {reference} ({path})")
    return status


def run_list(args: argparse.Namespace) -> int:
    """`hpk images list`: every cached image with its size and file."""
    images = list_images()
    if not images:
        print(f"no images in {image_cache_dir()}")
        return 0
    width = max(len(image.reference) for image in images)
    print(f"{'REFERENCE':<{width}}  {'SIZE':>9}  PATH  RUNS")
    for image in images:
        runs = _runs(image_config(image.path))
        print(f"{image.reference:<{width}}  {_human_size(image.size):>9}  {image.path}  {runs}")
    return 0


def _runs(config: ImageConfig) -> str:
    """What the image runs by default, as `docker inspect` would name it."""
    if not config.oci:
        return "runscript"
    parts = []
    if config.entrypoint:
        parts.append(f"ENTRYPOINT {json.dumps(list(config.entrypoint))}")
    if config.cmd:
        parts.append(f"CMD {json.dumps(list(config.cmd))}")
    if config.working_dir:
        parts.append(f"WORKDIR {config.working_dir}")
    return " ".join(parts) or "nothing (pods must give a command)"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def add_images_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `images import`, `images list` and `images rm` on the `hpk` command's
    subparsers.

    Each action sets `func`, which the caller runs with the parsed arguments.
    """
    images = subparsers.add_parser(
        "images",
        help="the SIF image cache that pods run from",
        description=f"The SIF image cache, by default {image_cache_dir()} ($HPK_IMAGE_CACHE).",
    )
    actions = images.add_subparsers(dest="images_action", required=True)

    importing = actions.add_parser(
        "import",
        help="put an image into the cache under an image reference",
        description="Seed the cache without a registry: later pods that use REF run FILE."
        " FILE is a SIF file, an Apptainer sandbox folder, or a docker-archive tarball"
        " (`docker save REF -o FILE`); Apptainer converts the last two, with no network.",
    )
    importing.add_argument("reference", metavar="REF", help="image reference, e.g. busybox:1.36")
    importing.add_argument(
        "file", metavar="FILE", type=Path, help="a SIF file, sandbox folder or docker-archive"
    )
    importing.set_defaults(func=run_import)

    listing = actions.add_parser("list", help="show the cached images")
    listing.set_defaults(func=run_list)

    removing = actions.add_parser("rm", help="remove images from the cache")
    removing.add_argument("references", metavar="REF", nargs="+", help="image reference")
    removing.set_defaults(func=run_remove)
