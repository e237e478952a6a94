"""What `kubectl exec`, `attach` and `port-forward` run or reach: the kubelet's plans.

The kubelet API's front (container/kubelet-api, `hpk-kubelet-api`) speaks the streaming
protocols; for each request it asks the kubelet (`POST /hpk/plan` on the kubelet's own Unix
socket, kubelet_py.loops.logserver) what to do, and this module answers:

- **exec** and **attach**: a command line that reaches the container through its pod's own
  Slurm job, `srun --jobid=<job> --overlap` on the node that runs the job's batch script, and
  there kubelet_py.job.enter (exec: into the container's namespaces) or kubelet_py.job.attach
  (attach: to the launcher's attach socket). srun runs with the kubelet's environment less the
  control-plane job's own `SLURM_*` variables, so that it names only the pod's job;
- **portforward**: the pod's address and, when that is on the pod network, the hub's relay
  socket that dials it (the kubelet is on the node's network, the pod network is not).

A refusal is a `PlanRefused` with the HTTP status and the message the client then reads
(`kubectl` prints it): no such pod or container on this kubelet, a job that has not started,
a container that is not running, a container that srun starts.

Pure: the pod, its job's view and its markers come in as values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Any

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.job.podfolder import CONTAINERS_DIR
from kubelet_py.pod.fields import containers_of
from kubelet_py.pod.network import LAUNCHER_ANNOTATION
from kubelet_py.pod.render import srun_container
from kubelet_py.pod.status import ContainerMarkers

EXEC = "exec"
ATTACH = "attach"
PORT_FORWARD = "portforward"
KINDS = (EXEC, ATTACH, PORT_FORWARD)

_KEPT_SLURM_VARIABLES = frozenset({"SLURM_CONF"})
"""Of the control-plane job's SLURM_* variables, those srun still needs."""


class PlanRefused(Exception):
    """The request cannot be served; the client reads `message` with `status`."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class StreamRequest:
    """One request of the front, as it sent it."""

    kind: str
    namespace: str
    pod: str
    container: str = ""
    command: tuple[str, ...] = ()
    tty: bool = False
    stdin: bool = False

    @classmethod
    def parse(cls, data: object) -> StreamRequest:
        """The request from the front's JSON; PlanRefused (400) when it is malformed."""
        if not isinstance(data, dict):
            raise PlanRefused(HTTPStatus.BAD_REQUEST, "the plan request is no JSON object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise PlanRefused(HTTPStatus.BAD_REQUEST, f"unknown kind {kind!r}")
        texts = {name: data.get(name, "") for name in ("namespace", "pod", "container")}
        command = data.get("command") or []
        if (
            not all(isinstance(value, str) for value in texts.values())
            or not isinstance(command, list)
            or not all(isinstance(word, str) for word in command)
        ):
            raise PlanRefused(HTTPStatus.BAD_REQUEST, "malformed plan request")
        if kind == EXEC and not command:
            raise PlanRefused(HTTPStatus.BAD_REQUEST, "no command given")
        return cls(
            kind=kind,
            namespace=texts["namespace"],
            pod=texts["pod"],
            container=texts["container"],
            command=tuple(command),
            tty=data.get("tty") is True,
            stdin=data.get("stdin") is True,
        )


@dataclass(frozen=True)
class Plan:
    """The front's answer: a command to run, or an address to dial."""

    argv: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    """The command's whole environment, as NAME=value."""
    address: str = ""
    relay: str = ""
    """The hub's relay socket that dials `address`; empty: dial it directly."""

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": list(self.env),
            "address": self.address,
            "relay": self.relay,
        }


@dataclass(frozen=True)
class StreamTarget:
    """What the kubelet knows of one of its pods, for a plan."""

    pod: Mapping[str, Any]
    job_id: str
    folder: Path
    batch_host: str | None
    """The node that runs the job's batch script; None unless the job runs."""
    state: str
    """Slurm's state of the job (RUNNING, PENDING, ...)."""
    markers: Mapping[str, ContainerMarkers] = field(default_factory=dict)
    address: str | None = None
    """The pod's address: on the pod network, or its node's; None when not known yet."""
    on_pod_network: bool = False


