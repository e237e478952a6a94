"""The pod controller: joins the API server's pods to the provider's jobs.

It follows every pod bound to one of the kubelet's nodes in a work queue with capped
backoff, handled by several workers, never two at once for the same pod, and:

- starts new pods through the provider and records the job ID in the pod's
  `slurm.hpk.io/job-id` annotation (after a restart the provider adopts the job a pod
  already has, and never submits a second one);
- writes the status the provider computes to /status when it changed (never over a terminal
  pod, and not before Slurm has listed the job: a restart must not turn Running back into
  Pending);
- fails pods the provider refuses, with a Warning Event, and passes on the provider's
  warnings (a job ID on the pod or in its folder whose job is not the pod's own, which the
  provider leaves alone and replaces by a job of the pod's own);
- keeps a pod whose ConfigMap, Secret or key does not exist yet Pending, its containers
  waiting with CreateContainerConfigError and a Warning Event naming what is missing, and
  tries it again with backoff until the object appears (nothing is submitted until then);
- stops the job of a pod being deleted: TERM first, KILL once the pod's grace period is over
  if the job still runs, then confirms the deletion (the queue brings the pod back when the
  job ends or the grace period is over: no worker waits);
- after each full list of the pods (the first one after a start, and any list again after a
  410), cancels the kubelet's Slurm jobs whose pod no longer exists.

Pods are keyed `namespace/name`, deletions `namespace/name/uid` (a new pod of the same name
is another pod); both keys of a name share one lock in the queue. The orphan sweep has its
own key. It talks to the API server through kubelet_py.adapters.apiserver and to Slurm only through
the provider, as a kubelet_py.provider.PodLifecycleHandler: what it catches from it are the
backend-neutral errors of kubelet_py.errors.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubelet_py.adapters.apiserver import (
    ApiError,
    ApiUnavailable,
    Conflict,
    ListWatch,
    NotFound,
    WatchEvent,
    pod_path,
)
from kubelet_py.errors import (
    BackendError,
    ImageNotResolved,
    InvalidPodSpec,
    MissingReference,
    SubmissionRefused,
)
from kubelet_py.loops.events import EventRecorder
from kubelet_py.loops.workqueue import WorkQueue, run_workers
from kubelet_py.pod.render import DEFAULT_GRACE_SECONDS
from kubelet_py.provider import JOB_ID_ANNOTATION, PodLifecycleHandler, pod_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
TERMINAL = ("Succeeded", "Failed")
BOUND_PODS = "spec.nodeName!="
SWEEP = ":orphans"
"""The queue key of the orphan sweep (no pod key contains a colon)."""


class PodApi(Protocol):
    """What the controller needs from the API server (kubelet_py.adapters.apiserver.KubeApi)."""

    def request(self, method: str, path: str, *, body: Mapping[str, Any] | None = None) -> JSON: ...

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> JSON: ...

    def patch_pod_status(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> JSON: ...

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> JSON: ...


@dataclass(frozen=True)
class ControllerSettings:
    """How the pod controller works and retries."""

    workers: int = 8
    """Pods handled at once (threads). Submissions wait on sbatch and the API server, not
    on this process, so several workers submit several times faster than one."""

    retry_initial_s: float = 1.0
    """First wait before handling a pod again after a failure."""

    retry_max_s: float = 60.0
    """Longest wait between attempts."""

    stop_timeout_s: float = 2.0
    """How long `work` waits for its other workers when it is stopped."""


def group_of(key: str) -> str:
    """The lock a key takes in the queue: `namespace/name` for pod and deletion keys."""
    return "/".join(key.split("/")[:2])


def retry_delay(settings: ControllerSettings, failures: int) -> float:
    """The wait before the next attempt after `failures` failures in a row: doubling from
    retry_initial_s, capped at retry_max_s."""
    return float(min(settings.retry_max_s, settings.retry_initial_s * 2 ** (failures - 1)))


@dataclass
class _Deletion:
    """A pod being deleted, from the first sign until its job has stopped."""

    pod: JSON
    gone: bool = False
    """The API object is gone already (deleted with no grace, or while the kubelet was away)."""
    deadline: float | None = None
    """When the grace period is over (monotonic); None until the first signal."""
    killed: bool = False


@dataclass
class _Written:
    uid: str
    status: JSON


@dataclass
class _Listed:
    uids: frozenset[str] = field(default_factory=frozenset)
    count: int = 0


class PodController:
    """Reconciles the kubelet's pods (see the module docstring)."""

    def __init__(
        self,
        api: PodApi,
        provider: PodLifecycleHandler,
        *,
        partition_of: Callable[[str], str | None],
        settings: ControllerSettings | None = None,
        events: EventRecorder | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_lag: Callable[[float], None] | None = None,
    ) -> None:
        self.api = api
        self.events = events if events is not None else EventRecorder(api)
        """Where Submitted, Started, Finished and the warnings go; without one given, a
        recorder that sends at once."""
        self.provider = provider
        self.partition_of = partition_of
        """Node name -> its Slurm partition; None for a node that is not the kubelet's."""
        self.settings = settings or ControllerSettings()
        self.clock = clock
        """Monotonic seconds, for grace periods and the status lag (the unit tests pass a
        fake)."""
        self.status_lag = status_lag
        """Told, for each status written after the provider reported a change of the pod's
        job, the seconds from that report to the write (kubelet_py.loops.metrics)."""
        self._seen: dict[str, float] = {}
        """Pod key -> when the provider first reported a change not yet written."""
        self._pods: dict[str, JSON] = {}
        self._deletions: dict[str, _Deletion] = {}
        self._confirmed: OrderedDict[str, None] = OrderedDict()
        self._written: dict[str, _Written] = {}
        self._annotated: set[str] = set()
        self._failures: dict[str, int] = {}
        self._listed = _Listed()
        self._lock = threading.Lock()
        self._queue = WorkQueue(group_of=group_of)
        provider.notify_pods(self._job_changed)

    # -- feeding --------------------------------------------------------------------------

    def offer(self, event: WatchEvent) -> None:
        pod = event.object
        key = pod_key(pod)
        metadata = pod.get("metadata") or {}
        uid = str(metadata.get("uid", ""))
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if self.partition_of(node) is None:
            return
        if event.type == "DELETED":
            self._gone(key, pod)
            return
        with self._lock:
            self._pods[key] = pod
        if metadata.get("deletionTimestamp"):
            self._deleting(f"{key}/{uid}", pod, gone=False)
            return
        self.provider.update_pod(pod)
        self._queue.put(key)

    def follow(self, events: Iterable[WatchEvent]) -> None:
        """Offer every event until the iteration ends; a ListWatch also tells the controller
        when each full list has been offered, which starts the orphan sweep."""
        if isinstance(events, ListWatch):
            events.when_listed(self.listed)
        for event in events:
            self.offer(event)

    def listed(self, items: list[JSON]) -> None:
        """Every bound pod of a full list has been offered: forget the pods the list no
        longer has (deleted while no watch was open), then sweep Slurm for orphans."""
        uids = frozenset(str((item.get("metadata") or {}).get("uid", "")) for item in items)
        with self._lock:
            self._listed = _Listed(uids=uids, count=self._listed.count + 1)
            vanished = [
                pod
                for pod in self._pods.values()
                if str((pod.get("metadata") or {}).get("uid", "")) not in uids
            ]
        for pod in vanished:
            self._gone(pod_key(pod), pod)
        self._queue.put(SWEEP)

    def work(self, stop: threading.Event) -> None:
        """Handle queued keys on `settings.workers` threads (this one included) until `stop`."""
        run_workers(
            lambda: self._work(stop),
            count=self.settings.workers,
            name="pods",
            join_timeout_s=self.settings.stop_timeout_s,
        )

    def stop(self) -> None:
        self._queue.wake()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every pod, deletion and sweep due so far has been handled and no worker
        is busy (a retry or a grace period that runs out later does not count); False after
        `timeout_s`. Only then can a caller tell that what it offered changed nothing."""
        return self._queue.wait_idle(timeout_s)

    def queued(self) -> int:
        """Keys waiting in the work queue, due or not (the queue's depth)."""
        return len(self._queue)

    def phases(self) -> dict[str, int]:
        """How many of the pods bound to the kubelet's nodes are in each phase: the phase of
        the status the controller wrote last, else the pod's own (Pending without one)."""
        counted: dict[str, int] = {}
        with self._lock:
            for key, pod in self._pods.items():
                written = self._written.get(key)
                uid = str((pod.get("metadata") or {}).get("uid", ""))
                status = written.status if written and written.uid == uid else pod.get("status")
                phase = str((status or {}).get("phase") or "Pending")
                counted[phase] = counted.get(phase, 0) + 1
        return counted

    @property
    def lists_seen(self) -> int:
        """How many full lists of the pods the controller was told of."""
        with self._lock:
            return self._listed.count

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            key = self._queue.take(stop)
            if key is None:
                break
            try:
                self._handle_key(key)
                with self._lock:
                    self._failures.pop(key, None)
            except (ApiError, ApiUnavailable, BackendError) as error:
                self._retry(key, f"{type(error).__name__}: {error}")
            except MissingReference as missing:
                self._retry(key, str(missing))
            except Exception:  # one pod's bug must not stop the others
                log.exception("%s: handling failed unexpectedly", key)
                self._retry(key, "unexpected error")
            finally:
                self._queue.done(key)

    def _handle_key(self, key: str) -> None:
        if key == SWEEP:
            self.sweep()
        elif key.count("/") == 2:
            self.handle_deletion(key)
        else:
            with self._lock:
                pod = self._pods.get(key)
            if pod is not None:
                self.handle(key, pod)

    def _job_changed(self, key: str) -> None:
        """The provider's notification: handle the pod again, and its deletion if any."""
        with self._lock:
            deletions = [dkey for dkey in self._deletions if group_of(dkey) == key]
            self._seen.setdefault(key, self.clock())
        self._queue.put(key)
        for dkey in deletions:
            self._queue.put(dkey)

    # -- handling -------------------------------------------------------------------------

    def handle(self, key: str, pod: JSON) -> None:
        metadata = pod.get("metadata") or {}
        uid = str(metadata.get("uid", ""))
        if metadata.get("deletionTimestamp"):
            return  # its deletion key handles it
        with self._lock:
            written = self._written.get(key)
        if (pod.get("status") or {}).get("phase") in TERMINAL or (
            written is not None and written.uid == uid and written.status.get("phase") in TERMINAL
        ):
            self.provider.forget(pod)
            return
        job_id = self.provider.job_id(key)
        annotated = (metadata.get("annotations") or {}).get(JOB_ID_ANNOTATION)
        if job_id is None:
            node = str((pod.get("spec") or {}).get("nodeName") or "")
            try:
                job_id = self.provider.create_pod(pod, partition=self.partition_of(node))
            except (InvalidPodSpec, ImageNotResolved, SubmissionRefused) as error:
                self._warn(pod, key)  # a refused job-id annotation, say
                self._fail(key, pod, error)
                return
            except MissingReference as missing:
                self._warn(pod, key)
                self._wait_for_config(key, pod, missing)
                raise  # the worker tries the pod again, with backoff
            self._warn(pod, key)
            self._announce(pod, key, job_id)
        if annotated != job_id and uid not in self._annotated:
            self.api.merge_patch(
                pod_path(metadata["namespace"], metadata["name"]),
                {"metadata": {"annotations": {JOB_ID_ANNOTATION: job_id}}},
            )
            with self._lock:
                self._annotated.add(uid)
        self._sync_status(key, pod, job_id)

    # -- for the binder (kubelet_py.loops.binder.PodStarter) ------------------------------------

    def start_before_binding(self, pod: JSON, *, partition: str) -> Mapping[str, str]:
        """Submit the job of a pod about to be bound; returns the job-id annotation for the
        binding, so that the pod gets its annotation in the binding's write.

        A pod the provider refuses, or that Slurm cannot take now, gets {}: it is bound as it
        is, and `handle` then fails it or tries again as for any bound pod. A pod with a job
        already (a retried binding, a restart) gets that job: the provider never submits a
        second one.
        """
        key = pod_key(pod)
        try:
            job_id = self.provider.create_pod(pod, partition=partition)
        except (
            InvalidPodSpec,
            ImageNotResolved,
            SubmissionRefused,
            BackendError,
            MissingReference,
            ApiError,  # looking up its ConfigMaps and Secrets
            ApiUnavailable,
        ) as error:
            log.info("%s: not started before binding (%s); the controller takes it", key, error)
            return {}
        except Exception:  # the controller meets the same pod again once it is bound
            log.exception("%s: starting before binding failed unexpectedly", key)
            return {}
        self._warn(pod, key)
        if self.provider.adopted(key) is not None:
            # The binder would announce the annotation as a submission; the pod's own
            # handling writes the annotation once it is bound.
            self._announce(pod, key, job_id)
            return {}
        with self._lock:
            self._annotated.add(str((pod.get("metadata") or {}).get("uid", "")))
        return {JOB_ID_ANNOTATION: job_id}

    def abandon(self, pod: JSON) -> None:
        """A pod started before binding was not bound: cancel its job and forget it."""
        try:
            self.provider.delete_pod(pod, kill=True)
        except BackendError as error:  # the orphan sweep of the next full list catches it
            log.warning("%s: cancelling the job of an unbound pod failed: %s", pod_key(pod), error)
        self.provider.forget(pod)

    def _sync_status(self, key: str, pod: JSON, job_id: str) -> None:
        if self.provider.job_view(key) is None:
            return  # not listed by Slurm yet; the watcher brings the pod back when it is
        metadata = pod["metadata"]
        uid = str(metadata.get("uid", ""))
        with self._lock:  # forgotten once handled: a failed write is retried from the same report
            seen = self._seen.get(key)
        wanted = self.provider.get_pod_status(metadata["namespace"], metadata["name"])
        if wanted is None:
            return
        self._warn(pod, key)  # what the job reported (the node's network instead of its own)
        with self._lock:
            written = self._written.get(key)
        if written is not None and written.uid == uid:
            before: JSON | None = written.status
        else:  # after a restart: what the pod shows is what was written last
            current = pod.get("status") or {}
            before = {name: current.get(name) for name in wanted} if current else None
        if wanted == before:
            with self._lock:
                self._written[key] = _Written(uid=uid, status=wanted)
                self._seen.pop(key, None)
            return
        self.api.patch_pod_status(
            namespace=metadata["namespace"], name=metadata["name"], patch={"status": wanted}
        )
        with self._lock:
            self._written[key] = _Written(uid=uid, status=wanted)
            self._seen.pop(key, None)
        if seen is not None and self.status_lag is not None:
            self.status_lag(self.clock() - seen)
        phase = wanted.get("phase")
        old_phase = (before or {}).get("phase") or (pod.get("status") or {}).get("phase")
        log.debug("%s: job %s: status written (%s)", key, job_id, phase)
        if phase != old_phase:
            log.info("%s: job %s: %s", key, job_id, phase)
            if phase == "Running":
                self._event(pod, "Normal", "Started", f"Slurm job {job_id} started")
            elif phase in TERMINAL:
                self._event(pod, "Normal", "Finished", f"Slurm job {job_id} ended: {phase}")
        if phase in TERMINAL:
            self.provider.forget(pod)

    def _announce(self, pod: JSON, key: str, job_id: str) -> None:
        """The Event of a pod's new job: Submitted, or Adopted for a job found in its folder or
        by its comment. A job adopted from the pod's own annotation (after a restart) is
        nothing new."""
        how = self.provider.adopted(key)
        if how is None:
            self._event(pod, "Normal", "Submitted", f"Slurm job {job_id} submitted")
        elif how != "annotation":
            self._event(pod, "Normal", "Adopted", f"Slurm job {job_id} adopted (from its {how})")

    def _warn(self, pod: JSON, key: str) -> None:
        """Warning Events for what the submission left out (envFrom keys that are no names)
        and for job IDs on the pod or in its folder that were not its own."""
        for reason, message in self.provider.take_warnings(key):
            self._event(pod, "Warning", reason, message)

    def _wait_for_config(self, key: str, pod: JSON, missing: MissingReference) -> None:
        """Keep the pod Pending (CreateContainerConfigError); the status and the Event are
        written once per missing reference. The caller tries the pod again with backoff."""
        message = str(missing)
        metadata = pod["metadata"]
        uid = str(metadata.get("uid", ""))
        spec = pod.get("spec") or {}
        status: JSON = {
            "phase": "Pending",
            "containerStatuses": _waiting(spec.get("containers"), missing.reason, message),
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = _waiting(
                spec["initContainers"], missing.reason, message
            )
        with self._lock:
            written = self._written.get(key)
        if written is None or written.uid != uid or written.status != status:
            log.info("%s: waiting: %s", key, message)
            self.api.patch_pod_status(
                namespace=metadata["namespace"], name=metadata["name"], patch={"status": status}
            )
            with self._lock:
                self._written[key] = _Written(uid=uid, status=status)
            kind = getattr(missing, "event_type", "Warning")  # Normal while an image is pulled
            self._event(pod, kind, getattr(missing, "event_reason", missing.reason), message)

    def _fail(self, key: str, pod: JSON, error: Exception) -> None:
        reason = getattr(error, "reason", None) or type(error).__name__
        message = str(error)
        log.warning("%s: failed: %s: %s", key, reason, message)
        metadata = pod["metadata"]
        status = {
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "containerStatuses": _waiting(
                (pod.get("spec") or {}).get("containers"), reason, message
            ),
        }
        self.api.patch_pod_status(
            namespace=metadata["namespace"], name=metadata["name"], patch={"status": status}
        )
        with self._lock:
            self._written[key] = _Written(uid=str(metadata.get("uid", "")), status=status)
        self._event(pod, "Warning", reason, message)

    # -- deletion -------------------------------------------------------------------------

    def _deleting(self, dkey: str, pod: JSON, *, gone: bool) -> None:
        uid = dkey.rsplit("/", 1)[1]
        with self._lock:
            if uid in self._confirmed:
                return  # the echo of a deletion this controller confirmed
            deletion = self._deletions.get(dkey)
            if deletion is None:
                deletion = self._deletions[dkey] = _Deletion(pod=pod)
            deletion.pod = pod
            deletion.gone = deletion.gone or gone
        self._queue.put(dkey)

    def _gone(self, key: str, pod: JSON) -> None:
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        with self._lock:
            current = self._pods.get(key)
            if current is not None and (current.get("metadata") or {}).get("uid") == uid:
                del self._pods[key]
        self._deleting(f"{key}/{uid}", pod, gone=True)

    def handle_deletion(self, dkey: str) -> None:
        """One step of a deletion: signal the job, wait (by requeueing) for it to end or for
        the grace period to pass, KILL it, then confirm the deletion."""
        with self._lock:
            deletion = self._deletions.get(dkey)
        if deletion is None:
            return
        pod = deletion.pod
        key = group_of(dkey)
        now = self.clock()
        if (pod.get("status") or {}).get("phase") in TERMINAL:
            ended = True  # the job is over; nothing to signal
        else:
            if deletion.deadline is None:
                grace = grace_period_s(pod)
                deletion.deadline = now + grace
                log.info("%s: deleting, grace period %d s", key, grace)
            ended = self.provider.delete_pod(pod)
            if not ended and now < deletion.deadline:
                self._queue.put(dkey, delay_s=deletion.deadline - now)
                return
            if not ended and not deletion.killed:
                self.provider.delete_pod(pod, kill=True)
                deletion.killed = True
                log.info("%s: grace period over, job killed", key)
        self._warn(pod, key)  # a job ID on it that was not its own
        self.provider.forget(pod)
        metadata = pod["metadata"]
        uid = str(metadata.get("uid", ""))
        if not deletion.gone:
            # Conflict: the uid precondition failed, a new pod took the name: ours is gone.
            with contextlib.suppress(NotFound, Conflict):
                self.api.request(
                    "DELETE",
                    pod_path(metadata["namespace"], metadata["name"]),
                    body={
                        "apiVersion": "v1",
                        "kind": "DeleteOptions",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": uid},
                    },
                )
            log.info("%s: deletion confirmed", key)
        with self._lock:
            self._deletions.pop(dkey, None)
            self._confirmed[uid] = None
            while len(self._confirmed) > 10_000:
                self._confirmed.popitem(last=False)
            written = self._written.get(key)
            if written is not None and written.uid == uid:
                del self._written[key]
            self._annotated.discard(uid)
            if key not in self._pods:
                self._seen.pop(key, None)

    # -- recovery -------------------------------------------------------------------------

    def sweep(self) -> None:
        """Cancel the kubelet's Slurm jobs whose pod is gone (after a full list only)."""
        with self._lock:
            if self._listed.count == 0:
                return

        def alive() -> set[str]:
            with self._lock:
                uids = set(self._listed.uids)
                uids.update(
                    str((p.get("metadata") or {}).get("uid", "")) for p in self._pods.values()
                )
                uids.update(dkey.rsplit("/", 1)[1] for dkey in self._deletions)
            return uids

        def gone(key: str, uid: str) -> bool:
            namespace, _, name = key.partition("/")
            try:
                found = self.api.request("GET", pod_path(namespace, name))
            except NotFound:
                return True
            except (ApiError, ApiUnavailable) as error:
                log.warning("orphan sweep: cannot look up pod %s, its job stays: %s", key, error)
                return False
            return str((found.get("metadata") or {}).get("uid", "")) != uid

        cancelled = self.provider.sweep_orphans(alive, gone=gone)
        log.info("orphan sweep: %d job(s) cancelled %s", len(cancelled), cancelled or "")

    def _retry(self, key: str, why: str) -> None:
        with self._lock:
            count = self._failures.get(key, 0) + 1
            self._failures[key] = count
        delay = retry_delay(self.settings, count)
        log.warning("%s: %s; trying again in %.0f s", key, why, delay)
        self._queue.put(key, delay_s=delay)

    def _event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.record(pod, kind=kind, reason=reason, message=message)


def _waiting(containers: Any, reason: str, message: str) -> list[JSON]:
    """Statuses of containers that never started, waiting for `reason`."""
    return [
        {
            "name": c.get("name", ""),
            "image": c.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {"waiting": {"reason": reason, "message": message}},
        }
        for c in containers or []
    ]


def grace_period_s(pod: Mapping[str, Any]) -> int:
    """The pod's grace period: the deletion's, else its spec's, else Kubernetes' default."""
    metadata = pod.get("metadata") or {}
    for value in (
        metadata.get("deletionGracePeriodSeconds"),
        (pod.get("spec") or {}).get("terminationGracePeriodSeconds"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return DEFAULT_GRACE_SECONDS
