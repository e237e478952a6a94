"""A container's environment, as Kubernetes sets it: the `kubernetes` service's variables,
then `envFrom`, then `env` (`value`, and `valueFrom` a ConfigMap, a Secret, a field of the
pod or a container's resources), with Kubernetes' `$(VAR)` expansion; and the env file
Apptainer reads it from.

Environment values never appear on a command line or in the job script (unless `command` or
`args` reference them as `$(VAR)`, which earns a Warning when the value is a Secret's): they
go to `env/<container>` files that the caller writes 0600 into the pod folder, and Apptainer
reads them with `--env-file`. Values from ConfigMaps and Secrets come resolved
(kubelet_py.pod.inputs): this module only places them.

Pure: no I/O.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.pod.fields import check_text, containers_of, expect_objects
from kubelet_py.pod.inputs import PodInputs
from kubelet_py.pod.resources import parse_quantity

SKIPPED_ENV = "InvalidEnvironmentVariableNames"
"""The Event reason for envFrom keys left out (Kubernetes' own)."""
SECRET_IN_ARGUMENTS = "SecretInArguments"  # noqa: S105 (an Event reason)
"""The Event reason for a Secret's value expanded into `command` or `args`."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Apptainer's --env-file ignores these names (or sets them itself), so a pod cannot set them.
_ENV_RESERVED = frozenset({"HOME", "PWD", "UID", "GID", "EUID", "IFS", "OPTIND"})
#: fieldRef paths and what they read; the node's address is only known where the job runs.
_FIELD_PATHS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "metadata.name": ("metadata", "name"),
        "metadata.namespace": ("metadata", "namespace"),
        "metadata.uid": ("metadata", "uid"),
        "spec.nodeName": ("spec", "nodeName"),
        "spec.serviceAccountName": ("spec", "serviceAccountName"),
    }
)
_NODE_IP_PATHS = {"status.podIP": "pod_ip", "status.hostIP": "node_ip"}
"""fieldRefs the job fills in where it runs, and the job script's variable for each: the
node's address, and the pod's (the node's too, off the pod network)."""
_RESOURCE_FIELDS = frozenset({"limits.cpu", "limits.memory", "requests.cpu", "requests.memory"})


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a known VAR is replaced, an unknown one stays as written,
    and `$$` stands for one `$` (so `$$(VAR)` is the literal `$(VAR)`)."""
    out: list[str] = []
    position = 0
    while position < len(text):
        dollar = text.find("$", position)
        if dollar < 0 or dollar == len(text) - 1:
            out.append(text[position:])
            break
        out.append(text[position:dollar])
        following = text[dollar + 1]
        if following == "$":
            out.append("$")
            position = dollar + 2
        elif following == "(":
            close = text.find(")", dollar + 2)
            if close < 0:
                out.append("$(")
                position = dollar + 2
            else:
                reference = text[dollar + 2 : close]
                out.append(variables.get(reference, text[dollar : close + 1]))
                position = close + 1
        else:
            out.append(text[dollar : dollar + 2])
            position = dollar + 2
    return "".join(out)


def env_file(variables: Mapping[str, str]) -> str:
    """The environment as a file for Apptainer's --env-file, which evaluates it as a shell
    script without running commands: every value single-quoted, so it stays literal."""
    lines = ["# Read by apptainer --env-file; every value is a literal string."]
    lines += [f"{name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join(lines) + "\n"


def container_environment(
    container: Mapping[str, object],
    where: str,
    *,
    pod: Mapping[str, object],
    inputs: PodInputs,
    warnings: list[tuple[str, str]],
    base: Mapping[str, str] = MappingProxyType({}),
) -> tuple[dict[str, str], list[tuple[str, str]], set[str]]:
    """The container's variables as Kubernetes sets them: `base` (the `kubernetes` service's)
    first, then `envFrom`, then `env`, a later entry replacing an earlier one; `$(VAR)`
    expanded in `value` entries only. Also returns the variables the job sets where it runs,
    each with the job script's variable (`node_ip`, `pod_ip`), and those whose values come
    from a Secret (directly or through `$(VAR)`)."""
    variables: dict[str, str] = dict(base)
    node_ip: list[tuple[str, str]] = []
    secret: set[str] = set()

    def assign(name: str, value: str | _JobValue, *, from_secret: bool = False) -> None:
        variables.pop(name, None)
        secret.discard(name)
        node_ip[:] = [entry for entry in node_ip if entry[0] != name]
        if isinstance(value, _JobValue):
            node_ip.append((name, value.variable))
        else:
            variables[name] = value
            if from_secret:
                secret.add(name)

    for variable, value, from_secret in _env_from(
        container, where, inputs=inputs, warnings=warnings
    ):
        assign(variable, value, from_secret=from_secret)
    for index, entry in enumerate(expect_objects(container.get("env"), f"{where}.env")):
        at = f"{where}.env[{index}]"
        unknown = sorted(set(entry) - {"name", "value", "valueFrom"})
        if unknown:
            raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
        name = entry.get("name")
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise InvalidPodSpec(
                f"{at}.name",
                f"{name!r} cannot be set under Apptainer: names are letters, digits and '_', "
                "not starting with a digit",
            )
        if name in _ENV_RESERVED:
            raise InvalidPodSpec(f"{at}.name", f"Apptainer does not let a container set {name}")
        if entry.get("valueFrom") is not None:
            if entry.get("value"):
                raise InvalidPodSpec(f"{at}.valueFrom", "may not be given with a value")
            found = _value_from(entry["valueFrom"], at, container=container, pod=pod, inputs=inputs)
            if found is not _UNSET:  # taken as it is: Kubernetes expands `value` only
                from_secret = "secretKeyRef" in _mapping(entry["valueFrom"], at)
                assign(name, found, from_secret=from_secret)
            continue
        text = entry.get("value", "")
        if not isinstance(text, str):
            raise InvalidPodSpec(f"{at}.value", "must be a string")
        check_text(text, f"{at}.value", controls=True)
        value = expand(text, variables)
        assign(name, value, from_secret=value != expand(text, _without(variables, secret)))
    return variables, node_ip, secret


def _without(variables: Mapping[str, str], names: Collection[str]) -> dict[str, str]:
    return {name: value for name, value in variables.items() if name not in names}


def warn_of_secrets_in_words(
    written: Mapping[str, Sequence[str]],
    where: str,
    variables: Mapping[str, str],
    secret: Collection[str],
    warnings: list[tuple[str, str]],
) -> None:
    """A Warning when `written` (`command` and `args`, as the pod gives them) expand a variable
    of a Secret: Kubernetes expands it, so its value is in the job script and on the process's
    argv, which every user of the node can read (`ps`)."""
    if not secret:
        return
    public = _without(variables, secret)
    for key, words in written.items():
        for index, word in enumerate(words):
            if expand(word, variables) != expand(word, public):
                used = sorted(name for name in secret if f"$({name})" in word)
                warnings.append(
                    (
                        SECRET_IN_ARGUMENTS,
                        f"{where}.{key}[{index}] expands {', '.join(used) or 'a variable'} "
                        "from a Secret: its value is in the job script and on the process's "
                        "command line, which other users of the node can read; pass it as a "
                        "variable or a file instead",
                    )
                )


def service_links(services: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The variables Kubernetes gives a container for each Service of its namespace that has
    a ClusterIP (`enableServiceLinks`): `<NAME>_SERVICE_HOST`, `_SERVICE_PORT` (and one per
    named port), and the Docker-link style `<NAME>_PORT…` ones."""
    variables: dict[str, str] = {}
    for service in sorted(services, key=lambda s: str((s.get("metadata") or {}).get("name"))):
        name = str((service.get("metadata") or {}).get("name", ""))
        spec = service.get("spec") or {}
        host = spec.get("clusterIP")
        ports = [p for p in spec.get("ports") or [] if isinstance(p, Mapping)]
        if not name or not isinstance(host, str) or host in ("", "None") or not ports:
            continue
        if not all(isinstance(p.get("port"), int) for p in ports):
            continue
        prefix = name.upper().replace("-", "_")
        if not _ENV_NAME.fullmatch(prefix) or not _ADDRESS.fullmatch(host):
            continue
        shown = f"[{host}]" if ":" in host else host
        first = ports[0]
        variables[f"{prefix}_SERVICE_HOST"] = host
        variables[f"{prefix}_SERVICE_PORT"] = str(first["port"])
        variables[f"{prefix}_PORT"] = f"{_protocol(first)}://{shown}:{first['port']}"
        for port in ports:
            port_name = str(port.get("name") or "").upper().replace("-", "_")
            if port_name and _ENV_NAME.fullmatch(port_name):
                variables[f"{prefix}_SERVICE_PORT_{port_name}"] = str(port["port"])
            protocol = _protocol(port)
            link = f"{prefix}_PORT_{port['port']}_{protocol.upper()}"
            variables[link] = f"{protocol}://{shown}:{port['port']}"
            variables[f"{link}_PROTO"] = protocol
            variables[f"{link}_PORT"] = str(port["port"])
            variables[f"{link}_ADDR"] = host
    return variables


_ADDRESS = re.compile(r"[0-9A-Fa-f.:]+")
"""A ClusterIP as the API server writes it (IPv4 or IPv6), nothing a shell could read."""


def _protocol(port: Mapping[str, Any]) -> str:
    protocol = str(port.get("protocol") or "TCP").lower()
    return protocol if protocol in ("tcp", "udp", "sctp") else "tcp"


def service_variables(service: tuple[str, int] | None) -> dict[str, str]:
    """The variables Kubernetes gives every container for the `kubernetes` service, pointing
    at `service` (host, port); none without one."""
    if service is None:
        return {}
    host, port = service
    url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    prefix = f"KUBERNETES_PORT_{port}_TCP"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": url,
        prefix: url,
        f"{prefix}_PROTO": "tcp",
        f"{prefix}_PORT": str(port),
        f"{prefix}_ADDR": host,
    }


