"""Slurm partitions as Kubernetes nodes: one Node per partition, its status and its Lease.

hpk has no machines of its own to register. Each Slurm partition the kubelet may use becomes
a Node named `<prefix>-<partition>`, so that a pod chooses a partition with a nodeSelector and
`kubectl describe node` shows what the partition offers (CPUs, memory and GPUs summed over its
Slurm nodes). A Lease per node in `kube-node-lease`, renewed every few seconds, is the
heartbeat that keeps the controller-manager from marking the nodes NotReady and evicting
their pods.

What it may touch: the API server through the narrow `NodeApi` (implemented by
`kubelet_py.adapters.apiserver.KubeApi`), and Slurm only through an injected `PartitionSource`.
`partitions_from` below adapts kubelet_py.adapters.slurm's `SlurmClient.partitions()` to it.

Shutdown leaves the nodes exactly as they are: it neither deletes them nor marks them
NotReady, it only stops renewing their Leases. Pods on an hpk node are Slurm jobs that keep
running while the kubelet is away (a walltime restart of the control-plane job, a kubelet
restart), and they must be adopted when it comes back, not evicted. Deleting a Node would make
the pod garbage collector delete its pods; writing NotReady would make the controller-manager
taint the node with `node.kubernetes.io/not-ready:NoExecute`, and that taint outlives the
control plane, so the next start could evict every pod before the kubelet marks the node Ready
again. A silent Lease is the gentlest signal: the control-plane job stops the controller-
manager right after the kubelet, and if only the kubelet is gone, every hpk node goes quiet at
once, which the node lifecycle controller treats as a full disruption and does not evict for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import platform
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from kubelet_py import NODES_MESSAGE
from kubelet_py.adapters.slurm import SlurmClient, SlurmError
from kubelet_py.job.clock import api_time, utcnow

log = logging.getLogger(__name__)

JSON = dict[str, Any]

PARTITION_LABEL = "hpk.io/partition"
"""Node label holding the partition; a pod's nodeSelector on it chooses the partition."""

PARTITION_ANNOTATION = "hpk.io/partition-name"
"""Node annotation with Slurm's exact partition name (the label may have been sanitized)."""

HOSTNAME_LABEL = "kubernetes.io/hostname"
GPU_RESOURCE = "nvidia.com/gpu"
LEASE_NAMESPACE = "kube-node-lease"
MANAGED_BY = "hpk-kubelet"

_DNS_LABEL_MAX = 63
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class PartitionsUnavailable(RuntimeError):
    """Slurm's partitions could not be read (sinfo failed or its answer made no sense)."""


# ---------------------------------------------------------------------------------------------
# Partitions


@dataclass(frozen=True)
class Partition:
    """One Slurm partition, with its resources summed over its Slurm nodes."""

    name: str
    """Slurm's name for it, as `sbatch -p` takes it."""

    nodes: int
    """How many Slurm nodes it has."""

    cpus: int
    """CPUs over all of its nodes."""

    memory_mb: int
    """Memory over all of its nodes, in MiB (Slurm's "MB")."""

    gpus: int = 0
    """GPUs (gres `gpu`) over all of its nodes."""

    default: bool = False
    """Slurm's default partition (the one marked `*` by sinfo)."""

    up: bool = True
    """The partition accepts jobs (sinfo's availability is "up")."""

    addresses: tuple[tuple[str, str], ...] = ()
    """(Slurm node name, its NodeAddr) for each of its nodes."""


PartitionSource = Callable[[], Sequence[Partition]]
"""Reads the partitions Slurm has now; raises PartitionsUnavailable when it cannot."""


def partitions_from(client: SlurmClient) -> PartitionSource:
    """A PartitionSource that reads Slurm through the kubelet's Slurm adapter.

    Capacity counts only the nodes Slurm can start jobs on (not down, drained or failed).
    """

    def read() -> list[Partition]:
        try:
            infos = client.partitions()
        except SlurmError as error:
            raise PartitionsUnavailable(str(error)) from error
        return [
            Partition(
                name=info.name,
                nodes=len(info.nodes),
                cpus=info.cpus,
                memory_mb=info.memory_mb,
                gpus=info.gpus,
                default=info.default,
                up=info.available,
                addresses=tuple((node.name, node.address) for node in info.nodes),
            )
            for info in infos
        ]

    return read


