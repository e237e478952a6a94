"""The fakes the unit tests share, in one place: each stands in for one seam of the kubelet.

- Images: `sif_bytes`, a minimal SIF file, and `FakeRegistry`, which stands in for
  `apptainer pull` (hpk.images.ApptainerCommand): it writes the SIF of a reference it serves to
  the path Apptainer would write, and fails as Apptainer does for any other reference.
- The Slurm adapter's command runner: `FakeRunner`, answering from a script of results.
- Rendering: a pod (`pod`, `busybox`) and site settings (`settings`) as literals, and the
  launchers' argv read back from a script (`launches`).
- Projected volumes: the objects and the service-account volume the API server adds.
- The Slurm provider's seams: `FakeSlurm` (JobRunner), `FakeWatcher` (JobTracker), and `Bed`,
  a real SlurmProvider over both.
- The pod controller's seams: `FakeApi` (PodApi), and `FakeProvider`, an in-memory
  PodLifecycleHandler in the way of virtual-kubelet's mockProvider; `Kit` runs a controller
  over a provider, `SlurmKit` over a Bed's.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from hpk.images import image_path, plain_http
from kubelet_py.adapters.apiserver import ApiUnavailable, NotFound
from kubelet_py.adapters.slurm import CommandResult, ListedJob, SlurmError, SlurmUnavailable
from kubelet_py.errors import BackendError
from kubelet_py.loops.controller import ControllerSettings, PodController
from kubelet_py.loops.pulls import ImagePuller
from kubelet_py.loops.watcher import JobView
from kubelet_py.pod.render import RenderedPod, RenderSettings
from kubelet_py.pod.security import JobUser
from kubelet_py.provider import PodLifecycleHandler, ProviderSettings, SlurmProvider, pod_key

# -- images -------------------------------------------------------------------------------

_HEADER = struct.Struct("<32s10s3s3s16s8q")
_DESCRIPTOR = struct.Struct("<iBIII7q128s384s")


def sif_bytes(oci_config: Mapping[str, object] | None = None, *, rootfs: bytes = b"") -> bytes:
    """A well-formed SIF file; with `oci_config`, it carries the `oci-config.json` descriptor
    Apptainer writes for images built from Docker sources, and with `rootfs` (a SquashFS
    image) its primary system partition."""
    payloads: list[tuple[int, bytes, bytes, bytes]] = []
    if oci_config is not None:
        payloads.append((0x4006, json.dumps(oci_config).encode(), b"oci-config.json", b""))
    if rootfs:
        payloads.append((0x4004, rootfs, b"rootfs", struct.pack("<ii", 1, 2)))
    count = len(payloads)
    table_offset = _HEADER.size
    data_offset = table_offset + count * _DESCRIPTOR.size
    data_size = sum(len(payload) for _, payload, _, _ in payloads)
    header = _HEADER.pack(
        b"#!/usr/bin/env run-singularity\n",
        b"SIF_MAGIC\x00",
        b"01\x00",
        b"02\x00",
        bytes(16),
        0,
        0,
        0,
        count,
        table_offset,
        count * _DESCRIPTOR.size,
        data_offset,
        data_size,
    )
    table = b""
    offset = data_offset
    for index, (kind, payload, name, extra) in enumerate(payloads):
        table += _DESCRIPTOR.pack(
            kind, 1, index + 1, 1, 0, offset, len(payload), len(payload), 0, 0, 0, 0, name, extra,
        )  # fmt: skip
        offset += len(payload)
    return header + table + b"".join(payload for _, payload, _, _ in payloads)


class FakeRegistry:
    """The command runner of `apptainer pull`, serving `images` (normalized reference ->
    SIF bytes); it counts the pulls and can take its time."""

    def __init__(self, images: Mapping[str, bytes] | None = None, *, delay_s: float = 0.0) -> None:
        self.images = dict(images or {})
        self.delay_s = delay_s
        self.pulls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        assert argv[1:5] == ["--quiet", "pull", "--force", "--disable-cache"], argv
        *options, target, source = argv[5:]
        reference = source.removeprefix("docker://")
        # Plain HTTP for a registry on the loopback, as Docker does; HTTPS elsewhere.
        assert options == (["--no-https"] if plain_http(reference.split("/", 1)[0]) else []), argv
        with self._lock:
            self.pulls.append(reference)
        time.sleep(self.delay_s)
        data = self.images.get(reference)
        if data is None:
            return 255, (
                "FATAL:   While making image from oci registry: error fetching image to cache:"
                f" failed to get checksum for {source}: connection refused\n"
            )
        Path(target).write_bytes(data)
        return 0, ""


# -- the Slurm adapter's command runner ---------------------------------------------------


class FakeRunner:
    """Answers each command from a script of results and records every argv."""

    def __init__(self, *results: CommandResult) -> None:
        self.results = list(results)
        self.calls: list[list[str]] = []
        self.envs: list[Mapping[str, str] | None] = []
        self.timeouts: list[float] = []

    def run(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        self.calls.append(list(argv))
        self.envs.append(env)
        self.timeouts.append(timeout)
        return self.results.pop(0)


def ok(stdout: str) -> CommandResult:
    return CommandResult(0, stdout, "")


def failed(stderr: str, rc: int = 1) -> CommandResult:
    return CommandResult(rc, "", stderr)


# -- rendering ----------------------------------------------------------------------------

BUSYBOX = "docker.io/library/busybox:latest"
PYTHON = "docker.io/library/python:3.11"
IMAGES = {
    BUSYBOX: PurePosixPath("/home/alice/.hpk/images/docker.io/library/busybox/latest.sif"),
    PYTHON: PurePosixPath("/home/alice/.hpk/images/docker.io/library/python/3.11.sif"),
}

Pod = dict[str, Any]


def settings(name: str = "demo", **overrides: object) -> RenderSettings:
    values: dict[str, object] = {
        "pod_dir": PurePosixPath(f"/home/alice/.hpk/pods/default/{name}"),
        "apptainer": PurePosixPath("/opt/hpk/tools/apptainer-1.4.3/bin/apptainer"),
        "python": PurePosixPath("/home/alice/hpk/.venv/bin/python"),
        "images": IMAGES,
        "partition": "batch",
        "job_user": JobUser(1000, 1000),
    }
    values.update(overrides)
    return RenderSettings.from_overrides(**values)


def pod(name: str, *containers: Pod, **spec: Any) -> Pod:
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": "5f0c8a9e-1d2b-4c3d-8e4f-123456789abc",
            "annotations": spec.pop("annotations", {}),
        },
        "spec": {"restartPolicy": "Never", "containers": list(containers), **spec},
    }


def busybox(name: str, **fields: Any) -> Pod:
    return {"name": name, "image": "busybox", **fields}


def launches(rendered: RenderedPod) -> dict[str, list[str]]:
    """Container name -> the argv its launcher runs, read back from the script as bash would."""
    found: dict[str, list[str]] = {}
    text = rendered.script.replace(" \\\n", " ")
    launcher = r'^"\$python" -I -m kubelet_py\.job\.launch .*? &$'
    for match in re.finditer(launcher, text, re.M | re.S):
        words = shlex.split(match.group(0)[: -len(" &")])
        folder = words[words.index("--") - 1]
        found[folder.removeprefix("$containers/")] = words[words.index("--") + 1 :]
    return found


READ_BACK = 'set -a; source /dev/stdin; for n in "$@"; do printf "%s\\0" "${!n}"; done'

# -- projected volumes --------------------------------------------------------------------

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ConfigMap", "kube-root-ca.crt"): {"data": {"ca.crt": CA}},
    ("ConfigMap", "settings"): {"data": {"app": "demo", "other": "x"}},
    ("Secret", "db"): {"data": {"password": "czNjcjN0"}},  # s3cr3t
    ("ConfigMap", "odd"): {"data": {"fine": "x", "../escape": "y"}},  # no API server stores it
}

# What the API server's ServiceAccount admission adds to a pod, unchanged.
ACCESS_VOLUME = {
    "name": "kube-api-access-x1y2z",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                        }
                    ]
                }
            },
        ],
    },
}
ACCESS_MOUNT = {
    "name": "kube-api-access-x1y2z",
    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    "readOnly": True,
}


# -- the Slurm provider -------------------------------------------------------------------

UID = "0b6c5c1e-0000-4000-8000-000000000001"


class FakeSlurm:
    """The JobRunner seam: records submissions and cancellations, lists what it was given."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Path, list[str]]] = []
        self.cancelled: list[tuple[str, str | None]] = []
        self.batch_only: list[str] = []
        """The jobs signalled in their batch script alone (`scancel --batch`)."""
        self.listed: dict[str, ListedJob] = {}
        self.list_calls = 0
        self.identified: list[list[str]] = []
        self.refuse_signal: str | None = None
        self.unavailable = False
        self.next_id = 100

    def submit(self, script: Path, argv_flags: Any, *, env: Mapping[str, str] | None = None) -> str:
        if self.unavailable:
            raise SlurmUnavailable("sbatch: Unable to contact slurm controller")
        self.submitted.append((script, list(argv_flags)))
        self.next_id += 1
        job_id = str(self.next_id)
        # Slurm knows the job at once, by the name, folder and comment it was given.
        flags = dict(flag.removeprefix("--").split("=", 1) for flag in argv_flags if "=" in flag)
        self.listed[job_id] = ListedJob(
            job_id=job_id,
            state="PENDING",
            name=flags.get("job-name", ""),
            work_dir=flags.get("chdir", ""),
            comment=flags.get("comment"),
        )
        return job_id

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        if self.unavailable:
            raise SlurmUnavailable("scancel: Unable to contact slurm controller")
        if signal is not None and self.refuse_signal is not None:
            raise SlurmError(f"scancel: {self.refuse_signal}")
        self.cancelled.append((job_id, signal))
        if batch_only:
            self.batch_only.append(job_id)

    def listed_jobs(self, comment_prefix: str) -> dict[str, ListedJob]:
        self.list_calls += 1
        return {
            job_id: job
            for job_id, job in self.listed.items()
            if (job.comment or "").startswith(comment_prefix)
        }

    def identify(self, job_ids: Iterable[str]) -> dict[str, ListedJob]:
        if self.unavailable:
            raise SlurmUnavailable("squeue: Unable to contact slurm controller")
        asked = list(job_ids)
        self.identified.append(asked)
        return {job_id: self.listed[job_id] for job_id in asked if job_id in self.listed}


