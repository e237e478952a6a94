"""Pods run by hpk-kubelet as Slurm jobs, end to end: a control plane from the pinned
toolchain in a folder under /var/tmp, the kubelet (as in test_kubelet_nodes) with its hpk
folder there too and the test images in that folder's image cache, the local Slurm test bed,
and kubectl as the cluster's admin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.images import cached_image
from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pods"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


def create(cluster: PodCluster, name: str, command: list[str], **extra: Any) -> None:
    """A busybox pod; `annotations` go to its metadata, the rest to its container."""
    manifest = cluster.manifest(name, command, annotations=extra.pop("annotations", None))
    manifest["spec"]["containers"][0].update(extra)
    cluster.apply(manifest)


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def job_of(pod: dict[str, Any]) -> str:
    job_id = str(pod["metadata"]["annotations"]["slurm.hpk.io/job-id"])
    assert re.fullmatch(r"\d+", job_id), job_id
    return job_id


def test_echo_pod_succeeds_with_its_resources(cluster: PodCluster) -> None:
    create(
        cluster,
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


def test_exit_code_fails_the_pod(cluster: PodCluster) -> None:
    create(cluster, "exit3", ["sh", "-c", "exit 3"])
    pod = cluster.phase("exit3", "Failed")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_refused_flag_fails_the_pod_and_the_next_runs(cluster: PodCluster) -> None:
    create(cluster, "refused", ["true"], annotations={"slurm.hpk.io/flags": "--uid=0"})
    pod = cluster.phase("refused", "Failed", timeout=60)
    assert "--uid" in pod["status"]["message"], pod["status"]
    assert "slurm.hpk.io/job-id" not in (pod["metadata"].get("annotations") or {})
    assert not (cluster.home / "pods" / NAMESPACE / "refused" / "job-id").exists()
    events = cluster.kubectl(
        "get", "events", "-n", NAMESPACE, "--field-selector=involvedObject.name=refused"
    )
    assert "Warning" in events, events
    create(cluster, "after", ["true"])
    cluster.phase("after", "Succeeded")


def test_delete_cancels_the_job(cluster: PodCluster) -> None:
    create(cluster, "sleeper", ["sleep", "600"])
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


def test_a_removed_image_is_pulled_again_by_the_next_pod(cluster: PodCluster) -> None:
    cache = cluster.home / "images"
    busybox = cached_image("busybox", cache_dir=cache)
    assert busybox is not None
    reference = "docker.io/library/busybox:removed"
    env = {**os.environ, "HPK_IMAGE_CACHE": str(cache)}
    hpk = [sys.executable, "-m", "hpk.cli", "images"]
    for argv in (["import", reference, str(busybox)], ["rm", reference]):
        done = subprocess.run([*hpk, *argv], env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    assert cached_image(reference, cache_dir=cache) is None
    create(cluster, "removed", ["true"], image=reference)

    def pull_failed() -> str:
        statuses = ((cluster.pod("removed") or {}).get("status") or {}).get("containerStatuses")
        waiting = ((statuses or [{}])[0].get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        return waiting.get("message", "") if reason in ("ErrImagePull", "ImagePullBackOff") else ""

    # No registry is reachable here: the pull fails and the pod waits (test_pod_images.py).
    message = eventually("the failed pull", pull_failed, timeout=60)
    assert reference in message, message
    cluster.kubectl("delete", "pod", "-n", cluster.namespace, "removed", "--wait=false")
