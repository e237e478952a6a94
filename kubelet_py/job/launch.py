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

TERM, INT and HUP are passed on to COMMAND; this process keeps reading until COMMAND has ended,
so the exit marker holds the container's real code (143 after TERM) unless Slurm's KILL ends
everything first, in which case the job script's trap has already written 137. With
`--grace SECONDS`, COMMAND (its whole process group) gets KILL that long after the first
signal, so a container that ignores TERM still ends (sidecars stopped by the job script).

`--restart OnFailure|Always` runs COMMAND again when it ends (OnFailure: with a non-zero
code), after Kubernetes' back-off (`Backoff`), until a signal comes: that is how a pod's
restartPolicy and a native sidecar's are honoured inside one Slurm job. Before each new run
the previous run's end goes to CONTAINER_DIR/last, its log to CONTAINER_DIR/log.previous, and
the count to CONTAINER_DIR/restarts; CONTAINER_DIR/backoff exists while it waits.

`--probes FILE` runs the container's startup, liveness and readiness probes beside each run
(kubelet_py.job.probes): they write CONTAINER_DIR/startup and CONTAINER_DIR/ready, and a failed
liveness or startup probe stops the run (TERM to its process group, KILL after the probe's
grace period); the restart policy then decides as for any other end.

Containers can write in the pod folder, so the markers and the log are written through
kubelet_py.job.podfolder and kubelet_py.job.podfiles: a marker replaces whatever has its name
(a link is replaced, never written through) and the log is opened without following a link
(one in its place is removed), so a container cannot have the launcher write into a file of
the user's. The launcher never reads a marker back: `last` is written from the times it
wrote itself.

It runs on compute nodes and must start fast: stdlib only, nothing else of kubelet_py
but the rest of kubelet_py.job (stdlib only too).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType

from kubelet_py.job import podfiles
from kubelet_py.job.clock import rfc3339
from kubelet_py.job.handlers import exec_prefix
from kubelet_py.job.podfolder import ContainerFolder
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
    termination: PurePosixPath | None = None,
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
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    if signals.received:  # stopped before it started: the container never ran, so no markers
        return 128 + signals.received[0]

    container_dir.mkdir(parents=True, exist_ok=True)
    folder = ContainerFolder(container_dir)
    count = 0
    while True:
        began = clock.monotonic()
        run = _run(
            folder,
            command,
            image=image,
            signals=signals,
            grace=grace,
            probes=probes,
            termination=termination,
        )
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


def _run(
    folder: ContainerFolder,
    command: Sequence[str],
    *,
    image: Path | None,
    signals: _Signals,
    grace: float | None,
    probes: Probes | None = None,
    termination: PurePosixPath | None = None,
) -> _Run:
    """One run of the container: `started`, the log, `exit` (and its termination message,
    kubelet_py.job.termination)."""
    fd = open_log(folder.log)
    log = LogWriter(fd)
    try:
        started = rfc3339(time.time_ns())
        folder.mark_started(started)
        # A new run: the markers of the one before go, so readers see it running.
        for stale in (folder.exit, folder.backoff):
            stale.unlink(missing_ok=True)
        if image is not None and not os.access(image, os.R_OK):
            log.line("stderr", f"hpk: cannot read the image file {image}", now=time.time_ns())
            code = IMAGE_CANNOT_RUN
        else:
            message = None if termination is None else Termination(folder.path, termination)
            code = _run_command(
                folder.path,
                command,
                log=log,
                image=image,
                signals=signals,
                grace=grace,
                probes=probes,
                message=message,
            )
        log.close(now=time.time_ns())
    finally:
        os.close(fd)
    finished = rfc3339(time.time_ns())
    folder.mark_exit(code, finished)
    return _Run(code=code, started=started, finished=finished)


def _run_command(
    container_dir: Path,
    command: Sequence[str],
    *,
    log: LogWriter,
    image: Path | None,
    signals: _Signals,
    grace: float | None,
    probes: Probes | None,
    message: Termination | None,
) -> int:
    """COMMAND started, logged and waited for; its exit code."""
    try:
        if message is not None:
            message.prepare()
        child = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own process group, so that KILL after the grace period reaches every
            # process of the container.
            start_new_session=grace is not None or probes is not None,
        )
    except OSError as error:
        log.line("stderr", f"hpk: cannot start {command[0]}: {error}", now=time.time_ns())
        return IMAGE_CANNOT_RUN
    signals.child = child
    if signals.received:  # a signal came between the check above and the start
        os.kill(child.pid, signals.received[-1])
    if message is not None:
        message.start(lambda: child.poll() is None, child.pid)
    probing = _start_probes(container_dir, child, probes, command=command, image=image)
    kill = _killer(child, signals=signals, grace=grace, probing=probing)
    code = _pump(child, log, kill=kill)
    signals.child = None
    if message is not None:
        message.collect()
        if message.problem is not None:
            log.line("stderr", f"hpk: no termination log: {message.problem}", now=time.time_ns())
    if probing is not None:
        probing.stop()
        if probing.note is not None:
            log.line("stderr", probing.note, now=time.time_ns())
    return code


