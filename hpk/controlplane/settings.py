"""Settings of the control plane, its binaries and the layout of its state folder.

Kept apart from the launcher so that the sbatch entry point, the CLI and the tests can build
them without starting anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from pathlib import Path

from hpk.toolchain import Toolchain

IMAGE_BIN_DIR = Path("/usr/local/bin")
"""Where the control-plane image (container/control-plane.def) keeps its programs."""


@dataclass(frozen=True)
class ControlPlaneSettings:
    """What shapes one control plane; every field has a working default."""

    service_cidr: str = "10.96.0.0/16"
    """Range of Service ClusterIPs; its first address is the `kubernetes` service's."""

    pod_cidr: str = "10.244.0.0/16"
    """The pod network's range: each pod's address, and the hub's (the first)."""

    pod_network: bool = True
    """Whether pods get a network of their own (docs/networking.md); without it, or where
    the nodes refuse it, they use the nodes' network."""

    cluster_domain: str = "cluster.local"
    """DNS domain CoreDNS serves for services and pods."""

    apiserver_bind_address: str = "0.0.0.0"  # noqa: S104 - see below
    """Where the API server listens. Login and compute nodes must reach it, and every
    request needs a client certificate or token, so all addresses by default."""

    advertise_address: str | None = None
    """Address of the `kubernetes` service's endpoint; None: the node's primary address.
    Kubernetes refuses loopback addresses here."""

    dns_bind_address: str | None = None
    """Where CoreDNS answers queries; None: the advertise address."""

    extra_apiserver_sans: tuple[str, ...] = ()
    """More DNS names or IPs for the API server's certificate (e.g. a login-node alias)."""

    resolv_conf: Path = Path("/etc/resolv.conf")
    """Whose nameservers CoreDNS forwards names outside the cluster domain to."""

    etcd_ready_timeout_s: float = 60.0
    """How long etcd may take to answer /health."""

    apiserver_ready_timeout_s: float = 120.0
    """How long the API server may take to answer /readyz (slow on busy, small nodes)."""

    controller_manager_ready_timeout_s: float = 90.0
    """How long the controller-manager may take to answer /healthz."""

    coredns_ready_timeout_s: float = 60.0
    """How long CoreDNS may take to sync with the API server and answer /ready."""

    stop_timeout_s: float = 20.0
    """Grace time after SIGTERM before a component is killed."""

    def __post_init__(self) -> None:
        for name in ("service_cidr", "pod_cidr"):
            network = ipaddress.ip_network(getattr(self, name), strict=True)
            if network.num_addresses < 4:
                raise ValueError(f"{name} {getattr(self, name)} is too small")
        for name in ("apiserver_bind_address", "advertise_address", "dns_bind_address"):
            value = getattr(self, name)
            if value is not None:
                ipaddress.ip_address(value)  # raises ValueError with the bad value
        positive = [f.name for f in fields(self) if f.name.endswith("_s")]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class Binaries:
    """The programs that make up the control plane."""

    etcd: Path
    """etcd."""

    kube_apiserver: Path
    """kube-apiserver."""

    kube_controller_manager: Path
    """kube-controller-manager."""

    coredns: Path
    """CoreDNS, built with at least the plugins the Corefile template uses."""

    @classmethod
    def from_toolchain(cls, toolchain: Toolchain | None = None) -> Binaries:
        """The pinned binaries built by container/build-toolchain.sh."""
        tools = toolchain or Toolchain.load()
        return cls(
            etcd=tools.binary("etcd"),
            kube_apiserver=tools.binary("kube-apiserver"),
            kube_controller_manager=tools.binary("kube-controller-manager"),
            coredns=tools.binary("coredns"),
        )

    @classmethod
    def in_image(cls) -> Binaries:
        """The same programs as seen inside the control-plane image, for a runner that
        starts them there (hpk.controlplane.image.ApptainerRunner)."""
        return cls(
            etcd=IMAGE_BIN_DIR / "etcd",
            kube_apiserver=IMAGE_BIN_DIR / "kube-apiserver",
            kube_controller_manager=IMAGE_BIN_DIR / "kube-controller-manager",
            coredns=IMAGE_BIN_DIR / "coredns",
        )


@dataclass(frozen=True)
class StateLayout:
    """Where the control plane keeps its state, below one folder (0700)."""

    root: Path
    """The state folder."""

    @property
    def ports_file(self) -> Path:
        return self.root / "ports.json"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def kubeconfigs(self) -> Path:
        return self.root / "kubeconfigs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.kubeconfigs / "admin.conf"

    @property
    def controller_manager_kubeconfig(self) -> Path:
        return self.kubeconfigs / "controller-manager.conf"

    @property
    def coredns_kubeconfig(self) -> Path:
        return self.kubeconfigs / "coredns.conf"

    @property
    def flexvolume_dir(self) -> Path:
        """Given to the controller-manager so it never reaches outside the state folder."""
        return self.root / "kube-controller-manager" / "flexvolume"

    @property
    def network(self) -> Path:
        """The pod network hub's files (hpk.controlplane.network)."""
        return self.root / "network"

    @property
    def corefile(self) -> Path:
        return self.root / "coredns" / "Corefile"

    def log_file(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.run / f"{component}.pid"
