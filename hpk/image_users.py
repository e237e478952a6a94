"""The users an image knows, read from its own /etc/passwd: what sets HOME in a container.

Kubernetes' runtimes set HOME to the home folder that the image's /etc/passwd gives the
container's user, and to `/` when it lists no such user; the host's home never shows. hpk
reads the image's /etc/passwd once, as the image enters the cache, and records the homes by
uid beside its ENTRYPOINT and CMD (hpk.images.ImageConfig).

A SIF keeps its root filesystem in a SquashFS partition; `unsquashfs -o OFFSET -cat` reads one
file out of it without mounting anything or starting a container. A sandbox folder is read
directly. Anything unreadable gives no users, so HOME falls back to `/`.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from hpk import sif

log = logging.getLogger(__name__)

PASSWD_FILE = "etc/passwd"  # noqa: S105 (a path, not a password)
DEFAULT_HOME = "/"
"""HOME for a user the image does not list, as Kubernetes' runtimes set it."""

LARGEST_PASSWD = 1 << 20
"""A larger /etc/passwd is not read: no image needs one, and it would cost memory."""

# A partition descriptor's type-specific data starts with its file system type (int32,
# 1 = SquashFS) and its partition type (int32, 2 = the primary system).
_FS_SQUASH = 1
_PART_PRIMARY = 2
_TIMEOUT_S = 60


def parse_passwd(text: str) -> dict[int, str]:
    """uid -> home folder of each well-formed line of an /etc/passwd text (the first line of a
    uid wins, as getpwuid finds it). A home that is not an absolute path is left out."""
    homes: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) != 7 or not fields[2].isdigit():
            continue
        uid, home = int(fields[2]), fields[5]
        if uid not in homes and home.startswith("/") and home.isprintable():
            homes[uid] = home
    return homes


def home_of(homes: Iterable[tuple[int, str]] | None, uid: int) -> str:
    """HOME for `uid` in an image whose homes are `homes`; `/` for a user it does not list.
    None (an image recorded before hpk read its users) gives root `/root`, anyone else `/`."""
    if homes is None:
        return "/root" if uid == 0 else DEFAULT_HOME
    return dict(homes).get(uid, DEFAULT_HOME)


def sandbox_homes(folder: Path) -> dict[int, str]:
    """The homes listed by a sandbox folder's /etc/passwd; none when it has no readable one.
    A symlinked /etc/passwd is not followed: it could point anywhere on the host."""
    path = folder / PASSWD_FILE
    try:
        if path.is_symlink() or path.stat().st_size > LARGEST_PASSWD:
            return {}
        return parse_passwd(path.read_text(errors="replace"))
    except OSError:
        return {}


def sif_homes(sif: Path, *, unsquashfs: str | None = None) -> dict[int, str]:
    """The homes listed by the /etc/passwd in a SIF's primary SquashFS partition; none when
    the SIF has no such partition, the file is missing, or unsquashfs is not installed."""
    offset = _primary_partition(sif)
    program = unsquashfs or shutil.which("unsquashfs")
    if offset is None or program is None:
        return {}
    try:
        result = subprocess.run(
            [program, "-o", str(offset), "-cat", str(sif), PASSWD_FILE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("%s: cannot read its /etc/passwd: %s", sif, error)
        return {}
    if result.returncode != 0 or len(result.stdout) > LARGEST_PASSWD:
        log.debug("%s: no /etc/passwd read (unsquashfs rc %d)", sif, result.returncode)
        return {}
    return parse_passwd(result.stdout.decode(errors="replace"))


def _primary_partition(path: Path) -> int | None:
    """The offset of the SIF's primary SquashFS partition, None when it has none."""
    try:
        with path.open("rb") as stream:
            found = sif.descriptors(stream)
    except (OSError, struct.error):
        return None
    for descriptor in found:
        if descriptor.kind != sif.PARTITION:
            continue
        fs_type, part_type = struct.unpack_from("<ii", descriptor.extra)
        if fs_type == _FS_SQUASH and part_type == _PART_PRIMARY:
            return descriptor.offset
    return None
