"""Runs a container's startup, liveness and readiness probes beside it, inside the pod's job.

Kubernetes' kubelet probes containers from the node; in hpk the node is the Slurm job, so
kubelet_py.job.launch runs the probes of the container it started. The launcher shares the
pod's network, so an `httpGet` or `tcpSocket` probe without a host goes to 127.0.0.1; an
`exec` probe runs `apptainer exec` of the container's own image and options
(kubelet_py.job.launch hands over that prefix). The checks themselves are the handlers
lifecycle hooks run too (kubelet_py.job.handlers).

The probes come as a JSON file that kubelet_py.pod.probe_spec makes at render time
(`probes/<container>` in the pod folder):

    {"grace": 30, "startup": PROBE, "liveness": PROBE, "readiness": PROBE}

each PROBE being {"kind": "httpGet"|"tcpSocket"|"exec", "host", "port", "path", "scheme",
"headers": [[name, value]...], "command" (exec), "initialDelaySeconds", "periodSeconds",
"timeoutSeconds", "successThreshold", "failureThreshold", "grace"}, with Kubernetes' defaults
applied and named ports resolved. What the runner writes into the container's folder:
`startup` once the startup probe has passed (at once without one) and `ready` while the
readiness probe passes (removed when it fails, or when the run ends).

It runs on compute nodes with `python -I`: stdlib only, nothing else of kubelet_py but
kubelet_py.job.handlers and kubelet_py.job.podfolder (stdlib only too), through which the
markers are written: never through a link a container put in the container's folder.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubelet_py.job import handlers
from kubelet_py.job.podfolder import ContainerFolder, write_marker

HTTP_GET = "httpGet"
TCP_SOCKET = "tcpSocket"
EXEC = "exec"
KINDS = (HTTP_GET, TCP_SOCKET, EXEC)
EXEC_START_SECONDS = 10.0
"""Added to an exec probe's timeout: starting `apptainer exec` takes time of its own."""
STARTUP = "startup"
LIVENESS = "liveness"
READINESS = "readiness"


@dataclass(frozen=True)
class Probe:
    """One probe with Kubernetes' defaults applied."""

    kind: str
    """`httpGet`, `tcpSocket` or `exec`."""
    port: int = 0
    """The port it connects to (named ports are resolved by render)."""
    command: tuple[str, ...] = ()
    """What an exec probe runs in the container (passes when it exits 0)."""
    host: str = "127.0.0.1"
    """Where it connects: the node itself unless the pod says otherwise."""
    path: str = "/"
    """The HTTP path (httpGet)."""
    scheme: str = "HTTP"
    """HTTP or HTTPS; HTTPS certificates are not verified, as Kubernetes does not."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra HTTP request headers (httpGet)."""
    initial_delay: float = 0.0
    """Seconds after the container started before the first check."""
    period: float = 10.0
    """Seconds between checks."""
    timeout: float = 1.0
    """Seconds one check may take; longer counts as a failure."""
    success_threshold: int = 1
    """Passes in a row that make a failing probe pass."""
    failure_threshold: int = 3
    """Failures in a row that make a passing probe fail."""
    grace: float | None = None
    """The probe's own terminationGracePeriodSeconds (liveness and startup), if it sets one."""

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Probe:
        """The probe of one entry of the probes file."""
        headers = data.get("headers") or []
        assert isinstance(headers, list)
        grace = data.get("grace")
        return cls(
            kind=str(data["kind"]),
            port=int(str(data.get("port", 0))),
            command=tuple(str(word) for word in data.get("command") or []),  # type: ignore[attr-defined]
            host=str(data.get("host") or "127.0.0.1"),
            path=str(data.get("path") or "/"),
            scheme=str(data.get("scheme") or "HTTP"),
            headers=tuple((str(name), str(value)) for name, value in headers),
            initial_delay=float(str(data.get("initialDelaySeconds", 0))),
            period=float(str(data.get("periodSeconds", 10))),
            timeout=float(str(data.get("timeoutSeconds", 1))),
            success_threshold=int(str(data.get("successThreshold", 1))),
            failure_threshold=int(str(data.get("failureThreshold", 3))),
            grace=None if grace is None else float(str(grace)),
        )


@dataclass(frozen=True)
class Probes:
    """A container's probes, as read from its probes file."""

    startup: Probe | None = None
    liveness: Probe | None = None
    readiness: Probe | None = None
    grace: float = 30.0
    """The pod's terminationGracePeriodSeconds: TERM to KILL after a failed liveness probe."""

    @classmethod
    def load(cls, path: Path) -> Probes:
        """Read a probes file (see the module docstring)."""
        data = json.loads(path.read_text())

        def probe(key: str) -> Probe | None:
            entry = data.get(key)
            return None if entry is None else Probe.from_json(entry)

        return cls(
            startup=probe(STARTUP),
            liveness=probe(LIVENESS),
            readiness=probe(READINESS),
            grace=float(data.get("grace", 30)),
        )

    def kill_grace(self, probe: Probe) -> float:
        """Seconds between TERM and KILL when `probe` fails."""
        return self.grace if probe.grace is None else probe.grace


