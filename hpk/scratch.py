"""Private folders in node-local scratch (/tmp, /var/tmp, /dev/shm, $TMPDIR) on shared nodes.

Every user of a node can create names in its scratch folders, so a folder name hpk could
predict is a name another user can take first: with their own files in it, or as a symlink
to a folder of theirs. Whatever hpk then runs or reads from there is theirs. The rules here:

- hpk makes its scratch folders with `mkdtemp` (mode 0700, a name nobody can predict) in a
  base folder that nobody else can rename things in: owned by root or the user, and, if
  others may write to it, sticky (as /tmp is).
- A scratch folder hpk is about to trust again is checked with `lstat`: a real folder (not a
  symlink), owned by the user, with no group or other permission bits, in such a base.
- Content found there is trusted only if it matches a digest hpk recorded when it wrote it
  (`tree_digest`), kept outside scratch, in the user's own 0700 state.

Standard library only, so that code on a compute node can use it as well as the login node.
Reads only, apart from `make_private_folder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o700


class UnsafeScratch(Exception):
    """A scratch folder, or the folder it is in, could be changed by another user."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _examine(path: Path, *, follow: bool) -> os.stat_result | str:
    """stat (or lstat) of `path`, or what went wrong."""
    try:
        return os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be examined ({error.strerror})"


def own_folder_problem(path: Path, *, owner: int) -> str | None:
    """Why `path` is not a real folder (no symlink, which lstat does not follow) of `owner`'s,
    or None if it is one; its mode does not count."""
    info = _examine(path, follow=False)
    if isinstance(info, str):
        return info
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link, not a folder"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != owner:
        return f"is owned by uid {info.st_uid}, not by uid {owner}"
    return None


def private_folder_problem(path: Path, *, owner: int) -> str | None:
    """Why `path` is not a folder that only `owner` can change or read, or None if it is."""
    problem = own_folder_problem(path, owner=owner)
    if problem is not None:
        return problem
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & 0o077:
        return f"has mode {mode:04o}: others have access (0700 is required)"
    return None


def base_problem(path: Path, *, owner: int) -> str | None:
    """Why `path` is no place for private folders of `owner`, or None if it is one.

    Fit are folders owned by root or `owner` in which no one else may write, or may write but
    not rename or remove what others made (the sticky bit, as on /tmp). A symlink to such a
    folder is fit if root or `owner` made it (some sites link /tmp elsewhere).
    """
    trusted = (0, owner)
    link, info = _examine(path, follow=False), _examine(path, follow=True)
    if isinstance(link, str) or isinstance(info, str):
        return str(info if isinstance(info, str) else link)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
        return f"is a symbolic link made by uid {link.st_uid}"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid not in trusted:
        return f"is owned by uid {info.st_uid}, neither root nor uid {owner}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        return (
            f"has mode {mode:04o}: others may write in it without the sticky bit, so they "
            "could rename a folder of hpk's and put one of theirs in its place"
        )
    return None


def check_private_folder(path: Path, *, owner: int | None = None) -> Path:
    """`path`, if it and its base folder pass the rules above; else raises UnsafeScratch.

    `owner`: the uid to expect, default this process's user.
    """
    owner = os.geteuid() if owner is None else owner
    problem = base_problem(path.parent, owner=owner)
    if problem is not None:
        raise UnsafeScratch(path.parent, problem)
    problem = private_folder_problem(path, owner=owner)
    if problem is not None:
        raise UnsafeScratch(path, problem)
    return path


def make_private_folder(base: Path, *, prefix: str, owner: int | None = None) -> Path:
    """A new, empty folder of mode 0700 in `base`, with a name nobody could predict.

    Raises UnsafeScratch when `base` fails the rules above, before creating anything.
    """
    owner = os.geteuid() if owner is None else owner
    problem = base_problem(base, owner=owner)
    if problem is not None:
        raise UnsafeScratch(base, problem)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    # mkdtemp makes it 0700 whatever the umask; the check catches an owner other than expected.
    try:
        return check_private_folder(folder, owner=owner)
    except UnsafeScratch:
        with contextlib.suppress(OSError):
            folder.rmdir()
        raise


def tree_digest(root: Path) -> str:
    """A SHA-256 over everything below `root`, and `root` itself: each entry's path relative
    to `root`, its type and permission bits, and a file's content or a symlink's target.

    Symlinks are hashed as links and never followed, and files are opened with O_NOFOLLOW,
    so nothing outside the tree counts or is read. Owners and times do not count: unpacking
    the same image twice gives the same digest.
    """
    total = hashlib.sha256()

    def add(path: Path, relative: str) -> None:
        info = os.lstat(path)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            kind, payload = "l", os.fsencode(os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as stream:
                payload = hashlib.file_digest(stream, "sha256").digest()
            kind = "f"
        elif stat.S_ISDIR(info.st_mode):
            kind, payload = "d", b""
        else:  # devices, fifos, sockets: their kind and mode are all there is
            kind, payload = f"o{stat.S_IFMT(info.st_mode):o}", b""
        # NUL separates fields: no path contains one, so no two trees share a byte stream.
        total.update(b"\0".join([kind.encode(), os.fsencode(relative), b"%o" % mode, payload]))
        total.update(b"\0\n")
        if kind == "d":
            with os.scandir(path) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                add(path / name, f"{relative}/{name}")

    add(root, ".")
    return total.hexdigest()