class SlurmNodeAddresses(Mapping[str, str]):
    """Slurm node name -> IP address, from the partitions as the node agent last read them.

    A pod's hostIP (and podIP: containers share the node's network) is the address of the
    Slurm node its job runs on. A NodeAddr that is a host name is resolved once and cached;
    one that does not resolve is left out. A loopback NodeAddr means the node is this host:
    it becomes `host_address`, the address others reach this host at (an endpoint of a
    Service may not be a loopback address, and no one else could use it).
    """

    def __init__(
        self, current: Callable[[], NodeSet | None], *, host_address: str | None = None
    ) -> None:
        self._current = current
        self._host_address = host_address
        self._resolved: dict[str, str | None] = {}

    def _addresses(self) -> dict[str, str]:
        nodes = self._current()
        if nodes is None:
            return {}
        return {name: addr for node in nodes.nodes for name, addr in node.partition.addresses}

    def __getitem__(self, name: str) -> str:
        address = self._addresses()[name]
        if address not in self._resolved:
            try:
                self._resolved[address] = str(ipaddress.ip_address(address))
            except ValueError:
                try:
                    self._resolved[address] = socket.gethostbyname(address)
                except OSError:
                    log.warning("Slurm node %s: cannot resolve its address %s", name, address)
                    self._resolved[address] = None
            found = self._resolved[address]
            if found and self._host_address and ipaddress.ip_address(found).is_loopback:
                self._resolved[address] = self._host_address
        resolved = self._resolved[address]
        if resolved is None:
            raise KeyError(name)
        return resolved

    def __iter__(self) -> Iterator[str]:
        return iter(self._addresses())

    def __len__(self) -> int:
        return len(self._addresses())


# ---------------------------------------------------------------------------------------------
# Names