def _env_from(
    container: Mapping[str, object],
    where: str,
    *,
    inputs: PodInputs,
    warnings: list[tuple[str, str]],
) -> Iterator[tuple[str, str, bool]]:
    """(name, value, whether from a Secret) of each variable of `envFrom`."""
    for index, entry in enumerate(expect_objects(container.get("envFrom"), f"{where}.envFrom")):
        at = f"{where}.envFrom[{index}]"
        unknown = sorted(set(entry) - {"configMapRef", "secretRef", "prefix"})
        if unknown:
            raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not supported yet")
        prefix = entry.get("prefix") or ""
        if not isinstance(prefix, str):
            raise InvalidPodSpec(f"{at}.prefix", "must be a string")
        sources = [key for key in ("configMapRef", "secretRef") if entry.get(key) is not None]
        if len(sources) != 1:
            raise InvalidPodSpec(at, "must name exactly one of configMapRef and secretRef")
        _reference(entry[sources[0]], f"{at}.{sources[0]}", ("name",))
        if at not in inputs.env_from:
            raise ValueError(f"{at}: its ConfigMap or Secret was not resolved")
        for key, value in sorted(inputs.env_from[at].items()):
            name = prefix + key
            if not _ENV_NAME.fullmatch(name) or name in _ENV_RESERVED:
                # As Kubernetes does: keys that are no variable names are skipped, and said.
                warnings.append(
                    (
                        SKIPPED_ENV,
                        f"{at}: {name!r} is not a variable a container can have, skipped",
                    )
                )
                continue
            check_text(value, at, controls=True)
            yield name, value, sources[0] == "secretRef"


