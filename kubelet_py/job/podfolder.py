"""The pod folder's layout and its markers: the one place that names a file in it.

The pod folder (`<hpk home>/pods/<namespace>/<name>/`, docs/kubelet.md "The pod folder") is
the contract between the kubelet, which writes the pod's own files and reads the markers, and
the job on the compute node, which writes the markers. So that the two sides cannot drift
apart, every file and folder name of that contract is a constant here, `PodFolder` and
`ContainerFolder` give their paths, and each marker's text is written and parsed here, its
writer beside its reader.

The job script (templates/pod.sbatch.j2) names three of them in shell, `containers`, `started`
and `exit`: interpolating them would change the script's text for nothing, so a unit test
holds the template to these constants instead.

Containers can write in the pod folder, so every read and write goes through
kubelet_py.job.podfiles: no link is followed, and only the first bytes of a regular file are
read. A reader returns None (or the marker's absent value) when its marker is missing, raises
OSError when it cannot be read (PodFileRefused for a link) and MalformedMarker when it holds
no such marker; the kubelet decides what that means for the pod.

Stdlib only: kubelet_py.job.launch and kubelet_py.job.probes use it on the compute nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kubelet_py.job import podfiles

# The pod's own files, written by the kubelet.
UID = "uid"
JOB_SCRIPT = "job.sh"
JOB_ID = "job-id"
SLURM_OUTPUT = "slurm.out"
ENV_DIR = "env"
PROBES_DIR = "probes"
HOOKS_DIR = "hooks"
"""The containers' postStart and preStop hooks, one JSON file each (kubelet_py.job.hooks)."""
VOLUMES_DIR = "volumes"
CONTAINERS_DIR = "containers"
NETWORK_CONFIG = "network.json"
"""The job's network (kubelet_py.job.network): 0600, it holds the tunnel's private key."""
ETC_DIR = "etc"
"""A pod on the pod network's /etc/hosts and /etc/resolv.conf, bound into its containers."""
NETWORK = "network"
"""Written by the job once its network is set up: `pod`, or `host <reason>` when the node
refused the pod's namespace and its containers use the node's network."""
STORAGE_FAILURE = "storage-failure"
"""Written by the job when the pod's storage failed (templates/pod-storage.sh.j2): the
reason on the first line, the message on the second."""

# A container's folder (`containers/<name>/`), written by the job.
LOG = "log"
PREVIOUS_LOG = "log.previous"
"""The log of the run before the current one: the launcher renames `log` to it."""
STARTED = "started"
PID = "pid"
"""The process of a container's current run (its `apptainer`), for kubelet_py.job.enter."""
EXIT = "exit"
BACKOFF = "backoff"
RESTARTS = "restarts"
LAST = "last"
STARTUP = "startup"
READY = "ready"
POST_START_FAILED = "poststart-failed"
PRE_STOP_FAILED = "prestop-failed"
"""Written by the launcher when the current run's postStart or preStop hook failed: the time,
then what ran and how it ended, then the end of an exec hook's output."""
HOOK_FAILED = {"postStart": POST_START_FAILED, "preStop": PRE_STOP_FAILED}
"""Each hook's failure marker, by the hook's name in the pod spec."""
TERMINATION_LOG = "termination-log"
"""The container's termination message, copied out of it (kubelet_py.job.termination)."""
HANDSHAKE_FIFO = "handshake"
HANDSHAKE_HOOK = "handshake.sh"
"""The termination handshake's FIFO and hook, bound into the container
(kubelet_py.job.termination); no other file of the folder may have these names."""


class MalformedMarker(ValueError):
    """A marker that holds no such marker's text: the job writes them at once, so it was
    damaged (a container can write there)."""

    def __init__(self, path: Path, what: str, text: str) -> None:
        super().__init__(f"{path} holds no {what}: {text[:80]!r}")
        self.path = path


@dataclass(frozen=True)
class Ended:
    """An `exit` marker: "<exit code> <RFC 3339 time>"."""

    code: int
    """The container's code, or 128 + the signal that ended it."""
    at: datetime | None
    """When it ended; None when the marker has no time."""