def dns_label(name: str, *, max_length: int = _DNS_LABEL_MAX) -> str:
    """`name` made a DNS label: lower case, runs of other characters as one `-`, no `-` at
    either end, at most `max_length` characters; "x" if nothing is left."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return label[:max_length].rstrip("-") or "x"


def is_label_value(value: str) -> bool:
    """Kubernetes accepts `value` as a label value."""
    return len(value) <= _DNS_LABEL_MAX and bool(_LABEL_VALUE.match(value))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


# ---------------------------------------------------------------------------------------------
# Settings and host facts


@dataclass(frozen=True)
class NodeSettings:
    """Which nodes the kubelet registers and how it keeps them alive."""

    prefix: str = "hpk"
    """Node names are `<prefix>-<partition>` (the partition made a DNS label)."""

    partitions: tuple[str, ...] | None = None
    """Slurm partitions to register, by name; None: every partition sinfo shows."""

    default_partition: str | None = None
    """Partition of pods that ask for none; None: Slurm's default (or the only partition)."""

    kubelet_port: int = 10250
    """HTTPS port of the kubelet API, advertised in `status.daemonEndpoints`."""

    max_pods: int = 10000
    """The `pods` capacity: Slurm queues, so this is only a guard against runaway clients."""

    status_interval_s: float = 60.0
    """How often capacity is read from Slurm again and the node status written."""

    lease_interval_s: float = 10.0
    """How often each node's Lease is renewed."""

    lease_duration_s: int = 40
    """The Lease's `leaseDurationSeconds`: how long it counts as held without renewal."""

    retry_interval_s: float = 5.0
    """Wait before trying again after Slurm or the API server failed."""

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.prefix) or len(self.prefix) > 40:
            raise ValueError(f"node name prefix {self.prefix!r} is not a short DNS label")
        if not 0 < self.kubelet_port < 65536:
            raise ValueError(f"kubelet_port {self.kubelet_port} is not a TCP port")
        for name in ("status_interval_s", "lease_interval_s", "retry_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lease_duration_s <= self.lease_interval_s:
            raise ValueError("lease_duration_s must be longer than lease_interval_s")
        if self.max_pods <= 0:
            raise ValueError("max_pods must be positive")


@dataclass(frozen=True)
class HostInfo:
    """What the nodes say about the machine the kubelet runs on."""

    address: str
    """InternalIP: where the API server reaches the kubelet API."""

    hostname: str
    """The machine's host name (the Hostname address)."""

    kubelet_version: str
    """Reported as nodeInfo.kubeletVersion, e.g. v1.33.13-hpk."""

    kernel_version: str = field(default_factory=platform.release)
    """nodeInfo.kernelVersion."""

    os_image: str = "Linux"
    """nodeInfo.osImage: the distribution's pretty name."""

    architecture: str = "amd64"
    """nodeInfo.architecture and the kubernetes.io/arch label, in Go's spelling."""

    container_runtime: str = "apptainer"
    """nodeInfo.containerRuntimeVersion."""

    @classmethod
    def detect(cls, *, address: str, hostname: str, kubelet_version: str) -> HostInfo:
        machine = platform.machine()
        return cls(
            address=address,
            hostname=hostname,
            kubelet_version=kubelet_version,
            os_image=_os_image(Path("/etc/os-release")),
            architecture=_ARCHITECTURES.get(machine, machine or "unknown"),
        )


def _os_image(os_release: Path) -> str:
    try:
        text = os_release.read_text()
    except OSError:
        return "Linux"
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?$', text, re.MULTILINE)
    return match.group(1) if match else "Linux"


# ---------------------------------------------------------------------------------------------
# Which nodes


def node_labels(*, name: str, partition_label: str, host: HostInfo) -> dict[str, str]:
    """The labels the kubelet puts on a partition node."""
    return {
        HOSTNAME_LABEL: name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": host.architecture,
        "kubernetes.io/role": "agent",
        "type": "virtual-kubelet",
        PARTITION_LABEL: partition_label,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


@dataclass(frozen=True)
class PartitionNode:
    """The node that stands for one partition."""

    partition: Partition
    """The partition behind it."""

    name: str
    """The Node's name (and its kubernetes.io/hostname label)."""

    label: str
    """The value of its hpk.io/partition label: the partition's name when that is a valid
    label value, else its DNS-label form."""

    labels: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Every label of the Node: the kubelet's own before registration, afterwards the
    Node's as the API server returned them (with any a user added)."""


@dataclass(frozen=True)
class NodeSet:
    """The nodes the kubelet registers now, and where pods that ask for nothing go."""

    nodes: tuple[PartitionNode, ...]
    """One per partition, in partition-name order."""

    default: str | None
    """Name of the default partition; None when there is none."""

    @property
    def partition_names(self) -> list[str]:
        return [node.partition.name for node in self.nodes]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def by_partition(self, name: str) -> PartitionNode | None:
        return next((node for node in self.nodes if node.partition.name == name), None)

    def by_label(self, value: str) -> PartitionNode | None:
        """The node whose hpk.io/partition label is `value` (or whose partition is named so)."""
        found = next((node for node in self.nodes if node.label == value), None)
        return found or self.by_partition(value)

    def by_node_name(self, name: str) -> PartitionNode | None:
        return next((node for node in self.nodes if node.name == name), None)

    @property
    def default_node(self) -> PartitionNode | None:
        return self.by_partition(self.default) if self.default is not None else None


def plan_nodes(
    partitions: Sequence[Partition], settings: NodeSettings, *, host: HostInfo
) -> NodeSet:
    """The nodes for `partitions`, filtered by the settings, with unique DNS-label names.

    Two partitions whose DNS-label forms collide (e.g. `gpu_a` and `gpu.a`) each get a short
    hash of their real name appended, so every partition keeps a node of its own.
    """
    by_name = {p.name: p for p in partitions}
    if settings.partitions is None:
        chosen = sorted(by_name.values(), key=lambda p: p.name)
    else:
        missing = [name for name in settings.partitions if name not in by_name]
        if missing:
            log.warning(
                "Slurm has no partition %s; it has %s",
                ", ".join(missing),
                ", ".join(sorted(by_name)) or "none",
            )
        chosen = sorted(
            (by_name[n] for n in dict.fromkeys(settings.partitions) if n in by_name),
            key=lambda p: p.name,
        )
    room = _DNS_LABEL_MAX - len(settings.prefix) - 1
    labels = {p.name: dns_label(p.name, max_length=room) for p in chosen}
    taken = Counter(labels.values())
    nodes = []
    for partition in chosen:
        label = labels[partition.name]
        if taken[label] > 1:
            label = (
                f"{dns_label(partition.name, max_length=room - 7)}-{_short_hash(partition.name)}"
            )
        name = f"{settings.prefix}-{label}"
        value = partition.name if is_label_value(partition.name) else label
        nodes.append(
            PartitionNode(
                partition=partition,
                name=name,
                label=value,
                labels=node_labels(name=name, partition_label=value, host=host),
            )
        )
    return NodeSet(nodes=tuple(nodes), default=_default_partition(chosen, settings))


def _default_partition(chosen: Sequence[Partition], settings: NodeSettings) -> str | None:
    names = [p.name for p in chosen]
    if settings.default_partition is not None:
        if settings.default_partition in names:
            return settings.default_partition
        log.warning(
            "the default partition %s is not registered (registered: %s)",
            settings.default_partition,
            ", ".join(names) or "none",
        )
    slurm_default = next((p.name for p in chosen if p.default), None)
    if slurm_default is not None:
        return slurm_default
    return names[0] if len(names) == 1 else None


# ---------------------------------------------------------------------------------------------
# The objects


def _micro_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def resources(partition: Partition, settings: NodeSettings) -> dict[str, str]:
    """Capacity (and allocatable) of the partition's node, as Kubernetes quantities."""
    amounts = {
        "cpu": str(partition.cpus),
        "memory": f"{partition.memory_mb * 1024}Ki",
        "pods": str(settings.max_pods),
    }
    if partition.gpus:
        amounts[GPU_RESOURCE] = str(partition.gpus)
    return amounts


def node_object(node: PartitionNode) -> JSON:
    """The Node as the kubelet applies it: name, labels and annotations, no spec.

    Taints and other labels belong to others (the controller-manager, the user) and are
    left alone by server-side apply.
    """
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": dict(node.labels),
            "annotations": {PARTITION_ANNOTATION: node.partition.name},
        },
    }


