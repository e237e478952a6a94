"""Partition nodes and binding, without daemons: what sinfo's answer becomes (node names,
labels, capacity, conditions, the daemon endpoint, the Lease), and which node a pod is bound
to, or why it stays Pending. The API server is replaced by small recording fakes."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import Conflict, WatchEvent
from kubelet_py.adapters.slurm import NodeInfo, PartitionInfo, SlurmUnavailable
from kubelet_py.loops.binder import (
    Binder,
    Unschedulable,
    choose_node,
    requested_partitions,
    wants_binding,
)
from kubelet_py.loops.nodes import (
    HostInfo,
    NodeAgent,
    NodeSet,
    NodeSettings,
    Partition,
    PartitionsUnavailable,
    SlurmNodeAddresses,
    dns_label,
    lease_object,
    node_object,
    node_status_object,
    partitions_from,
    plan_nodes,
    ready_since,
)

pytestmark = pytest.mark.timeout(30)

# The test bed's partitions: batch* (n1-n3) and gpu (n4 with gres gpu:2), 16 CPUs and 32 GiB each.
TESTBED = [
    Partition(name="batch", nodes=3, cpus=48, memory_mb=98304, gpus=0, default=True, up=True),
    Partition(name="gpu", nodes=1, cpus=16, memory_mb=32768, gpus=2, default=False, up=True),
]

HOST = HostInfo(
    address="192.0.2.10",
    hostname="login1",
    kubelet_version="v1.33.13-hpk",
    kernel_version="6.1.0",
    os_image="Debian GNU/Linux 12 (bookworm)",
    architecture="amd64",
)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def bed_nodes(settings: NodeSettings | None = None) -> NodeSet:
    return plan_nodes(TESTBED, settings or NodeSettings(), host=HOST)


def pod(
    name: str = "p",
    *,
    node_selector: Mapping[str, str] | None = None,
    flags: str | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox"}]}
    if node_selector is not None:
        spec["nodeSelector"] = dict(node_selector)
    if scheduler is not None:
        spec["schedulerName"] = scheduler
    metadata: dict[str, Any] = {"name": name, "namespace": "default", "uid": f"uid-{name}"}
    if flags is not None:
        metadata["annotations"] = {"slurm.hpk.io/flags": flags}
    return {"metadata": metadata, "spec": spec, "status": {"phase": "Pending"}}


# ---------------------------------------------------------------------------------------------
# sinfo


def bed_node(name: str, *, state: str = "idle", gpus: int = 0) -> NodeInfo:
    return NodeInfo(
        name=name, address=f"10.0.0.{name[1:]}", cpus=16, memory_mb=32768, gpus=gpus, state=state
    )


class FakeSlurm:
    def __init__(self, answer: list[PartitionInfo] | Exception) -> None:
        self.answer = answer

    def partitions(self) -> list[PartitionInfo]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_partitions_come_from_the_slurm_adapter_counting_usable_nodes() -> None:
    batch = PartitionInfo(
        "batch", True, True, (bed_node("n1"), bed_node("n2"), bed_node("n3", state="drained"))
    )
    gpu = PartitionInfo("gpu", False, True, (bed_node("n4", gpus=2),))
    maint = PartitionInfo("maint", False, False, (bed_node("n9"),))
    read = partitions_from(FakeSlurm([batch, gpu, maint]))  # type: ignore[arg-type]
    found = read()
    assert [replace(partition, addresses=()) for partition in found] == [
        Partition(name="batch", nodes=3, cpus=32, memory_mb=65536, gpus=0, default=True, up=True),
        Partition(name="gpu", nodes=1, cpus=16, memory_mb=32768, gpus=2, default=False, up=True),
        Partition(name="maint", nodes=1, cpus=16, memory_mb=32768, gpus=0, default=False, up=False),
    ]
    assert [dict(partition.addresses) for partition in found] == [
        {"n1": "10.0.0.1", "n2": "10.0.0.2", "n3": "10.0.0.3"},
        {"n4": "10.0.0.4"},
        {"n9": "10.0.0.9"},
    ]


def test_slurm_node_addresses_are_ip_addresses_from_the_current_partitions() -> None:
    batch = Partition(
        name="batch",
        nodes=3,
        cpus=3,
        memory_mb=3,
        default=True,
        addresses=(("n1", "10.0.0.1"), ("n2", "localhost"), ("n3", "no-such-host.invalid")),
    )
    current: list[NodeSet | None] = [None]
    addresses = SlurmNodeAddresses(lambda: current[0])
    assert dict(addresses) == {}
    current[0] = plan_nodes([batch], NodeSettings(), host=HOST)
    assert addresses["n1"] == "10.0.0.1"
    assert addresses["n2"] == "127.0.0.1"
    assert addresses.get("n3") is None
    assert addresses.get("n7") is None
    assert set(addresses) == {"n1", "n2", "n3"}
    # A loopback NodeAddr is this host, at the address others reach it at.
    on_host = SlurmNodeAddresses(lambda: current[0], host_address="192.0.2.2")
    assert on_host["n2"] == "192.0.2.2"
    assert on_host["n1"] == "10.0.0.1"


def test_slurm_failure_is_partitions_unavailable() -> None:
    read = partitions_from(FakeSlurm(SlurmUnavailable("controller down")))  # type: ignore[arg-type]
    with pytest.raises(PartitionsUnavailable, match="controller down"):
        read()


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("partition", "label"),
    [
        ("batch", "batch"),
        ("GPU_A100", "gpu-a100"),
        ("long.queue", "long-queue"),
        ("--odd--", "odd"),
        ("___", "x"),
        ("a" * 80, "a" * 63),
    ],
)
def test_partition_names_become_dns_labels(partition: str, label: str) -> None:
    assert dns_label(partition) == label


def test_nodes_are_named_after_partitions_with_the_prefix() -> None:
    nodes = bed_nodes(NodeSettings(prefix="hpk"))
    assert nodes.node_names == ["hpk-batch", "hpk-gpu"]
    assert bed_nodes(NodeSettings(prefix="site")).node_names == ["site-batch", "site-gpu"]


def test_colliding_partition_names_get_distinct_valid_node_names() -> None:
    partitions = [
        Partition(name="gpu_a", nodes=1, cpus=1, memory_mb=1),
        Partition(name="gpu.a", nodes=1, cpus=1, memory_mb=1),
        Partition(name="X" * 90, nodes=1, cpus=1, memory_mb=1),
    ]
    nodes = plan_nodes(partitions, NodeSettings(), host=HOST)
    names = nodes.node_names
    assert len(set(names)) == 3
    assert all(len(name) <= 63 and dns_label(name) == name for name in names)
    by_partition = {node.partition.name: node for node in nodes.nodes}
    assert by_partition["gpu_a"].name.startswith("hpk-gpu-a-")
    assert by_partition["gpu.a"].name.startswith("hpk-gpu-a-")
    assert by_partition["gpu_a"].label == "gpu_a"  # a valid label value is kept as it is
    assert by_partition["X" * 90].label == dns_label("X" * 90, max_length=59)


def test_only_the_allowed_partitions_become_nodes() -> None:
    nodes = bed_nodes(NodeSettings(partitions=("gpu", "missing")))
    assert nodes.node_names == ["hpk-gpu"]
    assert nodes.default == "gpu"  # Slurm's default is not registered; gpu is the only one


def test_the_default_partition_is_slurms_unless_set() -> None:
    assert bed_nodes().default == "batch"
    assert bed_nodes(NodeSettings(default_partition="gpu")).default == "gpu"
    assert bed_nodes(NodeSettings(default_partition="nope")).default == "batch"
    no_default = [Partition(name=n, nodes=1, cpus=1, memory_mb=1) for n in ("a", "b")]
    assert plan_nodes(no_default, NodeSettings(), host=HOST).default is None


def test_settings_refuse_a_prefix_that_cannot_start_a_node_name() -> None:
    with pytest.raises(ValueError, match="prefix"):
        NodeSettings(prefix="HPK_")
    with pytest.raises(ValueError, match="lease_duration_s"):
        NodeSettings(lease_interval_s=40, lease_duration_s=40)


# ---------------------------------------------------------------------------------------------
# The objects


def test_node_labels_identify_the_partition_and_the_virtual_kubelet() -> None:
    gpu = bed_nodes().by_partition("gpu")
    assert gpu is not None
    node = node_object(gpu)
    assert node["metadata"]["name"] == "hpk-gpu"
    labels = node["metadata"]["labels"]
    assert labels == {
        "kubernetes.io/hostname": "hpk-gpu",
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/role": "agent",
        "type": "virtual-kubelet",
        "hpk.io/partition": "gpu",
        "app.kubernetes.io/managed-by": "hpk-kubelet",
    }
    assert node["metadata"]["annotations"] == {"hpk.io/partition-name": "gpu"}
    assert "spec" not in node  # no taints: pods need no toleration


def test_node_status_carries_the_partitions_capacity() -> None:
    nodes = bed_nodes()
    settings = NodeSettings(max_pods=10000)
    batch, gpu = (
        node_status_object(n, host=HOST, settings=settings, heartbeat=NOW, ready_since=NOW)
        for n in nodes.nodes
    )
    assert batch["status"]["capacity"] == {"cpu": "48", "memory": "100663296Ki", "pods": "10000"}
    assert batch["status"]["allocatable"] == batch["status"]["capacity"]
    assert gpu["status"]["capacity"] == {
        "cpu": "16",
        "memory": "33554432Ki",
        "pods": "10000",
        "nvidia.com/gpu": "2",
    }


def test_node_status_is_ready_with_a_heartbeat_addresses_and_the_kubelet_port() -> None:
    batch = bed_nodes().nodes[0]
    became_ready = NOW - dt.timedelta(hours=2)
    status = node_status_object(
        batch,
        host=HOST,
        settings=NodeSettings(kubelet_port=10355),
        heartbeat=NOW,
        ready_since=became_ready,
    )["status"]
    (ready,) = status["conditions"]
    assert ready["type"] == "Ready"
    assert ready["status"] == "True"
    assert ready["reason"] == "KubeletReady"
    assert ready["lastHeartbeatTime"] == "2026-01-02T03:04:05Z"
    assert ready["lastTransitionTime"] == "2026-01-02T01:04:05Z"
    assert "batch (3 nodes) is up" in ready["message"]
    assert status["addresses"] == [
        {"type": "InternalIP", "address": "192.0.2.10"},
        {"type": "Hostname", "address": "login1"},
    ]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10355}}
    info = status["nodeInfo"]
    assert info["kubeletVersion"] == "v1.33.13-hpk"
    assert info["operatingSystem"] == "linux"
    assert info["architecture"] == "amd64"
    assert info["osImage"] == "Debian GNU/Linux 12 (bookworm)"


def test_lease_is_held_by_the_node_and_owned_by_it() -> None:
    lease = lease_object("hpk-gpu", node_uid="u-1", settings=NodeSettings(), now=NOW)
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "hpk-gpu", "uid": "u-1"}
    ]
    assert lease["spec"] == {
        "holderIdentity": "hpk-gpu",
        "leaseDurationSeconds": 40,
        "renewTime": "2026-01-02T03:04:05.678901Z",
    }


def test_a_node_that_was_ready_keeps_its_transition_time() -> None:
    existing = {
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2025-12-31T23:00:00Z"}
            ]
        }
    }
    assert ready_since(existing, now=NOW) == dt.datetime(2025, 12, 31, 23, tzinfo=dt.UTC)
    existing["status"]["conditions"][0]["status"] = "Unknown"
    assert ready_since(existing, now=NOW) == NOW
    assert ready_since(None, now=NOW) == NOW


class FakeNodeApi:
    """Records what the agent applies; the API server's answer adds a uid and a user label."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}
        self.leases: list[dict[str, Any]] = []

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self.nodes.get(name)

    def apply_node(self, node: Mapping[str, Any]) -> dict[str, Any]:
        name = node["metadata"]["name"]
        labels = {**node["metadata"]["labels"], "site.example/rack": "r1"}
        self.nodes[name] = {
            "metadata": {**node["metadata"], "uid": f"uid-{name}", "labels": labels}
        }
        return self.nodes[name]

    def apply_node_status(self, node: Mapping[str, Any]) -> dict[str, Any]:
        self.statuses[node["metadata"]["name"]] = dict(node["status"])
        return dict(node)

    def apply_lease(self, lease: Mapping[str, Any]) -> dict[str, Any]:
        self.leases.append(dict(lease))
        return dict(lease)


