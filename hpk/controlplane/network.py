"""The pod network's hub, in the control-plane job (docs/networking.md).

The hub is a network namespace of the user's, held like a pod's (kubelet_py.job.network),
with forwarding on: one hpk-tunnel carries every pod's tunnel, and routes each pod's address
to that pod's key alone. The kubelet adds and removes the pods through the tunnel's control
socket, and learns where the hub is from the hub file this module writes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpk.controlplane.components import corefile_token
from hpk.files import PRIVATE_FILE_MODE, write_atomic
from hpk.pki import ClusterPKI, write_kubeconfig
from hpk.process import ProcessSpec
from hpk.templating import render
from kubelet_py.adapters.hub import Hub, HubUnavailable, new_private_key, public_key
from kubelet_py.pod.network import PodNetworkSettings

HUB = "pod-network-hub"
POD_DNS = "coredns-pods"
POD_DNS_READY = "CoreDNS-"
"""CoreDNS prints its banner once its servers listen (after the API's first sync)."""
POD_DNS_HEALTH_PORT = 8080
POD_DNS_READY_PORT = 8181
"""Inside the hub's namespace, which no one else shares: the ports need no choosing."""
KUBE_PROXY = "kube-proxy"
KUBE_PROXY_READY = '"Caches are synced" controller="endpoint slice config"'
"""kube-proxy logs it once it has the EndpointSlices, and so writes the Services' rules."""
INTERFACE = "hpk0"
MTU = 1420
HUB_MEMORY_LIMIT = "512MiB"
ADMIN_FOLDERS = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class HubFiles:
    """The hub's files below the control plane's state folder."""

    folder: Path

    @property
    def key(self) -> Path:
        """Its private key, kept across jobs: pods of a resumed cluster keep the hub's key."""
        return self.folder / "hub.key"

    @property
    def config(self) -> Path:
        """kubelet_py.job.network's configuration of the hub."""
        return self.folder / "hub-network.json"

    @property
    def pod_dns_corefile(self) -> Path:
        return self.folder / "Corefile"

    @property
    def pod_dns_kubeconfig(self) -> Path:
        """CoreDNS's kubeconfig from the hub: the API server at the advertised address, since
        the hub's loopback is its own."""
        return self.folder / "coredns.conf"

    @property
    def kube_proxy_kubeconfig(self) -> Path:
        return self.folder / "kube-proxy.conf"

    @property
    def services_ready(self) -> Path:
        """Exists while kube-proxy runs in the hub (the kubelet then gives pods the
        `kubernetes` Service's ClusterIP)."""
        return self.folder / "services-ready"

    @property
    def hub_file(self) -> Path:
        """What the kubelet reads: where the hub is, its key and its control socket."""
        return self.folder / "hub.json"


@dataclass(frozen=True)
class HubPlan:
    """A prepared hub: what to run, and how to tell it is ready."""

    spec: ProcessSpec
    control: Path
    hub_file: Path
    relay: Path
    """Where the relay for port-forwards (`prepare_relay`) listens."""

    def ready(self) -> bool:
        try:
            Hub(self.control).peers()
        except HubUnavailable:
            return False
        return True


def admin_path() -> str:
    """PATH with the system folders where iptables lives, which an ordinary user's PATH
    often lacks."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    missing = [folder for folder in ADMIN_FOLDERS if folder not in path.split(os.pathsep)]
    return os.pathsep.join([path, *missing])


def in_hub(holder: int) -> tuple[str, ...]:
    """The words that run a command in the hub's namespaces, as root of its user namespace
    (`nsenter` keeps the user's own uid, which is that root)."""
    return ("nsenter", "--preserve-credentials", "--user", "--net", f"--target={holder}", "--")


def prepare_kube_proxy(
    files: HubFiles,
    *,
    kube_proxy: Path,
    holder: int,
    node: str,
    apiserver: str,
    pki: ClusterPKI,
    pod_cidr: str,
    log_file: Path,
    pid_file: Path,
) -> ProcessSpec:
    """The stock kube-proxy in the hub's namespaces, where every pod's packets pass: its
    rules turn a ClusterIP into a ready endpoint, and back. It goes by the name of `node`
    (one of the kubelet's), whose address it needs only for NodePorts.

    Its sysctls outside the namespace are left alone (`--conntrack-*` at 0): they are the
    node's, which no user may set. Its metrics and health ports are the hub's own."""
    kubeconfig = files.kube_proxy_kubeconfig
    write_kubeconfig(kubeconfig, server=apiserver, ca_cert=pki.ca.cert, client=pki.kube_proxy)
    argv = (
        *in_hub(holder),
        str(kube_proxy),
        f"--kubeconfig={kubeconfig}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={pod_cidr}",
        f"--hostname-override={node}",
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
        "--metrics-bind-address=127.0.0.1:10249",
        "--healthz-bind-address=127.0.0.1:10256",
    )
    env = {"PATH": admin_path()}
    return ProcessSpec(name=KUBE_PROXY, argv=argv, log_file=log_file, pid_file=pid_file, env=env)


def dns_address(service_cidr: str) -> str:
    """The cluster DNS Service's address: the tenth of the Service range, as kubeadm has it
    (10.96.0.10)."""
    return str(ipaddress.ip_network(service_cidr, strict=True).network_address + 10)


HUB_LINE = re.compile(r"^pod (\d+) \d+$", re.MULTILINE)


def hub_holder(log_text: str) -> int | None:
    """The pid that holds the hub's namespace, from the hub's line in its log."""
    found = HUB_LINE.search(log_text)
    return int(found.group(1)) if found else None


def prepare_pod_dns(
    files: HubFiles,
    *,
    coredns: Path,
    holder: int,
    apiserver: str,
    pki: ClusterPKI,
    dns: str,
    cluster_domain: str,
    upstreams: list[str],
    log_file: Path,
    pid_file: Path,
) -> ProcessSpec:
    """CoreDNS for the pods, in the hub's namespaces on the cluster DNS address's port 53:
    its kubeconfig (`apiserver` at an address the hub reaches), its Corefile and its spec.

    As root of the hub's user namespace (`in_hub`) it may bind port 53 there."""
    write_kubeconfig(
        files.pod_dns_kubeconfig, server=apiserver, ca_cert=pki.ca.cert, client=pki.coredns
    )
    corefile = render(
        "coredns/Corefile.j2",
        port=53,
        bind_address=dns,
        probe_address="127.0.0.1",
        health_port=POD_DNS_HEALTH_PORT,
        ready_port=POD_DNS_READY_PORT,
        cluster_domain=cluster_domain,
        kubeconfig=corefile_token(str(files.pod_dns_kubeconfig)),
        upstreams=upstreams,
    )
    write_atomic(files.pod_dns_corefile, corefile, mode=PRIVATE_FILE_MODE)
    argv = (*in_hub(holder), str(coredns), "-conf", str(files.pod_dns_corefile))
    return ProcessSpec(name=POD_DNS, argv=argv, log_file=log_file, pid_file=pid_file)


RELAY = "pod-network-relay"
RELAY_READY = "ready"


def prepare_relay(
    *, binary: Path, holder: int, socket: Path, pod_cidr: str, log_file: Path, pid_file: Path
) -> ProcessSpec:
    """`hpk-kubelet-api relay` in the hub's namespaces: the kubelet API's front, on the node's
    network, reaches the pods' addresses for `kubectl port-forward` through its socket (the
    socket's folder is this user's alone, made by `prepare_hub`)."""
    argv = (*in_hub(holder), str(binary), "relay", f"--socket={socket}", f"--allow={pod_cidr}")
    return ProcessSpec(name=RELAY, argv=argv, log_file=log_file, pid_file=pid_file)


def prepare_hub(
    files: HubFiles,
    *,
    tunnel: Path,
    endpoint_address: str,
    port: int,
    pod_cidr: str,
    service_cidr: str,
    cluster_domain: str,
    log_file: Path,
    pid_file: Path,
) -> HubPlan:
    """Write the hub's configuration and the kubelet's hub file; the hub's process spec.

    The control socket lives in a fresh folder of this user's under the temporary folder
    (0700): a socket's path must be short, and the state folder's may not be."""
    files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.services_ready.unlink(missing_ok=True)
    if files.key.is_file():
        private = files.key.read_text().strip()
    else:
        private = new_private_key()
        write_atomic(files.key, private + "\n", mode=PRIVATE_FILE_MODE)
    network = ipaddress.ip_network(pod_cidr, strict=True)
    hub_address = next(network.hosts())
    control = Path(tempfile.mkdtemp(prefix="hpk-hub-")) / "control"
    dns = dns_address(service_cidr)
    config = {
        "interface": {
            "name": INTERFACE,
            "address": f"{hub_address}/{network.prefixlen}",
            "mtu": MTU,
            "local": [f"{dns}/32"],
        },
        "forwarding": True,
        # The cluster DNS and kube-proxy's Services in the hub reach the API server and the
        # node's resolvers.
        "egress": "slirp4netns",
        "masquerade": True,
        "tunnel": {"binary": str(tunnel), "config": f"private_key={private}\nlisten_port={port}\n"},
        "control": str(control),
    }
    write_atomic(files.config, json.dumps(config, indent=1) + "\n", mode=PRIVATE_FILE_MODE)
    host = f"[{endpoint_address}]" if ":" in endpoint_address else endpoint_address
    settings = PodNetworkSettings(
        hub_endpoint=f"{host}:{port}",
        hub_public_key=public_key(private),
        tunnel=PurePosixPath(tunnel),
        pod_cidr=pod_cidr,
        service_cidr=service_cidr,
        dns=dns,
        cluster_domain=cluster_domain,
        mtu=MTU,
        services_ready=PurePosixPath(files.services_ready),
    )
    relay = control.with_name("relay")
    hub_file = {**settings.to_json(), "control": str(control), "relay": str(relay)}
    write_atomic(files.hub_file, json.dumps(hub_file, indent=1) + "\n", mode=PRIVATE_FILE_MODE)
    argv = (sys.executable, "-I", "-m", "kubelet_py.job.network", "--foreground", str(files.config))
    # The hub carries every pod's traffic: its tunnel's heap may grow further than a pod's.
    env = {"GOMEMLIMIT": HUB_MEMORY_LIMIT, "PATH": admin_path()}
    spec = ProcessSpec(name=HUB, argv=argv, log_file=log_file, pid_file=pid_file, env=env)
    return HubPlan(spec=spec, control=control, hub_file=files.hub_file, relay=relay)
