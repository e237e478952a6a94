"""A pod, rendered into its Slurm job: the job script, sbatch's arguments, and the files beside
the script that hold what must never be in it (the containers' environment).

This is where the pod spec is read, and where every field of it is accounted for: a field is
honoured here, handled by another layer or true of every hpk pod anyway (the `_ELSEWHERE`
tables say which and why), or refused with an InvalidPodSpec that names it.

The job script follows the contract in docs/kubelet.md ("The job script"). Every value it
interpolates goes through the template's `sh` filter. Environment values never appear on a
command line or in the script (unless `command` or `args` reference them as `$(VAR)`): they go
to `env/<container>` files that the caller writes 0600 into the pod folder, and Apptainer
reads them with `--env-file`.

Values from ConfigMaps and Secrets come resolved (kubelet_py.pod.inputs): this module only places
them, and binds the configMap and secret volumes whose files the caller writes.

Pure: the pod (a dict shaped like the API's JSON), the settings and the resolved inputs in,
text out. The only I/O is Jinja2 reading the template, through hpk.templating.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePosixPath
from types import MappingProxyType

from hpk.apptainer import bind_path_problem
from hpk.images import NATIVE_IMAGE, ImageConfig, InvalidImageReference, normalize_reference
from hpk.templating import render
from kubelet_py.errors import ImageNotResolved, InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.job.termination import HOOK_PATH, READY_FIFO, READY_HOOK, READY_PATH
from kubelet_py.pod.flags import ANNOTATION, FIELD, SbatchOption, merge_options, parse_flags
from kubelet_py.pod.inputs import PodInputs
from kubelet_py.pod.probe_spec import PROBE_FIELDS, PROBES_DIR, probes_file
from kubelet_py.pod.resources import (
    container_resources,
    parse_quantity,
    resource_options,
)
from kubelet_py.pod.security import NOT_HONOURED, JobUser, check_pod_context, container_identity
from kubelet_py.pod.storage import ClaimSource, StorageVolumes

TEMPLATE = "pod.sbatch.j2"
JOB_NAME_PREFIX = "hpk/"
"""A pod's job is named <prefix><namespace>/<pod name>."""
JOB_SCRIPT = "job.sh"
SLURM_OUTPUT = "slurm.out"
ENV_DIR = "env"
VOLUMES_DIR = "volumes"
DEFAULT_WORKING_DIR = "/"
"""Where a container starts without `workingDir`, when its image names no WORKDIR: Docker's
default (the job's own folder is hpk's, not the pod's)."""

LAUNCHER_ANNOTATION = "slurm.hpk.io/launcher"
"""`srun` (or `srun:<container>`): that main container starts once per Slurm task."""
LAUNCHER_FIELD = f"metadata.annotations[{LAUNCHER_ANNOTATION}]"

SKIPPED_ENV = "InvalidEnvironmentVariableNames"
"""The Event reason for envFrom keys left out (Kubernetes' own)."""
SECRET_IN_ARGUMENTS = "SecretInArguments"  # noqa: S105 (an Event reason)
"""The Event reason for a Secret's value expanded into `command` or `args`."""

