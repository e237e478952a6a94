"""Runs one container of a pod inside the pod's Slurm job and records it: markers and log.

The job script starts every container through this module, on the compute node:

    python -I -m kubelet_py.job.launch [--image SIF] CONTAINER_DIR -- COMMAND...

It writes CONTAINER_DIR/started, runs COMMAND (the `apptainer exec|run ...` line) with no
input, reads its stdout and stderr from two pipes, appends each line to CONTAINER_DIR/log as
"<RFC 3339 time with nanoseconds> <stdout|stderr> <line>", and when COMMAND has ended writes
CONTAINER_DIR/exit ("<code> <time>") and exits with the same code.

Why a process and not shell pipes: bash cannot stamp lines with nanoseconds without a process
per line, and it does not wait for process substitutions, so the last lines of a log could
land after the exit marker, or be lost when the job ends. One reader for both pipes also keeps
stdout and stderr in the order they arrived as closely as two pipes allow.

TERM, INT and HUP are passed on to COMMAND (after its preStop hook, with `--hooks`); this
process keeps reading until COMMAND has ended, so the exit marker holds the container's real
code (143 after TERM) unless Slurm's KILL ends everything first, in which case the job
script's trap has already written 137. With `--grace SECONDS`, COMMAND (its whole process
group) gets KILL that long after the first signal, so a container that ignores TERM still
ends (sidecars stopped by the job script).

`--restart OnFailure|Always` runs COMMAND again when it ends (OnFailure: with a non-zero
code), after Kubernetes' back-off (`Backoff`), until a signal comes: that is how a pod's
restartPolicy and a native sidecar's are honoured inside one Slurm job. Before each new run
the previous run's end goes to CONTAINER_DIR/last, its log to CONTAINER_DIR/log.previous, and
the count to CONTAINER_DIR/restarts; CONTAINER_DIR/backoff exists while it waits.

`--probes FILE` runs the container's startup, liveness and readiness probes beside each run
(kubelet_py.job.probes): they write CONTAINER_DIR/startup and CONTAINER_DIR/ready, and a failed
liveness or startup probe stops the run (TERM to its process group, KILL after the probe's
grace period); the restart policy then decides as for any other end.

`--hooks FILE` runs the container's lifecycle hooks (kubelet_py.job.hooks), as Kubernetes
does:
- postStart starts with COMMAND and runs beside it. The run counts as started only once the
  hook has passed: CONTAINER_DIR/started is written then (with the time COMMAND started), and
  the probes begin then. A hook that fails writes CONTAINER_DIR/poststart-failed and a line to
  the log, and the run is stopped as below (with the pod's grace period); the restart policy
  decides what comes next. A run that ends before its hook has passed stops the hook.
- preStop runs whenever the launcher stops a running container: a signal (the pod deleted,
  the job's end for a sidecar), a failed probe, a failed postStart hook. The signal (TERM for
  the launcher's own stops) goes to COMMAND once the hook has ended, or once the grace period
  is over (`--grace`, the probe's, else the pod's). The launcher's KILL, where it sends one
  (`--grace`, a failed probe or postStart hook), comes at the end of the grace period and at
  least 2 s after that signal; otherwise the job's end (the kubelet's KILL at the end of the
  pod's grace period) ends what is left. A hook that fails writes
  CONTAINER_DIR/prestop-failed and a line to the log; the stop goes on. A container that ends
  by itself runs no preStop hook.

Containers can write in the pod folder, so the markers and the log are written through
kubelet_py.job.podfolder and kubelet_py.job.podfiles: a marker replaces whatever has its name
(a link is replaced, never written through) and the log is opened without following a link
(one in its place is removed), so a container cannot have the launcher write into a file of
the user's. The launcher never reads a marker back: `last` is written from the times it
wrote itself.

While a run lasts, CONTAINER_DIR/pid holds its process, for `kubectl exec`
(kubelet_py.job.enter). With `--attach`, CONTAINER_DIR/attach is a socket for `kubectl
attach` (kubelet_py.job.attach): attached clients get the container's output, and its input
when it has one: `--stdin` keeps a pipe open to it (`--stdin-once`: until the first client
that used it leaves), and `--tty` runs it on a terminal whose other side the launcher keeps
(its output is then all `stdout`).

It runs on compute nodes and must start fast: stdlib only, nothing else of kubelet_py
but the rest of kubelet_py.job (stdlib only too).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import pty
import selectors
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import IO

from kubelet_py.job import podfiles
from kubelet_py.job.attach import AttachPoint
from kubelet_py.job.clock import rfc3339
from kubelet_py.job.handlers import exec_prefix
from kubelet_py.job.hooks import POST_START, PRE_STOP, TITLES, Hook, Hooks, Outcome, run_hook
from kubelet_py.job.podfolder import HOOK_FAILED, ContainerFolder
from kubelet_py.job.probes import Probe, Probes, Runner, check
from kubelet_py.job.termination import Termination

IMAGE_CANNOT_RUN = 125
"""The exit code when the container cannot be started at all (as `docker run` uses it)."""

LONGEST_LINE = 1 << 20
"""A line longer than this many bytes is logged in pieces of this size, so memory stays
bounded when a program writes without newlines."""

DRAIN_SECONDS = 2.0
"""How long to keep reading after COMMAND ended, for output still in the pipes. A background
process that keeps the pipes open longer loses what it writes after that."""

NEVER = "Never"
ON_FAILURE = "OnFailure"
ALWAYS = "Always"
RESTART_POLICIES = (NEVER, ON_FAILURE, ALWAYS)

_READ_SIZE = 1 << 16
_POLL_SECONDS = 0.2
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STREAMS = ("stdout", "stderr")


def open_log(path: Path) -> int:
    """The log file opened to append, never through a link: a link or anything else that
    is no regular file in its place (a container put it there) is removed first."""
    try:
        return podfiles.open_append(path, 0o600)
    except podfiles.PodFileRefused:
        path.unlink()
        return podfiles.open_append(path, 0o600)


class LogWriter:
    """Turns the bytes of two streams into stamped log lines, one write per batch of lines."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: dict[str, bytearray] = {stream: bytearray() for stream in _STREAMS}

    def feed(self, stream: str, data: bytes, *, now: int) -> None:
        """Add bytes read from `stream` at time `now` (ns); log every line they complete."""
        pending = self._pending[stream]
        pending += data
        entries: list[bytes] = []
        stamp = rfc3339(now).encode()
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            entries.append(b"%s %s %s\n" % (stamp, stream.encode(), pending[start:end]))
            start = end + 1
        del pending[:start]
        while len(pending) >= LONGEST_LINE:
            entries.append(b"%s %s %s\n" % (stamp, stream.encode(), pending[:LONGEST_LINE]))
            del pending[:LONGEST_LINE]
        self._write(b"".join(entries))

    def line(self, stream: str, text: str, *, now: int) -> None:
        """Log one line of hpk's own (why a container could not start)."""
        self.feed(stream, text.encode() + b"\n", now=now)

    def close(self, *, now: int) -> None:
        """Log what is left of unfinished last lines, without inventing newlines in the data."""
        stamp = rfc3339(now).encode()
        for stream, pending in self._pending.items():
            if pending:
                self._write(b"%s %s %s\n" % (stamp, stream.encode(), pending))
                pending.clear()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


