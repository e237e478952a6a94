"""Projected and downwardAPI volumes: files the kubelet makes from the pod itself, from
ConfigMaps and Secrets, and from service-account tokens.

A projected volume gathers `sources` into one folder: `serviceAccountToken` (a token the API
server issues for the pod, see kubelet_py.loops.tokens), `configMap` and `secret` keys, and
`downwardAPI` items. A downwardAPI volume holds only downward API items: the pod's name,
namespace, UID, labels, annotations, node and service account (`fieldRef`), and its
containers' requests and limits (`resourceFieldRef`). The default `kube-api-access-*` volume
the API server's ServiceAccount admission adds to every pod is one of these, so a pod needs
them to run at all without `automountServiceAccountToken: false`.

The provider calls `resolve` before rendering, beside kubelet_py.pod.inputs.resolve: every file
but the tokens is known then, and the token sources are returned for the provider to have
them issued. `with_tokens` then puts everything into the pod's inputs, which render binds
read-only like configMap and secret volumes and the provider writes into the pod folder.

Pure apart from the lookup it is given: no I/O of its own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.environment import resource_field
from kubelet_py.pod.inputs import (
    CONFIG_MAP,
    DEFAULT_MODE,
    SECRET,
    ObjectLookup,
    PodInputs,
    VolumeFile,
    _mode,
    _volume_files,
    file_path,
    object_data,
)

DEFAULT_EXPIRATION_S = 3600
"""A serviceAccountToken source's expirationSeconds when it gives none (Kubernetes')."""
MIN_EXPIRATION_S = 600
"""The shortest token lifetime Kubernetes allows."""

_PROJECTED_FIELDS = frozenset({"sources", "defaultMode"})
_DOWNWARD_FIELDS = frozenset({"items", "defaultMode"})
_SOURCE_FIELDS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "serviceAccountToken": frozenset({"audience", "expirationSeconds", "path"}),
        "configMap": frozenset({"name", "items", "optional"}),
        "secret": frozenset({"name", "items", "optional"}),
        "downwardAPI": frozenset({"items"}),
    }
)
_ITEM_FIELDS = frozenset({"path", "fieldRef", "resourceFieldRef", "mode"})
_FIELD_PATHS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "metadata.uid": ("metadata", "uid"),
        "metadata.labels": ("metadata", "labels"),
        "metadata.annotations": ("metadata", "annotations"),
        "spec.nodeName": ("spec", "nodeName"),
        "spec.serviceAccountName": ("spec", "serviceAccountName"),
    }
)
#: `metadata.labels['app']`: one label or annotation.
_SUBSCRIPT = re.compile(r"(metadata\.(?:labels|annotations))\['([^']+)'\]")


@dataclass(frozen=True)
class TokenSource:
    """One `serviceAccountToken` source of a projected volume."""

    volume: str
    """The projected volume's name."""
    path: str
    """The token file, relative to the volume's folder."""
    audience: str
    """The audience the token is for; "" is the API server's own."""
    expiration_s: int
    """The lifetime asked for (expirationSeconds)."""
    mode: int
    """The file's mode: the volume's defaultMode narrowed as for secrets (0400 or 0600)."""


@dataclass(frozen=True)
class ProjectedInputs:
    """A pod's projected and downwardAPI volumes, resolved but for their tokens."""

    files: Mapping[str, tuple[VolumeFile, ...]] = dataclasses.field(default_factory=dict)
    """Volume name -> its files other than tokens, for every projected and downwardAPI
    volume (empty for a volume that holds only tokens)."""

    tokens: tuple[TokenSource, ...] = ()
    """The token sources, for the provider to have issued."""

    secret_volumes: frozenset[str] = frozenset()
    """The volumes holding a secret key or a token."""


def resolve(pod: Mapping[str, Any], lookup: ObjectLookup) -> ProjectedInputs:
    """Every projected and downwardAPI volume's files, each ConfigMap and Secret looked up
    once; the tokens are left to the caller.

    Raises InvalidPodSpec naming the field for a source or item hpk cannot make, and
    MissingReference for a ConfigMap, Secret or key that is neither there nor optional.
    """
    metadata = pod.get("metadata") or {}
    namespace = str(metadata.get("namespace", ""))
    data_of = object_data(lookup, namespace)

    files: dict[str, tuple[VolumeFile, ...]] = {}
    tokens: list[TokenSource] = []
    secret: set[str] = set()
    for where, name, kind, source in _volumes(pod):
        default_mode = _mode(source.get("defaultMode", DEFAULT_MODE), f"{where}.defaultMode")
        made: list[VolumeFile] = []
        paths: set[str] = set()
        if kind == "downwardAPI":
            made += _downward_files(source, where, pod=pod, default_mode=default_mode)
        for at, source_kind, projection in _sources(source, where):
            if source_kind == "serviceAccountToken":
                token = _token_source(projection, at, volume=name, default_mode=default_mode)
                _claim(paths, token.path, f"{at}.path")
                tokens.append(token)
                secret.add(name)
            elif source_kind == "downwardAPI":
                made += _downward_files(projection, at, pod=pod, default_mode=default_mode)
            else:
                object_kind = CONFIG_MAP if source_kind == "configMap" else SECRET
                made += _volume_files(
                    {**projection, "defaultMode": default_mode},
                    at=at,
                    kind=object_kind,
                    name=_object_name(projection, at),
                    namespace=namespace,
                    data_of=data_of,
                )
                if object_kind == SECRET:
                    secret.add(name)
        for file in made:
            _claim(paths, file.path, f"{where}: {file.path}")
        files[name] = tuple(made)
    return ProjectedInputs(
        files=MappingProxyType(files), tokens=tuple(tokens), secret_volumes=frozenset(secret)
    )


