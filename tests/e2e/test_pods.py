"""Pods run by hpk-kubelet as Slurm jobs, end to end: a control plane from the pinned
toolchain in a folder under /var/tmp, the kubelet (as in test_kubelet_nodes) with its hpk
folder there too and the test images in that folder's image cache, the local Slurm test bed,
and kubectl as the cluster's admin.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
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
from tests.e2e.kube import admin_kubectl, eventually, start_kubelet, stop_process
from tests.e2e.planes import TEST_PLANE_SETTINGS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pods"


@dataclass
class Cluster:
    plane: ControlPlane
    home: Path
    log_file: Path

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        return admin_kubectl(self.plane, *args, check=check, stdin=stdin)

    def pod(self, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", "pod", "-n", NAMESPACE, name, "-o", "json", check=False)
        return dict(json.loads(out)) if out.strip() else None

    def create(self, name: str, command: list[str], **extra: Any) -> None:
        annotations = extra.pop("annotations", {})
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "annotations": annotations},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [{"name": "main", "image": "busybox", "command": command, **extra}],
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

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="hpk-pods-e2e-", dir="/var/tmp"))
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


def job_of(pod: dict[str, Any]) -> str:
    job_id = str(pod["metadata"]["annotations"]["slurm.hpk.io/job-id"])
    assert re.fullmatch(r"\d+", job_id), job_id
    return job_id


def test_echo_pod_succeeds_with_its_resources(cluster: Cluster) -> None:
    cluster.create(
        "hello",
        ["echo", "hello-hpk"],
        resources={"requests": {"cpu": "2", "memory": "200Mi"}},
    )
    pod = cluster.phase("hello", "Succeeded")
    job_id = job_of(pod)
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0

    def accounted() -> str:
        acct = slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ReqTRES").strip()
        return acct if acct.endswith(("M", "node=1")) and "cpu=" in acct else ""

    state, tres = eventually("sacct's record", accounted, timeout=30).splitlines()[0].split("|")
    assert state == "COMPLETED"
    assert "cpu=2" in tres.split(","), tres
    assert "mem=200M" in tres.split(","), tres
    folder = cluster.home / "pods" / NAMESPACE / "hello"
    assert (folder / "job-id").read_text().strip() == job_id
    log = (folder / "containers" / "main" / "log").read_text()
    assert re.search(r" stdout hello-hpk$", log, re.MULTILINE), log


def test_exit_code_fails_the_pod(cluster: Cluster) -> None:
    cluster.create("exit3", ["sh", "-c", "exit 3"])
    pod = cluster.phase("exit3", "Failed")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_refused_flag_fails_the_pod_and_the_next_runs(cluster: Cluster) -> None:
    cluster.create("refused", ["true"], annotations={"slurm.hpk.io/flags": "--uid=0"})
    pod = cluster.phase("refused", "Failed", timeout=60)
    assert "--uid" in pod["status"]["message"], pod["status"]
    assert "slurm.hpk.io/job-id" not in (pod["metadata"].get("annotations") or {})
    assert not (cluster.home / "pods" / NAMESPACE / "refused" / "job-id").exists()
    events = cluster.kubectl(
        "get", "events", "-n", NAMESPACE, "--field-selector=involvedObject.name=refused"
    )
    assert "Warning" in events, events
    cluster.create("after", ["true"])
    cluster.phase("after", "Succeeded")


def test_delete_cancels_the_job(cluster: Cluster) -> None:
    cluster.create("sleeper", ["sleep", "600"])
    pod = cluster.phase("sleeper", "Running")
    job_id = job_of(pod)
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "sleeper", "--wait=false")
    eventually("pod sleeper gone", lambda: cluster.pod("sleeper") is None, timeout=30)

    def ended() -> str:
        state = slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode").strip()
        return "" if state.startswith(("RUNNING", "PENDING")) else state

    # TERM reaches the job script, whose trap ends it with 143 (sacct: FAILED, not CANCELLED).
    state = eventually(f"job {job_id} ended", ended, timeout=30)
    assert state.startswith(("CANCELLED", "FAILED")), state