@dataclass(frozen=True)
class HookFailure:
    """A `poststart-failed` or `prestop-failed` marker."""

    stamp: str
    """When the hook failed, as written (RFC 3339): tells one failure from the next."""
    summary: str
    """What ran and how it ended, one line."""
    output: str
    """The end of an exec hook's output (may be empty)."""


@dataclass(frozen=True)
class Last:
    """A `last` marker: "<exit code> <started> <finished>", the run before the current one."""

    code: int
    started_at: datetime | None
    finished_at: datetime | None


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 time as the job writes it ("T" or a space, up to nanoseconds), in UTC;
    None when it is none."""
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def write_marker(path: Path, text: str) -> None:
    """A marker of the job: `text` and a newline, 0644, written at once
    (podfiles.write_file): a reader sees all of it or nothing, and a link in its place is
    replaced, never written through."""
    podfiles.write_file(path, f"{text}\n".encode(), 0o644)


@dataclass(frozen=True)
class ContainerFolder:
    """`containers/<name>/`: one container's markers and log."""

    path: Path
    root: Path | None = None
    """The pod folder when the kubelet reads: no link below it is followed. None in the
    job, which reads and writes only the folder it was given."""

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def previous_log(self) -> Path:
        return self.path / PREVIOUS_LOG

    @property
    def started(self) -> Path:
        return self.path / STARTED

    @property
    def pid(self) -> Path:
        return self.path / PID

    @property
    def exit(self) -> Path:
        return self.path / EXIT

    @property
    def backoff(self) -> Path:
        return self.path / BACKOFF

    @property
    def restarts(self) -> Path:
        return self.path / RESTARTS

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def startup(self) -> Path:
        return self.path / STARTUP

    @property
    def ready(self) -> Path:
        return self.path / READY

    def hook_failed(self, hook: str) -> Path:
        """The failure marker of `hook` (`postStart` or `preStop`)."""
        return self.path / HOOK_FAILED[hook]

    @property
    def termination_log(self) -> Path:
        return self.path / TERMINATION_LOG

    @property
    def handshake_fifo(self) -> Path:
        return self.path / HANDSHAKE_FIFO

    @property
    def handshake_hook(self) -> Path:
        return self.path / HANDSHAKE_HOOK

    # -- the writers (the job's launcher) -----------------------------------------------------

    def mark_started(self, at: str) -> None:
        write_marker(self.started, at)

    def mark_pid(self, pid: int | None) -> None:
        """The process of the run that has just started; None: the run has ended."""
        if pid is None:
            self.pid.unlink(missing_ok=True)
        else:
            write_marker(self.pid, str(pid))

    def mark_exit(self, code: int, at: str) -> None:
        write_marker(self.exit, f"{code} {at}")

    def mark_backoff(self, seconds: float, until: str) -> None:
        write_marker(self.backoff, f"{seconds:g} {until}")

    def mark_last(self, code: int, started: str, finished: str) -> None:
        write_marker(self.last, f"{code} {started} {finished}")

    def mark_restarts(self, count: int) -> None:
        write_marker(self.restarts, str(count))

    def mark_hook_failed(self, hook: str, at: str, summary: str, output: str) -> None:
        summary = " ".join(summary.split())  # one line, whatever the handler's words hold
        write_marker(self.hook_failed(hook), "\n".join(filter(None, (at, summary, output))))

    # -- the readers (the kubelet) ------------------------------------------------------------

    def read_started(self) -> datetime | None:
        """When the current run started."""
        text = self._text(self.started)
        if text is None:
            return None
        moment = parse_time(text)
        if moment is None:
            raise MalformedMarker(self.started, "RFC 3339 time", text)
        return moment

    def read_exit(self) -> Ended | None:
        """How the current run ended; None while it runs (or before it starts)."""
        text = self._text(self.exit)
        if text is None:
            return None
        code, _, at = text.partition(" ")
        return Ended(code=_code(self.exit, code, text), at=parse_time(at))

    def read_backoff(self) -> float | None:
        """How long the wait before the next run is; None when there is no wait."""
        text = self._text(self.backoff)
        if text is None:
            return None
        try:
            return float(text.split()[0])
        except (IndexError, ValueError):
            raise MalformedMarker(self.backoff, "back-off", text) from None

    def read_restarts(self) -> int:
        """How many times the container was run again (0 without the marker)."""
        text = self._text(self.restarts)
        if text is None:
            return 0
        try:
            return max(0, int(text))
        except ValueError:
            raise MalformedMarker(self.restarts, "count", text) from None

    def read_last(self) -> Last | None:
        """The run before the current one; None before the first restart."""
        text = self._text(self.last)
        if text is None:
            return None
        words = text.split()
        code = _code(self.last, words[0] if words else "", text)
        times = [parse_time(word) for word in words[1:3]] + [None, None]
        return Last(code=code, started_at=times[0], finished_at=times[1])

    def read_hook_failure(self, hook: str) -> HookFailure | None:
        """How the current run's `hook` failed; None when it did not (or has not run)."""
        text = self._text(self.hook_failed(hook))
        if text is None:
            return None
        stamp, _, rest = text.partition("\n")
        if parse_time(stamp) is None:
            raise MalformedMarker(self.hook_failed(hook), "hook failure", text)
        summary, _, output = rest.partition("\n")
        return HookFailure(stamp=stamp, summary=summary.strip(), output=output.strip())

    def startup_passed(self) -> bool:
        """Whether the current run's startup probe has passed (a link does not count)."""
        return podfiles.is_file(self.startup)

    def probe_ready(self) -> bool:
        """Whether the current run's readiness probe passes (a link does not count)."""
        return podfiles.is_file(self.ready)

    def _text(self, path: Path) -> str | None:
        try:
            return podfiles.read_text(path, root=self.root).strip()
        except FileNotFoundError:
            return None


