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

import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
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
}
"""Pod name -> its flags annotation, and what the pod's failure message must name."""


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

    def create(
        self,
        name: str,
        command: list[str] | None = None,
        *,
        image: str = "busybox",
        flags: str | None = None,
        init: list[dict[str, Any]] | None = None,
        container: dict[str, Any] | None = None,
        **spec: Any,
    ) -> None:
        main = {"name": "main", "image": image, "command": command, **(container or {})}
        manifest: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "annotations": {FLAGS: flags} if flags is not None else {},
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [main],
                **({"initContainers": init} if init else {}),
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

    def scheduled_message(self, name: str, words: str, timeout: float = 60) -> dict[str, Any]:
        """The pod, once it is Pending with `words` in its PodScheduled condition's message."""

        def probe() -> dict[str, Any] | None:
            found = self.pod(name) or {}
            status = found.get("status") or {}
            if status.get("phase") != "Pending":
                return None
            return found if words in condition(found, "PodScheduled").get("message", "") else None

        return dict(eventually(f"pod {name} pending with {words!r}", probe, timeout=timeout))

    def events(self, name: str) -> str:
        return self.kubectl(
            "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}"
        )

    def folder(self, name: str) -> Path:
        return self.home / "pods" / NAMESPACE / name

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


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
def cluster(testbed: Testbed) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="hpk-states-e2e-", dir="/var/tmp"))
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
            "nodes hpk-batch and hpk-gpu",
            lambda: (
                {"node/hpk-batch", "node/hpk-gpu"}
                <= set(running.kubectl("get", "nodes", "-o", "name", check=False).split())
            ),
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
        _cancel_this_runs_jobs()
        plane.stop()
        shutil.rmtree(root, ignore_errors=True)


def _cancel_this_runs_jobs() -> None:
    """Cancel the jobs of this run's pods that are still queued or running (their namespace
    is this run's own, so no one else's job is touched)."""
    listed = slurm("squeue", "-h", "-o", "%i %j", check=False)
    ours = [
        line.split()[0]
        for line in listed.splitlines()
        if len(line.split()) == 2 and line.split()[1].startswith(f"hpk/{NAMESPACE}/")
    ]
    if ours:
        slurm("scancel", *ours, check=False)


@pytest.fixture(scope="module")
def launched(cluster: Cluster) -> Cluster:
    """Every pod whose test only watches it, created up front so that their jobs overlap."""
    cluster.create("deadline", ["sleep", "3600"], activeDeadlineSeconds=60)
    cluster.create(
        "oom",
        ["python3", "-c", OOM_SCRIPT],
        image="python:3.11",
        container={"resources": {"limits": {"memory": "96Mi"}}},
    )
    cluster.create("sleeper", ["sleep", "600"])
    cluster.create("on-gpu", ["true"], flags="-p gpu --gres=gpu:1")
    cluster.create("two-nodes", ["true"], flags="--nodes=2")
    for name, (flags, _) in BAD_FLAGS.items():
        cluster.create(name, ["true"], flags=flags)
    cluster.create("nope-selector", ["true"], nodeSelector={"hpk.io/partition": "nope"})
    cluster.create("nope-flags", ["true"], flags="-p nope")
    cluster.create("held", ["true"], flags="--hold")
    cluster.create("later", ["true"], flags="--begin=now+1hour")
    cluster.create("too-big", ["true"], container={"resources": {"requests": {"cpu": "64"}}})
    cluster.create(
        "too-much-memory", ["true"], container={"resources": {"requests": {"memory": "64Gi"}}}
    )
    cluster.create(
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
    cluster.create(
        "init-fails",
        ["echo", "main-ran"],
        init=[{"name": "prepare", "image": "busybox", "command": ["sh", "-c", "exit 7"]}],
    )
    return cluster


def test_over_its_memory_the_pod_is_oom_killed(launched: Cluster) -> None:
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


def test_a_job_cancelled_outside_kubernetes_fails_the_pod(launched: Cluster) -> None:
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


def test_flags_reach_slurm(launched: Cluster) -> None:
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


def test_refused_flags_fail_the_pod_and_submit_nothing(launched: Cluster) -> None:
    for name, (flags, named) in BAD_FLAGS.items():
        pod = launched.phase(name, "Failed", timeout=60)
        status = pod["status"]
        assert status["reason"] == "InvalidSbatchFlags", status
        assert named in status["message"], status
        assert JOB_ID not in (pod["metadata"].get("annotations") or {}), pod["metadata"]
        assert not (launched.folder(name) / "job-id").exists()
        assert "InvalidSbatchFlags" in launched.events(name)
        assert jobs_named(name) == "", f"{name} ({flags}) was submitted"
    launched.create("after-bad-flags", ["true"])
    launched.phase("after-bad-flags", "Succeeded")


def test_a_request_slurm_refuses_fails_the_pod_with_sbatchs_message(launched: Cluster) -> None:
    pod = launched.phase("too-much-memory", "Failed", timeout=60)
    status = pod["status"]
    assert status["reason"] == "SubmissionFailed", status
    assert "node configuration is not available" in status["message"], status
    assert JOB_ID not in (pod["metadata"].get("annotations") or {})
    assert "SubmissionFailed" in launched.events("too-much-memory")


def test_a_partition_without_a_node_keeps_the_pod_pending(launched: Cluster) -> None:
    for name, source in (("nope-selector", "nodeSelector"), ("nope-flags", "-p in")):
        pod = launched.scheduled_message(name, '"nope"')
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


def test_a_pending_job_shows_slurms_reason_until_it_runs(launched: Cluster) -> None:
    held = launched.scheduled_message("held", "(JobHeldUser)")
    job_id = job_of(held)
    assert f"scontrol release {job_id}" in condition(held, "PodScheduled")["message"]
    waiting = container(held, "main")["state"]["waiting"]
    assert "JobHeldUser" in waiting["message"], waiting

    later = launched.scheduled_message("later", "(BeginTime)")
    later_id = job_of(later)
    message = condition(later, "PodScheduled")["message"]
    assert "requeue" not in message, message  # the user asked for --begin; nothing requeued
    # Held by an administrator as well: the pod says so.
    slurm("scontrol", "hold", later_id)
    launched.scheduled_message("later", "(JobHeldAdmin)")

    # More CPUs than any node has: Slurm queues the job (the bed does not enforce partition
    # limits at submission) and never starts it; the pod says why.
    big = launched.scheduled_message("too-big", "(PartitionConfig)")
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


def test_init_containers_run_first_and_a_failing_one_fails_the_pod(launched: Cluster) -> None:
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


def test_past_its_deadline_the_pod_fails(launched: Cluster) -> None:
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