APPTAINER_OPTIONS = ("--cleanenv", "--no-eval")
"""For every container: only the image's and the pod's environment (not the kubelet's), and
values and arguments passed as they are, never evaluated by a shell inside the container."""
CONTAIN_OPTIONS = ("--contain", "--no-mount", "bind-paths,hostfs,cwd")
"""For every container: none of the host's file systems but what the pod's spec gives it.
Apptainer's defaults would bind the user's home (with ~/.hpk's keys and every pod's secret
volumes), the current folder, /tmp and /var/tmp, and the site's `bind path` entries; a pod
spec may come from a chart nobody read. The few host files a container needs (/etc/hosts,
/etc/localtime) are bound read-only by `hpk.apptainer pod`."""
WRITABLE_ROOT = "--writable-tmpfs"
"""Writes to the image's own file system succeed, private to the run and gone at its end, as
under Docker (a tmpfs overlay, bounded by the site's `sessiondir max size`); left out for
`readOnlyRootFilesystem: true`. /tmp and /var/tmp are each container's folders on the node's
disk instead (`--workdir`, in the job script)."""
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_TERMINATION_POLICIES = ("File", "FallbackToLogsOnError")
PID_NAMESPACE = "--pid"
"""A container's own PID namespace, as Kubernetes gives each container: a process in it can
signal only its own container's processes. Without it every pod of the user shares the node's
PIDs, and a `kill(-1)` in one container (Argo's emissary sends one when it forwards a signal
after its child ended) stops every process the user has on the node, the control plane's
too."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL.pattern}(\.{_DNS_LABEL.pattern})*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
#: Apptainer's --env-file ignores these names (or sets them itself), so a pod cannot set them.
_ENV_RESERVED = frozenset({"HOME", "PWD", "UID", "GID", "EUID", "IFS", "OPTIND"})

# What the pod spec may hold: fields read here (honoured or checked), and fields whose values
# need no check here, with the reason.
_POD_HONOURED = frozenset({"containers", "initContainers", "volumes", "activeDeadlineSeconds"})
_POD_CHECKED = frozenset({"restartPolicy", "securityContext", "dnsPolicy", "os"})
_ELSEWHERE: Mapping[str, str] = MappingProxyType(
    {
        "hostNetwork": "containers always use the node's network",
        "hostPID": "true: the containers share the node's PID namespace (no --pid)",
        "hostIPC": "containers always share the node's IPC namespace",
        "shareProcessNamespace": "true: the containers share the node's PID namespace, which "
        "holds the pod's (no --pid)",
        "enableServiceLinks": "service variables are not injected yet (docs/kubelet.md)",
        "nodeName": "the kubelet binds every pod to its node",
        "nodeSelector": "the kubelet's nodes stand for Slurm partitions",
        "affinity": "Slurm places the job",
        "tolerations": "Slurm places the job",
        "topologySpreadConstraints": "Slurm places the job",
        "schedulerName": "the kubelet binds every pod to its node",
        "schedulingGates": "the API server holds gated pods back",
        "priority": "Slurm orders its queue",
        "priorityClassName": "Slurm orders its queue",
        "preemptionPolicy": "Slurm orders its queue",
        "terminationGracePeriodSeconds": "deletion waits this long before Slurm kills the job",
        "serviceAccountName": "the token comes as a projected volume",
        "serviceAccount": "the token comes as a projected volume",
        "automountServiceAccountToken": "the token comes as a projected volume",
        "imagePullSecrets": "images are pulled into the SIF cache before rendering",
    }
)
_CONTAINER_HONOURED = frozenset(
    {
        "name",
        "image",
        "command",
        "args",
        "workingDir",
        "env",
        "envFrom",
        "resources",
        "volumeMounts",
        "terminationMessagePath",
        "terminationMessagePolicy",
        *PROBE_FIELDS,
    }
)
_CONTAINER_CHECKED = frozenset({"stdin", "stdinOnce", "tty", "securityContext", "restartPolicy"})
_RESTART_POLICIES = ("Always", "OnFailure", "Never")
DEFAULT_GRACE_SECONDS = 30
"""Kubernetes' default terminationGracePeriodSeconds: how long a sidecar has between TERM and
KILL once the main containers have ended."""
_CONTAINER_ELSEWHERE: Mapping[str, str] = MappingProxyType(
    {
        "imagePullPolicy": "images are pulled into the SIF cache before rendering",
        "ports": "informational: containers use the node's network",
        "resizePolicy": "hpk never resizes a running pod",
    }
)
_DNS_POLICIES = frozenset({"ClusterFirst", "ClusterFirstWithHostNet", "Default"})
_MOUNT_HONOURED = frozenset({"name", "mountPath", "readOnly", "subPath"})
_CONFIG_SOURCES = {"configMap": "name", "secret": "secretName"}
_CONFIG_FIELDS = frozenset({"items", "defaultMode", "optional"})
#: Volumes whose files kubelet_py.pod.projected makes (tokens, downward API items, keys), with
#: the fields it reads; written by the kubelet before submission, like configMap volumes.
_PROJECTED_SOURCES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "projected": frozenset({"sources", "defaultMode"}),
        "downwardAPI": frozenset({"items", "defaultMode"}),
    }
)
#: fieldRef paths and what they read; the node's address is only known where the job runs.
_FIELD_PATHS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "metadata.uid": ("metadata", "uid"),
        "spec.nodeName": ("spec", "nodeName"),
        "spec.serviceAccountName": ("spec", "serviceAccountName"),
    }
)
_NODE_IP_PATHS = frozenset({"status.podIP", "status.hostIP"})
_RESOURCE_FIELDS = frozenset({"limits.cpu", "limits.memory", "requests.cpu", "requests.memory"})


@dataclass(frozen=True)
class RenderSettings:
    """What rendering needs besides the pod: where things are, on the nodes that run the job."""

    pod_dir: PurePosixPath
    """The pod's folder on the shared filesystem (absolute); the job runs there."""

    apptainer: PurePosixPath
    """The Apptainer binary on the compute nodes (absolute)."""

    images: Mapping[str, PurePosixPath] = field(default_factory=dict)
    """The SIF file of every image the pod's containers name, by image reference (any form
    Docker accepts; `busybox` and `docker.io/library/busybox:latest` are the same key)."""

    image_configs: Mapping[str, ImageConfig] = field(default_factory=dict)
    """ENTRYPOINT, CMD and WORKDIR of the images, by image reference (as `images`); an image
    without one is a native SIF, whose runscript runs when the pod gives no `command`."""

    python: PurePosixPath = field(default_factory=lambda: PurePosixPath(sys.executable))
    """A Python interpreter on the compute nodes that can import hpk and kubelet_py: the job
    runs each container through `kubelet_py.job.launch` and asks `hpk.apptainer` for the options."""

    partition: str | None = None
    """The Slurm partition of the node the pod is bound to; None leaves it to Slurm's default.
    The pod's flags annotation may name another."""

    node_addresses: Mapping[str, str] = field(default_factory=dict)
    """Slurm node name -> its address (what the pod's status shows as hostIP and podIP): the
    job script gives it to `status.podIP` and `status.hostIP` fieldRefs where the job runs."""

    job_user: JobUser = field(default_factory=lambda: JobUser(os.getuid(), os.getgid()))
    """The user and group the job runs as (the kubelet's, who submits it): what decides
    whether Apptainer can honour a securityContext's runAsUser and runAsGroup."""

    kubernetes_service: tuple[str, int] | None = None
    """The API server as the compute nodes reach it (host, port): every container gets it as
    KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT and the other KUBERNETES_* variables of
    the `kubernetes` service; None sets none."""

    allow_mail_flags: bool = False
    """Whether the pod's flags annotation may ask Slurm for mail (kubelet_py.pod.flags)."""

    def __post_init__(self) -> None:
        for name in ("pod_dir", "apptainer", "python"):
            path = PurePosixPath(getattr(self, name))
            if not path.is_absolute() or _has_control(str(path)):
                raise ValueError(f"setting {name} must be an absolute path, not {str(path)!r}")
            object.__setattr__(self, name, path)
        problem = bind_path_problem(str(self.pod_dir))
        if problem:
            raise ValueError(f"setting pod_dir {problem}")
        resolved: dict[str, PurePosixPath] = {}
        for reference, sif in self.images.items():
            path = PurePosixPath(sif)
            if not path.is_absolute() or _has_control(str(path)):
                raise ValueError(f"setting images: {reference} must map to an absolute path")
            resolved[normalize_reference(reference)] = path
        object.__setattr__(self, "images", MappingProxyType(resolved))
        configs = {normalize_reference(ref): config for ref, config in self.image_configs.items()}
        object.__setattr__(self, "image_configs", MappingProxyType(configs))
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.partition):
            raise ValueError(f"setting partition {self.partition!r} is not a partition name")
        for node, address in self.node_addresses.items():
            if _has_control(f"{node}{address}"):
                raise ValueError(f"setting node_addresses: {node!r} -> {address!r}")
        object.__setattr__(self, "node_addresses", MappingProxyType(dict(self.node_addresses)))
        if self.kubernetes_service is not None:
            host, port = self.kubernetes_service
            if not host or _has_control(host) or not 0 < port < 65536:
                raise ValueError(f"setting kubernetes_service: {self.kubernetes_service!r}")

    @classmethod
    def from_overrides(cls, **overrides: object) -> RenderSettings:
        """Settings from keyword values, rejecting unknown names with the list of valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"unknown render settings {unknown}; valid: {valid}")
        return cls(**overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RenderedPod:
    """A pod's Slurm job, ready to be written into the pod folder and submitted."""

    script: str
    """The job script: write it to `<pod folder>/job.sh` (0700)."""

    sbatch_args: tuple[str, ...]
    """sbatch's arguments after the program name, the job script's path last: run
    `sbatch *sbatch_args` as argv, never through a shell."""

    files: Mapping[str, str]
    """Files the script reads, by path relative to the pod folder (`env/main`): write each
    0600 (in 0700 folders) before submitting. They hold the containers' environment."""

    warnings: tuple[tuple[str, str], ...] = ()
    """(reason, message) of what was left out as Kubernetes leaves it out (envFrom keys that
    are no variable names), for the caller to report as Warning Events."""


