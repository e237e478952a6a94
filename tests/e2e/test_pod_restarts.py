"""Container restarts and native sidecars inside one Slurm job, end to end: restartPolicy
OnFailure (a container that fails once, then succeeds), Always (the default: a container that
keeps ending is started again until its job is cancelled), and an init container with
restartPolicy Always that runs beside the main container and is stopped after it. The pod's
status, its markers, and `kubectl logs --previous` through the kubelet's API.

The three pods are created together, so the module waits for Kubernetes' 10 s back-off once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from hpk.toolchain import Toolchain
from kubelet_py.job.podfolder import parse_time
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NAMESPACE = "e2e-restarts"
JOB_ID = "slurm.hpk.io/job-id"

FAIL_ONCE = (
    "if [ -e /work/failed ]; then echo second run; exit 0; fi; "
    "touch /work/failed; echo first run; exit 1"
)


def busybox(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"automountServiceAccountToken": False, "containers": list(containers), **spec},
    }


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE, serve_api=True) as running:
        running.apply(
            pod(
                "fails-once",
                busybox("main", FAIL_ONCE, volumeMounts=[{"name": "work", "mountPath": "/work"}]),
                restartPolicy="OnFailure",
                volumes=[{"name": "work", "emptyDir": {}}],
            ),
            # No restartPolicy: Always, as in a Deployment's pods.
            pod("keeps-going", busybox("main", "echo run")),
            pod(
                "with-sidecar",
                # Runs until the test has seen the sidecar running (at most 2 minutes).
                busybox(
                    "main",
                    "i=0; while [ ! -e /work/go ] && [ $i -lt 240 ]; do sleep 0.5; "
                    "i=$((i + 1)); done; echo main done",
                    volumeMounts=[{"name": "work", "mountPath": "/work"}],
                ),
                initContainers=[
                    busybox(
                        "proxy",
                        "echo proxy up; while :; do sleep 1; done",
                        restartPolicy="Always",
                    ),
                ],
                restartPolicy="Never",
                terminationGracePeriodSeconds=5,
                volumes=[{"name": "work", "emptyDir": {}}],
            ),
        )
        yield running


def status_of(pod: dict[str, Any], name: str, kind: str = "containerStatuses") -> Any:
    return next(c for c in pod["status"].get(kind, []) if c["name"] == name)


def logs(cluster: PodCluster, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Toolchain.load().binary("kubectl")),
            f"--kubeconfig={cluster.plane.layout.admin_kubeconfig}",
            *("logs", "-n", NAMESPACE, "--request-timeout=30s", name, *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_on_failure_restarts_a_failed_container_in_the_same_job(cluster: PodCluster) -> None:
    waiting: set[str] = set()

    def succeeded() -> dict[str, Any] | None:
        found = cluster.pod("fails-once") or {}
        status = found.get("status", {})
        for container in status.get("containerStatuses", []):
            waiting.add(container["state"].get("waiting", {}).get("reason", ""))
        assert status.get("phase") != "Failed", status
        return found if status.get("phase") == "Succeeded" else None

    done = eventually("pod fails-once Succeeded", succeeded, timeout=150)
    main = status_of(done, "main")
    assert main["restartCount"] == 1, main
    assert main["state"]["terminated"]["exitCode"] == 0, main
    assert main["lastState"]["terminated"]["exitCode"] == 1, main
    assert main["lastState"]["terminated"]["reason"] == "Error", main
    # The 10 s back-off is long enough for the status to show it.
    assert "CrashLoopBackOff" in waiting, waiting

    previous = logs(cluster, "fails-once", "--previous")
    assert (previous.returncode, previous.stdout) == (0, "first run\n"), previous.stderr
    current = logs(cluster, "fails-once")
    assert (current.returncode, current.stdout) == (0, "second run\n"), current.stderr
    # One Slurm job for both runs.
    folder = cluster.folder("fails-once")
    assert (folder / "job-id").read_text().strip() == done["metadata"]["annotations"][JOB_ID]


def test_always_restarts_until_the_job_is_cancelled(cluster: PodCluster) -> None:
    def restarted() -> dict[str, Any] | None:
        found = cluster.pod("keeps-going") or {}
        status = found.get("status", {})
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        count = status_of(found, "main")["restartCount"] if status.get("phase") else 0
        return found if status.get("phase") == "Running" and count >= 1 else None

    running = eventually("a restart of keeps-going", restarted, timeout=150)
    assert status_of(running, "main")["lastState"]["terminated"]["exitCode"] == 0, running
    previous = logs(cluster, "keeps-going", "--previous")
    assert (previous.returncode, previous.stdout) == (0, "run\n"), previous.stderr

    job_id = running["metadata"]["annotations"][JOB_ID]
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    failed = cluster.phase("keeps-going", "Failed", timeout=90)
    assert failed["status"]["reason"] == "Cancelled", failed["status"]
    assert status_of(failed, "main")["restartCount"] >= 1, failed["status"]


def test_a_sidecar_runs_beside_the_container_and_is_stopped_after_it(
    cluster: PodCluster,
) -> None:
    def both_running() -> dict[str, Any] | None:
        found = cluster.pod("with-sidecar") or {}
        status = found.get("status", {})
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        if status.get("phase") != "Running":
            return None
        main = status_of(found, "main")
        return found if "running" in main["state"] else None

    running = eventually("with-sidecar's main container running", both_running, timeout=120)
    # The sidecar shows as Kubernetes shows one: running, started and ready, and the pod
    # initialized and ready with it.
    proxy = status_of(running, "proxy", "initContainerStatuses")
    assert "running" in proxy["state"], proxy
    assert (proxy["started"], proxy["ready"]) == (True, True), proxy
    conditions = {c["type"]: c["status"] for c in running["status"]["conditions"]}
    assert conditions["Initialized"] == conditions["Ready"] == "True", conditions

    (cluster.folder("with-sidecar") / "volumes" / "work" / "go").touch()
    done = cluster.phase("with-sidecar", "Succeeded", timeout=90)
    main = status_of(done, "main")
    assert main["state"]["terminated"]["exitCode"] == 0, main
    proxy = status_of(done, "proxy", "initContainerStatuses")
    # Stopped by TERM once main had ended; its code does not fail the pod.
    assert proxy["state"]["terminated"]["exitCode"] in (143, 137), proxy

    containers = cluster.folder("with-sidecar") / "containers"

    def marker_time(container: str, name: str) -> Any:
        text = (containers / container / name).read_text().split()[-1]
        return parse_time(text)

    # The sidecar started before main, was running while main ran, and ended after it.
    assert marker_time("proxy", "started") < marker_time("main", "started")
    assert marker_time("main", "exit") <= marker_time("proxy", "exit")
    assert (containers / "proxy" / "log").read_text().split(" ", 2)[2] == "proxy up\n"
    # Well before the 5 s grace period ran out: TERM ended the sidecar's shell.
    gap = marker_time("proxy", "exit") - marker_time("main", "exit")
    assert gap.total_seconds() < 5, gap


def test_a_deployment_replaces_a_pod_whose_job_was_cancelled(cluster: PodCluster) -> None:
    labels = {"app": "web"}
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NAMESPACE},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [busybox("main", "echo serving; sleep 3600")],
                    },
                },
            },
        }
    )

    def web_pods() -> dict[str, dict[str, Any]]:
        return {
            name: found
            for name, found in cluster.pods().items()
            if found["metadata"].get("labels", {}).get("app") == "web"
        }

    def one_running() -> dict[str, Any] | None:
        running = [p for p in web_pods().values() if p["status"].get("phase") == "Running"]
        return running[0] if running else None

    first = eventually("the Deployment's pod Running", one_running, timeout=120)
    assert first["spec"]["restartPolicy"] == "Always"
    subprocess.run(["scancel", first["metadata"]["annotations"][JOB_ID]], check=True, timeout=30)
    failed = cluster.phase(first["metadata"]["name"], "Failed", timeout=90)
    assert failed["status"]["reason"] == "Cancelled", failed["status"]

    def replaced() -> dict[str, Any] | None:
        found = one_running()
        return found if found and found["metadata"]["name"] != first["metadata"]["name"] else None

    second = eventually("a new pod of the Deployment Running", replaced, timeout=120)
    assert second["metadata"]["annotations"][JOB_ID] != first["metadata"]["annotations"][JOB_ID]
    cluster.kubectl("delete", "deployment", "-n", NAMESPACE, "web", "--wait=false")