class FakeWatcher:
    """The JobTracker seam: views are set by the test."""

    def __init__(self) -> None:
        self.registered: dict[str, str] = {}
        self.views: dict[str, JobView] = {}

    def register(self, job_id: str, key: str) -> None:
        self.registered[job_id] = key

    def forget(self, job_id: str) -> None:
        self.registered.pop(job_id, None)

    def view(self, job_id: str) -> JobView | None:
        return self.views.get(job_id) if job_id in self.registered else None


def job_view(job_id: str, state: str, *, final: bool = False) -> JobView:
    return JobView(
        job_id=job_id,
        state=state,
        reason=None,
        nodes="n1" if state != "PENDING" else "",
        batch_host="n1" if state != "PENDING" else None,
        start_time=None,
        end_time=None,
        exit_code=0 if final else None,
        exit_signal=0,
        restarts=0,
        cancelled_by=None,
        final=final,
        source="squeue",
    )


def make_pod(
    name: str = "web",
    *,
    uid: str = UID,
    annotations: Mapping[str, str] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "nodeName": "hpk-batch",
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "imagePullPolicy": "IfNotPresent",  # pulls: tests/unit/test_pulls.py
                    "command": ["true"],
                }
            ],
        },
    }


class Bed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.slurm = FakeSlurm()
        self.watcher = FakeWatcher()
        self.images = images = root / "images"
        sif = image_path("busybox", cache_dir=images)
        sif.parent.mkdir(parents=True)
        sif.write_bytes(sif_bytes())
        self.pods_dir = root / "pods"
        settings = ProviderSettings(
            pods_dir=self.pods_dir,
            apptainer=PurePosixPath("/usr/bin/apptainer"),
            image_cache=images,
        )
        # Pulls, if any, done at once (no thread) from a fake registry.
        self.registry = FakeRegistry({"docker.io/library/busybox:latest": sif_bytes()})
        self.provider = SlurmProvider(
            slurm=self.slurm,
            watcher=self.watcher,
            settings=settings,
            images=ImagePuller(
                cache_dir=images,
                apptainer=str(settings.apptainer),
                notify=lambda key: self.provider._ready(key),  # noqa: PLW0108 (made below)
                runner=self.registry,
                start=lambda pull: pull(),
            ),
        )

    def folder(self, name: str = "web", namespace: str = "default") -> Path:
        return self.pods_dir / namespace / name

    def listed(self, job_id: str, uid: str, *, name: str = "web", state: str = "RUNNING") -> None:
        self.slurm.listed[job_id] = ListedJob(
            job_id=job_id,
            state=state,
            name=f"hpk/default/{name}",
            work_dir=str(self.folder(name)),
            comment=f"hpk-uid={uid}",
        )


