"""What a pod reads from other API objects: the ConfigMaps and Secrets behind its environment
(`configMapKeyRef`, `secretKeyRef`, `envFrom`) and its configMap and secret volumes.

The provider calls `resolve` before rendering, with a lookup the kubelet's entry point wires to
the API server; rendering then stays pure and takes the resolved values as they are. A
reference that cannot be met (an object or key that does not exist, and is not `optional`)
raises MissingReference: the pod waits for it, as Kubernetes leaves such a pod in
CreateContainerConfigError, and is never run without it.

Keys and `items[].path` become file names under the pod folder, written by the kubelet, so
each is checked before it becomes a path, by Kubernetes' rules. A key (`key_problem`) is
letters, digits, `-`, `_` and `.`, at most 253 characters, neither `.` nor starting with `..`
(Kubernetes keeps such names for its own files). A path
(`path_problem`) is relative, holds no `..` element, does not start with `..`, and no name
in it is longer than 255 bytes. A bad
`items[].path` fails the pod with InvalidPodSpec naming it. Kubernetes' API server never
stores a ConfigMap or Secret with a bad key, and its kubelet refuses to write a volume any of
whose files is misnamed; so a key that reaches a whole-object volume (no `items`) misnamed
fails the pod too, naming the volume and the key, and no file of that volume is written.

Pure apart from the lookup it is given: stdlib only, no I/O of its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Protocol

from kubelet_py.errors import InvalidPodSpec, MissingReference

CONFIG_MAP = "ConfigMap"
SECRET = "Secret"  # noqa: S105 (a kind, not a password)

ObjectLookup = Callable[[str, str, str], Mapping[str, Any] | None]
"""(kind, namespace, name) -> the object as the API's JSON, or None when it does not exist.
Errors reaching the API server propagate: the pod is tried again later."""

DEFAULT_MODE = 0o644
"""Kubernetes' defaultMode for configMap and secret volumes."""
SECRET_MODE_MASK = 0o600
"""Secret files are never readable by others than the user: wider modes are narrowed."""


KEY_LONGEST = 253
"""The longest ConfigMap or Secret key Kubernetes accepts."""
NAME_LONGEST = 255
"""The longest file name (one element of a path), in bytes: Linux's NAME_MAX."""
PATH_LONGEST = 4096
"""The longest volume file path Kubernetes' kubelet writes: Linux's PATH_MAX."""
_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def key_problem(key: str) -> str | None:
    """Why `key` is not a ConfigMap or Secret key Kubernetes would store, or None."""
    if not _KEY.fullmatch(key):
        return "must be letters, digits, '-', '_' and '.' only"
    if key == ".":
        return "may not be '.'"
    if key.startswith(".."):
        return "may not start with '..'"
    if len(key) > KEY_LONGEST:
        return f"is longer than {KEY_LONGEST} characters"
    return None


def path_problem(path: str) -> str | None:
    """Why `path` cannot be a file's path inside a volume, or None."""
    elements = path.split("/")
    checks = (  # the first that fails is the answer
        (
            not path or "\0" in path,
            "must be a relative path inside the volume, not empty and without NUL",
        ),
        (path.startswith("/"), "must be a relative path inside the volume, not absolute"),
        (".." in elements, "must be a relative path inside the volume, without '..'"),
        (path.startswith(".."), "must not start with '..', which Kubernetes keeps for its files"),
        (
            all(element in ("", ".") for element in elements),
            "must name a file inside the volume, not the volume itself",
        ),
        (len(path.encode()) > PATH_LONGEST, f"is longer than {PATH_LONGEST} bytes"),
        (
            any(len(element.encode()) > NAME_LONGEST for element in elements),
            f"holds a name longer than {NAME_LONGEST} bytes",
        ),
    )
    return next((problem for failed, problem in checks if failed), None)


