"""Events about pods (Scheduled, Submitted, Started, Finished, and the warnings), sent off the
workers' path.

An Event is a courtesy to the user, not part of the pod's state: the binder and the pod
controller hand theirs to one `EventRecorder`, whose thread sends them, so that a slow API
server delays Events rather than bindings and submissions. Before `run` starts (as in unit
tests) and after it stops, `record` sends at once. A send that fails is logged and dropped;
beyond `backlog` waiting Events new ones are dropped too, with a log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubelet_py.apiserver import ApiError, ApiUnavailable

log = logging.getLogger(__name__)

JSON = dict[str, Any]

COMPONENT = "hpk-kubelet"
"""The Events' source and reporting component."""


class EventApi(Protocol):
    """What the recorder needs from the API server (kubelet_py.apiserver.KubeApi)."""

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> JSON: ...


def pod_event(
    pod: Mapping[str, Any], *, kind: str, reason: str, message: str, now: dt.datetime
) -> JSON:
    """A core/v1 Event about `pod`."""
    return event_about(pod, "Pod", kind=kind, reason=reason, message=message, now=now)


def event_about(
    obj: Mapping[str, Any],
    object_kind: str,
    *,
    kind: str,
    reason: str,
    message: str,
    now: dt.datetime,
) -> JSON:
    """A core/v1 Event of type `kind` (Normal, Warning) about the core/v1 object `obj`."""
    metadata = obj.get("metadata") or {}
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{metadata.get('name', object_kind.lower())}.",
            "namespace": metadata.get("namespace", "default"),
        },
        "involvedObject": {
            "apiVersion": "v1",
            "kind": object_kind,
            "namespace": metadata.get("namespace", "default"),
            "name": metadata.get("name", ""),
            "uid": metadata.get("uid", ""),
            "resourceVersion": metadata.get("resourceVersion", ""),
        },
        "type": kind,
        "reason": reason,
        "message": message,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EventRecorder:
    """Sends pod Events, from a thread of its own while `run` runs (see the module docstring)."""

    def __init__(
        self,
        api: EventApi,
        *,
        backlog: int = 10_000,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.api = api
        self.backlog = backlog
        self.clock = clock
        self._waiting: deque[tuple[str, JSON]] = deque()
        self._changed = threading.Condition()
        self._running = False

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        """Record an Event about `pod` (kind Normal or Warning), stamped now."""
        namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
        event = pod_event(pod, kind=kind, reason=reason, message=message, now=self.clock())
        with self._changed:
            if self._running:
                if len(self._waiting) >= self.backlog:
                    log.warning("event %s about %s dropped: too many waiting", reason, _name(pod))
                    return
                self._waiting.append((namespace, event))
                self._changed.notify()
                return
        self._send(namespace, event)

    def run(self, stop: threading.Event) -> None:
        """Send the recorded Events until `stop`; those still waiting then are dropped."""
        with self._changed:
            self._running = True
        try:
            while True:
                with self._changed:
                    while not self._waiting and not stop.is_set():
                        self._changed.wait(0.5)
                    if stop.is_set():
                        if self._waiting:
                            log.info("%d event(s) not sent: stopping", len(self._waiting))
                            self._waiting.clear()
                        return
                    namespace, event = self._waiting.popleft()
                self._send(namespace, event)
        finally:
            with self._changed:
                self._running = False

    def wake(self) -> None:
        """Wake `run` so that it notices its stop event at once."""
        with self._changed:
            self._changed.notify_all()

    def _send(self, namespace: str, event: JSON) -> None:
        try:
            self.api.create_event(namespace, event)
        except (ApiError, ApiUnavailable) as error:
            log.warning(
                "event %s about %s not recorded: %s",
                event.get("reason"),
                event["involvedObject"].get("name"),
                error,
            )


def _name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
