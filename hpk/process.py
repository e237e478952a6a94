"""Start, watch and stop long-running programs: argv in, log file and pid file out.

Two users share it: the control-plane launcher, which owns its components for as long as it
runs, and the test bed, whose daemons outlive the `hpk dev up` that started them and are
found again through their pid files. This layer knows nothing about Kubernetes or Slurm.

A program is described by a `ProcessSpec`, and a `Runner` turns the spec into the command line
that is really executed. `HostRunner` runs the argv as it is; a runner that wraps it in
`apptainer exec` (using `ProcessSpec.paths` for the bind mounts) can be dropped in without
touching the components.

Each process gets its own session, so stopping signals its whole process group: that also
reaches helpers a wrapper such as Apptainer's starter leaves behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from hpk.files import open_private_append, private_dir, write_atomic

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
"""How many lines of a component's log an error message quotes."""


class ProcessFailed(RuntimeError):
    """A program exited or never became ready during start-up, or would not stop.

    The message names the program and quotes the tail of its log.
    """

    def __init__(self, name: str, reason: str, *, log_file: Path) -> None:
        self.name = name
        self.reason = reason
        self.log_file = log_file
        self.log_tail = tail(log_file)
        super().__init__(f"{name} {reason}; last lines of {log_file}:\n{self.log_tail}")


class ProcessExited(ProcessFailed):
    """The process ended while it was starting."""


class ProcessNotReady(ProcessFailed):
    """The process kept running but did not pass its readiness check in time."""


@dataclass(frozen=True)
class ProcessSpec:
    """One program to run in the background."""

    name: str
    """Short name used in file names, log lines and errors (e.g. 'kube-apiserver')."""

    argv: tuple[str, ...]
    """Program and arguments; the program must stay in the foreground."""

    log_file: Path
    """Where stdout and stderr are appended."""

    pid_file: Path
    """Where the pid is recorded while the process runs."""

    paths: tuple[Path, ...] = ()
    """Folders the program reads or writes. A container runner must make them visible."""

    env: Mapping[str, str] = field(default_factory=dict)
    """Variables added to the launcher's environment."""


class Runner(Protocol):
    """Turns a spec into the command line that is executed."""

    def command(self, spec: ProcessSpec) -> list[str]:
        """The full argv to execute for `spec`; must keep the program in the foreground and
        pass SIGTERM on to it."""
        ...


class HostRunner:
    """Runs the program directly on the host."""

    def command(self, spec: ProcessSpec) -> list[str]:
        return list(spec.argv)


class RunningProcess:
    """A started process; `stop` ends it and its process group."""

    def __init__(
        self, spec: ProcessSpec, popen: subprocess.Popen[bytes], *, log_offset: int = 0
    ) -> None:
        self.spec = spec
        self._popen = popen
        self.log_offset = log_offset
        """Where this run's output begins in the log, which earlier runs appended to too."""

    def log_text(self) -> str:
        """What this run has written to its log so far (not what earlier runs wrote)."""
        try:
            with self.spec.log_file.open("rb") as log_file:
                log_file.seek(self.log_offset)
                return log_file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self._popen.pid

    def returncode(self) -> int | None:
        """None while the process runs, else its exit status (negative: killed by a signal)."""
        if self._popen.returncode is None:
            if not self._exited():
                return None
            # The unreaped zombie still holds the pid, so the group id cannot belong to anyone
            # else yet: kill helpers left in the group, then reap.
            self._signal_group(signal.SIGKILL)
            self._popen.wait()
        return self._popen.returncode

    def alive(self) -> bool:
        return self.returncode() is None

    def stop(self, *, timeout: float) -> int:
        """SIGTERM the process group, SIGKILL it after `timeout` seconds; returns the exit
        status. Safe to call more than once."""
        if self.alive():
            log.info("stopping %s (pid %d)", self.name, self.pid)
            self._signal_group(signal.SIGTERM)
            if not self._wait_exited(timeout):
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s; killing it",
                    self.name,
                    self.pid,
                    timeout,
                )
                self._signal_group(signal.SIGKILL)
                self._wait_exited(30.0)
        status = self.returncode()
        self.spec.pid_file.unlink(missing_ok=True)
        if status is None:
            raise ProcessFailed(self.name, "survived SIGKILL", log_file=self.spec.log_file)
        log.info("%s (pid %d) ended with status %d", self.name, self.pid, status)
        return status

    def _exited(self) -> bool:
        """Whether the process has ended, without reaping it."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _wait_exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _signal_group(self, signum: signal.Signals) -> None:
        # The process leads its own session, so its group id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def fail(self, reason: str) -> ProcessFailed:
        """The error to raise when this process failed to start; says whether it exited."""
        code = self.returncode()
        if code is not None:
            return ProcessExited(
                self.name, f"exited with status {code} during start-up", log_file=self.spec.log_file
            )
        return ProcessNotReady(self.name, reason, log_file=self.spec.log_file)


def start_process(spec: ProcessSpec, *, runner: Runner | None = None) -> RunningProcess:
    """Start `spec` in its own session with output appended to its log; record its pid.

    It starts in `/`, as a daemon does: a folder of the caller's that is removed later would
    otherwise stay its working folder, and Slurm's daemons pass theirs on to every job."""
    argv = (runner or HostRunner()).command(spec)
    private_dir(spec.log_file.parent)
    private_dir(spec.pid_file.parent)
    fd = open_private_append(spec.log_file)
    log_offset = os.fstat(fd).st_size
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"==== {stamp} hpk starts: {shlex.join(argv)}\n".encode())
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **spec.env},
            cwd="/",
        )
    finally:
        os.close(fd)
    write_atomic(spec.pid_file, f"{popen.pid}\n")
    log.info("started %s (pid %d), log %s", spec.name, popen.pid, spec.log_file)
    return RunningProcess(spec, popen, log_offset=log_offset)