@dataclass(frozen=True)
class ContainerLaunch:
    """How the job script starts one container (the template's view of it)."""

    name: str
    image: str
    """The normalized image reference, for the script's comments."""
    sif: str
    action: str
    """`exec`, or `run` (the image's runscript) for a native image without `command`."""
    options: tuple[str, ...]
    """Apptainer options after hpk's run options, other than the binds."""
    binds: tuple[str, ...]
    """`--bind` specifications, one per volume mount."""
    termination_path: str
    """Its terminationMessagePath (kubelet_py.job.termination places the file there)."""
    arguments: tuple[str, ...]
    """The words after the SIF file (see `container_argv`)."""
    node_ip_env: tuple[str, ...] = ()
    """Variables the script sets to the node's address (`status.podIP`, `status.hostIP`)."""
    srun: bool = False
    """Started once per Slurm task, through srun and kubelet_py.job.task."""
    restart: str = "Never"
    """When the launcher runs the container again: `Never`, `OnFailure` or `Always`."""
    sidecar: bool = False
    """An init container with `restartPolicy: Always` (a native sidecar): the next container
    starts once it has started, and it runs until the main containers have ended."""
    grace: int | None = None
    """Seconds between the TERM that stops a sidecar and the KILL; None for other containers."""
    probes: str | None = None
    """The container's probes file (kubelet_py.pod.probe_spec), None when it has no probes."""


def render_pod(
    pod: Mapping[str, object],
    settings: RenderSettings,
    *,
    inputs: PodInputs | None = None,
    claims: Mapping[str, ClaimSource] | None = None,
) -> RenderedPod:
    """The job script, sbatch arguments and env files of `pod`.

    `inputs` holds what the pod reads from ConfigMaps and Secrets (kubelet_py.pod.inputs.resolve).
    Raises InvalidPodSpec (naming the field) for a pod hpk cannot run as asked, and
    ImageNotResolved when `settings.images` lacks one of its images; a reference `inputs` does
    not hold is the caller's error (ValueError). `claims` holds the volumes of the pod's
    persistentVolumeClaim volumes (kubelet_py.pod.storage.resolve_claims).
    """
    inputs = inputs or PodInputs()
    metadata = _mapping(pod.get("metadata"), "metadata")
    namespace = _name(metadata.get("namespace"), "metadata.namespace", _DNS_LABEL)
    name = _name(metadata.get("name"), "metadata.name", _DNS_SUBDOMAIN, longest=253)
    uid = _name(metadata.get("uid"), "metadata.uid", _UID, longest=128)
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    spec = _mapping(pod.get("spec"), "spec")
    _check_pod_fields(spec)
    pod_context = _mapping(spec.get("securityContext"), "spec.securityContext")
    not_honoured = list(check_pod_context(pod_context, job_user=settings.job_user))

    flags_text = annotations.get(ANNOTATION, "")
    if not isinstance(flags_text, str):
        raise InvalidPodSpec(FIELD, "must be a string")
    requested = parse_flags(flags_text, allow_mail=settings.allow_mail_flags)
    storage = StorageVolumes(claims=claims or {})
    volumes, config_volumes = _volumes(spec, storage=storage)
    unresolved = sorted(config_volumes - set(inputs.volumes))
    if unresolved:
        raise ValueError(f"volume {unresolved[0]}: its ConfigMap or Secret was not resolved")
    init = _containers(spec, "initContainers")
    main = _containers(spec, "containers")
    if not main:
        raise InvalidPodSpec("spec.containers", "a pod needs at least one container")
    _check_unique_names(init, main)
    srun_container = _srun_container(annotations.get(LAUNCHER_ANNOTATION), main)
    # srun's tasks keep the node's PIDs, as MPI launched by srun expects (Apptainer's hybrid
    # model); so do the containers of a pod that asks to share them.
    node_pids = any(spec.get(key) is True for key in ("hostPID", "shareProcessNamespace"))
    gpus_by_flags = any(_asks_for_gpus(option) for option in requested)

    files: dict[str, str] = {}
    warnings: list[tuple[str, str]] = []
    launches: dict[str, list[ContainerLaunch]] = {"initContainers": [], "containers": []}
    for key, containers in (("initContainers", init), ("containers", main)):
        for index, container in enumerate(containers):
            where = f"spec.{key}[{index}]"
            launch, environment = _launch(
                container,
                where=where,
                pod=pod,
                volumes=volumes,
                config_volumes=config_volumes,
                inputs=inputs,
                settings=settings,
                gpus_by_flags=gpus_by_flags,
                pid_namespace=not node_pids
                and not (key == "containers" and container.get("name") == srun_container),
                storage=storage,
                warnings=warnings,
                not_honoured=not_honoured,
            )
            restart, grace = _restart(container, where, init=key == "initContainers", spec=spec)
            launch = replace(launch, restart=restart, sidecar=grace is not None, grace=grace)
            if key == "containers" and launch.name == srun_container:
                launch = replace(launch, srun=True)
            launches[key].append(launch)
            if environment is not None:
                files[f"{ENV_DIR}/{launch.name}"] = environment
            launch = _with_probes(
                launch, container, where, spec=spec, settings=settings, files=files
            )
            launches[key][-1] = launch

    if not_honoured:
        warnings.append((NOT_HONOURED, "; ".join(not_honoured)))
    script = render(
        TEMPLATE,
        namespace=namespace,
        pod_name=name,
        uid=uid,
        pod_dir=str(settings.pod_dir),
        apptainer=str(settings.apptainer),
        python=str(settings.python),
        volume_dirs=sorted(
            _volume_dirs(volumes, config_volumes, init + main, managed=storage.managed)
        ),
        storage=storage.plan(),
        open_volume_dirs=any(
            "--security" in launch.options for group in launches.values() for launch in group
        ),
        init=launches["initContainers"],
        main=launches["containers"],
        node_ips=_node_ips(settings, launches["initContainers"] + launches["containers"]),
        handshake={
            "fifo": READY_FIFO,
            "fifo_at": READY_PATH,
            "hook": READY_HOOK,
            "hook_at": HOOK_PATH,
        },
    )
    derived = [SbatchOption("partition", settings.partition)] if settings.partition else []
    derived += resource_options(spec)
    output = str(settings.pod_dir / SLURM_OUTPUT).replace("%", "%%")  # sbatch expands %j etc.
    args = (
        f"--job-name={JOB_NAME_PREFIX}{namespace}/{name}",
        f"--comment=hpk-uid={uid}",
        f"--chdir={settings.pod_dir}",
        f"--output={output}",
        f"--error={output}",
        "--parsable",
        "--no-requeue",
        *(option.argv() for option in merge_options(derived, requested)),
        str(settings.pod_dir / JOB_SCRIPT),
    )
    return RenderedPod(
        script=script,
        sbatch_args=args,
        files=MappingProxyType(files),
        warnings=tuple(warnings),
    )


