"""A pod's status, worked out from what Slurm says about its job and what its containers wrote.

This module exists so that the mapping from Slurm's world (job states, reasons, exit codes) to
Kubernetes' (phases, conditions, container states) is one pure function that unit tests can
check case by case. It touches nothing: `pod_status` takes plain data and returns the status
as the API's JSON shape, and `read_markers` is its only reader, of the pod folder's
`containers/<name>/` markers (`started`, `exit`, and for restarted containers `restarts`,
`last` and `backoff`; for probed containers `startup` and `ready`; for containers with
lifecycle hooks `poststart-failed` and `prestop-failed`), which
kubelet_py.job.podfolder names and parses. Containers can write there, so markers are read
through kubelet_py.job.podfiles: no link is followed, only regular files are read, and only
their first bytes.

The job's view is whatever has the attributes of `JobFacts` (the watcher's `JobView` has), so
this module needs neither the watcher nor the Slurm adapter.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubelet_py.job import podfiles
from kubelet_py.job.clock import api_time
from kubelet_py.job.hooks import POST_START, PRE_STOP, TITLES
from kubelet_py.job.podfolder import (
    ContainerFolder,
    HookFailure,
    MalformedMarker,
    PodFolder,
    parse_time,
)
from kubelet_py.job.termination import TERMINATION_MESSAGE_LIMIT

log = logging.getLogger(__name__)

_Read = TypeVar("_Read")

PENDING = "Pending"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

SLURM_PENDING = "SlurmPending"
"""The waiting reason of containers whose job Slurm has not started."""
POST_START_ERROR = "PostStartHookError"
"""The waiting reason of a container whose postStart hook failed, while it is stopped."""

EXIT_SIGTERM = 143
EXIT_SIGKILL = 137
EXIT_CANNOT_RUN = 125

LOG_FALLBACK_LINES = 80
LOG_FALLBACK_BYTES = 2048
"""FallbackToLogsOnError takes the log's last 80 lines, at most 2048 bytes (Kubernetes')."""
"""The exit code the job script records when a container's image cannot run."""

MARKER_CLOCK_SLACK = timedelta(seconds=5)
"""How much older than the job's start a marker may be and still belong to this run of the
job: Slurm's start time has whole seconds and the nodes' clocks may differ a little. Older
markers were left by a run before a requeue."""

_STARTED_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING", "STAGE_OUT"}
)
"""Non-final states in which the job script runs or has run: the pod is Running."""


class JobFacts(Protocol):
    """What this module reads of the watcher's view of a job."""

    @property
    def job_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def batch_host(self) -> str | None: ...
    @property
    def start_time(self) -> datetime | None: ...
    @property
    def end_time(self) -> datetime | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def exit_signal(self) -> int | None: ...
    @property
    def restarts(self) -> int: ...
    @property
    def cancelled_by(self) -> str | None: ...
    @property
    def final(self) -> bool: ...
    @property
    def message(self) -> str | None: ...


@dataclass(frozen=True)
class ContainerMarkers:
    """What one container's job script wrote into the pod folder."""

    started_at: datetime | None = None
    """When the container started (the `started` file)."""
    exit_code: int | None = None
    """How it ended (the `exit` file): its code, or 128 + the signal that killed it."""
    finished_at: datetime | None = None
    """When it ended (the `exit` file)."""
    restarts: int = 0
    """How many times it was started again (the `restarts` file)."""
    last: ContainerMarkers | None = None
    """The run before the current one (the `last` file), once it has restarted."""
    backoff_seconds: float | None = None
    """While it waits to be started again (the `backoff` file): how long the wait is."""
    startup_passed: bool = False
    """The startup probe has passed in this run (the `startup` file)."""
    probe_ready: bool = False
    """The readiness probe passes (the `ready` file)."""
    termination_message: str | None = None
    """What the container wrote at its terminationMessagePath (the `termination-log` file,
    kubelet_py.job.termination), once it has ended; None when it wrote nothing."""
    log_tail: str | None = None
    """The end of its log, once it has ended with a non-zero code: the message of
    `terminationMessagePolicy: FallbackToLogsOnError` when it wrote none."""
    post_start_failure: HookFailure | None = None
    """How this run's postStart hook failed (the `poststart-failed` file): the launcher then
    stops the run."""
    pre_stop_failure: HookFailure | None = None
    """How this run's preStop hook failed (the `prestop-failed` file)."""