_UNSET = "\0unset"
"""What an optional reference to a missing object or key gives: the variable is not set."""


@dataclass(frozen=True)
class _JobValue:
    """A value the job script fills in where it runs: its variable."""

    variable: str


def _value_from(
    value_from: object,
    at: str,
    *,
    container: Mapping[str, object],
    pod: Mapping[str, object],
    inputs: PodInputs,
) -> str | _JobValue:
    """One `valueFrom`: its value, what the job fills in (an address), or _UNSET."""
    source = _mapping(value_from, f"{at}.valueFrom")
    kinds = sorted(key for key, value in source.items() if value is not None)
    if len(kinds) != 1:
        raise InvalidPodSpec(f"{at}.valueFrom", "must name exactly one source")
    kind = kinds[0]
    where = f"{at}.valueFrom.{kind}"
    ref = _mapping(source[kind], where)
    if kind in ("configMapKeyRef", "secretKeyRef"):
        _reference(ref, where, ("name", "key"))
        if at not in inputs.env_values:
            raise ValueError(f"{where}: its ConfigMap or Secret was not resolved")
        resolved = inputs.env_values[at]
        if resolved is None:
            return _UNSET
        check_text(resolved, where, controls=True)
        return resolved
    if kind == "fieldRef":
        path = ref.get("fieldPath")
        if isinstance(path, str) and path in _NODE_IP_PATHS:
            return _JobValue(_NODE_IP_PATHS[path])
        if not isinstance(path, str) or path not in _FIELD_PATHS:
            raise InvalidPodSpec(
                f"{where}.fieldPath",
                f"{path!r} is not supported; supported: "
                f"{', '.join(sorted([*_FIELD_PATHS, *_NODE_IP_PATHS]))}",
            )
        part, key = _FIELD_PATHS[path]
        found = _mapping(pod.get(part), part).get(key)
        return str(found) if found is not None else ""
    if kind == "resourceFieldRef":
        return resource_field(ref, where, container=container, pod=pod)
    raise InvalidPodSpec(where, "is not supported yet")


