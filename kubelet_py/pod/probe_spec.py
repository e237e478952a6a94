"""Checks a container's probes and turns them into the launcher's probes file.

Kubernetes' kubelet probes containers; in hpk the launcher inside the job does
(kubelet_py.job.probes). Rendering checks each probe here, applies Kubernetes' defaults and
resolves named ports, so the launcher on the compute node reads plain values and never fails
on a pod's mistake: bad input is an InvalidPodSpec naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping

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
_HANDLERS = ("httpGet", "tcpSocket", "exec")
_HTTP_FIELDS = frozenset({"host", "port", "path", "scheme", "httpHeaders"})
_TCP_FIELDS = frozenset({"host", "port"})


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
    out: dict[str, object] = {"kind": kind}
    for key, (default, least) in _TIMING.items():
        out[key] = _count(probe.get(key, default), f"{at}.{key}", least=least)
    grace = probe.get("terminationGracePeriodSeconds")
    if grace is not None:
        out["grace"] = _count(grace, f"{at}.terminationGracePeriodSeconds", least=1)
    handler = _mapping(probe[kind], f"{at}.{kind}")
    if kind == "exec":
        out["command"] = _exec_command(handler, f"{at}.exec")
        return out
    allowed = _HTTP_FIELDS if kind == "httpGet" else _TCP_FIELDS
    unknown = sorted(set(handler) - allowed)
    if unknown:
        raise InvalidPodSpec(f"{at}.{kind}.{unknown[0]}", "is not supported yet")
    out["port"] = _port(handler.get("port"), f"{at}.{kind}.port", container, where)
    host = handler.get("host") or "127.0.0.1"
    if not isinstance(host, str) or any(c.isspace() or c in "/?#@" for c in host):
        raise InvalidPodSpec(f"{at}.{kind}.host", f"{host!r} is no host name or address")
    out["host"] = host
    if kind == "httpGet":
        path = handler.get("path") or "/"
        if not isinstance(path, str) or not path.startswith("/") or _has_control(path):
            raise InvalidPodSpec(f"{at}.httpGet.path", "must be a path starting with /")
        scheme = handler.get("scheme", "HTTP")
        if scheme not in ("HTTP", "HTTPS"):
            raise InvalidPodSpec(f"{at}.httpGet.scheme", f"{scheme!r} is neither HTTP nor HTTPS")
        out["path"] = path
        out["scheme"] = scheme
        out["headers"] = _headers(handler.get("httpHeaders"), f"{at}.httpGet.httpHeaders")
    return out


def _exec_command(handler: Mapping[str, object], at: str) -> list[str]:
    unknown = sorted(set(handler) - {"command"})
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    words = handler.get("command")
    if not isinstance(words, list) or not words:
        raise InvalidPodSpec(f"{at}.command", "must be a non-empty list of strings")
    for index, word in enumerate(words):
        if not isinstance(word, str) or "\0" in word:
            raise InvalidPodSpec(f"{at}.command[{index}]", "must be a string")
    return list(words)


def _count(value: object, at: str, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidPodSpec(at, f"{value!r} is no whole number of at least {least}")
    return value


def _port(value: object, at: str, container: Mapping[str, object], where: str) -> int:
    """A port number, or the number of the container port with that name."""
    if isinstance(value, str) and not value.isdigit():
        ports = container.get("ports") or []
        if isinstance(ports, list):
            for index, port in enumerate(ports):
                entry = _mapping(port, f"{where}.ports[{index}]")
                if entry.get("name") == value:
                    return _port(entry.get("containerPort"), f"{where}.ports[{index}]", {}, where)
        raise InvalidPodSpec(at, f"{value!r} names no port of the container")
    number = int(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
        raise InvalidPodSpec(at, f"{value!r} is no port number (1-65535) or port name")
    return number


def _headers(value: object, at: str) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPodSpec(at, "must be a list of {name, value}")
    headers = []
    for index, item in enumerate(value):
        header = _mapping(item, f"{at}[{index}]")
        name, text = header.get("name"), header.get("value", "")
        if not isinstance(name, str) or not name or any(c in name for c in ": \t\r\n"):
            raise InvalidPodSpec(f"{at}[{index}].name", f"{name!r} is no header name")
        if not isinstance(text, str) or _has_control(text):
            raise InvalidPodSpec(f"{at}[{index}].value", "must be text on one line")
        headers.append([name, text])
    return headers


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)
