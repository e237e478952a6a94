"""Events about pods (Scheduled, Submitted, Started, Finished, and the warnings), sent off the
workers' path.

An Event is a courtesy to the user, not part of the pod's state: the binder and the pod
controller hand theirs to one `EventRecorder`, whose thread sends them, so that a slow API
server delays Events rather than bindings and submissions. Before `run` starts (as in unit
tests) and after it stops, `record` sends at once. A send that fails is logged and dropped;
beyond `backlog` waiting Events new ones are dropped too, with a log line.

The kubelet's background threads (tokens, marker watch, log server, pulls) serve every pod at
once, and a step that fails for one pod must neither stop them nor flood the pod with Events
each time it is tried again: `PodWarnings` reports a failure once per distinct message, again
only when the message changes or after the step has succeeded meanwhile.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kubelet_py.adapters.apiserver import ApiError, ApiUnavailable
from kubelet_py.job.clock import api_time, utcnow

log = logging.getLogger(__name__)

JSON = dict[str, Any]

COMPONENT = "hpk-kubelet"
"""The Events' source and reporting component."""


class EventApi(Protocol):
    """What the recorder needs from the API server (kubelet_py.adapters.apiserver.KubeApi)."""

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
    stamp = api_time(now)
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


class EventRecorder:
    """Sends pod Events, from a thread of its own while `run` runs (see the module docstring)."""

    def __init__(
        self,
        api: EventApi,
        *,
        backlog: int = 10_000,
        clock: Callable[[], dt.datetime] = utcnow,
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


class EventSink(Protocol):
    """Where Events about pods go (EventRecorder)."""

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None: ...


class PodWarnings:
    """Warning Events of one kind (`reason`) about pods, each repeated failure reported once
    (see the module docstring). Thread-safe."""

    def __init__(
        self,
        sink: EventSink | None,
        *,
        reason: str,
        lookup: Callable[[str], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.sink = sink
        """None: failures are only logged (unit tests, a kubelet without Events)."""
        self.reason = reason
        self.lookup = lookup
        """pod key -> the pod, for callers that know only the key; None: they pass the pod."""
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def failed(self, key: str, message: str, *, pod: Mapping[str, Any] | None = None) -> bool:
        """Report that a step failed for pod `key`; returns whether an Event was recorded
        (False when this message was the last one reported for the pod)."""
        with self._lock:
            if self._last.get(key) == message:
                return False
            self._last[key] = message
        if self.sink is None:
            return False
        if pod is None and self.lookup is not None:
            try:
                pod = self.lookup(key)
            except Exception:  # a report must never fail the step that reports
                log.exception("%s: cannot find the pod for its %s event", key, self.reason)
                pod = None
        if pod is None:
            log.info("%s: no pod to record %s about: %s", key, self.reason, message)
            return False
        self.sink.record(pod, kind="Warning", reason=self.reason, message=message)
        return True

    def succeeded(self, key: str) -> None:
        """The step worked for pod `key`: its next failure is reported again."""
        with self._lock:
            self._last.pop(key, None)

    forget = succeeded
    """The pod is gone: what was reported about it is forgotten."""


def _name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
