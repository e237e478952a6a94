"""The control plane for real: etcd, kube-apiserver, kube-controller-manager and CoreDNS from
the pinned toolchain, with freshly generated certificates, driven by the pinned kubectl and
queried with dig."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpk.controlplane import ControlPlane
from hpk.controlplane.ports import port_is_free
from hpk.controlplane.probes import TLSClient, request
from hpk.pki import ClusterPKI, load_certificate
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS
from hpk.toolchain import Toolchain
from tests.e2e.kube import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SETTINGS = TESTBED_PLANE_SETTINGS


def new_control_plane(root: Path) -> ControlPlane:
    return ControlPlane(root / "state", pki=ClusterPKI(root / "pki"), settings=SETTINGS)


def kubectl(
    plane: ControlPlane, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    binary = Toolchain.load().binary("kubectl")
    return subprocess.run(
        [
            str(binary),
            f"--kubeconfig={plane.layout.admin_kubeconfig}",
            "--request-timeout=20s",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def dig(plane: ControlPlane, name: str, *options: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(plane.ports.dns), "+time=2", "+tries=3", *options, name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout


def processes_mentioning(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line names `folder` (i.e. were started for it)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(folder) in part for part in cmdline):
            found.append(process)
    return found


# A separate instance, started and stopped before the shared one exists.


def test_stop_leaves_no_process_and_frees_every_port(tmp_path: Path) -> None:
    plane = new_control_plane(tmp_path)
    plane.start()
    try:
        pids = {name: p.pid for name, p in plane.processes.items()}
        ports = plane.ports
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "coredns"}
        assert len(processes_mentioning(tmp_path)) == 4
        assert not port_is_free(ports.apiserver)
        assert not port_is_free(ports.dns, udp=True)
    finally:
        plane.stop()

    assert processes_mentioning(tmp_path) == []
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid), f"{name} (pid {pid}) is still there"
    assert list((tmp_path / "state" / "run").iterdir()) == []
    busy = [p for p in ports.values() if not port_is_free(p)]
    assert busy == []
    assert port_is_free(ports.dns, udp=True)


def test_restart_keeps_ports_certificates_and_data(tmp_path: Path) -> None:
    first = new_control_plane(tmp_path)
    with first:
        kubectl(first, "create", "configmap", "survivor", "--from-literal=answer=42")
        ports = first.ports
        serial = load_certificate(first.pki.apiserver.cert).serial_number
    second = new_control_plane(tmp_path)
    with second:
        assert second.ports == ports
        assert load_certificate(second.pki.apiserver.cert).serial_number == serial
        answer = kubectl(second, "get", "configmap", "survivor", "-o", "jsonpath={.data.answer}")
        assert answer.stdout == "42"


# The shared instance for the remaining tests.


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = new_control_plane(tmp_path_factory.mktemp("control-plane"))
    plane.start()
    print(
        f"control plane started in {plane.startup_seconds['total']:.1f} s: {plane.startup_seconds}"
    )
    try:
        yield plane
    finally:
        plane.stop()


def test_kubectl_gets_ok_from_readyz(control_plane: ControlPlane) -> None:
    result = kubectl(control_plane, "get", "--raw=/readyz")
    assert result.stdout.strip() == "ok"


def test_server_reports_the_pinned_version(control_plane: ControlPlane) -> None:
    result = kubectl(control_plane, "version", "-o", "json")
    version = json.loads(result.stdout)
    expected = f"v{Toolchain.load().pins['KUBERNETES_VERSION']}"
    assert expected == "v1.33.13"
    assert version["serverVersion"]["gitVersion"] == expected


def test_anonymous_requests_are_refused(control_plane: ControlPlane) -> None:
    anonymous = TLSClient(ca=control_plane.pki.ca.cert)
    response = request(f"{control_plane.apiserver_url}/api/v1/namespaces", tls=anonymous)
    assert response.status == 401


def test_admin_is_cluster_admin_and_coredns_is_read_only(control_plane: ControlPlane) -> None:
    assert kubectl(control_plane, "auth", "can-i", "*", "*").stdout.strip() == "yes"
    as_coredns = ("--as=hpk:coredns",)
    can_list = kubectl(control_plane, "auth", "can-i", "list", "endpointslices", *as_coredns)
    assert can_list.stdout.strip() == "yes"
    can_read_secrets = kubectl(
        control_plane, "auth", "can-i", "get", "secrets", *as_coredns, check=False
    )
    assert can_read_secrets.stdout.strip() == "no"


def test_controller_manager_publishes_the_root_ca(control_plane: ControlPlane) -> None:
    def published() -> str:
        result = kubectl(
            control_plane,
            "get",
            "configmap",
            "kube-root-ca.crt",
            "-n",
            "default",
            "-o",
            r"jsonpath={.data.ca\.crt}",
            check=False,
        )
        return result.stdout if result.returncode == 0 else ""

    bundle = eventually("kube-root-ca.crt in namespace default", published)
    assert bundle.strip() == control_plane.pki.ca.cert.read_text().strip()


def test_controller_manager_creates_default_service_accounts(control_plane: ControlPlane) -> None:
    kubectl(control_plane, "create", "namespace", "e2e-sa")
    try:

        def created() -> str:
            result = kubectl(
                control_plane, "get", "serviceaccount", "default", "-n", "e2e-sa", check=False
            )
            return "default" if result.returncode == 0 else ""

        eventually("ServiceAccount default in a new namespace", created)
    finally:
        kubectl(control_plane, "delete", "namespace", "e2e-sa", "--wait=false")


def test_coredns_resolves_the_kubernetes_service(control_plane: ControlPlane) -> None:
    cluster_ip = kubectl(
        control_plane, "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout
    assert cluster_ip == "10.96.0.1"
    answer = dig(control_plane, "kubernetes.default.svc.cluster.local", "+short")
    assert answer.split() == [cluster_ip]


def test_coredns_answers_nxdomain_for_unknown_services(control_plane: ControlPlane) -> None:
    output = dig(control_plane, "no-such-service.default.svc.cluster.local")
    assert re.search(r"status: NXDOMAIN", output), output
    assert re.search(r"flags:[^;]*\baa\b", output), output  # answered by CoreDNS itself


def test_coredns_follows_new_services(control_plane: ControlPlane) -> None:
    kubectl(control_plane, "create", "service", "clusterip", "e2e-web", "--tcp=80:8080")
    try:
        cluster_ip = kubectl(
            control_plane, "get", "service", "e2e-web", "-o", "jsonpath={.spec.clusterIP}"
        ).stdout
        assert cluster_ip.startswith("10.96.")
        answer = eventually(
            "e2e-web in DNS",
            lambda: dig(control_plane, "e2e-web.default.svc.cluster.local", "+short").strip(),
        )
        assert answer.split() == [cluster_ip]
    finally:
        kubectl(control_plane, "delete", "service", "e2e-web")