def token_sources(pod: Mapping[str, Any]) -> tuple[TokenSource, ...]:
    """The pod's token sources alone (no lookup): what a restarted kubelet keeps fresh."""
    found = []
    for where, name, kind, source in _volumes(pod):
        if kind != "projected":
            continue
        default_mode = _mode(source.get("defaultMode", DEFAULT_MODE), f"{where}.defaultMode")
        for at, source_kind, projection in _sources(source, where):
            if source_kind == "serviceAccountToken":
                found.append(_token_source(projection, at, volume=name, default_mode=default_mode))
    return tuple(found)


def with_tokens(
    inputs: PodInputs, projected: ProjectedInputs, tokens: Mapping[TokenSource, bytes]
) -> PodInputs:
    """The pod's inputs with its projected and downwardAPI volumes, tokens included."""
    volumes = dict(inputs.volumes)
    for name, files in projected.files.items():
        volumes[name] = files
    for source in projected.tokens:
        if source not in tokens:
            raise ValueError(f"volume {source.volume}: token {source.path} was not issued")
        token = VolumeFile(path=source.path, data=tokens[source], mode=source.mode)
        volumes[source.volume] = (*volumes.get(source.volume, ()), token)
    return dataclasses.replace(
        inputs,
        volumes=MappingProxyType(volumes),
        secret_volumes=inputs.secret_volumes | projected.secret_volumes,
    )


def format_map(values: Mapping[str, str]) -> str:
    """Labels or annotations as Kubernetes writes them into a file: `key="value"` lines,
    sorted by key, each value quoted as Go's %q does, no newline after the last."""
    return "\n".join(f"{key}={_go_quote(values[key])}" for key in sorted(values))


def _go_quote(text: str) -> str:
    escapes = {
        '"': '\\"',
        "\\": "\\\\",
        "\a": "\\a",
        "\b": "\\b",
        "\f": "\\f",
        "\n": "\\n",
        "\r": "\\r",
        "\t": "\\t",
        "\v": "\\v",
    }
    out = []
    for character in text:
        code = ord(character)
        if character in escapes:
            out.append(escapes[character])
        elif character.isprintable():
            out.append(character)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _volumes(pod: Mapping[str, Any]) -> Iterator[tuple[str, str, str, Mapping[str, Any]]]:
    """(field, volume name, kind, source) of each projected and downwardAPI volume."""
    spec = pod.get("spec") or {}
    for index, volume in enumerate(_list(spec.get("volumes"), "spec.volumes")):
        if not isinstance(volume, Mapping):
            continue
        for kind, known in (("projected", _PROJECTED_FIELDS), ("downwardAPI", _DOWNWARD_FIELDS)):
            if volume.get(kind) is None:
                continue
            where = f"spec.volumes[{index}].{kind}"
            source = _object(volume[kind], where)
            unknown = sorted(set(source) - known)
            if unknown:
                raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
            yield where, str(volume.get("name", "")), kind, source


