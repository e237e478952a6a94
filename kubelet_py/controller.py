"""The pod controller: joins the API server's pods to the provider's jobs.

It follows every pod bound to one of the kubelet's nodes, keyed namespace/name in a work
queue with capped backoff, and: starts new pods through the provider and records the job ID
in the pod's `slurm.hpk.io/job-id` annotation; writes the status the provider computes to
/status when it changed (never over a terminal pod); fails pods the provider refuses, with a
Warning Event; cancels the job of a pod being deleted and then confirms the deletion. It
talks to the API server through kubelet_py.apiserver and to Slurm only through the provider.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubelet_py.apiserver import ApiError, ApiUnavailable, KubeApi, NotFound, WatchEvent, pod_path
from kubelet_py.binder import pod_event
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.provider import JOB_ID_ANNOTATION, SlurmProvider, pod_key
from kubelet_py.render import ImageNotResolved
from kubelet_py.slurm import SlurmError, SubmissionFailed

log = logging.getLogger(__name__)

JSON = dict[str, Any]
TERMINAL = ("Succeeded", "Failed")
BOUND_PODS = "spec.nodeName!="


@dataclass(frozen=True)
class ControllerSettings:
    """How the pod controller retries."""

    retry_initial_s: float = 1.0
    """First wait before handling a pod again after a failure."""

    retry_max_s: float = 60.0
    """Longest wait between attempts."""


class _Queue:
    """Keys waiting to be handled, each with the time it is due."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._changed = threading.Condition()

    def put(self, key: str, *, delay_s: float = 0.0) -> None:
        with self._changed:
            when = time.monotonic() + delay_s
            self._due[key] = min(when, self._due.get(key, when))
            self._changed.notify()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def take(self, stop: threading.Event, *, poll_s: float = 0.5) -> str | None:
        with self._changed:
            while not stop.is_set():
                now = time.monotonic()
                due = [(when, key) for key, when in self._due.items() if when <= now]
                if due:
                    key = min(due)[1]
                    del self._due[key]
                    return key
                upcoming = min(self._due.values(), default=None)
                timeout = poll_s if upcoming is None else min(poll_s, max(0.0, upcoming - now))
                self._changed.wait(timeout)
        return None


