"""`kubectl logs` end to end: kubectl asks the API server, which asks hpk-kubelet's HTTPS API
(its serving certificate from the cluster CA, the API server's kubelet-client certificate),
which reads the log the pod's Slurm job wrote. A control plane from the pinned toolchain in a
folder under /var/tmp, the kubelet serving its API on the plane's kubelet port, the local
Slurm test bed, and kubectl as the cluster's admin.
"""

from __future__ import annotations

import json
import re
import shutil
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
from hpk.test_images import register_test_images
from hpk.testbed.bed import Testbed
from hpk.toolchain import Toolchain
from tests.e2e.kube import admin_kubectl, eventually, start_kubelet, stop_process
from tests.e2e.planes import TEST_PLANE_SETTINGS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-logs"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"


@dataclass
class Cluster:
    plane: ControlPlane
    home: Path
    log_file: Path

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        return admin_kubectl(self.plane, *args, check=check, stdin=stdin)

    def kubectl_argv(self, *args: str) -> list[str]:
        return [
            str(Toolchain.load().binary("kubectl")),
            f"--kubeconfig={self.plane.layout.admin_kubeconfig}",
            *args,
        ]

    def logs(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`kubectl logs -n NAMESPACE ARGS`, whatever its exit status."""
        return subprocess.run(
            self.kubectl_argv("logs", "-n", NAMESPACE, "--request-timeout=30s", *args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def pod(self, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", "pod", "-n", NAMESPACE, name, "-o", "json", check=False)
        return dict(json.loads(out)) if out.strip() else None

    def create(self, name: str, command: list[str], **spec: Any) -> None:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [{"name": "main", "image": "busybox", "command": command}],
                **spec,
            },
        }
        self.kubectl("create", "-f", "-", stdin=json.dumps(manifest))

    def phase(self, name: str, wanted: str, timeout: float = 180) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            found = self.pod(name)
            phase = (found or {}).get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed") and phase != wanted:
                pytest.fail(f"pod {name} ended {phase}: {found}\n{self.log()[-3000:]}")
            return found if phase == wanted else None

        return dict(eventually(f"pod {name} {wanted}", probe, timeout=timeout))

    def delete(self, name: str) -> None:
        self.kubectl("delete", "pod", "-n", NAMESPACE, name, "--wait=false", check=False)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="hpk-logs-e2e-", dir="/var/tmp"))
    root.chmod(0o755)
    home = root / "home"
    register_test_images(cache_dir=home / "images")
    plane = ControlPlane(root / "state", pki=ClusterPKI(root / "pki"), settings=TEST_PLANE_SETTINGS)
    plane.start()
    process: subprocess.Popen[bytes] | None = None
    try:
        kubeconfig = prepare_kubelet(plane)
        log_file = root / "kubelet.log"
        process = start_kubelet(
            plane,
            kubeconfig,
            log_file=log_file,
            env={"SLURM_CONF": str(testbed.settings.slurm_conf), "HPK_HOME": str(home)},
            serve_api=True,
        )
        running = Cluster(plane=plane, home=home, log_file=log_file)
        eventually(
            "node hpk-batch",
            lambda: "hpk-batch" in running.kubectl("get", "nodes", "-o", "name", check=False),
        )
        running.kubectl("create", "namespace", NAMESPACE)
        eventually(
            "the namespace's default service account",
            lambda: running.kubectl(
                "get", "serviceaccount", "default", "-n", NAMESPACE, "-o", "name", check=False
            ),
        )
        yield running
        running.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--wait=false", check=False)
    finally:
        stop_process(process)
        plane.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def finished(cluster: Cluster) -> str:
    """A pod that printed three lines a second apart and has ended."""
    cluster.create("three", ["sh", "-c", "echo first; sleep 1; echo second; sleep 1; echo third"])
    cluster.phase("three", "Succeeded")
    return "three"


def test_node_advertises_the_planes_kubelet_port(cluster: Cluster) -> None:
    node = json.loads(cluster.kubectl("get", "node", "hpk-batch", "-o", "json"))
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    assert port == cluster.plane.ports.kubelet != 10250


def test_logs_of_a_finished_pod(cluster: Cluster, finished: str) -> None:
    result = cluster.logs(finished)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "first\nsecond\nthird\n"


def test_tail_timestamps_and_limit_bytes(cluster: Cluster, finished: str) -> None:
    tail = cluster.logs(finished, "--tail=1")
    assert (tail.returncode, tail.stdout) == (0, "third\n"), tail.stderr
    stamped = cluster.logs(finished, "--timestamps")
    assert stamped.returncode == 0, stamped.stderr
    lines = stamped.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first", "second", "third"]
    assert all(re.fullmatch(rf"{STAMP} \w+", line) for line in lines), lines
    stamps = [line.split(" ", 1)[0] for line in lines]
    assert stamps == sorted(stamps) and stamps[0] < stamps[2]
    limited = cluster.logs(finished, "--limit-bytes=8")
    assert (limited.returncode, limited.stdout) == (0, "first\nse"), limited.stderr


def test_since(cluster: Cluster, finished: str) -> None:
    pod = cluster.pod(finished)
    assert pod is not None
    ended = pod["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]
    assert ended, pod["status"]
    time.sleep(2.5)  # the last line is now more than 2 s old
    recent = cluster.logs(finished, "--since=2s")
    assert (recent.returncode, recent.stdout) == (0, ""), recent.stderr
    hour = cluster.logs(finished, "--since=1h")
    assert (hour.returncode, hour.stdout) == (0, "first\nsecond\nthird\n"), hour.stderr


def test_previous_is_a_clear_error(cluster: Cluster, finished: str) -> None:
    result = cluster.logs(finished, "--previous")
    assert result.returncode != 0
    assert f'previous terminated container "main" in pod "{finished}" not found' in (result.stderr)


def test_init_container_logs(cluster: Cluster) -> None:
    cluster.create(
        "with-init",
        ["echo", "from-main"],
        initContainers=[{"name": "init", "image": "busybox", "command": ["echo", "from-init"]}],
    )
    cluster.phase("with-init", "Succeeded")
    init = cluster.logs("with-init", "-c", "init")
    assert (init.returncode, init.stdout) == (0, "from-init\n"), init.stderr
    main = cluster.logs("with-init", "-c", "main")
    assert (main.returncode, main.stdout) == (0, "from-main\n"), main.stderr
    cluster.delete("with-init")


def test_follow_streams_while_the_pod_runs_and_ends_with_it(cluster: Cluster) -> None:
    name = "counter"
    cluster.create(name, ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line-$i; sleep 1; done"])
    cluster.phase(name, "Running")
    # Running is the Slurm job's state; the container starts a moment later.
    eventually(f"{name}'s first line", lambda: "line-1" in cluster.logs(name).stdout, timeout=60)
    with subprocess.Popen(
        cluster.kubectl_argv("logs", "-n", NAMESPACE, "-f", name),
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
    cluster.delete(name)


def test_a_container_that_has_not_started_is_waiting(cluster: Cluster) -> None:
    cluster.create(
        "blocked",
        ["echo", "never"],
        initContainers=[{"name": "init", "image": "busybox", "command": ["sleep", "600"]}],
    )
    eventually(
        "the init container",
        lambda: cluster.logs("blocked", "-c", "init").returncode == 0,
        timeout=120,
    )
    result = cluster.logs("blocked", "-c", "main")
    assert result.returncode != 0
    assert 'container "main" in pod "blocked" is waiting to start' in result.stderr
    cluster.delete("blocked")