def test_the_agent_registers_every_partition_then_renews_leases_with_owner_uids() -> None:
    api = FakeNodeApi()
    sources: list[Sequence[Partition]] = [TESTBED]
    agent = NodeAgent(
        api, source=lambda: sources[-1], settings=NodeSettings(), host=HOST, clock=lambda: NOW
    )
    assert agent.current() is None
    agent.sync()
    assert sorted(api.nodes) == ["hpk-batch", "hpk-gpu"]
    assert api.statuses["hpk-gpu"]["capacity"]["nvidia.com/gpu"] == "2"
    current = agent.current()
    assert current is not None
    assert current.nodes[0].labels["site.example/rack"] == "r1"  # the Node's real labels
    agent.renew_leases()
    owners = {
        lease["metadata"]["name"]: lease["metadata"]["ownerReferences"][0]["uid"]
        for lease in api.leases
    }
    assert owners == {"hpk-batch": "uid-hpk-batch", "hpk-gpu": "uid-hpk-gpu"}

    sources.append([TESTBED[0], replace(TESTBED[1], gpus=4)])
    agent.sync()  # the periodic refresh picks up new capacity
    assert api.statuses["hpk-gpu"]["capacity"]["nvidia.com/gpu"] == "4"


# ---------------------------------------------------------------------------------------------
# Partition choice