@dataclass
class _Probing:
    """The probes of one run, in their thread, and when a failed probe stopped the run."""

    runner: Runner
    thread: threading.Thread
    done: threading.Event
    failed_at: float | None = None
    """time.monotonic() when a failed liveness or startup probe sent TERM."""
    grace: float = 0.0
    """Seconds from that TERM to KILL."""
    note: str | None = None
    """Why a probe stopped the run, for the container's log."""

    def stop(self) -> None:
        self.done.set()
        # An exec probe may still run (up to its timeout): the exit marker does not wait.
        self.thread.join(timeout=1.0)
        self.runner.finish()


def _start_probes(
    container_dir: Path,
    child: subprocess.Popen[bytes],
    probes: Probes | None,
    *,
    command: Sequence[str] = (),
    image: Path | None = None,
) -> _Probing | None:
    """Start probing a run that has just started; None without probes."""
    if probes is None:
        return None

    def failed(probe: Probe) -> None:
        # The probe thread only records and signals; the pump's kill check sends KILL later.
        kind = "Startup" if probe is probes.startup else "Liveness"
        # Logged by the run's own thread once the container ended: LogWriter has one writer.
        probing.note = (
            f"hpk: {kind} probe failed {probe.failure_threshold} times; stopping the container"
        )
        probing.grace = probes.kill_grace(probe)
        probing.failed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)

    prefix = exec_prefix(command, image)

    def check_one(probe: Probe) -> bool:
        return check(probe, exec_prefix=prefix)

    done = threading.Event()
    runner = Runner(probes=probes, container_dir=container_dir, on_failure=failed, check=check_one)
    thread = threading.Thread(target=runner.run, args=(done,), daemon=True)
    probing = _Probing(runner=runner, thread=thread, done=done)
    thread.start()
    return probing


def _killer(
    child: subprocess.Popen[bytes],
    *,
    signals: _Signals,
    grace: float | None,
    probing: _Probing | None = None,
) -> Callable[[], None]:
    """Called while the container runs: KILL its process group once the grace is over."""
    killed = False

    def check() -> None:
        nonlocal killed
        if killed:
            return
        failed_at = None if probing is None else probing.failed_at
        if (
            probing is not None
            and failed_at is not None
            and time.monotonic() - failed_at >= probing.grace
            and child.poll() is None
        ):
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            return
        if grace is None or signals.first_at is None:
            return
        if time.monotonic() - signals.first_at >= grace and child.poll() is None:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    return check


def _pump(
    child: subprocess.Popen[bytes], log: LogWriter, *, kill: Callable[[], None] = lambda: None
) -> int:
    assert child.stdout is not None and child.stderr is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ, "stdout")
        selector.register(child.stderr, selectors.EVENT_READ, "stderr")
        drain_until: float | None = None
        while selector.get_map():
            timeout = _POLL_SECONDS
            if drain_until is not None:
                timeout = max(0.0, min(timeout, drain_until - time.monotonic()))
            for key, _ in selector.select(timeout):
                data = os.read(key.fd, _READ_SIZE)
                if data:
                    log.feed(key.data, data, now=time.time_ns())
                else:
                    selector.unregister(key.fileobj)
            kill()
            if drain_until is None and child.poll() is not None:
                drain_until = time.monotonic() + DRAIN_SECONDS
            elif drain_until is not None and time.monotonic() >= drain_until:
                break
    child.stdout.close()
    child.stderr.close()
    return exit_code(child.wait())


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if "--" not in words:
        print(
            "usage: python -m kubelet_py.job.launch [--image SIF] [--restart POLICY] "
            "[--grace SECONDS] [--probes FILE] [--termination PATH] DIR -- COMMAND...",
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
        "--termination",
        type=PurePosixPath,
        help="the container's terminationMessagePath (kubelet_py.job.termination)",
    )
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
        termination=args.termination,
    )


if __name__ == "__main__":
    sys.exit(main())