def check(probe: Probe, *, exec_prefix: Sequence[str] = ()) -> bool:
    """Whether one check of `probe` passes: HTTP 200-399, a TCP connection accepted, or the
    exec probe's command exiting 0 when run after `exec_prefix` (`apptainer exec ... SIF`)."""
    if probe.kind == EXEC:
        if not exec_prefix:
            return False
        timeout = probe.timeout + EXEC_START_SECONDS
        return handlers.run_exec([*exec_prefix, *probe.command], timeout=timeout).code == 0
    try:
        if probe.kind == TCP_SOCKET:
            handlers.tcp_connect(probe.host, probe.port, timeout=probe.timeout)
            return True
        status = handlers.http_get(
            host=probe.host,
            port=probe.port,
            path=probe.path,
            scheme=probe.scheme,
            headers=probe.headers,
            timeout=probe.timeout,
        )
    except (OSError, http.client.HTTPException, ValueError):
        return False
    return handlers.passes(status)


@dataclass
class _State:
    """Where one probe stands: when it is due next, and its run of equal results."""

    probe: Probe
    due: float
    passing: bool
    last: bool | None = None
    streak: int = 0


@dataclass
class Runner:
    """Probes one run of a container until `stop` is set or a liveness or startup probe fails.

    `step(now)` does the checks due at `now` (seconds since the run started); `run` calls it
    on the real clock from a thread. `on_failure(probe)` is called once when the liveness or
    startup probe fails: the launcher then stops the container, and its restart loop decides.
    """

    probes: Probes
    container_dir: Path
    on_failure: Callable[[Probe], None]
    check: Callable[[Probe], bool] = check
    """The check of one probe (tests pass a fake)."""
    started: bool = field(default=False, init=False)
    """Whether the startup probe has passed (at once without one)."""
    failed: bool = field(default=False, init=False)
    """Whether a liveness or startup probe has failed: probing has ended."""
    closed: bool = field(default=False, init=False)
    """Whether the run has ended (`finish`): no more markers."""
    _states: dict[str, _State] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        for key, passing in ((STARTUP, False), (LIVENESS, True), (READINESS, False)):
            probe = getattr(self.probes, key)
            if probe is not None:
                self._states[key] = _State(probe, due=probe.initial_delay, passing=passing)
        self._folder.ready.unlink(missing_ok=True)
        if self.probes.startup is None:
            self._mark_started(0.0)

    @property
    def _folder(self) -> ContainerFolder:
        return ContainerFolder(self.container_dir)

    def _mark_started(self, now: float) -> None:
        self.started = True
        write_marker(self._folder.startup, "")
        # The other probes' initial delays count from here.
        for key in (LIVENESS, READINESS):
            if key in self._states:
                self._states[key].due = now + self._states[key].probe.initial_delay

    def step(self, now: float) -> float:
        """Run the checks due at `now`; returns when the next one is due."""
        keys = [LIVENESS, READINESS] if self.started else [STARTUP]
        for key in keys:
            state = self._states.get(key)
            if state is None or state.due > now or self.failed:
                continue
            ok = self.check(state.probe)
            state.due = now + state.probe.period
            state.streak = state.streak + 1 if state.last == ok else 1
            state.last = ok
            self._update(key, state, ok, now)
        keys = [LIVENESS, READINESS] if self.started else [STARTUP]
        return min((self._states[k].due for k in keys if k in self._states), default=now + 1.0)

    def _update(self, key: str, state: _State, ok: bool, now: float) -> None:
        with self._lock:
            if self.closed:  # the run ended while this check ran: its markers stay gone
                return
            self._change(key, state, ok, now)

    def _change(self, key: str, state: _State, ok: bool, now: float) -> None:
        threshold = state.probe.success_threshold if ok else state.probe.failure_threshold
        if state.streak < threshold:
            return
        if key == READINESS and ok != state.passing:
            state.passing = ok
            if ok:
                write_marker(self._folder.ready, "")
            else:
                self._folder.ready.unlink(missing_ok=True)
        elif key == STARTUP and ok:
            self._mark_started(now)
        elif key in (STARTUP, LIVENESS) and not ok:
            self.failed = True
            self.on_failure(state.probe)

    def run(
        self,
        stop: threading.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
        began: float | None = None,
    ) -> None:
        """Probe on the real clock until `stop` is set or a probe failed. The initial delays
        count from `began` (a `clock()` reading: when the run started), else from now."""
        began = clock() if began is None else began
        while not stop.is_set() and not self.failed:
            try:
                due = self.step(clock() - began)
            except OSError as error:  # a marker the container spoiled: probing goes on
                print(f"hpk: probe marker in {self.container_dir}: {error}", file=sys.stderr)
                due = clock() - began + 1.0
            stop.wait(max(0.05, min(due - (clock() - began), 1.0)))

    def finish(self) -> None:
        """The run ended: it is neither ready nor started any more."""
        with self._lock:
            self.closed = True
            for marker in (self._folder.ready, self._folder.startup):
                with contextlib.suppress(OSError):
                    marker.unlink(missing_ok=True)