def exit_code(returncode: int) -> int:
    """A process's code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Backoff:
    """Kubernetes' restart back-off: 10 s before the first restart, doubling up to 5 min, and
    back to 10 s once a run has lasted 10 min."""

    initial: float = 10.0
    """Seconds before the first restart."""
    cap: float = 300.0
    """The longest wait."""
    reset_after: float = 600.0
    """A run at least this long (seconds) starts the doubling again."""
    _streak: int = field(default=0, init=False)

    def delay(self, *, ran: float) -> float:
        """Seconds to wait before the next run, after a run of `ran` seconds."""
        if ran >= self.reset_after:
            self._streak = 0
        wait = min(math.ldexp(self.initial, min(self._streak, 32)), self.cap)
        self._streak += 1
        return wait


@dataclass(frozen=True)
class Clock:
    """Where the restart loop reads time and waits (real by default; tests pass a fake)."""

    monotonic: Callable[[], float] = time.monotonic
    """Seconds from an arbitrary start, never going back."""
    sleep: Callable[[float], None] = time.sleep
    """Wait this many seconds (a signal may cut it short)."""


@dataclass(frozen=True)
class _Run:
    """One run of the container as its markers tell it: what `last` keeps of it."""

    code: int
    started: str
    """RFC 3339, as written to `started`."""
    finished: str
    """RFC 3339, as written to `exit`."""


@dataclass
class _Signals:
    """The signals received so far, and the container's process they go to."""

    received: list[int] = field(default_factory=list)
    first_at: float | None = None
    """time.monotonic() when the first signal came."""
    child: subprocess.Popen[bytes] | None = None
    hold: bool = False
    """Keep signals from the container for now: its preStop hook runs first (`_RunControl`
    passes the first on once the hook has ended)."""


