"""Pods get a network of their own, end to end, as an ordinary user runs hpk
(docs/networking.md).

The user `hpk-e2e` runs `hpk up`: its control-plane job runs the hub, and each pod's job makes
the pod's namespace, its tunnel to the hub and its way out, with no root anywhere. So:
- two pods on one Slurm node both listen on port 8080, and a pod on another node reaches each
  at its own address from the pod CIDR, which is the pod's status.podIP;
- the server sees the client's pod address, not the node's;
- a pod asks for the node's network with `hostNetwork: true`, and its podIP is the node's;
- cluster DNS answers inside every pod at 10.96.0.10:53, for Services and for pods;
- with /dev/net/tun closed, a pod falls back to the node's network and says so;
- a second user's cluster on the same nodes keeps its pods out of this one's reach.
"""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SECOND_USER, UserInstall
from tests.e2e.kube import eventually
from tests.e2e.user_cluster import UserCluster, user_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAMESPACE = "network"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
# A tiny HTTP server: busybox httpd, whose CGI script answers with its pod's name and the
# client's address.
WHO = '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%s from %s\\n" NAME "$REMOTE_ADDR"\n'
SERVE = (
    'mkdir -p /tmp/www/cgi-bin && echo "$WHO" | sed "s/NAME/$POD/" >/tmp/www/cgi-bin/who && '
    "chmod +x /tmp/www/cgi-bin/who && exec httpd -f -p 8080 -h /tmp/www"
)


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[UserCluster]:
    with user_cluster(user_install, folder=".hpk-network", namespace=NAMESPACE) as running:
        yield running
        # The servers run until deleted: their jobs must not outlive the cluster.
        running.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--timeout=120s")


def pod(name: str, script: str, *, node: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"slurm.hpk.io/flags": f"--nodelist={node}"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c", script],
                    "env": [
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "WHO", "value": WHO},
                        {
                            "name": "POD_IP",
                            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                        },
                    ],
                }
            ],
            **spec,
        },
    }


