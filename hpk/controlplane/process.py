"""Start, watch and stop one long-running program: argv in, log file and pid file out.

This layer knows nothing about Kubernetes. A component is described by a `ProcessSpec`, and a
`Runner` turns the spec into the command line that is really executed. `HostRunner` runs the
argv as it is; a runner that wraps it in `apptainer exec` (using `ProcessSpec.paths` for the
bind mounts) can be dropped in without touching the components.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hpk.files import open_private_append, private_dir, write_atomic

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
"""How many lines of a component's log an error message quotes."""


class ControlPlaneError(RuntimeError):
    """Base of every error the control-plane launcher raises."""


class ComponentFailed(ControlPlaneError):
    """A component exited or never became ready during start-up.

    The message names the component and quotes the tail of its log.
    """

    def __init__(self, component: str, reason: str, *, log_file: Path) -> None:
        self.component = component
        self.reason = reason
        self.log_file = log_file
        self.log_tail = tail(log_file)
        super().__init__(f"{component} {reason}; last lines of {log_file}:\n{self.log_tail}")


class ComponentExited(ComponentFailed):
    """The component's process ended while it was starting."""


class ComponentNotReady(ComponentFailed):
    """The component kept running but did not pass its readiness check in time."""


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

    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self._popen = popen

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
            raise ControlPlaneError(f"{self.name} (pid {self.pid}) survived SIGKILL")
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

    def fail(self, reason: str) -> ComponentFailed:
        """The error to raise when this process failed to start; says whether it exited."""
        code = self.returncode()
        if code is not None:
            return ComponentExited(
                self.name, f"exited with status {code} during start-up", log_file=self.spec.log_file
            )
        return ComponentNotReady(self.name, reason, log_file=self.spec.log_file)


def start_process(spec: ProcessSpec, *, runner: Runner | None = None) -> RunningProcess:
    """Start `spec` in its own session with output appended to its log; record its pid."""
    argv = (runner or HostRunner()).command(spec)
    private_dir(spec.log_file.parent)
    private_dir(spec.pid_file.parent)
    fd = open_private_append(spec.log_file)
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
        )
    finally:
        os.close(fd)
    write_atomic(spec.pid_file, f"{popen.pid}\n")
    log.info("started %s (pid %d), log %s", spec.name, popen.pid, spec.log_file)
    return RunningProcess(spec, popen)


def stop_all(processes: Sequence[RunningProcess], *, timeout: float) -> None:
    """Stop `processes` in reverse order of the sequence (the last started goes first)."""
    for process in reversed(processes):
        try:
            process.stop(timeout=timeout)
        except Exception:
            log.exception("could not stop %s (pid %d)", process.name, process.pid)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, indented for quoting in a message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "    (no log file)"
    return "\n".join(f"    | {line}" for line in text)
