"""How hpk runs Apptainer on a host, whatever the site's configuration says.

Two host facts change the command line, and neither may be fixed by editing the site's
apptainer.conf:
- Without a /dev/fuse the user may open, an unprivileged Apptainer cannot mount a SIF and
  stops; `--unsquash` makes it unpack the image into a temporary folder instead.
- As root, Apptainer asks for every capability by default, which fails where the bounding set
  lacks one (CAP_SYS_RESOURCE on the test machines); `--no-privs` asks for none.

It also says which paths `--bind` can take.

`python -m hpk.apptainer pod` prints the options of a pod's container for the user and host it
runs on; pod job scripts call it on the compute node.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

FUSE_DEVICE = Path("/dev/fuse")

BIND_SPECIAL = frozenset(":,^\\")
"""Characters Apptainer's --bind reads as separators or escapes, in either path."""


def bind_path_problem(path: str) -> str | None:
    """Why Apptainer's --bind cannot take `path` as it is, or None when it can."""
    special = "".join(sorted(BIND_SPECIAL & set(path)))
    if special:
        return f"{path!r}: Apptainer's --bind reads {special!r} as separators or escapes"
    if path != path.strip():
        return f"{path!r}: Apptainer's --bind strips spaces at either end"
    return None


def fuse_usable(uid: int, *, device: Path = FUSE_DEVICE) -> bool:
    """Whether a process of `uid` can open the FUSE device for reading and writing."""
    try:
        info = device.stat()
    except FileNotFoundError:
        return False
    mode = stat.S_IMODE(info.st_mode)
    if uid == 0:
        return True
    if info.st_uid == uid:
        return mode & 0o600 == 0o600
    return mode & 0o006 == 0o006


def run_options(uid: int | None = None, *, device: Path = FUSE_DEVICE) -> list[str]:
    """Options for `apptainer exec|run` as `uid` (default: this process's user) on this host."""
    uid = os.geteuid() if uid is None else uid
    options: list[str] = []
    if uid == 0:
        options.append("--no-privs")
    if not fuse_usable(uid, device=device):
        options.append("--unsquash")
    return options


HOST_FILES = ("/etc/hosts", "/etc/localtime")
"""The node's files every pod container sees, read-only: its name resolution and its time
zone. Apptainer binds them through the site's `bind path` entries, which pods do without
(kubelet_py.pod.render.CONTAIN_OPTIONS) because a site may list the users' own folders there."""


def pod_options(
    uid: int | None = None, *, device: Path = FUSE_DEVICE, host_files: tuple[str, ...] = HOST_FILES
) -> list[str]:
    """`run_options`, and the binds of the node's HOST_FILES that exist (a bind of a missing
    file would stop the container)."""
    options = run_options(uid, device=device)
    for path in host_files:
        if os.path.isfile(path) and not bind_path_problem(path):
            options += ["--bind", f"{path}:{path}:ro"]
    return options


def main(argv: list[str] | None = None) -> int:
    """Print this user's options on this host on one line, separated by spaces (`pod`: those
    of a pod's container): a job script reads them at run time, because the compute node, not
    the host that rendered the script, decides them (`own-hosts`: without the node's
    /etc/hosts). No option holds a space."""
    words = sys.argv[1:] if argv is None else argv
    if words not in ([], ["pod"], ["pod", "own-hosts"]):
        print("usage: python -m hpk.apptainer [pod [own-hosts]]", file=sys.stderr)
        return 2
    if not words:
        print(" ".join(run_options()))
        return 0
    # own-hosts: a pod on the pod network has an /etc/hosts of its own, not the node's.
    files = tuple(path for path in HOST_FILES if path != "/etc/hosts" or len(words) == 1)
    print(" ".join(pod_options(host_files=files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
