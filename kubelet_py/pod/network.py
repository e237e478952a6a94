"""A pod's place on the pod network: whether it has one, its address, its job's network file.

The pod network (docs/networking.md) gives each pod its own namespace and an address from the
pod CIDR, reached through a tunnel to the control-plane job's hub. Which pods join it:
- not those with `hostNetwork: true`, which keep the node's network as in Kubernetes;
- not srun-launched (MPI) pods, whose tasks run on several nodes and use the nodes' fabric;
- the annotation `hpk.io/network: host` keeps any other pod on the node's network.

Pure: the kubelet allocates the address (`AddressPool`) and registers the pod's key with the
hub; this module only decides and renders.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping

ANNOTATION = "hpk.io/network"
LAUNCHER_ANNOTATION = "slurm.hpk.io/launcher"
"""kubelet_py.pod.render's: the pod's main container is started by srun."""
FIELD = f"metadata.annotations[{ANNOTATION}]"
POD = "pod"
HOST = "host"
INTERFACE = "hpk0"


@dataclass(frozen=True)
class PodNetworkSettings:
    """The pod network as the kubelet found it running: its ranges and its hub."""

    hub_endpoint: str
    """host:port of the hub's tunnel, as compute nodes reach it."""
    hub_public_key: str
    """The hub's WireGuard public key, hex."""
    tunnel: PurePosixPath
    """The hpk-tunnel binary on the compute nodes."""
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    mtu: int = 1420

    def __post_init__(self) -> None:
        ipaddress.ip_network(self.pod_cidr, strict=True)
        ipaddress.ip_network(self.service_cidr, strict=True)
        if not self.tunnel.is_absolute():
            raise ValueError(f"setting tunnel must be an absolute path, not {self.tunnel}")
        if len(bytes.fromhex(self.hub_public_key)) != 32:
            raise ValueError("setting hub_public_key must be 32 bytes of hex")


@dataclass(frozen=True)
class PodAddress:
    """What the kubelet gave one pod: its address and its tunnel's private key (hex)."""

    ip: str
    private_key: str


def wants_pod_network(pod: Mapping[str, object]) -> bool:
    """Whether the pod joins the pod network (see the module docstring); InvalidPodSpec for
    a bad annotation."""
    spec = _mapping(pod.get("spec"), "spec")
    metadata = _mapping(pod.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    chosen = annotations.get(ANNOTATION)
    if chosen is not None and chosen not in (POD, HOST):
        raise InvalidPodSpec(FIELD, f"{chosen!r} is neither {POD!r} nor {HOST!r}")
    if spec.get("hostNetwork") is True:
        if chosen == POD:
            raise InvalidPodSpec(FIELD, "'pod' contradicts spec.hostNetwork: true")
        return False
    if LAUNCHER_ANNOTATION in annotations:
        if chosen == POD:
            raise InvalidPodSpec(
                FIELD, "'pod' contradicts srun: srun's tasks use the node's network"
            )
        return False
    return chosen != HOST


def network_config(
    settings: PodNetworkSettings, address: PodAddress, *, marker: PurePosixPath
) -> str:
    """The job's network file (kubelet_py.job.network's CONFIG)."""
    tunnel = "\n".join(
        [
            f"private_key={address.private_key}",
            f"public_key={settings.hub_public_key}",
            f"endpoint={settings.hub_endpoint}",
            # The pod speaks first: the hub learns where it is from its first packet.
            "persistent_keepalive_interval=25",
            f"allowed_ip={settings.pod_cidr}",
            f"allowed_ip={settings.service_cidr}",
            "",
        ]
    )
    config = {
        "interface": {
            "name": INTERFACE,
            "address": f"{address.ip}/32",
            "mtu": settings.mtu,
            "routes": [settings.pod_cidr, settings.service_cidr],
        },
        "tunnel": {"binary": str(settings.tunnel), "config": tunnel},
        "egress": "slirp4netns",
        "marker": str(marker),
    }
    return json.dumps(config, indent=1) + "\n"


class AddressPool:
    """The pod CIDR's addresses, each held by one owner (a pod's UID) at a time.

    The first address is the hub's. Thread-safe."""

    def __init__(self, cidr: str) -> None:
        self._network = ipaddress.ip_network(cidr, strict=True)
        self._hub = next(self._network.hosts())
        self._by_owner: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self._owners: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        self._next = 0
        self._lock = threading.Lock()

    @property
    def hub(self) -> str:
        return str(self._hub)

    def take(self, owner: str) -> str:
        """The owner's address, a free one given the first time; RuntimeError when full."""
        with self._lock:
            if owner in self._by_owner:
                return str(self._by_owner[owner])
            hosts = self._network.num_addresses - 2
            for step in range(hosts):
                index = (self._next + step) % hosts
                candidate = self._network.network_address + 1 + index
                if candidate != self._hub and candidate not in self._owners:
                    self._next = index + 1
                    self._hold(owner, candidate)
                    return str(candidate)
        raise RuntimeError(f"the pod network {self._network} has no free address")

    def restore(self, owner: str, address: str) -> bool:
        """Hold `address` for `owner` again (after a restart); False when it is not in the
        range, or another owner holds it."""
        ip = ipaddress.ip_address(address)
        with self._lock:
            if ip not in self._network or ip == self._hub:
                return False
            holder = self._owners.get(ip)
            if holder is not None:
                return holder == owner
            self._hold(owner, ip)
            return True

    def release(self, owner: str) -> None:
        with self._lock:
            ip = self._by_owner.pop(owner, None)
            if ip is not None:
                del self._owners[ip]

    def _hold(self, owner: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        old = self._by_owner.pop(owner, None)
        if old is not None:
            del self._owners[old]
        self._by_owner[owner] = ip
        self._owners[ip] = owner