@pytest.mark.parametrize(
    ("flags", "partitions"),
    [
        ("-p gpu", ["gpu"]),
        ("-pgpu", ["gpu"]),
        ("--partition gpu", ["gpu"]),
        ("--partition=gpu", ["gpu"]),
        ("--nodes=2 --ntasks=8 -p gpu", ["gpu"]),
        ("-p batch --time=5 -p gpu", ["gpu"]),  # the last one wins, as with sbatch
        ("--partition=gpu,batch", ["gpu", "batch"]),
        ("--parsable --time=5", []),
        ("-p", []),
        ("-p 'unterminated", []),
        ("", []),
    ],
)
def test_partition_options_are_read_from_the_flags_annotation(
    flags: str, partitions: list[str]
) -> None:
    assert requested_partitions(flags) == partitions


def test_a_pod_asking_for_nothing_goes_to_the_default_partition() -> None:
    assert choose_node(pod(), bed_nodes()).name == "hpk-batch"


@pytest.mark.parametrize(
    "selector",
    [{"hpk.io/partition": "gpu"}, {"kubernetes.io/hostname": "hpk-gpu"}],
)
def test_the_node_selector_chooses_the_partition(selector: dict[str, str]) -> None:
    assert choose_node(pod(node_selector=selector), bed_nodes()).name == "hpk-gpu"


