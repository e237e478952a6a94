"""A pod's volumes and its containers' volumeMounts, as Apptainer binds: which volumes the
pod may have and where each lives (a folder of the pod folder, or the node's for a hostPath
or a claim), the `--bind` of each mount, and the folders the job script makes before any
container starts.

The files of configMap, secret, projected and downwardAPI volumes are written by the caller
before submission (kubelet_py.pod.inputs, kubelet_py.pod.projected): this module binds them,
always read-only. Storage volumes are noted in kubelet_py.pod.storage's StorageVolumes.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from pathlib import PurePosixPath
from types import MappingProxyType

from hpk.apptainer import bind_path_problem
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.job.podfolder import VOLUMES_DIR
from kubelet_py.pod.fields import DNS_LABEL, check_text, checked_name, expect_objects
from kubelet_py.pod.inputs import PodInputs
from kubelet_py.pod.storage import StorageVolumes

_MOUNT_HONOURED = frozenset({"name", "mountPath", "readOnly", "subPath"})
_CONFIG_SOURCES = {"configMap": "name", "secret": "secretName"}
_CONFIG_FIELDS = frozenset({"items", "defaultMode", "optional"})
_STORAGE_SOURCES = frozenset({"hostPath", "persistentVolumeClaim"})
#: Volumes whose files kubelet_py.pod.projected makes (tokens, downward API items, keys), with
#: the fields it reads; written by the kubelet before submission, like configMap volumes.
_PROJECTED_SOURCES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "projected": frozenset({"sources", "defaultMode"}),
        "downwardAPI": frozenset({"items", "defaultMode"}),
    }
)


def pod_volumes(
    spec: Mapping[str, object], *, storage: StorageVolumes
) -> tuple[dict[str, str], frozenset[str]]:
    """Volume name -> its folder relative to the pod folder (`volumes/<name>`, absolute
    for a hostPath or a claim's volume); and the configMap and secret volumes among them (the
    kubelet writes their files before submission). `storage` takes note of the storage volumes
    (hostPath, claims, emptyDir medium and sizeLimit)."""
    volumes: dict[str, str] = {}
    config: set[str] = set()
    for index, volume in enumerate(expect_objects(spec.get("volumes"), "spec.volumes")):
        where = f"spec.volumes[{index}]"
        name = checked_name(volume.get("name"), f"{where}.name", DNS_LABEL)
        sources = sorted(set(volume) - {"name"})
        if len(sources) == 1 and sources[0] in _STORAGE_SOURCES:
            if name in volumes:
                raise InvalidPodSpec(f"{where}.name", f"volume {name} is defined twice")
            volumes[name] = _storage_volume(storage, name, sources[0], volume, where)
            continue
        if len(sources) != 1 or sources[0] not in {
            "emptyDir",
            *_CONFIG_SOURCES,
            *_PROJECTED_SOURCES,
        }:
            kind = next((s for s in sources if s not in _CONFIG_SOURCES), "(none)")
            raise InvalidPodSpec(
                f"{where}.{kind}",
                f"volume {name}: only emptyDir, configMap, secret, projected, downwardAPI, "
                "hostPath and persistentVolumeClaim volumes are supported",
            )
        if sources[0] in _PROJECTED_SOURCES:
            kind = sources[0]
            source = _mapping(volume[kind], f"{where}.{kind}")
            unknown = sorted(set(source) - _PROJECTED_SOURCES[kind])
            if unknown:
                raise InvalidPodSpec(f"{where}.{kind}.{unknown[0]}", "is not supported yet")
            config.add(name)  # kubelet_py.pod.projected made its files
        elif sources[0] == "emptyDir":
            storage.empty_dir(
                name, volume["emptyDir"], where=f"{where}.emptyDir", folder=f"{VOLUMES_DIR}/{name}"
            )
        else:
            kind = sources[0]
            source = _mapping(volume[kind], f"{where}.{kind}")
            unknown = sorted(set(source) - _CONFIG_FIELDS - {_CONFIG_SOURCES[kind]})
            if unknown:
                raise InvalidPodSpec(f"{where}.{kind}.{unknown[0]}", "is not supported yet")
            config.add(name)
        if name in volumes:
            raise InvalidPodSpec(f"{where}.name", f"volume {name} is defined twice")
        volumes[name] = f"{VOLUMES_DIR}/{name}"
    return volumes, frozenset(config)


def _storage_volume(
    storage: StorageVolumes, name: str, kind: str, volume: Mapping[str, object], where: str
) -> str:
    """A hostPath or persistentVolumeClaim volume: the node's folder to bind."""
    if kind == "hostPath":
        return storage.host_path(name, volume[kind], where=f"{where}.hostPath")
    return storage.claim(name, volume[kind], where=f"{where}.persistentVolumeClaim")


