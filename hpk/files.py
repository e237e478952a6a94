"""Private folders and atomic file writes for everything hpk keeps in ~/.hpk.

The home directory is usually on a shared filesystem that other users can list, so keys,
kubeconfigs and the control plane's state must never be readable by them, not even for the
moment between creating a file and tightening its mode. Every writer here sets the mode when
the file is created, before any byte goes in, and renames a finished temp file into place so
that a reader (or a job killed half-way) never sees a half-written key.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
"""Mode of every folder hpk creates for its state."""

PRIVATE_FILE_MODE = 0o600
"""Mode of keys, kubeconfigs, logs and anything else that may hold a secret."""

PUBLIC_FILE_MODE = 0o644
"""Mode of certificates and other files that hold no secret."""


def private_dir(path: Path) -> Path:
    """Create `path` (and any missing parents) with mode 0700; tighten it if it exists.

    Parents that already exist keep their mode: they belong to the user (e.g. $HOME).
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process won the race
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        os.chmod(folder, PRIVATE_DIR_MODE)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_atomic(path: Path, data: bytes | str, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write `data` to `path` through a temp file in the same folder, then rename it over.

    The temp file is created 0600 and given `mode` with fchmod (so the umask plays no part)
    before the content is written.
    """
    payload = data.encode() if isinstance(data, str) else data
    # mkstemp creates the file 0600 with a unique name; fchmod then sets the wanted mode.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def open_private_append(path: Path) -> int:
    """Open `path` for appending, creating it 0600; returns the file descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)
    return fd


@contextlib.contextmanager
def held_lock(path: Path, *, mode: int = PUBLIC_FILE_MODE) -> Iterator[None]:
    """Hold an exclusive flock on `path`, created with `mode` if missing, until the block ends.

    flock needs no write access, so users who share a folder can take each other's locks, and
    the kernel drops a lock when its holder dies, so none is ever left stale. The lock file is
    never removed: a waiter would otherwise lock a file a newcomer no longer sees.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