def _sources(source: Mapping[str, Any], where: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(field, kind, projection) of each of a projected volume's sources."""
    for index, entry in enumerate(_list(source.get("sources"), f"{where}.sources")):
        at = f"{where}.sources[{index}]"
        kinds = sorted(key for key, value in _object(entry, at).items() if value is not None)
        if len(kinds) != 1:
            raise InvalidPodSpec(at, "must name exactly one source")
        kind = kinds[0]
        if kind not in _SOURCE_FIELDS:
            raise InvalidPodSpec(
                f"{at}.{kind}",
                f"is not supported yet; supported: {', '.join(sorted(_SOURCE_FIELDS))}",
            )
        projection = _object(entry[kind], f"{at}.{kind}")
        unknown = sorted(set(projection) - _SOURCE_FIELDS[kind])
        if unknown:
            raise InvalidPodSpec(f"{at}.{kind}.{unknown[0]}", "is not supported yet")
        yield f"{at}.{kind}", kind, projection


def _token_source(
    projection: Mapping[str, Any], at: str, *, volume: str, default_mode: int
) -> TokenSource:
    path = file_path(projection.get("path"), f"{at}.path")
    audience = projection.get("audience") or ""
    if not isinstance(audience, str):
        raise InvalidPodSpec(f"{at}.audience", "must be a string")
    expiration = projection.get("expirationSeconds", DEFAULT_EXPIRATION_S)
    if isinstance(expiration, bool) or not isinstance(expiration, int):
        raise InvalidPodSpec(f"{at}.expirationSeconds", "must be a whole number of seconds")
    if expiration < MIN_EXPIRATION_S:
        raise InvalidPodSpec(
            f"{at}.expirationSeconds", f"{expiration} is less than {MIN_EXPIRATION_S} seconds"
        )
    # A token is a credential: never readable by others, always by the user, as secrets.
    return TokenSource(
        volume=volume,
        path=path,
        audience=audience,
        expiration_s=expiration,
        mode=0o400 | (default_mode & 0o200),
    )


def _downward_files(
    source: Mapping[str, Any], where: str, *, pod: Mapping[str, Any], default_mode: int
) -> list[VolumeFile]:
    files = []
    for index, item in enumerate(_list(source.get("items"), f"{where}.items")):
        at = f"{where}.items[{index}]"
        entry = _object(item, at)
        unknown = sorted(set(entry) - _ITEM_FIELDS)
        if unknown:
            raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
        path = file_path(entry.get("path"), f"{at}.path")
        mode = _mode(entry["mode"], f"{at}.mode") if "mode" in entry else default_mode
        kinds = [key for key in ("fieldRef", "resourceFieldRef") if entry.get(key) is not None]
        if len(kinds) != 1:
            raise InvalidPodSpec(at, "must name exactly one of fieldRef and resourceFieldRef")
        ref = _object(entry[kinds[0]], f"{at}.{kinds[0]}")
        if kinds[0] == "fieldRef":
            value = _field_value(ref, f"{at}.fieldRef", pod)
        else:
            value = _resource_value(ref, f"{at}.resourceFieldRef", pod)
        files.append(VolumeFile(path=path, data=value.encode(), mode=mode))
    return files


def _field_value(ref: Mapping[str, Any], at: str, pod: Mapping[str, Any]) -> str:
    path = ref.get("fieldPath")
    unknown = sorted(set(ref) - {"fieldPath", "apiVersion"})
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
    if ref.get("apiVersion") not in (None, "", "v1"):
        raise InvalidPodSpec(f"{at}.apiVersion", f"{ref['apiVersion']!r} is not v1")
    subscript = _SUBSCRIPT.fullmatch(path) if isinstance(path, str) else None
    if subscript is not None:
        part, key = _FIELD_PATHS[subscript.group(1)]
        values = (pod.get(part) or {}).get(key) or {}
        return str(values.get(subscript.group(2), ""))
    if not isinstance(path, str) or path not in _FIELD_PATHS:
        raise InvalidPodSpec(
            f"{at}.fieldPath",
            f"{path!r} is not supported; supported: {', '.join(sorted(_FIELD_PATHS))} "
            "and metadata.labels['<key>'], metadata.annotations['<key>']",
        )
    part, key = _FIELD_PATHS[path]
    found = (pod.get(part) or {}).get(key)
    if key in ("labels", "annotations"):
        return format_map({str(k): str(v) for k, v in (found or {}).items()})
    return str(found) if found is not None else ""


def _resource_value(ref: Mapping[str, Any], at: str, pod: Mapping[str, Any]) -> str:
    """A resourceFieldRef's value; in a volume it must name its container."""
    wanted = ref.get("containerName")
    if not isinstance(wanted, str) or not wanted:
        raise InvalidPodSpec(f"{at}.containerName", "must name a container in a volume")
    spec = pod.get("spec") or {}
    for group in ("initContainers", "containers"):
        for container in _list(spec.get(group), f"spec.{group}"):
            if isinstance(container, Mapping) and container.get("name") == wanted:
                return resource_field(ref, at, container=container, pod=pod)
    raise InvalidPodSpec(f"{at}.containerName", f"{wanted!r} is not a container")


def _object_name(projection: Mapping[str, Any], at: str) -> str:
    name = projection.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidPodSpec(f"{at}.name", "must be a non-empty string")
    return name


def _claim(paths: set[str], path: str, where: str) -> None:
    """Two sources may not write the same file, nor a file where another makes a folder."""
    parts = path.strip("/").split("/")
    prefixes = {"/".join(parts[:end]) for end in range(1, len(parts))}
    taken = "/".join(parts)
    if taken in paths or prefixes & paths or any(p.startswith(f"{taken}/") for p in paths):
        raise InvalidPodSpec(where, f"{path!r} clashes with another file of the volume")
    paths.add(taken)


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidPodSpec(where, "must be an object")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPodSpec(where, "must be a list")
    return value
