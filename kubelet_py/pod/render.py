"""A pod, rendered into its Slurm job: the job script, sbatch's arguments, and the files beside
the script that hold what must never be in it (the containers' environment).

This is the entry point of rendering, and where each container becomes one launch of the
job script. The pod spec is read through the modules beside it, one concern each:
kubelet_py.pod.fields (which fields hpk accepts, and the shared checks),
kubelet_py.pod.environment (env, envFrom and `$(VAR)`), kubelet_py.pod.mounts (volumes and
volumeMounts as binds) and kubelet_py.pod.command (ENTRYPOINT and CMD against command and
args). sbatch's argv is built here and returned, never run: the Slurm adapter submits it.

The job script follows the contract in docs/kubelet.md ("The job script"). Every value it
interpolates goes through the template's `sh` filter.

Pure: the pod (a dict shaped like the API's JSON), the settings and the resolved inputs in,
text out. The only I/O is Jinja2 reading the template, through hpk.templating.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePosixPath
from types import MappingProxyType

from hpk.apptainer import bind_path_problem
from hpk.images import NATIVE_IMAGE, ImageConfig, InvalidImageReference, normalize_reference
from hpk.templating import render
from kubelet_py.errors import ImageNotResolved, InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.job.hooks import POST_START
from kubelet_py.job.podfolder import (
    ENV_DIR,
    ETC_DIR,
    HANDSHAKE_FIFO,
    HANDSHAKE_HOOK,
    HOOKS_DIR,
    JOB_SCRIPT,
    NETWORK,
    NETWORK_CONFIG,
    PROBES_DIR,
    SLURM_OUTPUT,
)
from kubelet_py.job.termination import HOOK_PATH, READY_PATH
from kubelet_py.pod.command import check_exec_size, container_argv, written_words
from kubelet_py.pod.environment import (
    container_environment,
    env_file,
    expand,
    service_variables,
    warn_of_secrets_in_words,
)
from kubelet_py.pod.fields import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    OBJECT_UID,
    check_container_fields,
    check_pod_fields,
    check_text,
    check_unique_names,
    checked_name,
    containers_of,
    has_control,
)
from kubelet_py.pod.flags import ANNOTATION, FIELD, SbatchOption, merge_options, parse_flags
from kubelet_py.pod.hook_spec import hooks_file
from kubelet_py.pod.inputs import PodInputs
from kubelet_py.pod.mounts import container_binds, pod_volumes, sub_path_dirs, volume_dirs
from kubelet_py.pod.network import (
    LAUNCHER_ANNOTATION,
    PodAddress,
    PodNetworkSettings,
    hosts_file,
    network_config,
    pod_hostname,
    resolv_conf,
    wants_pod_network,
)
from kubelet_py.pod.probe_spec import PROBE_FIELDS, probes_file
from kubelet_py.pod.resources import container_resources, resource_options
from kubelet_py.pod.security import NOT_HONOURED, JobUser, check_pod_context, container_identity
from kubelet_py.pod.storage import ClaimSource, StorageVolumes

TEMPLATE = "pod.sbatch.j2"
JOB_NAME_PREFIX = "hpk/"
"""A pod's job is named <prefix><namespace>/<pod name>."""
DEFAULT_WORKING_DIR = "/"
"""Where a container starts without `workingDir`, when its image names no WORKDIR: Docker's
default (the job's own folder is hpk's, not the pod's)."""

LAUNCHER_FIELD = f"metadata.annotations[{LAUNCHER_ANNOTATION}]"

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
CONSOLE_FLAGS = (("stdin", "--stdin"), ("stdinOnce", "--stdin-once"), ("tty", "--tty"))
"""A container's input fields, and the launcher's flags for them (kubelet_py.job.attach)."""

PID_NAMESPACE = "--pid"
"""A container's own PID namespace, as Kubernetes gives each container: a process in it can
signal only its own container's processes. Without it every pod of the user shares the node's
PIDs, and a `kill(-1)` in one container (Argo's emissary sends one when it forwards a signal
after its child ended) stops every process the user has on the node, the control plane's
too."""

