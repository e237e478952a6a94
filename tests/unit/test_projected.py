"""Projected and downwardAPI volumes: the files kubelet_py.pod.projected makes (with a fake object
lookup, the one seam), the token sources it hands on, what it refuses, and how render binds
the volumes and sets the `kubernetes` service's variables."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import pytest

from kubelet_py.errors import InvalidPodSpec, MissingReference
from kubelet_py.pod import projected
from kubelet_py.pod.inputs import PodInputs, VolumeFile, resolve
from kubelet_py.pod.projected import TokenSource, format_map, token_sources, with_tokens
from kubelet_py.pod.render import RenderSettings, render_pod
from tests.unit.fakes import ACCESS_MOUNT, ACCESS_VOLUME, CA, OBJECTS

Pod = dict[str, Any]


def lookup(kind: str, _namespace: str, name: str) -> Mapping[str, Any] | None:
    return OBJECTS.get((kind, name))


def make_pod(*volumes: Mapping[str, Any], mounts: list[dict[str, Any]] | None = None) -> Pod:
    return {
        "metadata": {
            "name": "web",
            "namespace": "team",
            "uid": "5f0c8a9e-1d2b-4c3d-8e4f-123456789abc",
            "labels": {"app": "web", "tier": "front"},
            "annotations": {"note": 'say "hi"\n\tthere', "b": "2"},
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeName": "hpk-batch",
            "serviceAccountName": "builder",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["true"],
                    "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}},
                    "volumeMounts": mounts or [],
                }
            ],
            "volumes": [copy.deepcopy(dict(volume)) for volume in volumes],
        },
    }


def files_of(pod: Pod, volume: str) -> dict[str, tuple[bytes, int]]:
    made = projected.resolve(pod, lookup)
    return {file.path: (file.data, file.mode) for file in made.files[volume]}


def test_the_api_servers_default_token_volume_resolves_unchanged() -> None:
    made = projected.resolve(make_pod(ACCESS_VOLUME), lookup)
    files = {file.path: (file.data, file.mode) for file in made.files["kube-api-access-x1y2z"]}
    assert files == {"ca.crt": (CA.encode(), 0o644), "namespace": (b"team", 0o644)}
    assert made.tokens == (
        TokenSource(
            volume="kube-api-access-x1y2z",
            path="token",
            audience="",
            expiration_s=3607,
            mode=0o600,  # defaultMode 0644 narrowed: a token is a credential
        ),
    )
    assert made.secret_volumes == {"kube-api-access-x1y2z"}
    assert token_sources(make_pod(ACCESS_VOLUME)) == made.tokens


def test_downward_api_volume_items_and_modes() -> None:
    volume = {
        "name": "info",
        "downwardAPI": {
            "defaultMode": 0o640,
            "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                {"path": "note", "fieldRef": {"fieldPath": "metadata.annotations['note']"}},
                {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
                {"path": "none", "fieldRef": {"fieldPath": "metadata.labels['none']"}},
                {"path": "id/name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o400},
                {"path": "id/uid", "fieldRef": {"fieldPath": "metadata.uid"}},
                {"path": "node", "fieldRef": {"fieldPath": "spec.nodeName"}},
                {"path": "account", "fieldRef": {"fieldPath": "spec.serviceAccountName"}},
                {
                    "path": "cpu",
                    "resourceFieldRef": {
                        "containerName": "main",
                        "resource": "requests.cpu",
                        "divisor": "1m",
                    },
                },
                {
                    "path": "mem",
                    "resourceFieldRef": {
                        "containerName": "main",
                        "resource": "limits.memory",
                        "divisor": "1Mi",
                    },
                },
            ],
        },
    }
    files = files_of(make_pod(volume), "info")
    assert files == {
        "labels": (b'app="web"\ntier="front"', 0o640),
        "annotations": (b'b="2"\nnote="say \\"hi\\"\\n\\tthere"', 0o640),
        "note": (b'say "hi"\n\tthere', 0o640),
        "app": (b"web", 0o640),
        "none": (b"", 0o640),
        "id/name": (b"web", 0o400),
        "id/uid": (b"5f0c8a9e-1d2b-4c3d-8e4f-123456789abc", 0o640),
        "node": (b"hpk-batch", 0o640),
        "account": (b"builder", 0o640),
        "cpu": (b"250", 0o640),
        "mem": (b"64", 0o640),  # no limit: the job gets its request
    }
    assert projected.resolve(make_pod(volume), lookup).secret_volumes == frozenset()


def test_projected_configmap_and_secret_keys_follow_the_volumes_modes() -> None:
    volume = {
        "name": "mixed",
        "projected": {
            "defaultMode": 0o644,
            "sources": [
                {"configMap": {"name": "settings", "items": [{"key": "app", "path": "conf/app"}]}},
                {
                    "secret": {
                        "name": "db",
                        "items": [{"key": "password", "path": "pw", "mode": 0o444}],
                    }
                },
                {"configMap": {"name": "absent", "optional": True}},
            ],
        },
    }
    files = files_of(make_pod(volume), "mixed")
    # Secret files are never readable by others: 0444 becomes 0400.
    assert files == {"conf/app": (b"demo", 0o644), "pw": (b"s3cr3t", 0o400)}
    assert projected.resolve(make_pod(volume), lookup).secret_volumes == {"mixed"}


def test_format_map_quotes_as_go_does() -> None:
    assert format_map({"b": "é ✓", "a": '\\"\x00\x7f\u200b'}) == (
        'a="\\\\\\"\\x00\\x7f\\u200b"\nb="é ✓"'
    )
    assert format_map({}) == ""


@pytest.mark.parametrize(
    ("source", "field", "message"),
    [
        (
            {"serviceAccountToken": {"path": "t", "expirationSeconds": 599}},
            "sources[0].serviceAccountToken.expirationSeconds",
            "less than 600",
        ),
        (
            {"serviceAccountToken": {"path": "../t"}},
            "sources[0].serviceAccountToken.path",
            "inside the volume",
        ),
        (
            {"serviceAccountToken": {"path": "/var/run/t"}},
            "sources[0].serviceAccountToken.path",
            "not absolute",
        ),
        (
            {"serviceAccountToken": {"path": "..token"}},
            "sources[0].serviceAccountToken.path",
            "must not start with '..'",
        ),
        (
            {"configMap": {"name": "settings", "items": [{"key": "app", "path": "a/../../x"}]}},
            "sources[0].configMap.items[0].path",
            "without '..'",
        ),
        (
            {"secret": {"name": "db", "items": [{"key": "password", "path": "/root/pw"}]}},
            "sources[0].secret.items[0].path",
            "not absolute",
        ),
        (
            {
                "downwardAPI": {
                    "items": [{"path": "../../name", "fieldRef": {"fieldPath": "metadata.name"}}]
                }
            },
            "sources[0].downwardAPI.items[0].path",
            "without '..'",
        ),
        (
            {"configMap": {"name": "odd"}},
            "sources[0].configMap",
            "key '../escape' must be letters, digits",
        ),
        (
            {"serviceAccountToken": {"path": "t", "expirationSeconds": "1h"}},
            "sources[0].serviceAccountToken.expirationSeconds",
            "whole number",
        ),
        (
            {"clusterTrustBundle": {"path": "b", "name": "x"}},
            "sources[0].clusterTrustBundle",
            "not supported yet",
        ),
        ({"configMap": {"name": "settings", "x": 1}}, "sources[0].configMap.x", "yet"),
        ({}, "sources[0]", "exactly one source"),
        (
            {"downwardAPI": {"items": [{"path": "x", "fieldRef": {"fieldPath": "status.podIP"}}]}},
            "sources[0].downwardAPI.items[0].fieldRef.fieldPath",
            "not supported",
        ),
        (
            {
                "downwardAPI": {
                    "items": [{"path": "x", "resourceFieldRef": {"resource": "limits.cpu"}}]
                }
            },
            "sources[0].downwardAPI.items[0].resourceFieldRef.containerName",
            "must name a container",
        ),
        (
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "x",
                            "resourceFieldRef": {"containerName": "nope", "resource": "limits.cpu"},
                        }
                    ]
                }
            },
            "sources[0].downwardAPI.items[0].resourceFieldRef.containerName",
            "not a container",
        ),
        (
            {"downwardAPI": {"items": [{"path": "x"}]}},
            "sources[0].downwardAPI.items[0]",
            "exactly one",
        ),
    ],
)
def test_projected_sources_hpk_cannot_make_fail_the_pod(
    source: dict[str, Any], field: str, message: str
) -> None:
    volume = {"name": "v", "projected": {"sources": [source]}}
    with pytest.raises(InvalidPodSpec) as raised:
        projected.resolve(make_pod(volume), lookup)
    assert raised.value.field == f"spec.volumes[0].projected.{field}"
    assert message in raised.value.problem


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/etc/name", "not absolute"),
        ("../name", "without '..'"),
        ("..data/name", "must not start with '..'"),
        (".", "not the volume itself"),
        ("", "not empty"),
    ],
)
def test_downward_api_volume_paths_stay_inside_the_volume(path: str, problem: str) -> None:
    item = {"path": path, "fieldRef": {"fieldPath": "metadata.name"}}
    volume = {"name": "info", "downwardAPI": {"items": [item]}}
    with pytest.raises(InvalidPodSpec) as raised:
        projected.resolve(make_pod(volume), lookup)
    assert raised.value.field == "spec.volumes[0].downwardAPI.items[0].path"
    assert problem in raised.value.problem


def test_paths_are_compared_clean_so_a_clash_is_seen() -> None:
    volume = {
        "name": "info",
        "downwardAPI": {
            "items": [
                {"path": "id/name", "fieldRef": {"fieldPath": "metadata.name"}},
                {"path": "./id//name", "fieldRef": {"fieldPath": "metadata.uid"}},
            ]
        },
    }
    with pytest.raises(InvalidPodSpec, match="clashes with another file"):
        projected.resolve(make_pod(volume), lookup)


def test_two_sources_writing_one_file_fail_the_pod() -> None:
    volume = {
        "name": "v",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token"}},
                {"configMap": {"name": "settings", "items": [{"key": "app", "path": "token/x"}]}},
            ]
        },
    }
    with pytest.raises(InvalidPodSpec, match="clashes"):
        projected.resolve(make_pod(volume), lookup)


def test_a_missing_config_map_keeps_the_pod_waiting() -> None:
    volume = copy.deepcopy(ACCESS_VOLUME)
    volume["projected"]["sources"][1]["configMap"]["name"] = "not-yet"  # type: ignore[index]
    with pytest.raises(MissingReference) as raised:
        projected.resolve(make_pod(volume), lookup)
    assert raised.value.field == "spec.volumes[0].projected.sources[1].configMap"


def test_with_tokens_adds_the_token_files_to_the_inputs() -> None:
    pod = make_pod(ACCESS_VOLUME)
    made = projected.resolve(pod, lookup)
    inputs = with_tokens(resolve(pod, lookup), made, {made.tokens[0]: b"jwt"})
    files = {file.path: file for file in inputs.volumes["kube-api-access-x1y2z"]}
    assert files["token"] == VolumeFile(path="token", data=b"jwt", mode=0o600)
    assert set(files) == {"ca.crt", "namespace", "token"}
    assert "kube-api-access-x1y2z" in inputs.secret_volumes
    with pytest.raises(ValueError, match="not issued"):
        with_tokens(PodInputs(), made, {})


# -- render -------------------------------------------------------------------------------

SERVICE = ("10.1.2.3", 6443)


def settings(**overrides: object) -> RenderSettings:
    values: dict[str, object] = {
        "pod_dir": PurePosixPath("/home/alice/.hpk/pods/team/web"),
        "apptainer": PurePosixPath("/opt/apptainer/bin/apptainer"),
        "python": PurePosixPath("/opt/hpk/bin/python"),
        "images": {"busybox": PurePosixPath("/images/busybox.sif")},
        "kubernetes_service": SERVICE,
    }
    values.update(overrides)
    return RenderSettings.from_overrides(**values)


def rendered(pod: Pod, **overrides: object) -> Any:
    made = projected.resolve(pod, lookup)
    inputs = with_tokens(resolve(pod, lookup), made, dict.fromkeys(made.tokens, b"jwt"))
    return render_pod(pod, settings(**overrides), inputs=inputs)


def test_projected_volumes_are_bound_read_only() -> None:
    info = {"name": "info", "downwardAPI": {"items": []}}
    pod = make_pod(
        ACCESS_VOLUME,
        info,
        mounts=[
            dict(ACCESS_MOUNT, readOnly=False),
            {"name": "info", "mountPath": "/info"},
            {"name": "kube-api-access-x1y2z", "mountPath": "/ca.crt", "subPath": "ca.crt"},
        ],
    )
    script = rendered(pod).script
    folder = "/home/alice/.hpk/pods/team/web/volumes"
    assert f"{folder}/kube-api-access-x1y2z:/var/run/secrets/kubernetes.io/serviceaccount:ro" in (
        script
    )
    assert f"{folder}/info:/info:ro" in script
    assert f"{folder}/kube-api-access-x1y2z/ca.crt:/ca.crt:ro" in script
    made_by_script = next(line for line in script.splitlines() if line.startswith("mkdir -p"))
    assert "volumes/" not in made_by_script  # the kubelet wrote these folders


def test_a_sub_path_must_name_a_file_the_kubelet_made() -> None:
    pod = make_pod(
        ACCESS_VOLUME,
        mounts=[{"name": "kube-api-access-x1y2z", "mountPath": "/x", "subPath": "nope"}],
    )
    with pytest.raises(InvalidPodSpec, match="not a file of volume"):
        rendered(pod)


def env_of(pod: Pod, **overrides: object) -> str:
    return str(rendered(pod, **overrides).files.get("env/main", ""))


def test_every_container_gets_the_kubernetes_service_variables() -> None:
    env = env_of(make_pod())
    for line in (
        "KUBERNETES_SERVICE_HOST=10.1.2.3",
        "KUBERNETES_SERVICE_PORT=6443",
        "KUBERNETES_SERVICE_PORT_HTTPS=6443",
        "KUBERNETES_PORT=tcp://10.1.2.3:6443",
        "KUBERNETES_PORT_6443_TCP=tcp://10.1.2.3:6443",
        "KUBERNETES_PORT_6443_TCP_PROTO=tcp",
        "KUBERNETES_PORT_6443_TCP_PORT=6443",
        "KUBERNETES_PORT_6443_TCP_ADDR=10.1.2.3",
    ):
        assert line in env.splitlines(), env
    assert "KUBERNETES_PORT='tcp://[fd00::1]:443'" in env_of(
        make_pod(), kubernetes_service=("fd00::1", 443)
    )
    assert env_of(make_pod(), kubernetes_service=None) == ""


def test_the_pods_own_variables_win_and_may_refer_to_the_service() -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["env"] = [
        {"name": "KUBERNETES_SERVICE_PORT", "value": "443"},
        {"name": "API", "value": "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"},
    ]
    lines = env_of(pod).splitlines()
    assert "KUBERNETES_SERVICE_PORT=443" in lines
    assert "KUBERNETES_SERVICE_PORT=6443" not in lines
    assert "API=https://10.1.2.3:443" in lines


@pytest.mark.parametrize("service", [("", 443), ("10.0.0.1", 0), ("a\nb", 443)])
def test_a_bad_kubernetes_service_setting_is_refused(service: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="kubernetes_service"):
        settings(kubernetes_service=service)
