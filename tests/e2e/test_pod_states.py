"""Every way a pod's Slurm job can go, end to end: what Slurm says (squeue, sacct, scontrol)
and what the pod's status says about it. The stack is the one of test_pods: a control plane
from the pinned toolchain, hpk-kubelet with its hpk folder under /var/tmp, the local Slurm
test bed, and kubectl as the cluster's admin.

Most pods are created at once by the `launched` fixture, so that their jobs run side by side
while the tests look at them one by one; the pod with a deadline, the slowest, is looked at
last. The namespace has a fresh name per run, so that the jobs' names (hpk/<namespace>/<pod>)
in squeue and sacct are this run's only.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = f"e2e-states-{uuid.uuid4().hex[:6]}"
FLAGS = "slurm.hpk.io/flags"
JOB_ID = "slurm.hpk.io/job-id"

OOM_SCRIPT = 'print("allocating", flush=True); hog = bytearray(1 << 30)'
"""Asks for 1 GiB and zeroes it in one go, so that the cgroup's OOM killer ends it while it
runs no other code (a loop of small allocations can thrash on the image's pages first)."""

BAD_FLAGS = {
    "bad-shell": ('"; rm -rf ~"', "shell"),
    "bad-uid": ("--uid=0", "--uid"),
    "bad-output": ("--output=/etc/x", "--output"),
    "bad-nodelist": ("--nodelist=/etc/passwd", "as a file on the kubelet's host"),
    "bad-exclude": ("-x /etc/passwd", "-x value '/etc/passwd' is not a Slurm host list"),
    "bad-mail": ("--mail-user=someone@example.org", "--allow-mail-flags"),
}
"""Pod name -> its flags annotation, and what the pod's failure message must name."""


def create(
    cluster: PodCluster,
    name: str,
    command: list[str] | None = None,
    *,
    image: str = "busybox",
    flags: str | None = None,
    init: list[dict[str, Any]] | None = None,
    container: dict[str, Any] | None = None,
    **spec: Any,
) -> None:
    manifest = cluster.manifest(name, [], annotations={FLAGS: flags} if flags is not None else None)
    manifest["spec"]["containers"] = [
        {"name": "main", "image": image, "command": command, **(container or {})}
    ]
    manifest["spec"].update({"initContainers": init} if init else {}, **spec)
    cluster.apply(manifest)


def scheduled_message(
    cluster: PodCluster, name: str, words: str, timeout: float = 60
) -> dict[str, Any]:
    """The pod, once it is Pending with `words` in its PodScheduled condition's message."""

    def probe() -> dict[str, Any] | None:
        found = cluster.pod(name) or {}
        status = found.get("status") or {}
        if status.get("phase") != "Pending":
            return None
        return found if words in condition(found, "PodScheduled").get("message", "") else None

    return dict(eventually(f"pod {name} pending with {words!r}", probe, timeout=timeout))


def slurm(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done.stdout + done.stderr


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict of its Key=Value words."""
    text = slurm("scontrol", "show", "job", job_id)
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def accounted(job_id: str, *, fields: str = "State,ExitCode") -> list[str]:
    """sacct's final record of the job, once it has one."""

    def probe() -> list[str] | None:
        line = slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", fields).strip()
        values = line.splitlines()[0].split("|") if line else []
        return values if values and values[0] not in ("", "PENDING", "RUNNING") else None

    return list(eventually(f"sacct's final record of job {job_id}", probe, timeout=30))


def jobs_named(name: str) -> str:
    """Every line squeue and sacct have about jobs of the pod `name` (empty: none)."""
    job_name = f"hpk/{NAMESPACE}/{name}"
    queued = slurm("squeue", "-h", "-t", "all", "-n", job_name, "-o", "%i %T")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 3600))
    accounted = slurm("sacct", "-X", "-n", "-P", "-S", since, "--name", job_name, "-o", "JobID")
    return (queued + accounted).strip()


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for found in pod.get("status", {}).get("conditions") or []:
        if found.get("type") == kind:
            return dict(found)
    return {}


