"""Reading and writing files inside pod folders without following symbolic links.

A pod folder (`<hpk home>/pods/<namespace>/<name>/`, docs/kubelet.md) holds files that
containers can write: its volumes are bound into them, and markers and logs are written by the
job on the compute node. A container can therefore replace any of those files with a symbolic
link, a folder or a FIFO. Were the kubelet to follow such a link, a pod could have the kubelet
write its token over the user's `~/.ssh/authorized_keys`, or serve the cluster CA key as its
log. Every file the kubelet (or the job-side launcher) touches in a pod folder goes through
this module, which:

- opens with `O_NOFOLLOW`, so a link in the last component is refused (ELOOP); with `root`,
  every folder between `root` and the file is opened the same way, one `openat` at a time,
  so a link anywhere below `root` is refused too;
- opens with `O_NONBLOCK` and reads only regular files, so a FIFO cannot hang a thread;
- reads at most `limit` bytes, so a huge marker cannot fill the kubelet's memory;
- writes a new file under a fresh temporary name (`O_CREAT | O_EXCL | O_NOFOLLOW`, in the
  target's folder through its descriptor) and renames it over the target, so a reader sees
  the old file or the new one, and nothing planted at either name is written through.

Refusals are `PodFileRefused`, an OSError, so callers that already handle OSError for a
missing or unreadable file handle these too.

Which files a pod folder holds, and what a marker says, is kubelet_py.job.podfolder's.

Stdlib only: kubelet_py.job.launch and kubelet_py.job.probes use it on the compute nodes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MARKER_LIMIT = 64 * 1024
"""The most read of a small file (a marker, `uid`, `job-id`): they hold one short line."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PodFileRefused(OSError):
    """A file in a pod folder is not what the kubelet reads or writes there: a symbolic link,
    or not a regular file (a folder, a FIFO, a device)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(errno.ELOOP, problem, str(path))
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _relative(path: Path, root: Path | None) -> tuple[Path, list[str]]:
    """(folder to start from, the components below it) for `path`."""
    if root is None:
        return path.parent, [path.name]
    try:
        parts = list(path.relative_to(root).parts)
    except ValueError:
        raise PodFileRefused(path, f"is not below {root}") from None
    if not parts or ".." in parts:
        raise PodFileRefused(path, f"is not a file below {root}")
    return root, parts


def _refusal(path: Path | str, error: OSError) -> OSError:
    """A link met with O_NOFOLLOW (ELOOP, or ENOTDIR for a link to a file where a folder was
    asked) as a PodFileRefused; any other error as it is."""
    if error.errno == errno.ELOOP:
        return PodFileRefused(path, "is a symbolic link; not followed")
    if error.errno == errno.ENOTDIR:
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return PodFileRefused(path, "is a symbolic link; not followed")
    return error


def open_folder(path: Path, *, root: Path | None = None, create: bool = False) -> int:
    """A descriptor of the folder `path` (O_DIRECTORY), no link followed (see the module
    docstring); with `create`, missing folders below `root` (or `path` itself) are made
    0700. The caller closes it."""
    parts: list[str] = []
    if root is None:
        start = path
    else:
        start, parts = _relative(path, root) if path != root else (root, [])
    try:
        fd = os.open(start, _DIR_FLAGS)
    except OSError as error:
        if not (create and error.errno == errno.ENOENT and root is None):
            raise _refusal(start, error) from error
        os.mkdir(start, 0o700)
        fd = os.open(start, _DIR_FLAGS)
    where = start
    try:
        for part in parts:
            where = where / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as error:
        os.close(fd)
        raise _refusal(where, error) from error
    return fd


@contextlib.contextmanager
def folder(path: Path, *, root: Path | None = None, create: bool = False) -> Iterator[int]:
    """`open_folder` as a context manager that closes the descriptor."""
    fd = open_folder(path, root=root, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_parent(path: Path, root: Path | None) -> int:
    """The folder holding `path`: through `open_folder` below `root`; without a root it is
    the caller's own and opened as it is (only the file's own name is guarded)."""
    if root is not None:
        return open_folder(path.parent, root=root)
    return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_file(path: Path, *, root: Path | None = None) -> BinaryIO:
    """`path` opened for reading: a regular file, no link followed (module docstring).

    FileNotFoundError when it is missing, PodFileRefused when it is not a regular file or a
    link is met.
    """
    _relative(path, root)
    parent = _open_parent(path, root)
    try:
        try:
            fd = os.open(path.name, _READ_FLAGS, dir_fd=parent)
        except OSError as error:
            raise _refusal(path, error) from error
    finally:
        os.close(parent)
    return os.fdopen(_regular(fd, path), "rb")


def read_bytes(path: Path, *, root: Path | None = None, limit: int = MARKER_LIMIT) -> bytes:
    """At most `limit` bytes of the regular file `path` (see `open_file` for the errors)."""
    with open_file(path, root=root) as handle:
        return handle.read(limit)


def read_text(path: Path, *, root: Path | None = None, limit: int = MARKER_LIMIT) -> str:
    """`read_bytes` decoded as UTF-8 (undecodable bytes replaced)."""
    return read_bytes(path, root=root, limit=limit).decode("utf-8", "replace")


def read_marker(path: Path, *, root: Path | None = None) -> str | None:
    """A small file's text, stripped; None when it is missing (its folder too) or refused."""
    try:
        return read_text(path, root=root).strip()
    except (FileNotFoundError, NotADirectoryError, PodFileRefused):
        return None


def is_file(path: Path) -> bool:
    """Whether `path` is a regular file itself (a link to one is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_folder(path: Path) -> bool:
    """Whether `path` is a folder itself (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def write_file(
    path: Path,
    data: bytes,
    mode: int,
    *,
    root: Path | None = None,
    create_folders: bool = False,
) -> None:
    """Replace `path` with a regular file holding `data`, in `mode`, at once (see the module
    docstring): never written through a link, never readable by others while it is written.

    A folder at `path` is an error (IsADirectoryError), never removed: it is the pod's.
    """
    _relative(path, root)
    if root is None and not create_folders:
        fd = _open_parent(path, None)
    else:
        fd = open_folder(path.parent, root=root, create=create_folders)
    try:
        write_in(fd, path.name, data, mode, shown=path)
    finally:
        os.close(fd)


def write_in(dir_fd: int, name: str, data: bytes, mode: int, *, shown: Path | str = "") -> None:
    """`write_file` of the file `name` in the folder open as `dir_fd`."""
    if not name or "/" in name or name in (".", ".."):
        raise PodFileRefused(shown or name, "is not a file name")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    temporary = f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise


def write_text(path: Path, text: str, mode: int = 0o600, *, root: Path | None = None) -> None:
    """`write_file` of `text` as UTF-8."""
    write_file(path, text.encode(), mode, root=root)


def open_append(path: Path, mode: int = 0o600) -> int:
    """A descriptor of `path` opened to append (created in `mode` when missing), never
    through a link; PodFileRefused when it is not a regular file. The caller closes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as error:
        raise _refusal(path, error) from error
    return _regular(fd, path)


def _regular(fd: int, path: Path | str) -> int:
    """`fd`, made blocking, when it is a regular file; closed, and PodFileRefused, if not."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PodFileRefused(path, "is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