def _with_probes(
    launch: ContainerLaunch,
    container: Mapping[str, object],
    where: str,
    *,
    spec: Mapping[str, object],
    settings: RenderSettings,
    files: dict[str, str],
) -> ContainerLaunch:
    """`launch` with its probes file, which goes into `files`; as it is without probes."""
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise InvalidPodSpec(
            "spec.terminationGracePeriodSeconds", f"{grace!r} is no number of seconds"
        )
    init = where.startswith("spec.initContainers") and not launch.sidecar
    text = probes_file(container, where, grace=grace, init=init)
    if text is None:
        return launch
    for key in PROBE_FIELDS:
        if launch.srun and "exec" in _mapping(container.get(key), f"{where}.{key}"):
            raise InvalidPodSpec(f"{where}.{key}.exec", "srun containers have no exec probes")
    files[f"{PROBES_DIR}/{launch.name}"] = text
    return replace(launch, probes=str(settings.pod_dir / PROBES_DIR / launch.name))


def _srun_container(value: object, main: Sequence[Mapping[str, object]]) -> str | None:
    """The main container the launcher annotation names, or None without the annotation.

    `srun` names the only main container, or the one called `main` (as Argo names a step's);
    `srun:<name>` names one outright."""
    if value is None:
        return None
    if not isinstance(value, str) or value.partition(":")[0] != "srun":
        raise InvalidPodSpec(
            LAUNCHER_FIELD, f"{value!r}: the only launcher is srun (or srun:<container>)"
        )
    names = [str(container.get("name")) for container in main]
    wanted = value.partition(":")[2]
    if wanted:
        if wanted not in names:
            raise InvalidPodSpec(LAUNCHER_FIELD, f"{wanted!r} is not a main container")
        return wanted
    if len(names) == 1:
        return names[0]
    if "main" in names:
        return "main"
    raise InvalidPodSpec(
        LAUNCHER_FIELD, f"the pod has {len(names)} containers: say which, as srun:<container>"
    )


def _node_ips(
    settings: RenderSettings, launches: Sequence[ContainerLaunch]
) -> list[tuple[str, str]] | None:
    """The script's table of node addresses, when a container needs the node's address."""
    if not any(launch.node_ip_env for launch in launches):
        return None
    return sorted(settings.node_addresses.items())


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a known VAR is replaced, an unknown one stays as written,
    and `$$` stands for one `$` (so `$$(VAR)` is the literal `$(VAR)`)."""
    out: list[str] = []
    position = 0
    while position < len(text):
        dollar = text.find("$", position)
        if dollar < 0 or dollar == len(text) - 1:
            out.append(text[position:])
            break
        out.append(text[position:dollar])
        following = text[dollar + 1]
        if following == "$":
            out.append("$")
            position = dollar + 2
        elif following == "(":
            close = text.find(")", dollar + 2)
            if close < 0:
                out.append("$(")
                position = dollar + 2
            else:
                reference = text[dollar + 2 : close]
                out.append(variables.get(reference, text[dollar : close + 1]))
                position = close + 1
        else:
            out.append(text[dollar : dollar + 2])
            position = dollar + 2
    return "".join(out)


def env_file(variables: Mapping[str, str]) -> str:
    """The environment as a file for Apptainer's --env-file, which evaluates it as a shell
    script without running commands: every value single-quoted, so it stays literal."""
    lines = ["# Read by apptainer --env-file; every value is a literal string."]
    lines += [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join(lines) + "\n"


def _launch(
    container: Mapping[str, object],
    *,
    where: str,
    pod: Mapping[str, object],
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    inputs: PodInputs,
    settings: RenderSettings,
    gpus_by_flags: bool,
    pid_namespace: bool,
    warnings: list[tuple[str, str]],
    not_honoured: list[str],
    storage: StorageVolumes,
) -> tuple[ContainerLaunch, str | None]:
    _check_container_fields(container, where)
    name = _name(container.get("name"), f"{where}.name", _DNS_LABEL)
    image_text = container.get("image")
    if not isinstance(image_text, str) or not image_text:
        raise InvalidPodSpec(f"{where}.image", "must name an image")
    try:
        image = normalize_reference(image_text)
    except InvalidImageReference as error:
        raise InvalidPodSpec(f"{where}.image", error.problem) from error
    sif = settings.images.get(image)
    if sif is None:
        raise ImageNotResolved(image, sorted(settings.images))

    variables, node_ip_env, secret = _environment(
        container,
        where,
        pod=pod,
        inputs=inputs,
        warnings=warnings,
        base=service_variables(settings.kubernetes_service),
    )
    written = {key: _words(container, key, where) for key in ("command", "args")}
    command = [expand(word, variables) for word in written["command"]]
    arguments = [expand(word, variables) for word in written["args"]]
    _warn_of_secrets_in_words(written, where, variables, secret, warnings)
    config = settings.image_configs.get(image, NATIVE_IMAGE)
    action, argv = container_argv(command=command, args=arguments, config=config)
    if action == "exec" and not argv:
        raise InvalidPodSpec(
            f"{where}.command", f"image {image} has no ENTRYPOINT or CMD, so the pod must give one"
        )
    for word in argv:  # the pod's words are checked already; these may be the image's
        _check_text(word, f"{where}.image", controls=True)
    _check_exec_size(where, command=command, arguments=arguments, argv=argv, env=variables)
    working_dir = container.get("workingDir") or config.working_dir or DEFAULT_WORKING_DIR
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise InvalidPodSpec(f"{where}.workingDir", "must be an absolute path")
    _check_text(working_dir, f"{where}.workingDir")

    spec = _mapping(pod.get("spec"), "spec")
    identity = container_identity(
        _mapping(spec.get("securityContext"), "spec.securityContext"),
        _mapping(container.get("securityContext"), f"{where}.securityContext"),
        where=where,
        job_user=settings.job_user,
    )
    not_honoured += identity.warnings
    options = [*APPTAINER_OPTIONS, *CONTAIN_OPTIONS, *identity.options]
    if identity.writable_root:
        options.append(WRITABLE_ROOT)
    runs_as = settings.job_user.uid if identity.runs_as is None else identity.runs_as
    options += home_options(config.home(runs_as))
    if pid_namespace:
        options.append(PID_NAMESPACE)
    if gpus_by_flags or container_resources(container, field=where).gpus:
        options.append("--nv")
    if variables:
        # Relative to the job's folder: --env-file splits its value as CSV, the path cannot.
        options += ["--env-file", f"{ENV_DIR}/{name}"]
    options += ["--pwd", working_dir]
    launch = ContainerLaunch(
        name=name,
        image=image,
        sif=str(sif),
        action=action,
        options=tuple(options),
        binds=tuple(
            _binds(
                container,
                where=where,
                volumes=volumes,
                config_volumes=config_volumes,
                inputs=inputs,
                pod_dir=settings.pod_dir,
                read_only=storage.read_only,
            )
        ),
        termination_path=_termination_path(container, where),
        arguments=tuple(argv),
        node_ip_env=tuple(node_ip_env),
    )
    return launch, env_file(variables) if variables else None


def home_options(home: str) -> list[str]:
    """Apptainer's options that set HOME to `home` and mount nothing there: Kubernetes sets
    HOME from the image's /etc/passwd (or to `/`), and never shows the host's home."""
    return ["--no-home", "--home", f"/:{home}"]


def _termination_path(container: Mapping[str, object], where: str) -> str:
    """The container's terminationMessagePath, checked, and its policy checked too."""
    policy = container.get("terminationMessagePolicy", "File")
    if policy not in _TERMINATION_POLICIES:
        raise InvalidPodSpec(
            f"{where}.terminationMessagePolicy", f"{policy!r}: one of {list(_TERMINATION_POLICIES)}"
        )
    path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    parts = path.split("/") if isinstance(path, str) else []
    if not isinstance(path, str) or not path.startswith("/") or {".", ".."} & set(parts):
        raise InvalidPodSpec(f"{where}.terminationMessagePath", "must be an absolute path")
    if not parts[-1]:
        raise InvalidPodSpec(f"{where}.terminationMessagePath", "must name a file")
    _check_text(path, f"{where}.terminationMessagePath")
    return path


