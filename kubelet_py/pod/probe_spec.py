"""Checks a container's probes and turns them into the launcher's probes file.

Kubernetes' kubelet probes containers; in hpk the launcher inside the job does
(kubelet_py.job.probes). Rendering checks each probe here, with its handler checked as a
lifecycle hook's is (kubelet_py.pod.handler_spec), applies Kubernetes' defaults and resolves
named ports, so the launcher on the compute node reads plain values and never fails on a
pod's mistake: bad input is an InvalidPodSpec naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.pod.handler_spec import EXEC, HTTP_GET, TCP_SOCKET, handler_json

PROBE_FIELDS = {
    "startupProbe": "startup",
    "livenessProbe": "liveness",
    "readinessProbe": "readiness",
}
"""The container fields of probes, and their keys in the probes file."""

_TIMING = {
    "initialDelaySeconds": (0, 0),
    "periodSeconds": (10, 1),
    "timeoutSeconds": (1, 1),
    "successThreshold": (1, 1),
    "failureThreshold": (3, 1),
}
"""Timing fields: (Kubernetes' default, the least value allowed)."""
_REFUSED = {
    "grpc": "grpc probes are not supported yet: use httpGet or tcpSocket",
}
_HANDLERS = (HTTP_GET, TCP_SOCKET, EXEC)


def probes_file(
    container: Mapping[str, object], where: str, *, grace: int, init: bool = False
) -> str | None:
    """The probes file (JSON) of `container` at `where` (`spec.containers[0]`), or None when it
    has no probes. `grace` is the pod's terminationGracePeriodSeconds; `init` says that the
    container is an init container that is no sidecar, which may have no probes."""
    found: dict[str, object] = {}
    for key, name in PROBE_FIELDS.items():
        if container.get(key) is None:
            continue
        at = f"{where}.{key}"
        if init:
            raise InvalidPodSpec(at, "an init container may only have probes as a sidecar")
        if key != "readinessProbe" and _mapping(container[key], at).get("successThreshold", 1) != 1:
            raise InvalidPodSpec(f"{at}.successThreshold", "must be 1 for this probe")
        if key == "readinessProbe" and "terminationGracePeriodSeconds" in _mapping(
            container[key], at
        ):
            raise InvalidPodSpec(
                f"{at}.terminationGracePeriodSeconds", "only liveness and startup probes set it"
            )
        found[name] = _probe(container[key], at, container=container, where=where)
    if not found:
        return None
    return json.dumps({"grace": grace, **found}, sort_keys=True)


def _probe(
    value: object, at: str, *, container: Mapping[str, object], where: str
) -> dict[str, object]:
    probe = _mapping(value, at)
    handlers = [key for key in (*_HANDLERS, *_REFUSED) if key in probe]
    for key in handlers:
        if key in _REFUSED:
            raise InvalidPodSpec(f"{at}.{key}", _REFUSED[key])
    if len(handlers) != 1:
        raise InvalidPodSpec(at, "needs exactly one of httpGet, tcpSocket and exec")
    known = {*_HANDLERS, *_TIMING, "terminationGracePeriodSeconds"}
    unknown = sorted(set(probe) - known)
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    kind = handlers[0]
    out = handler_json(kind, probe[kind], f"{at}.{kind}", container=container, where=where)
    for key, (default, least) in _TIMING.items():
        out[key] = _count(probe.get(key, default), f"{at}.{key}", least=least)
    grace = probe.get("terminationGracePeriodSeconds")
    if grace is not None:
        out["grace"] = _count(grace, f"{at}.terminationGracePeriodSeconds", least=1)
    return out


def _count(value: object, at: str, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidPodSpec(at, f"{value!r} is no whole number of at least {least}")
    return value
