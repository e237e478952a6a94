"""hpk-kubelet's nodes, leases and binding on the real stack: a control plane from the pinned
toolchain in a folder under /var/tmp, the kubelet given its identity exactly as the
control-plane job gives it (`prepare_kubelet`), run as `python -m kubelet_py.main` against the
local Slurm test bed, and checked with kubectl as the cluster's admin.

The tests run in file order against one kubelet; the last one stops it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpk.controlplane import ControlPlane
from hpk.controlplane.job import prepare_kubelet
from hpk.pki import ClusterPKI
from hpk.testbed.bed import Testbed
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS
from hpk.toolchain import Toolchain
from kubelet_py import CONNECTED_MESSAGE
from tests.e2e.kube import admin_kubectl, eventually, start_kubelet, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SETTINGS = TESTBED_PLANE_SETTINGS
NAMESPACE = "e2e-binding"
NODE_MONITOR_GRACE_S = 40.0
"""The controller-manager's default --node-monitor-grace-period."""


@dataclass
class Kubelet:
    """The running kubelet and the cluster it registered with."""

    plane: ControlPlane
    process: subprocess.Popen[bytes]
    log_file: Path
    kubeconfig: Path
    started: float
    registered_after_s: float

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        return admin_kubectl(self.plane, *args, check=check, stdin=stdin)

    def get(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json")))

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def ready(node: dict[str, Any]) -> str:
    conditions = node.get("status", {}).get("conditions", [])
    return next((c["status"] for c in conditions if c["type"] == "Ready"), "")


@pytest.fixture(scope="module")
def kubelet(testbed: Testbed) -> Iterator[Kubelet]:
    root = Path(tempfile.mkdtemp(prefix="hpk-kubelet-e2e-", dir="/var/tmp"))
    plane = ControlPlane(root / "state", pki=ClusterPKI(root / "pki"), settings=SETTINGS)
    plane.start()
    process: subprocess.Popen[bytes] | None = None
    try:
        kubeconfig = prepare_kubelet(plane)
        log_file = root / "kubelet.log"
        started = time.monotonic()
        process = start_kubelet(
            plane,
            kubeconfig,
            log_file=log_file,
            env={"SLURM_CONF": str(testbed.settings.slurm_conf)},
        )
        running = Kubelet(
            plane=plane,
            process=process,
            log_file=log_file,
            kubeconfig=kubeconfig,
            started=started,
            registered_after_s=0.0,
        )

        def both_ready() -> bool:
            nodes = running.get("nodes")["items"]
            names = {n["metadata"]["name"] for n in nodes if ready(n) == "True"}
            return {"hpk-batch", "hpk-gpu"} <= names

        eventually("hpk-batch and hpk-gpu Ready", both_ready, timeout=60)
        running.registered_after_s = time.monotonic() - started
        print(f"nodes Ready {running.registered_after_s:.1f} s after the kubelet started")
        running.kubectl("create", "namespace", NAMESPACE)
        yield running
        running.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    finally:
        stop_process(process)
        plane.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_kubelet_connects_as_its_own_identity(kubelet: Kubelet) -> None:
    assert CONNECTED_MESSAGE in kubelet.log()
    whoami = subprocess.run(
        [
            str(Toolchain.load().binary("kubectl")),
            f"--kubeconfig={kubelet.kubeconfig}",
            "auth",
            "whoami",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    user = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user["username"] == "hpk:kubelet"
    assert "hpk:kubelets" in user["groups"]


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        ("create", "nodes", "", True),
        ("patch", "nodes/status", "", True),
        ("delete", "nodes", "", True),
        ("watch", "pods", "default", True),
        ("create", "pods/binding", "default", True),
        ("patch", "pods/status", "default", True),
        ("create", "events", "default", True),
        ("get", "secrets", "default", True),
        ("create", "serviceaccounts/token", "default", True),
        ("list", "persistentvolumeclaims", "default", True),
        ("update", "leases.coordination.k8s.io", "kube-node-lease", True),
        ("create", "pods", "default", False),
        ("update", "pods", "default", False),
        ("create", "pods/exec", "default", False),
        ("update", "nodes/proxy", "", False),
        ("create", "secrets", "default", False),
        ("delete", "namespaces", "", False),
        ("update", "leases.coordination.k8s.io", "kube-system", False),
        ("create", "clusterrolebindings", "", False),
    ],
)
def test_kubelet_identity_has_exactly_its_rights(
    kubelet: Kubelet, verb: str, resource: str, namespace: str, allowed: bool
) -> None:
    kind, _, subresource = resource.partition("/")
    options = [f"--namespace={namespace}"] if namespace else []
    if subresource:
        options.append(f"--subresource={subresource}")
    answer = kubelet.kubectl(
        "auth", "can-i", verb, kind, "--as=hpk:kubelet", *options, check=False
    ).strip()
    assert answer == ("yes" if allowed else "no")


def test_one_ready_node_per_partition_with_its_capacity_and_labels(kubelet: Kubelet) -> None:
    batch = kubelet.get("node", "hpk-batch")
    gpu = kubelet.get("node", "hpk-gpu")
    assert ready(batch) == ready(gpu) == "True"
    assert batch["status"]["capacity"]["cpu"] == "48"
    assert batch["status"]["capacity"]["memory"] == "96Gi"  # 3 x 32768 MB
    assert "nvidia.com/gpu" not in batch["status"]["capacity"]
    assert gpu["status"]["capacity"]["cpu"] == "16"
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "2"
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    labels = gpu["metadata"]["labels"]
    assert labels["hpk.io/partition"] == "gpu"
    assert labels["kubernetes.io/hostname"] == "hpk-gpu"
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/role"] == "agent"
    assert labels["type"] == "virtual-kubelet"
    assert gpu["status"]["nodeInfo"]["kubeletVersion"] == "v1.33.13-hpk"
    assert gpu["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250
    addresses = {a["type"]: a["address"] for a in gpu["status"]["addresses"]}
    assert addresses["InternalIP"] == kubelet.plane.context.advertise_address
    wide = kubelet.kubectl("get", "nodes", "-o", "wide")
    assert "hpk-batch" in wide
    assert "v1.33.13-hpk" in wide


def test_node_leases_are_renewed(kubelet: Kubelet) -> None:
    def renew_time() -> str:
        lease = kubelet.get("lease", "hpk-batch", "-n", "kube-node-lease")
        assert lease["spec"]["holderIdentity"] == "hpk-batch"
        assert lease["spec"]["leaseDurationSeconds"] == 40
        return str(lease["spec"]["renewTime"])

    first = renew_time()
    later = eventually("a renewal of hpk-batch's Lease", lambda: renew_time() > first, timeout=25)
    assert later


def pod_manifest(name: str, *, annotations: dict[str, str] | None = None, **spec: Any) -> str:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "main", "image": "docker://busybox"}], **spec},
    }
    return json.dumps(manifest)