def _reference(ref: object, where: str, keys: Sequence[str]) -> None:
    reference = _mapping(ref, where)
    for key in keys:
        value = reference.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidPodSpec(f"{where}.{key}", "must be a non-empty string")
    optional = reference.get("optional")
    if optional is not None and not isinstance(optional, bool):
        raise InvalidPodSpec(f"{where}.optional", "must be true or false")


def resource_field(
    ref: Mapping[str, object],
    where: str,
    *,
    container: Mapping[str, object],
    pod: Mapping[str, object],
) -> str:
    """A resourceFieldRef's value, rounded up in units of its divisor. A limit that is not set
    reads as the request (the job gets its request), a request as the limit, both as 0."""
    resource = ref.get("resource")
    if resource not in _RESOURCE_FIELDS:
        raise InvalidPodSpec(
            f"{where}.resource",
            f"{resource!r} is not supported; supported: {', '.join(sorted(_RESOURCE_FIELDS))}",
        )
    target = container
    wanted = ref.get("containerName")
    if wanted not in (None, "", container.get("name")):
        spec = _mapping(pod.get("spec"), "spec")
        named = [
            other
            for key in ("initContainers", "containers")
            for other in containers_of(spec, key)
            if other.get("name") == wanted
        ]
        if not named:
            raise InvalidPodSpec(f"{where}.containerName", f"{wanted!r} is not a container")
        target = named[0]
    kind, _, name = str(resource).partition(".")
    other = "requests" if kind == "limits" else "limits"
    resources = _mapping(target.get("resources"), f"{where}.resources")
    text = _mapping(resources.get(kind), kind).get(name)
    if text is None:
        text = _mapping(resources.get(other), other).get(name, "0")
    quantity = parse_quantity(text, field=f"{where}.resource")
    divisor = parse_quantity(ref.get("divisor") or "1", field=f"{where}.divisor")
    if divisor <= 0:
        raise InvalidPodSpec(f"{where}.divisor", "must be positive")
    return str(math.ceil(quantity / divisor))
