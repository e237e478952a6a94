"""The provider boundary: what the pod controller asks of whatever runs pods.

`PodLifecycleHandler` is the interface (modelled on virtual-kubelet's); `SlurmProvider` runs
each pod as one Slurm job. It owns the pod folders (`<hpk home>/pods/<namespace>/<name>/`),
resolves what the pod reads from ConfigMaps and Secrets (kubelet_py.pod.inputs, through an
injected lookup) and its projected and downwardAPI volumes (kubelet_py.pod.projected), has their
service-account tokens issued and kept fresh by an injected TokenManager, renders with
kubelet_py.pod.render, submits and cancels through the Slurm adapter and reads job states from
the shared JobWatcher. It never talks to the API server itself: the controller does, and the
entry point wires the lookup and the token manager.

Which Slurm jobs are this kubelet's: a job whose comment is `hpk-uid=<pod UID>` and whose
working folder (`--chdir`, the pod folder) is `<pods_dir>/<namespace>/<name>`, with the job
name `hpk/<namespace>/<name>` to match. The comment alone is not enough: one user may run
two hpk clusters (two hpk homes) on the same Slurm, and each must leave the other's jobs be.

A job ID the kubelet did not get from sbatch itself is only a hint: the `slurm.hpk.io/job-id`
annotation is written by whoever wrote the pod (a chart, a workflow), and the pod folder's
`job-id` file is in reach of the pod's containers. Before such a job is adopted, watched,
signalled or cancelled, Slurm is asked for its name, comment and folder, and all three must
be this pod's (`_disproof`); otherwise the pod gets a Warning Event (`JobNotOwned`, or
`InvalidJobId` for a value that is no job ID) and is submitted as usual. A job that has left
squeue is looked up in sacct, which keeps the comment only with
`AccountingStoreFlags=job_comment`; without it, a finished job whose name and folder match is
taken as the pod's: it can no longer be signalled or cancelled, and the folder is this pod's
name in this hpk home, so at worst the pod reads the end of an earlier pod of its name.
The watcher's squeue answer carries the same three fields, so a job ID that comes to name
another job (Slurm starts counting again when its state is wiped) turns LOST for the pod
(`_view`) and is never signalled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from hpk.images import ImageConfig, InvalidImageReference
from kubelet_py.adapters.hub import Hub, HubUnavailable, new_private_key, public_key
from kubelet_py.adapters.slurm import FINAL_STATES, JOB_ID, ListedJob, SlurmError, SlurmUnavailable
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.job import podfiles
from kubelet_py.job.hooks import FAILED_REASONS, POST_START, PRE_STOP, TITLES
from kubelet_py.job.network import NetworkConfig
from kubelet_py.job.podfolder import PodFolder
from kubelet_py.loops.pulls import ImagePuller, ImageWaiting, PullSettings, pull_policy
from kubelet_py.loops.stats import RunningContainer, RunningPod
from kubelet_py.loops.watcher import LOST, WAITING_STATES, JobView
from kubelet_py.pod import projected
from kubelet_py.pod.environment import service_links
from kubelet_py.pod.inputs import ObjectLookup, PodInputs, needs_node_address, resolve
from kubelet_py.pod.network import AddressPool, PodAddress, PodNetworkSettings, wants_pod_network
from kubelet_py.pod.render import JOB_NAME_PREFIX, RenderSettings, render_pod
from kubelet_py.pod.status import ContainerMarkers, pod_status, read_markers
from kubelet_py.pod.storage import read_failure, resolve_claims, with_failure
from kubelet_py.pod.streams import StreamTarget

if TYPE_CHECKING:  # the manager is given; importing it would pull in the API client
    from kubelet_py.loops.tokens import IssuedToken, TokenManager

log = logging.getLogger(__name__)

JOB_ID_ANNOTATION = "slurm.hpk.io/job-id"
"""The pod annotation that carries its Slurm job's ID once it was submitted."""

UID_COMMENT = "hpk-uid="
"""The start of the --comment of every job the kubelet submits (followed by the pod's UID)."""

NOT_OWNED = "JobNotOwned"
"""The reason of the Warning Event for a job ID, on the pod or in its folder, of a job that
is not the pod's own."""

INVALID_JOB_ID = "InvalidJobId"
"""The reason of the Warning Event for a job-id annotation that is no Slurm job ID."""

JSON = dict[str, Any]


NETWORK_FALLBACK = "PodNetworkUnavailable"
"""The reason of the Event, and of the nodes' condition, when a node refused a pod its own
network namespace or device."""