def bound_node(kubelet: Kubelet, name: str) -> str:
    return kubelet.kubectl(
        "get", "pod", name, "-n", NAMESPACE, "-o", "jsonpath={.spec.nodeName}", check=False
    )


@pytest.mark.parametrize(
    ("name", "manifest", "node"),
    [
        ("plain", pod_manifest("plain"), "hpk-batch"),
        (
            "selects-gpu",
            pod_manifest("selects-gpu", nodeSelector={"hpk.io/partition": "gpu"}),
            "hpk-gpu",
        ),
        (
            "flags-gpu",
            pod_manifest("flags-gpu", annotations={"slurm.hpk.io/flags": "-p gpu"}),
            "hpk-gpu",
        ),
    ],
)
def test_unscheduled_pods_are_bound_to_their_partitions_node(
    kubelet: Kubelet, name: str, manifest: str, node: str
) -> None:
    kubelet.kubectl("apply", "-f", "-", stdin=manifest)
    try:
        created = time.monotonic()
        assert eventually(f"{name} bound", lambda: bound_node(kubelet, name), timeout=30) == node
        print(f"{name} bound to {node} in {time.monotonic() - created:.2f} s")
        pod = kubelet.get("pod", name, "-n", NAMESPACE)
        (scheduled,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        # The binder marks it scheduled; once its job is submitted, the status mirror may
        # already show Slurm's queue instead (SlurmPending), never the binder's Unschedulable.
        assert scheduled["status"] == "True" or scheduled.get("reason") == "SlurmPending", pod
    finally:
        kubelet.kubectl("delete", "pod", name, "-n", NAMESPACE, "--force", "--grace-period=0")


def test_pod_asking_for_an_unknown_partition_stays_pending_and_says_why(
    kubelet: Kubelet,
) -> None:
    manifest = pod_manifest("nowhere", annotations={"slurm.hpk.io/flags": "--partition=nope"})
    kubelet.kubectl("apply", "-f", "-", stdin=manifest)
    try:

        def unschedulable() -> dict[str, Any] | None:
            pod = kubelet.get("pod", "nowhere", "-n", NAMESPACE)
            conditions = pod["status"].get("conditions", [])
            return next((c for c in conditions if c["type"] == "PodScheduled"), None)

        condition = eventually("PodScheduled=False on nowhere", unschedulable, timeout=30)
        assert condition["status"] == "False"
        assert condition["reason"] == "Unschedulable"
        assert '"nope"' in condition["message"]
        assert "valid partitions: batch, gpu" in condition["message"]

        def failed_scheduling() -> list[dict[str, Any]]:
            events = kubelet.get(
                "events",
                "-n",
                NAMESPACE,
                "--field-selector=involvedObject.name=nowhere,reason=FailedScheduling",
            )
            return list(events["items"])

        (event,) = eventually("a FailedScheduling event", failed_scheduling, timeout=30)
        assert event["type"] == "Warning"
        assert '"nope"' in event["message"]
        assert "batch, gpu" in event["message"]
        time.sleep(2)  # it stays unbound, and the reason is not written again and again
        pod = kubelet.get("pod", "nowhere", "-n", NAMESPACE)
        assert pod["status"]["phase"] == "Pending"
        assert not pod["spec"].get("nodeName")
        assert len(failed_scheduling()) == 1
    finally:
        kubelet.kubectl("delete", "pod", "nowhere", "-n", NAMESPACE, "--force", "--grace-period=0")


def test_nodes_stay_ready_past_the_node_monitor_grace_period(kubelet: Kubelet) -> None:
    """Only the Leases keep them Ready: the status itself is written every 60 s."""
    until = kubelet.started + kubelet.registered_after_s + NODE_MONITOR_GRACE_S + 10
    checks = 0
    while True:
        for node in kubelet.get("nodes")["items"]:
            name = node["metadata"]["name"]
            ready_condition = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
            assert ready_condition["status"] == "True", (name, ready_condition)
            assert ready_condition["reason"] == "KubeletReady", (name, ready_condition)
            assert not node["spec"].get("taints"), (name, node["spec"]["taints"])
        checks += 1
        if time.monotonic() >= until:
            break
        time.sleep(5)
    print(f"Ready through {checks} checks, {time.monotonic() - kubelet.started:.0f} s in")
    assert checks >= 2


def test_sigterm_stops_the_kubelet_within_seconds_and_leaves_the_nodes(kubelet: Kubelet) -> None:
    sent = time.monotonic()
    kubelet.process.send_signal(signal.SIGTERM)
    code = kubelet.process.wait(timeout=10)
    took = time.monotonic() - sent
    print(f"kubelet exited {code} {took:.2f} s after SIGTERM")
    assert code == 0
    assert took < 5
    assert "stopped in" in kubelet.log()
    assert "Traceback" not in kubelet.log()
    names = {n["metadata"]["name"] for n in kubelet.get("nodes")["items"]}
    assert {"hpk-batch", "hpk-gpu"} <= names
    assert ready(kubelet.get("node", "hpk-gpu")) == "True"  # not written NotReady on the way out
