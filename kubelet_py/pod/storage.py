"""A pod's storage volumes: hostPath, emptyDir on memory or with a size limit, and
persistentVolumeClaim.

These volumes live outside the pod folder or need work on the compute node before any
container starts: a hostPath is the node's path, so its `type` is checked (or the path
created) by the job script on the node; a memory emptyDir is a per-job folder under
`/dev/shm` that the job creates and removes; a size limit is measured by the job while it
runs. This module holds what render.py needs to place them (`StorageVolumes`, filled while
mounts.py reads `spec.volumes`, and the plan the job script's storage block is rendered from),
the lookup of a claim's PersistentVolume before rendering (`resolve_claims`, which raises
`ClaimNotBound` so that the pod waits Pending), and the reading of the job's failure marker
(`read_failure`), which the provider lays over the pod's status.

Pure apart from the lookup it is given and `read_failure`, which reads one file of the pod
folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from hpk.apptainer import bind_path_problem
from kubelet_py.errors import InvalidPodSpec, MissingReference
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.job import podfiles
from kubelet_py.job.podfolder import STORAGE_FAILURE, VOLUMES_DIR
from kubelet_py.pod.inputs import ObjectLookup
from kubelet_py.pod.resources import parse_quantity

CLAIM = "PersistentVolumeClaim"
VOLUME = "PersistentVolume"

HOST_PATH_TYPES = (
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
)
"""hostPath `type`s, as Kubernetes defines them; "" checks nothing."""

MEMORY_MEDIUM = "Memory"
SHM_DIR = "/dev/shm"  # noqa: S108 (the job makes its folder there with mktemp, 0700)
"""Node-local memory (tmpfs) every Linux node has, writable by every user: memory emptyDirs
are a per-job folder below it."""

SIZE_CHECK_INTERVAL_S = 5
"""How often the job measures the emptyDirs that have a sizeLimit."""


FAILED_MOUNT = "FailedMount"
"""The pod's reason when a hostPath (or a claim's volume) fails its type check."""
EVICTED = "Evicted"
"""The pod's reason when an emptyDir outgrew its sizeLimit (as Kubernetes evicts it)."""

_EMPTY_DIR_FIELDS = frozenset({"medium", "sizeLimit"})
_HOST_PATH_FIELDS = frozenset({"path", "type"})
_CLAIM_FIELDS = frozenset({"claimName", "readOnly"})


class ClaimNotBound(MissingReference):
    """A persistentVolumeClaim volume's claim does not exist, is not bound yet, or its volume
    is not there: the pod waits Pending, as it waits for a missing ConfigMap."""

    reason = "PersistentVolumeClaimNotBound"

    def __init__(self, *, field: str, namespace: str, name: str, problem: str) -> None:
        Exception.__init__(self, f'{field}: PersistentVolumeClaim "{namespace}/{name}" {problem}')
        self.field = field
        self.kind = CLAIM
        self.name = name
        self.key = ""


@dataclass(frozen=True)
class ClaimSource:
    """Where a bound claim's data is: its PersistentVolume's folder on the nodes."""

    volume: str
    """The PersistentVolume's name."""
    path: str
    """Its `hostPath.path` or `local.path` (absolute)."""
    type: str
    """The hostPath `type` to check it with (`Directory` for a local volume)."""


@dataclass(frozen=True)
class HostCheck:
    """One path the job checks (or creates) before any container starts."""

    volume: str
    path: str
    type: str


@dataclass(frozen=True)
class SizeLimit:
    """One emptyDir the job measures while it runs."""

    volume: str
    folder: str
    """Its folder, relative to the pod folder."""
    limit_bytes: int
    limit: str
    """The limit as the pod wrote it, for the message."""


@dataclass(frozen=True)
class StoragePlan:
    """What the job script's storage block does (the template's view)."""

    checks: tuple[HostCheck, ...] = ()
    memory: tuple[tuple[str, str], ...] = ()
    """(volume name, folder relative to the pod folder) of the memory emptyDirs."""
    limits: tuple[SizeLimit, ...] = ()
    shm_dir: str = SHM_DIR
    interval_s: int = SIZE_CHECK_INTERVAL_S
    failure_file: str = STORAGE_FAILURE
    failed_mount: str = FAILED_MOUNT
    evicted: str = EVICTED
    volumes_dir: str = VOLUMES_DIR
    """The pod folder's folder of volumes, where the memory links go."""

    @property
    def active(self) -> bool:
        return bool(self.checks or self.memory or self.limits)