def node_status_object(
    node: PartitionNode,
    *,
    host: HostInfo,
    settings: NodeSettings,
    heartbeat: dt.datetime,
    ready_since: dt.datetime,
    network: JSON | None = None,
    port: int | None = None,
) -> JSON:
    """The Node's status as the kubelet applies it to the status subresource; `network` is
    its PodNetworkReady condition, when the kubelet knows one, and `port` the kubelet API's
    port for this node (None: `settings.kubelet_port`)."""
    partition = node.partition
    amounts = resources(partition, settings)
    state = "up" if partition.up else "not up (Slurm queues its jobs until it is)"
    nodes = f"{partition.nodes} node{'' if partition.nodes == 1 else 's'}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name},
        "status": {
            "capacity": amounts,
            "allocatable": dict(amounts),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": (
                        f"hpk-kubelet is posting ready status; Slurm partition "
                        f"{partition.name} ({nodes}) is {state}"
                    ),
                    "lastHeartbeatTime": api_time(heartbeat),
                    "lastTransitionTime": api_time(ready_since),
                },
                *([{**network, "lastHeartbeatTime": api_time(heartbeat)}] if network else []),
            ],
            "addresses": [
                {"type": "InternalIP", "address": host.address},
                {"type": "Hostname", "address": host.hostname},
            ],
            "daemonEndpoints": {
                "kubeletEndpoint": {"Port": settings.kubelet_port if port is None else port}
            },
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": host.kernel_version,
                "osImage": host.os_image,
                "containerRuntimeVersion": host.container_runtime,
                "kubeletVersion": host.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": host.architecture,
            },
        },
    }


