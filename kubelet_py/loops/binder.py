"""Binds unscheduled pods to partition nodes: hpk's stand-in for kube-scheduler.

Slurm is the scheduler here. It queues work the moment it is submitted, so Kubernetes must
not hold pods back until resources look free: every pod that names no node is bound at once
to the node of the partition it asks for. The only decision is the partition, taken in this
order:

1. the pod's nodeSelector: `hpk.io/partition: <partition>`, or
   `kubernetes.io/hostname: <prefix>-<partition>`;
2. `-p`/`--partition` in the `slurm.hpk.io/flags` annotation (a comma-separated list means
   "any of these"; the first is taken);
3. the default partition.

A pod whose choices contradict each other, that asks for a partition without an hpk node, or
whose nodeSelector does not match the chosen node's labels stays Pending: it gets the
condition PodScheduled=False (reason Unschedulable) with a message naming the valid
partitions, and a FailedScheduling Event. It is looked at again whenever it changes (the user
fixes the annotation) or the set of partitions changes.

What it may touch: the API server through `BinderApi` and `ListWatch`
(kubelet_py.adapters.apiserver), and the node set the node agent last registered. It runs no
Slurm command itself; full validation of the flags annotation is `kubelet_py/pod/flags.py`'s
job when the pod is submitted.

With a `PodStarter` (the pod controller), the pod's job is submitted just before the binding,
and the binding carries the job-id annotation: the API server copies a binding's annotations
onto the pod in the same write, which saves the pod a write and the job a watch round trip. A
pod the starter cannot start is bound as it is and left to the controller.
"""

from __future__ import annotations

import datetime as dt
import logging
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubelet_py.adapters.apiserver import (
    ApiError,
    ApiUnavailable,
    Conflict,
    KubeApi,
    ListWatch,
    NotFound,
    WatchEvent,
    pod_path,
)
from kubelet_py.job.clock import api_time, utcnow
from kubelet_py.loops.events import EventRecorder
from kubelet_py.loops.nodes import HOSTNAME_LABEL, PARTITION_LABEL, NodeSet, PartitionNode
from kubelet_py.loops.workqueue import WorkQueue, run_workers
from kubelet_py.provider import JOB_ID_ANNOTATION, pod_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]

FLAGS_ANNOTATION = "slurm.hpk.io/flags"
"""Pod annotation whose words go to sbatch."""

SCHEDULER_NAMES = ("default-scheduler", "hpk")
"""Pods that name one of these schedulers (or none: the API fills in the first) are bound."""

UNBOUND_PODS = "spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed"
"""Field selector of the pods no node has yet."""

"""The source of the Events the binder records."""


class Unschedulable(Exception):
    """The pod cannot be bound; the message says why and names the valid choices."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------------------------
# The decision (pure)


def requested_partitions(flags: str) -> list[str]:
    """The partitions `-p`/`--partition` asks for in a flags annotation ([] if none).

    A minimal reading: the words are split as a shell would, the last partition option wins,
    as with sbatch. Malformed text yields [] here; the pod controller rejects it properly.
    """
    try:
        words = shlex.split(flags)
    except ValueError:
        return []
    value: str | None = None
    for index, word in enumerate(words):
        if word in ("-p", "--partition"):
            value = words[index + 1] if index + 1 < len(words) else None
        elif word.startswith("--partition="):
            value = word.split("=", 1)[1]
        elif word.startswith("-p") and not word.startswith("--"):
            value = word[2:]
    return [name for name in (value or "").split(",") if name]


def wants_binding(pod: Mapping[str, Any], *, scheduler_names: Iterable[str]) -> bool:
    """The pod is this binder's to bind: no node yet, alive, and for one of our schedulers."""
    spec = pod.get("spec") or {}
    metadata = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (
        not spec.get("nodeName")
        and not metadata.get("deletionTimestamp")
        and phase not in ("Succeeded", "Failed")
        and spec.get("schedulerName", SCHEDULER_NAMES[0]) in tuple(scheduler_names)
    )