@dataclass(frozen=True)
class PlanSettings:
    python: PurePosixPath
    """The interpreter the jobs run kubelet_py.job with."""
    relay: Path | None = None
    """The hub's relay socket; None without a pod network."""
    environment: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    srun: str = "srun"


def srun_environment(environment: Mapping[str, str]) -> tuple[str, ...]:
    """The kubelet's environment without the Slurm job it runs in (SLURM_CONF kept)."""
    return tuple(
        f"{name}={value}"
        for name, value in sorted(environment.items())
        if name in _KEPT_SLURM_VARIABLES
        or not name.startswith(("SLURM_", "SLURMD_", "SRUN_", "SALLOC_", "SBATCH_"))
    )


def plan(request: StreamRequest, running: StreamTarget | None, settings: PlanSettings) -> Plan:
    """The plan for `request` on `running` (None: the kubelet has no such pod)."""
    key = f"{request.namespace}/{request.pod}"
    if running is None:
        raise PlanRefused(HTTPStatus.NOT_FOUND, f'pod "{key}" is not run by this kubelet')
    if running.batch_host is None:
        raise PlanRefused(
            HTTPStatus.BAD_REQUEST,
            f'pod "{key}": its Slurm job {running.job_id} is not running ({running.state})',
        )
    if request.kind == PORT_FORWARD:
        if not running.address:
            raise PlanRefused(HTTPStatus.BAD_REQUEST, f'pod "{key}" has no address yet')
        if running.on_pod_network:
            if settings.relay is None:
                raise PlanRefused(HTTPStatus.INTERNAL_SERVER_ERROR, "the pod network has no relay")
            return Plan(address=running.address, relay=str(settings.relay))
        return Plan(address=running.address)
    name = request.container
    _check_container(running, name, key)
    markers = running.markers.get(name)
    if markers is None or markers.started_at is None or markers.exit_code is not None:
        raise PlanRefused(
            HTTPStatus.BAD_REQUEST,
            f'container "{name}" of pod "{key}" is not running'
            + (
                ""
                if markers is None or markers.exit_code is None
                else f" (it exited with {markers.exit_code})"
            ),
        )
    folder = running.folder / CONTAINERS_DIR / name
    srun = [
        settings.srun,
        f"--jobid={running.job_id}",
        "--overlap",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={running.batch_host}",
        "--quiet",
        "--unbuffered",
        f"--job-name={request.kind}",
    ]
    if request.tty:
        srun.append("--pty")
    if not request.stdin:
        srun.append("--input=none")
    helper = [str(settings.python), "-I", "-m"]
    if request.kind == EXEC:
        helper += ["kubelet_py.job.enter", *(["--tty"] if request.tty else []), str(folder)]
        helper += ["--", *request.command]
    else:
        helper += ["kubelet_py.job.attach", *(["--stdin"] if request.stdin else []), str(folder)]
    return Plan(argv=(*srun, "--", *helper), env=srun_environment(settings.environment))


def _check_container(running: StreamTarget, name: str, key: str) -> None:
    spec = running.pod.get("spec") or {}
    names = [
        str(c.get("name"))
        for kind in ("initContainers", "containers")
        for c in containers_of(spec, kind)
    ]
    if name not in names:
        raise PlanRefused(
            HTTPStatus.NOT_FOUND,
            f'container "{name}" is not valid for pod "{key}"; it has: {", ".join(names)}',
        )
    try:
        srun_started = srun_container(
            (running.pod.get("metadata") or {}).get("annotations", {}).get(LAUNCHER_ANNOTATION),
            containers_of(spec, "containers"),
        )
    except InvalidPodSpec:  # the pod could not have been run
        srun_started = None
    if srun_started == name:
        raise PlanRefused(
            HTTPStatus.BAD_REQUEST,
            f'container "{name}" of pod "{key}" is started by srun on every task of the job '
            "(slurm.hpk.io/launcher): exec and attach reach only containers the job script "
            "starts",
        )