def file_path(path: object, at: str) -> str:
    """`path` (the field `at`) as a volume file's path, normalized (`a/./b` is `a/b`);
    InvalidPodSpec naming `at` when it is none."""
    if not isinstance(path, str):
        raise InvalidPodSpec(at, "must be a relative path inside the volume")
    problem = path_problem(path)
    if problem is not None:
        raise InvalidPodSpec(at, f"{path!r} {problem}")
    return str(PurePosixPath(path))


@dataclass(frozen=True)
class VolumeFile:
    """One file of a configMap or secret volume, written by the provider before submission."""

    path: str
    """Relative to the volume's folder (`run.sh`, `conf/app.yaml`)."""
    data: bytes
    mode: int


@dataclass(frozen=True)
class PodInputs:
    """A pod's values from ConfigMaps and Secrets, keyed by the field that asked for them."""

    env_values: Mapping[str, str | None] = field(default_factory=dict)
    """`spec.containers[0].env[2]` -> the value of its configMapKeyRef or secretKeyRef; None
    for an optional reference that is not there (the variable is left unset)."""

    env_from: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """`spec.containers[0].envFrom[1]` -> the object's keys and values, before the prefix;
    empty for an optional object that is not there."""

    volumes: Mapping[str, tuple[VolumeFile, ...]] = field(default_factory=dict)
    """Volume name -> its files, for every configMap and secret volume."""

    secret_volumes: frozenset[str] = frozenset()
    """The volumes whose folders hold secrets (0700 folder, files 0400 or 0600)."""

    service_links: Mapping[str, str] = field(default_factory=dict)
    """The variables of `enableServiceLinks` (kubelet_py.pod.environment.service_links), for
    a pod on the pod network, where the Services' addresses route."""


def resolve(pod: Mapping[str, Any], lookup: ObjectLookup) -> PodInputs:
    """Look up every ConfigMap and Secret the pod refers to, each object once.

    Raises MissingReference for an object or key that is neither there nor optional, and
    InvalidPodSpec for a reference that is malformed or a value no process could receive.
    """
    metadata = pod.get("metadata") or {}
    namespace = str(metadata.get("namespace", ""))
    spec = pod.get("spec") or {}
    data_of = object_data(lookup, namespace)

    env_values: dict[str, str | None] = {}
    env_from: dict[str, Mapping[str, str]] = {}
    _resolve_env(spec, namespace, data_of, env_values=env_values, env_from=env_from)
    volumes, secrets = _resolve_volumes(spec, namespace, data_of)
    return PodInputs(
        env_values=MappingProxyType(env_values),
        env_from=MappingProxyType(env_from),
        volumes=MappingProxyType(volumes),
        secret_volumes=frozenset(secrets),
    )


class DataOf(Protocol):
    """(kind, name, field) -> a ConfigMap's or Secret's data as bytes (as text for the
    environment: `env=True`), or None when the object does not exist."""

    def __call__(
        self, kind: str, name: str, where: str, *, env: bool = False
    ) -> dict[str, bytes] | None: ...


def object_data(lookup: ObjectLookup, namespace: str) -> DataOf:
    """A DataOf over `lookup` in `namespace` that looks each object up once."""
    cache: dict[tuple[str, str], Mapping[str, Any] | None] = {}

    def data_of(kind: str, name: str, where: str, *, env: bool = False) -> dict[str, bytes] | None:
        if (kind, name) not in cache:
            cache[kind, name] = lookup(kind, namespace, name)
        found = cache[kind, name]
        return None if found is None else _data(found, kind, where, binary=not env)

    return data_of