@dataclass
class StorageVolumes:
    """Filled by kubelet_py.pod.mounts while it reads `spec.volumes`: the storage volumes among
    them."""

    claims: Mapping[str, ClaimSource] = field(default_factory=dict)
    """Volume name -> its claim's volume (resolve_claims), for persistentVolumeClaim volumes."""
    managed: set[str] = field(default_factory=set)
    """Volumes whose top folder the pod folder does not hold, or the storage block makes
    (hostPath, persistentVolumeClaim, memory emptyDir): render does not create them."""
    read_only: set[str] = field(default_factory=set)
    """Volumes every mount binds read-only (a claim with `readOnly`)."""
    checks: list[HostCheck] = field(default_factory=list)
    memory: list[tuple[str, str]] = field(default_factory=list)
    limits: list[SizeLimit] = field(default_factory=list)

    def empty_dir(self, name: str, source: object, *, where: str, folder: str) -> None:
        """An emptyDir volume: `medium` and `sizeLimit` checked and noted."""
        empty_dir = _mapping(source, where)
        unknown = sorted(set(empty_dir) - _EMPTY_DIR_FIELDS)
        if unknown:
            raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
        medium = empty_dir.get("medium") or ""
        if medium not in ("", MEMORY_MEDIUM):
            raise InvalidPodSpec(
                f"{where}.medium", f"{medium!r} is not supported; supported: '' and Memory"
            )
        if medium == MEMORY_MEDIUM:
            self.memory.append((name, folder))
            self.managed.add(name)
        limit = empty_dir.get("sizeLimit")
        if limit is not None:
            size = parse_quantity(limit, field=f"{where}.sizeLimit")
            if size <= 0:
                raise InvalidPodSpec(f"{where}.sizeLimit", "must be positive")
            self.limits.append(
                SizeLimit(volume=name, folder=folder, limit_bytes=math.ceil(size), limit=str(limit))
            )

    def host_path(self, name: str, source: object, *, where: str) -> str:
        """A hostPath volume; returns the folder to bind (the node's path)."""
        host = _mapping(source, where)
        unknown = sorted(set(host) - _HOST_PATH_FIELDS)
        if unknown:
            raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
        path = host.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidPodSpec(f"{where}.path", "must be an absolute path")
        check_node_path(path, f"{where}.path")
        kind = host.get("type") or ""
        if kind not in HOST_PATH_TYPES:
            raise InvalidPodSpec(
                f"{where}.type",
                f"{kind!r} is not a hostPath type; types: {', '.join(HOST_PATH_TYPES[1:])}",
            )
        self.checks.append(HostCheck(volume=name, path=path, type=str(kind)))
        self.managed.add(name)
        return path

    def claim(self, name: str, source: object, *, where: str) -> str:
        """A persistentVolumeClaim volume; returns its volume's folder."""
        claim = _mapping(source, where)
        unknown = sorted(set(claim) - _CLAIM_FIELDS)
        if unknown:
            raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
        if not isinstance(claim.get("claimName"), str) or not claim["claimName"]:
            raise InvalidPodSpec(f"{where}.claimName", "must be a non-empty string")
        read_only = claim.get("readOnly", False)
        if not isinstance(read_only, bool):
            raise InvalidPodSpec(f"{where}.readOnly", "must be true or false")
        found = self.claims.get(name)
        if found is None:
            raise ValueError(f"volume {name}: its PersistentVolumeClaim was not resolved")
        self.checks.append(HostCheck(volume=name, path=found.path, type=found.type))
        self.managed.add(name)
        if read_only:
            self.read_only.add(name)
        return found.path

    def plan(self) -> StoragePlan:
        return StoragePlan(
            checks=tuple(self.checks), memory=tuple(self.memory), limits=tuple(self.limits)
        )


def check_node_path(path: str, where: str) -> None:
    """A node path that Apptainer's --bind can take, and that stays where it says."""
    if any(ord(character) < 32 or ord(character) == 127 for character in path):
        raise InvalidPodSpec(where, "holds a control character")
    problem = bind_path_problem(path)
    if problem:
        raise InvalidPodSpec(where, problem)
    if ".." in PurePosixPath(path).parts:
        raise InvalidPodSpec(where, f"{path!r} may not contain '..'")