def running(cluster: UserCluster, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = cluster.pod(name)
        status = found["status"]
        return found if status.get("phase") == "Running" and status.get("podIP") else None

    return eventually(f"{name} running", ready, timeout=180)


def node_of(found: dict[str, Any]) -> str:
    job_id = found["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    return subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_pods_on_one_port_reach_each_other_at_their_own_addresses_across_nodes(
    cluster: UserCluster,
) -> None:
    cluster.create(pod("left", SERVE, node="n1"))
    cluster.create(pod("right", SERVE, node="n1"))
    left, right = running(cluster, "left"), running(cluster, "right")
    addresses = {found["status"]["podIP"] for found in (left, right)}
    assert len(addresses) == 2, "each pod has an address of its own"
    for found in (left, right):
        address = ipaddress.ip_address(found["status"]["podIP"])
        assert address in POD_CIDR, found["status"]
        assert found["status"]["podIPs"] == [{"ip": str(address)}]
        assert found["status"]["hostIP"] != str(address)
        assert node_of(found) == "n1"

    urls = [f"http://{found['status']['podIP']}:8080/cgi-bin/who" for found in (left, right)]
    fetch = " && ".join(f"wget -q -O - {url}" for url in urls)
    cluster.create(pod("client", f"{fetch} && echo podIP=$POD_IP", node="n2"))
    client = cluster.ended("client")
    # busybox httpd gives the client's address as IPv4-mapped IPv6: [::ffff:10.244.0.4]
    log = cluster.logs("client").replace("[::ffff:", "").replace("]", "")
    assert client["status"]["phase"] == "Succeeded", (client["status"], log)
    assert node_of(client) == "n2"
    me = client["status"]["podIP"]
    assert ipaddress.ip_address(me) in POD_CIDR
    assert f"left from {me}\n" in log and f"right from {me}\n" in log, log
    assert f"podIP={me}\n" in log, log  # the status.podIP fieldRef is the pod's address


def test_a_host_network_pod_has_the_nodes_address(cluster: UserCluster) -> None:
    cluster.create(pod("on-host", "hostname -i", node="n3", hostNetwork=True))
    found = cluster.ended("on-host")
    assert found["status"]["phase"] == "Succeeded", found["status"]
    assert found["status"]["podIP"] == found["status"]["hostIP"]
    assert ipaddress.ip_address(found["status"]["podIP"]) not in POD_CIDR


def test_cluster_dns_answers_for_services_and_pods_from_inside_a_pod(
    cluster: UserCluster,
) -> None:
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]},
    }
    cluster.create(headless)
    servers = []
    for name in ("web-0", "web-1"):
        server = pod(name, SERVE, node="n1", hostname=name, subdomain="web")
        server["metadata"]["labels"] = {"app": "web"}
        cluster.create(server)
        servers.append(server)
    addresses = sorted(running(cluster, name)["status"]["podIP"] for name in ("web-0", "web-1"))
    domain = f"{NAMESPACE}.svc.cluster.local"
    script = (
        "cat /etc/resolv.conf; echo hostname=$(hostname); grep aliased /etc/hosts; "
        "nslookup kubernetes.default.svc.cluster.local; "
        f"nslookup web.{domain}; nslookup web-0.web.{domain}; "
        f"wget -q -O - http://web-1.web.{domain}:8080/cgi-bin/who"
    )
    client = pod(
        "asker",
        script,
        node="n2",
        hostAliases=[{"ip": "192.0.2.77", "hostnames": ["aliased.example"]}],
    )
    cluster.create(client)
    found = cluster.ended("asker")
    log = cluster.logs("asker")
    assert found["status"]["phase"] == "Succeeded", (found["status"], log)
    assert "nameserver 10.96.0.10\n" in log, log
    assert f"search {domain} svc.cluster.local cluster.local\n" in log, log
    assert "options ndots:5\n" in log
    assert "hostname=asker\n" in log
    assert "192.0.2.77\taliased.example\n" in log
    assert "Address: 10.96.0.1\n" in log, log  # the kubernetes Service's ClusterIP
    for address in addresses:  # the headless Service: one A record per ready pod
        assert f"Address: {address}\n" in log, log
    web0 = next(a for a in addresses if a == running(cluster, "web-0")["status"]["podIP"])
    assert log.count(f"Address: {web0}\n") == 2, log  # and web-0's own name
    assert "web-1 from " in log, log


@pytest.fixture
def tun_closed() -> Iterator[None]:
    """/dev/net/tun closed to users, as on a site that forbids it; opened again after."""
    device = Path("/dev/net/tun")
    mode = stat.S_IMODE(device.stat().st_mode)
    device.chmod(0o600)
    try:
        yield
    finally:
        device.chmod(mode)


def network_condition(cluster: UserCluster) -> dict[str, Any] | None:
    node = json.loads(cluster.kubectl("get", "node", "hpk-batch", "-o", "json"))
    conditions = node["status"].get("conditions") or []
    return next((c for c in conditions if c["type"] == "PodNetworkReady"), None)


def test_a_node_that_refuses_the_device_runs_the_pod_on_its_network_and_says_so(
    cluster: UserCluster, tun_closed: None
) -> None:
    cluster.create(pod("refused", "echo podIP=$POD_IP", node="n3"))
    found = cluster.ended("refused")
    assert found["status"]["phase"] == "Succeeded", found["status"]
    assert found["status"]["podIP"] == found["status"]["hostIP"]
    assert f"podIP={found['status']['hostIP']}\n" in cluster.logs("refused")
    events = [e for e in cluster.events("refused") if e["reason"] == "PodNetworkUnavailable"]
    assert events and events[0]["type"] == "Warning", cluster.events("refused")
    assert "/dev/net/tun" in events[0]["message"], events[0]
    condition = eventually(
        "the nodes' PodNetworkReady condition False",
        lambda: (c := network_condition(cluster)) and c["status"] == "False" and c,
        timeout=120,
    )
    assert "refused" in condition["message"], condition