DEFAULT_GRACE_SECONDS = 30
"""Kubernetes' default terminationGracePeriodSeconds: how long a sidecar has between TERM and
KILL once the main containers have ended."""


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

    network: PodNetworkSettings | None = None
    """The pod network; None: every pod uses the node's network."""

    def __post_init__(self) -> None:
        for name in ("pod_dir", "apptainer", "python"):
            path = PurePosixPath(getattr(self, name))
            if not path.is_absolute() or has_control(str(path)):
                raise ValueError(f"setting {name} must be an absolute path, not {str(path)!r}")
            object.__setattr__(self, name, path)
        problem = bind_path_problem(str(self.pod_dir))
        if problem:
            raise ValueError(f"setting pod_dir {problem}")
        resolved: dict[str, PurePosixPath] = {}
        for reference, sif in self.images.items():
            path = PurePosixPath(sif)
            if not path.is_absolute() or has_control(str(path)):
                raise ValueError(f"setting images: {reference} must map to an absolute path")
            resolved[normalize_reference(reference)] = path
        object.__setattr__(self, "images", MappingProxyType(resolved))
        configs = {normalize_reference(ref): config for ref, config in self.image_configs.items()}
        object.__setattr__(self, "image_configs", MappingProxyType(configs))
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.partition):
            raise ValueError(f"setting partition {self.partition!r} is not a partition name")
        for node, address in self.node_addresses.items():
            if has_control(f"{node}{address}"):
                raise ValueError(f"setting node_addresses: {node!r} -> {address!r}")
        object.__setattr__(self, "node_addresses", MappingProxyType(dict(self.node_addresses)))
        if self.kubernetes_service is not None:
            host, port = self.kubernetes_service
            if not host or has_control(host) or not 0 < port < 65536:
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
    sub_paths: tuple[str, ...]
    """Folders of its subPaths, relative to the pod folder, made just before it starts."""
    termination_path: str
    """Its terminationMessagePath (kubelet_py.job.termination places the file there)."""
    arguments: tuple[str, ...]
    """The words after the SIF file (see `container_argv`)."""
    node_ip_env: tuple[tuple[str, str], ...] = ()
    """Variables the script sets where it runs, each with the script's variable: `node_ip`
    (`status.hostIP`) or `pod_ip` (`status.podIP`)."""
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
    console: tuple[str, ...] = ()
    """The launcher's flags for the container's input: `--stdin`, `--stdin-once`, `--tty`
    (kubelet_py.job.attach)."""
    hooks: str | None = None
    """The container's hooks file (kubelet_py.pod.hook_spec), None when it has no hooks."""
    post_start: bool = False
    """It has a postStart hook: the next container starts once the hook has passed (or the
    run has ended), as Kubernetes starts a pod's containers one after another."""