def container_argv(
    *, command: Sequence[str], args: Sequence[str], config: ImageConfig
) -> tuple[str, list[str]]:
    """The Apptainer action and the words after the SIF file, as Docker and Kubernetes run a
    container: `command` replaces the image's ENTRYPOINT and `args` its CMD.

    - `command` (with or without `args`): exec command + args (the image's CMD is dropped);
    - only `args`: exec ENTRYPOINT + args;
    - neither: exec ENTRYPOINT + CMD.

    A native SIF (no OCI metadata) has no ENTRYPOINT to hand `args` to: without `command`,
    its runscript runs with `args` as its arguments. An empty exec word list (an OCI image
    with neither, and no command) is the caller's to refuse.
    """
    if command:
        return "exec", [*command, *args]
    if not config.oci:
        return "run", list(args)
    if args:
        return "exec", [*config.entrypoint, *args]
    return "exec", [*config.entrypoint, *config.cmd]


def _environment(
    container: Mapping[str, object],
    where: str,
    *,
    pod: Mapping[str, object],
    inputs: PodInputs,
    warnings: list[tuple[str, str]],
    base: Mapping[str, str] = MappingProxyType({}),
) -> tuple[dict[str, str], list[str], set[str]]:
    """The container's variables as Kubernetes sets them: `base` (the `kubernetes` service's)
    first, then `envFrom`, then `env`, a later entry replacing an earlier one; `$(VAR)`
    expanded in `value` entries only. Also returns the variables the job sets to the node's
    address, and those whose values come from a Secret (directly or through `$(VAR)`)."""
    variables: dict[str, str] = dict(base)
    node_ip: list[str] = []
    secret: set[str] = set()

    def assign(name: str, value: str | None, *, from_secret: bool = False) -> None:
        variables.pop(name, None)
        secret.discard(name)
        if name in node_ip:
            node_ip.remove(name)
        if value is None:
            node_ip.append(name)
        else:
            variables[name] = value
            if from_secret:
                secret.add(name)

    for variable, value, from_secret in _env_from(
        container, where, inputs=inputs, warnings=warnings
    ):
        assign(variable, value, from_secret=from_secret)
    for index, entry in enumerate(_objects(container.get("env"), f"{where}.env")):
        at = f"{where}.env[{index}]"
        unknown = sorted(set(entry) - {"name", "value", "valueFrom"})
        if unknown:
            raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
        name = entry.get("name")
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise InvalidPodSpec(
                f"{at}.name",
                f"{name!r} cannot be set under Apptainer: names are letters, digits and '_', "
                "not starting with a digit",
            )
        if name in _ENV_RESERVED:
            raise InvalidPodSpec(f"{at}.name", f"Apptainer does not let a container set {name}")
        if entry.get("valueFrom") is not None:
            if entry.get("value"):
                raise InvalidPodSpec(f"{at}.valueFrom", "may not be given with a value")
            found = _value_from(entry["valueFrom"], at, container=container, pod=pod, inputs=inputs)
            if found is not _UNSET:  # taken as it is: Kubernetes expands `value` only
                from_secret = "secretKeyRef" in _mapping(entry["valueFrom"], at)
                assign(name, found, from_secret=from_secret)
            continue
        text = entry.get("value", "")
        if not isinstance(text, str):
            raise InvalidPodSpec(f"{at}.value", "must be a string")
        _check_text(text, f"{at}.value", controls=True)
        value = expand(text, variables)
        assign(name, value, from_secret=value != expand(text, _without(variables, secret)))
    return variables, node_ip, secret


def _without(variables: Mapping[str, str], names: Collection[str]) -> dict[str, str]:
    return {name: value for name, value in variables.items() if name not in names}


def _warn_of_secrets_in_words(
    written: Mapping[str, Sequence[str]],
    where: str,
    variables: Mapping[str, str],
    secret: Collection[str],
    warnings: list[tuple[str, str]],
) -> None:
    """A Warning when `written` (`command` and `args`, as the pod gives them) expand a variable
    of a Secret: Kubernetes expands it, so its value is in the job script and on the process's
    argv, which every user of the node can read (`ps`)."""
    if not secret:
        return
    public = _without(variables, secret)
    for key, words in written.items():
        for index, word in enumerate(words):
            if expand(word, variables) != expand(word, public):
                used = sorted(name for name in secret if f"$({name})" in word)
                warnings.append(
                    (
                        SECRET_IN_ARGUMENTS,
                        f"{where}.{key}[{index}] expands {', '.join(used) or 'a variable'} "
                        "from a Secret: its value is in the job script and on the process's "
                        "command line, which other users of the node can read; pass it as a "
                        "variable or a file instead",
                    )
                )


