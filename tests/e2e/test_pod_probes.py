"""Container probes run by the launcher inside the pod's Slurm job, end to end: readiness
probes (httpGet, and exec in the container's image) that make a pod Ready once its HTTP
server answers or its file exists, a liveness probe
(tcpSocket) on a port nothing listens on that gets its container restarted in the same job,
and a readiness probe that never passes, which keeps a running pod not ready.

The containers share the node's network, so the test picks ports free on this machine (the
test bed's nodes run here too).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from kubelet_py.job.podfolder import parse_time
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NAMESPACE = "e2e-probes"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HTTP_PORT = free_port()
DEAD_PORT = free_port()


def busybox(script: str, **fields: Any) -> dict[str, Any]:
    return {"name": "main", "image": "busybox", "command": ["sh", "-c", script], **fields}


def pod(name: str, container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"automountServiceAccountToken": False, "containers": [container], **spec},
    }


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        running.apply(
            pod(
                "serves-http",
                busybox(
                    # The server comes up a few seconds late, so the pod is not ready at first.
                    "sleep 3; echo ok > /www/index.html; "
                    f"exec httpd -f -p 127.0.0.1:{HTTP_PORT} -h /www",
                    ports=[{"name": "web", "containerPort": HTTP_PORT}],
                    readinessProbe={"httpGet": {"port": "web", "path": "/"}, "periodSeconds": 1},
                    volumeMounts=[{"name": "www", "mountPath": "/www"}],
                ),
                restartPolicy="Never",
                terminationGracePeriodSeconds=2,
                volumes=[{"name": "www", "emptyDir": {}}],
            ),
            pod(
                "not-alive",
                busybox(
                    "echo up; exec sleep 600",
                    livenessProbe={
                        "tcpSocket": {"port": DEAD_PORT},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                ),
                restartPolicy="Always",
                terminationGracePeriodSeconds=2,
            ),
            pod(
                "exec-ready",
                busybox(
                    "sleep 3; touch /work/ok; exec sleep 600",
                    readinessProbe={
                        "exec": {"command": ["test", "-e", "/work/ok"]},
                        "periodSeconds": 1,
                    },
                    volumeMounts=[{"name": "work", "mountPath": "/work"}],
                ),
                restartPolicy="Never",
                terminationGracePeriodSeconds=2,
                volumes=[{"name": "work", "emptyDir": {}}],
            ),
            pod(
                "never-ready",
                busybox(
                    "exec sleep 600",
                    readinessProbe={"httpGet": {"port": DEAD_PORT}, "periodSeconds": 1},
                ),
                restartPolicy="Never",
                terminationGracePeriodSeconds=2,
            ),
        )
        yield running


def main_status(found: dict[str, Any]) -> Any:
    return next(c for c in found["status"].get("containerStatuses", []) if c["name"] == "main")


def conditions(found: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in found["status"].get("conditions", [])}


@pytest.mark.parametrize("name", ["serves-http", "exec-ready"])
def test_a_readiness_probe_makes_the_pod_ready_once_it_passes(
    cluster: PodCluster, name: str
) -> None:
    def ready() -> dict[str, Any] | None:
        found = cluster.pod(name) or {}
        status = found.get("status", {})
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        if status.get("phase") != "Running":
            return None
        return found if conditions(found).get("Ready") == "True" else None

    found = eventually(f"{name} Ready", ready, timeout=150)
    main = main_status(found)
    assert (main["started"], main["ready"]) == (True, True), main
    assert conditions(found)["ContainersReady"] == "True", found["status"]
    folder = cluster.folder(name) / "containers" / "main"
    # Ready only once the server answered (the file existed), 3 s after the start: the probe,
    # not the start, made it ready.
    started = parse_time((folder / "started").read_text().strip())
    assert started is not None
    became_ready = (folder / "ready").stat().st_mtime
    assert became_ready - started.timestamp() >= 3, (started, became_ready)


def test_a_failing_liveness_probe_restarts_the_container(cluster: PodCluster) -> None:
    def restarted() -> dict[str, Any] | None:
        found = cluster.pod("not-alive") or {}
        status = found.get("status", {})
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        if status.get("phase") != "Running":
            return None
        return found if main_status(found)["restartCount"] >= 1 else None

    found = eventually("a restart of not-alive", restarted, timeout=150)
    last = main_status(found)["lastState"]["terminated"]
    # Stopped by TERM (sleep dies of it), or KILL after the 2 s grace.
    assert last["exitCode"] in (143, 137), last
    previous = (cluster.folder("not-alive") / "containers" / "main" / "log.previous").read_text()
    assert "hpk: Liveness probe failed 2 times" in previous, previous


def test_a_readiness_probe_that_never_passes_keeps_the_pod_not_ready(
    cluster: PodCluster,
) -> None:
    found = cluster.phase("never-ready", "Running", timeout=150)
    # Several probe periods after the start, still running and still not ready.
    time.sleep(5)
    found = cluster.pod("never-ready") or {}
    assert found["status"]["phase"] == "Running", found["status"]
    main = main_status(found)
    assert "running" in main["state"] and main["restartCount"] == 0, main
    assert (main["started"], main["ready"]) == (True, False), main
    assert conditions(found)["Ready"] == "False", found["status"]
    assert conditions(found)["ContainersReady"] == "False", found["status"]