def test_the_flags_annotation_chooses_the_partition_when_the_selector_does_not() -> None:
    nodes = bed_nodes()
    assert choose_node(pod(flags="--ntasks=2 -p gpu"), nodes).name == "hpk-gpu"
    assert choose_node(pod(flags="--partition=gpu,batch"), nodes).name == "hpk-gpu"
    agreeing = pod(node_selector={"hpk.io/partition": "batch"}, flags="-p gpu,batch")
    assert choose_node(agreeing, nodes).name == "hpk-batch"


def test_other_selector_labels_must_match_the_node() -> None:
    nodes = bed_nodes()
    fine = pod(node_selector={"kubernetes.io/os": "linux", "type": "virtual-kubelet"})
    assert choose_node(fine, nodes).name == "hpk-batch"
    with pytest.raises(Unschedulable, match=r"does not match .*kubernetes.io/os=windows"):
        choose_node(pod(node_selector={"kubernetes.io/os": "windows"}), nodes)


@pytest.mark.parametrize(
    ("asking", "named"),
    [
        (pod(flags="-p nope"), 'no hpk node for partition "nope" (-p in slurm.hpk.io/flags)'),
        (
            pod(node_selector={"hpk.io/partition": "nope"}),
            'no hpk node for partition "nope" (nodeSelector hpk.io/partition)',
        ),
    ],
)
def test_an_unknown_partition_is_unschedulable_and_the_valid_ones_are_named(
    asking: dict[str, Any], named: str
) -> None:
    with pytest.raises(Unschedulable) as refused:
        choose_node(asking, bed_nodes())
    assert refused.value.message == f"{named}; valid partitions: batch, gpu"