def service_variables(service: tuple[str, int] | None) -> dict[str, str]:
    """The variables Kubernetes gives every container for the `kubernetes` service, pointing
    at `service` (host, port); none without one."""
    if service is None:
        return {}
    host, port = service
    url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    prefix = f"KUBERNETES_PORT_{port}_TCP"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": url,
        prefix: url,
        f"{prefix}_PROTO": "tcp",
        f"{prefix}_PORT": str(port),
        f"{prefix}_ADDR": host,
    }


def _env_from(
    container: Mapping[str, object],
    where: str,
    *,
    inputs: PodInputs,
    warnings: list[tuple[str, str]],
) -> Iterator[tuple[str, str, bool]]:
    """(name, value, whether from a Secret) of each variable of `envFrom`."""
    for index, entry in enumerate(_objects(container.get("envFrom"), f"{where}.envFrom")):
        at = f"{where}.envFrom[{index}]"
        unknown = sorted(set(entry) - {"configMapRef", "secretRef", "prefix"})
        if unknown:
            raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
        prefix = entry.get("prefix") or ""
        if not isinstance(prefix, str):
            raise InvalidPodSpec(f"{at}.prefix", "must be a string")
        sources = [key for key in ("configMapRef", "secretRef") if entry.get(key) is not None]
        if len(sources) != 1:
            raise InvalidPodSpec(at, "must name exactly one of configMapRef and secretRef")
        _reference(entry[sources[0]], f"{at}.{sources[0]}", ("name",))
        if at not in inputs.env_from:
            raise ValueError(f"{at}: its ConfigMap or Secret was not resolved")
        for key, value in sorted(inputs.env_from[at].items()):
            name = prefix + key
            if not _ENV_NAME.fullmatch(name) or name in _ENV_RESERVED:
                # As Kubernetes does: keys that are no variable names are skipped, and said.
                warnings.append(
                    (
                        SKIPPED_ENV,
                        f"{at}: {name!r} is not a variable a container can have, skipped",
                    )
                )
                continue
            _check_text(value, at, controls=True)
            yield name, value, sources[0] == "secretRef"


_UNSET = "\0unset"
"""What an optional reference to a missing object or key gives: the variable is not set."""


def _value_from(
    value_from: object,
    at: str,
    *,
    container: Mapping[str, object],
    pod: Mapping[str, object],
    inputs: PodInputs,
) -> str | None:
    """One `valueFrom`: its value, None for the node's address, or _UNSET."""
    source = _mapping(value_from, f"{at}.valueFrom")
    kinds = sorted(key for key, value in source.items() if value is not None)
    if len(kinds) != 1:
        raise InvalidPodSpec(f"{at}.valueFrom", "must name exactly one source")
    kind = kinds[0]
    where = f"{at}.valueFrom.{kind}"
    ref = _mapping(source[kind], where)
    if kind in ("configMapKeyRef", "secretKeyRef"):
        _reference(ref, where, ("name", "key"))
        if at not in inputs.env_values:
            raise ValueError(f"{where}: its ConfigMap or Secret was not resolved")
        resolved = inputs.env_values[at]
        if resolved is None:
            return _UNSET
        _check_text(resolved, where, controls=True)
        return resolved
    if kind == "fieldRef":
        path = ref.get("fieldPath")
        if path in _NODE_IP_PATHS:
            return None
        if not isinstance(path, str) or path not in _FIELD_PATHS:
            raise InvalidPodSpec(
                f"{where}.fieldPath",
                f"{path!r} is not supported; supported: "
                f"{', '.join(sorted([*_FIELD_PATHS, *_NODE_IP_PATHS]))}",
            )
        part, key = _FIELD_PATHS[path]
        found = _mapping(pod.get(part), part).get(key)
        return str(found) if found is not None else ""
    if kind == "resourceFieldRef":
        return _resource_field(ref, where, container=container, pod=pod)
    raise InvalidPodSpec(where, "is not supported yet")


def _reference(ref: object, where: str, keys: Sequence[str]) -> None:
    reference = _mapping(ref, where)
    for key in keys:
        value = reference.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidPodSpec(f"{where}.{key}", "must be a non-empty string")
    optional = reference.get("optional")
    if optional is not None and not isinstance(optional, bool):
        raise InvalidPodSpec(f"{where}.optional", "must be true or false")


def _resource_field(
    ref: Mapping[str, object],
    where: str,
    *,
    container: Mapping[str, object],
    pod: Mapping[str, object],
) -> str:
    """A resourceFieldRef's value, rounded up in units of its divisor. A limit that is not set
    reads as the request (the job gets its request), a request as the limit, both as 0."""
    resource = ref.get("resource")
    if resource not in _RESOURCE_FIELDS:
        raise InvalidPodSpec(
            f"{where}.resource",
            f"{resource!r} is not supported; supported: {', '.join(sorted(_RESOURCE_FIELDS))}",
        )
    target = container
    wanted = ref.get("containerName")
    if wanted not in (None, "", container.get("name")):
        spec = _mapping(pod.get("spec"), "spec")
        named = [
            other
            for key in ("initContainers", "containers")
            for other in _containers(spec, key)
            if other.get("name") == wanted
        ]
        if not named:
            raise InvalidPodSpec(f"{where}.containerName", f"{wanted!r} is not a container")
        target = named[0]
    kind, _, name = str(resource).partition(".")
    other = "requests" if kind == "limits" else "limits"
    resources = _mapping(target.get("resources"), f"{where}.resources")
    text = _mapping(resources.get(kind), kind).get(name)
    if text is None:
        text = _mapping(resources.get(other), other).get(name, "0")
    quantity = parse_quantity(text, field=f"{where}.resource")
    divisor = parse_quantity(ref.get("divisor") or "1", field=f"{where}.divisor")
    if divisor <= 0:
        raise InvalidPodSpec(f"{where}.divisor", "must be positive")
    return str(math.ceil(quantity / divisor))


def _words(container: Mapping[str, object], key: str, where: str) -> list[str]:
    words = _list(container.get(key), f"{where}.{key}")
    for index, word in enumerate(words):
        if not isinstance(word, str):
            raise InvalidPodSpec(f"{where}.{key}[{index}]", "must be a string")
        _check_text(word, f"{where}.{key}[{index}]", controls=True)
    return [str(word) for word in words]