@dataclass(frozen=True)
class _Outcome:
    """How a final Slurm state shows in a pod."""

    phase: str
    pod_reason: str | None
    """The pod's status.reason."""
    container_reason: str
    """The reason of containers the job's end stopped or never started."""
    exit_code: int | None
    """The exit code given to those containers; None: the job's own."""


_OUTCOMES: dict[str, _Outcome] = {
    "COMPLETED": _Outcome(SUCCEEDED, None, "Completed", 0),
    "FAILED": _Outcome(FAILED, None, "Error", None),
    "CANCELLED": _Outcome(FAILED, "Cancelled", "Cancelled", EXIT_SIGTERM),
    "TIMEOUT": _Outcome(FAILED, "DeadlineExceeded", "DeadlineExceeded", EXIT_SIGTERM),
    "DEADLINE": _Outcome(FAILED, "DeadlineExceeded", "DeadlineExceeded", EXIT_SIGTERM),
    "OUT_OF_MEMORY": _Outcome(FAILED, "OOMKilled", "OOMKilled", EXIT_SIGKILL),
    "NODE_FAIL": _Outcome(FAILED, "NodeLost", "NodeLost", EXIT_SIGKILL),
    "BOOT_FAIL": _Outcome(FAILED, "NodeLost", "NodeLost", EXIT_SIGKILL),
    "PREEMPTED": _Outcome(FAILED, "Preempted", "Preempted", EXIT_SIGTERM),
    "LOST": _Outcome(FAILED, "SlurmJobLost", "ContainerStatusUnknown", EXIT_SIGKILL),
}

_PENDING_REASONS = {
    "Priority": "jobs with a higher priority are ahead of it",
    "Resources": "it waits for the resources it asked for to become free",
    "JobHeldUser": "it is held; `scontrol release {job}` lets it run",
    "JobHeldAdmin": "an administrator holds it",
    "BeginTime": "its start time (--begin) has not come yet",
    "Dependency": "it waits for the jobs it depends on",
    "DependencyNeverSatisfied": "the jobs it depends on can never be satisfied",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "PartitionTimeLimit": "it asks for more time than its partition allows",
    "PartitionConfig": (
        "it asks for more than its partition's nodes offer (CPUs, memory, GPUs or nodes); "
        "it will not start unless the request or the partition changes"
    ),
    "BadConstraints": "no node can satisfy what it asks for",
    "Licenses": "it waits for the licenses it asked for",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
    "ReqNodeNotAvail": "a node it needs is not available",
    "NodeDown": "a node it needs is down",
    "Reservation": "it waits for its reservation to start",
    "launch failed requeued held": "Slurm could not launch it, requeued it and holds it",
}


