"""`kubectl top` on hpk, as an ordinary user gets it: `hpk up` submits the control-plane job,
`hpk addons install metrics-server` runs the pinned metrics-server as a Slurm job on its
node's network, and a pod that spins a CPU shows its usage through `kubectl top pod` and
`kubectl top node`; the kubelet API's `/stats/summary`, `/metrics/resource` and `/metrics`
answer through the API server's node proxy.

The tests run in file order against one cluster; the last one uninstalls metrics-server.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually

pytestmark = pytest.mark.timeout(600)

NAMESPACE = "metrics-e2e"
BUSY = "busy"
IMAGE = "registry.k8s.io/metrics-server/metrics-server:v"


class TopCluster:
    """The user's hpk cluster with metrics-server, driven from the "login node" as the user."""

    def __init__(self, install: UserInstall) -> None:
        self.install = install
        self.home = Path(install.user.pw_dir) / ".hpk-metrics"
        self.kubeconfig = self.home / "kubeconfig"
        self.tools = Toolchain.load()
        self.installed: subprocess.CompletedProcess[str] | None = None
        """What `hpk addons install metrics-server` printed."""

    def env(self) -> dict[str, str]:
        return self.install.env(HPK_HOME=str(self.home), KUBECONFIG=str(self.kubeconfig))

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.install.run(*argv, env=self.env(), timeout=timeout)

    def hpk(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("hpk", *args, timeout=timeout)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self.run(str(self.tools.binary("kubectl")), "--request-timeout=30s", *args)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def raw(self, path: str) -> str:
        return self.kubectl("get", "--raw", path).stdout

    def node_of(self, pod: str) -> str:
        got = self.kubectl("get", "pod", pod, "-n", NAMESPACE, "-o", "json").stdout
        return str(json.loads(got)["spec"]["nodeName"])

    def explain(self) -> str:
        """What to show when a figure did not come."""
        parts = [
            self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout,
            self.kubectl("get", "apiservice", "v1beta1.metrics.k8s.io", check=False).stdout,
            self.kubectl(
                "logs", "-n", "kube-system", "deployment/metrics-server", check=False
            ).stdout[-3000:],
        ]
        log = self.home / "control-plane" / "logs" / "hpk-kubelet.log"
        parts.append(self.run("tail", "-n", "60", str(log)).stdout)
        return "\n".join(parts)


def millicores(text: str) -> int:
    """A CPU figure as `kubectl top` prints it ("250m", "2") in millicores."""
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def top_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def busy_pod() -> dict[str, Any]:
    """A pod whose one container spins a CPU, for a few minutes at most."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": BUSY, "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 900,
            "containers": [
                {
                    "name": BUSY,
                    "image": "docker.io/library/busybox:latest",
                    "command": ["sh", "-c", "while :; do :; done"],
                    "resources": {"requests": {"cpu": "1", "memory": "64Mi"}},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[TopCluster]:
    top = TopCluster(user_install)
    user_install.run("rm", "-rf", str(top.home))
    try:
        up = top.hpk("up", "--timeout=240")
        assert up.returncode == 0, f"hpk up failed:\n{up.stdout}\n{up.stderr}"
        busybox = ensure_test_images()["docker.io/library/busybox:latest"]
        imported = top.hpk("images", "import", "docker.io/library/busybox:latest", str(busybox))
        assert imported.returncode == 0, imported.stderr
        started = time.monotonic()
        top.installed = top.hpk("addons", "install", "metrics-server", timeout=400)
        print(top.installed.stdout, f"install took {time.monotonic() - started:.1f} s")
        assert top.installed.returncode == 0, top.installed.stdout + top.installed.stderr
        top.kubectl("create", "namespace", NAMESPACE)
        created = top.install.run(
            str(top.tools.binary("kubectl")),
            "apply",
            "-f",
            "-",
            env=top.env(),
            stdin=json.dumps(busy_pod()),
        )
        assert created.returncode == 0, created.stderr
        eventually(
            "the busy pod running",
            lambda: (
                top.kubectl(
                    "get", "pod", BUSY, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}"
                ).stdout
                == "Running"
            ),
            timeout=120,
        )
        yield top
    finally:
        top.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        top.hpk("down")
        user = user_install.user.pw_name
        out = subprocess.run(
            ["squeue", "-h", "-u", user, "-o", "%i %j"], capture_output=True, text=True, check=False
        ).stdout
        left = [
            line.split()[0]
            for line in out.splitlines()
            if f"/{NAMESPACE}/" in line or "/kube-system/metrics-server" in line
        ]
        if left:
            subprocess.run(["scancel", *left], check=False)
        user_install.run("rm", "-rf", str(top.home))


def test_install_runs_metrics_server_as_a_slurm_job_on_its_nodes_network(
    cluster: TopCluster,
) -> None:
    installed = cluster.installed
    assert installed is not None
    got = cluster.kubectl(
        "get", "pods", "-n", "kube-system", "-l", "k8s-app=metrics-server", "-o", "json"
    ).stdout
    (pod,) = json.loads(got)["items"]
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["hostNetwork"] is True
    assert pod["status"]["podIP"] == pod["status"]["hostIP"], "on its node's own network"
    job = pod["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    assert f"pod {pod['metadata']['name']}: Slurm job {job}" in installed.stdout
    queue = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T %j"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert queue == ["RUNNING", f"hpk/kube-system/{pod['metadata']['name']}"]
    args = pod["spec"]["containers"][0]["args"]
    assert not any("insecure" in arg for arg in args), args
    version = cluster.tools.pins["METRICS_SERVER_VERSION"]
    assert f"{IMAGE}{version}" in cluster.hpk("images", "list").stdout
    api = json.loads(
        cluster.kubectl("get", "apiservice", "v1beta1.metrics.k8s.io", "-o", "json").stdout
    )
    assert "insecureSkipTLSVerify" not in api["spec"]
    assert any(
        c["type"] == "Available" and c["status"] == "True" for c in api["status"]["conditions"]
    )
    again = cluster.hpk("addons", "install", "metrics-server", timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    got = cluster.kubectl(
        "get", "pods", "-n", "kube-system", "-l", "k8s-app=metrics-server", "-o", "json"
    ).stdout
    (same,) = json.loads(got)["items"]
    assert same["metadata"]["annotations"]["slurm.hpk.io/job-id"] == job, "left running"


def test_top_pod_shows_the_cpu_of_a_busy_container(cluster: TopCluster) -> None:
    def busy() -> list[str] | None:
        result = cluster.kubectl(
            "top", "pod", BUSY, "-n", NAMESPACE, "--containers", "--no-headers", check=False
        )
        rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or not rows:
            return None
        (row,) = rows  # POD NAME CPU MEMORY
        return row if millicores(row[2]) >= 100 else None

    try:
        row = eventually("kubectl top pod to show the busy CPU", busy, timeout=240)
    except pytest.fail.Exception:
        print(cluster.explain())
        raise
    assert row[:2] == [BUSY, BUSY]
    assert re.fullmatch(r"\d+(Ki|Mi|Gi)", row[3]) and not row[3].startswith("0"), row


def test_top_node_shows_the_busy_pod_on_its_partition_alone(cluster: TopCluster) -> None:
    node = cluster.node_of(BUSY)

    def figures() -> dict[str, list[str]] | None:
        result = cluster.kubectl("top", "node", "--no-headers", check=False)
        rows = top_rows(result.stdout)
        if result.returncode != 0 or node not in rows or rows[node][0] == "<unknown>":
            return None
        return rows if millicores(rows[node][0]) >= 100 else None

    try:
        rows = eventually(f"kubectl top node to show {node} busy", figures, timeout=240)
    except pytest.fail.Exception:
        print(cluster.explain())
        raise
    others = {name: row for name, row in rows.items() if name != node}
    for name, row in others.items():
        # Each node has its own port: another partition's node never shows the busy pod.
        assert row[0] == "<unknown>" or millicores(row[0]) < 100, (name, row)


def test_the_summary_api_answers_for_the_node_through_the_api_server(cluster: TopCluster) -> None:
    node = cluster.node_of(BUSY)
    summary = json.loads(cluster.raw(f"/api/v1/nodes/{node}/proxy/stats/summary"))
    assert summary["node"]["nodeName"] == node
    assert summary["node"]["cpu"]["usageCoreNanoSeconds"] > 0
    assert summary["node"]["memory"]["workingSetBytes"] > 0
    (pod,) = [p for p in summary["pods"] if p["podRef"]["name"] == BUSY]
    assert pod["podRef"]["namespace"] == NAMESPACE
    assert pod["startTime"]
    (container,) = pod["containers"]
    assert container["name"] == BUSY
    assert container["cpu"]["usageCoreNanoSeconds"] > 0
    assert container["memory"]["workingSetBytes"] > 0
    assert container["memory"]["time"] and container["startTime"]
    for other in json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]:
        name = other["metadata"]["name"]
        if name != node:
            elsewhere = json.loads(cluster.raw(f"/api/v1/nodes/{name}/proxy/stats/summary"))
            assert elsewhere["node"]["nodeName"] == name
            assert BUSY not in [p["podRef"]["name"] for p in elsewhere["pods"]]


def test_resource_metrics_carry_what_metrics_server_reads(cluster: TopCluster) -> None:
    node = cluster.node_of(BUSY)
    text = cluster.raw(f"/api/v1/nodes/{node}/proxy/metrics/resource")
    found = samples(text)
    labels = {"container": BUSY, "pod": BUSY, "namespace": NAMESPACE}
    cpu = dict((tuple(sorted(k.items())), v) for k, v in found["container_cpu_usage_seconds_total"])
    assert cpu[tuple(sorted(labels.items()))] > 0
    for name in (
        "container_memory_working_set_bytes",
        "container_start_time_seconds",
        "node_cpu_usage_seconds_total",
        "node_memory_working_set_bytes",
        "pod_cpu_usage_seconds_total",
        "pod_memory_working_set_bytes",
        "scrape_error",
    ):
        assert name in found, name
    busy = next(
        line
        for line in text.splitlines()
        if line.startswith("container_cpu_usage_seconds_total{") and f'pod="{BUSY}"' in line
    )
    stamp = int(busy.split()[-1])
    assert abs(stamp / 1000 - time.time()) < 120, "stamped in milliseconds, recently"


def test_the_kubelets_own_metrics_count_its_slurm_calls(cluster: TopCluster) -> None:
    node = cluster.node_of(BUSY)
    found = samples(cluster.raw(f"/api/v1/nodes/{node}/proxy/metrics"))
    calls = {
        (labels["command"], labels["outcome"]): value
        for labels, value in found["hpk_kubelet_slurm_calls_total"]
    }
    assert calls[("sbatch", "ok")] >= 2, "metrics-server's pod and the busy pod"
    assert calls[("squeue", "ok")] >= 1
    assert calls[("sstat", "ok")] >= 1, "the scrapes asked Slurm for usage"
    durations = {
        labels["command"]: value
        for labels, value in found["hpk_kubelet_slurm_call_duration_seconds_count"]
    }
    assert durations["sbatch"] >= 2
    phases = {labels["phase"]: value for labels, value in found["hpk_kubelet_pods"]}
    assert phases["Running"] >= 2
    assert {labels["name"] for labels, _ in found["workqueue_depth"]} == {"pods", "binder"}
    (lags,) = [value for _, value in found["hpk_kubelet_pod_status_lag_seconds_count"]]
    assert lags >= 2, "each pod's Running status was a change the watcher reported"


def test_uninstall_takes_the_metrics_api_away(cluster: TopCluster) -> None:
    removed = cluster.hpk("addons", "uninstall", "metrics-server")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    gone = cluster.kubectl("get", "apiservice", "v1beta1.metrics.k8s.io", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    eventually(
        "metrics-server's pod gone",
        lambda: (
            not json.loads(
                cluster.kubectl(
                    "get", "pods", "-n", "kube-system", "-l", "k8s-app=metrics-server", "-o", "json"
                ).stdout
            )["items"]
        ),
        timeout=120,
    )
    top = cluster.kubectl("top", "pod", "-n", NAMESPACE, check=False)
    assert top.returncode != 0 and "Metrics API not available" in top.stderr