def container(pod: dict[str, Any], name: str, key: str = "containerStatuses") -> dict[str, Any]:
    statuses = pod["status"].get(key) or []
    return dict(next(s for s in statuses if s["name"] == name))


def job_of(pod: dict[str, Any]) -> str:
    job_id = str(pod["metadata"]["annotations"][JOB_ID])
    assert re.fullmatch(r"\d+", job_id), job_id
    return job_id


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE, nodes=("hpk-batch", "hpk-gpu")) as running:
        yield running


@pytest.fixture(scope="module")
def launched(cluster: PodCluster) -> PodCluster:
    """Every pod whose test only watches it, created up front so that their jobs overlap."""
    create(cluster, "deadline", ["sleep", "3600"], activeDeadlineSeconds=60)
    create(
        cluster,
        "oom",
        ["python3", "-c", OOM_SCRIPT],
        image="python:3.11",
        container={"resources": {"limits": {"memory": "96Mi"}}},
    )
    create(cluster, "sleeper", ["sleep", "600"])
    create(cluster, "on-gpu", ["true"], flags="-p gpu --gres=gpu:1")
    create(cluster, "two-nodes", ["true"], flags="--nodes=2")
    for name, (flags, _) in BAD_FLAGS.items():
        create(cluster, name, ["true"], flags=flags)
    create(cluster, "nope-selector", ["true"], nodeSelector={"hpk.io/partition": "nope"})
    create(cluster, "nope-flags", ["true"], flags="-p nope")
    create(cluster, "held", ["true"], flags="--hold")
    create(cluster, "later", ["true"], flags="--begin=now+1hour")
    create(cluster, "too-big", ["true"], container={"resources": {"requests": {"cpu": "64"}}})
    create(
        cluster,
        "too-much-memory",
        ["true"],
        container={"resources": {"requests": {"memory": "64Gi"}}},
    )
    create(
        cluster,
        "init-ok",
        ["sh", "-c", "cat /work/prepared"],
        init=[
            {
                "name": "prepare",
                "image": "busybox",
                "command": ["sh", "-c", "echo prepared-by-init > /work/prepared"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }
        ],
        container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    create(
        cluster,
        "init-fails",
        ["echo", "main-ran"],
        init=[{"name": "prepare", "image": "busybox", "command": ["sh", "-c", "exit 7"]}],
    )
    return cluster


def test_over_its_memory_the_pod_is_oom_killed(launched: PodCluster) -> None:
    pod = launched.phase("oom", "Failed")
    job_id = job_of(pod)
    assert pod["status"]["reason"] == "OOMKilled", pod["status"]
    terminated = container(pod, "main")["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled", terminated
    assert terminated["exitCode"] == 137, terminated
    state, exit_code = accounted(job_id)
    assert state == "OUT_OF_MEMORY", (state, exit_code)
    # The container did start: the kill came from its own allocations, not from its start.
    log = (launched.folder("oom") / "containers" / "main" / "log").read_text()
    assert " stdout allocating" in log, log
    assert scontrol_job(job_id)["MinMemoryNode"] == "96M"


def test_a_job_cancelled_outside_kubernetes_fails_the_pod(launched: PodCluster) -> None:
    pod = launched.phase("sleeper", "Running")
    job_id = job_of(pod)
    # hpk submits with --no-requeue: Slurm refuses to requeue the job, which runs on.
    refused = subprocess.run(
        ["scontrol", "requeue", job_id], capture_output=True, text=True, check=False, timeout=30
    )
    assert refused.returncode != 0, refused
    assert "disabled" in refused.stderr, refused.stderr
    assert scontrol_job(job_id)["JobState"] == "RUNNING"

    slurm("scancel", job_id)
    pod = launched.phase("sleeper", "Failed", timeout=60)
    assert pod["status"]["reason"] == "Cancelled", pod["status"]
    assert "cancelled outside Kubernetes" in pod["status"]["message"], pod["status"]
    terminated = container(pod, "main")["state"]["terminated"]
    assert terminated["reason"] == "Cancelled", terminated
    assert terminated["exitCode"] in (137, 143), terminated
    state, _ = accounted(job_id)
    assert state.startswith("CANCELLED"), state


def test_flags_reach_slurm(launched: PodCluster) -> None:
    pod = launched.phase("on-gpu", "Succeeded")
    assert pod["spec"]["nodeName"] == "hpk-gpu"
    shown = scontrol_job(job_of(pod))
    assert shown["Partition"] == "gpu", shown
    assert shown["NodeList"] == "n4", shown
    assert "gpu:1" in shown.get("TresPerNode", ""), shown
    assert "gres/gpu=1" in shown["TRES"], shown

    pod = launched.phase("two-nodes", "Succeeded")
    assert pod["spec"]["nodeName"] == "hpk-batch"
    shown = scontrol_job(job_of(pod))
    assert shown["NumNodes"] == "2", shown
    assert shown["Partition"] == "batch", shown


def test_refused_flags_fail_the_pod_and_submit_nothing(launched: PodCluster) -> None:
    for name, (flags, named) in BAD_FLAGS.items():
        pod = launched.phase(name, "Failed", timeout=60)
        status = pod["status"]
        assert status["reason"] == "InvalidSbatchFlags", status
        assert named in status["message"], status
        assert JOB_ID not in (pod["metadata"].get("annotations") or {}), pod["metadata"]
        assert not (launched.folder(name) / "job-id").exists()
        assert "InvalidSbatchFlags" in launched.events(name)
        assert jobs_named(name) == "", f"{name} ({flags}) was submitted"
    create(launched, "after-bad-flags", ["true"])
    launched.phase("after-bad-flags", "Succeeded")


def test_a_request_no_node_can_meet_fails_the_pod(launched: PodCluster) -> None:
    """More memory than any node has: sbatch refuses the job, or, when slurmctld defers the
    check (several submissions at once), takes it and fails it at its first scheduling
    ("No nodes satisfy ... requirements"). Either way the pod fails with a message that says
    so, and never runs."""
    pod = launched.phase("too-much-memory", "Failed", timeout=60)
    status = pod["status"]
    annotations = pod["metadata"].get("annotations") or {}
    if JOB_ID in annotations:
        job_id = annotations[JOB_ID]
        assert accounted(job_id, fields="State,NodeList") == ["FAILED", "None assigned"]
        assert f"Slurm job {job_id} failed" in str(status), status
        assert not (launched.folder("too-much-memory") / "containers" / "main" / "started").exists()
    else:
        assert status.get("reason") == "SubmissionFailed", (status, launched.log()[-4000:])
        assert "node configuration is not available" in status["message"], status
        assert "SubmissionFailed" in launched.events("too-much-memory")


def test_a_partition_without_a_node_keeps_the_pod_pending(launched: PodCluster) -> None:
    for name, source in (("nope-selector", "nodeSelector"), ("nope-flags", "-p in")):
        pod = scheduled_message(launched, name, '"nope"')
        scheduled = condition(pod, "PodScheduled")
        assert scheduled["status"] == "False", scheduled
        assert scheduled["reason"] == "Unschedulable", scheduled
        assert source in scheduled["message"], scheduled
        assert "batch" in scheduled["message"] and "gpu" in scheduled["message"], scheduled
        assert "FailedScheduling" in launched.events(name)
    time.sleep(3)  # the kubelet had every chance to run them by now
    for name in ("nope-selector", "nope-flags"):
        pod = launched.pod(name) or {}
        assert pod["status"]["phase"] == "Pending", pod["status"]
        assert not pod["spec"].get("nodeName"), pod["spec"]
        assert JOB_ID not in (pod["metadata"].get("annotations") or {})
        assert jobs_named(name) == ""


def test_a_pending_job_shows_slurms_reason_until_it_runs(launched: PodCluster) -> None:
    held = scheduled_message(launched, "held", "(JobHeldUser)")
    job_id = job_of(held)
    assert f"scontrol release {job_id}" in condition(held, "PodScheduled")["message"]
    waiting = container(held, "main")["state"]["waiting"]
    assert "JobHeldUser" in waiting["message"], waiting

    later = scheduled_message(launched, "later", "(BeginTime)")
    later_id = job_of(later)
    message = condition(later, "PodScheduled")["message"]
    assert "requeue" not in message, message  # the user asked for --begin; nothing requeued
    # Held by an administrator as well: the pod says so.
    slurm("scontrol", "hold", later_id)
    scheduled_message(launched, "later", "(JobHeldAdmin)")

    # More CPUs than any node has: Slurm queues the job (the bed does not enforce partition
    # limits at submission) and never starts it; the pod says why.
    big = scheduled_message(launched, "too-big", "(PartitionConfig)")
    big_id = job_of(big)
    assert scontrol_job(big_id)["NumCPUs"] == "64"
    assert "will not start" in condition(big, "PodScheduled")["message"]
    launched.kubectl("delete", "pod", "-n", NAMESPACE, "too-big", "--wait=false")
    eventually("pod too-big gone", lambda: launched.pod("too-big") is None, timeout=30)
    eventually(
        f"job {big_id} cancelled",
        lambda: "PENDING" not in slurm("squeue", "-h", "-t", "all", "-j", big_id, "-o", "%T"),
        timeout=30,
    )

    slurm("scontrol", "release", job_id)
    slurm("scontrol", "release", later_id)
    slurm("scontrol", "update", f"JobId={later_id}", "StartTime=now")
    for name in ("held", "later"):
        pod = launched.phase(name, "Succeeded", timeout=60)
        # Nothing of the Pending status is left over.
        scheduled = condition(pod, "PodScheduled")
        assert scheduled["status"] == "True", scheduled
        assert "reason" not in scheduled and "message" not in scheduled, scheduled


def test_init_containers_run_first_and_a_failing_one_fails_the_pod(launched: PodCluster) -> None:
    pod = launched.phase("init-ok", "Succeeded")
    prepare = container(pod, "prepare", "initContainerStatuses")["state"]["terminated"]
    assert prepare["exitCode"] == 0 and prepare["reason"] == "Completed", prepare
    main = container(pod, "main")["state"]["terminated"]
    assert main["exitCode"] == 0, main
    assert condition(pod, "Initialized")["status"] == "True"
    log = (launched.folder("init-ok") / "containers" / "main" / "log").read_text()
    assert " stdout prepared-by-init" in log, log

    pod = launched.phase("init-fails", "Failed")
    prepare = container(pod, "prepare", "initContainerStatuses")["state"]["terminated"]
    assert prepare["exitCode"] == 7 and prepare["reason"] == "Error", prepare
    main = container(pod, "main")["state"]
    # The API server writes an unset startedAt as null.
    assert "running" not in main and not main.get("terminated", {}).get("startedAt"), main
    assert condition(pod, "Initialized")["status"] == "False"
    assert not (launched.folder("init-fails") / "containers" / "main" / "started").exists()
    state, exit_code = accounted(job_of(pod))
    assert (state, exit_code) == ("FAILED", "7:0")


def test_past_its_deadline_the_pod_fails(launched: PodCluster) -> None:
    """Slurm counts time limits in minutes and checks them every 30 s or so, then gives the
    job KillWait (10 s on the bed) between TERM and KILL: about 60 to 110 s after the start."""
    pod = launched.phase("deadline", "Running")
    job_id = job_of(pod)
    assert scontrol_job(job_id)["TimeLimit"] == "00:01:00"
    pod = launched.phase("deadline", "Failed", timeout=240)
    assert pod["status"]["reason"] == "DeadlineExceeded", pod["status"]
    terminated = container(pod, "main")["state"]["terminated"]
    assert terminated["reason"] == "DeadlineExceeded", terminated
    assert terminated["exitCode"] in (137, 143), terminated
    state, _ = accounted(job_id)
    assert state == "TIMEOUT", state