def choose_node(pod: Mapping[str, Any], nodes: NodeSet) -> PartitionNode:
    """The node the pod belongs on; raises Unschedulable with the reason otherwise."""
    spec = pod.get("spec") or {}
    selector: Mapping[str, str] = spec.get("nodeSelector") or {}
    annotations: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    valid = ", ".join(nodes.partition_names) or "none"

    chosen: PartitionNode | None = None
    if PARTITION_LABEL in selector:
        wanted = selector[PARTITION_LABEL]
        chosen = nodes.by_label(wanted)
        if chosen is None:
            raise Unschedulable(
                f'no hpk node for partition "{wanted}" (nodeSelector {PARTITION_LABEL}); '
                f"valid partitions: {valid}"
            )
    if HOSTNAME_LABEL in selector:
        wanted = selector[HOSTNAME_LABEL]
        by_host = nodes.by_node_name(wanted)
        if by_host is None:
            raise Unschedulable(
                f'"{wanted}" (nodeSelector {HOSTNAME_LABEL}) is not an hpk node; '
                f"valid nodes: {', '.join(nodes.node_names) or 'none'}"
            )
        if chosen is not None and chosen is not by_host:
            raise Unschedulable(
                f"the nodeSelector asks for partition {chosen.partition.name} and for node "
                f"{by_host.name} (partition {by_host.partition.name}); choose one"
            )
        chosen = by_host

    requested = requested_partitions(annotations.get(FLAGS_ANNOTATION, ""))
    unknown = [name for name in requested if nodes.by_partition(name) is None]
    if unknown:
        raise Unschedulable(
            f'no hpk node for partition "{",".join(unknown)}" (-p in {FLAGS_ANNOTATION}); '
            f"valid partitions: {valid}"
        )
    if chosen is None and requested:
        chosen = nodes.by_partition(requested[0])
    elif chosen is not None and requested and chosen.partition.name not in requested:
        raise Unschedulable(
            f"the nodeSelector asks for partition {chosen.partition.name} but "
            f"{FLAGS_ANNOTATION} asks for {','.join(requested)}; make them agree"
        )
    if chosen is None:
        chosen = nodes.default_node
        if chosen is None:
            raise Unschedulable(
                f"the pod names no partition and there is no default one; set the "
                f"nodeSelector {PARTITION_LABEL} to one of: {valid}"
            )

    mismatched = {k: v for k, v in selector.items() if chosen.labels.get(k) != v}
    if mismatched:
        pairs = ", ".join(f"{k}={v}" for k, v in sorted(mismatched.items()))
        raise Unschedulable(f"node {chosen.name} does not match the pod's nodeSelector ({pairs})")
    return chosen


def unschedulable_patch(message: str, *, now: dt.datetime) -> JSON:
    """The pod status patch that says why the pod stays Pending."""
    return {
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                    "lastTransitionTime": api_time(now),
                    "lastProbeTime": None,
                }
            ]
        }
    }


