"""The pod spec fields hpk accepts, and the checks every reader of the spec shares.

Every field of a pod is accounted for: honoured by rendering, handled by another layer or
true of every hpk pod anyway (the `_ELSEWHERE` tables say which and why), or refused with an
InvalidPodSpec that names it; none is dropped in silence. The small readers here (lists,
names, text that must reach a process unchanged) are the ones the environment, the mounts,
the command line and the job script all use, so that a field is refused in the same words
wherever it is read.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(rf"{DNS_LABEL.pattern}(\.{DNS_LABEL.pattern})*")
OBJECT_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")

# What the pod spec may hold: fields rendering reads (honoured or checked), and fields whose
# values need no check, with the reason.
_POD_HONOURED = frozenset(
    {
        "containers",
        "initContainers",
        "volumes",
        "activeDeadlineSeconds",
        # on the pod network (kubelet_py.pod.network); warned of on the node's
        "hostname",
        "subdomain",
        "hostAliases",
        "dnsConfig",
        "setHostnameAsFQDN",
        "enableServiceLinks",
    }
)
_POD_CHECKED = frozenset({"restartPolicy", "securityContext", "dnsPolicy", "os"})
_ELSEWHERE: Mapping[str, str] = MappingProxyType(
    {
        "hostNetwork": "true: the pod keeps the node's network (kubelet_py.pod.network)",
        "hostPID": "true: the containers share the node's PID namespace (no --pid)",
        "hostIPC": "containers always share the node's IPC namespace",
        "shareProcessNamespace": "true: the containers share the node's PID namespace, which "
        "holds the pod's (no --pid)",
        "nodeName": "the kubelet binds every pod to its node",
        "nodeSelector": "the kubelet's nodes stand for Slurm partitions",
        "affinity": "Slurm places the job",
        "tolerations": "Slurm places the job",
        "topologySpreadConstraints": "Slurm places the job",
        "schedulerName": "the kubelet binds every pod to its node",
        "schedulingGates": "the API server holds gated pods back",
        "priority": "Slurm orders its queue",
        "priorityClassName": "Slurm orders its queue",
        "preemptionPolicy": "Slurm orders its queue",
        "terminationGracePeriodSeconds": "deletion waits this long before Slurm kills the job "
        "(render gives it to the launchers, which bound preStop hooks by it)",
        "serviceAccountName": "the token comes as a projected volume",
        "serviceAccount": "the token comes as a projected volume",
        "automountServiceAccountToken": "the token comes as a projected volume",
        "imagePullSecrets": "images are pulled into the SIF cache before rendering",
    }
)
_CONTAINER_HONOURED = frozenset(
    {
        "name",
        "image",
        "command",
        "args",
        "workingDir",
        "env",
        "envFrom",
        "resources",
        "volumeMounts",
        "terminationMessagePath",
        "terminationMessagePolicy",
        # checked and written for the launcher by kubelet_py.pod.probe_spec and hook_spec
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
        "lifecycle",
    }
)
_CONTAINER_CHECKED = frozenset({"stdin", "stdinOnce", "tty", "securityContext", "restartPolicy"})
_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_CONTAINER_ELSEWHERE: Mapping[str, str] = MappingProxyType(
    {
        "imagePullPolicy": "images are pulled into the SIF cache before rendering",
        "ports": "informational: every port of a pod can be reached at its address",
        "resizePolicy": "hpk never resizes a running pod",
    }
)
_DNS_POLICIES = frozenset({"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"})


def check_pod_fields(spec: Mapping[str, object]) -> None:
    """Refuse a pod spec field hpk does not know, and the pod-wide values it cannot honour."""
    unknown = sorted(set(spec) - _POD_HONOURED - _POD_CHECKED - set(_ELSEWHERE))
    if unknown:
        raise InvalidPodSpec(f"spec.{unknown[0]}", "is not supported yet")
    policy = spec.get("restartPolicy", "Always")
    if policy not in _RESTART_POLICIES:
        raise InvalidPodSpec("spec.restartPolicy", f"{policy!r} is none of {_RESTART_POLICIES}")
    dns_policy = spec.get("dnsPolicy", "ClusterFirst")
    if dns_policy not in _DNS_POLICIES:
        raise InvalidPodSpec("spec.dnsPolicy", f"{dns_policy!r} is not supported yet")
    os_name = _mapping(spec.get("os"), "spec.os").get("name", "linux")
    if os_name != "linux":
        raise InvalidPodSpec("spec.os.name", f"{os_name!r}: hpk runs Linux containers")


def check_container_fields(container: Mapping[str, object], where: str) -> None:
    """Refuse a container field hpk does not know, and input a Slurm job cannot give."""
    known = _CONTAINER_HONOURED | _CONTAINER_CHECKED | set(_CONTAINER_ELSEWHERE)
    unknown = sorted(set(container) - known)
    if unknown:
        raise InvalidPodSpec(f"{where}.{unknown[0]}", "is not supported yet")
    for key in ("stdin", "stdinOnce", "tty"):
        if not isinstance(container.get(key, False), bool):
            raise InvalidPodSpec(f"{where}.{key}", "must be true or false")


def check_unique_names(*groups: Sequence[Mapping[str, object]]) -> None:
    """Refuse two containers of one name across the groups: the name keys the container's
    env file, markers and log in the pod folder."""
    seen: set[object] = set()
    for group in groups:
        for container in group:
            name = container.get("name")
            if name in seen:
                raise InvalidPodSpec("spec", f"two containers are named {name!r}")
            seen.add(name)


def containers_of(spec: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
    """The containers under `spec.<key>` (`containers` or `initContainers`), each an object."""
    return expect_objects(spec.get(key), f"spec.{key}")


def expect_objects(value: object, where: str) -> list[Mapping[str, object]]:
    """`value` as a list of JSON objects ([] for an absent field), naming the bad item."""
    return [
        _mapping(item, f"{where}[{index}]") for index, item in enumerate(expect_list(value, where))
    ]


def expect_list(value: object, where: str) -> list[object]:
    """`value` as a list ([] for an absent field); InvalidPodSpec naming `where` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPodSpec(where, "must be a list")
    return value


def checked_name(value: object, where: str, pattern: re.Pattern[str], *, longest: int = 63) -> str:
    """`value` if it is a name `pattern` matches whole, of at most `longest` characters: names
    become file names and words of the job script."""
    if not isinstance(value, str) or len(value) > longest or not pattern.fullmatch(value):
        raise InvalidPodSpec(where, f"{value!r} is not a valid name")
    return value


def has_control(text: str) -> bool:
    """Whether `text` holds an ASCII control character (a newline among them)."""
    return any(ord(character) < 32 or ord(character) == 127 for character in text)


def check_text(text: str, where: str, *, controls: bool = False) -> None:
    """Text that must reach a process unchanged: no NUL, valid UTF-8, and maybe no control
    characters (paths and names may not hold newlines; values and arguments may)."""
    if "\0" in text:
        raise InvalidPodSpec(where, "holds a NUL character, which no process can receive")
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise InvalidPodSpec(where, "is not valid Unicode text") from error
    if not controls and has_control(text):
        raise InvalidPodSpec(where, "holds a control character")
