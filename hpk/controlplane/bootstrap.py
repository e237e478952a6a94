"""Objects the control plane itself needs in the API before its later components start.

Today that is CoreDNS's read-only ClusterRole and hpk-kubelet's rights (a ClusterRole for
nodes, pods and what pods mount, and a Role for the node Leases), each with its binding: RBAC
has no static files, so they are put into the API once the API server is ready. Objects are
sent with server-side apply (field manager "hpk"), which creates or updates them in one
idempotent request, so a restart simply applies them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import yaml

from hpk.controlplane.errors import ControlPlaneError
from hpk.controlplane.probes import TLSClient, request
from hpk.templating import render

log = logging.getLogger(__name__)

FIELD_MANAGER = "hpk"

#: kind -> (API path prefix, plural); only the kinds hpk applies itself.
_RESOURCES = {
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Namespace": ("/api/v1", "namespaces"),
}


class BootstrapFailed(ControlPlaneError):
    """The API server refused an object the control plane needs."""


def object_path(obj: Mapping[str, Any]) -> str:
    """The API path of `obj` (kind, metadata.name and, if set, metadata.namespace)."""
    kind = obj.get("kind")
    if kind not in _RESOURCES:
        raise ValueError(f"hpk does not apply objects of kind {kind!r}")
    prefix, plural = _RESOURCES[kind]
    metadata = obj.get("metadata") or {}
    name = quote(str(metadata["name"]), safe="")
    namespace = metadata.get("namespace")
    if namespace:
        return f"{prefix}/namespaces/{quote(str(namespace), safe='')}/{plural}/{name}"
    return f"{prefix}/{plural}/{name}"


def apply_objects(server: str, objects: Iterable[Mapping[str, Any]], *, tls: TLSClient) -> None:
    """Server-side apply each object to the API server at `server` (https://host:port)."""
    for obj in objects:
        path = object_path(obj)
        response = request(
            f"{server}{path}?fieldManager={FIELD_MANAGER}&force=true",
            tls=tls,
            method="PATCH",
            body=json.dumps(obj).encode(),
            headers={"Content-Type": "application/apply-patch+yaml"},
            timeout=15.0,
        )
        if response.status not in (200, 201):
            raise BootstrapFailed(
                f"applying {obj['kind']} {path} failed: HTTP {response.status}: "
                f"{response.body[:500]}"
            )
        log.info("applied %s %s", obj["kind"], obj["metadata"]["name"])


def coredns_rbac(user: str) -> list[dict[str, Any]]:
    """CoreDNS's ClusterRole and the binding that gives it to `user`."""
    text = render("controlplane/coredns-rbac.yaml.j2", user=user)
    return [doc for doc in yaml.safe_load_all(text) if doc]


KUBELET_LEASE_NAMESPACE = "kube-node-lease"


def kubelet_rbac(user: str) -> list[dict[str, Any]]:
    """hpk-kubelet's ClusterRole and Lease Role, bound to `user` (with the Lease namespace)."""
    text = render(
        "controlplane/kubelet-rbac.yaml.j2", user=user, lease_namespace=KUBELET_LEASE_NAMESPACE
    )
    return [doc for doc in yaml.safe_load_all(text) if doc]
