"""Checks the handlers that probes and lifecycle hooks share, and turns them into the JSON the
launcher reads.

A probe and a postStart or preStop hook name their action the same way: `exec` (a command),
`httpGet` (host, port, path, scheme, headers) and `tcpSocket` (host, port). Rendering checks
them here, once for both (kubelet_py.pod.probe_spec, kubelet_py.pod.hook_spec), resolves named
ports from the container's `ports`, and writes plain values, so the launcher on the compute
node (kubelet_py.job.handlers) never fails on a pod's mistake: bad input is an InvalidPodSpec
naming the field.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.pod.fields import has_control

DEFAULT_HOST = "127.0.0.1"
"""Where httpGet and tcpSocket connect without a host: the pod itself (its containers and
their launchers share one network)."""
HTTP_GET = "httpGet"
TCP_SOCKET = "tcpSocket"
EXEC = "exec"
_HTTP_FIELDS = frozenset({"host", "port", "path", "scheme", "httpHeaders"})
_TCP_FIELDS = frozenset({"host", "port"})


def handler_json(
    kind: str, value: object, at: str, *, container: Mapping[str, object], where: str
) -> dict[str, object]:
    """The `kind` handler at `at` (`spec.containers[0].livenessProbe.httpGet`), checked, as
    the launcher's JSON: {"kind", "command"} for exec, {"kind", "host", "port", "path",
    "scheme", "headers"} for httpGet, {"kind", "host", "port"} for tcpSocket. `container` is
    the container at `where`, whose `ports` name ports."""
    handler = _mapping(value, at)
    if kind == EXEC:
        return {"kind": kind, "command": exec_command(handler, at)}
    allowed = _HTTP_FIELDS if kind == HTTP_GET else _TCP_FIELDS
    unknown = sorted(set(handler) - allowed)
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    out: dict[str, object] = {"kind": kind}
    out["port"] = port_number(handler.get("port"), f"{at}.port", container, where)
    host = handler.get("host") or DEFAULT_HOST
    if not isinstance(host, str) or any(c.isspace() or c in "/?#@" for c in host):
        raise InvalidPodSpec(f"{at}.host", f"{host!r} is no host name or address")
    out["host"] = host
    if kind == HTTP_GET:
        path = handler.get("path") or "/"
        if not isinstance(path, str) or not path.startswith("/") or has_control(path):
            raise InvalidPodSpec(f"{at}.path", "must be a path starting with /")
        scheme = handler.get("scheme", "HTTP")
        if scheme not in ("HTTP", "HTTPS"):
            raise InvalidPodSpec(f"{at}.scheme", f"{scheme!r} is neither HTTP nor HTTPS")
        out["path"] = path
        out["scheme"] = scheme
        out["headers"] = _headers(handler.get("httpHeaders"), f"{at}.httpHeaders")
    return out


def exec_command(handler: Mapping[str, object], at: str) -> list[str]:
    """An exec handler's command: a non-empty list of strings without NUL."""
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


def port_number(value: object, at: str, container: Mapping[str, object], where: str) -> int:
    """A port number, or the number of the container port with that name."""
    if isinstance(value, str) and not value.isdigit():
        ports = container.get("ports") or []
        if isinstance(ports, list):
            for index, port in enumerate(ports):
                entry = _mapping(port, f"{where}.ports[{index}]")
                if entry.get("name") == value:
                    return port_number(
                        entry.get("containerPort"), f"{where}.ports[{index}]", {}, where
                    )
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
        if not isinstance(text, str) or has_control(text):
            raise InvalidPodSpec(f"{at}[{index}].value", "must be text on one line")
        headers.append([name, text])
    return headers
