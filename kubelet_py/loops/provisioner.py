"""A small dynamic provisioner, so that PersistentVolumeClaims (and Helm charts that make them)
work unchanged: one folder on the shared filesystem per claim.

It runs on threads of the kubelet process. At start it makes sure the StorageClass `hpk-local`
exists (the cluster's default, provisioner `hpk.io/local`, volumeBindingMode Immediate, created
once and then left as the user keeps it). It follows the PersistentVolumeClaims: for every
Pending claim of that class (a claim without a class gets the default one from the API
server's DefaultStorageClass admission plugin) it makes a folder `<root>/pvc-<claim uid>_
<namespace>_<claim name>` (0700) and a PersistentVolume `pvc-<claim uid>` for it: a hostPath
volume of type Directory, with the claim's request as its capacity, the claim's access modes,
a claimRef to the claim, reclaimPolicy Delete and the annotation
`pv.kubernetes.io/provisioned-by`. kube-controller-manager's volume binder then binds the two,
as it does for any external provisioner. It also follows the PersistentVolumes: a volume it
made that is Released (its claim was deleted) loses its folder, then its object.

The root is a kubelet setting (`--volumes-dir`, `<hpk home>/volumes` by default); it must be
on the filesystem every compute node sees, since the pods' jobs bind the folders there.

One thread serves every claim, so a claim whose folder cannot be made or removed (an OSError)
or that trips an error nobody expected is logged, reported once on the claim as a Warning
Event (`ProvisioningFailed`, again only when the error changes or after a success), and tried
again at the next resync; the other claims are handled as before.

The API server is reached through `StorageApi` (the entry point gives it `KubeStorageApi`), so
unit tests drive the logic with a fake; the folders are real.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from hpk.apptainer import bind_path_problem
from kubelet_py.adapters.apiserver import (
    ApiError,
    ApiUnavailable,
    Conflict,
    KubeApi,
    NotFound,
    WatchEvent,
    events_path,
)
from kubelet_py.job.clock import utcnow
from kubelet_py.loops.events import PodWarnings, event_about

log = logging.getLogger(__name__)

JSON = dict[str, Any]

STORAGE_CLASS = "hpk-local"
PROVISIONER = "hpk.io/local"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
CLAIMS_PATH = "/api/v1/persistentvolumeclaims"
VOLUMES_PATH = "/api/v1/persistentvolumes"
CLASSES_PATH = "/apis/storage.k8s.io/v1/storageclasses"


class StorageApi(Protocol):
    """What the provisioner asks of the API server."""

    def get_storage_class(self, name: str) -> JSON | None: ...

    def create_storage_class(self, body: Mapping[str, Any]) -> None:
        """Create it; one that exists already is fine."""

    def create_volume(self, body: Mapping[str, Any]) -> bool:
        """Create the PersistentVolume; False when one of its name exists already."""

    def delete_volume(self, name: str, uid: str) -> None:
        """Delete the PersistentVolume of that name and uid; one that is gone is fine."""

    def claim_event(
        self, claim: Mapping[str, Any], *, kind: str, reason: str, message: str
    ) -> None:
        """Record an Event about the claim."""


@dataclass(frozen=True)
class ProvisionerSettings:
    """Where the provisioner keeps the volumes and what it calls them."""

    root: Path
    """The folder of the volumes' folders, on the filesystem the compute nodes share."""

    storage_class: str = STORAGE_CLASS
    """The StorageClass it serves, which it creates as the cluster's default."""

    provisioner: str = PROVISIONER
    """The class's provisioner name, also in each volume's provisioned-by annotation."""

    resync_s: float = 30.0
    """How often every claim and volume is looked at again, besides the watches (a failed
    creation or deletion is tried again then)."""

    def __post_init__(self) -> None:
        root = Path(os.path.abspath(os.path.expanduser(self.root)))
        problem = bind_path_problem(str(root))
        if problem:
            raise ValueError(f"volumes folder {problem}")
        object.__setattr__(self, "root", root)