def test_two_users_clusters_on_one_node_keep_their_pods_apart(
    cluster: UserCluster, second_install: UserInstall
) -> None:
    with user_cluster(second_install, folder=".hpk-other", namespace=NAMESPACE) as other:
        try:
            # Both users' servers on one Slurm node, on one port.
            cluster.create(pod("mine", SERVE, node="n3"))
            other.create(pod("theirs", SERVE, node="n3"))
            mine, theirs = running(cluster, "mine"), running(other, "theirs")
            assert node_of(mine) == node_of(theirs) == "n3"
            url = f"http://{theirs['status']['podIP']}:8080/cgi-bin/who"
            # Their own pod reaches it ...
            other.create(pod("their-client", f"timeout 10 wget -q -O - {url}", node="n1"))
            assert other.ended("their-client")["status"]["phase"] == "Succeeded"
            assert "theirs from " in other.logs("their-client")
            # ... and the same address, asked from this user's cluster, is never theirs: it is
            # this cluster's own address space, behind this cluster's hub.
            probe = f"timeout 10 wget -q -O - {url}; echo exit=$?"
            cluster.create(pod("my-client", probe, node="n1"))
            cluster.ended("my-client")
            log = cluster.logs("my-client")
            assert "exit=" in log, log
            assert "theirs from" not in log, log
            jobs = subprocess.run(
                ["squeue", "-h", "-w", "n3", "-o", "%u"], capture_output=True, text=True, check=True
            ).stdout.split()
            assert {"hpk-e2e", SECOND_USER} <= set(jobs), jobs
        finally:
            other.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--timeout=120s")


def test_a_cluster_ip_service_reaches_its_ready_pods_through_kube_proxy(
    cluster: UserCluster,
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {
            "selector": {"app": "echo"},
            "ports": [
                {"name": "web", "port": 80, "targetPort": "http"},
                {"name": "alt", "port": 81, "targetPort": 8080},
            ],
        },
    }
    cluster.create(service)
    for name, node in (("echo-a", "n1"), ("echo-b", "n2")):
        server = pod(name, SERVE, node=node)
        server["metadata"]["labels"] = {"app": "echo"}
        server["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
        cluster.create(server)
        running(cluster, name)
    cluster_ip = json.loads(
        cluster.kubectl("get", "service", "-n", NAMESPACE, "echo", "-o", "json")
    )["spec"]["clusterIP"]
    # busybox's wget -T crashes; timeout bounds each request instead.
    asks = " ; ".join(["timeout 10 wget -q -O - http://echo/cgi-bin/who"] * 12)
    script = (
        f"{asks} ; timeout 10 wget -q -O - http://{cluster_ip}:81/cgi-bin/who ; "
        "echo KUBERNETES_SERVICE_HOST=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT ; "
        "echo links=$ECHO_SERVICE_HOST:$ECHO_SERVICE_PORT_WEB:$ECHO_PORT_81_TCP ; "
        "nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT </dev/null && echo api-reached"
    )
    cluster.create(pod("echo-client", script, node="n3"))
    found = cluster.ended("echo-client")
    log = cluster.logs("echo-client")
    assert found["status"]["phase"] == "Succeeded", (found["status"], log)
    answers = [line.split(" from ")[0] for line in log.splitlines() if " from " in line]
    assert len(answers) == 13, log  # 12 through port 80 (a named targetPort), 1 through 81
    assert set(answers) == {"echo-a", "echo-b"}, log  # both ready pods answer
    assert "KUBERNETES_SERVICE_HOST=10.96.0.1:443\n" in log, log
    assert "api-reached\n" in log, log
    assert f"links={cluster_ip}:80:tcp://{cluster_ip}:81\n" in log, log  # enableServiceLinks