def resolve_claims(pod: Mapping[str, Any], lookup: ObjectLookup) -> dict[str, ClaimSource]:
    """The volume of every persistentVolumeClaim volume of the pod, by volume name.

    Raises ClaimNotBound while a claim does not exist, is being deleted or is not bound (or
    its volume does not exist), and InvalidPodSpec for a volume hpk cannot mount (neither
    hostPath nor local, or a block volume).
    """
    namespace = str((pod.get("metadata") or {}).get("namespace", ""))
    volumes = (pod.get("spec") or {}).get("volumes") or []
    found: dict[str, ClaimSource] = {}
    for index, volume in enumerate(volumes if isinstance(volumes, list) else []):
        if not isinstance(volume, Mapping) or "persistentVolumeClaim" not in volume:
            continue
        where = f"spec.volumes[{index}].persistentVolumeClaim"
        source = _mapping(volume["persistentVolumeClaim"], where)
        claim_name = source.get("claimName")
        if not isinstance(claim_name, str) or not claim_name:
            raise InvalidPodSpec(f"{where}.claimName", "must be a non-empty string")

        def waiting(problem: str, name: str = claim_name, at: str = where) -> ClaimNotBound:
            return ClaimNotBound(field=at, namespace=namespace, name=name, problem=problem)

        claim = lookup(CLAIM, namespace, claim_name)
        if claim is None:
            raise waiting("not found")
        if (claim.get("metadata") or {}).get("deletionTimestamp"):
            raise waiting("is being deleted")
        phase = (claim.get("status") or {}).get("phase") or "Pending"
        volume_name = (claim.get("spec") or {}).get("volumeName")
        if phase != "Bound" or not volume_name:
            raise waiting(f"is not bound yet ({phase})")
        bound = lookup(VOLUME, "", str(volume_name))
        if bound is None:
            raise waiting(f"is bound to PersistentVolume {volume_name}, which does not exist")
        found[str(volume.get("name", ""))] = _claim_source(bound, where=where)
    return found


def _claim_source(volume: Mapping[str, Any], *, where: str) -> ClaimSource:
    name = str((volume.get("metadata") or {}).get("name", ""))
    spec = volume.get("spec") or {}
    if spec.get("volumeMode", "Filesystem") != "Filesystem":
        raise InvalidPodSpec(
            where, f"PersistentVolume {name} is a block volume; hpk mounts folders"
        )
    host = spec.get("hostPath")
    local = spec.get("local")
    if isinstance(host, Mapping) and isinstance(host.get("path"), str):
        path, kind = str(host["path"]), str(host.get("type") or "")
    elif isinstance(local, Mapping) and isinstance(local.get("path"), str):
        path, kind = str(local["path"]), "Directory"
    else:
        sources = sorted(key for key in spec if isinstance(spec[key], Mapping))
        raise InvalidPodSpec(
            where,
            f"PersistentVolume {name} has no hostPath or local path ({', '.join(sources)}): "
            "hpk binds folders of the nodes",
        )
    if not path.startswith("/") or kind not in HOST_PATH_TYPES:
        raise InvalidPodSpec(where, f"PersistentVolume {name}: {path!r} ({kind}) is not usable")
    check_node_path(path, f"{where} (PersistentVolume {name})")
    return ClaimSource(volume=name, path=path, type=kind)


def read_failure(pod_dir: Path) -> tuple[str, str] | None:
    """(reason, message) the job wrote when the pod's storage failed it; None when it did not.

    Read without following a link: the pod folder is writable from its containers."""
    text = podfiles.read_marker(pod_dir / STORAGE_FAILURE, root=pod_dir)
    if text is None:
        return None
    reason, _, message = text.partition("\n")
    return (reason.strip() or FAILED_MOUNT), message.strip()


def with_failure(status: dict[str, Any], failure: tuple[str, str] | None) -> dict[str, Any]:
    """A failed pod's status with the storage failure's reason and message."""
    if failure is None or status.get("phase") != "Failed":
        return status
    reason, message = failure
    return {**status, "reason": reason, "message": message}


def with_claims(
    lookup: ObjectLookup, get_or_none: Callable[[str], Mapping[str, Any] | None]
) -> ObjectLookup:
    """`lookup` that also finds PersistentVolumeClaims and PersistentVolumes, through
    `get_or_none(API path)` (the API server's answer, None when the object does not exist)."""

    def find(kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        if kind == CLAIM:
            found = get_or_none(
                f"/api/v1/namespaces/{quote(namespace, safe='')}/persistentvolumeclaims/"
                f"{quote(name, safe='')}"
            )
        elif kind == VOLUME:
            found = get_or_none(f"/api/v1/persistentvolumes/{quote(name, safe='')}")
        else:
            return lookup(kind, namespace, name)
        return found

    return find
