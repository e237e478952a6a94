"""Checks a container's lifecycle hooks and turns them into the launcher's hooks file.

Kubernetes' kubelet runs a container's postStart and preStop hooks; in hpk the container's
launcher inside the job does (kubelet_py.job.hooks). Rendering checks each hook here, its
`exec` and `httpGet` handlers as a probe's (kubelet_py.pod.handler_spec), resolves named ports
and writes the hooks file, so the launcher reads plain values and never fails on a pod's
mistake: bad input is an InvalidPodSpec naming the field.

A `tcpSocket` handler is accepted and not run: the API keeps it in LifecycleHandler only for
backward compatibility. The pod gets a Warning Event saying so.

Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.job.hooks import POST_START, PRE_STOP, SLEEP
from kubelet_py.pod.handler_spec import EXEC, HTTP_GET, TCP_SOCKET, handler_json

LIFECYCLE = "lifecycle"
"""The container field of the hooks."""
HOOK_IGNORED = "LifecycleHandlerIgnored"
"""The reason of the Warning for a hook whose handler is not run (tcpSocket)."""
_HOOKS = (POST_START, PRE_STOP)
_HANDLERS = (EXEC, HTTP_GET, SLEEP, TCP_SOCKET)


def hooks_file(
    container: Mapping[str, object],
    where: str,
    *,
    grace: int,
    init: bool = False,
    srun: bool = False,
) -> tuple[str | None, list[tuple[str, str]]]:
    """The hooks file (JSON) of `container` at `where` (`spec.containers[0]`), None when it
    has no hook to run, and the (reason, message) of each Warning for a hook left out.
    `grace` is the pod's terminationGracePeriodSeconds; `init` says that the container is an
    init container that is no sidecar, which may have no hooks (as the API server says);
    `srun` that it runs under srun, which has no image to run an exec hook in."""
    value = container.get(LIFECYCLE)
    if value is None:
        return None, []
    at = f"{where}.{LIFECYCLE}"
    lifecycle = _mapping(value, at)
    if init and lifecycle:
        raise InvalidPodSpec(at, "an init container may only have lifecycle hooks as a sidecar")
    unknown = sorted(set(lifecycle) - set(_HOOKS))
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    found: dict[str, object] = {}
    warnings: list[tuple[str, str]] = []
    for name in _HOOKS:
        if lifecycle.get(name) is None:
            continue
        hook = _hook(lifecycle[name], f"{at}.{name}", container=container, where=where, grace=grace)
        if hook["kind"] == TCP_SOCKET:
            message = (
                f"{at}.{name}.tcpSocket: not run; a tcpSocket handler is kept in lifecycle "
                "hooks only for backward compatibility"
            )
            warnings.append((HOOK_IGNORED, message))
            continue
        if srun and hook["kind"] == EXEC:
            raise InvalidPodSpec(f"{at}.{name}.exec", "srun containers have no exec hooks")
        found[name] = hook
    if not found:
        return None, warnings
    return json.dumps({"grace": grace, **found}, sort_keys=True), warnings


def _hook(
    value: object, at: str, *, container: Mapping[str, object], where: str, grace: int
) -> dict[str, object]:
    hook = _mapping(value, at)
    unknown = sorted(set(hook) - set(_HANDLERS))
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    handlers = [key for key in _HANDLERS if key in hook]
    if len(handlers) != 1:
        raise InvalidPodSpec(
            at, "needs exactly one handler: exec, httpGet or sleep (tcpSocket is not run)"
        )
    kind = handlers[0]
    if kind == TCP_SOCKET:
        _mapping(hook[kind], f"{at}.{kind}")
        return {"kind": kind}
    if kind == SLEEP:
        return {"kind": kind, "seconds": _seconds(hook[kind], f"{at}.{kind}", grace=grace)}
    return handler_json(kind, hook[kind], f"{at}.{kind}", container=container, where=where)


def _seconds(value: object, at: str, *, grace: int) -> int:
    """A sleep hook's seconds: a whole number from 0 to the pod's grace period, as the API
    server allows."""
    sleep = _mapping(value, at)
    unknown = sorted(set(sleep) - {"seconds"})
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    seconds = sleep.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= grace:
        raise InvalidPodSpec(
            f"{at}.seconds",
            f"{seconds!r} is no whole number of seconds from 0 to the pod's "
            f"terminationGracePeriodSeconds ({grace})",
        )
    return seconds