def _volumes(
    spec: Mapping[str, object], *, storage: StorageVolumes
) -> tuple[dict[str, str], frozenset[str]]:
    """Volume name -> its folder relative to the pod folder (absolute for a hostPath or a
    claim's volume); and the configMap and secret volumes among them (the kubelet writes their
    files before submission). `storage` takes note of the storage volumes (hostPath, claims,
    emptyDir medium and sizeLimit)."""
    volumes: dict[str, str] = {}
    config: set[str] = set()
    for index, volume in enumerate(_objects(spec.get("volumes"), "spec.volumes")):
        where = f"spec.volumes[{index}]"
        name = _name(volume.get("name"), f"{where}.name", _DNS_LABEL)
        sources = sorted(set(volume) - {"name"})
        if len(sources) == 1 and sources[0] in _STORAGE_SOURCES:
            if name in volumes:
                raise InvalidPodSpec(f"{where}.name", f"volume {name} is defined twice")
            volumes[name] = _storage_volume(storage, name, sources[0], volume, where)
            continue
        if len(sources) != 1 or sources[0] not in {
            "emptyDir",
            *_CONFIG_SOURCES,
            *_PROJECTED_SOURCES,
        }:
            kind = next((s for s in sources if s not in _CONFIG_SOURCES), "(none)")
            raise InvalidPodSpec(
                f"{where}.{kind}",
                f"volume {name}: only emptyDir, configMap, secret, projected, downwardAPI, "
                "hostPath and persistentVolumeClaim volumes are supported",
            )
        if sources[0] in _PROJECTED_SOURCES:
            kind = sources[0]
            source = _mapping(volume[kind], f"{where}.{kind}")
            unknown = sorted(set(source) - _PROJECTED_SOURCES[kind])
            if unknown:
                raise InvalidPodSpec(f"{where}.{kind}.{unknown[0]}", "is not supported yet")
            config.add(name)  # kubelet_py.pod.projected made its files
        elif sources[0] == "emptyDir":
            storage.empty_dir(
                name, volume["emptyDir"], where=f"{where}.emptyDir", folder=f"{VOLUMES_DIR}/{name}"
            )
        else:
            kind = sources[0]
            source = _mapping(volume[kind], f"{where}.{kind}")
            unknown = sorted(set(source) - _CONFIG_FIELDS - {_CONFIG_SOURCES[kind]})
            if unknown:
                raise InvalidPodSpec(f"{where}.{kind}.{unknown[0]}", "is not supported yet")
            config.add(name)
        if name in volumes:
            raise InvalidPodSpec(f"{where}.name", f"volume {name} is defined twice")
        volumes[name] = f"{VOLUMES_DIR}/{name}"
    return volumes, frozenset(config)


_STORAGE_SOURCES = frozenset({"hostPath", "persistentVolumeClaim"})


def _storage_volume(
    storage: StorageVolumes, name: str, kind: str, volume: Mapping[str, object], where: str
) -> str:
    """A hostPath or persistentVolumeClaim volume: the node's folder to bind."""
    if kind == "hostPath":
        return storage.host_path(name, volume[kind], where=f"{where}.hostPath")
    return storage.claim(name, volume[kind], where=f"{where}.persistentVolumeClaim")


def _binds(
    container: Mapping[str, object],
    *,
    where: str,
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    inputs: PodInputs,
    pod_dir: PurePosixPath,
    read_only: Collection[str] = frozenset(),
) -> Iterator[str]:
    mounts = _objects(container.get("volumeMounts"), f"{where}.volumeMounts")
    for index, mount in enumerate(mounts):
        at = f"{where}.volumeMounts[{index}]"
        for key in sorted(set(mount) - _MOUNT_HONOURED):
            if not (key == "mountPropagation" and mount[key] in (None, "None")):
                raise InvalidPodSpec(f"{at}.{key}", "is not supported yet")
        volume = mount.get("name")
        if not isinstance(volume, str) or volume not in volumes:
            raise InvalidPodSpec(f"{at}.name", f"{volume!r} is not a volume of the pod")
        source = _mount_source(volumes[volume], mount.get("subPath"), at)
        if volume in config_volumes and mount.get("subPath"):
            # The kubelet wrote the volume's files; a subPath must name one of them.
            written = {
                path
                for file in inputs.volumes.get(volume, ())
                for path in _with_parents(PurePosixPath(file.path))
            }
            if PurePosixPath(str(mount["subPath"])) not in written:
                raise InvalidPodSpec(
                    f"{at}.subPath", f"{mount['subPath']!r} is not a file of volume {volume}"
                )
        target = mount.get("mountPath")
        if not isinstance(target, str) or not target.startswith("/"):
            raise InvalidPodSpec(f"{at}.mountPath", "must be an absolute path")
        _check_bind_path(target, f"{at}.mountPath")
        spec = f"{pod_dir / source}:{target}"
        # configMap and secret volumes are read-only, as in Kubernetes.
        bound_read_only = (
            mount.get("readOnly") is True or volume in config_volumes or volume in read_only
        )
        yield f"{spec}:ro" if bound_read_only else spec


def _with_parents(path: PurePosixPath) -> list[PurePosixPath]:
    return [path, *path.parents][:-1]


def _mount_source(folder: str, sub_path: object, at: str) -> str:
    if sub_path in (None, ""):
        return folder
    if not isinstance(sub_path, str):
        raise InvalidPodSpec(f"{at}.subPath", "must be a string")
    parts = PurePosixPath(sub_path).parts
    if sub_path.startswith("/") or ".." in parts:
        raise InvalidPodSpec(f"{at}.subPath", "must be a relative path inside the volume")
    _check_bind_path(sub_path, f"{at}.subPath")
    return "/".join((folder, *parts))


def _volume_dirs(
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    containers: Sequence[Mapping[str, object]],
    *,
    managed: Collection[str] = frozenset(),
) -> set[str]:
    """Folders the script creates before any container starts: emptyDir volumes and their
    subPaths (configMap and secret volumes are the kubelet's; the `managed` storage volumes'
    own folders are the node's or the storage block's, their subPaths are made here)."""
    folders = {
        folder
        for name, folder in volumes.items()
        if name not in config_volumes and name not in managed
    }
    for container in containers:
        for mount in _objects(container.get("volumeMounts"), "volumeMounts"):
            name = str(mount["name"])
            if mount.get("subPath") and name not in config_volumes:
                folders.add(_mount_source(volumes[name], mount["subPath"], ""))
    return folders