def stop_all(processes: Sequence[RunningProcess], *, timeout: float) -> None:
    """Stop `processes` in reverse order of the sequence (the last started goes first)."""
    for process in reversed(processes):
        try:
            process.stop(timeout=timeout)
        except Exception:
            log.exception("could not stop %s (pid %d)", process.name, process.pid)


# --- Daemons that outlive the command that started them -------------------------------------
# The test bed's `up` starts daemons and exits; `status` and `down` find them again through
# their pid files. A pid file counts only while its process is alive and still runs the same
# program, so a stale file after a crash or a reboot is recognised as such.

_detached: dict[int, RunningProcess] = {}
"""Daemons started by this process, kept so that they are reaped when stopped here."""


def recorded_pid(spec: ProcessSpec) -> int | None:
    """The pid in `spec.pid_file` if that process is alive and runs `spec`'s program."""
    try:
        pid = int(spec.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    own = _detached.get(pid)
    if own is not None:
        # Started here: its handle knows, while its command line may still be ours for the
        # moment between fork and exec.
        return pid if own.alive() else None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = process.cmdline()
    except psutil.Error:
        return None
    if cmdline and Path(cmdline[0]).name == Path(spec.argv[0]).name:
        return pid
    return None


def start_detached(spec: ProcessSpec) -> int:
    """Start `spec` unless its pid file names it running already; return its pid."""
    pid = recorded_pid(spec)
    if pid is not None:
        log.info("%s already running (pid %d)", spec.name, pid)
        return pid
    spec.pid_file.unlink(missing_ok=True)
    process = start_process(spec)
    _detached[process.pid] = process
    return process.pid


def wait_until(spec: ProcessSpec, check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll `check` until it holds; fail early, quoting the log, if the daemon died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if recorded_pid(spec) is None:
            raise ProcessExited(spec.name, "exited during start-up", log_file=spec.log_file)
        time.sleep(0.2)
    raise ProcessNotReady(
        spec.name, f"was not {what} within {timeout:.0f} s", log_file=spec.log_file
    )


def stop_recorded(spec: ProcessSpec, *, timeout: float) -> bool:
    """Stop the daemon named by `spec`'s pid file: SIGTERM its process group, SIGKILL after
    `timeout`. Returns whether it was running; the pid file is removed either way."""
    pid = recorded_pid(spec)
    if pid is None:
        spec.pid_file.unlink(missing_ok=True)
        return False
    own = _detached.pop(pid, None)
    if own is not None:
        own.stop(timeout=timeout)
        return True
    log.info("stopping %s (pid %d)", spec.name, pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    try:
        psutil.Process(pid).wait(timeout=timeout)
    except psutil.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", spec.name, pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        psutil.Process(pid).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    spec.pid_file.unlink(missing_ok=True)
    return True


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, indented for quoting in a message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "    (no log file)"
    return "\n".join(f"    | {line}" for line in text)
