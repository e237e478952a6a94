"""A pod cannot point the kubelet at a job it does not own, end to end, as an ordinary user.

The user `hpk-e2e` runs `hpk up` and, beside the cluster, a plain `sbatch --wrap 'sleep 600'`
job. A pod annotated with that job's ID (as a chart could write it) must not be adopted: it
gets a `JobNotOwned` Warning Event naming the job, runs under a Slurm job of its own, and its
deletion leaves the plain job running. A pod annotated with the control-plane job's ID fares
the same, and the cluster keeps answering after its deletion.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually
from tests.e2e.user_cluster import UserCluster, user_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAMESPACE = "owned"
JOB_ID = "slurm.hpk.io/job-id"
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def job(job_id: str) -> tuple[str, str, str]:
    """(state, name, user) of a job squeue still lists, or empty strings."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%j|%u"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    state, name, user = [*out.split("|"), "", "", ""][:3]
    return state, name, user


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[UserCluster]:
    with user_cluster(user_install, folder=".hpk-job-ownership", namespace=NAMESPACE) as running:
        yield running


@pytest.fixture
def plain_job(cluster: UserCluster) -> Iterator[str]:
    """A plain job of the same user, cancelled at the end."""
    submitted = cluster.run("sbatch", "--parsable", "--wrap", "sleep 600")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        eventually(f"job {job_id} running", lambda: job(job_id)[0] == "RUNNING")
        yield job_id
    finally:
        cluster.run("scancel", job_id)


def claiming(name: str, job_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "annotations": {JOB_ID: job_id}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "600"]}],
        },
    }


def runs_under_its_own_job(cluster: UserCluster, name: str, claimed: str) -> str:
    """Create a pod annotated with `claimed`, wait until it runs, and check that it does under
    a job of its own and was warned; returns its job's ID."""
    cluster.kubectl("create", "-f", "-", stdin=json.dumps(claiming(name, claimed)))

    def running() -> dict[str, Any] | None:
        pod = cluster.pod(name)
        return pod if pod.get("status", {}).get("phase") == "Running" else None

    pod = eventually(f"pod {name} Running", running, timeout=180)
    own = str(pod["metadata"]["annotations"][JOB_ID])
    assert own != claimed
    state, job_name, user = job(own)
    assert (state, job_name, user) == (
        "RUNNING",
        f"hpk/{NAMESPACE}/{name}",
        cluster.install.user.pw_name,
    )
    events = json.loads(
        cluster.kubectl(
            "get",
            "events",
            "-n",
            NAMESPACE,
            f"--field-selector=involvedObject.name={name}",
            "-o",
            "json",
        )
    )["items"]
    warned = [e for e in events if e["type"] == "Warning" and e["reason"] == "JobNotOwned"]
    assert warned and f"Slurm job {claimed} " in warned[0]["message"], events
    submitted = [e["message"] for e in events if e["reason"] == "Submitted"]
    assert submitted == [f"Slurm job {own} submitted"], events
    return own


def deleted(cluster: UserCluster, name: str, own: str) -> None:
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, name, "--timeout=120s")
    eventually(f"job {own} ended", lambda: job(own)[0] not in LIVE, timeout=60)
    print(f"pod {name} deleted in {time.monotonic() - started:.1f} s")


def test_a_plain_job_named_on_a_pod_survives_the_pods_creation_and_deletion(
    cluster: UserCluster, plain_job: str
) -> None:
    own = runs_under_its_own_job(cluster, "claims-plain", plain_job)
    # The kubelet stops a pod's job before it confirms the deletion: by now, a wrong scancel
    # would have been sent.
    deleted(cluster, "claims-plain", own)
    assert job(plain_job)[0] == "RUNNING", "the plain job must outlive the pod"


def test_the_control_plane_job_named_on_a_pod_survives_its_deletion(cluster: UserCluster) -> None:
    control_plane = cluster.control_plane_job()
    own = runs_under_its_own_job(cluster, "claims-plane", control_plane)
    deleted(cluster, "claims-plane", own)
    assert job(control_plane)[0] == "RUNNING"
    assert cluster.kubectl("get", "--raw=/readyz").strip() == "ok"