def restarts(policy: str, code: int) -> bool:
    """Whether a container under `policy` runs again after ending with `code`."""
    return policy == ALWAYS or (policy == ON_FAILURE and code != 0)


def launch(
    container_dir: Path,
    command: Sequence[str],
    *,
    image: Path | None = None,
    restart: str = NEVER,
    grace: float | None = None,
    backoff: Backoff | None = None,
    clock: Clock | None = None,
    probes: Probes | None = None,
    hooks: Hooks | None = None,
    termination: PurePosixPath | None = None,
    console: Console | None = None,
    attachable: bool = False,
) -> int:
    """Run one container as the module docstring says; returns its (last run's) exit code."""
    if restart not in RESTART_POLICIES:
        raise ValueError(f"restart policy {restart!r} is none of {RESTART_POLICIES}")
    backoff = backoff or Backoff()
    clock = clock or Clock()
    signals = _Signals()

    def forward(signum: int, _frame: FrameType | None) -> None:
        signals.received.append(signum)
        if signals.first_at is None:
            signals.first_at = time.monotonic()
        child = signals.child
        if child is not None and child.returncode is None and not signals.hold:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    if signals.received:  # stopped before it started: the container never ran, so no markers
        return 128 + signals.received[0]

    container_dir.mkdir(parents=True, exist_ok=True)
    folder = ContainerFolder(container_dir)
    console = console or Console()
    attach = AttachPoint(container_dir, stdin_once=console.stdin_once) if attachable else None
    container = _Container(
        command=command,
        image=image,
        grace=grace,
        probes=probes,
        hooks=hooks,
        termination=termination,
        console=console,
        attach=attach,
    )
    try:
        return _runs(folder, container, signals, restart=restart, backoff=backoff, clock=clock)
    finally:
        if attach is not None:
            attach.close()


@dataclass(frozen=True)
class _Container:
    """What every run of the container starts with."""

    command: Sequence[str]
    image: Path | None
    grace: float | None
    probes: Probes | None
    hooks: Hooks | None
    termination: PurePosixPath | None
    console: Console
    attach: AttachPoint | None


def _runs(
    folder: ContainerFolder,
    container: _Container,
    signals: _Signals,
    *,
    restart: str,
    backoff: Backoff,
    clock: Clock,
) -> int:
    """The container's runs, as its restart policy has them; the last one's exit code."""
    count = 0
    while True:
        began = clock.monotonic()
        run = _run(folder, container, signals)
        if signals.received or not restarts(restart, run.code):
            return run.code
        delay = backoff.delay(ran=clock.monotonic() - began)
        folder.mark_backoff(delay, rfc3339(time.time_ns() + int(delay * 1e9)))
        if not _pause(delay, signals=signals, clock=clock):
            folder.backoff.unlink(missing_ok=True)
            return run.code
        count += 1
        _keep_previous(folder, run, count)