def _resolve_env(
    spec: Mapping[str, Any],
    namespace: str,
    data_of: DataOf,
    *,
    env_values: dict[str, str | None],
    env_from: dict[str, Mapping[str, str]],
) -> None:
    for where, container in _containers(spec):
        for number, entry in enumerate(_list(container.get("envFrom"))):
            at = f"{where}.envFrom[{number}]"
            kind, ref = _one_ref(entry, at, {"configMapRef": CONFIG_MAP, "secretRef": SECRET})
            if kind is None:
                continue
            name = _ref_name(ref, "name", f"{at}.{_ref_key(kind, 'Ref')}")
            data = data_of(kind, name, at, env=True)
            if data is None:
                if ref.get("optional") is not True:
                    raise MissingReference(field=at, kind=kind, namespace=namespace, name=name)
                data = {}
            env_from[at] = MappingProxyType(
                {key: _text(value, f"{at}: {kind} {name} key {key}") for key, value in data.items()}
            )
    for where, container in _containers(spec):
        for number, entry in enumerate(_list(container.get("env"))):
            value_from = entry.get("valueFrom") if isinstance(entry, Mapping) else None
            if not isinstance(value_from, Mapping):
                continue
            at = f"{where}.env[{number}]"
            kind, ref = _one_ref(
                value_from,
                f"{at}.valueFrom",
                {"configMapKeyRef": CONFIG_MAP, "secretKeyRef": SECRET},
                others=("fieldRef", "resourceFieldRef"),
            )
            if kind is None:
                continue
            ref_field = f"{at}.valueFrom.{_ref_key(kind, 'KeyRef')}"
            name = _ref_name(ref, "name", ref_field)
            key = _ref_name(ref, "key", ref_field)
            data = data_of(kind, name, ref_field, env=True)
            optional = ref.get("optional") is True
            if data is None or key not in data:
                if not optional:
                    raise MissingReference(
                        field=ref_field,
                        kind=kind,
                        namespace=namespace,
                        name=name,
                        key=key if data is not None else "",
                    )
                env_values[at] = None
            else:
                env_values[at] = _text(data[key], f"{ref_field}: {kind} {name} key {key}")


def _resolve_volumes(
    spec: Mapping[str, Any], namespace: str, data_of: DataOf
) -> tuple[dict[str, tuple[VolumeFile, ...]], set[str]]:
    volumes: dict[str, tuple[VolumeFile, ...]] = {}
    secrets: set[str] = set()
    for index, volume in enumerate(_list(spec.get("volumes"))):
        if not isinstance(volume, Mapping):
            continue
        for source_key, kind, name_key in (
            ("configMap", CONFIG_MAP, "name"),
            ("secret", SECRET, "secretName"),
        ):
            source = volume.get(source_key)
            if source_key not in volume:
                continue
            at = f"spec.volumes[{index}].{source_key}"
            if not isinstance(source, Mapping):
                raise InvalidPodSpec(at, "must be an object")
            volume_name = str(volume.get("name", ""))
            volumes[volume_name] = _volume_files(
                source,
                at=at,
                kind=kind,
                name=_ref_name(source, name_key, at),
                namespace=namespace,
                data_of=data_of,
            )
            if kind == SECRET:
                secrets.add(volume_name)
    return volumes, secrets


def needs_node_address(pod: Mapping[str, Any]) -> bool:
    """Whether a container reads `status.podIP` or `status.hostIP` (the job script then needs
    the table of node addresses)."""
    for _where, container in _containers(pod.get("spec") or {}):
        for entry in _list(container.get("env")):
            value_from = entry.get("valueFrom") if isinstance(entry, Mapping) else None
            field_ref = value_from.get("fieldRef") if isinstance(value_from, Mapping) else None
            if isinstance(field_ref, Mapping) and field_ref.get("fieldPath") in (
                "status.podIP",
                "status.hostIP",
            ):
                return True
    return False


