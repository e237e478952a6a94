"""Pods that read ConfigMaps and Secrets, end to end: mounted as volumes (a script run from its
own mount), as environment variables that must arrive byte for byte, and a pod that waits,
Pending with CreateContainerConfigError, for a ConfigMap created after it.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-config"

TRICKY = {
    "QUOTES": "it's \"double\" and 'single'",
    "JSON": '{"a": [1, "two"], "b": {"c": null}}',
    "NEWLINE": "line one\nline two",
    "DOLLAR": "$HOME ${PATH} $(NOT_A_REF) $$",
    "BACKTICKS": "`id` $(id)",
    "EMOJI": "héllo 🚀 ✓",
}


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


def config_map(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": data,
    }


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "stringData": data,
    }


def log_lines(cluster: PodCluster, name: str, container: str = "main") -> list[str]:
    log = (cluster.folder(name) / "containers" / container / "log").read_text()
    return [line.split(" ", 2)[2] for line in log.splitlines() if " stdout " in line]


def test_config_map_and_secret_volumes_with_items(cluster: PodCluster) -> None:
    script = (
        'echo "greeting: $(cat /config/greeting.txt)"\n'
        'echo "password: $(cat /secrets/db/password)"\n'
        'echo "mode: $(stat -L -c %a /secrets/db/password)"\n'
        'echo "single: $(cat /etc/app.conf)"\n'
        "ls /config\n"
    )
    manifest = cluster.manifest("volumes", ["sh", "/config/run.sh"])
    manifest["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "config", "mountPath": "/config"},
        {"name": "creds", "mountPath": "/secrets"},
        {"name": "config", "mountPath": "/etc/app.conf", "subPath": "greeting.txt"},
    ]
    manifest["spec"]["volumes"] = [
        {
            "name": "config",
            "configMap": {
                "name": "scripts",
                "items": [
                    {"key": "run", "path": "run.sh", "mode": 0o755},
                    {"key": "greeting", "path": "greeting.txt"},
                ],
            },
        },
        {
            "name": "creds",
            "secret": {
                "secretName": "db",
                "defaultMode": 0o644,  # narrowed: a secret is never readable by others
                "items": [{"key": "pw", "path": "db/password"}],
            },
        },
    ]
    cluster.apply(
        config_map("scripts", {"run": script, "greeting": "hello from a ConfigMap", "unused": "x"}),
        secret("db", {"pw": "s3cr3t 'pw'", "other": "not mounted"}),
        manifest,
    )
    cluster.phase("volumes", "Succeeded")
    assert log_lines(cluster, "volumes") == [
        "greeting: hello from a ConfigMap",
        "password: s3cr3t 'pw'",
        "mode: 600",
        "single: hello from a ConfigMap",
        "greeting.txt",
        "run.sh",
    ]
    folder = cluster.folder("volumes") / "volumes" / "creds"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "db" / "password").stat().st_mode) == 0o600
    assert "s3cr3t" not in (cluster.folder("volumes") / "job.sh").read_text()


def test_env_from_config_maps_and_secrets_byte_for_byte(cluster: PodCluster) -> None:
    names = [
        "CM_JSON",
        "SECRET_EMOJI",
        *(f"ALL_{key}" for key in TRICKY),
        *(f"S_{key}" for key in TRICKY),
        "POD_NAME",
        "NODE_NAME",
        "POD_IP",
        "MEMORY_MIB",
        "OVERRIDDEN",
    ]
    manifest = cluster.manifest(
        "env",
        [
            "sh",
            "-c",
            'for n in "$@"; do eval "v=\\${$n}"; printf %s "$v" > "/out/$n"; done',
            "sh",
            *names,
        ],
    )
    container = manifest["spec"]["containers"][0]
    container["volumeMounts"] = [{"name": "out", "mountPath": "/out"}]
    container["resources"] = {"limits": {"memory": "200Mi"}}
    container["envFrom"] = [
        {"configMapRef": {"name": "tricky"}, "prefix": "ALL_"},
        {"secretRef": {"name": "tricky"}, "prefix": "S_"},
    ]
    container["env"] = [
        {"name": "CM_JSON", "valueFrom": {"configMapKeyRef": {"name": "tricky", "key": "JSON"}}},
        {"name": "SECRET_EMOJI", "valueFrom": {"secretKeyRef": {"name": "tricky", "key": "EMOJI"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        # Submitted just before the binding: the node it is about to be bound to.
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {
            "name": "MEMORY_MIB",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
        },
        {"name": "ALL_QUOTES", "value": "from env: $(ALL_JSON)"},
        {"name": "OVERRIDDEN", "value": "$(ALL_QUOTES)"},
        {
            "name": "MISSING_BUT_OPTIONAL",
            "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}},
        },
    ]
    manifest["spec"]["volumes"] = [{"name": "out", "emptyDir": {}}]
    cluster.apply(
        config_map("tricky", {**TRICKY, "not.a.name": "x"}), secret("tricky", TRICKY), manifest
    )
    pod = cluster.phase("env", "Succeeded")
    # A key that is no variable name is left out, as Kubernetes does, with a Warning Event.
    warning = eventually(
        "the Warning event",
        lambda: re.search(r"Warning\s+InvalidEnvironmentVariableNames.*", cluster.events("env")),
        timeout=30,
    )
    assert "'ALL_not.a.name'" in warning.group(0), warning.group(0)
    out = cluster.folder("env") / "volumes" / "out"

    def value(name: str) -> bytes:
        return (out / name).read_bytes()

    assert value("CM_JSON") == TRICKY["JSON"].encode()
    assert value("SECRET_EMOJI") == TRICKY["EMOJI"].encode()
    for key, text in TRICKY.items():
        assert value(f"S_{key}") == text.encode(), key
        if key != "QUOTES":
            assert value(f"ALL_{key}") == text.encode(), key
    # env comes after envFrom and wins; its `value` entries are expanded, referenced ones not.
    assert value("ALL_QUOTES") == f"from env: {TRICKY['JSON']}".encode()
    assert value("OVERRIDDEN") == value("ALL_QUOTES")
    assert value("POD_NAME") == b"env"
    assert value("NODE_NAME") == pod["spec"]["nodeName"].encode() == b"hpk-batch"
    assert value("POD_IP").decode() == pod["status"]["podIP"]
    assert value("MEMORY_MIB") == b"200"
    env_file = cluster.folder("env") / "env" / "main"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "🚀" not in (cluster.folder("env") / "job.sh").read_text()


def test_a_missing_config_map_waits_until_it_is_created(cluster: PodCluster) -> None:
    manifest = cluster.manifest("late", ["sh", "-c", 'echo "color=$COLOR"'])
    manifest["spec"]["containers"][0]["env"] = [
        {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "color"}}}
    ]
    cluster.apply(manifest)

    def waiting() -> dict[str, Any] | None:
        pod = cluster.pod("late") or {}
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        state = statuses[0].get("state", {}).get("waiting") or {}
        return state if state.get("reason") == "CreateContainerConfigError" else None

    state = eventually("CreateContainerConfigError", waiting, timeout=60)
    assert 'ConfigMap "e2e-pod-config/late" not found' in state["message"], state
    assert (cluster.pod("late") or {})["status"]["phase"] == "Pending"

    def warned() -> str:
        text = cluster.events("late")
        return text if "CreateContainerConfigError" in text else ""

    events = eventually("the Warning event", warned, timeout=30)
    assert re.search(r"Warning\s+CreateContainerConfigError", events), events
    assert 'ConfigMap "e2e-pod-config/late" not found' in events, events
    assert not (cluster.folder("late") / "job-id").exists()
    cluster.apply(config_map("late", {"color": "green"}))
    cluster.phase("late", "Succeeded", timeout=150)
    assert log_lines(cluster, "late") == ["color=green"]
