"""securityContext under Apptainer: which identities the job's user can take, what is refused,
and the one Warning that lists what cannot be honoured."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.render import RenderSettings, render_pod
from kubelet_py.pod.security import (
    NOT_HONOURED,
    JobUser,
    check_pod_context,
    container_identity,
)

ROOT = JobUser(0, 0)
ALICE = JobUser(1000, 1000)


def identity(container: dict[str, Any], pod: dict[str, Any] | None = None, *, user: JobUser):
    return container_identity(pod or {}, container, where="spec.containers[0]", job_user=user)


@pytest.mark.parametrize(
    ("pod_context", "container_context", "user", "options"),
    [
        ({}, {}, ALICE, ()),
        ({"runAsUser": 1000, "runAsGroup": 1000}, {}, ALICE, ()),
        ({}, {"runAsUser": 0}, ALICE, ("--fakeroot",)),
        ({"runAsUser": 0, "runAsGroup": 0}, {}, ALICE, ("--fakeroot",)),
        ({}, {"runAsUser": 1234}, ROOT, ("--security", "uid:1234,gid:0")),
        ({"runAsGroup": 55}, {"runAsUser": 1234}, ROOT, ("--security", "uid:1234,gid:55")),
        # The container's value wins over the pod's.
        ({"runAsUser": 7}, {"runAsUser": 0}, ALICE, ("--fakeroot",)),
        ({"runAsUser": 0}, {}, ROOT, ()),
    ],
)
def test_identities_apptainer_can_take(
    pod_context: dict[str, Any], container_context: dict[str, Any], user: JobUser, options: Any
) -> None:
    found = identity(container_context, pod_context, user=user)
    assert (found.options, found.warnings) == (options, ())


def test_another_user_without_root_runs_as_the_job_user_with_a_warning() -> None:
    found = identity({"runAsUser": 2000, "runAsGroup": 3000}, user=ALICE)
    assert found.options == ()
    [warning] = found.warnings
    assert "spec.containers[0].securityContext.runAsUser 2000" in warning
    assert "runAsGroup 3000" in warning
    assert "uid 1000 gid 1000" in warning


def test_a_group_alone_cannot_be_taken_by_an_ordinary_user() -> None:
    found = identity({"runAsGroup": 0}, user=ALICE)
    assert found.options == ()
    assert "runAsGroup 0" in found.warnings[0]


def test_run_as_non_root_under_a_root_kubelet_is_reported() -> None:
    assert "runAsNonRoot" in identity({"runAsNonRoot": True}, user=ROOT).warnings[0]
    assert identity({"runAsNonRoot": True}, user=ALICE).warnings == ()
    # A root kubelet that switches to a non-root user honours it.
    assert identity({"runAsNonRoot": True, "runAsUser": 10}, user=ROOT).warnings == ()


def test_what_apptainer_does_not_apply_is_listed() -> None:
    found = identity(
        {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
            "seLinuxOptions": {"level": "s0"},
        },
        {"seccompProfile": {"type": "RuntimeDefault"}},
        user=ALICE,
    )
    text = "\n".join(found.warnings)
    for part in ("NET_ADMIN", "seLinuxOptions", "seccompProfile"):
        assert part in text
    assert "readOnlyRootFilesystem" not in text  # the root file system is writable per run
    quiet = identity(
        {"capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "Unconfined"}},
        user=ALICE,
    )
    assert quiet.warnings == ()


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({"privileged": True}, "privileged"),
        ({"procMount": "Unmasked"}, "procMount"),
        ({"runAsUser": "root"}, "runAsUser"),
        ({"runAsUser": True}, "runAsUser"),
        ({"runAsGroup": -2}, "runAsGroup"),
        ({"runAsNonRoot": "yes"}, "runAsNonRoot"),
        ({"seccompProfile": {"type": "Strict"}}, "seccompProfile.type"),
        ({"capabilities": {"keep": []}}, "capabilities.keep"),
        ({"sysctls": []}, "sysctls"),
    ],
)
def test_refused_container_fields_are_named(context: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPodSpec) as caught:
        identity(context, user=ALICE)
    assert caught.value.field == f"spec.containers[0].securityContext.{field}"


def test_pod_level_fields() -> None:
    assert check_pod_context({"fsGroup": 1000, "supplementalGroups": [1000]}, job_user=ALICE) == ()
    warnings = check_pod_context({"fsGroup": 2000, "supplementalGroups": [5, 6]}, job_user=ALICE)
    assert ["fsGroup 2000" in warnings[0], "[5, 6]" in warnings[1]] == [True, True]
    with pytest.raises(InvalidPodSpec) as caught:
        check_pod_context({"sysctls": [{"name": "a", "value": "1"}]}, job_user=ALICE)
    assert caught.value.field == "spec.securityContext.sysctls"
    with pytest.raises(InvalidPodSpec) as caught:
        check_pod_context({"privileged": True}, job_user=ALICE)
    assert caught.value.field == "spec.securityContext.privileged"


def render(spec_context: dict[str, Any], container_context: dict[str, Any], user: JobUser):
    pod = {
        "metadata": {"name": "p", "namespace": "default", "uid": "u-1", "annotations": {}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": spec_context,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["id"],
                    "securityContext": container_context,
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                }
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    }
    settings = RenderSettings(
        pod_dir=PurePosixPath("/home/u/.hpk/pods/default/p"),
        apptainer=PurePosixPath("/opt/apptainer"),
        images={"busybox": PurePosixPath("/images/busybox.sif")},
        job_user=user,
    )
    return render_pod(pod, settings)


def test_the_job_script_switches_user_and_opens_empty_dirs_only_when_asked() -> None:
    switched = render({}, {"runAsUser": 1234}, ROOT)
    assert "--security uid:1234,gid:0" in switched.script
    assert "chmod 0777 -- volumes/scratch" in switched.script
    plain = render({}, {}, ROOT)
    assert "--security" not in plain.script
    assert "chmod 0777" not in plain.script
    fake = render({"runAsUser": 0}, {}, ALICE)
    assert "--fakeroot" in fake.script
    assert "chmod 0777" not in fake.script


def test_one_warning_event_lists_everything_not_honoured() -> None:
    rendered = render({"fsGroup": 4000}, {"runAsUser": 2000}, ALICE)
    [(reason, message)] = rendered.warnings
    assert reason == NOT_HONOURED
    assert "spec.securityContext.fsGroup 4000" in message
    assert "runAsUser 2000" in message


def test_read_only_root_file_system_and_the_uid_inside() -> None:
    writable = identity({"readOnlyRootFilesystem": False}, user=ALICE)
    assert writable.writable_root is True
    assert writable.runs_as == ALICE.uid
    read_only = identity({"readOnlyRootFilesystem": True}, user=ALICE)
    assert read_only.writable_root is False
    assert identity({"runAsUser": 0}, user=ALICE).runs_as == 0  # --fakeroot
    with pytest.raises(InvalidPodSpec, match="readOnlyRootFilesystem"):
        identity({"readOnlyRootFilesystem": "yes"}, user=ALICE)
