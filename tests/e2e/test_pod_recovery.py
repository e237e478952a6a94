"""Restart, recovery and deletion of pods, end to end: the control plane and the Slurm test
bed as in test_pods, with a kubelet process these tests kill (-9), stop and start again.

What a user sees: after a kill of the kubelet, every pod still has exactly one Slurm job and
ends in the right phase; a job whose pod was removed while the kubelet was away is cancelled
when it comes back (and a job of another hpk home is not); a Kubernetes Job runs its pods to
completion; `kubectl delete --grace-period=5` of a pod that ignores TERM ends its job about 5 s
later and the pod is gone.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

# Unique per run: Slurm's accounting keeps the job names of earlier runs.
NAMESPACE = f"e2e-recovery-{uuid.uuid4().hex[:6]}"
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")


def kill_kubelet(cluster: PodCluster) -> None:
    """kill -9: no clean-up of any kind."""
    assert cluster.process is not None
    cluster.process.kill()
    cluster.process.wait(timeout=10)


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def jobs_named(name: str) -> list[tuple[str, str]]:
    """(job ID, state) of every job sacct knows by this job name."""
    out = slurm("sacct", "-X", "-n", "-P", f"--name={name}", "-S", "now-1days", "-o", "JobID,State")
    return [tuple(line.split("|")[:2]) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def job_state(job_id: str) -> str:
    out = slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State").strip()
    return out.splitlines()[-1].split()[0] if out else ""


@pytest.fixture(scope="module")
def stack(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


@pytest.fixture
def kubelet(stack: PodCluster) -> PodCluster:
    """The module's stack, with its kubelet started again if a test left it stopped."""
    if stack.process is None or stack.process.poll() is not None:
        stack.start_kubelet()
    return stack


def test_kill_during_a_burst_loses_no_pod_and_duplicates_no_job(kubelet: PodCluster) -> None:
    names = [f"burst-{number:02d}" for number in range(20)]
    failing = {"burst-07", "burst-15"}
    kubelet.apply(
        *(
            kubelet.manifest(name, ["sh", "-c", "exit 3"] if name in failing else ["sleep", "3"])
            for name in names
        )
    )

    def some_submitted() -> list[str]:
        out = slurm("squeue", "-h", "--me", "-t", "all", "-o", "%j")
        return [line for line in out.split() if line.startswith(f"hpk/{NAMESPACE}/burst-")]

    eventually("a first job of the burst", some_submitted, timeout=60)
    kill_kubelet(kubelet)
    submitted_before_kill = len(some_submitted())
    print(f"{submitted_before_kill} of 20 pods had a job when the kubelet was killed")
    kubelet.start_kubelet()

    def all_ended() -> dict[str, dict[str, Any]] | None:
        pods = kubelet.pods()
        phases = [pod.get("status", {}).get("phase") for pod in pods.values()]
        return pods if all(phase in ("Succeeded", "Failed") for phase in phases) else None

    pods = eventually("all 20 pods ended", all_ended, timeout=240)
    assert sorted(pods) == names
    for name, pod in pods.items():
        wanted = "Failed" if name in failing else "Succeeded"
        assert pod["status"]["phase"] == wanted, (name, pod["status"], kubelet.log()[-3000:])
        if name in failing:
            terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
            assert terminated["exitCode"] == 3
        jobs = jobs_named(f"hpk/{NAMESPACE}/{name}")
        assert len(jobs) == 1, f"{name}: jobs {jobs}"
        assert pod["metadata"]["annotations"]["slurm.hpk.io/job-id"] == jobs[0][0]
    kubelet.kubectl("delete", "pods", "-n", NAMESPACE, *names, "--wait=false")
    eventually("the burst's pods gone", lambda: not set(names) & set(kubelet.pods()), timeout=60)


