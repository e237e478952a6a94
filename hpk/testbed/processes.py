"""Background daemons tracked by pid files: start, check, stop.

Each daemon runs in the foreground of its own session, with its output in a log file and its
pid in <bed>/run/pids/<name>.pid. A pid file counts only while its process is alive and still
runs the same program, so a stale file after a crash is recognised and replaced.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Daemons started by this process, kept so that they are reaped when stopped here, and so that
# a Popen is never collected (and warned about) while its daemon runs on purpose.
_children: dict[int, subprocess.Popen[bytes]] = {}


class DaemonFailed(RuntimeError):
    """A daemon exited or never became ready; the message names it and its log."""


@dataclass(frozen=True)
class Daemon:
    name: str
    """Short name, used for the pid file and in messages (e.g. 'slurmd-n1')."""
    argv: Sequence[str]
    """Command line; the program must stay in the foreground."""
    pid_file: Path
    """Where the pid is recorded."""
    log_file: Path
    """Where stdout and stderr go."""

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name


def running_pid(daemon: Daemon) -> int | None:
    """The daemon's pid if its pid file names a live process running its program."""
    try:
        pid = int(daemon.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    if cmdline and Path(cmdline[0]).name == daemon.program:
        return pid
    return None


def start(daemon: Daemon, *, env: dict[str, str] | None = None) -> int:
    """Start the daemon unless it already runs; return its pid."""
    pid = running_pid(daemon)
    if pid is not None:
        log.info("%s already running (pid %d)", daemon.name, pid)
        return pid
    daemon.pid_file.unlink(missing_ok=True)
    daemon.pid_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(daemon.log_file, "ab") as out:
        process = subprocess.Popen(
            list(daemon.argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _children[process.pid] = process
    daemon.pid_file.write_text(f"{process.pid}\n")
    log.info("started %s (pid %d)", daemon.name, process.pid)
    return process.pid


def wait_ready(
    daemon: Daemon, check: Callable[[], bool], *, timeout: float, what: str = "ready"
) -> None:
    """Poll `check` until it is true; fail early, with the log's tail, if the daemon died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(daemon) is None:
            raise DaemonFailed(f"{daemon.name} exited during start-up\n{tail(daemon.log_file)}")
        time.sleep(0.2)
    raise DaemonFailed(f"{daemon.name} not {what} after {timeout:.0f} s\n{tail(daemon.log_file)}")


def stop(daemon: Daemon, *, timeout: float = 20.0) -> bool:
    """Stop the daemon by its pid: SIGTERM, then SIGKILL after `timeout`. Returns whether it
    was running. The pid file is removed either way."""
    pid = running_pid(daemon)
    daemon.pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    terminate_and_wait(pid, timeout=timeout, name=daemon.name)
    return True


def terminate_and_wait(pid: int, *, timeout: float, name: str) -> None:
    try:
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(timeout=10)
    except psutil.NoSuchProcess:
        pass
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(timeout=1)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(f"    | {line}" for line in text) + f"\n    (log: {path})"
