"""A container's securityContext, as far as Apptainer can honour it for the job's user.

A Slurm job runs as the user who submitted it, and hpk's kubelet submits every pod, so every
container starts as the kubelet's user. From there Apptainer can change identity in two ways:

- as root, `--security uid:N,gid:G` runs the container as any user and group;
- as anyone else, `--fakeroot` runs it as root inside a user namespace (uid 0 only).

Everything else a securityContext may ask for either needs no action under Apptainer, is
refused (InvalidPodSpec, naming the field) when running without it would be unsafe to pretend,
or is reported in one Warning Event per pod (`SecurityContextNotHonoured`) when the container
can run as asked apart from that detail. The table in docs/kubelet.md lists each field.

Pure: the pod's fields and the job's user in, Apptainer options and messages out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping

NOT_HONOURED = "SecurityContextNotHonoured"
"""The Event reason for what a securityContext asks and Apptainer cannot do."""

# Fields a pod's and a container's securityContext share; the container's value wins.
_SHARED = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "seLinuxOptions")
_POD_ONLY = frozenset(
    {
        "fsGroup",
        "fsGroupChangePolicy",
        "supplementalGroups",
        "supplementalGroupsPolicy",
        "sysctls",
        "appArmorProfile",
        "windowsOptions",
    }
)
_CONTAINER_ONLY = frozenset(
    {
        "privileged",
        "allowPrivilegeEscalation",
        "readOnlyRootFilesystem",
        "capabilities",
        "procMount",
        "appArmorProfile",
        "windowsOptions",
    }
)
_PROFILE_TYPES = frozenset({"RuntimeDefault", "Unconfined", "Localhost"})


@dataclass(frozen=True)
class JobUser:
    """The user and group a pod's job runs as: the kubelet's, who submits it."""

    uid: int
    gid: int


@dataclass(frozen=True)
class Identity:
    """How one container is started as its securityContext asks."""

    options: tuple[str, ...] = ()
    """Apptainer options that change the container's user and group."""
    warnings: tuple[str, ...] = ()
    """What is asked and not honoured, each naming its field."""
    runs_as: int | None = None
    """The uid the container's processes have inside it (what its HOME is looked up by);
    None when unknown."""
    writable_root: bool = True
    """Whether writes to the image's own file system succeed (private to the run, as under
    Docker); False for `readOnlyRootFilesystem: true`."""


def check_pod_context(context: Mapping[str, object], *, job_user: JobUser) -> tuple[str, ...]:
    """Check the pod-level securityContext; returns its own warnings (fsGroup and the like).

    The fields a container inherits are checked per container, by `container_identity`.
    """
    at = "spec.securityContext"
    unknown = sorted(set(context) - _POD_ONLY - set(_SHARED))
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not a pod securityContext field")
    warnings: list[str] = []
    fs_group = context.get("fsGroup")
    if fs_group is not None:
        _id(fs_group, f"{at}.fsGroup")
        if fs_group != job_user.gid:
            warnings.append(f"{at}.fsGroup {fs_group}: volumes keep the job's group {job_user.gid}")
    groups = context.get("supplementalGroups") or []
    if not isinstance(groups, list):
        raise InvalidPodSpec(f"{at}.supplementalGroups", "must be a list")
    for index, group in enumerate(groups):
        _id(group, f"{at}.supplementalGroups[{index}]")
    extra = sorted(set(groups) - {job_user.gid})
    if extra:
        warnings.append(
            f"{at}.supplementalGroups {extra}: containers have the job user's groups only"
        )
    if context.get("sysctls"):
        raise InvalidPodSpec(f"{at}.sysctls", "a container in a Slurm job cannot set sysctls")
    if _mapping(context.get("windowsOptions"), f"{at}.windowsOptions").get("hostProcess"):
        raise InvalidPodSpec(f"{at}.windowsOptions", "hpk runs Linux containers")
    warnings += _profile_warnings(context, at, ("appArmorProfile",))
    return tuple(warnings)


