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
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import PurePosixPath

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.errors import expect_object as _mapping
from kubelet_py.pod.fields import DNS_LABEL, DNS_SUBDOMAIN, expect_objects

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
    dns: str = "10.96.0.10"
    """The cluster DNS Service's address, served by CoreDNS in the hub."""
    cluster_domain: str = "cluster.local"
    mtu: int = 1420
    services_ready: PurePosixPath | None = None
    """A file that exists once kube-proxy runs in the hub: pods on the pod network then reach
    the API server through the `kubernetes` Service (the Service range's first address)."""

    def to_json(self) -> dict[str, object]:
        """Its fields as JSON values: the hub's file, which `from_json` reads back."""
        return {
            f.name: None if value is None else value if isinstance(value, str | int) else str(value)
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PodNetworkSettings:
        """The settings `to_json` wrote; KeyError, TypeError or ValueError for others."""
        ready = data.get("services_ready")
        return cls(
            hub_endpoint=str(data["hub_endpoint"]),
            hub_public_key=str(data["hub_public_key"]),
            tunnel=PurePosixPath(str(data["tunnel"])),
            pod_cidr=str(data["pod_cidr"]),
            service_cidr=str(data["service_cidr"]),
            dns=str(data["dns"]),
            cluster_domain=str(data["cluster_domain"]),
            mtu=int(str(data["mtu"])),
            services_ready=None if ready is None else PurePosixPath(str(ready)),
        )

    @property
    def kubernetes_service(self) -> tuple[str, int]:
        network = ipaddress.ip_network(self.service_cidr, strict=True)
        return str(network.network_address + 1), 443

    def __post_init__(self) -> None:
        ipaddress.ip_network(self.pod_cidr, strict=True)
        ipaddress.ip_network(self.service_cidr, strict=True)
        ipaddress.ip_address(self.dns)
        if not DNS_SUBDOMAIN.fullmatch(self.cluster_domain):
            raise ValueError(f"setting cluster_domain {self.cluster_domain!r} is no domain")
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


HOSTNAME_LIMIT = 63
SEARCH_LIMIT = 32
"""Kubernetes' limits: a label's length, and the search domains it accepts."""
DNS_OPTION = re.compile(r"[A-Za-z0-9_.-]+")


def pod_hostname(pod: Mapping[str, object], *, domain: str) -> tuple[str, str | None]:
    """(its host name, its FQDN in the cluster `domain` when it has a subdomain):
    `spec.hostname`, else the pod's name cut to 63 characters, as Kubernetes names it."""
    spec = _mapping(pod.get("spec"), "spec")
    metadata = _mapping(pod.get("metadata"), "metadata")
    name = spec.get("hostname")
    if name is None:
        name = str(metadata.get("name", ""))[:HOSTNAME_LIMIT].rstrip("-.")
    elif not isinstance(name, str) or not DNS_LABEL.fullmatch(name) or len(name) > 63:
        raise InvalidPodSpec("spec.hostname", f"{name!r} is no DNS label")
    subdomain = spec.get("subdomain")
    if subdomain is None:
        return name, None
    if not isinstance(subdomain, str) or not DNS_LABEL.fullmatch(subdomain):
        raise InvalidPodSpec("spec.subdomain", f"{subdomain!r} is no DNS label")
    return name, f"{name}.{subdomain}.{metadata.get('namespace')}.svc.{domain}"


def hosts_file(pod: Mapping[str, object], address: str, *, domain: str) -> str:
    """The pod's /etc/hosts, as Kubernetes writes it: localhost, the pod's own names at its
    address, then its hostAliases."""
    name, fqdn = pod_hostname(pod, domain=domain)
    names = f"{fqdn}\t{name}" if fqdn else name
    lines = [
        "# Kubernetes-managed hosts file (hpk).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{address}\t{names}",
    ]
    aliases = host_aliases(pod)
    if aliases:
        lines.append("# Entries added by HostAliases.")
        lines += [f"{ip}\t{' '.join(hostnames)}" for ip, hostnames in aliases]
    return "\n".join(lines) + "\n"


def host_aliases(pod: Mapping[str, object]) -> list[tuple[str, list[str]]]:
    spec = _mapping(pod.get("spec"), "spec")
    aliases = []
    for index, entry in enumerate(expect_objects(spec.get("hostAliases"), "spec.hostAliases")):
        where = f"spec.hostAliases[{index}]"
        try:
            ip = str(ipaddress.ip_address(str(entry.get("ip"))))
        except ValueError:
            raise InvalidPodSpec(f"{where}.ip", f"{entry.get('ip')!r} is no IP address") from None
        hostnames = entry.get("hostnames") or []
        if not isinstance(hostnames, list) or not all(
            isinstance(h, str) and DNS_SUBDOMAIN.fullmatch(h.lower()) for h in hostnames
        ):
            raise InvalidPodSpec(f"{where}.hostnames", "must be a list of host names")
        aliases.append((ip, list(hostnames)))
    return aliases


def resolv_conf(pod: Mapping[str, object], settings: PodNetworkSettings) -> str | None:
    """The pod's /etc/resolv.conf for its dnsPolicy; None for `Default` without dnsConfig,
    which keeps the node's.

    ClusterFirst (and ClusterFirstWithHostNet) name the cluster DNS with the Kubernetes
    search path and `ndots:5`; `None` takes dnsConfig alone; dnsConfig's nameservers and
    searches come after the policy's, and its options replace those of the same name."""
    spec = _mapping(pod.get("spec"), "spec")
    metadata = _mapping(pod.get("metadata"), "metadata")
    policy = spec.get("dnsPolicy", "ClusterFirst")
    config = _mapping(spec.get("dnsConfig"), "spec.dnsConfig")
    if policy == "Default" and not config:
        return None
    nameservers: list[str] = []
    searches: list[str] = []
    options: dict[str, str | None] = {}
    if policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
        domain = settings.cluster_domain
        namespace = str(metadata.get("namespace"))
        nameservers = [settings.dns]
        searches = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]
        options = {"ndots": "5"}
    for index, server in enumerate(_strings(config, "nameservers")):
        try:
            nameservers.append(str(ipaddress.ip_address(server)))
        except ValueError:
            where = f"spec.dnsConfig.nameservers[{index}]"
            raise InvalidPodSpec(where, f"{server!r} is no IP address") from None
    for search in _strings(config, "searches"):
        if not DNS_SUBDOMAIN.fullmatch(search.lower().rstrip(".")):
            raise InvalidPodSpec("spec.dnsConfig.searches", f"{search!r} is no domain")
        searches.append(search)
    options.update(_dns_options(config))
    if policy == "None" and not nameservers:
        raise InvalidPodSpec("spec.dnsConfig.nameservers", "dnsPolicy None needs a nameserver")
    if len(searches) > SEARCH_LIMIT:
        raise InvalidPodSpec("spec.dnsConfig.searches", f"more than {SEARCH_LIMIT}")
    lines = [f"nameserver {server}" for server in nameservers]
    if searches:
        lines.append("search " + " ".join(dict.fromkeys(searches)))
    if options:
        words = [name if value is None else f"{name}:{value}" for name, value in options.items()]
        lines.append("options " + " ".join(words))
    return "\n".join(lines) + "\n"


def _dns_options(config: Mapping[str, object]) -> dict[str, str | None]:
    options: dict[str, str | None] = {}
    for index, option in enumerate(expect_objects(config.get("options"), "spec.dnsConfig.options")):
        name, value = option.get("name"), option.get("value")
        if not isinstance(name, str) or not DNS_OPTION.fullmatch(name):
            raise InvalidPodSpec(f"spec.dnsConfig.options[{index}].name", f"{name!r}")
        if value is not None and (not isinstance(value, str) or not DNS_OPTION.fullmatch(value)):
            raise InvalidPodSpec(f"spec.dnsConfig.options[{index}].value", f"{value!r}")
        options[name] = value
    return options


def _strings(config: Mapping[str, object], key: str) -> list[str]:
    values = config.get(key) or []
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise InvalidPodSpec(f"spec.dnsConfig.{key}", "must be a list of strings")
    return list(values)