def test_an_unknown_hostname_names_the_valid_nodes() -> None:
    with pytest.raises(Unschedulable, match="valid nodes: hpk-batch, hpk-gpu"):
        choose_node(pod(node_selector={"kubernetes.io/hostname": "n1"}), bed_nodes())


def test_a_selector_and_flags_that_disagree_are_unschedulable() -> None:
    disagreeing = pod(node_selector={"hpk.io/partition": "gpu"}, flags="-p batch")
    with pytest.raises(Unschedulable, match=r"asks for partition gpu but .* asks for batch"):
        choose_node(disagreeing, bed_nodes())


def test_without_a_default_a_pod_must_name_its_partition() -> None:
    nodes = plan_nodes(
        [Partition(name=n, nodes=1, cpus=1, memory_mb=1) for n in ("a", "b")],
        NodeSettings(),
        host=HOST,
    )
    with pytest.raises(Unschedulable, match=r"no default one.*one of: a, b"):
        choose_node(pod(), nodes)


def test_only_unbound_live_pods_for_our_schedulers_are_taken() -> None:
    names = ("default-scheduler", "hpk")
    assert wants_binding(pod(), scheduler_names=names)
    assert wants_binding(pod(scheduler="hpk"), scheduler_names=names)
    assert not wants_binding(pod(scheduler="volcano"), scheduler_names=names)
    bound = pod()
    bound["spec"]["nodeName"] = "hpk-batch"
    assert not wants_binding(bound, scheduler_names=names)
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not wants_binding(deleting, scheduler_names=names)


# ---------------------------------------------------------------------------------------------
# The binder with a recording API


