"""A container's termination message: the file at its terminationMessagePath, kept past its end.

Kubernetes gives each container a writable file at `terminationMessagePath` (default
/dev/termination-log) and shows what the container wrote there as its terminated state's
message. Under Apptainer's `--contain`, /dev is a small tmpfs that Apptainer stages for each
run, and no bind can add a file to it: so the launcher places the file there itself, and reads
it before the tmpfs is gone.

The handshake, one per run (the job script binds the two files, kubelet_py.pod.render):
- the container's folder holds a FIFO (`handshake`), bound at READY_PATH, and a hook
  (`handshake.sh`), bound into the image's /.singularity.d/env/, which Apptainer's shell runs
  in the container, after every mount is made and before the container's command starts; the
  hook waits for a line on the FIFO (kubelet_py.job.podfolder names both files);
- once the hook has opened the FIFO, the launcher finds the container's process (the one that
  holds the FIFO), opens the folder of the termination path below that process's root, one
  component at a time without following links (a link in an image could point anywhere on the
  host), creates the file there (0666: the container may run as another user) and keeps the
  folder open; then it writes the line, and the command starts;
- when the run has ended, the launcher reads at most TERMINATION_MESSAGE_LIMIT bytes of the
  file through the folder it kept open (its tmpfs lives on while that is open), and writes them
  to the container folder's `termination-log`, which kubelet_py.pod.status reads.

A failure anywhere releases the container all the same: a container never waits on hpk's
message, it only loses it (the reason goes to its log).

Stdlib only, with kubelet_py.job.podfiles and kubelet_py.job.podfolder: it runs in the job on
the compute node.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import ContainerFolder

READY_PATH = "/.hpk-ready"
"""Where the FIFO is bound inside the container."""
HOOK_PATH = "/.singularity.d/env/00-hpk-ready.sh"
"""Where the hook is bound: Apptainer sources /.singularity.d/env/*.sh before the command."""
HOOK_TEXT = f"read -r _ <{READY_PATH}\n"
TERMINATION_MESSAGE_LIMIT = 4096

_POLL_S = 0.005
_JOIN_S = 2.0
_FIND_S = 5.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NoMessageFile(Exception):
    """The termination file could not be placed in the container."""


@dataclass
class Termination:
    """One run's termination file: placed by `place`, read by `collect`."""

    container_dir: Path
    path: PurePosixPath
    """The terminationMessagePath inside the container (absolute)."""
    folder_fd: int | None = None
    problem: str | None = None
    """Why the file could not be placed, once `collect` has returned."""
    _thread: threading.Thread | None = None

    @property
    def _folder(self) -> ContainerFolder:
        return ContainerFolder(self.container_dir)

    def prepare(self) -> None:
        """Before the run: a fresh FIFO and the hook in the container folder, no old message."""
        folder = self._folder
        with contextlib.suppress(FileNotFoundError):
            folder.handshake_fifo.unlink()
        os.mkfifo(folder.handshake_fifo, 0o600)
        podfiles.write_text(folder.handshake_hook, HOOK_TEXT, 0o644)
        with contextlib.suppress(FileNotFoundError):
            folder.termination_log.unlink()

    def place(self, alive: Callable[[], bool], root_pid: int) -> None:
        """Wait until the container's hook waits (while `alive()`), place the file below the
        root of its process (a descendant of `root_pid`), and let it go on. Raises
        NoMessageFile (after letting it go on) when the file could not be placed."""
        fifo = self._folder.handshake_fifo
        writer = _open_writer(fifo, alive)
        if writer is None:
            return  # the run ended before its command started
        try:
            pid = _holder(root_pid, os.stat(fifo))
            if pid is None:
                raise NoMessageFile("no process of the container holds its ready FIFO")
            self.folder_fd = _open_below(f"/proc/{pid}/root", self.path.parent)
            _create(self.folder_fd, self.path.name)
        except OSError as error:
            raise NoMessageFile(f"{self.path}: {error.strerror or error}") from error
        finally:
            with contextlib.suppress(OSError):
                os.write(writer, b"\n")
            os.close(writer)

    def start(self, alive: Callable[[], bool], root_pid: int) -> None:
        """`place` in a thread of its own: the run's output is read meanwhile, and a command
        that never runs the hook (no Apptainer image) only loses its message."""

        def place() -> None:
            try:
                self.place(alive, root_pid)
            except (NoMessageFile, OSError) as error:
                self.problem = str(error)

        self._thread = threading.Thread(target=place, name="termination", daemon=True)
        self._thread.start()

    def collect(self) -> str | None:
        """After the run: its message copied to the container folder; None when empty."""
        if self._thread is not None:
            self._thread.join(timeout=_JOIN_S)
        if self.folder_fd is None:
            return None
        try:
            data = _read_file(self.folder_fd, self.path.name)
        finally:
            os.close(self.folder_fd)
            self.folder_fd = None
        if data:
            podfiles.write_file(self._folder.termination_log, data, 0o600)
        return data.decode("utf-8", "replace") or None


def _open_writer(fifo: Path, alive: Callable[[], bool]) -> int | None:
    """The FIFO opened for writing once its reader (the hook) has opened it."""
    while alive():
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        time.sleep(_POLL_S)
    return None


def _descendants(pid: int) -> Iterator[int]:
    """`pid` and its descendants. Each thread lists the children it forked itself, and
    Apptainer's starter forks from several threads: every thread's list is read."""
    todo = [pid]
    while todo:
        current = todo.pop()
        yield current
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{current}/task/{task}/children") as handle,
                ):
                    todo += [int(word) for word in handle.read().split()]


def _holder(root_pid: int, fifo: os.stat_result) -> int | None:
    """The descendant of `root_pid` with the FIFO open (the container's hook). The reader's
    open returns only once a writer has come, so its descriptor may show up a moment after
    the writer's open succeeded: looked for a while."""
    deadline = time.monotonic() + _FIND_S
    while True:
        for pid in _descendants(root_pid):
            with contextlib.suppress(OSError):
                for name in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        found = os.stat(f"/proc/{pid}/fd/{name}")
                        if (found.st_dev, found.st_ino) == (fifo.st_dev, fifo.st_ino):
                            return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(_POLL_S)


def _open_below(root: str, folder: PurePosixPath) -> int:
    """`folder` (absolute, inside the container) opened below `root`, one component at a
    time, never through a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in folder.parts[1:]:
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, f"{part!r} in the path")
            below = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(folder_fd: int, name: str) -> None:
    """The empty file `name`, writable by any user of the container (the file the image
    has there is kept, if it is a regular file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, 0o666, dir_fd=folder_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.fchmod(fd, 0o666)
    finally:
        os.close(fd)


def _read_file(folder_fd: int, name: str) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
    except OSError:
        return b""  # removed or replaced by a link: no message
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, TERMINATION_MESSAGE_LIMIT)
    finally:
        os.close(fd)
