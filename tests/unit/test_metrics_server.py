"""`hpk addons install metrics-server`: the objects it applies (on the node's network, trust
through the cluster CA both ways, no skipped check), its certificates, its image, and what it
asks kubectl in which order; with kubectl faked at its one seam (the Kubectl it is given)."""

from __future__ import annotations

import base64
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hpk.addons import AddonError, install_metrics_server, uninstall_metrics_server
from hpk.cli import build_parser
from hpk.controlplane.ports import choose_ports, save_ports
from hpk.controlplane.settings import StateLayout
from hpk.home import HpkHome
from hpk.metrics_server import (
    API_SERVICE,
    MetricsServerSettings,
    chosen_port,
    ensure_certificates,
    image_archive,
    image_reference,
    manifests,
    removal,
)
from hpk.pki import ClusterPKI, load_certificate, subject_alt_names
from hpk.toolchain import Toolchain, read_pins
from kubelet_py.loops.logserver import METRICS_READERS

PINS = read_pins()


@pytest.fixture
def pki(tmp_path: Path) -> ClusterPKI:
    made = ClusterPKI(tmp_path / "pki")
    made.ensure_control_plane(
        hostname="login1", node_ips=["192.0.2.10"], service_cidr="10.96.0.0/16"
    )
    return made


def objects(pki: ClusterPKI, port: int = 38443) -> list[dict[str, Any]]:
    serving, client = ensure_certificates(pki)
    return manifests(
        MetricsServerSettings(port=port),
        image=image_reference(PINS["METRICS_SERVER_VERSION"]),
        ca=pki.ca.cert,
        serving=serving,
        client=client,
    )