def pod_status(
    spec: Mapping[str, Any],
    job: JobFacts | None,
    markers: Mapping[str, ContainerMarkers],
    *,
    node_addresses: Mapping[str, str] | None = None,
    pod_ip: str | None = None,
) -> dict[str, Any]:
    """The pod's status (the API's JSON shape) from its job and its containers' markers.

    `spec` is the pod's spec; `job` is None while Slurm does not list the job yet;
    `markers` are keyed by container name; `node_addresses` maps Slurm node names to their
    addresses, for hostIP; `pod_ip` is the pod's address on the pod network, None for a pod on
    its node's network, whose podIP is the node's, and "" while its job has not said which
    (no podIP yet). The result depends on nothing else, so a final status never changes.

    Every condition has `reason` and `message`, None when it has none: written as a strategic
    merge patch, the None clears what an earlier status of the pod said there.
    """
    init_specs = list(spec.get("initContainers") or [])
    main_specs = list(spec.get("containers") or [])
    started = job is not None and _has_started(job)
    fresh = _current_markers(markers, job if job and started else None)

    if job is None or (not started and not job.final):
        return _waiting_status(init_specs, main_specs, job)

    outcome = _outcome(job) if job.final else None
    phase = outcome.phase if outcome else RUNNING
    init_statuses = [
        _container_status(c, fresh.get(c["name"]), job=job, outcome=outcome, init=True)
        for c in init_specs
    ]
    # A sidecar has done its part for the next container once it has started; its exit
    # (TERM once the containers have ended) is no failure.
    sidecars = {c["name"] for c in init_specs if is_sidecar(c)}
    init_exits = {
        c["name"]: fresh[c["name"]].exit_code if c["name"] in fresh else None
        for c in init_specs
        if c["name"] not in sidecars
    }
    failed_init = next((name for name, code in init_exits.items() if code not in (None, 0)), None)
    incomplete = [
        c["name"]
        for c in init_specs
        if (
            fresh.get(c["name"], ContainerMarkers()).started_at is None
            if c["name"] in sidecars
            else init_exits[c["name"]] != 0
        )
    ]
    initialized = not incomplete
    main_statuses = [
        _container_status(
            c,
            fresh.get(c["name"]),
            job=job,
            outcome=outcome,
            init=False,
            initialized=initialized,
            failed_init=failed_init,
        )
        for c in main_specs
    ]

    status: dict[str, Any] = {"phase": phase}
    if outcome is not None:
        if outcome.pod_reason:
            status["reason"] = outcome.pod_reason
        status["message"] = _final_message(job)
    conditions = _conditions(
        job=job,
        started=started,
        phase=phase,
        init_statuses=init_statuses,
        main_statuses=main_statuses,
        incomplete=incomplete,
        sidecars=sidecars,
    )
    status["conditions"] = conditions
    host_ip = _host_ip(job, node_addresses or {}) if started else None
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    pod_address = host_ip if pod_ip is None else pod_ip
    if started and pod_address:
        status["podIP"] = pod_address
        status["podIPs"] = [{"ip": pod_address}]
    if started and job.start_time is not None:
        status["startTime"] = _time(job.start_time)
    if init_statuses:
        status["initContainerStatuses"] = init_statuses
    status["containerStatuses"] = main_statuses
    return status