def _pause(seconds: float, *, signals: _Signals, clock: Clock) -> bool:
    """Wait `seconds`, in short steps; False when a signal came meanwhile."""
    end = clock.monotonic() + seconds
    while not signals.received:
        left = end - clock.monotonic()
        if left <= 0:
            return True
        clock.sleep(min(left, _POLL_SECONDS))
    return False


def _keep_previous(folder: ContainerFolder, run: _Run, count: int) -> None:
    """Before run `count` + 1: the ended `run` to `last`, its log to `log.previous`."""
    folder.mark_last(run.code, run.started, run.finished)
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder.log, folder.previous_log)
    folder.mark_restarts(count)


def _run(folder: ContainerFolder, container: _Container, signals: _Signals) -> _Run:
    """One run of the container: `started`, the log, `exit` (and its termination message,
    kubelet_py.job.termination)."""
    image, hooks, termination = container.image, container.hooks, container.termination
    fd = open_log(folder.log)
    log = LogWriter(fd)
    began = time.monotonic()
    started = rfc3339(time.time_ns())
    marked: list[str] = []

    def mark_started() -> None:
        if not marked:
            folder.mark_started(started)
            marked.append(started)

    try:
        if hooks is not None and hooks.post_start is not None:
            # The run counts as started once its postStart hook has passed: until then a
            # reader sees the container waiting, never the run before as running.
            folder.started.unlink(missing_ok=True)
        else:
            mark_started()
        # A new run: the markers of the one before go, so readers see it running.
        for stale in (folder.exit, folder.backoff, *map(folder.hook_failed, HOOK_FAILED)):
            stale.unlink(missing_ok=True)
        if image is not None and not os.access(image, os.R_OK):
            log.line("stderr", f"hpk: cannot read the image file {image}", now=time.time_ns())
            code = IMAGE_CANNOT_RUN
        else:
            message = None if termination is None else Termination(folder.path, termination)
            code = _run_command(
                folder,
                container,
                log=log,
                signals=signals,
                message=message,
                began=began,
                mark_started=mark_started,
            )
        log.close(now=time.time_ns())
    finally:
        os.close(fd)
    mark_started()  # a run that ended before its postStart hook passed still ran
    finished = rfc3339(time.time_ns())
    folder.mark_exit(code, finished)
    return _Run(code=code, started=started, finished=finished)


def _run_command(
    folder: ContainerFolder,
    container: _Container,
    *,
    log: LogWriter,
    signals: _Signals,
    message: Termination | None,
    began: float,
    mark_started: Callable[[], None],
) -> int:
    """COMMAND started, logged and waited for; its exit code."""
    command, grace, probes, hooks = (
        container.command,
        container.grace,
        container.probes,
        container.hooks,
    )
    console, attach = container.console, container.attach
    stdio = _Stdio.open(console)
    try:
        if message is not None:
            message.prepare()
        child = subprocess.Popen(
            list(command),
            stdin=stdio.child_stdin,
            stdout=stdio.child_stdout,
            stderr=stdio.child_stderr,
            # Its own process group, so that KILL after the grace period reaches every
            # process of the container; a terminal's own session, whose terminal it is.
            start_new_session=grace is not None
            or probes is not None
            or hooks is not None
            or console.tty,
            preexec_fn=_take_terminal if console.tty else None,  # noqa: PLW1509 (only ioctl)
        )
    except OSError as error:
        stdio.close()
        log.line("stderr", f"hpk: cannot start {command[0]}: {error}", now=time.time_ns())
        return IMAGE_CANNOT_RUN
    sources = stdio.started(child)
    if attach is not None:
        attach.run_started(stdio.take_input(child), stdio.resize)
    # Held from the start: a signal that comes from now on waits for the preStop hook.
    signals.hold = hooks is not None and hooks.pre_stop is not None
    signals.child = child
    if signals.received:  # a signal came between the check above and the start
        signals.hold = False
        os.kill(child.pid, signals.received[-1])
    folder.mark_pid(child.pid)
    if message is not None:
        message.start(lambda: child.poll() is None, child.pid)
    control = _RunControl(
        child=child,
        folder=folder,
        log=log,
        signals=signals,
        grace=grace,
        probes=probes,
        hooks=hooks or Hooks(),
        prefix=exec_prefix(command, container.image),
        began=began,
        mark_started=mark_started,
    )
    control.start()
    code = _pump(child, log, sources, tick=control.tick, attach=attach)
    stdio.close()
    if attach is not None:
        attach.run_ended()
    signals.child = None
    signals.hold = False
    folder.mark_pid(None)
    if message is not None:
        message.collect()
        if message.problem is not None:
            log.line("stderr", f"hpk: no termination log: {message.problem}", now=time.time_ns())
    control.finish()
    return code