def of_kind(found: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (one,) = [item for item in found if item["kind"] == kind]
    return one


def test_it_runs_on_its_nodes_network_on_the_chosen_port(pki: ClusterPKI) -> None:
    deployment = of_kind(objects(pki), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True, "the API server cannot reach the pod network"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "one port, one pod"
    (container,) = spec["containers"]
    assert container["image"] == "registry.k8s.io/metrics-server/metrics-server:v0.8.0"
    assert "--secure-port=38443" in container["args"]
    assert container["ports"] == [{"name": "https", "containerPort": 38443, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["port"] == "https"
    service = of_kind(objects(pki), "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "https", "the endpoint is that port"


def test_every_tls_check_is_made_against_the_cluster_ca(pki: ClusterPKI) -> None:
    found = objects(pki)
    args = of_kind(found, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any("insecure" in arg for arg in args), args
    assert (
        "--kubelet-certificate-authority=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
        in args
    )
    assert "--kubelet-preferred-address-types=InternalIP" in args
    assert "--kubelet-use-node-status-port" in args
    assert "--kubelet-client-certificate=/etc/hpk/kubelet-client/tls.crt" in args
    api = of_kind(found, "APIService")
    assert api["metadata"]["name"] == API_SERVICE
    assert "insecureSkipTLSVerify" not in api["spec"]
    assert base64.b64decode(api["spec"]["caBundle"]) == pki.ca.cert.read_bytes()
    assert api["spec"]["service"] == {
        "name": "metrics-server",
        "namespace": "kube-system",
        "port": 443,
    }
    secrets = {item["metadata"]["name"]: item for item in found if item["kind"] == "Secret"}
    client = secrets["metrics-server-kubelet-client"]["data"]
    assert base64.b64decode(client["tls.crt"]) == pki.metrics_server_client.cert.read_bytes()
    serving = secrets["metrics-server-serving"]["data"]
    assert base64.b64decode(serving["tls.key"]) == pki.metrics_server_serving.key.read_bytes()
    kinds = [item["kind"] for item in found]
    assert kinds.index("Secret") < kinds.index("Deployment") < kinds.index("APIService")
    assert kinds[-1] == "APIService", "served only once everything behind it exists"


def test_its_certificates_name_its_service_and_its_kubelet_identity(pki: ClusterPKI) -> None:
    serving, client = ensure_certificates(pki)
    ca = load_certificate(pki.ca.cert)
    cert = load_certificate(serving.cert)
    cert.verify_directly_issued_by(ca)
    assert "metrics-server.kube-system.svc" in subject_alt_names(cert), "what the API server checks"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    identity = load_certificate(client.cert)
    identity.verify_directly_issued_by(ca)
    (name,) = identity.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert {name.value} == METRICS_READERS, "the one identity the kubelet lets read usage only"
    assert identity.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    for files in (serving, client):
        assert os.stat(files.key).st_mode & 0o077 == 0
    again = ensure_certificates(pki)
    assert load_certificate(again[1].cert) == identity, "kept, not issued on every install"


def test_its_rights_are_those_of_a_metrics_reader(pki: ClusterPKI) -> None:
    found = objects(pki)
    roles = {item["metadata"]["name"]: item for item in found if item["kind"] == "ClusterRole"}
    assert {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]} in roles[
        "system:metrics-server"
    ]["rules"]
    labels = roles["system:aggregated-metrics-reader"]["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    bound = {
        item["roleRef"]["name"]
        for item in found
        if item["kind"] in ("ClusterRoleBinding", "RoleBinding")
    }
    assert bound == {
        "system:metrics-server",
        "system:auth-delegator",
        "extension-apiserver-authentication-reader",
    }


def test_the_image_is_the_binary_as_entrypoint(tmp_path: Path) -> None:
    binary = tmp_path / "metrics-server"
    binary.write_bytes(b"\x7fELF static")
    archive = image_archive(tmp_path / "image.tar", binary=binary, version="0.8.0")
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        (entry,) = manifest
        assert entry["RepoTags"] == ["registry.k8s.io/metrics-server/metrics-server:v0.8.0"]
        config = json.load(outer.extractfile(entry["Config"]))  # type: ignore[arg-type]
        assert config["config"]["Entrypoint"] == ["/metrics-server"]
        layer = outer.extractfile(entry["Layers"][0])
        assert layer is not None
        with tarfile.open(fileobj=layer) as inner:
            member = inner.getmember("metrics-server")
            assert member.mode == 0o755
            assert inner.extractfile(member).read() == b"\x7fELF static"  # type: ignore[union-attr]


def test_the_port_is_the_one_the_control_plane_chose(tmp_path: Path) -> None:
    home = HpkHome(tmp_path / "hpk")
    with pytest.raises(Exception, match="hpk up"):
        chosen_port(home)
    ports = choose_ports()
    layout = StateLayout(home.control_plane)
    layout.root.mkdir(parents=True)
    save_ports(layout.ports_file, ports)
    assert chosen_port(home) == ports.metrics_server
    assert ports.metrics_server not in (0, 443, 10250, ports.kubelet, ports.apiserver)


class FakeKubectl:
    """Records each call; the APIService turns Available on the second look."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], Any]] = []
        self.looks = 0

    def __call__(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        self.calls.append((args, json.loads(stdin) if stdin else None))
        if args[:2] == ("get", "apiservice"):
            self.looks += 1
            status = "True" if self.looks > 1 else "False"
            return json.dumps({"status": {"conditions": [{"type": "Available", "status": status}]}})
        if args[:2] == ("get", "pods"):
            pod = {
                "metadata": {
                    "name": "metrics-server-1",
                    "annotations": {"slurm.hpk.io/job-id": "9"},
                }
            }
            return json.dumps({"items": [pod]})
        return ""


def test_install_applies_then_waits_for_the_deployment_and_the_api(
    tmp_path: Path, pki: ClusterPKI
) -> None:
    home = HpkHome(tmp_path)
    kubectl = FakeKubectl()
    said: list[str] = []
    slept: list[float] = []
    code = install_metrics_server(
        kubectl=kubectl,
        progress=said.append,
        home=home,
        toolchain=Toolchain(root=tmp_path / "tools", pins=PINS),
        settings=MetricsServerSettings(port=38443),
        import_image=lambda: (
            "registry.k8s.io/metrics-server/metrics-server:v0.8.0",
            tmp_path / "ms.sif",
        ),
        sleep=slept.append,
    )
    assert code == 0
    verbs = [args[:2] for args, _ in kubectl.calls]
    assert verbs == [
        ("apply", "-f"),
        ("rollout", "status"),
        ("get", "pods"),
        ("get", "apiservice"),
        ("get", "apiservice"),
    ]
    applied = kubectl.calls[0][1]["items"]
    assert applied[-1]["kind"] == "APIService"
    assert slept == [2]
    assert "  pod metrics-server-1: Slurm job 9" in said
    assert said[-1].startswith("ready: kubectl top node")
    assert any("port 38443" in line for line in said)


def test_install_without_a_chosen_port_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AddonError, match="hpk down, then hpk up"):
        install_metrics_server(
            kubectl=FakeKubectl(), progress=lambda _: None, home=HpkHome(tmp_path)
        )


def test_uninstall_deletes_every_object_by_name_only(pki: ClusterPKI) -> None:
    kubectl = FakeKubectl()
    assert uninstall_metrics_server(kubectl=kubectl, progress=lambda _: None) == 0
    ((args, body),) = kubectl.calls
    assert args[:2] == ("delete", "--ignore-not-found")
    deleted = body["items"]
    assert deleted[0]["kind"] == "APIService", "the API server stops calling it first"
    assert all(set(item) == {"apiVersion", "kind", "metadata"} for item in deleted)
    installed = {(item["kind"], item["metadata"]["name"]) for item in objects(pki)}
    assert {(item["kind"], item["metadata"]["name"]) for item in deleted} == installed
    assert removal() == deleted


def test_the_cli_takes_metrics_server() -> None:
    args = build_parser().parse_args(["addons", "uninstall", "metrics-server"])
    assert (args.action, args.addon) == ("uninstall", "metrics-server")