class PodController:
    """Reconciles the kubelet's pods (see the module docstring)."""

    def __init__(
        self,
        api: KubeApi,
        provider: SlurmProvider,
        *,
        partition_of: Callable[[str], str | None],
        settings: ControllerSettings | None = None,
    ) -> None:
        self.api = api
        self.provider = provider
        self.partition_of = partition_of
        """Node name -> its Slurm partition; None for a node that is not the kubelet's."""
        self.settings = settings or ControllerSettings()
        self._pods: dict[str, JSON] = {}
        self._written: dict[str, JSON] = {}
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue = _Queue()
        provider.notify_pods(self._queue.put)

    # -- feeding --------------------------------------------------------------------------

    def offer(self, event: WatchEvent) -> None:
        pod = event.object
        key = pod_key(pod)
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if self.partition_of(node) is None:
            return
        with self._lock:
            if event.type == "DELETED":
                self._pods.pop(key, None)
                gone = pod
            else:
                self._pods[key] = pod
                gone = None
        if gone is not None:
            self._deleted(key, gone)
            return
        self.provider.update_pod(pod)
        self._queue.put(key)

    def follow(self, events: Iterable[WatchEvent]) -> None:
        for event in events:
            self.offer(event)

    def work(self, stop: threading.Event) -> None:
        while not stop.is_set():
            key = self._queue.take(stop)
            if key is None:
                break
            with self._lock:
                pod = self._pods.get(key)
            if pod is None:
                continue
            try:
                self.handle(key, pod)
                self._failures.pop(key, None)
            except (ApiError, ApiUnavailable, SlurmError) as error:
                self._retry(key, f"{type(error).__name__}: {error}")
            except Exception:  # one pod's bug must not stop the others
                log.exception("%s: handling failed unexpectedly", key)
                self._retry(key, "unexpected error")

    def stop(self) -> None:
        self._queue.wake()

    # -- handling -------------------------------------------------------------------------

    def handle(self, key: str, pod: JSON) -> None:
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if metadata.get("deletionTimestamp"):
            self._confirm_deletion(key, pod)
            return
        if status.get("phase") in TERMINAL:
            self.provider.forget(pod)
            return
        job_id = self.provider.job_id(key)
        if job_id is None:
            node = str((pod.get("spec") or {}).get("nodeName") or "")
            adopting = bool((metadata.get("annotations") or {}).get(JOB_ID_ANNOTATION))
            try:
                job_id = self.provider.create_pod(pod, partition=self.partition_of(node))
            except (InvalidPodSpec, ImageNotResolved, SubmissionFailed) as error:
                self._fail(key, pod, error)
                return
            if not adopting:
                self._event(pod, "Normal", "Submitted", f"Slurm job {job_id} submitted")
            if (metadata.get("annotations") or {}).get(JOB_ID_ANNOTATION) != job_id:
                self.api.merge_patch(
                    pod_path(metadata["namespace"], metadata["name"]),
                    {"metadata": {"annotations": {JOB_ID_ANNOTATION: job_id}}},
                )
        self._sync_status(key, pod, job_id)

    def _sync_status(self, key: str, pod: JSON, job_id: str) -> None:
        metadata = pod["metadata"]
        wanted = self.provider.get_pod_status(metadata["namespace"], metadata["name"])
        if wanted is None:
            return
        with self._lock:
            before = self._written.get(key)
        if wanted == before:
            return
        self.api.patch_pod_status(
            namespace=metadata["namespace"], name=metadata["name"], patch={"status": wanted}
        )
        with self._lock:
            self._written[key] = wanted
        phase = wanted.get("phase")
        old_phase = (before or {}).get("phase") or (pod.get("status") or {}).get("phase")
        log.info("%s: job %s: status %s", key, job_id, phase)
        if phase != old_phase:
            if phase == "Running":
                self._event(pod, "Normal", "Started", f"Slurm job {job_id} started")
            elif phase in TERMINAL:
                self._event(pod, "Normal", "Finished", f"Slurm job {job_id} ended: {phase}")
        if phase in TERMINAL:
            self.provider.forget(pod)

    def _fail(self, key: str, pod: JSON, error: Exception) -> None:
        reason = getattr(error, "reason", None) or type(error).__name__
        message = str(error)
        log.warning("%s: failed: %s: %s", key, reason, message)
        metadata = pod["metadata"]
        containers = (pod.get("spec") or {}).get("containers") or []
        self.api.patch_pod_status(
            namespace=metadata["namespace"],
            name=metadata["name"],
            patch={
                "status": {
                    "phase": "Failed",
                    "reason": reason,
                    "message": message,
                    "containerStatuses": [
                        {
                            "name": c.get("name", ""),
                            "image": c.get("image", ""),
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "started": False,
                            "state": {"waiting": {"reason": reason, "message": message}},
                        }
                        for c in containers
                    ],
                }
            },
        )
        self._event(pod, "Warning", reason, message)

    def _confirm_deletion(self, key: str, pod: JSON) -> None:
        self.provider.delete_pod(pod)
        metadata = pod["metadata"]
        with contextlib.suppress(NotFound):
            self.api.request(
                "DELETE",
                pod_path(metadata["namespace"], metadata["name"]),
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": metadata.get("uid", "")},
                },
            )
        log.info("%s: deletion confirmed", key)

    def _deleted(self, key: str, pod: JSON) -> None:
        try:
            self.provider.delete_pod(pod)
        except SlurmError as error:
            log.warning("%s: cancelling the job of a deleted pod failed: %s", key, error)
        with self._lock:
            self._written.pop(key, None)
            self._failures.pop(key, None)

    def _retry(self, key: str, why: str) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        delay = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2 ** (count - 1))
        log.warning("%s: %s; trying again in %.0f s", key, why, delay)
        self._queue.put(key, delay_s=delay)

    def _event(self, pod: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
        try:
            self.api.create_event(
                namespace,
                pod_event(pod, kind=kind, reason=reason, message=message, now=_utcnow()),
            )
        except (ApiError, ApiUnavailable) as error:
            log.warning("%s: event %s not recorded: %s", pod_key(pod), reason, error)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
