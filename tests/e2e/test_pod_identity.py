"""A pod's identity, end to end: the service-account token volume the API server adds to every
pod (used by the official Python client's in-cluster configuration to list pods), downwardAPI
and projected volume files read from inside a pod, and a token the kubelet issues again while
the pod runs.

The kubelet runs with `--token-refresh-fraction=0.02`, so that a token of 600 s (the shortest
Kubernetes allows) is issued again after 12 s instead of 480 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import WATCH_TOKEN, PodCluster, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-identity"
ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(
        testbed, namespace=NAMESPACE, kubelet_args=["--token-refresh-fraction=0.02"]
    ) as running:
        yield running


def log_lines(cluster: PodCluster, name: str) -> list[str]:
    log = (cluster.folder(name) / "containers" / "main" / "log").read_text()
    return [line.split(" ", 2)[2] for line in log.splitlines() if " stdout " in line]


def with_token(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as a user writes it: the API server adds the token volume."""
    del manifest["spec"]["automountServiceAccountToken"]
    return manifest


LIST_PODS = """
import os
from kubernetes import client, config

config.load_incluster_config()
namespace = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
names = [pod.metadata.name for pod in client.CoreV1Api().list_namespaced_pod(namespace).items]
me = [name for name in names if name == os.environ["POD_NAME"]]
print("server", os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
print("listed myself:", *me)
"""


def test_in_cluster_client_lists_pods_with_the_service_account_token(
    cluster: PodCluster,
) -> None:
    reader = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader", "namespace": NAMESPACE},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-reader", "namespace": NAMESPACE},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}],
        },
    ]
    manifest = with_token(cluster.manifest("lister", ["python3", "-c", LIST_PODS]))
    container = manifest["spec"]["containers"][0]
    container["image"] = "python:3.11"
    container["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    cluster.apply(*reader, manifest)
    done = cluster.phase("lister", "Succeeded", timeout=240)
    volumes = [volume["name"] for volume in done["spec"]["volumes"]]
    assert any(name.startswith("kube-api-access-") for name in volumes), volumes
    lines = log_lines(cluster, "lister")
    plane = cluster.plane
    host, port = plane.context.advertise_address, plane.ports.apiserver
    assert f"server {host} {port}" in lines, lines
    assert "listed myself: lister" in lines, lines


SHOW_FILES = f"""
cat /info/labels; echo
cat /info/annotations; echo
echo "annotation=$(cat /info/note)"
echo "name=$(cat /info/name) mem=$(cat /info/mem) mode=$(stat -c %a /info/name)"
echo "ns=$(cat {ACCOUNT_DIR}/namespace)"
echo "token-mode=$(stat -c %a {ACCOUNT_DIR}/token) folder-mode=$(stat -c %a {ACCOUNT_DIR})"
head -n 1 {ACCOUNT_DIR}/ca.crt
echo "app=$(cat /both/app) ns=$(cat /both/ns) token-mode=$(stat -c %a /both/t/token)"
echo "port-https=$KUBERNETES_SERVICE_PORT_HTTPS host-set=${{KUBERNETES_SERVICE_HOST:+yes}}"
"""


def test_downward_api_and_projected_files_inside_the_pod(cluster: PodCluster) -> None:
    manifest = with_token(cluster.manifest("files", ["sh", "-c", SHOW_FILES]))
    manifest["metadata"]["labels"] = {"app": "demo", "tier": "web"}
    manifest["metadata"]["annotations"]["note"] = 'say "hi"'
    container = manifest["spec"]["containers"][0]
    container["resources"] = {"requests": {"memory": "64Mi"}, "limits": {"memory": "64Mi"}}
    container["env"] = [{"name": "KUBERNETES_SERVICE_PORT_HTTPS", "value": "the pod's own"}]
    container["volumeMounts"] = [
        {"name": "info", "mountPath": "/info"},
        {"name": "both", "mountPath": "/both"},
    ]
    labels = {"fieldRef": {"fieldPath": "metadata.labels"}}
    manifest["spec"]["volumes"] = [
        {
            "name": "info",
            "downwardAPI": {
                "defaultMode": 0o644,
                "items": [
                    {"path": "labels", **labels},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                    {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}, "mode": 0o640},
                    {"path": "note", "fieldRef": {"fieldPath": "metadata.annotations['note']"}},
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
        },
        {
            "name": "both",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "t/token", "expirationSeconds": 3600}},
                    {
                        "downwardAPI": {
                            "items": [
                                {"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}
                            ]
                        }
                    },
                    {"configMap": {"name": "settings", "items": [{"key": "app", "path": "app"}]}},
                ]
            },
        },
    ]
    settings = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": NAMESPACE},
        "data": {"app": "from the config map"},
    }
    cluster.apply(settings, manifest)
    cluster.phase("files", "Succeeded")
    lines = log_lines(cluster, "files")
    assert lines[:3] == ['app="demo"', 'tier="web"', 'note="say \\"hi\\""'], lines
    assert 'annotation=say "hi"' in lines, lines
    assert "name=files mem=64 mode=640" in lines, lines
    assert f"ns={NAMESPACE}" in lines, lines
    assert "token-mode=600 folder-mode=700" in lines, lines
    assert "-----BEGIN CERTIFICATE-----" in lines, lines
    assert f"app=from the config map ns={NAMESPACE} token-mode=600" in lines, lines
    assert "port-https=the pod's own host-set=yes" in lines, lines
    folder = cluster.folder("files") / "volumes"
    for volume in folder.iterdir():
        assert volume.stat().st_mode & 0o777 == 0o700, volume


def test_short_lived_token_is_rewritten_while_the_pod_runs(cluster: PodCluster) -> None:
    manifest = cluster.manifest("refresh", ["sh", "-c", WATCH_TOKEN])
    manifest["spec"]["containers"][0]["volumeMounts"] = [{"name": "tok", "mountPath": "/tok"}]
    manifest["spec"]["volumes"] = [
        {
            "name": "tok",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "path": "token",
                            "expirationSeconds": 600,
                            "audience": "hpk-test",
                        }
                    }
                ]
            },
        }
    ]
    cluster.apply(manifest)
    cluster.phase("refresh", "Succeeded", timeout=200)
    lines = log_lines(cluster, "refresh")
    assert any(line.startswith("rewritten after") and line.endswith("mode 600") for line in lines)
    assert f"{NAMESPACE}/refresh: token" in cluster.log()