class FakeBinderApi:
    def __init__(self) -> None:
        self.bindings: list[tuple[str, str]] = []
        self.status_patches: list[tuple[str, Mapping[str, Any]]] = []
        self.events: list[Mapping[str, Any]] = []
        self.already_bound: set[str] = set()
        self.annotations: dict[str, Mapping[str, str]] = {}

    def bind_pod(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        if name in self.already_bound:
            raise Conflict(409, f"pod {name} is already assigned to node x")
        self.bindings.append((f"{namespace}/{name}", node))
        self.annotations[f"{namespace}/{name}"] = dict(annotations or {})

    def patch_pod_status(
        self, *, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.status_patches.append((f"{namespace}/{name}", patch))
        return {}

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> dict[str, Any]:
        self.events.append(event)
        return {}


def run_binder(binder: Binder, events: Sequence[WatchEvent]) -> None:
    binder.follow(events)
    stop = threading.Event()
    while len(binder._queue):  # drain what is due, then stop
        key = binder._queue.take(stop, poll_s=0.01)
        assert key is not None
        pod = binder._pods.get(key)
        if pod is not None:
            binder.handle(key, pod)
        binder._queue.done(key)


def test_the_binder_binds_and_reports_unschedulable_pods_once() -> None:
    api = FakeBinderApi()
    binder = Binder(api, nodes=bed_nodes, clock=lambda: NOW)
    nope = pod("nope", flags="-p nope")
    run_binder(
        binder,
        [
            WatchEvent("LISTED", pod("a")),
            WatchEvent("ADDED", pod("b", node_selector={"hpk.io/partition": "gpu"})),
            WatchEvent("ADDED", nope),
            WatchEvent("ADDED", pod("other", scheduler="volcano")),
        ],
    )
    assert api.bindings == [("default/a", "hpk-batch"), ("default/b", "hpk-gpu")]
    ((key, patch),) = api.status_patches
    assert key == "default/nope"
    (condition,) = patch["status"]["conditions"]
    assert condition["type"] == "PodScheduled"
    assert condition["status"] == "False"
    assert condition["reason"] == "Unschedulable"
    assert "valid partitions: batch, gpu" in condition["message"]
    reasons = [(e["involvedObject"]["name"], e["reason"]) for e in api.events]
    assert reasons == [("a", "Scheduled"), ("b", "Scheduled"), ("nope", "FailedScheduling")]

    # Its own status patch comes back as a MODIFIED event: nothing is written twice.
    nope["status"]["conditions"] = [condition]
    run_binder(binder, [WatchEvent("MODIFIED", nope)])
    assert len(api.status_patches) == 1
    assert len(api.events) == 3

    # The user fixes the annotation: the pod is bound.
    nope["metadata"]["annotations"] = {"slurm.hpk.io/flags": "-p gpu"}
    run_binder(binder, [WatchEvent("MODIFIED", nope)])
    assert api.bindings[-1] == ("default/nope", "hpk-gpu")


def test_a_pod_bound_by_someone_else_is_left_alone() -> None:
    api = FakeBinderApi()
    api.already_bound.add("raced")
    binder = Binder(api, nodes=bed_nodes, clock=lambda: NOW)
    run_binder(binder, [WatchEvent("ADDED", pod("raced"))])
    assert api.bindings == []
    assert api.events == []
    assert binder.bound == 0


class FakeStarter:
    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.abandoned: list[str] = []

    def start_before_binding(self, pod: dict[str, Any], *, partition: str) -> dict[str, str]:
        name = pod["metadata"]["name"]
        self.started.append((name, partition))
        return {} if name.startswith("refused") else {"slurm.hpk.io/job-id": "41"}

    def abandon(self, pod: dict[str, Any]) -> None:
        self.abandoned.append(pod["metadata"]["name"])


def test_a_starter_submits_before_the_binding_which_carries_the_job_id() -> None:
    api = FakeBinderApi()
    starter = FakeStarter()
    binder = Binder(api, nodes=bed_nodes, clock=lambda: NOW, starter=starter)
    run_binder(
        binder,
        [
            WatchEvent("ADDED", pod("a", flags="-p gpu")),
            WatchEvent("ADDED", pod("refused")),
        ],
    )
    assert starter.started == [("a", "gpu"), ("refused", "batch")]
    assert api.annotations == {"default/a": {"slurm.hpk.io/job-id": "41"}, "default/refused": {}}
    reasons = [(e["involvedObject"]["name"], e["reason"], e["message"]) for e in api.events]
    assert reasons == [
        ("a", "Scheduled", "Successfully assigned default/a to hpk-gpu"),
        ("a", "Submitted", "Slurm job 41 submitted"),
        ("refused", "Scheduled", "Successfully assigned default/refused to hpk-batch"),
    ]
    assert starter.abandoned == []


def test_a_started_pod_that_cannot_be_bound_is_abandoned() -> None:
    api = FakeBinderApi()
    api.already_bound.add("raced")
    starter = FakeStarter()
    binder = Binder(api, nodes=bed_nodes, clock=lambda: NOW, starter=starter)
    run_binder(binder, [WatchEvent("ADDED", pod("raced"))])
    assert starter.abandoned == ["raced"]
    assert api.events == []


class FakePorts:
    """The NodePorts seam: one port per node, and what each node asked with."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, bool, int | None]] = []

    def port_for(self, node: str, *, default: bool, advertised: int | None = None) -> int:
        self.asked.append((node, default, advertised))
        return {"hpk-batch": 40001, "hpk-gpu": 40002}[node]


def test_each_node_advertises_its_own_port_of_the_kubelet_api() -> None:
    api = FakeNodeApi()
    api.nodes["hpk-gpu"] = {
        "metadata": {"name": "hpk-gpu"},
        "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 41234}}},
    }
    ports = FakePorts()
    agent = NodeAgent(
        api,
        source=lambda: TESTBED,
        settings=NodeSettings(kubelet_port=40001),
        host=HOST,
        clock=lambda: NOW,
        ports=ports,
    )
    agent.sync()
    agent.sync()
    advertised = {
        name: status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        for name, status in api.statuses.items()
    }
    assert advertised == {"hpk-batch": 40001, "hpk-gpu": 40002}
    assert ports.asked[:2] == [
        ("hpk-batch", True, None),
        ("hpk-gpu", False, 41234),
    ], "the default partition's node first asks for the main port; the other for its old one"
    without = NodeAgent(
        FakeNodeApi(), source=lambda: TESTBED, settings=NodeSettings(), host=HOST, clock=lambda: NOW
    )
    statuses = without.api.statuses  # type: ignore[attr-defined]
    without.sync()
    assert {s["daemonEndpoints"]["kubeletEndpoint"]["Port"] for s in statuses.values()} == {10250}