def container_identity(
    pod_context: Mapping[str, object],
    container_context: Mapping[str, object],
    *,
    where: str,
    job_user: JobUser,
) -> Identity:
    """The options that start one container as asked, and what cannot be honoured.

    `where` is the container's field path (`spec.containers[0]`). Raises InvalidPodSpec for
    what no container in a Slurm job may do (privileged mode, added sysctls, ...).
    """
    at = f"{where}.securityContext"
    unknown = sorted(set(container_context) - _CONTAINER_ONLY - set(_SHARED))
    if unknown:
        raise InvalidPodSpec(f"{at}.{unknown[0]}", "is not a container securityContext field")
    _refuse_impossible(container_context, at)

    def effective(key: str) -> tuple[object, str]:
        if container_context.get(key) is not None:
            return container_context[key], f"{at}.{key}"
        return pod_context.get(key), f"spec.securityContext.{key}"

    uid, uid_field = effective("runAsUser")
    gid, gid_field = effective("runAsGroup")
    non_root, _ = effective("runAsNonRoot")
    if uid is not None:
        _id(uid, uid_field)
    if gid is not None:
        _id(gid, gid_field)
    if non_root is not None and not isinstance(non_root, bool):
        raise InvalidPodSpec(f"{at}.runAsNonRoot", "must be true or false")

    if non_root and uid == 0:
        raise InvalidPodSpec(uid_field, "0 is root, which runAsNonRoot forbids")
    options, runs_as, warnings = _switch_user(
        uid, gid, fields=(uid_field, gid_field), job_user=job_user
    )
    if non_root and runs_as == 0:
        warnings.append(
            f"{at}.runAsNonRoot: the container runs as root, since hpk's kubelet (which "
            "submits the jobs) runs as root; run hpk as an ordinary user"
        )
    read_only = container_context.get("readOnlyRootFilesystem")
    if read_only is not None and not isinstance(read_only, bool):
        raise InvalidPodSpec(f"{at}.readOnlyRootFilesystem", "must be true or false")
    capabilities = _mapping(container_context.get("capabilities"), f"{at}.capabilities")
    unknown_caps = sorted(set(capabilities) - {"add", "drop"})
    if unknown_caps:
        raise InvalidPodSpec(f"{at}.capabilities.{unknown_caps[0]}", "is not a field")
    if capabilities.get("add"):
        warnings.append(
            f"{at}.capabilities.add {capabilities['add']}: unprivileged containers get no "
            "capabilities"
        )
    merged = {**{k: pod_context.get(k) for k in _SHARED}, **container_context}
    warnings += _profile_warnings(merged, at, ("seccompProfile", "appArmorProfile"))
    if merged.get("seLinuxOptions"):
        warnings.append(f"{at}.seLinuxOptions: Apptainer sets no SELinux label")
    return Identity(
        options=options, warnings=tuple(warnings), runs_as=runs_as, writable_root=not read_only
    )


def _refuse_impossible(context: Mapping[str, object], at: str) -> None:
    if context.get("privileged"):
        raise InvalidPodSpec(f"{at}.privileged", "containers in Slurm jobs are never privileged")
    proc_mount = context.get("procMount")
    if proc_mount not in (None, "Default"):
        raise InvalidPodSpec(f"{at}.procMount", f"{proc_mount!r}: only Default is possible")
    if _mapping(context.get("windowsOptions"), f"{at}.windowsOptions").get("hostProcess"):
        raise InvalidPodSpec(f"{at}.windowsOptions", "hpk runs Linux containers")


def _switch_user(
    uid: object, gid: object, *, fields: tuple[str, str], job_user: JobUser
) -> tuple[tuple[str, ...], int, list[str]]:
    """Apptainer's options for running as `uid`:`gid` (None: the job's), the uid the
    container then runs as, and the warning when it cannot."""
    if uid in (None, job_user.uid) and gid in (None, job_user.gid):
        return (), job_user.uid, []
    if job_user.uid == 0:
        runs_as = uid if isinstance(uid, int) else 0
        group = gid if isinstance(gid, int) else 0
        return ("--security", f"uid:{runs_as},gid:{group}"), runs_as, []
    if uid == 0 and gid in (None, 0):
        return ("--fakeroot",), 0, []
    asked = ", ".join(
        f"{name} {value}"
        for name, value in zip(fields, (uid, gid), strict=True)
        if value is not None
    )
    return (
        (),
        job_user.uid,
        [
            f"{asked}: the job runs as uid {job_user.uid} gid {job_user.gid}, and without root "
            "Apptainer can switch only to root (--fakeroot)"
        ],
    )


def _profile_warnings(context: Mapping[str, object], at: str, keys: tuple[str, ...]) -> list[str]:
    warnings = []
    for key in keys:
        profile = _mapping(context.get(key), f"{at}.{key}")
        kind = profile.get("type")
        if kind is None:
            continue
        if kind not in _PROFILE_TYPES:
            raise InvalidPodSpec(f"{at}.{key}.type", f"{kind!r} is not a profile type")
        if kind != "Unconfined":
            warnings.append(f"{at}.{key} {kind}: Apptainer applies no such profile")
    return warnings


def _id(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise InvalidPodSpec(where, f"{value!r} is not a user or group ID")