def _volume_files(
    source: Mapping[str, Any],
    *,
    at: str,
    kind: str,
    name: str,
    namespace: str,
    data_of: DataOf,
) -> tuple[VolumeFile, ...]:
    default_mode = _mode(source.get("defaultMode", DEFAULT_MODE), f"{at}.defaultMode")
    data = data_of(kind, name, at)
    if data is None:
        if source.get("optional") is not True:
            raise MissingReference(field=at, kind=kind, namespace=namespace, name=name)
        return ()
    items = source.get("items")
    if items is None:
        for key in sorted(data):
            problem = key_problem(key)
            if problem is not None:
                raise InvalidPodSpec(
                    at,
                    f'{kind} "{namespace}/{name}" key {key!r} {problem}, so it cannot be a '
                    "file name; the volume is not written",
                )
        wanted = [(key, key, default_mode) for key in sorted(data)]
    else:
        wanted = []
        for number, item in enumerate(_list(items)):
            item_at = f"{at}.items[{number}]"
            if not isinstance(item, Mapping):
                raise InvalidPodSpec(item_at, "must be an object")
            key = _ref_name(item, "key", item_at)
            path = file_path(item.get("path"), f"{item_at}.path")
            mode = _mode(item["mode"], f"{item_at}.mode") if "mode" in item else default_mode
            if key not in data:
                if source.get("optional") is True:
                    continue
                raise MissingReference(
                    field=f"{item_at}.key", kind=kind, namespace=namespace, name=name, key=key
                )
            wanted.append((key, path, mode))
    # Secret files are never readable by others, and always by the user: 0400 or 0600.
    return tuple(
        VolumeFile(
            path=path, data=data[key], mode=0o400 | (mode & 0o200) if kind == SECRET else mode
        )
        for key, path, mode in wanted
    )


def _data(found: Mapping[str, Any], kind: str, where: str, *, binary: bool) -> dict[str, bytes]:
    """The object's keys and their bytes: ConfigMap `data` (text) and, for volumes only as in
    Kubernetes, `binaryData`; Secret `data` (base64)."""
    data: dict[str, bytes] = {}
    if kind == CONFIG_MAP:
        for key, value in (found.get("data") or {}).items():
            data[str(key)] = str(value).encode()
        encoded = (found.get("binaryData") or {}) if binary else {}
    else:
        encoded = found.get("data") or {}
    for key, value in encoded.items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidPodSpec(where, f"{kind} key {key} is not valid base64") from error
    return data


def _text(value: bytes, where: str) -> str:
    """An environment value: text a process can receive (UTF-8 without NUL)."""
    try:
        text = value.decode()
    except UnicodeDecodeError as error:
        raise InvalidPodSpec(where, "is not UTF-8 text, which an environment needs") from error
    if "\0" in text:
        raise InvalidPodSpec(where, "holds a NUL character, which no process can receive")
    return text


def _one_ref(
    entry: object,
    at: str,
    kinds: Mapping[str, str],
    *,
    others: tuple[str, ...] = (),
) -> tuple[str | None, Mapping[str, Any]]:
    """The kind and reference of an entry that names exactly one source; render checks the
    shapes it honours itself, so anything else here is left to it (kind None)."""
    if not isinstance(entry, Mapping):
        return None, {}
    present = [key for key in (*kinds, *others) if entry.get(key) is not None]
    if len(present) != 1 or present[0] not in kinds:
        return None, {}
    ref = entry[present[0]]
    if not isinstance(ref, Mapping):
        raise InvalidPodSpec(f"{at}.{present[0]}", "must be an object")
    return kinds[present[0]], ref


def _ref_key(kind: str, suffix: str) -> str:
    return ("configMap" if kind == CONFIG_MAP else "secret") + suffix


def _ref_name(ref: Mapping[str, Any], key: str, at: str) -> str:
    value = ref.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidPodSpec(f"{at}.{key}", "must be a non-empty string")
    return value


def _mode(value: object, at: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise InvalidPodSpec(at, f"{value!r} is not a file mode (0 to 0777)")
    return value


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for group in ("initContainers", "containers"):
        for index, container in enumerate(_list(spec.get(group))):
            if isinstance(container, Mapping):
                yield f"spec.{group}[{index}]", container


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