def pod_key(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"


class JobState(Protocol):
    """What a provider tells of a pod's job once its backend lists it. The Slurm provider
    answers with the watcher's kubelet_py.loops.watcher.JobView, which says much more in
    Slurm's terms; the controller needs only to know that there is an answer."""

    @property
    def job_id(self) -> str:
        """The backend's ID of the job."""

    @property
    def final(self) -> bool:
        """Whether the backend will do nothing more with the job."""


class PodLifecycleHandler(Protocol):
    """What the pod controller needs from a pod provider: all it calls, and nothing of the
    backend behind it (errors are kubelet_py.errors' backend-neutral ones)."""

    def create_pod(self, pod: Mapping[str, Any], *, partition: str | None = None) -> str:
        """Start the pod (or adopt the job it already has) and return its job's ID.

        `partition` is where the pod's node sends its work (a Slurm partition here). Never
        starts a second job for a pod that has one. Raises InvalidPodSpec, ImageNotResolved
        or SubmissionRefused for a pod that cannot run (final), MissingReference while a
        ConfigMap, Secret or key it needs does not exist, or while one of its images is
        pulled or cannot be (ImageWaiting; nothing is submitted), and BackendError when it
        should be tried again later.
        """

    def update_pod(self, pod: Mapping[str, Any]) -> None:
        """Take note of a newer version of a known pod; a running job is not changed."""

    def delete_pod(self, pod: Mapping[str, Any], *, kill: bool = False) -> bool:
        """Ask the pod's job to stop and return whether it has ended.

        The first call sends the job the first signal (TERM), a call with `kill` sends KILL;
        a signal already sent is not sent again, and a job that has not started is cancelled
        outright. The job stays watched (and `notify_pods` callbacks keep coming) until
        `forget`. Idempotent: a pod without a job, or whose job has ended, returns True.
        Raises BackendError when it should be tried again later.
        """

    def forget(self, pod: Mapping[str, Any]) -> None:
        """Stop tracking the pod and its job. Idempotent."""

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        """The pod as the provider last saw it, or None if it does not know it."""

    def get_pod_status(self, namespace: str, name: str) -> JSON | None:
        """The pod's status from its job and its containers' markers; None if unknown."""

    def get_pods(self) -> list[JSON]:
        """Every pod the provider runs or ran and has not forgotten."""

    def notify_pods(self, callback: Callable[[str], None]) -> None:
        """Have `callback(pod key)` called whenever a pod's job changes. Must not block."""

    def job_id(self, key: str) -> str | None:
        """The ID of the job of the pod `key` (`namespace/name`) the provider tracks; None
        for a pod it does not know."""

    def job_view(self, key: str) -> JobState | None:
        """What the backend last told of the pod's job; None before it listed the job (the
        controller writes no status until then: a restart must not set a pod back)."""

    def adopted(self, key: str) -> str | None:
        """Where the pod's job was found when it was adopted ("annotation", "pod folder",
        "Slurm comment"); None for a job this kubelet submitted, or an unknown pod."""

    def take_warnings(self, key: str) -> tuple[tuple[str, str], ...]:
        """(reason, message) of each Warning Event the pod is owed (what its submission left
        out, a job ID on it that was not its own, a lifecycle hook that failed); each is
        handed out once."""

    def sweep_orphans(
        self,
        live_uids: Callable[[], Collection[str]],
        *,
        gone: Callable[[str, str], bool] = lambda _key, _uid: True,
    ) -> list[str]:
        """Cancel this kubelet's jobs that are not over and whose pod no longer exists.

        `live_uids` gives the UIDs of the pods known to exist; it is called after the
        backend was asked, so a pod created meanwhile is in it. A job whose pod is not among
        them is cancelled only if `gone(pod key, uid)` confirms it. Returns the IDs of the
        cancelled jobs. Raises BackendError when it should be tried again later.
        """


class JobRunner(Protocol):
    """What the provider needs from the Slurm adapter (kubelet_py.adapters.slurm.SlurmClient)."""

    def submit(
        self, script: Path, argv_flags: Any, *, env: Mapping[str, str] | None = None
    ) -> str: ...

    def cancel(
        self, job_id: str, *, signal: str | None = None, batch_only: bool = False
    ) -> None: ...

    def listed_jobs(self, comment_prefix: str) -> dict[str, ListedJob]: ...

    def identify(self, job_ids: Iterable[str]) -> dict[str, ListedJob]: ...


class JobTracker(Protocol):
    """What the provider needs from the shared watcher (kubelet_py.loops.watcher.JobWatcher)."""

    def register(self, job_id: str, key: str) -> None: ...

    def forget(self, job_id: str) -> None: ...

    def view(self, job_id: str) -> JobView | None: ...


@dataclass(frozen=True)
class ProviderSettings:
    """Where the provider keeps pods and what their jobs run with."""

    pods_dir: Path
    """`<hpk home>/pods`: one folder per pod below `<namespace>/<name>`, on the shared
    filesystem."""

    apptainer: PurePosixPath
    """The Apptainer binary the jobs run."""

    image_cache: Path | None = None
    """The image cache the pods' images come from; None: the user's default cache."""

    python: PurePosixPath | None = None
    """The interpreter the jobs run kubelet_py.job.launch with; None: this one."""

    cancel_signal: str = "TERM"
    """The signal a deleted pod's job gets first; KILL follows when the pod's grace period
    is over (the controller keeps the time)."""

    node_addresses: Mapping[str, str] = field(default_factory=dict)
    """Slurm node name -> address, for hostIP and podIP."""

    kubernetes_service: tuple[str, int] | None = None
    """The API server as pods reach it (host, port), for their KUBERNETES_SERVICE_* variables;
    None: the containers get none."""

    insecure_registries: tuple[str, ...] = ()
    """Registries pulled from over plain HTTP, besides those on the loopback."""

    allow_mail_flags: bool = False
    """Whether pods may ask Slurm for mail through their flags annotation."""

    network: PodNetworkSettings | None = None
    """The pod network (kubelet_py.pod.network); None: every pod uses the node's network."""

    hub_control: Path | None = None
    """The pod network hub's control socket (kubelet_py.adapters.hub), with `network`."""


@dataclass
class _Known:
    pod: Mapping[str, Any]
    uid: str
    job_id: str
    folder: Path
    adopted: str | None = None
    """Where the job was found ("annotation", "pod folder", "Slurm comment"); None: this
    kubelet submitted it."""
    address: str | None = None
    """The pod's address on the pod network; None on the node's network."""
    network: tuple[str, str] | None = None
    """What its job reported of its network (`pod` or `host`, and why), once it has."""
    hook_failures: set[tuple[str, str, str]] = field(default_factory=set)
    """(container, hook, time) of each failed hook its Warning Event was owed for."""


class SlurmProvider:
    """Runs each pod as one Slurm job (see the module docstring)."""

    def __init__(
        self,
        *,
        slurm: JobRunner,
        watcher: JobTracker,
        settings: ProviderSettings,
        lookup: ObjectLookup | None = None,
        tokens: TokenManager | None = None,
        images: ImagePuller | None = None,
        services: Callable[[str], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.slurm = slurm
        self.services = services
        """Namespace -> its Services, for the variables of `enableServiceLinks`; without it
        pods get none."""
        self.tokens = tokens
        """Issues and refreshes the service-account tokens of projected volumes; without one,
        a pod that needs a token is refused."""
        self.lookup: ObjectLookup = lookup or _nothing
        """(kind, namespace, name) -> a ConfigMap or Secret, None when it does not exist; the
        entry point asks the API server. Without one, no object exists."""
        self.watcher = watcher
        self.settings = settings
        self._lock = threading.Lock()
        self._pods: dict[str, _Known] = {}
        self._signalled: dict[str, str] = {}
        self._callbacks: list[Callable[[str], None]] = []
        self._warnings: dict[str, tuple[tuple[str, str], ...]] = {}
        self._owned: dict[str, str] = {}
        """Pod UID -> the job proven its own by Slurm (for pods deleted before they were
        known), so that each step of a deletion does not ask again."""
        self._refused: dict[str, set[str]] = {}
        """Pod UID -> the job IDs found on it that were refused, each warned about once."""
        self.images = images or ImagePuller(
            cache_dir=settings.image_cache,
            apptainer=str(settings.apptainer),
            notify=self._ready,
            settings=PullSettings(insecure_registries=settings.insecure_registries),
        )
        """Resolves the pods' images, pulling in the background; a finished pull hands its
        pods to the `notify_pods` callbacks."""
        self.addresses: AddressPool | None = None
        self.hub: Hub | None = None
        if settings.network is not None:
            if settings.hub_control is None:
                raise ValueError("settings: the pod network needs hub_control")
            self.addresses = AddressPool(settings.network.pod_cidr)
            self.hub = Hub(settings.hub_control)
        self._keys: dict[str, str] = {}
        """Pod UID -> the public key the hub knows it by."""
        self._network_fallback: str | None = None
        """The last job's report that its node refused it the pod network; None after a
        later job had it."""

    def folder(self, namespace: str, name: str) -> Path:
        return self.settings.pods_dir / namespace / name

    # -- the handler ----------------------------------------------------------------------

    def create_pod(self, pod: Mapping[str, Any], *, partition: str | None = None) -> str:
        metadata = pod.get("metadata") or {}
        namespace = str(metadata.get("namespace", ""))
        name = str(metadata.get("name", ""))
        uid = str(metadata.get("uid", ""))
        key = f"{namespace}/{name}"
        if not namespace or not name or not uid or "/" in namespace + name:
            raise ValueError(f"pod {key!r} lacks a namespace, name or uid")
        folder = self.folder(namespace, name)
        with self._lock:
            known = self._pods.get(key)
        if known is not None and known.uid == uid:
            return known.job_id  # submitted or proven already

        annotated = (metadata.get("annotations") or {}).get(JOB_ID_ANNOTATION)
        if annotated is not None and self._proven(pod, annotated, where="annotation"):
            return self._adopt(pod, str(annotated), folder, how="annotation")
        if self._claim_folder(folder, uid, key):
            recorded = PodFolder(folder).read_job_id()
            if recorded and self._proven(pod, recorded, where="pod folder"):
                return self._adopt(pod, recorded, folder, how="pod folder")
            # Our folder from an earlier attempt, without a job ID: the answer of a
            # submission may have been lost (sbatch timed out, or the kubelet was killed).
            # A folder made just now needs no look: the uid file is written before sbatch.
            queued = [
                job
                for job in self.slurm.listed_jobs(f"{UID_COMMENT}{uid}").values()
                if self._disproof(pod, job) is None
            ]
            if queued:
                job_id = max((job.job_id for job in queued), key=_job_number)
                PodFolder(folder).write_job_id(job_id)
                return self._adopt(pod, job_id, folder, how="Slurm comment")

        images, configs, image_warnings = self._resolve_images(key, pod)
        inputs = resolve(pod, self.lookup)
        made = projected.resolve(pod, self.lookup)
        # Every wait (a missing object, an unbound claim) comes before the tokens and the
        # pod's address, so a pod that waits asks for no token and registers no key on each try.
        claims = resolve_claims(pod, self.lookup)
        tokens = self._issue(pod, made.tokens)
        inputs = projected.with_tokens(
            inputs, made, {source: token.token for source, token in tokens.items()}
        )
        address = self._address(pod)
        inputs = self._with_service_links(pod, inputs, address)
        render_settings = RenderSettings(
            pod_dir=PurePosixPath(folder),
            apptainer=self.settings.apptainer,
            images=images,
            image_configs=configs,
            partition=partition,
            node_addresses=(
                _addresses(self.settings.node_addresses) if needs_node_address(pod) else {}
            ),
            kubernetes_service=self._kubernetes_service(address),
            allow_mail_flags=self.settings.allow_mail_flags,
            network=self.settings.network,
        )
        if self.settings.python:
            render_settings = replace(render_settings, python=self.settings.python)
        rendered = render_pod(pod, render_settings, inputs=inputs, claims=claims, address=address)
        warnings = (*image_warnings, *rendered.warnings)
        for _reason, warning in warnings:
            log.warning("%s: %s", key, warning)
        _write_volumes(folder, inputs)
        for relative, text in rendered.files.items():
            path = folder / relative
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            podfiles.write_text(path, text, 0o600)
        script = Path(rendered.sbatch_args[-1])
        podfiles.write_text(script, rendered.script, 0o700)
        job_id = self.slurm.submit(script, list(rendered.sbatch_args[:-1]))
        PodFolder(folder).write_job_id(job_id)
        log.info("%s: job %s submitted", key, job_id)
        self._remember(key, pod, uid, job_id, folder, address=address.ip if address else None)
        self._keep_fresh(pod, folder, tokens)
        self.images.forget(key)
        if warnings:
            with self._lock:
                self._warnings[key] = (*self._warnings.get(key, ()), *warnings)
        return job_id

    def update_pod(self, pod: Mapping[str, Any]) -> None:
        with self._lock:
            known = self._pods.get(pod_key(pod))
            if known is not None and known.uid == _uid(pod):
                known.pod = pod

    def delete_pod(self, pod: Mapping[str, Any], *, kill: bool = False) -> bool:
        key = pod_key(pod)
        job_id = self._job_of(pod)
        if job_id is None:
            log.info("%s: no job to stop", key)
            return True
        self.watcher.register(job_id, key)  # to hear when it has ended
        view = self._view(job_id, pod)
        if view is not None and view.final:
            log.info("%s: job %s has ended (%s)", key, job_id, view.state)
            return True
        signal = "KILL" if kill else self.settings.cancel_signal
        with self._lock:
            sent = self._signalled.get(job_id)
        if sent in (signal, "KILL"):
            return False
        if view is not None and view.state in WAITING_STATES:
            # Nothing runs yet, so nothing to stop gently; and a job cancelled before it
            # started has ended the moment scancel returns.
            self.slurm.cancel(job_id)
            log.info("%s: job %s cancelled before it started", key, job_id)
            return True
        try:
            # TERM to the job script alone: its trap passes it to each container's launcher,
            # which runs the container's preStop hook before it passes it on (with --full,
            # slurmstepd would signal every process of the job at once). KILL ends them all.
            self.slurm.cancel(job_id, signal=signal, batch_only=signal != "KILL")
        except SlurmUnavailable:
            raise
        except SlurmError as error:
            # Slurm refuses to signal a job that has not started; cancel it instead.
            log.info("%s: job %s: %s; cancelling it", key, job_id, error)
            self.slurm.cancel(job_id)
            return True
        with self._lock:
            self._signalled[job_id] = signal
        log.info("%s: job %s sent %s", key, job_id, signal)
        return False

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        with self._lock:
            known = self._pods.get(f"{namespace}/{name}")
        return dict(known.pod) if known else None

    def get_pod_status(self, namespace: str, name: str) -> JSON | None:
        with self._lock:
            known = self._pods.get(f"{namespace}/{name}")
        if known is None:
            return None
        pod_ip = None  # the node's
        if known.address:
            network = self._network_of(known)
            pod_ip = "" if network is None else known.address if network[0] == "pod" else None
        markers = read_markers(known.folder)
        self._hook_warnings(known, markers)
        status = pod_status(
            known.pod.get("spec") or {},
            self._view(known.job_id, known.pod),
            markers,
            node_addresses=self.settings.node_addresses,
            pod_ip=pod_ip,
        )
        # A job its storage ended (a hostPath check, an emptyDir over its sizeLimit) says why.
        return with_failure(status, read_failure(known.folder))

    def _hook_warnings(self, known: _Known, markers: Mapping[str, ContainerMarkers]) -> None:
        """A Warning Event (FailedPostStartHook, FailedPreStopHook) for each hook failure its
        launcher wrote that the pod has not been warned of; without the hook's output, which
        may hold what the pod keeps from its readers (as Kubernetes leaves it out)."""
        key = pod_key(known.pod)
        found = []
        for name, marker in sorted(markers.items()):
            for hook, failure in (
                (POST_START, marker.post_start_failure),
                (PRE_STOP, marker.pre_stop_failure),
            ):
                if failure is None or (name, hook, failure.stamp) in known.hook_failures:
                    continue
                message = f"container {name}: {TITLES[hook]} failed: {failure.summary}"
                found.append(((name, hook, failure.stamp), (FAILED_REASONS[hook], message)))
        if not found:
            return
        with self._lock:
            for seen, warning in found:
                known.hook_failures.add(seen)
                self._warnings[key] = (*self._warnings.get(key, ()), warning)
        for _, (_, message) in found:
            log.warning("%s: job %s: %s", key, known.job_id, message)

    def get_pods(self) -> list[JSON]:
        with self._lock:
            return [dict(known.pod) for known in self._pods.values()]

    def notify_pods(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    # -- for the controller ---------------------------------------------------------------

    def job_id(self, key: str) -> str | None:
        with self._lock:
            known = self._pods.get(key)
        return known.job_id if known else None

    def adopted(self, key: str) -> str | None:
        """Where the pod's job was found when it was adopted ("annotation", "pod folder",
        "Slurm comment"); None for a job this kubelet submitted, or an unknown pod."""
        with self._lock:
            known = self._pods.get(key)
        return known.adopted if known else None

    def take_warnings(self, key: str) -> tuple[tuple[str, str], ...]:
        """(reason, message) of what the submission of the pod's job left out, as Kubernetes
        leaves it out; each is handed out once."""
        with self._lock:
            return self._warnings.pop(key, ())

    def job_changed(self, key: str, view: JobView) -> None:
        """The watcher's callback: pass the change on to whoever asked through notify_pods."""
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(key)

    def running_folders(self) -> list[tuple[str, Path]]:
        """(key, pod folder) of the pods whose job runs now: where containers may restart
        while Slurm's state stays the same (kubelet_py.loops.markerwatch looks at them)."""
        with self._lock:
            known = [(key, pod) for key, pod in self._pods.items()]
        running = []
        for key, pod in known:
            view, folder = self._view(pod.job_id, pod.pod), pod.folder
            if view is not None and not view.final and view.state not in WAITING_STATES:
                running.append((key, folder))
        return running

    def running_pods(self) -> list[RunningPod]:
        """The pods whose job runs now, each with its containers whose current run has
        started and not ended (from their markers): what kubelet_py.loops.stats measures."""
        with self._lock:
            known = list(self._pods.values())
        running = []
        for pod in known:
            view = self._view(pod.job_id, pod.pod)
            if view is None or view.final or view.state in WAITING_STATES:
                continue
            metadata = pod.pod.get("metadata") or {}
            spec = pod.pod.get("spec") or {}
            names = {
                str(container.get("name", ""))
                for group in ("initContainers", "containers")
                for container in spec.get(group) or ()
            }
            containers = tuple(
                RunningContainer(name=name, started_at=markers.started_at)
                for name, markers in read_markers(pod.folder).items()
                if name in names and markers.started_at is not None and markers.exit_code is None
            )
            running.append(
                RunningPod(
                    namespace=str(metadata.get("namespace", "")),
                    name=str(metadata.get("name", "")),
                    uid=pod.uid,
                    node=str(spec.get("nodeName") or ""),
                    job_id=pod.job_id,
                    folder=pod.folder,
                    started_at=view.start_time,
                    containers=containers,
                )
            )
        return running

    def markers_changed(self, key: str) -> None:
        """The marker watch's callback: the pod's containers wrote markers; like job_changed."""
        self._notify(key)

    def _ready(self, key: str) -> None:
        """A pull the pod waited for has ended: have it handled again."""
        self._notify(key)

    def _notify(self, key: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(key)

    def job_view(self, key: str) -> JobView | None:
        """What the watcher last learnt of the pod's job; None before Slurm listed it."""
        with self._lock:
            known = self._pods.get(key)
        return self._view(known.job_id, known.pod) if known else None

    def forget(self, pod: Mapping[str, Any]) -> None:
        """Stop tracking the pod and its job (over, or its pod deleted). Idempotent."""
        key = pod_key(pod)
        uid = _uid(pod)
        job_id = self._job_of(pod, ask=False)
        with self._lock:
            self._owned.pop(uid, None)
            self._refused.pop(uid, None)
            known = self._pods.get(key)
            if known is None or known.uid == uid:
                self._warnings.pop(key, None)
            if known is not None and known.uid == uid:
                del self._pods[key]
            if job_id is not None:
                self._signalled.pop(job_id, None)
        self.images.forget(key)
        if job_id is not None:
            self.watcher.forget(job_id)
        if self.tokens is not None:
            self.tokens.forget(key, uid)
        self._release(uid)

    def runs(self, key: str, uid: str) -> bool:
        """Whether the pod `key` with `uid` is known and its job has not ended (its tokens
        are then kept fresh)."""
        with self._lock:
            known = self._pods.get(key)
        if known is None or known.uid != uid:
            return False
        view = self._view(known.job_id, known.pod)
        return view is None or not view.final

    def sweep_orphans(
        self,
        live_uids: Callable[[], Collection[str]],
        *,
        gone: Callable[[str, str], bool] = lambda _key, _uid: True,
    ) -> list[str]:
        """Cancel this kubelet's jobs that are not over and whose pod no longer exists.

        `live_uids` gives the UIDs of the pods known to exist; it is called after Slurm was
        asked, so a pod created meanwhile is in it. A job whose pod is not among them is
        cancelled only if `gone(pod key, uid)` confirms it (the caller asks the API server:
        a pod the kubelet has not heard of yet, say one still waiting for its binding after a
        restart, must keep its job). Only jobs this kubelet submitted (see the module
        docstring) are touched. Returns the IDs of the cancelled jobs.
        """
        listed = self.slurm.listed_jobs(UID_COMMENT)
        alive = set(live_uids())
        with self._lock:
            alive.update(known.uid for known in self._pods.values())
        cancelled = []
        for job in sorted(listed.values(), key=lambda job: _job_number(job.job_id)):
            if job.state in FINAL_STATES or not self._owns(job):
                continue
            uid = (job.comment or "")[len(UID_COMMENT) :].strip()
            if uid in alive or not gone(job.name.removeprefix(JOB_NAME_PREFIX), uid):
                continue
            self.slurm.cancel(job.job_id)
            cancelled.append(job.job_id)
            log.info("%s: job %s cancelled: its pod (uid %s) is gone", job.name, job.job_id, uid)
        return cancelled

    # -- helpers --------------------------------------------------------------------------

    def _resolve_images(
        self, key: str, pod: Mapping[str, Any]
    ) -> tuple[dict[str, PurePosixPath], dict[str, ImageConfig], tuple[tuple[str, str], ...]]:
        """The SIF file and config of every image the pod names, each after its pull policy.

        Raises ImageWaiting (the pod waits) for the first image not ready; a pull started for
        one image does not hold back the pulls of the others. A reference Docker would not
        accept is left out: rendering names the field.
        """
        images: dict[str, PurePosixPath] = {}
        configs: dict[str, ImageConfig] = {}
        warnings: list[tuple[str, str]] = []
        waiting: ImageWaiting | None = None
        spec = pod.get("spec") or {}
        for group in ("initContainers", "containers"):
            for index, container in enumerate(spec.get(group) or []):
                reference = container.get("image") if isinstance(container, Mapping) else None
                if not isinstance(reference, str) or reference in images:
                    continue
                try:
                    policy = pull_policy(container, reference, where=f"spec.{group}[{index}]")
                    resolved = self.images.resolve(key, reference, policy)
                except InvalidImageReference:
                    continue
                except ImageWaiting as wait:
                    waiting = waiting or wait
                    continue
                images[reference] = PurePosixPath(resolved.sif)
                configs[reference] = resolved.config
                if resolved.warning:
                    warnings.append(("Failed", resolved.warning))
        if waiting is not None:
            raise waiting
        return images, configs, tuple(warnings)

    def _address(self, pod: Mapping[str, Any]) -> PodAddress | None:
        """A pod's address and key on the pod network, the hub told of them; None for a pod
        on the node's network. BackendError when the hub does not answer."""
        if self.addresses is None or self.hub is None or not wants_pod_network(pod):
            return None
        uid = _uid(pod)
        ip = self.addresses.take(uid)
        private = new_private_key()
        public = public_key(private)
        try:
            self.hub.add(public, ip)
        except HubUnavailable:
            self.addresses.release(uid)
            raise
        with self._lock:
            earlier = self._keys.get(uid)
            self._keys[uid] = public
        if earlier is not None and earlier != public:
            self._unhub(earlier)
        return PodAddress(ip=ip, private_key=private)

    def _with_service_links(
        self, pod: Mapping[str, Any], inputs: PodInputs, address: PodAddress | None
    ) -> PodInputs:
        """`inputs` with the variables of the namespace's Services, for a pod on the pod
        network (where their ClusterIPs route) that does not turn them off."""
        spec = pod.get("spec") or {}
        if address is None or self.services is None or spec.get("enableServiceLinks") is False:
            return inputs
        namespace = str((pod.get("metadata") or {}).get("namespace", ""))
        return replace(inputs, service_links=service_links(self.services(namespace)))

    def _kubernetes_service(self, address: PodAddress | None) -> tuple[str, int] | None:
        """The API server as the pod reaches it: the `kubernetes` Service's ClusterIP for a
        pod on the pod network once kube-proxy runs in the hub, else its own address."""
        network = self.settings.network
        ready = network.services_ready if network else None
        if address is not None and network is not None and ready and os.path.exists(ready):
            return network.kubernetes_service
        return self.settings.kubernetes_service

    def _readopt_address(self, pod: Mapping[str, Any], folder: Path) -> str | None:
        """The address an adopted pod's job was given, held again and the hub told of its
        key (after a restart); None when the pod has none, or it cannot be held again."""
        if self.addresses is None or self.hub is None:
            return None
        uid = _uid(pod)
        try:
            text = podfiles.read_text(PodFolder(folder).network_config, root=folder)
            config = NetworkConfig.parse(text)
            ip = config.interface.address.partition("/")[0]
            public = public_key(config.private_key)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s: its network file cannot be read: %s", pod_key(pod), error)
            return None
        if not self.addresses.restore(uid, ip):
            log.warning("%s: its address %s is another pod's", pod_key(pod), ip)
            return None
        try:
            self.hub.add(public, ip)
        except HubUnavailable as error:
            log.warning("%s: the hub was not told of it again: %s", pod_key(pod), error)
        with self._lock:
            self._keys[uid] = public
        return ip

    def _network_of(self, known: _Known) -> tuple[str, str] | None:
        """What the pod's job reported of its network, read from its marker until it has.
        The first report gives a pod the node refused its own network a Warning Event, and
        sets the kubelet's view for its nodes' condition."""
        if known.network is not None:
            return known.network
        report = PodFolder(known.folder).read_network()
        if report is None:
            return None
        mode, reason = report
        key = pod_key(known.pod)
        message = f"the node refused the pod its own network, so it uses the node's: {reason}"
        with self._lock:
            if known.network is not None:
                return known.network
            known.network = report
            if mode == "pod":
                self._network_fallback = None
                return report
            self._network_fallback = f"pod {key}: {reason}"
            self._warnings[key] = (*self._warnings.get(key, ()), (NETWORK_FALLBACK, message))
        log.warning("%s: %s", key, message)
        return report

    def stream_target(self, namespace: str, name: str) -> StreamTarget | None:
        """What a plan for `kubectl exec`, `attach` or `port-forward` needs of a pod
        (kubelet_py.pod.streams); None when this kubelet does not run it."""
        with self._lock:
            known = self._pods.get(f"{namespace}/{name}")
        if known is None:
            return None
        view = self._view(known.job_id, known.pod)
        network = self._network_of(known) if known.address else None
        on_pod_network = network is not None and network[0] == "pod"
        host = None if view is None else view.batch_host
        address = known.address if on_pod_network else self.settings.node_addresses.get(host or "")
        return StreamTarget(
            pod=known.pod,
            job_id=known.job_id,
            folder=known.folder,
            batch_host=host
            if view is not None and not view.final and view.state not in WAITING_STATES
            else None,
            state="UNKNOWN" if view is None else view.state,
            markers=read_markers(known.folder),
            address=address,
            on_pod_network=on_pod_network,
        )

    def network_condition(self) -> tuple[bool, str, str]:
        """(whether pods get their own network, reason, message), for the nodes' condition:
        false without a hub, and while the last job that reported says the node refused."""
        network = self.settings.network
        if network is None:
            return False, "NoPodNetwork", "pods use the nodes' network: there is no pod network hub"
        with self._lock:
            fallback = self._network_fallback
        if fallback is not None:
            return False, NETWORK_FALLBACK, f"pods fall back to the nodes' network ({fallback})"
        return (
            True,
            "HubReady",
            f"pods get {network.pod_cidr} through the hub at {network.hub_endpoint}",
        )

    def _release(self, uid: str) -> None:
        if self.addresses is None:
            return
        self.addresses.release(uid)
        with self._lock:
            public = self._keys.pop(uid, None)
        if public is not None:
            self._unhub(public)

    def _unhub(self, public: str) -> None:
        if self.hub is None:
            return
        try:
            self.hub.remove(public)
        except HubUnavailable as error:
            log.warning("the hub did not drop a pod's key: %s", error)

    def _adopt(self, pod: Mapping[str, Any], job_id: str, folder: Path, *, how: str) -> str:
        key = pod_key(pod)
        log.info("%s: job %s adopted (from its %s)", key, job_id, how)
        address = self._readopt_address(pod, folder)
        self._remember(key, pod, _uid(pod), job_id, folder, adopted=how, address=address)
        if self.tokens is not None:
            try:
                self.tokens.adopt(pod, folder, projected.token_sources(pod))
            except InvalidPodSpec as error:  # its job runs anyway; nothing to keep fresh
                log.warning("%s: job %s: tokens not refreshed: %s", key, job_id, error)
        return job_id

    def _issue(
        self, pod: Mapping[str, Any], sources: tuple[projected.TokenSource, ...]
    ) -> dict[projected.TokenSource, IssuedToken]:
        if not sources:
            return {}
        if self.tokens is None:
            raise InvalidPodSpec(
                f"volume {sources[0].volume}", "this kubelet issues no service-account tokens"
            )
        return self.tokens.issue(pod, sources)

    def _keep_fresh(
        self, pod: Mapping[str, Any], folder: Path, tokens: Mapping[Any, IssuedToken]
    ) -> None:
        if tokens and self.tokens is not None:
            self.tokens.track(pod, folder, tokens)

    def _remember(
        self,
        key: str,
        pod: Mapping[str, Any],
        uid: str,
        job_id: str,
        folder: Path,
        *,
        adopted: str | None = None,
        address: str | None = None,
    ) -> None:
        with self._lock:
            self._pods[key] = _Known(
                pod=pod, uid=uid, job_id=job_id, folder=folder, adopted=adopted, address=address
            )
        self.watcher.register(job_id, key)

    def _job_of(self, pod: Mapping[str, Any], *, ask: bool = True) -> str | None:
        """The job of this very pod (not of another of its name): known, or annotated or in
        its folder and proven its own by Slurm (only when `ask`)."""
        metadata = pod.get("metadata") or {}
        uid = _uid(pod)
        with self._lock:
            known = self._pods.get(pod_key(pod))
            owned = self._owned.get(uid)
        if known is not None and known.uid == uid:
            return known.job_id
        if owned is not None or not ask or not uid:
            return owned
        hints = [((metadata.get("annotations") or {}).get(JOB_ID_ANNOTATION), "annotation")]
        folder = self.folder(str(metadata.get("namespace", "")), str(metadata.get("name", "")))
        recorded = PodFolder(folder)
        if recorded.read_uid() == uid:
            hints.append((recorded.read_job_id(), "pod folder"))
        for hint, where in hints:
            if hint is not None and self._proven(pod, hint, where=where):
                with self._lock:
                    self._owned[uid] = str(hint)
                return str(hint)
        return None

    def _view(self, job_id: str, pod: Mapping[str, Any]) -> JobView | None:
        """The watcher's view of the pod's job, LOST once squeue shows the ID naming a job
        that is not the pod's: Slurm gives IDs again after its state was wiped, and the pod
        must neither show that job's state nor have it signalled."""
        view = self.watcher.view(job_id)
        if view is None or view.name is None:
            return view
        listed = ListedJob(
            job_id=job_id,
            state=view.state,
            name=view.name,
            work_dir=view.work_dir or "",
            comment=view.comment,
        )
        why = self._disproof(pod, listed)
        if why is None:
            return view
        return replace(
            view,
            state=LOST,
            final=True,
            source="provider",
            message=f"Slurm job {job_id} is no longer this pod's: {why}",
        )

    def _proven(self, pod: Mapping[str, Any], hint: object, *, where: str) -> bool:
        """Whether the job ID `hint` (found on the pod or in its folder) is a job of this
        pod's own, as Slurm tells. A refusal is a Warning for the pod, given once per ID.

        Raises SlurmUnavailable when Slurm cannot be asked.
        """
        key = pod_key(pod)
        uid = _uid(pod)
        text = str(hint)
        with self._lock:
            if text in self._refused.get(uid, set()):
                return False
        refusal: tuple[str, str] | None = None
        if not JOB_ID.fullmatch(text):
            shown = text if len(text) <= 40 else f"{text[:40]}..."
            refusal = (
                INVALID_JOB_ID,
                f"the {where}'s job ID {shown!r} is not a Slurm job ID; it is ignored",
            )
        else:
            job = self.slurm.identify([text]).get(text)
            if job is None:
                why: str | None = "Slurm knows no job of this user by that ID"
            else:
                why = self._disproof(pod, job)
            if why is not None:
                refusal = (
                    NOT_OWNED,
                    f"Slurm job {text} (from the {where}) is not this pod's: {why}; "
                    "it is left alone and the pod gets a job of its own",
                )
        if refusal is None:
            return True
        log.warning("%s: job %s: %s", key, text if JOB_ID.fullmatch(text) else "-", refusal[1])
        with self._lock:
            self._refused.setdefault(uid, set()).add(text)
            self._warnings[key] = (*self._warnings.get(key, ()), refusal)
        return False

    def _disproof(self, pod: Mapping[str, Any], job: ListedJob) -> str | None:
        """What tells that `job` is not this pod's (its name, comment or folder); None when
        all three are the pod's (see the module docstring for a job sacct shows without its
        comment)."""
        metadata = pod.get("metadata") or {}
        namespace = str(metadata.get("namespace", ""))
        name = str(metadata.get("name", ""))
        wrong = []
        if job.name != f"{JOB_NAME_PREFIX}{namespace}/{name}":
            wrong.append(f"its name is {_shown(job.name)}")
        comment = (job.comment or "").strip()
        if comment != f"{UID_COMMENT}{_uid(pod)}" and not (
            job.comment is None and job.source == "sacct" and job.state in FINAL_STATES
        ):
            wrong.append(f"its comment is {_shown(comment)}" if comment else "it has no comment")
        work_dir = PurePosixPath(job.work_dir.strip())
        mine = PurePosixPath(self.settings.pods_dir)
        if work_dir not in (
            mine / namespace / name,
            PurePosixPath(os.path.realpath(mine)) / namespace / name,
        ):
            wrong.append(f"its folder is {_shown(str(work_dir))}")
        return "; ".join(wrong) or None

    def _owns(self, job: ListedJob) -> bool:
        """Whether a job of the user's is one this kubelet submitted (module docstring)."""
        work_dir = PurePosixPath(job.work_dir.strip())
        if len(work_dir.parts) < 3:
            return False
        if job.name != f"{JOB_NAME_PREFIX}{work_dir.parent.name}/{work_dir.name}":
            return False
        pods_dir = work_dir.parent.parent
        mine = PurePosixPath(self.settings.pods_dir)
        return pods_dir == mine or pods_dir == PurePosixPath(os.path.realpath(mine))

    def _claim_folder(self, folder: Path, uid: str, key: str) -> bool:
        """Make `folder` this uid's: a folder of another pod of the same name is moved aside.

        Returns whether the folder was already this uid's (an earlier attempt made it).
        """
        owner = PodFolder(folder).read_uid()
        if folder.exists() and owner != uid:
            # Named from a hash: the uid file is the containers' to write, and a pod name may
            # take 253 of the 255 characters a file name has.
            aside = folder.with_name(_aside_name(folder.name, owner))
            folder.rename(aside)
            log.info("%s: folder of an earlier pod moved to %s", key, aside)
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        if owner != uid:
            PodFolder(folder).write_uid(uid)
        return owner == uid


def _nothing(_kind: str, _namespace: str, _name: str) -> None:
    return None


def _addresses(addresses: Mapping[str, str]) -> dict[str, str]:
    """The node addresses known now (a name that does not resolve is left out)."""
    known = {}
    for node in list(addresses):
        address = addresses.get(node)
        if address:
            known[node] = address
    return known


def _write_volumes(folder: Path, inputs: PodInputs) -> None:
    """The files of the configMap and secret volumes, written afresh: folders 0700, files in
    their modes (secret files 0400 or 0600). Containers write in the pod folder, so no link
    there is followed (kubelet_py.job.podfiles): one in the place of a volume is removed."""
    volumes_dir = PodFolder(folder).volumes
    with podfiles.folder(volumes_dir, root=folder, create=True) as volumes:
        os.fchmod(volumes, 0o700)
        for name, files in inputs.volumes.items():
            try:  # an earlier attempt's files, or whatever a container put there
                if stat.S_ISDIR(os.stat(name, dir_fd=volumes, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=volumes)
                else:
                    os.unlink(name, dir_fd=volumes)
            except FileNotFoundError:
                pass
            os.mkdir(name, 0o700, dir_fd=volumes)
            for file in files:
                path = volumes_dir / name / file.path
                podfiles.write_file(path, file.data, file.mode, root=folder, create_folders=True)


ASIDE_PREFIX = ".aside-"
"""The start of the name of an earlier pod's folder moved aside (no pod name starts with a
dot)."""


def _aside_name(name: str, owner: str | None) -> str:
    """The name of a pod folder set aside: 23 characters, whatever its pod's name."""
    seed = "\0".join((name, owner or "", repr(time.time()), str(os.getpid())))
    return ASIDE_PREFIX + hashlib.sha256(seed.encode(errors="surrogateescape")).hexdigest()[:16]


def _shown(text: str) -> str:
    """Slurm's text for a message: quoted, and cut when long."""
    return repr(text if len(text) <= 80 else f"{text[:80]}...")


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid", ""))


def _job_number(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return int(base), int(task or 0)