@dataclass
class Provisioner:
    """Provisions and deletes the folders and volumes of `settings.storage_class`."""

    api: StorageApi
    settings: ProvisionerSettings
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _warnings: PodWarnings = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._warnings = PodWarnings(_ClaimEvents(self.api), reason="ProvisioningFailed")

    def ensure_class(self) -> None:
        """Create the StorageClass, the cluster's default, unless it exists (then the user's
        changes to it stay)."""
        name = self.settings.storage_class
        if self.api.get_storage_class(name) is not None:
            return
        self.api.create_storage_class(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": name,
                    "annotations": {DEFAULT_CLASS: "true"},
                    "labels": {"app.kubernetes.io/managed-by": "hpk"},
                },
                "provisioner": self.settings.provisioner,
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
            }
        )
        log.info(
            "StorageClass %s created (default, provisioner %s)", name, self.settings.provisioner
        )

    def folder_of(self, claim: Mapping[str, Any]) -> Path:
        metadata = claim.get("metadata") or {}
        return self.settings.root / (
            f"pvc-{metadata.get('uid', '')}_{metadata.get('namespace', '')}_"
            f"{metadata.get('name', '')}"
        )

    def claim_changed(self, claim: Mapping[str, Any]) -> str | None:
        """Provision a volume for the claim if it is a Pending claim of the class; returns the
        name of the volume it created (None when there was nothing to do)."""
        metadata = claim.get("metadata") or {}
        spec = claim.get("spec") or {}
        if (
            metadata.get("deletionTimestamp")
            or spec.get("volumeName")
            or (claim.get("status") or {}).get("phase", "Pending") != "Pending"
            or spec.get("storageClassName") != self.settings.storage_class
        ):
            return None
        key = f"{metadata.get('namespace')}/{metadata.get('name')}"
        problem = _unprovisionable(spec)
        if problem:
            log.warning("claim %s: not provisioned: %s", key, problem)
            self.api.claim_event(
                claim, kind="Warning", reason="ProvisioningFailed", message=problem
            )
            return None
        uid = str(metadata.get("uid", ""))
        name = f"pvc-{uid}"
        folder = self.folder_of(claim)
        with self._lock:
            self.settings.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {PROVISIONED_BY: self.settings.provisioner},
                "labels": {"app.kubernetes.io/managed-by": "hpk"},
            },
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": self.settings.storage_class,
                "volumeMode": "Filesystem",
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": metadata.get("namespace"),
                    "name": metadata.get("name"),
                    "uid": uid,
                },
                "hostPath": {"path": str(folder), "type": "Directory"},
            },
        }
        if not self.api.create_volume(volume):
            return None  # made on an earlier look; the binder binds it
        log.info("claim %s: volume %s provisioned at %s", key, name, folder)
        self.api.claim_event(
            claim,
            kind="Normal",
            reason="ProvisioningSucceeded",
            message=f"Successfully provisioned volume {name} at {folder}",
        )
        return name

    def volume_changed(self, volume: Mapping[str, Any]) -> bool:
        """Delete a Released volume of ours with reclaimPolicy Delete: its folder, then the
        object. Returns whether it did."""
        metadata = volume.get("metadata") or {}
        spec = volume.get("spec") or {}
        if (
            (metadata.get("annotations") or {}).get(PROVISIONED_BY) != self.settings.provisioner
            or spec.get("persistentVolumeReclaimPolicy") != "Delete"
            or (volume.get("status") or {}).get("phase") != "Released"
            or metadata.get("deletionTimestamp")
        ):
            return False
        name = str(metadata.get("name", ""))
        path = Path(str((spec.get("hostPath") or {}).get("path", "")))
        if path.parent != self.settings.root or not path.name.startswith(f"{name}_"):
            # Never remove a folder this provisioner did not make (another root, a changed PV).
            log.warning(
                "volume %s: %s is not one of %s; left as it is", name, path, self.settings.root
            )
            return False
        with self._lock:
            if path.exists():
                shutil.rmtree(path)
        self.api.delete_volume(name, str(metadata.get("uid", "")))
        log.info("volume %s deleted with its folder %s (its claim is gone)", name, path)
        return True

    # -- running --------------------------------------------------------------------------

    def follow(self, events: Iterable[WatchEvent], *, claims: bool) -> None:
        """Handle every claim (or volume) event until the iteration ends."""
        for event in events:
            if event.type == "DELETED":
                continue
            self._handle(event.object, claims=claims)

    def run(self, api: KubeApi, stop: threading.Event) -> None:
        """Make sure of the StorageClass (trying again until the API server takes it), then
        look at every claim and volume every `settings.resync_s` until `stop`."""
        while not stop.is_set():
            try:
                self.ensure_class()
                break
            except (ApiError, ApiUnavailable) as error:
                log.warning("StorageClass %s: %s; again in 5 s", self.settings.storage_class, error)
                stop.wait(5.0)
            except Exception:  # the claims still get their volumes
                log.exception("StorageClass %s failed; again in 5 s", self.settings.storage_class)
                stop.wait(5.0)
        while not stop.wait(self.settings.resync_s):
            try:
                claims, _ = api.list(CLAIMS_PATH)
                volumes, _ = api.list(VOLUMES_PATH)
            except (ApiError, ApiUnavailable) as error:
                log.warning("listing claims and volumes: %s", error)
                continue
            self.resync(claims, volumes)

    def resync(self, claims: Iterable[JSON], volumes: Iterable[JSON]) -> None:
        """Look at every claim and volume again (the periodic pass)."""
        for claim in claims:
            self._handle(claim, claims=True)
        for volume in volumes:
            self._handle(volume, claims=False)

    def _handle(self, obj: Mapping[str, Any], *, claims: bool) -> None:
        what = "claim" if claims else "volume"
        metadata = obj.get("metadata") or {}
        key = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
        try:
            if claims:
                self.claim_changed(obj)
            else:
                self.volume_changed(obj)
        except (ApiError, ApiUnavailable) as error:
            log.warning("%s %s: %s; tried again later", what, key, error)
            return
        except Exception as error:  # this claim alone: the thread serves every claim
            if isinstance(error, OSError):
                log.warning("%s %s: %s; tried again later", what, key, error)
            else:
                log.exception("%s %s: failed unexpectedly; tried again later", what, key)
            if claims:
                self._warnings.failed(
                    f"{metadata.get('uid', '')}", f"{type(error).__name__}: {error}", pod=obj
                )
            return
        if claims:
            self._warnings.succeeded(f"{metadata.get('uid', '')}")