def container_binds(
    container: Mapping[str, object],
    *,
    where: str,
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    inputs: PodInputs,
    pod_dir: PurePosixPath,
    read_only: Collection[str] = frozenset(),
) -> Iterator[str]:
    """The container's `--bind` specifications, one per volumeMount: the volume's folder (or a
    `subPath` in it) at `mountPath`, read-only (`:ro`) when the mount says so, and always for
    configMap, secret and projected volumes and the `read_only` storage volumes."""
    mounts = expect_objects(container.get("volumeMounts"), f"{where}.volumeMounts")
    for index, mount in enumerate(mounts):
        at = f"{where}.volumeMounts[{index}]"
        for key in sorted(set(mount) - _MOUNT_HONOURED):
            if not (key == "mountPropagation" and mount[key] in (None, "None")):
                raise InvalidPodSpec(f"{at}.{key}", "is not supported yet")
        volume = mount.get("name")
        if not isinstance(volume, str) or volume not in volumes:
            raise InvalidPodSpec(f"{at}.name", f"{volume!r} is not a volume of the pod")
        source = _mount_source(volumes[volume], mount.get("subPath"), at)
        if volume in config_volumes and mount.get("subPath"):
            # The kubelet wrote the volume's files; a subPath must name one of them.
            written = {
                path
                for file in inputs.volumes.get(volume, ())
                for path in _with_parents(PurePosixPath(file.path))
            }
            if PurePosixPath(str(mount["subPath"])) not in written:
                raise InvalidPodSpec(
                    f"{at}.subPath", f"{mount['subPath']!r} is not a file of volume {volume}"
                )
        target = mount.get("mountPath")
        if not isinstance(target, str) or not target.startswith("/"):
            raise InvalidPodSpec(f"{at}.mountPath", "must be an absolute path")
        _check_bind_path(target, f"{at}.mountPath")
        spec = f"{pod_dir / source}:{target}"
        # configMap and secret volumes are read-only, as in Kubernetes.
        bound_read_only = (
            mount.get("readOnly") is True or volume in config_volumes or volume in read_only
        )
        yield f"{spec}:ro" if bound_read_only else spec


def _with_parents(path: PurePosixPath) -> list[PurePosixPath]:
    return [path, *path.parents][:-1]


def _mount_source(folder: str, sub_path: object, at: str) -> str:
    if sub_path in (None, ""):
        return folder
    if not isinstance(sub_path, str):
        raise InvalidPodSpec(f"{at}.subPath", "must be a string")
    parts = PurePosixPath(sub_path).parts
    if sub_path.startswith("/") or ".." in parts:
        raise InvalidPodSpec(f"{at}.subPath", "must be a relative path inside the volume")
    _check_bind_path(sub_path, f"{at}.subPath")
    return "/".join((folder, *parts))


def volume_dirs(
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    *,
    managed: Collection[str] = frozenset(),
) -> set[str]:
    """Folders the script creates before any container starts: the emptyDir volumes
    (configMap and secret volumes are the kubelet's; the `managed` storage volumes' own
    folders are the node's or the storage block's)."""
    return {
        folder
        for name, folder in volumes.items()
        if name not in config_volumes and name not in managed
    }


def sub_path_dirs(
    volumes: Mapping[str, str],
    config_volumes: frozenset[str],
    container: Mapping[str, object],
) -> tuple[str, ...]:
    """The folders of one container's subPaths, which the script creates just before that
    container starts, as the kubelet does: not before. An init container may create the
    path itself (Argo's init puts an input artifact there, and refuses a folder in its way)."""
    folders = set()
    for mount in expect_objects(container.get("volumeMounts"), "volumeMounts"):
        name = str(mount["name"])
        if mount.get("subPath") and name not in config_volumes:
            folders.add(_mount_source(volumes[name], mount["subPath"], ""))
    return tuple(sorted(folders))


def _check_bind_path(path: str, where: str) -> None:
    check_text(path, where)
    problem = bind_path_problem(path)
    if problem:
        raise InvalidPodSpec(where, problem)
