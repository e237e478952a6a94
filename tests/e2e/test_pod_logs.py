"""`kubectl logs` end to end: kubectl asks the API server, which asks hpk-kubelet's HTTPS API
(its serving certificate from the cluster CA, the API server's kubelet-client certificate),
which reads the log the pod's Slurm job wrote. A control plane from the pinned toolchain in a
folder under /var/tmp, the kubelet serving its API on the plane's kubelet port, the local
Slurm test bed, and kubectl as the cluster's admin.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from hpk.toolchain import Toolchain
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-logs"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"


def kubectl_argv(cluster: PodCluster, *args: str) -> list[str]:
    return [
        str(Toolchain.load().binary("kubectl")),
        f"--kubeconfig={cluster.plane.layout.admin_kubeconfig}",
        *args,
    ]


def logs(cluster: PodCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl logs -n NAMESPACE ARGS`, whatever its exit status."""
    return subprocess.run(
        kubectl_argv(cluster, "logs", "-n", NAMESPACE, "--request-timeout=30s", *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create(cluster: PodCluster, name: str, command: list[str], **spec: Any) -> None:
    """A busybox pod running `command`; `spec` adds to its spec (init containers)."""
    manifest = cluster.manifest(name, command)
    manifest["spec"].update(spec)
    cluster.apply(manifest)


def delete(cluster: PodCluster, name: str) -> None:
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE, serve_api=True) as running:
        yield running


@pytest.fixture(scope="module")
def finished(cluster: PodCluster) -> str:
    """A pod that printed three lines a second apart and has ended."""
    create(cluster, "three", ["sh", "-c", "echo first; sleep 1; echo second; sleep 1; echo third"])
    cluster.phase("three", "Succeeded")
    return "three"


def test_node_advertises_the_planes_kubelet_port(cluster: PodCluster) -> None:
    node = json.loads(cluster.kubectl("get", "node", "hpk-batch", "-o", "json"))
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port == cluster.plane.ports.kubelet != 10250


def test_logs_of_a_finished_pod(cluster: PodCluster, finished: str) -> None:
    result = logs(cluster, finished)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "first\nsecond\nthird\n"


def test_tail_timestamps_and_limit_bytes(cluster: PodCluster, finished: str) -> None:
    tail = logs(cluster, finished, "--tail=1")
    assert (tail.returncode, tail.stdout) == (0, "third\n"), tail.stderr
    stamped = logs(cluster, finished, "--timestamps")
    assert stamped.returncode == 0, stamped.stderr
    lines = stamped.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second", "third"]
    assert all(re.fullmatch(rf"{STAMP} \w+", line) for line in lines), lines
    stamps = [line.split(" ", 1)[0] for line in lines]
    assert stamps == sorted(stamps) and stamps[0] < stamps[2]
    limited = logs(cluster, finished, "--limit-bytes=8")
    assert (limited.returncode, limited.stdout) == (0, "first\nse"), limited.stderr


def test_since(cluster: PodCluster, finished: str) -> None:
    pod = cluster.pod(finished)
    assert pod is not None
    ended = pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert ended, pod["status"]
    time.sleep(2.5)  # the last line is now more than 2 s old
    recent = logs(cluster, finished, "--since=2s")
    assert (recent.returncode, recent.stdout) == (0, ""), recent.stderr
    hour = logs(cluster, finished, "--since=1h")
    assert (hour.returncode, hour.stdout) == (0, "first\nsecond\nthird\n"), hour.stderr


def test_previous_is_a_clear_error(cluster: PodCluster, finished: str) -> None:
    result = logs(cluster, finished, "--previous")
    assert result.returncode != 0
    assert f'previous terminated container "main" in pod "{finished}" not found' in (result.stderr)


def test_init_container_logs(cluster: PodCluster) -> None:
    create(
        cluster,
        "with-init",
        ["echo", "from-main"],
        initContainers=[{"name": "init", "image": "busybox", "command": ["echo", "from-init"]}],
    )
    cluster.phase("with-init", "Succeeded")
    init = logs(cluster, "with-init", "-c", "init")
    assert (init.returncode, init.stdout) == (0, "from-init\n"), init.stderr
    main = logs(cluster, "with-init", "-c", "main")
    assert (main.returncode, main.stdout) == (0, "from-main\n"), main.stderr
    delete(cluster, "with-init")


def test_follow_streams_while_the_pod_runs_and_ends_with_it(cluster: PodCluster) -> None:
    name = "counter"
    create(cluster, name, ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line-$i; sleep 1; done"])
    cluster.phase(name, "Running")
    # Running is the Slurm job's state; the container starts a moment later.
    eventually(f"{name}'s first line", lambda: "line-1" in logs(cluster, name).stdout, timeout=60)
    with subprocess.Popen(
        kubectl_argv(cluster, "logs", "-n", NAMESPACE, "-f", name),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as follower:
        assert follower.stdout is not None and follower.stderr is not None
        try:
            assert follower.stdout.readline() == "line-1\n"
            pod = cluster.pod(name)
            assert pod is not None and pod["status"]["phase"] == "Running", pod
            assert follower.poll() is None
            rest = follower.stdout.read()
            code = follower.wait(timeout=60)
            errors = follower.stderr.read()
        finally:
            if follower.poll() is None:
                follower.kill()
    assert code == 0, errors
    assert rest == "".join(f"line-{i}\n" for i in range(2, 7))
    exit_marker = cluster.home / "pods" / NAMESPACE / name / "containers" / "main" / "exit"
    assert exit_marker.exists()
    delete(cluster, name)


def test_a_container_that_has_not_started_is_waiting(cluster: PodCluster) -> None:
    create(
        cluster,
        "blocked",
        ["echo", "never"],
        initContainers=[{"name": "init", "image": "busybox", "command": ["sleep", "600"]}],
    )
    eventually(
        "the init container",
        lambda: logs(cluster, "blocked", "-c", "init").returncode == 0,
        timeout=120,
    )
    result = logs(cluster, "blocked", "-c", "main")
    assert result.returncode != 0
    assert 'container "main" in pod "blocked" is waiting to start' in result.stderr
    delete(cluster, "blocked")
