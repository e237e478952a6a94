"""A container's postStart and preStop hooks, as its launcher runs them inside the pod's job.

Kubernetes' kubelet runs a container's lifecycle hooks; in hpk the container's launcher does
(kubelet_py.job.launch), beside the container it started, with the handlers probes use too
(kubelet_py.job.handlers): an `exec` hook is `apptainer exec` of the container's own image,
options, environment and binds; an `httpGet` hook connects from the launcher, which shares the
pod's network, to 127.0.0.1 unless it names a host; a `sleep` hook waits.

The hooks come as a JSON file that kubelet_py.pod.hook_spec makes at render time
(`hooks/<container>` in the pod folder), with the pod's terminationGracePeriodSeconds:

    {"grace": 30, "postStart": HOOK, "preStop": HOOK}

each HOOK being {"kind": "exec", "command": [...]}, {"kind": "httpGet", "host", "port",
"path", "scheme", "headers": [[name, value]...]} or {"kind": "sleep", "seconds": N}, named
ports resolved. When and how the launcher runs them, and what it writes when one fails: the
module docstring of kubelet_py.job.launch.

Stdlib only, with kubelet_py.job.handlers: it runs in the job on the compute node.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubelet_py.job import handlers

POST_START = "postStart"
PRE_STOP = "preStop"
EXEC = "exec"
HTTP_GET = "httpGet"
SLEEP = "sleep"
KINDS = (EXEC, HTTP_GET, SLEEP)
TITLES = {POST_START: "PostStartHook", PRE_STOP: "PreStopHook"}
"""How Kubernetes names each hook in its messages."""
FAILED_REASONS = {POST_START: "FailedPostStartHook", PRE_STOP: "FailedPreStopHook"}
"""The reason of the Warning Event Kubernetes gives a container whose hook failed."""
OUTPUT_KEPT = 1024
"""Bytes of an exec hook's output kept for the message of its failure."""
DESCRIBED = 200
"""Characters of an exec hook's command shown in its messages."""


@dataclass(frozen=True)
class Hook:
    """One hook's handler."""

    kind: str
    """`exec`, `httpGet` or `sleep`."""
    command: tuple[str, ...] = ()
    """What an exec hook runs in the container's image (passes when it exits 0)."""
    host: str = "127.0.0.1"
    """Where an httpGet hook connects: the pod itself unless the hook says otherwise."""
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    """HTTP or HTTPS; HTTPS certificates are not verified, as Kubernetes does not."""
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    """How long a sleep hook waits."""

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Hook:
        """The hook of one entry of the hooks file."""
        headers = data.get("headers") or []
        command = data.get("command") or []
        assert isinstance(headers, list) and isinstance(command, list)
        return cls(
            kind=str(data["kind"]),
            command=tuple(str(word) for word in command),
            host=str(data.get("host") or "127.0.0.1"),
            port=int(str(data.get("port", 0))),
            path=str(data.get("path") or "/"),
            scheme=str(data.get("scheme") or "HTTP"),
            headers=tuple((str(name), str(value)) for name, value in headers),
            seconds=float(str(data.get("seconds", 0))),
        )

    def describe(self) -> str:
        """The handler in a few words, for messages: `exec ["sh", "-c", "..."]`."""
        if self.kind == EXEC:
            words = json.dumps(list(self.command), ensure_ascii=False)
            return f"exec {words if len(words) <= DESCRIBED else words[:DESCRIBED] + '...'}"
        if self.kind == HTTP_GET:
            return f"httpGet {self.scheme.lower()}://{self.host}:{self.port}{self.path}"
        return f"sleep {self.seconds:g}s"


@dataclass(frozen=True)
class Hooks:
    """A container's hooks, as read from its hooks file."""

    post_start: Hook | None = None
    pre_stop: Hook | None = None
    grace: float = 30.0
    """The pod's terminationGracePeriodSeconds: the longest a preStop hook may take when the
    container is stopped for its pod, or after its postStart hook failed."""

    @classmethod
    def load(cls, path: Path) -> Hooks:
        """Read a hooks file (see the module docstring)."""
        data = json.loads(path.read_text())

        def hook(key: str) -> Hook | None:
            entry = data.get(key)
            return None if entry is None else Hook.from_json(entry)

        return cls(
            post_start=hook(POST_START),
            pre_stop=hook(PRE_STOP),
            grace=float(data.get("grace", 30)),
        )


@dataclass(frozen=True)
class Outcome:
    """How one run of a hook ended."""

    ok: bool
    summary: str
    """One line: the handler and how it ended (`exec ["false"] exited with 1`)."""
    output: str = ""
    """The end of an exec hook's output."""
    timed_out: bool = False
    """It had not ended when its time was up (and was stopped)."""


def run_hook(
    hook: Hook,
    *,
    exec_prefix: Sequence[str],
    timeout: float | None,
    stop: threading.Event,
) -> Outcome:
    """Run `hook` until it ends, `timeout` seconds have passed (None: no limit) or `stop` is
    set. It passes when its command exits 0, its GET answers 200-399, or its sleep is over."""
    if hook.kind == SLEEP:
        return _sleep(hook, timeout=timeout, stop=stop)
    if hook.kind == EXEC:
        return _exec(hook, exec_prefix=exec_prefix, timeout=timeout, stop=stop)
    return _http_get(hook, timeout=timeout)


def _sleep(hook: Hook, *, timeout: float | None, stop: threading.Event) -> Outcome:
    what = hook.describe()
    wait = hook.seconds if timeout is None else min(hook.seconds, timeout)
    if stop.wait(wait):
        return Outcome(ok=False, summary=f"{what} was stopped")
    if wait < hook.seconds:
        return Outcome(ok=False, summary=f"{what} timed out", timed_out=True)
    return Outcome(ok=True, summary=f"{what} ended")


def _exec(
    hook: Hook, *, exec_prefix: Sequence[str], timeout: float | None, stop: threading.Event
) -> Outcome:
    what = hook.describe()
    if not exec_prefix:
        return Outcome(ok=False, summary=f"{what}: the container has no image to run it in")
    result = handlers.run_exec(
        [*exec_prefix, *hook.command], timeout=timeout, stop=stop, keep=OUTPUT_KEPT
    )
    output = result.output.decode("utf-8", "replace").strip()
    if result.code is None:
        timed_out = result.problem == "timed out"
        return Outcome(
            ok=False, summary=f"{what} {result.problem}", output=output, timed_out=timed_out
        )
    return Outcome(ok=result.code == 0, summary=f"{what} exited with {result.code}", output=output)


def _http_get(hook: Hook, *, timeout: float | None) -> Outcome:
    what = hook.describe()
    try:
        status = handlers.http_get(
            host=hook.host,
            port=hook.port,
            path=hook.path,
            scheme=hook.scheme,
            headers=hook.headers,
            timeout=timeout,
        )
    except TimeoutError:
        return Outcome(ok=False, summary=f"{what} timed out", timed_out=True)
    except (OSError, http.client.HTTPException, ValueError) as error:
        return Outcome(ok=False, summary=f"{what} failed: {error}")
    return Outcome(ok=handlers.passes(status), summary=f"{what} answered {status}")