def already_reported(pod: Mapping[str, Any], message: str) -> bool:
    """The pod's status already says it is unschedulable, for this very reason."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled":
            return bool(
                condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
                and condition.get("message") == message
            )
    return False


# ---------------------------------------------------------------------------------------------
# The loops


@dataclass(frozen=True)
class BinderSettings:
    """How the binder watches and retries."""

    scheduler_names: tuple[str, ...] = SCHEDULER_NAMES
    """Pods whose spec.schedulerName is one of these are bound; others are left alone."""

    watch_timeout_s: int = 300
    """Server-side timeout of one watch request; the watch is then opened again."""

    watch_quiet_s: float = 120.0
    """A watch stream silent for this long (not even a bookmark) is opened again."""

    retry_initial_s: float = 1.0
    """First wait before binding a pod again after the API server failed."""

    retry_max_s: float = 60.0
    """Longest wait between attempts."""

    workers: int = 16
    """Pods bound at once (threads). A binding waits on sbatch (the pod's job is submitted
    first) and on the API server, not on this process, so a burst of new pods is bound
    several times faster than by one."""


class BinderApi(Protocol):
    """What the binder needs from the API server (kubelet_py.adapters.apiserver.KubeApi)."""

    def bind_pod(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Bind through pods/binding, with `annotations` copied onto the pod; Conflict if
        already bound, NotFound if gone."""

    def patch_pod_status(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> JSON:
        """Strategic-merge patch of the pod's status subresource."""

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> JSON:
        """Record an Event."""


def unbound_pods(api: KubeApi, settings: BinderSettings) -> ListWatch:
    """The list-watch of every pod that has no node yet, in every namespace."""
    return ListWatch(
        api,
        pod_path(),
        field_selector=UNBOUND_PODS,
        timeout_s=settings.watch_timeout_s,
        quiet_s=settings.watch_quiet_s,
    )


class PodStarter(Protocol):
    """Starts a pod's work before it is bound (kubelet_py.loops.controller.PodController), so that
    the binding carries the job ID and the pod needs no write of its own for it."""

    def start_before_binding(self, pod: JSON, *, partition: str) -> Mapping[str, str]:
        """Start the pod's job; returns the annotations to bind with. Never raises: a pod it
        cannot start yet gets {} and is left to the controller once bound."""

    def abandon(self, pod: JSON) -> None:
        """The pod was started but not bound (deleted meanwhile, or bound by another):
        stop what was started."""


class Binder:
    """Binds each unbound pod it hears of; `follow` and `work` run on two threads.

    `follow` turns watch events into work; `work` decides and binds, retrying failed API
    calls with a capped backoff. Neither ever raises: failures are logged and retried.
    """

    def __init__(
        self,
        api: BinderApi,
        *,
        nodes: Callable[[], NodeSet | None],
        settings: BinderSettings | None = None,
        events: EventRecorder | None = None,
        starter: PodStarter | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.api = api
        self.nodes = nodes
        self.starter = starter
        """Starts each pod's job before its binding; None: binding only."""
        self.settings = settings or BinderSettings()
        self.events = events if events is not None else EventRecorder(api, clock=clock)
        """Where Scheduled and FailedScheduling go; without one given, a recorder that sends
        at once."""
        self.clock = clock
        self._queue = WorkQueue()
        self._lock = threading.Lock()  # guards the bookkeeping dicts below
        self._pods: dict[str, JSON] = {}
        """The newest version of each pod waiting to be bound."""
        self._attempts: dict[str, int] = {}
        self._unschedulable: dict[str, JSON] = {}
        self._seen_partitions: tuple[str, ...] | None = None
        self.bound = 0
        """Pods bound since start."""

    # -- feeding --------------------------------------------------------------------------

    def offer(self, event: WatchEvent) -> None:
        """Queue the pod of one watch event, or forget it when it no longer needs a node."""
        pod = event.object
        key = pod_key(pod)
        if event.type != "DELETED" and wants_binding(
            pod, scheduler_names=self.settings.scheduler_names
        ):
            self._put(key, pod)
        else:
            self._forget(key)

    def follow(self, events: Iterable[WatchEvent]) -> None:
        """Offer every event (from `unbound_pods`) until the iteration ends."""
        for event in events:
            self.offer(event)

    # -- working --------------------------------------------------------------------------

    def work(self, stop: threading.Event) -> None:
        """Handle queued pods on `settings.workers` threads (this one included) until `stop`."""
        run_workers(lambda: self._work(stop), count=self.settings.workers, name="binder")

    def _work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._requeue_if_partitions_changed()
            key = self._queue.take(stop)
            if key is None:
                break
            with self._lock:
                pod = self._pods.get(key)
            try:
                if pod is not None:
                    self._handle_safely(key, pod)
            finally:
                self._queue.done(key)

    def _handle_safely(self, key: str, pod: JSON) -> None:
        try:
            self.handle(key, pod)
        except Exception:  # a bug in one pod's handling must not stop the binder
            log.exception("%s: binding failed unexpectedly", key)
            self._retry(key, pod)

    def stop(self) -> None:
        """Wake `work` so that it notices its stop event at once."""
        self._queue.wake()

    def queued(self) -> int:
        """Keys waiting in the work queue, due or not (the queue's depth)."""
        return len(self._queue)

    def handle(self, key: str, pod: JSON) -> None:
        """Bind one pod, or report why it cannot be bound."""
        nodes = self.nodes()
        if nodes is None or not nodes.nodes:
            self._put(key, pod, delay_s=1.0)  # the nodes are not registered yet
            return
        try:
            node = choose_node(pod, nodes)
        except Unschedulable as unschedulable:
            with self._lock:
                self._unschedulable[key] = pod
            self._report_unschedulable(key, pod, unschedulable.message)
            return
        metadata = pod.get("metadata") or {}
        annotations: Mapping[str, str] = {}
        if self.starter is not None:
            # As it will be once bound: spec.nodeName is what a fieldRef to it reads.
            bound = {**pod, "spec": {**(pod.get("spec") or {}), "nodeName": node.name}}
            annotations = self.starter.start_before_binding(bound, partition=node.partition.name)
        try:
            self.api.bind_pod(
                namespace=str(metadata.get("namespace", "")),
                name=str(metadata.get("name", "")),
                uid=str(metadata.get("uid", "")),
                node=node.name,
                annotations=annotations,
            )
        except (Conflict, NotFound) as settled:
            log.info("%s: not bound (%s): already bound, replaced or deleted", key, settled.status)
            self._forget(key)
            if annotations and self.starter is not None:
                self.starter.abandon(pod)
            return
        except (ApiError, ApiUnavailable) as error:
            log.warning("%s: binding to %s failed: %s", key, node.name, error)
            self._retry(key, pod)
            return
        self._forget(key)
        self.bound += 1
        log.info("%s: bound to %s (partition %s)", key, node.name, node.partition.name)
        self.events.record(
            pod,
            kind="Normal",
            reason="Scheduled",
            message=f"Successfully assigned {key} to {node.name}",
        )
        job_id = annotations.get(JOB_ID_ANNOTATION)
        if job_id:
            self.events.record(
                pod, kind="Normal", reason="Submitted", message=f"Slurm job {job_id} submitted"
            )

    def _report_unschedulable(self, key: str, pod: JSON, message: str) -> None:
        if already_reported(pod, message):
            return
        log.warning("%s: unschedulable: %s", key, message)
        metadata = pod.get("metadata") or {}
        try:
            self.api.patch_pod_status(
                namespace=str(metadata.get("namespace", "")),
                name=str(metadata.get("name", "")),
                patch=unschedulable_patch(message, now=self.clock()),
            )
        except NotFound:
            self._forget(key)
            return
        except (ApiError, ApiUnavailable) as error:
            log.warning("%s: cannot write the PodScheduled condition: %s", key, error)
            self._retry(key, pod)
            return
        self.events.record(pod, kind="Warning", reason="FailedScheduling", message=message)

    def _retry(self, key: str, pod: JSON) -> None:
        with self._lock:
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
        settings = self.settings
        delay = min(settings.retry_initial_s * 2 ** (attempt - 1), settings.retry_max_s)
        self._put(key, pod, delay_s=delay)

    def _put(self, key: str, pod: JSON, *, delay_s: float = 0.0) -> None:
        with self._lock:
            self._pods[key] = pod
        self._queue.put(key, delay_s=delay_s)

    def _forget(self, key: str) -> None:
        """The pod needs no binding (any more): bound, gone, or no longer ours."""
        with self._lock:
            self._pods.pop(key, None)
            self._attempts.pop(key, None)
            self._unschedulable.pop(key, None)

    def _requeue_if_partitions_changed(self) -> None:
        nodes = self.nodes()
        names = tuple(nodes.partition_names) if nodes else None
        if names == self._seen_partitions:
            return
        self._seen_partitions = names
        with self._lock:
            waiting = list(self._unschedulable.items())
        for key, pod in waiting:
            self._put(key, pod)