MIN_KILL_SECONDS = 2.0
"""Kubernetes' shortest time between TERM and KILL after a preStop hook: a container whose
hook used up its grace period still gets this long."""


@dataclass
class _Probing:
    """The probes of one run, in their thread."""

    runner: Runner
    thread: threading.Thread
    done: threading.Event

    def stop(self) -> None:
        self.done.set()
        # An exec probe may still run (up to its timeout): the exit marker does not wait.
        self.thread.join(timeout=1.0)
        self.runner.finish()


class _HookRun:
    """One hook running in a thread of its own; `outcome` once it has ended."""

    def __init__(self, hook: Hook, *, prefix: Sequence[str], timeout: float | None) -> None:
        self.hook = hook
        self.stopped = threading.Event()
        self.outcome: Outcome | None = None

        def run() -> None:
            self.outcome = run_hook(hook, exec_prefix=prefix, timeout=timeout, stop=self.stopped)

        self._thread = threading.Thread(target=run, name="hook", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def cancel(self) -> None:
        """Stop the hook (its command gets KILL) and wait a moment for its thread."""
        self.stopped.set()
        self._thread.join(timeout=1.0)


@dataclass
class _Stop:
    """A stop of the run under way: its preStop hook, then the signal, then KILL."""

    began: float
    """time.monotonic() when it was decided."""
    signum: int
    group: bool
    """Whether the signal goes to the container's process group (a stop of the launcher's
    own: a failed probe or postStart hook) or to its process (a signal passed on)."""
    grace: float | None
    """Seconds from `began` to KILL; None: the launcher sends none (the job's end does)."""
    bound: float
    """The longest the preStop hook may take."""
    hook: _HookRun | None = None
    sent_at: float | None = None
    """time.monotonic() when the signal went to the container."""
    killed: bool = False

    def kill_at(self) -> float | None:
        """When the container gets KILL; None before the signal went, or never."""
        if self.grace is None or self.sent_at is None:
            return None
        if self.hook is None:
            return self.began + self.grace
        return max(self.began + self.grace, self.sent_at + MIN_KILL_SECONDS)


class _RunControl:
    """What happens around one run of the container besides its output: its postStart hook,
    its probes once it has started, and its stop (preStop hook, signal, KILL).

    `tick` is called by the run's own thread (the one that writes the log) every few tenths of
    a second while the container runs; the probe thread may ask for a stop at any time."""

    def __init__(
        self,
        *,
        child: subprocess.Popen[bytes],
        folder: ContainerFolder,
        log: LogWriter,
        signals: _Signals,
        grace: float | None,
        probes: Probes | None,
        hooks: Hooks,
        prefix: Sequence[str],
        began: float,
        mark_started: Callable[[], None],
    ) -> None:
        self.child = child
        self.folder = folder
        self.log = log
        self.signals = signals
        self.grace = grace
        self.probes = probes
        self.hooks = hooks
        self.prefix = prefix
        self.began = began
        self.mark_started = mark_started
        self.post_start: _HookRun | None = None
        self.probing: _Probing | None = None
        self.stop: _Stop | None = None
        self.probe_note: str | None = None
        """Why a probe stopped the run, for the container's log once it has ended."""
        self._lock = threading.Lock()

    def start(self) -> None:
        """The container's command has just started."""
        if self.hooks.post_start is not None:
            self.post_start = _HookRun(self.hooks.post_start, prefix=self.prefix, timeout=None)
        else:
            self._started()

    def _started(self) -> None:
        """The run counts as started: its marker, then its probes."""
        self.mark_started()
        if self.probes is not None:
            self.probing = _start_probes(
                self.folder.path,
                self.probes,
                check=lambda probe: check(probe, exec_prefix=self.prefix),
                on_failure=self._probe_failed,
                began=self.began,
            )

    def _probe_failed(self, probe: Probe) -> None:
        assert self.probes is not None
        kind = "Startup" if probe is self.probes.startup else "Liveness"
        self.probe_note = (
            f"hpk: {kind} probe failed {probe.failure_threshold} times; stopping the container"
        )
        self.request_stop(signal.SIGTERM, group=True, grace=self.probes.kill_grace(probe))

    def request_stop(self, signum: int, *, group: bool, grace: float | None) -> None:
        """Stop the run: its preStop hook (for at most `grace` seconds, else the pod's grace
        period), then `signum`, then KILL `grace` seconds after now (None: no KILL). A second
        request changes nothing."""
        with self._lock:
            if self.stop is not None:
                return
            pre_stop = self.hooks.pre_stop
            bound = self.hooks.grace if grace is None else grace
            stop = _Stop(
                began=time.monotonic(), signum=signum, group=group, grace=grace, bound=bound
            )
            if pre_stop is not None:
                stop.hook = _HookRun(pre_stop, prefix=self.prefix, timeout=bound)
            else:
                self._send(stop)
            self.stop = stop
        if self.post_start is not None and not self.post_start.done:
            self.post_start.stopped.set()  # the run is ending: its postStart hook no longer counts

    def tick(self) -> None:
        """Move the run on: a signal received, a postStart hook that ended, a stop's steps."""
        signals = self.signals
        if signals.received and self.stop is None:
            if signals.hold:
                self.request_stop(signals.received[0], group=False, grace=self.grace)
            else:  # passed on by the signal handler already
                assert signals.first_at is not None
                with self._lock:
                    self.stop = self.stop or _Stop(
                        began=signals.first_at,
                        signum=signals.received[0],
                        group=False,
                        grace=self.grace,
                        bound=0.0,
                        sent_at=signals.first_at,
                    )
        self._post_start_ended()
        self._stop_steps()

    def _post_start_ended(self) -> None:
        post_start = self.post_start
        if post_start is None or post_start.outcome is None or self.stop is not None:
            return
        outcome = post_start.outcome
        self.post_start = None
        if outcome.ok:
            self._started()
            return
        self._hook_failed(POST_START, outcome, then="stopping the container")
        self.request_stop(signal.SIGTERM, group=True, grace=self.hooks.grace)

    def _stop_steps(self) -> None:
        stop = self.stop
        if stop is None:
            return
        now = time.monotonic()
        hook = stop.hook
        if stop.sent_at is None and hook is not None:
            outcome = hook.outcome
            if outcome is None and now - stop.began < stop.bound:
                return  # the preStop hook runs on
            if outcome is None or outcome.timed_out:
                hook.cancel()
                self._line(
                    f"PreStopHook did not end within {stop.bound:g} s; stopping the container"
                )
            elif not outcome.ok:
                self._hook_failed(PRE_STOP, outcome, then="stopping the container")
            with self._lock:
                self._send(stop)
        kill_at = stop.kill_at()
        first = self.signals.first_at
        if stop.group and self.grace is not None and first is not None:
            # A signal came during the launcher's own stop: its grace period counts too.
            kill_at = min(first + self.grace, kill_at or math.inf)
        if kill_at is not None and now >= kill_at and not stop.killed and self.child.poll() is None:
            stop.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)

    def _send(self, stop: _Stop) -> None:
        """The stop's signal to the container (with the lock held)."""
        stop.sent_at = time.monotonic()
        self.signals.hold = False
        if self.child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if stop.group:
                os.killpg(self.child.pid, stop.signum)
            else:
                os.kill(self.child.pid, stop.signum)

    def _hook_failed(self, which: str, outcome: Outcome, *, then: str) -> None:
        """A failed hook's marker (kubelet_py.pod.status and the kubelet's Events read it)
        and a line in the container's log."""
        at = rfc3339(time.time_ns())
        self.folder.mark_hook_failed(which, at, outcome.summary, outcome.output)
        self._line(f"{TITLES[which]} failed: {outcome.summary}; {then}")

    def _line(self, text: str) -> None:
        self.log.line("stderr", f"hpk: {text}", now=time.time_ns())

    def finish(self) -> None:
        """The container's process has ended: its hooks and probes stop."""
        for run in (self.post_start, None if self.stop is None else self.stop.hook):
            if run is not None and not run.done:
                run.cancel()
        if self.probing is not None:
            self.probing.stop()
        if self.probe_note is not None:
            self.log.line("stderr", self.probe_note, now=time.time_ns())