def _check_pod_fields(spec: Mapping[str, object]) -> None:
    unknown = sorted(set(spec) - _POD_HONOURED - _POD_CHECKED - set(_ELSEWHERE))
    if unknown:
        raise InvalidPodSpec(f"spec.{unknown[0]}", "is not supported yet")
    policy = spec.get("restartPolicy", "Always")
    if policy not in _RESTART_POLICIES:
        raise InvalidPodSpec("spec.restartPolicy", f"{policy!r} is none of {_RESTART_POLICIES}")
    dns_policy = spec.get("dnsPolicy", "ClusterFirst")
    if dns_policy not in _DNS_POLICIES:
        raise InvalidPodSpec("spec.dnsPolicy", f"{dns_policy!r} is not supported yet")
    os_name = _mapping(spec.get("os"), "spec.os").get("name", "linux")
    if os_name != "linux":
        raise InvalidPodSpec("spec.os.name", f"{os_name!r}: hpk runs Linux containers")


def _check_container_fields(container: Mapping[str, object], where: str) -> None:
    known = _CONTAINER_HONOURED | _CONTAINER_CHECKED | set(_CONTAINER_ELSEWHERE)
    unknown = sorted(set(container) - known)
    if unknown:
        raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
    for key in ("stdin", "stdinOnce", "tty"):
        if container.get(key):
            raise InvalidPodSpec(f"{where}.{key}", "containers in Slurm jobs have no input")


def _restart(
    container: Mapping[str, object], where: str, *, init: bool, spec: Mapping[str, object]
) -> tuple[str, int | None]:
    """How the launcher restarts the container: the pod's restartPolicy (init containers are
    retried until they succeed unless it is Never), or a native sidecar's own `Always`; and
    a sidecar's grace period (None: not a sidecar)."""
    pod_policy = str(spec.get("restartPolicy", "Always"))
    own = container.get("restartPolicy")
    if own is None:
        if init:
            return ("Never" if pod_policy == "Never" else "OnFailure"), None
        return pod_policy, None
    if not init:
        raise InvalidPodSpec(
            f"{where}.restartPolicy", "only init containers may set it (to Always: a sidecar)"
        )
    if own != "Always":
        raise InvalidPodSpec(
            f"{where}.restartPolicy", f"{own!r}: an init container may only set Always (a sidecar)"
        )
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise InvalidPodSpec(
            "spec.terminationGracePeriodSeconds", f"{grace!r} is no number of seconds"
        )
    return "Always", grace


def _check_unique_names(*groups: Sequence[Mapping[str, object]]) -> None:
    seen: set[object] = set()
    for group in groups:
        for container in group:
            name = container.get("name")
            if name in seen:
                raise InvalidPodSpec("spec", f"two containers are named {name!r}")
            seen.add(name)


def _asks_for_gpus(option: SbatchOption) -> bool:
    if option.name == "gres":
        return "gpu" in (option.value or "")
    return option.name.startswith("gpus")


def _containers(spec: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    return _objects(spec.get(key), f"spec.{key}")


def _objects(value: object, where: str) -> list[Mapping[str, object]]:
    return [_mapping(item, f"{where}[{index}]") for index, item in enumerate(_list(value, where))]


def _list(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPodSpec(where, "must be a list")
    return value


def _name(value: object, where: str, pattern: re.Pattern[str], *, longest: int = 63) -> str:
    if not isinstance(value, str) or len(value) > longest or not pattern.fullmatch(value):
        raise InvalidPodSpec(where, f"{value!r} is not a valid name")
    return value


def _has_control(text: str) -> bool:
    return any(ord(character) < 32 or ord(character) == 127 for character in text)


MAX_ARG_STRLEN = 131072
"""Linux's limit on one argument or `NAME=value` string that execve passes, NUL included. A
longer word makes bash fail to start the container's launcher (exit 126, no markers)."""
EXEC_BUDGET = 1024 * 1024
"""What a container's argv and environment may take together, in bytes (each string with its
NUL). Linux's ARG_MAX is a quarter of the stack limit, 2 MiB with the usual 8 MiB; half of
that is left to the job's own environment from Slurm and to Apptainer's options and
variables, which pass through the same execve calls."""


def _check_exec_size(
    where: str,
    *,
    command: Sequence[str],
    arguments: Sequence[str],
    argv: Sequence[str],
    env: Mapping[str, str],
) -> None:
    """Refuse a container whose words (after `$(VAR)` expansion) or variables no execve takes,
    naming the word's field: `command[i]`, `args[i]`, or `image` for its ENTRYPOINT and CMD."""
    leading = len(argv) - len(arguments)  # `command`, or the image's words
    fields = [
        f"{where}.command[{index}]" if command else f"{where}.image" for index in range(leading)
    ] + [f"{where}.args[{index}]" for index in range(len(arguments))]
    sizes = [len(word.encode()) + 1 for word in argv]
    for at, size in zip(fields, sizes, strict=True):
        if size > MAX_ARG_STRLEN:
            what = "a word of its ENTRYPOINT or CMD" if at.endswith(".image") else "the word"
            raise InvalidPodSpec(
                at,
                f"{what} is {size - 1} bytes long after $(VAR) expansion; Linux passes no "
                f"argument longer than {MAX_ARG_STRLEN - 1} bytes to a program",
            )
    for name, value in env.items():
        size = len(name.encode()) + len(value.encode()) + 2
        sizes.append(size)
        if size > MAX_ARG_STRLEN:
            raise InvalidPodSpec(
                f"{where}.env",
                f"variable {name} is {size - 2 - len(name.encode())} bytes long; Linux passes "
                f"no {name}=value string longer than {MAX_ARG_STRLEN - 1} bytes to a program",
            )
    if sum(sizes) > EXEC_BUDGET:
        raise InvalidPodSpec(
            where,
            f"its arguments and environment take {sum(sizes)} bytes, more than the "
            f"{EXEC_BUDGET} hpk allows (Linux starts no program whose arguments and "
            "environment exceed ARG_MAX, and the job's own environment needs room too); "
            "pass large data in a file, such as a configMap volume",
        )


def _check_text(text: str, where: str, *, controls: bool = False) -> None:
    """Text that must reach a process unchanged: no NUL, valid UTF-8, and maybe no control
    characters (paths and names may not hold newlines; values and arguments may)."""
    if "\0" in text:
        raise InvalidPodSpec(where, "holds a NUL character, which no process can receive")
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise InvalidPodSpec(where, "is not valid Unicode text") from error
    if not controls and _has_control(text):
        raise InvalidPodSpec(where, "holds a control character")


def _check_bind_path(path: str, where: str) -> None:
    _check_text(path, where)
    problem = bind_path_problem(path)
    if problem:
        raise InvalidPodSpec(where, problem)