def _code(path: Path, word: str, text: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise MalformedMarker(path, "exit code", text) from None


@dataclass(frozen=True)
class PodFolder:
    """`<hpk home>/pods/<namespace>/<name>/`: the pod's own files and its containers'."""

    path: Path

    @property
    def uid(self) -> Path:
        return self.path / UID

    @property
    def job_id(self) -> Path:
        return self.path / JOB_ID

    @property
    def volumes(self) -> Path:
        return self.path / VOLUMES_DIR

    @property
    def containers(self) -> Path:
        return self.path / CONTAINERS_DIR

    def container(self, name: str) -> ContainerFolder:
        """A container's folder, read with no link below the pod folder followed."""
        return ContainerFolder(self.containers / name, root=self.path)

    @property
    def network_config(self) -> Path:
        return self.path / NETWORK_CONFIG

    @property
    def network(self) -> Path:
        return self.path / NETWORK

    def read_network(self) -> tuple[str, str] | None:
        """(`pod` or `host`, the reason for `host`) as the job reported its network; None
        before it did, or when the marker cannot be read."""
        try:
            text = podfiles.read_marker(self.network, root=self.path)
        except OSError:
            return None
        if not text:
            return None
        mode, _, reason = text.partition(" ")
        return (mode, reason) if mode in ("pod", "host") else None

    def read_uid(self) -> str | None:
        """The UID of the pod the folder is for; None when missing or refused."""
        return podfiles.read_marker(self.uid, root=self.path)

    def read_job_id(self) -> str | None:
        """The pod's Slurm job ID as the folder records it; None when missing, empty or
        refused (it is in reach of the containers: only a hint)."""
        return podfiles.read_marker(self.job_id, root=self.path) or None

    def write_uid(self, uid: str) -> None:
        podfiles.write_text(self.uid, uid + "\n", 0o600)

    def write_job_id(self, job_id: str) -> None:
        podfiles.write_text(self.job_id, job_id + "\n", 0o600)