def read_markers(pod_dir: Path) -> dict[str, ContainerMarkers]:
    """Read every container's `started` and `exit` files below `pod_dir/containers`.

    A missing folder gives no markers; a marker that cannot be read or parsed counts as absent
    (the job script writes them atomically, so that means it was damaged).
    """
    pod = PodFolder(pod_dir)
    try:
        with podfiles.folder(pod.containers, root=pod_dir) as fd, os.scandir(fd) as listing:
            # Links are no containers' folders: a container may have planted them.
            names = sorted(entry.name for entry in listing if entry.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        log.warning("cannot list %s: %s", pod.containers, error)
        return {}
    return {name: _container_markers(pod.container(name)) for name in names}


def _container_markers(folder: ContainerFolder) -> ContainerMarkers:
    ended = _marker(folder.read_exit, None)
    message = _read_termination(folder) if ended is not None else None
    failed = ended is not None and ended.code != 0 and not message
    return ContainerMarkers(
        termination_message=message,
        log_tail=_read_log_tail(folder) if failed else None,
        started_at=_marker(folder.read_started, None),
        exit_code=None if ended is None else ended.code,
        finished_at=None if ended is None else ended.at,
        restarts=_marker(folder.read_restarts, 0),
        last=_last_run(folder),
        backoff_seconds=_marker(folder.read_backoff, None),
        startup_passed=folder.startup_passed(),
        probe_ready=folder.probe_ready(),
        post_start_failure=_marker(lambda: folder.read_hook_failure(POST_START), None),
        pre_stop_failure=_marker(lambda: folder.read_hook_failure(PRE_STOP), None),
    )


def _last_run(folder: ContainerFolder) -> ContainerMarkers | None:
    """The run before the current one (`last`), once the container has restarted."""
    last = _marker(folder.read_last, None)
    if last is None:
        return None
    return ContainerMarkers(
        started_at=last.started_at, exit_code=last.code, finished_at=last.finished_at
    )


def _marker(read: Callable[[], _Read], absent: _Read) -> _Read:
    """What `read` gives, or `absent` for a marker that cannot be read or parsed (logged)."""
    try:
        return read()
    except MalformedMarker as error:
        log.warning("%s", error)
    except OSError as error:
        log.warning("cannot read a marker: %s", error)
    return absent


def _read_termination(folder: ContainerFolder) -> str | None:
    """A container's termination message: at most Kubernetes' 4096 bytes of the file."""
    path = folder.termination_log
    try:
        text = podfiles.read_text(path, root=folder.root, limit=TERMINATION_MESSAGE_LIMIT)
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("cannot read %s: %s", path, error)
        return None
    return text or None


def _read_log_tail(folder: ContainerFolder) -> str | None:
    """The last lines of a container's log as Kubernetes' fallback takes them (at most 80
    lines and 2048 bytes), without the launcher's time and stream words."""
    path = folder.log
    try:
        with podfiles.open_file(path, root=folder.root) as handle:
            size = handle.seek(0, os.SEEK_END)
            # Each logged line carries about 40 bytes of time and stream words.
            handle.seek(max(0, size - 16 * LOG_FALLBACK_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("cannot read %s: %s", path, error)
        return None
    lines = data.decode("utf-8", "replace").splitlines()
    if size > 16 * LOG_FALLBACK_BYTES:
        lines = lines[1:]  # the first may be cut
    texts = [line.split(" ", 2)[2] if line.count(" ") >= 2 else "" for line in lines]
    tail = "\n".join(texts[-LOG_FALLBACK_LINES:]).encode()[-LOG_FALLBACK_BYTES:]
    return tail.decode("utf-8", "ignore") or None


def hook_failure_message(hook: str, failure: HookFailure) -> str:
    """What a container's status says of a failed hook, with the end of its output."""
    message = f"{TITLES[hook]} failed: {failure.summary}"
    return f"{message}\n{failure.output}" if failure.output else message


def probed_readiness(container: Mapping[str, Any], marker: ContainerMarkers) -> tuple[bool, bool]:
    """(started, ready) of a running container: with a startupProbe it has started once the
    probe passed; with a readinessProbe it is ready while that passes, else once started."""
    started = "startupProbe" not in container or marker.startup_passed
    if "readinessProbe" in container:
        return started, started and marker.probe_ready
    return started, started


def is_sidecar(container: Mapping[str, Any]) -> bool:
    """An init container that runs beside the containers (Kubernetes' native sidecar)."""
    return container.get("restartPolicy") == "Always"


def _has_started(job: JobFacts) -> bool:
    # A job cancelled while pending has a start time but never had a node.
    if job.batch_host is None:
        return False
    return job.final or job.state in _STARTED_STATES


def _current_markers(
    markers: Mapping[str, ContainerMarkers], job: JobFacts | None
) -> dict[str, ContainerMarkers]:
    """Markers of this run of the job: after a requeue, those older than its start were left
    by the run before. (Only then: a node's clock a little behind the controller's must not
    hide the markers of a job's only run.)"""
    if job is None or job.restarts == 0 or job.start_time is None:
        return dict(markers)
    oldest = job.start_time - MARKER_CLOCK_SLACK
    return {
        name: marker
        for name, marker in markers.items()
        if (marker.started_at or marker.finished_at or oldest) >= oldest
    }


def _outcome(job: JobFacts) -> _Outcome:
    known = _OUTCOMES.get(job.state)
    if known is not None:
        return known
    return _Outcome(FAILED, _camel(job.state), "Error", None)


def _job_exit_code(job: JobFacts) -> int:
    """The job's exit as a shell would see it; 1 when Slurm says it failed but gives 0."""
    if job.exit_signal:
        return 128 + job.exit_signal
    return job.exit_code or 1


_FINAL_MESSAGES = {
    "COMPLETED": "{job} completed",
    "FAILED": "{job} failed (exit code {code}:{signal})",
    "CANCELLED": "{job} was cancelled outside Kubernetes{by}",
    "TIMEOUT": "{job} reached its time limit",
    "DEADLINE": "{job} missed its deadline",
    "OUT_OF_MEMORY": "{job} used more memory than it asked for",
    "NODE_FAIL": "a node of {job} failed",
    "BOOT_FAIL": "the nodes of {job} failed to boot",
    "PREEMPTED": "{job} was preempted and not requeued",
    "LOST": "Slurm no longer knows {job}",
}


def _final_message(job: JobFacts) -> str:
    if job.state == "LOST" and job.message:
        return job.message
    template = _FINAL_MESSAGES.get(job.state, "{job} ended in state {state}")
    return template.format(
        job=f"Slurm job {job.job_id}",
        code=job.exit_code or 0,
        signal=job.exit_signal or 0,
        by=f" by UID {job.cancelled_by}" if job.cancelled_by else "",
        state=job.state,
    )


def _pending_message(job: JobFacts | None) -> str:
    if job is None:
        return "Slurm does not list the job yet"
    ident = f"Slurm job {job.job_id}"
    reason = job.reason
    if job.state == "CONFIGURING":
        return f"{ident} has nodes and waits for them to be ready"
    if not reason:
        return f"{ident} is {job.state.lower()}"
    explained = _PENDING_REASONS.get(reason.split(",")[0].strip())
    if explained is None and reason.startswith(("QOS", "Assoc")):
        explained = "a limit of its account or QOS is reached"
    if reason == "BeginTime" and job.restarts:
        # A requeue, not the pod's flags, gave it a begin time.
        explained = "Slurm delays a job it has requeued"
    text = f"{ident} is pending ({reason})"
    return f"{text}: {explained.format(job=job.job_id)}" if explained else text


def _waiting_status(
    init_specs: Sequence[Mapping[str, Any]],
    main_specs: Sequence[Mapping[str, Any]],
    job: JobFacts | None,
) -> dict[str, Any]:
    message = _pending_message(job)
    waiting = {"waiting": {"reason": SLURM_PENDING, "message": message}}
    names = [c["name"] for c in main_specs]
    init_names = [c["name"] for c in init_specs]
    status: dict[str, Any] = {
        "phase": PENDING,
        "conditions": [
            _condition("PodScheduled", False, reason=SLURM_PENDING, message=message),
            _initialized_condition(init_names),
            _condition(
                "ContainersReady", False, reason="ContainersNotReady", message=_unready(names)
            ),
            _condition("Ready", False, reason="ContainersNotReady", message=_unready(names)),
        ],
    }
    if init_specs:
        status["initContainerStatuses"] = [_base(c, state=waiting) for c in init_specs]
    status["containerStatuses"] = [_base(c, state=waiting) for c in main_specs]
    return status


def _container_status(
    container: Mapping[str, Any],
    marker: ContainerMarkers | None,
    *,
    job: JobFacts,
    outcome: _Outcome | None,
    init: bool,
    initialized: bool = True,
    failed_init: str | None = None,
) -> dict[str, Any]:
    marker = marker or ContainerMarkers()
    status = _current_state(
        container,
        marker,
        job=job,
        outcome=outcome,
        init=init,
        initialized=initialized,
        failed_init=failed_init,
    )
    status["restartCount"] = marker.restarts
    if "waiting" in status["state"] and marker.exit_code is not None:
        # Between two runs: the run that just ended is the last state.
        status["lastState"] = {"terminated": _terminated(marker, outcome, container)}
    elif marker.last is not None and marker.last.exit_code is not None:
        status["lastState"] = {"terminated": _terminated(marker.last, outcome, {})}
    return status


def _current_state(
    container: Mapping[str, Any],
    marker: ContainerMarkers,
    *,
    job: JobFacts,
    outcome: _Outcome | None,
    init: bool,
    initialized: bool,
    failed_init: str | None,
) -> dict[str, Any]:
    if marker.exit_code is not None and outcome is None and marker.backoff_seconds is not None:
        waiting = {
            "reason": "CrashLoopBackOff",
            "message": (
                f"back-off {marker.backoff_seconds:g}s restarting failed "
                f"container={container['name']}"
            ),
        }
        return _base(container, state={"waiting": waiting})
    if marker.exit_code is not None:
        return _base(container, state={"terminated": _terminated(marker, outcome, container)})

    if outcome is None:  # the job runs
        if marker.started_at is None and marker.post_start_failure is not None:
            # Being stopped: its postStart hook failed (Kubernetes' reason for this moment).
            message = hook_failure_message(POST_START, marker.post_start_failure)
            return _base(
                container, state={"waiting": {"reason": POST_START_ERROR, "message": message}}
            )
        if marker.started_at is not None:
            running = {"startedAt": _time(marker.started_at)}
            # An init container is not ready while it runs, a sidecar is; probes may say later.
            started, ready = probed_readiness(container, marker)
            ready = ready and (not init or is_sidecar(container))
            return _base(container, state={"running": running}, ready=ready, started=started)
        reason = "PodInitializing" if init or not initialized else "ContainerCreating"
        return _base(container, state={"waiting": {"reason": reason}})

    # The job is over and the container recorded no end.
    code = outcome.exit_code if outcome.exit_code is not None else _job_exit_code(job)
    terminated: dict[str, Any] = {"exitCode": code}
    if marker.started_at is not None:
        terminated["reason"] = outcome.container_reason
        terminated["message"] = f"the container was running when {_final_message(job)}"
        terminated["startedAt"] = _time(marker.started_at)
    else:
        terminated["reason"] = (
            "ContainerCannotRun"
            if outcome.container_reason == "Error"
            else outcome.container_reason
        )
        why = f"init container {failed_init} failed" if failed_init else _final_message(job)
        terminated["message"] = f"the container never started: {why}"
    if job.end_time is not None:
        terminated["finishedAt"] = _time(job.end_time)
    return _base(container, state={"terminated": terminated})


def _terminated(
    marker: ContainerMarkers, outcome: _Outcome | None, container: Mapping[str, Any]
) -> dict[str, Any]:
    """A run that recorded its end, as a container state's `terminated`; its message is what
    the container wrote at its terminationMessagePath, else (FallbackToLogsOnError, a failed
    run) the end of its log."""
    assert marker.exit_code is not None
    terminated: dict[str, Any] = {
        "exitCode": marker.exit_code,
        "reason": _exit_reason(marker.exit_code, outcome),
    }
    if marker.started_at or marker.finished_at:
        terminated["startedAt"] = _time(marker.started_at or marker.finished_at)
    if marker.finished_at:
        terminated["finishedAt"] = _time(marker.finished_at)
    if marker.exit_code == EXIT_CANNOT_RUN:
        terminated["message"] = "the container's image could not run"
    message = marker.termination_message
    if not message and marker.post_start_failure is not None:
        message = hook_failure_message(POST_START, marker.post_start_failure)
    if not message and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = marker.log_tail if marker.exit_code != 0 else None
    if message:
        terminated["message"] = message
    return terminated


def _exit_reason(code: int, outcome: _Outcome | None) -> str:
    if code == 0:
        return "Completed"
    if code == EXIT_CANNOT_RUN:
        return "ContainerCannotRun"
    if outcome is not None and outcome.pod_reason is not None:
        # Killed by the job's end: the job's reason says why.
        if outcome.container_reason == "OOMKilled":
            return "OOMKilled" if code == EXIT_SIGKILL else "Error"
        if code in (EXIT_SIGTERM, EXIT_SIGKILL):
            return outcome.container_reason
    return "Error"


def _base(
    container: Mapping[str, Any],
    *,
    state: dict[str, Any],
    ready: bool = False,
    started: bool = False,
) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": ready,
        "started": started,
        "restartCount": 0,
        "state": state,
        "lastState": {},
    }


def _conditions(
    *,
    job: JobFacts,
    started: bool,
    phase: str,
    init_statuses: Sequence[Mapping[str, Any]],
    main_statuses: Sequence[Mapping[str, Any]],
    incomplete: Sequence[str],
    sidecars: frozenset[str] | set[str] = frozenset(),
) -> list[dict[str, Any]]:
    if started:
        scheduled = _condition("PodScheduled", True, since=job.start_time)
    else:
        message = _final_message(job) if job.final else _pending_message(job)
        scheduled = _condition("PodScheduled", False, reason=SLURM_PENDING, message=message)

    if not incomplete:
        # Initialized when the last init container ended, or the last sidecar started.
        finished = [
            _parse(_state_time(s, "startedAt" if s["name"] in sidecars else "finishedAt"))
            for s in init_statuses
        ]
        since = max((f for f in finished if f), default=job.start_time if started else None)
        init_condition = _condition("Initialized", True, since=since)
    else:
        init_condition = _initialized_condition(incomplete)

    # Sidecars count, as in Kubernetes: a pod whose sidecar waits to restart is not ready.
    running = [*(s for s in init_statuses if s["name"] in sidecars), *main_statuses]
    unready = [s["name"] for s in running if not s["ready"]]
    if phase == RUNNING and not unready:
        starts = [_parse(s["state"]["running"].get("startedAt")) for s in running]
        since = max((s for s in starts if s), default=None)
        ready = [_condition(kind, True, since=since) for kind in ("ContainersReady", "Ready")]
    else:
        reason = "PodCompleted" if phase == SUCCEEDED else "ContainersNotReady"
        since = job.end_time if phase in (SUCCEEDED, FAILED) else None
        ready = [
            _condition(kind, False, reason=reason, message=_unready(unready), since=since)
            for kind in ("ContainersReady", "Ready")
        ]
    return [scheduled, init_condition, *ready]


def _state_time(status: Mapping[str, Any], key: str) -> str | None:
    """A time of a container status's current state, whichever state it is."""
    for state in status["state"].values():
        if isinstance(state, Mapping) and state.get(key):
            return str(state[key])
    return None


def _initialized_condition(init_names: Sequence[str]) -> dict[str, Any]:
    if not init_names:
        return _condition("Initialized", True)
    return _condition(
        "Initialized",
        False,
        reason="ContainersNotInitialized",
        message=f"containers with incomplete status: [{' '.join(init_names)}]",
    )


def _condition(
    kind: str,
    status: bool,
    *,
    reason: str | None = None,
    message: str | None = None,
    since: datetime | None = None,
) -> dict[str, Any]:
    # reason and message are always there, None when the condition has none: the status is
    # written as a strategic merge patch, which merges conditions by type, so a key left out
    # would keep an earlier condition's value (a Succeeded pod still "pending (JobHeldUser)").
    condition: dict[str, Any] = {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason or None,
        "message": message or None,
    }
    if since is not None:
        condition["lastTransitionTime"] = _time(since)
    return condition


def _unready(names: Sequence[str]) -> str:
    return f"containers with unready status: [{' '.join(names)}]"


def _host_ip(job: JobFacts, node_addresses: Mapping[str, str]) -> str | None:
    if job.batch_host is None:
        return None
    address = node_addresses.get(job.batch_host)
    if address is None:
        return None
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        # The API wants an IP address; a host name is left out rather than resolved here.
        return None


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else api_time(moment)


def _parse(text: str | None) -> datetime | None:
    return parse_time(text) if text else None


def _camel(state: str) -> str:
    return "".join(word.capitalize() for word in state.lower().split("_"))