def lease_object(
    node_name: str, *, node_uid: str | None, settings: NodeSettings, now: dt.datetime
) -> JSON:
    """The node's heartbeat Lease; owned by the Node, so it goes when the Node goes."""
    metadata: JSON = {"name": node_name, "namespace": LEASE_NAMESPACE}
    if node_uid:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}
        ]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": node_name,
            "leaseDurationSeconds": settings.lease_duration_s,
            "renewTime": _micro_time(now),
        },
    }


def ready_since(existing: Mapping[str, Any] | None, *, now: dt.datetime) -> dt.datetime:
    """When the node became Ready: kept from an existing Node that is Ready, else now."""
    conditions = ((existing or {}).get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == "Ready" and condition.get("status") == "True":
            try:
                text = str(condition.get("lastTransitionTime", ""))
                return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                break
    return now


# ---------------------------------------------------------------------------------------------
# Keeping them alive


class NodeApi(Protocol):
    """What the node agent needs from the API server (kubelet_py.adapters.apiserver.KubeApi)."""

    def get_node(self, name: str) -> JSON | None:
        """The Node, or None if it does not exist."""

    def apply_node(self, node: Mapping[str, Any]) -> JSON:
        """Server-side apply of the Node (creates it when missing); returns the Node."""

    def apply_node_status(self, node: Mapping[str, Any]) -> JSON:
        """Server-side apply to the Node's status subresource."""

    def apply_lease(self, lease: Mapping[str, Any]) -> JSON:
        """Server-side apply of a Lease (creates it when missing)."""


NETWORK_CONDITION = "PodNetworkReady"
"""The nodes' condition that says whether pods get their own network (docs/networking.md)."""


def advertised_port(node: Mapping[str, Any] | None) -> int | None:
    """The kubelet API port a Node object advertises; None when it has none."""
    endpoints = ((node or {}).get("status") or {}).get("daemonEndpoints") or {}
    port = (endpoints.get("kubeletEndpoint") or {}).get("Port")
    return port if isinstance(port, int) and not isinstance(port, bool) and port > 0 else None


class NodePorts(Protocol):
    """Which port of the kubelet API each node advertises (kubelet_py.loops.logserver's
    LogServer): a request to that port is then known to be about that node."""

    def port_for(self, node: str, *, default: bool, advertised: int | None = None) -> int:
        """The node's port, bound and served from now on; `default` for the node of the
        default partition, `advertised` the port its Node object had."""
        ...


class NodeAgent:
    """Registers the partition nodes, refreshes their status and renews their Leases.

    `run_status` and `run_leases` are loops for two threads of their own; `current` may be
    read from any thread. Failures are logged and retried; they never end a loop.
    """

    def __init__(
        self,
        api: NodeApi,
        *,
        source: PartitionSource,
        settings: NodeSettings,
        host: HostInfo,
        clock: Callable[[], dt.datetime] = utcnow,
        network: Callable[[], tuple[bool, str, str]] | None = None,
        ports: NodePorts | None = None,
    ) -> None:
        self.api = api
        self.source = source
        self.settings = settings
        self.host = host
        self.clock = clock
        self.network = network
        """Whether pods get their own network, why, and what to say (the provider's
        network_condition); None: the nodes show no PodNetworkReady condition."""
        self._network_since: tuple[bool, dt.datetime] | None = None
        self.ports = ports
        """The kubelet API's port of each node; None: every node advertises
        `settings.kubelet_port` (the kubelet serves no API, or one port for all)."""
        self._advertised: dict[str, int | None] = {}
        self.registered = threading.Event()
        """Set once every node has been registered at least once."""
        self._lock = threading.Lock()
        self._current: NodeSet | None = None
        self._uids: dict[str, str] = {}
        self._ready_since: dict[str, dt.datetime] = {}

    def _network_condition(self, now: dt.datetime) -> JSON | None:
        if self.network is None:
            return None
        ready, reason, message = self.network()
        if self._network_since is None or self._network_since[0] != ready:
            self._network_since = (ready, now)
        return {
            "type": NETWORK_CONDITION,
            "status": "True" if ready else "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": api_time(self._network_since[1]),
        }

    def current(self) -> NodeSet | None:
        """The nodes as last registered; None before the first registration."""
        with self._lock:
            return self._current

    def sync(self) -> NodeSet:
        """Read the partitions, then apply each node and its status; returns the node set."""
        planned = plan_nodes(self.source(), self.settings, host=self.host)
        if not planned.nodes:
            raise PartitionsUnavailable("Slurm shows no partition this kubelet may use")
        now = self.clock()
        network = self._network_condition(now)
        registered = []
        for node in planned.nodes:
            if node.name not in self._ready_since:
                existing = self.api.get_node(node.name)
                self._ready_since[node.name] = ready_since(existing, now=now)
                self._advertised[node.name] = advertised_port(existing)
            port = None
            if self.ports is not None:
                port = self.ports.port_for(
                    node.name,
                    default=node.partition.name == planned.default,
                    advertised=self._advertised.get(node.name),
                )
            applied = self.api.apply_node(node_object(node))
            metadata = applied.get("metadata") or {}
            uid = str(metadata.get("uid", ""))
            registered.append(
                replace(node, labels={**node.labels, **(metadata.get("labels") or {})})
            )
            self.api.apply_node_status(
                node_status_object(
                    node,
                    host=self.host,
                    settings=self.settings,
                    heartbeat=now,
                    ready_since=self._ready_since[node.name],
                    network=network,
                    port=port,
                )
            )
            with self._lock:
                self._uids[node.name] = uid
        planned = NodeSet(nodes=tuple(registered), default=planned.default)
        with self._lock:
            previous = self._current
            self._current = planned
        if previous is None or previous.node_names != planned.node_names:
            log.info(
                f"{NODES_MESSAGE} %s (default partition: %s)",
                ", ".join(planned.node_names),
                planned.default or "none",
            )
        gone = set(previous.node_names if previous else ()) - set(planned.node_names)
        for name in sorted(gone):
            log.warning("%s: its partition is gone; the node is left, its Lease not renewed", name)
        self.registered.set()
        return planned

    def renew_leases(self) -> None:
        """Renew the Lease of every registered node."""
        nodes = self.current()
        if nodes is None:
            return
        now = self.clock()
        for name in nodes.node_names:
            with self._lock:
                uid = self._uids.get(name)
            self.api.apply_lease(lease_object(name, node_uid=uid, settings=self.settings, now=now))

    def run_status(self, stop: threading.Event) -> None:
        """Sync now, then every `status_interval_s` (sooner after a failure) until `stop`."""
        self._repeat(stop, self.sync, self.settings.status_interval_s, "node status not written")

    def run_leases(self, stop: threading.Event) -> None:
        """Renew every `lease_interval_s` once the nodes are registered, until `stop`."""
        while not stop.is_set() and not self.registered.wait(0.5):
            pass
        self._repeat(
            stop, self.renew_leases, self.settings.lease_interval_s, "node leases not renewed"
        )

    def _repeat(
        self, stop: threading.Event, action: Callable[[], object], interval_s: float, failed: str
    ) -> None:
        """`action` now, then every `interval_s` until `stop`; a failure is logged and retried
        after `retry_interval_s` at the latest: the loop must outlive any failure."""
        while not stop.is_set():
            wait = interval_s
            try:
                action()
            except Exception as error:
                log.warning("%s: %s", failed, error)
                wait = min(wait, self.settings.retry_interval_s)
            stop.wait(wait)