def _start_probes(
    container_dir: Path,
    probes: Probes,
    *,
    check: Callable[[Probe], bool],
    on_failure: Callable[[Probe], None],
    began: float,
) -> _Probing:
    """Start probing a run that has started, with initial delays from `began`."""
    done = threading.Event()
    runner = Runner(probes=probes, container_dir=container_dir, on_failure=on_failure, check=check)
    thread = threading.Thread(target=runner.run, args=(done,), kwargs={"began": began}, daemon=True)
    thread.start()
    return _Probing(runner=runner, thread=thread, done=done)


def _pump(
    child: subprocess.Popen[bytes],
    log: LogWriter,
    sources: Sequence[tuple[int, str]],
    *,
    tick: Callable[[], None] = lambda: None,
    attach: AttachPoint | None = None,
) -> int:
    """Log what the container writes on `sources` (descriptors and their streams), and pass
    it to the attached clients, until it has ended and they are drained; its exit code."""
    with selectors.DefaultSelector() as selector:
        for fd, stream in sources:
            selector.register(fd, selectors.EVENT_READ, stream)
        drain_until: float | None = None
        while selector.get_map():
            timeout = _POLL_SECONDS
            if drain_until is not None:
                timeout = max(0.0, min(timeout, drain_until - time.monotonic()))
            for key, _ in selector.select(timeout):
                try:
                    data = os.read(key.fd, _READ_SIZE)
                except OSError:  # a terminal whose every process has closed it: EIO
                    data = b""
                if data:
                    log.feed(key.data, data, now=time.time_ns())
                    if attach is not None:
                        attach.output(key.data, data)
                else:
                    selector.unregister(key.fileobj)
            tick()
            if drain_until is None and child.poll() is not None:
                drain_until = time.monotonic() + DRAIN_SECONDS
            elif drain_until is not None and time.monotonic() >= drain_until:
                break
    return exit_code(child.wait())


