"""The benchmark's pods, and what it observes of them from outside the kubelet.

Pods are created through the API server as a user would create them: unscheduled, so the
kubelet's binder and pod controller both take part. `PodRecorder` follows a namespace's pods
with a watch and stamps, on receipt, when each pod was first seen with a job ID, Running and
with its container terminated: the time a user's `kubectl get -w` would see it.
`PodFolder` reads what the kubelet and the job wrote into the pod's folder, with the files'
nanosecond times.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import marker_time
from kubelet_py.adapters.apiserver import KubeApi, ListWatch, pod_path

JOB_ID_ANNOTATION = "slurm.hpk.io/job-id"
FLAGS_ANNOTATION = "slurm.hpk.io/flags"


def pod_manifest(name: str, command: Sequence[str], *, flags: str | None = None) -> dict[str, Any]:
    """A one-container busybox pod that runs `command` once, with no token volume."""
    metadata: dict[str, Any] = {"name": name, "labels": {"app": "hpk-bench"}}
    if flags:
        metadata["annotations"] = {FLAGS_ANNOTATION: flags}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": list(command)}],
        },
    }


@dataclass(frozen=True)
class Created:
    """When the benchmark asked for a pod and when the API server answered."""

    name: str
    sent: float
    returned: float


def create_pods(
    api: KubeApi,
    namespace: str,
    manifests: Sequence[Mapping[str, Any]],
    *,
    threads: int = 8,
    interval_s: float = 0.0,
) -> list[Created]:
    """Create the pods: all at once on `threads` connections, or one every `interval_s`."""

    def create(manifest: Mapping[str, Any]) -> Created:
        sent = time.time()
        api.create(pod_path(namespace), manifest)
        return Created(str(manifest["metadata"]["name"]), sent, time.time())

    if interval_s > 0:
        made = []
        start = time.monotonic()
        for index, manifest in enumerate(manifests):
            delay = start + index * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            made.append(create(manifest))
        return made
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(create, manifests))


@dataclass
class Seen:
    """When the watch first delivered each stage of one pod (epoch seconds, on receipt)."""

    job_id: str | None = None
    job_id_at: float | None = None
    running_at: float | None = None
    terminated_at: float | None = None
    phase: str | None = None
    phase_at: float | None = None


@dataclass
class PodRecorder:
    """Watches one namespace's pods on a thread of its own and records `Seen` per pod."""

    api: KubeApi
    namespace: str
    seen: dict[str, Seen] = field(default_factory=dict)
    _watch: ListWatch | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._watch = ListWatch(self.api, pod_path(self.namespace), quiet_s=60.0)
        self._thread = threading.Thread(target=self._follow, name="bench-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(10)

    def snapshot(self) -> dict[str, Seen]:
        with self._lock:
            return {name: Seen(**vars(seen)) for name, seen in self.seen.items()}

    def wait(self, what: str, done: Any, *, timeout: float) -> dict[str, Seen]:
        """Wait until `done(snapshot)` is true; TimeoutError naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.snapshot()
            if done(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(0.2)

    def _follow(self) -> None:
        assert self._watch is not None
        for event in self._watch:
            now = time.time()
            pod = event.object
            name = str((pod.get("metadata") or {}).get("name", ""))
            with self._lock:
                seen = self.seen.setdefault(name, Seen())
                _note(seen, pod, now)


def _note(seen: Seen, pod: Mapping[str, Any], now: float) -> None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    status = pod.get("status") or {}
    job_id = annotations.get(JOB_ID_ANNOTATION)
    if job_id and seen.job_id_at is None:
        seen.job_id, seen.job_id_at = str(job_id), now
    phase = status.get("phase")
    if phase and phase != seen.phase:
        seen.phase, seen.phase_at = str(phase), now
    if phase == "Running" and seen.running_at is None:
        seen.running_at = now
    for container in status.get("containerStatuses") or []:
        if "terminated" in (container.get("state") or {}) and seen.terminated_at is None:
            seen.terminated_at = now


@dataclass(frozen=True)
class PodFolder:
    """What the kubelet and the job wrote for one pod (docs/kubelet.md, "The pod folder")."""

    path: Path

    def job_id(self) -> str | None:
        try:
            return (self.path / "job-id").read_text().strip() or None
        except FileNotFoundError:
            return None

    def mtime(self, relative: str) -> float | None:
        """A file's modification time, in epoch seconds with the file system's nanoseconds."""
        try:
            return (self.path / relative).stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return None

    def started(self, container: str = "main") -> float | None:
        """The container's `started` marker."""
        try:
            return marker_time((self.path / "containers" / container / "started").read_text())
        except FileNotFoundError:
            return None

    def finished(self, container: str = "main") -> tuple[int, float] | None:
        """The container's `exit` marker: its code and time."""
        try:
            code, _, at = (self.path / "containers" / container / "exit").read_text().partition(" ")
        except FileNotFoundError:
            return None
        return int(code), marker_time(at)


def birth_times(paths: Iterable[Path]) -> dict[Path, float]:
    """Files' creation (birth) times from statx, through coreutils' `stat` (Python 3.11's
    os.stat has none on Linux); files without one are left out."""
    wanted = [str(path) for path in paths if path.exists()]
    if not wanted:
        return {}
    found: dict[Path, float] = {}
    for start in range(0, len(wanted), 500):
        out = subprocess.run(
            ["stat", "--format=%.9W %n", "--", *wanted[start : start + 500]],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            stamp, _, name = line.partition(" ")
            if float(stamp) > 0:
                found[Path(name)] = float(stamp)
    return found


def delete_pods(api: KubeApi, namespace: str) -> None:
    """Remove every pod of the namespace at once, without waiting for the kubelet."""
    api.request("DELETE", pod_path(namespace), query=[("gracePeriodSeconds", "0")])