def render_pod(
    pod: Mapping[str, object],
    settings: RenderSettings,
    *,
    inputs: PodInputs | None = None,
    claims: Mapping[str, ClaimSource] | None = None,
    address: PodAddress | None = None,
) -> RenderedPod:
    """The job script, sbatch arguments and env files of `pod`.

    `inputs` holds what the pod reads from ConfigMaps and Secrets (kubelet_py.pod.inputs.resolve).
    Raises InvalidPodSpec (naming the field) for a pod hpk cannot run as asked, and
    ImageNotResolved when `settings.images` lacks one of its images; a reference `inputs` does
    not hold is the caller's error (ValueError). `claims` holds the volumes of the pod's
    persistentVolumeClaim volumes (kubelet_py.pod.storage.resolve_claims). `address` is the
    pod's on the pod network, for a pod that joins it (kubelet_py.pod.network); a pod that
    joins it without one is the caller's error (ValueError).
    """
    inputs = inputs or PodInputs()
    metadata = _mapping(pod.get("metadata"), "metadata")
    namespace = checked_name(metadata.get("namespace"), "metadata.namespace", DNS_LABEL)
    name = checked_name(metadata.get("name"), "metadata.name", DNS_SUBDOMAIN, longest=253)
    uid = checked_name(metadata.get("uid"), "metadata.uid", OBJECT_UID, longest=128)
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    spec = _mapping(pod.get("spec"), "spec")
    check_pod_fields(spec)
    pod_context = _mapping(spec.get("securityContext"), "spec.securityContext")
    not_honoured = list(check_pod_context(pod_context, job_user=settings.job_user))

    flags_text = annotations.get(ANNOTATION, "")
    if not isinstance(flags_text, str):
        raise InvalidPodSpec(FIELD, "must be a string")
    requested = parse_flags(flags_text, allow_mail=settings.allow_mail_flags)
    storage = StorageVolumes(claims=claims or {})
    volumes, config_volumes = pod_volumes(spec, storage=storage)
    unresolved = sorted(config_volumes - set(inputs.volumes))
    if unresolved:
        raise ValueError(f"volume {unresolved[0]}: its ConfigMap or Secret was not resolved")
    init = containers_of(spec, "initContainers")
    main = containers_of(spec, "containers")
    if not main:
        raise InvalidPodSpec("spec.containers", "a pod needs at least one container")
    check_unique_names(init, main)
    srun_name = srun_container(annotations.get(LAUNCHER_ANNOTATION), main)
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
                and not (key == "containers" and container.get("name") == srun_name),
                storage=storage,
                warnings=warnings,
                not_honoured=not_honoured,
            )
            restart, grace = _restart(container, where, init=key == "initContainers", spec=spec)
            launch = replace(launch, restart=restart, sidecar=grace is not None, grace=grace)
            if key == "containers" and launch.name == srun_name:
                launch = _srun_launch(launch, container, where)
            launches[key].append(launch)
            if environment is not None:
                files[f"{ENV_DIR}/{launch.name}"] = environment
            launches[key][-1] = _with_probes_and_hooks(
                launch,
                container,
                where,
                spec=spec,
                settings=settings,
                files=files,
                warnings=warnings,
            )

    joins = _join_network(pod, settings, address, files, warnings)
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
        volume_dirs=sorted(volume_dirs(volumes, config_volumes, managed=storage.managed)),
        storage=storage.plan(),
        open_volume_dirs=any(
            "--security" in launch.options for group in launches.values() for launch in group
        ),
        init=launches["initContainers"],
        main=launches["containers"],
        node_ips=_node_ips(settings, launches["initContainers"] + launches["containers"]),
        network=joins,
        job_user=settings.job_user,
        handshake={
            "fifo": HANDSHAKE_FIFO,
            "fifo_at": READY_PATH,
            "hook": HANDSHAKE_HOOK,
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


NODE_NETWORK = "NodeNetwork"
"""The reason of the Warning for fields a pod on its node's network goes without."""
NODE_NETWORK_FIELDS = ("hostname", "subdomain", "hostAliases", "dnsConfig", "setHostnameAsFQDN")
"""Fields honoured on the pod network alone: a pod on its node's network has the node's
name, /etc/hosts and resolv.conf."""


@dataclass(frozen=True)
class PodNetworkFiles:
    """What the job script needs of a pod on the pod network (the template's view)."""

    config: str
    """Its network file, relative to the pod folder."""
    hosts: str
    resolv: str | None
    """Its /etc/hosts and /etc/resolv.conf, relative to the pod folder (resolv: None keeps
    the node's, for dnsPolicy Default)."""
    hostname: str
    address: str
    """Its address, for `status.podIP` fieldRefs."""


def _join_network(
    pod: Mapping[str, object],
    settings: RenderSettings,
    address: PodAddress | None,
    files: dict[str, str],
    warnings: list[tuple[str, str]],
) -> PodNetworkFiles | None:
    """The pod's network files, which go into `files`, when it joins the pod network; None
    (with a warning for what is then not honoured) when it does not."""
    spec = _mapping(pod.get("spec"), "spec")
    if settings.network is None or not wants_pod_network(pod):
        given = [name for name in NODE_NETWORK_FIELDS if spec.get(name)]
        if spec.get("dnsPolicy") == "None":
            given.append("dnsPolicy None")
        if given:
            message = f"{', '.join(given)}: not honoured, the pod uses its node's network"
            warnings.append((NODE_NETWORK, message))
        return None
    if address is None:
        raise ValueError("a pod that joins the pod network needs its address")
    network = settings.network
    files[NETWORK_CONFIG] = network_config(network, address, marker=settings.pod_dir / NETWORK)
    hosts = f"{ETC_DIR}/hosts"
    files[hosts] = hosts_file(pod, address.ip, domain=network.cluster_domain)
    resolv = resolv_conf(pod, network)
    if resolv is not None:
        files[f"{ETC_DIR}/resolv.conf"] = resolv
    hostname, fqdn = pod_hostname(pod, domain=network.cluster_domain)
    if fqdn and spec.get("setHostnameAsFQDN") is True:
        hostname = fqdn
    return PodNetworkFiles(
        config=NETWORK_CONFIG,
        hosts=hosts,
        resolv=f"{ETC_DIR}/resolv.conf" if resolv is not None else None,
        hostname=hostname,
        address=address.ip,
    )


def _with_probes_and_hooks(
    launch: ContainerLaunch,
    container: Mapping[str, object],
    where: str,
    *,
    spec: Mapping[str, object],
    settings: RenderSettings,
    files: dict[str, str],
    warnings: list[tuple[str, str]],
) -> ContainerLaunch:
    """`launch` with the files its launcher reads besides the command: its probes and its
    lifecycle hooks (which go into `files`)."""
    launch = _with_probes(launch, container, where, spec=spec, settings=settings, files=files)
    return _with_hooks(
        launch, container, where, spec=spec, settings=settings, files=files, warnings=warnings
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
    init = where.startswith("spec.initContainers") and not launch.sidecar
    text = probes_file(container, where, grace=_grace(spec), init=init)
    if text is None:
        return launch
    for key in PROBE_FIELDS:
        if launch.srun and "exec" in _mapping(container.get(key), f"{where}.{key}"):
            raise InvalidPodSpec(f"{where}.{key}.exec", "srun containers have no exec probes")
    files[f"{PROBES_DIR}/{launch.name}"] = text
    return replace(launch, probes=str(settings.pod_dir / PROBES_DIR / launch.name))


def _srun_launch(
    launch: ContainerLaunch, container: Mapping[str, object], where: str
) -> ContainerLaunch:
    """The launch of the container srun starts on every task, which has no input."""
    asked = [field for field, _ in CONSOLE_FLAGS if container.get(field) is True]
    if asked:
        raise InvalidPodSpec(
            f"{where}.{asked[0]}",
            "srun starts this container on every task: it has no input to attach to",
        )
    return replace(launch, srun=True)


def _with_hooks(
    launch: ContainerLaunch,
    container: Mapping[str, object],
    where: str,
    *,
    spec: Mapping[str, object],
    settings: RenderSettings,
    files: dict[str, str],
    warnings: list[tuple[str, str]],
) -> ContainerLaunch:
    """`launch` with its hooks file, which goes into `files`; as it is without hooks."""
    init = where.startswith("spec.initContainers") and not launch.sidecar
    text, ignored = hooks_file(container, where, grace=_grace(spec), init=init, srun=launch.srun)
    warnings += ignored
    if text is None:
        return launch
    files[f"{HOOKS_DIR}/{launch.name}"] = text
    return replace(
        launch,
        hooks=str(settings.pod_dir / HOOKS_DIR / launch.name),
        post_start=POST_START in json.loads(text),
    )


def _grace(spec: Mapping[str, object]) -> int:
    """The pod's terminationGracePeriodSeconds (Kubernetes' 30 s without one)."""
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise InvalidPodSpec(
            "spec.terminationGracePeriodSeconds", f"{grace!r} is no number of seconds"
        )
    return grace


def srun_container(value: object, main: Sequence[Mapping[str, object]]) -> str | None:
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
    check_container_fields(container, where)
    name = checked_name(container.get("name"), f"{where}.name", DNS_LABEL)
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

    variables, node_ip_env, secret = container_environment(
        container,
        where,
        pod=pod,
        inputs=inputs,
        warnings=warnings,
        base={
            # As container runtimes give a container on a terminal.
            **({"TERM": "xterm"} if container.get("tty") is True else {}),
            **inputs.service_links,
            **service_variables(settings.kubernetes_service),
        },
    )
    written = {key: written_words(container, key, where) for key in ("command", "args")}
    command = [expand(word, variables) for word in written["command"]]
    arguments = [expand(word, variables) for word in written["args"]]
    warn_of_secrets_in_words(written, where, variables, secret, warnings)
    config = settings.image_configs.get(image, NATIVE_IMAGE)
    action, argv = container_argv(command=command, args=arguments, config=config)
    if action == "exec" and not argv:
        raise InvalidPodSpec(
            f"{where}.command", f"image {image} has no ENTRYPOINT or CMD, so the pod must give one"
        )
    for word in argv:  # the pod's words are checked already; these may be the image's
        check_text(word, f"{where}.image", controls=True)
    check_exec_size(where, command=command, arguments=arguments, argv=argv, env=variables)
    working_dir = container.get("workingDir") or config.working_dir or DEFAULT_WORKING_DIR
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise InvalidPodSpec(f"{where}.workingDir", "must be an absolute path")
    check_text(working_dir, f"{where}.workingDir")

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
            container_binds(
                container,
                where=where,
                volumes=volumes,
                config_volumes=config_volumes,
                inputs=inputs,
                pod_dir=settings.pod_dir,
                read_only=storage.read_only,
            )
        ),
        sub_paths=sub_path_dirs(volumes, config_volumes, container),
        termination_path=_termination_path(container, where),
        arguments=tuple(argv),
        node_ip_env=tuple(node_ip_env),
        console=tuple(flag for key, flag in CONSOLE_FLAGS if container.get(key) is True),
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
    check_text(path, f"{where}.terminationMessagePath")
    return path


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
    return "Always", _grace(spec)


def _asks_for_gpus(option: SbatchOption) -> bool:
    if option.name == "gres":
        return "gpu" in (option.value or "")
    return option.name.startswith("gpus")