# -- the pod controller -------------------------------------------------------------------


def until(what: str, probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.01)
    pytest.fail(f"{what} did not happen within {timeout} s")


class FakeApi:
    """The PodApi seam: records every call; `failures[name]` calls of a method fail first."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.failures: dict[str, int] = {}
        self.attempts: dict[str, list[float]] = {}
        self.objects: dict[str, dict[str, Any]] = {}
        """What GET finds, by path; anything else is NotFound."""
        self._lock = threading.Lock()

    def _call(self, name: str, *args: Any) -> dict[str, Any]:
        with self._lock:
            self.attempts.setdefault(name, []).append(time.monotonic())
            if self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                raise ApiUnavailable(f"{name}: connection refused")
            self.calls.append((name, *args))
        return {}

    def request(self, method: str, path: str, *, body: Mapping[str, Any] | None = None) -> Any:
        self._call("request", method, path, dict(body or {}))
        if method == "GET":
            if path not in self.objects:
                raise NotFound(404, f"{path} not found")
            return self.objects[path]
        return {}

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self._call("merge_patch", path, dict(patch))

    def patch_pod_status(self, *, namespace: str, name: str, patch: Mapping[str, Any]) -> Any:
        return self._call("status", f"{namespace}/{name}", dict(patch["status"]))

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> Any:
        return self._call("event", event["involvedObject"]["name"], event["type"], event["reason"])

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [call[1:] for call in self.calls if call[0] == name]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeJob:
    """A job of the FakeProvider's backend; a kubelet_py.provider.JobState once listed."""

    job_id: str
    key: str
    uid: str
    pod: Mapping[str, Any]
    partition: str | None = None
    adopted: str | None = None
    """Where the provider found the job; None: it submitted it."""
    listed: bool = False
    """Whether the backend has told of the job (`set_status`)."""
    final: bool = False
    status: dict[str, Any] | None = None
    signals: list[str] = field(default_factory=list)
    cancelled: bool = False
    """Cancelled by an orphan sweep."""