class _ClaimEvents:
    """The claims' Events as PodWarnings sends them (an EventSink)."""

    def __init__(self, api: StorageApi) -> None:
        self.api = api

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        self.api.claim_event(pod, kind=kind, reason=reason, message=message)


def _unprovisionable(spec: Mapping[str, Any]) -> str | None:
    """Why a claim of the class gets no volume from this provisioner, or None."""
    if spec.get("volumeMode", "Filesystem") != "Filesystem":
        return "volumeMode Block is not supported: hpk provisions folders"
    if spec.get("selector"):
        return "claims with a selector are not provisioned (a selector picks existing volumes)"
    if spec.get("dataSource") or spec.get("dataSourceRef"):
        return "claims with a dataSource are not supported"
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if not storage:
        return "the claim has no resources.requests.storage"
    return None


class KubeStorageApi:
    """StorageApi through the kubelet's KubeApi."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    def get_storage_class(self, name: str) -> JSON | None:
        return self.api.get_or_none(f"{CLASSES_PATH}/{quote(name, safe='')}")

    def create_storage_class(self, body: Mapping[str, Any]) -> None:
        with contextlib.suppress(Conflict):  # made meanwhile
            self.api.create(CLASSES_PATH, body)

    def create_volume(self, body: Mapping[str, Any]) -> bool:
        try:
            self.api.create(VOLUMES_PATH, body)
        except Conflict:
            return False
        return True

    def delete_volume(self, name: str, uid: str) -> None:
        # NotFound: gone already; Conflict: another volume of that name, not ours to delete.
        with contextlib.suppress(NotFound, Conflict):
            self.api.request(
                "DELETE",
                f"{VOLUMES_PATH}/{quote(name, safe='')}",
                body={"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}},
            )

    def claim_event(
        self, claim: Mapping[str, Any], *, kind: str, reason: str, message: str
    ) -> None:
        metadata = claim.get("metadata") or {}
        namespace = str(metadata.get("namespace", "default"))
        event = event_about(
            claim,
            "PersistentVolumeClaim",
            kind=kind,
            reason=reason,
            message=message,
            now=utcnow(),
        )
        try:
            self.api.request("POST", events_path(namespace), body=event)
        except (ApiError, ApiUnavailable) as error:  # an Event is worth no retry
            log.warning(
                "event %s about claim %s/%s not sent: %s",
                reason,
                namespace,
                metadata.get("name"),
                error,
            )