@dataclass(frozen=True)
class Console:
    """A container's input, as its spec asks: none, a pipe (`stdin`), or a terminal (`tty`)."""

    stdin: bool = False
    stdin_once: bool = False
    """Its input closes when the first attached client that used it leaves."""
    tty: bool = False


def _take_terminal() -> None:
    """In the container's new session: its terminal becomes the session's."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@dataclass
class _Stdio:
    """The descriptors of one run: pipes, or a terminal whose other side the launcher keeps."""

    console: Console
    terminal: int | None = None
    """The terminal's master side (tty)."""
    child_stdin: int = subprocess.DEVNULL
    child_stdout: int = subprocess.PIPE
    child_stderr: int = subprocess.PIPE
    _pipes: list[IO[bytes]] = field(default_factory=list)

    @classmethod
    def open(cls, console: Console) -> _Stdio:
        if console.tty:
            master, slave = pty.openpty()
            os.set_inheritable(slave, False)
            return cls(
                console, terminal=master, child_stdin=slave, child_stdout=slave, child_stderr=slave
            )
        return cls(console, child_stdin=subprocess.PIPE if console.stdin else subprocess.DEVNULL)

    def started(self, child: subprocess.Popen[bytes]) -> list[tuple[int, str]]:
        """The container has started: the descriptors to read its output from."""
        if self.terminal is not None:
            os.close(self.child_stdin)  # the container has its side
            return [(self.terminal, "stdout")]
        assert child.stdout is not None and child.stderr is not None
        self._pipes = [child.stdout, child.stderr]
        return [(child.stdout.fileno(), "stdout"), (child.stderr.fileno(), "stderr")]

    def take_input(self, child: subprocess.Popen[bytes]) -> int | None:
        """A descriptor of the container's input, for the attach point (which closes it)."""
        if self.terminal is not None:
            return os.dup(self.terminal)
        if child.stdin is None:
            return None
        fd = os.dup(child.stdin.fileno())
        child.stdin.close()
        return fd

    def resize(self, columns: int, rows: int) -> None:
        if self.terminal is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(
                    self.terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0)
                )

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.close()
        if self.terminal is not None:
            os.close(self.terminal)
            self.terminal = None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if "--" not in words:
        print(
            "usage: python -m kubelet_py.job.launch [--image SIF] [--restart POLICY] "
            "[--grace SECONDS] [--probes FILE] [--hooks FILE] [--termination PATH] "
            "DIR -- COMMAND...",
            file=sys.stderr,
        )
        return 2
    split = words.index("--")
    parser = argparse.ArgumentParser(prog="python -m kubelet_py.job.launch")
    parser.add_argument("--image", type=Path, help="the SIF file COMMAND runs; 125 if unreadable")
    parser.add_argument(
        "--restart",
        choices=RESTART_POLICIES,
        default=NEVER,
        help="run COMMAND again when it ends (OnFailure: with a non-zero code), with back-off",
    )
    parser.add_argument(
        "--grace",
        type=float,
        help="KILL COMMAND's process group this many seconds after the first signal",
    )
    parser.add_argument(
        "--probes", type=Path, help="a JSON file of the container's probes (kubelet_py.job.probes)"
    )
    parser.add_argument(
        "--hooks",
        type=Path,
        help="a JSON file of the container's postStart and preStop hooks (kubelet_py.job.hooks)",
    )
    parser.add_argument(
        "--termination",
        type=PurePosixPath,
        help="the container's terminationMessagePath (kubelet_py.job.termination)",
    )
    parser.add_argument(
        "--attach", action="store_true", help="serve `kubectl attach` (kubelet_py.job.attach)"
    )
    parser.add_argument("--stdin", action="store_true", help="COMMAND's input stays open")
    parser.add_argument(
        "--stdin-once", action="store_true", help="it closes when the first attach leaves"
    )
    parser.add_argument("--tty", action="store_true", help="COMMAND runs on a terminal")
    parser.add_argument("container_dir", type=Path, help="the container's folder in the pod")
    args = parser.parse_args(words[:split])
    command = words[split + 1 :]
    if not command:
        parser.error("no COMMAND after --")
    return launch(
        args.container_dir,
        command,
        image=args.image,
        restart=args.restart,
        grace=args.grace,
        probes=None if args.probes is None else Probes.load(args.probes),
        hooks=None if args.hooks is None else Hooks.load(args.hooks),
        termination=args.termination,
        console=Console(stdin=args.stdin, stdin_once=args.stdin_once, tty=args.tty),
        attachable=args.attach,
    )


if __name__ == "__main__":
    sys.exit(main())
