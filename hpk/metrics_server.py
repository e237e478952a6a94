"""metrics-server for `kubectl top`: its image, made from the pinned binary the toolchain built,
and the objects `hpk addons install metrics-server` applies (hpk.addons runs it).

metrics-server is an aggregated API server: the API server passes `metrics.k8s.io` requests
on to it, and it scrapes every node's kubelet at `/metrics/resource` (kubelet_py.loops.stats).
On hpk three things differ from upstream's install, and each is why an object here is not
upstream's:

- **The network.** The API server runs on the control-plane node's own network and cannot
  reach the pod network, so metrics-server runs with `hostNetwork: true` on the port the
  control-plane job chose for it (`metrics_server` in ports.json, picked free as the other
  ports are, never 443 or 10250: other users share the nodes), and the API server calls its
  endpoint directly (`--enable-aggregator-routing=true`, set in hpk.controlplane.components).
- **Trust, both ways, without skipping a check.** metrics-server serves with a certificate of
  the cluster CA for `metrics-server.kube-system.svc` (the name the API server checks), and
  the APIService carries that CA; it verifies the kubelet's serving certificate against the
  cluster CA (`--kubelet-certificate-authority`, the service account's `ca.crt`) and shows
  the kubelet a client certificate of its own (CN `hpk:metrics-server`), which hpk-kubelet
  lets read the pods' usage and nothing else. Both key pairs are issued on the login node
  from ~/.hpk/pki and reach the pod as Secrets, whose files the kubelet writes 0600.
- **The image.** No registry is needed: `registry.k8s.io/metrics-server/metrics-server:
  v<version>` is made from the built binary as upstream builds it (the static binary as
  ENTRYPOINT on an empty base) and imported into the user's image cache.

This module may touch the image cache and ~/.hpk/pki; it talks to the cluster only through
the `Kubectl` it is given.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpk.controlplane.ports import load_ports
from hpk.controlplane.settings import StateLayout
from hpk.docker_archive import folder, regular_file, write_docker_archive
from hpk.home import HpkHome
from hpk.images import import_made_image
from hpk.pki import CertFiles, ClusterPKI
from hpk.toolchain import Toolchain

Manifest = dict[str, Any]

NAME = "metrics-server"
NAMESPACE = "kube-system"
REGISTRY = "registry.k8s.io/metrics-server"
API_SERVICE = "v1beta1.metrics.k8s.io"
SERVING_TLS = "metrics-server-serving"
CLIENT_TLS = "metrics-server-kubelet-client"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
NOBODY = 65534
"""The uid upstream's image runs as (distroless's nonroot)."""
LABELS = {"k8s-app": NAME, "app.kubernetes.io/managed-by": "hpk"}


class MetricsServerError(RuntimeError):
    """metrics-server cannot be installed yet; the message says what to do."""


@dataclass(frozen=True)
class MetricsServerSettings:
    """How `hpk addons install metrics-server` installs it."""

    port: int
    """The port it serves on, on its node's own network (ports.json's `metrics_server`)."""
    resolution_s: int = 15
    """How often it scrapes the kubelet (`--metric-resolution`): a rate needs two scrapes,
    so `kubectl top` shows figures this long after metrics-server starts."""
    timeout: float = 300
    """Seconds to wait until its Deployment is available and the API answers."""


def image_reference(version: str) -> str:
    return f"{REGISTRY}/{NAME}:v{version}"


def image_archive(target: Path, *, binary: Path, version: str) -> Path:
    """metrics-server's image as a `docker save` tarball: the binary at /metrics-server, its
    ENTRYPOINT, run as nobody (hpk runs it as the user, with a private /tmp)."""
    passwd = f"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:{NOBODY}:{NOBODY}::/:/sbin/nologin\n"
    write_docker_archive(
        target,
        entries=[
            folder("etc"),
            folder("tmp", 0o1777),
            regular_file(NAME, binary.read_bytes(), 0o755),
            regular_file("etc/passwd", passwd.encode()),
            regular_file("etc/group", f"root:x:0:\nnobody:x:{NOBODY}:\n".encode()),
        ],
        config={"Entrypoint": [f"/{NAME}"], "User": str(NOBODY)},
        tags=[image_reference(version)],
    )
    return target


def import_metrics_server_image(
    *, toolchain: Toolchain, cache_dir: Path | None = None
) -> tuple[str, Path]:
    """The image in the user's cache (made and imported unless it is there); its reference
    and its SIF file."""
    version = toolchain.pins["METRICS_SERVER_VERSION"]
    reference = image_reference(version)
    sif = import_made_image(
        reference,
        lambda archive: image_archive(archive, binary=toolchain.binary(NAME), version=version),
        apptainer=str(toolchain.binary("apptainer")),
        cache_dir=cache_dir,
    )
    return reference, sif


def chosen_port(home: HpkHome) -> int:
    """The port the control-plane job chose for metrics-server; MetricsServerError when it
    has chosen none (no control plane has run, or one of an hpk that chose no such port)."""
    ports = load_ports(StateLayout(home.control_plane).ports_file)
    if ports is None or not ports.metrics_server:
        raise MetricsServerError(
            "the control plane has not chosen metrics-server's port yet: start it (hpk up), "
            "or restart it (hpk down, then hpk up) if it was started by an older hpk"
        )
    return ports.metrics_server


def ensure_certificates(pki: ClusterPKI) -> tuple[CertFiles, CertFiles]:
    """(serving, kubelet client) key pairs of metrics-server, issued from the cluster CA."""
    return pki.ensure_metrics_server_serving(), pki.ensure_metrics_server_client()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _meta(name: str, *, namespaced: bool = True) -> Manifest:
    meta: Manifest = {"name": name, "labels": dict(LABELS)}
    if namespaced:
        meta["namespace"] = NAMESPACE
    return meta


def _subject() -> list[Manifest]:
    return [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]


def _tls_secret(name: str, files: CertFiles) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name),
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(files.cert), "tls.key": _b64(files.key)},
    }


def rbac() -> list[Manifest]:
    """Its service account's rights: read nodes and pods and the kubelets' metrics, delegate
    authentication and authorisation to the API server, read the front proxy's CA; and the
    reading of `metrics.k8s.io` for the view, edit and admin roles."""
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole"}
    reader = _meta("system:aggregated-metrics-reader", namespaced=False)
    reader["labels"].update(
        {
            f"rbac.authorization.k8s.io/aggregate-to-{role}": "true"
            for role in ("view", "edit", "admin")
        }
    )
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(f"system:{NAME}", namespaced=False),
            "rules": [
                {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                {
                    "apiGroups": [""],
                    "resources": ["pods", "nodes"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(f"system:{NAME}", namespaced=False),
            "roleRef": {**role_ref, "name": f"system:{NAME}"},
            "subjects": _subject(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(f"{NAME}:system:auth-delegator", namespaced=False),
            "roleRef": {**role_ref, "name": "system:auth-delegator"},
            "subjects": _subject(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(f"{NAME}-auth-reader"),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "extension-apiserver-authentication-reader",
            },
            "subjects": _subject(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": reader,
            "rules": [
                {
                    "apiGroups": ["metrics.k8s.io"],
                    "resources": ["pods", "nodes"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    ]


def deployment(settings: MetricsServerSettings, *, image: str) -> Manifest:
    """One metrics-server on its node's network, trusting and trusted through the cluster CA
    (module docstring); every pod of it is a Slurm job."""
    serving, client = "/etc/hpk/serving", "/etc/hpk/kubelet-client"
    probe = {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    container = {
        "name": NAME,
        "image": image,
        "args": [
            f"--secure-port={settings.port}",
            f"--tls-cert-file={serving}/tls.crt",
            f"--tls-private-key-file={serving}/tls.key",
            f"--kubelet-certificate-authority={SERVICE_ACCOUNT_CA}",
            f"--kubelet-client-certificate={client}/tls.crt",
            f"--kubelet-client-key={client}/tls.key",
            "--kubelet-preferred-address-types=InternalIP",
            "--kubelet-use-node-status-port",
            f"--metric-resolution={settings.resolution_s}s",
        ],
        "ports": [{"name": "https", "containerPort": settings.port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": probe, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {**probe, "path": "/livez"},
            "periodSeconds": 10,
            "failureThreshold": 3,
            "initialDelaySeconds": 20,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": {"readOnlyRootFilesystem": True},
        "volumeMounts": [
            {"name": "serving", "mountPath": serving, "readOnly": True},
            {"name": "kubelet-client", "mountPath": client, "readOnly": True},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"k8s-app": NAME}},
            # One port on the node's network: the old pod must go before the new one binds it.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "serviceAccountName": NAME,
                    "hostNetwork": True,
                    "priorityClassName": "system-cluster-critical",
                    "containers": [container],
                    "volumes": [
                        {"name": "serving", "secret": {"secretName": SERVING_TLS}},
                        {"name": "kubelet-client", "secret": {"secretName": CLIENT_TLS}},
                    ],
                },
            },
        },
    }


def service() -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(NAME),
        "spec": {
            "selector": {"k8s-app": NAME},
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": "https"}],
        },
    }


def api_service(ca: Path) -> Manifest:
    """`metrics.k8s.io/v1beta1`, served by the Service, whose certificate the cluster CA
    signed (no insecureSkipTLSVerify)."""
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": _meta(API_SERVICE, namespaced=False),
        "spec": {
            "service": {"name": NAME, "namespace": NAMESPACE, "port": 443},
            "group": "metrics.k8s.io",
            "version": "v1beta1",
            "caBundle": _b64(ca),
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }


def manifests(
    settings: MetricsServerSettings,
    *,
    image: str,
    ca: Path,
    serving: CertFiles,
    client: CertFiles,
) -> list[Manifest]:
    """Every object of the install, in the order they are applied: the Secrets and the rights
    before the Deployment that uses them, the APIService last."""
    return [
        _tls_secret(SERVING_TLS, serving),
        _tls_secret(CLIENT_TLS, client),
        *rbac(),
        service(),
        deployment(settings, image=image),
        api_service(ca),
    ]


def removal() -> list[Manifest]:
    """What `hpk addons uninstall metrics-server` deletes: every object of `manifests`, by its
    kind and name, the APIService first (the API server then stops calling it)."""
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name)}
        for name in (SERVING_TLS, CLIENT_TLS)
    ]
    api = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": _meta(API_SERVICE, namespaced=False),
    }
    objects = [api, deployment(MetricsServerSettings(port=1), image=""), service(), *rbac()]
    return [
        {"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": o["metadata"]}
        for o in (*objects, *secrets)
    ]


def available(apiservice: Mapping[str, Any]) -> bool:
    """Whether the APIService (as `kubectl get -o json` gives it) says the API is served."""
    status: Mapping[str, Any] = apiservice.get("status") or {}
    return any(
        c.get("type") == "Available" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