class FakeProvider:
    """An in-memory PodLifecycleHandler, in the way of virtual-kubelet's mockProvider.

    The backend's jobs are `jobs` (by ID, handed out from 101); the pods tracked are `pods`
    (by key). A test plays the backend: `set_status` gives a job its status (and calls the
    `notify_pods` callbacks, as a change the backend saw would), `has_job` gives a pod a job
    before the controller sees it (as after a restart), and failures are scripted:
    `refuse[key]` is raised by every `create_pod` of that pod while it is set, `down` by
    every call that would reach the backend, and `before_submit(key)` runs before each
    submission. What the controller asked is recorded (`asked`, `signals`).
    """

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.pods: dict[str, FakeJob] = {}
        self.refuse: dict[str, BaseException] = {}
        self.down: BackendError | None = None
        self.warnings: dict[str, tuple[tuple[str, str], ...]] = {}
        """(reason, message) each pod is owed a Warning for, handed out once."""
        self.before_submit: Callable[[str], None] = lambda _key: None
        self.calls: list[tuple[str, str]] = []
        """(method, pod key) of every call that may reach the backend ("" for a sweep)."""
        self.signals: list[tuple[str, str]] = []
        """(job ID, signal) of every signal sent, in order."""
        self._ids = itertools.count(101)
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    # -- for the tests ------------------------------------------------------------------

    def has_job(self, job_id: str, pod: Mapping[str, Any], *, how: str = "annotation") -> None:
        """The backend runs `job_id` for `pod` already: create_pod adopts it, found by `how`."""
        with self._lock:
            self.jobs[job_id] = FakeJob(
                job_id=job_id, key=pod_key(pod), uid=_uid(pod), pod=pod, adopted=how
            )

    def asked(self, method: str) -> list[str]:
        """The pod keys of the calls of `method`, in order."""
        with self._lock:
            return [key for called, key in self.calls if called == method]

    def cancelled(self) -> list[str]:
        """The IDs of the jobs the orphan sweeps cancelled."""
        with self._lock:
            return [job.job_id for job in self.jobs.values() if job.cancelled]

    def set_status(self, job_id: str, phase: str, *, final: bool = False) -> None:
        """The backend lists the job, and the pod's status becomes `phase`; the callbacks are
        called, whether anything changed or not (as for a change the status does not show)."""
        with self._lock:
            job = self.jobs[job_id]
            job.listed, job.final, job.status = True, final, {"phase": phase}
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(job.key)

    # -- the handler --------------------------------------------------------------------

    def create_pod(self, pod: Mapping[str, Any], *, partition: str | None = None) -> str:
        key, uid = pod_key(pod), _uid(pod)
        with self._lock:
            self.calls.append(("create_pod", key))
            known = self.pods.get(key)
            if known is not None and known.uid == uid:
                return known.job_id
            if self.down is not None:
                raise self.down
            if key in self.refuse:
                raise self.refuse[key]
            found = self._job_of(pod)
            if found is not None:
                self.pods[key] = found
                return found.job_id
        self.before_submit(key)
        with self._lock:
            job = FakeJob(
                job_id=str(next(self._ids)), key=key, uid=uid, pod=pod, partition=partition
            )
            self.jobs[job.job_id] = self.pods[key] = job
        return job.job_id

    def update_pod(self, pod: Mapping[str, Any]) -> None:
        with self._lock:
            known = self.pods.get(pod_key(pod))
            if known is not None and known.uid == _uid(pod):
                known.pod = pod

    def delete_pod(self, pod: Mapping[str, Any], *, kill: bool = False) -> bool:
        with self._lock:
            self.calls.append(("delete_pod", pod_key(pod)))
            if self.down is not None:
                raise self.down
            job = self._job_of(pod)
            if job is None or job.final:
                return True
            signal = "KILL" if kill else "TERM"
            if signal not in job.signals and "KILL" not in job.signals:
                job.signals.append(signal)
                self.signals.append((job.job_id, signal))
            return False

    def forget(self, pod: Mapping[str, Any]) -> None:
        with self._lock:
            known = self.pods.get(pod_key(pod))
            if known is not None and known.uid == _uid(pod):
                del self.pods[known.key]
                self.warnings.pop(known.key, None)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            known = self.pods.get(f"{namespace}/{name}")
        return dict(known.pod) if known else None

    def get_pod_status(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            known = self.pods.get(f"{namespace}/{name}")
        return dict(known.status) if known and known.status else None

    def get_pods(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(known.pod) for known in self.pods.values()]

    def notify_pods(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def job_id(self, key: str) -> str | None:
        with self._lock:
            known = self.pods.get(key)
        return known.job_id if known else None

    def job_view(self, key: str) -> FakeJob | None:
        with self._lock:
            known = self.pods.get(key)
        return known if known and known.listed else None

    def adopted(self, key: str) -> str | None:
        with self._lock:
            known = self.pods.get(key)
        return known.adopted if known else None

    def take_warnings(self, key: str) -> tuple[tuple[str, str], ...]:
        with self._lock:
            return self.warnings.pop(key, ())

    def sweep_orphans(
        self,
        live_uids: Callable[[], Collection[str]],
        *,
        gone: Callable[[str, str], bool] = lambda _key, _uid: True,
    ) -> list[str]:
        with self._lock:
            self.calls.append(("sweep_orphans", ""))
            if self.down is not None:
                raise self.down
            running = [job for job in self.jobs.values() if not job.final and not job.cancelled]
        alive = set(live_uids())
        with self._lock:
            alive.update(known.uid for known in self.pods.values())
        cancelled = []
        for job in sorted(running, key=lambda job: int(job.job_id)):
            if job.uid not in alive and gone(job.key, job.uid):
                job.cancelled = True
                cancelled.append(job.job_id)
        return cancelled

    def _job_of(self, pod: Mapping[str, Any]) -> FakeJob | None:
        """The latest job of this very pod the backend has (called with the lock held)."""
        mine = [
            job
            for job in self.jobs.values()
            if job.key == pod_key(pod) and job.uid == _uid(pod) and not job.cancelled
        ]
        return max(mine, key=lambda job: int(job.job_id), default=None)


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid", ""))


class Kit:
    """A PodController over `provider`, with a FakeApi and a fake clock for grace periods;
    its workers run on real threads (`running`), as in the kubelet."""

    def __init__(self, provider: PodLifecycleHandler, *, workers: int = 4) -> None:
        self.api = FakeApi()
        self.clock = Clock()
        self.controller = PodController(
            self.api,
            provider,
            partition_of=lambda node: "batch" if node == "hpk-batch" else None,
            settings=ControllerSettings(workers=workers, retry_initial_s=0.05, retry_max_s=0.2),
            clock=self.clock,
        )

    @contextmanager
    def running(self) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=self.controller.work, args=(stop,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            self.controller.stop()
            thread.join(5)

    def idle(self) -> None:
        """Wait until the workers have handled all that is due: only then may a test assert
        that something did not happen."""
        assert self.controller.wait_idle(5.0), "the controller did not catch up within 5 s"


class SlurmKit(Kit):
    """A Kit over a Bed's real SlurmProvider, for what that provider does behind the
    controller (ownership proofs, adoption from the pod folder, pulls, environments)."""

    def __init__(self, root: Path, *, workers: int = 4) -> None:
        self.bed = Bed(root)
        super().__init__(self.bed.provider, workers=workers)

    def notify(self, key: str, job_id: str, state: str, *, final: bool = False) -> None:
        view = job_view(job_id, state, final=final)
        self.bed.watcher.views[job_id] = view
        self.bed.provider.job_changed(key, view)


# -- the pod network hub's control socket -------------------------------------------------


class FakeHubSocket:
    """A unix socket that answers each request as hpk-tunnel's control socket would, with
    `answer`, and keeps the requests (the kubelet_py.adapters.hub seam, for real)."""

    def __init__(self, path: Path, answer: str = "errno=0\n\n") -> None:
        self.path = path
        self.answer = answer
        self.requests: list[str] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with connection:
                request = b""
                while not request.endswith(b"\n\n"):
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                self.requests.append(request.decode())
                connection.sendall(self.answer.encode())

    def close(self) -> None:
        self._server.close()