def test_orphaned_job_is_cancelled_at_start_and_other_homes_jobs_are_not(
    kubelet: PodCluster, tmp_path: Path
) -> None:
    kubelet.apply(kubelet.manifest("orphan", ["sleep", "600"]))
    job_id = kubelet.phase("orphan", "Running")["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    # A job that looks like hpk's but belongs to another hpk home of the same user.
    other = tmp_path / "other-home" / "pods" / NAMESPACE / "orphan"
    other.mkdir(parents=True)
    stranger = slurm(
        "sbatch",
        "--parsable",
        f"--job-name=hpk/{NAMESPACE}/orphan",
        f"--comment=hpk-uid={uuid.uuid4()}",
        f"--chdir={other}",
        "--output=/dev/null",
        "--wrap=sleep 600",
    ).strip()
    try:
        kubelet.stop_kubelet()
        kubelet.kubectl("delete", "pod", "-n", NAMESPACE, "orphan", "--grace-period=0", "--force")
        assert kubelet.pod("orphan") is None
        assert job_state(job_id) in LIVE  # sacct may lag behind squeue's RUNNING
        kubelet.start_kubelet()

        def ended() -> str:
            state = job_state(job_id)
            return "" if state in LIVE else state

        state = eventually(f"orphaned job {job_id} ended", ended, timeout=60)
        assert state in ("CANCELLED", "FAILED"), state
        assert "cancelled: its pod" in kubelet.log()
        assert job_state(stranger) in ("RUNNING", "PENDING"), "another home's job was touched"
    finally:
        subprocess.run(["scancel", stranger], check=False)


def test_job_with_three_completions_completes(kubelet: PodCluster) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "three", "namespace": NAMESPACE},
        "spec": {
            "completions": 3,
            "parallelism": 3,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {"name": "work", "image": "busybox", "command": ["sh", "-c", "echo ok"]}
                    ],
                }
            },
        },
    }
    kubelet.kubectl("create", "-f", "-", stdin=json.dumps(job))

    def complete() -> dict[str, Any] | None:
        out = kubelet.kubectl("get", "job", "-n", NAMESPACE, "three", "-o", "json")
        status = json.loads(out).get("status", {})
        if status.get("failed"):
            pytest.fail(f"job three failed: {status}\n{kubelet.log()[-3000:]}")
        return status if status.get("succeeded") == 3 else None

    status = eventually("job three complete", complete, timeout=180)
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    assert conditions.get("Complete") == "True", status
    pods = [
        pod
        for pod in kubelet.pods().values()
        if pod["metadata"].get("labels", {}).get("job-name") == "three"
    ]
    assert len(pods) == 3
    assert {pod["status"]["phase"] for pod in pods} == {"Succeeded"}
    kubelet.kubectl(
        "delete", "job", "-n", NAMESPACE, "three", "--cascade=foreground", "--wait=false"
    )


def test_delete_kills_a_pod_that_ignores_term_after_its_grace_period(kubelet: PodCluster) -> None:
    kubelet.apply(kubelet.manifest("stubborn", ["sh", "-c", 'trap "" TERM; sleep 600']))
    pod = kubelet.phase("stubborn", "Running")
    job_id = pod["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    started = kubelet.home / "pods" / NAMESPACE / "stubborn" / "containers" / "main" / "started"
    eventually("the container started", started.exists, timeout=60)
    began = time.monotonic()
    kubelet.kubectl(
        "delete", "pod", "-n", NAMESPACE, "stubborn", "--grace-period=5", "--wait=false"
    )
    # TERM is ignored: the job runs on through the grace period.
    time.sleep(3)
    assert job_state(job_id) in LIVE
    assert kubelet.pod("stubborn") is not None

    def ended() -> str:
        state = job_state(job_id)
        return "" if state in LIVE else state

    state = eventually(f"job {job_id} ended", ended, timeout=30)
    job_ended = time.monotonic() - began
    eventually("pod stubborn gone", lambda: kubelet.pod("stubborn") is None, timeout=30)
    gone = time.monotonic() - began
    print(f"job ended {job_ended:.1f} s and pod gone {gone:.1f} s after the delete")
    assert state in ("CANCELLED", "FAILED"), state
    assert 4.0 <= job_ended <= 15.0, job_ended
    assert gone <= 16.0, gone
    assert "grace period over, job killed" in kubelet.log()
