"""Argo Workflows on hpk, as an ordinary user runs it: `hpk up` submits the control-plane job,
`hpk addons install argo` installs the pinned release from its standard manifest, and the
real argo CLI submits the workflows of examples/argo/. Every step is a Slurm job that runs
argoexec's init, the emissary around the step's command, and the wait container, under
Apptainer.

The tests run in file order against one cluster; the last one restarts the control plane.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually

pytestmark = pytest.mark.timeout(420)

NAMESPACE = "argo"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
JOB_ID = "slurm.hpk.io/job-id"


class ArgoCluster:
    """The user's hpk cluster with Argo, driven from the "login node" as the user."""

    def __init__(self, install: UserInstall) -> None:
        self.install = install
        self.home = Path(install.user.pw_dir) / ".hpk-argo"
        self.kubeconfig = self.home / "kubeconfig"
        self.tools = Toolchain.load()
        self.examples = install.source / "examples" / "argo"
        self.installed: subprocess.CompletedProcess[str] | None = None
        """What `hpk addons install argo` printed."""

    def env(self) -> dict[str, str]:
        return self.install.env(HPK_HOME=str(self.home), KUBECONFIG=str(self.kubeconfig))

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.install.run(*argv, env=self.env(), timeout=timeout)

    def hpk(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("hpk", *args, timeout=timeout)

    def kubectl(self, *args: str) -> str:
        result = self.run(str(self.tools.binary("kubectl")), "--request-timeout=20s", *args)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def argo(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.tools.binary("argo")), "-n", NAMESPACE, *args, timeout=timeout)

    def submit(self, example: str, *args: str) -> str:
        """Submit examples/argo/<example>.yaml; returns the workflow's name."""
        submitted = self.argo("submit", str(self.examples / f"{example}.yaml"), "-o", "name", *args)
        assert submitted.returncode == 0, submitted.stderr
        return submitted.stdout.strip().splitlines()[-1]

    def workflow(self, name: str) -> dict[str, Any]:
        got = self.argo("get", name, "-o", "json")
        assert got.returncode == 0, got.stderr
        return dict(json.loads(got.stdout))

    def finished(self, name: str, timeout: float = 300) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            workflow = self.workflow(name)
            phase = workflow.get("status", {}).get("phase")
            return workflow if phase in ("Succeeded", "Failed", "Error") else None

        return dict(eventually(f"workflow {name} finished", done, timeout=timeout))

    def pods(self, workflow: str) -> dict[str, dict[str, Any]]:
        """The workflow's pods by their Argo node name (`wf[0].step`, `wf.A`, ...)."""
        out = self.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", f"workflows.argoproj.io/workflow={workflow}",
            "-o", "json",
        )  # fmt: skip
        return {
            pod["metadata"]["annotations"]["workflows.argoproj.io/node-name"]: pod
            for pod in json.loads(out)["items"]
        }

    def app_pods(self, app: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"app={app}", "-o", "json")
        return list(json.loads(out)["items"])

    def explain(self, name: str) -> str:
        """What to show when a workflow did not do what a test expected."""
        parts = [
            self.argo("get", name).stdout,
            self.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"),
            self.kubectl("get", "events", "-n", NAMESPACE),
        ]
        log = self.home / "control-plane" / "logs" / "hpk-kubelet.log"
        read = self.run("tail", "-n", "60", str(log))
        return "\n".join([*parts, read.stdout])


def sacct(*job_ids: str, fields: str) -> dict[str, list[str]]:
    """One `sacct -X -P` line per job: job ID -> the fields' values."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", f"JobID,{fields}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines() if line}


def job_state(job_id: str) -> str:
    found = sacct(job_id, fields="State").get(job_id)
    return found[0].split()[0] if found else ""


def job_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["annotations"][JOB_ID])


def argo_up(install: UserInstall) -> ArgoCluster:
    """The user's cluster up, with busybox imported and Argo installed."""
    argo = ArgoCluster(install)
    install.run("rm", "-rf", str(argo.home))
    up = argo.hpk("up", "--timeout=240")
    assert up.returncode == 0, f"hpk up failed:\n{up.stdout}\n{up.stderr}"
    busybox = ensure_test_images()["docker.io/library/busybox:latest"]
    imported = argo.hpk("images", "import", "docker.io/library/busybox:latest", str(busybox))
    assert imported.returncode == 0, imported.stderr
    started = time.monotonic()
    argo.installed = argo.hpk("addons", "install", "argo", timeout=400)
    print(argo.installed.stdout, f"install took {time.monotonic() - started:.1f} s")
    assert argo.installed.returncode == 0, argo.installed.stdout + argo.installed.stderr
    return argo


def argo_down(argo: ArgoCluster) -> None:
    argo.hpk("down")
    # The controller's and the server's jobs outlive the control plane, as a user's would.
    user = argo.install.user.pw_name
    out = subprocess.run(
        ["squeue", "-h", "-u", user, "-o", "%i %j"], capture_output=True, text=True, check=False
    ).stdout
    left = [line.split()[0] for line in out.splitlines() if f"/{NAMESPACE}/" in line]
    if left:
        subprocess.run(["scancel", *left], check=False)
    argo.install.run("rm", "-rf", str(argo.home))


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[ArgoCluster]:
    argo = ArgoCluster(user_install)
    try:
        argo = argo_up(user_install)
        yield argo
    finally:
        argo_down(argo)


def test_install_runs_the_controller_and_server_as_slurm_jobs(cluster: ArgoCluster) -> None:
    installed = cluster.installed
    assert installed is not None
    version = cluster.tools.pins["ARGO_VERSION"]
    jobs = {}
    for name in ("workflow-controller", "argo-server", "minio"):
        (pod,) = cluster.app_pods(name)
        assert pod["status"]["phase"] == "Running"
        job = jobs[name] = job_of(pod)
        assert f"pod {pod['metadata']['name']}: Slurm job {job}" in installed.stdout
        queue = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T %j"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert queue == ["RUNNING", f"hpk/{NAMESPACE}/{pod['metadata']['name']}"]
    images = cluster.hpk("images", "list").stdout
    for image in ("workflow-controller", "argoexec", "argocli"):
        assert f"quay.io/argoproj/{image}:v{version}" in images
    # A second install succeeds and leaves the running pods (and their jobs) alone.
    again = cluster.hpk("addons", "install", "argo", timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    for name, job in jobs.items():
        assert [job_of(pod) for pod in cluster.app_pods(name)] == [job]


def test_hello_world_succeeds_and_argo_logs_shows_it(cluster: ArgoCluster) -> None:
    submitted = cluster.argo(
        "submit", str(cluster.examples / "hello-world.yaml"), "--wait", "-o", "name"
    )
    assert submitted.returncode == 0, submitted.stderr
    name = submitted.stdout.split()[0]
    workflow = cluster.workflow(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    logs = cluster.argo("logs", name)
    assert "hello from a Slurm job" in logs.stdout, logs.stdout + logs.stderr
    (pod,) = cluster.pods(name).values()
    containers = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert set(containers) == {"main", "wait"}
    assert all(c["state"]["terminated"]["exitCode"] == 0 for c in containers.values())
    assert job_state(job_of(pod)) == "COMPLETED"


def test_steps_run_in_their_order(cluster: ArgoCluster) -> None:
    name = cluster.submit("steps")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    pods = cluster.pods(name)
    jobs = {node.rsplit(".", 1)[-1]: job_of(pod) for node, pod in pods.items()}
    assert sorted(jobs) == ["finish", "left", "prepare", "right"]
    times = sacct(*jobs.values(), fields="Start,End")
    start = {step: times[job][0] for step, job in jobs.items()}
    end = {step: times[job][1] for step, job in jobs.items()}
    assert end["prepare"] <= start["left"] and end["prepare"] <= start["right"], times
    assert max(end["left"], end["right"]) <= start["finish"], times


def test_dag_diamond_runs_in_dependency_order(cluster: ArgoCluster) -> None:
    name = cluster.submit("dag-diamond")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    jobs = {node.rsplit(".", 1)[-1]: job_of(pod) for node, pod in cluster.pods(name).items()}
    assert sorted(jobs) == ["A", "B", "C", "D"]
    times = sacct(*jobs.values(), fields="Start,End")
    start = {task: dt.datetime.fromisoformat(times[job][0]) for task, job in jobs.items()}
    end = {task: dt.datetime.fromisoformat(times[job][1]) for task, job in jobs.items()}
    assert start["B"] >= end["A"] and start["C"] >= end["A"], times
    assert start["D"] >= max(end["B"], end["C"]), times
    logs = cluster.argo("logs", name).stdout
    for task in "ABCD":
        assert f"task {task}" in logs, logs


def test_fan_out_steps_carry_their_own_cpu_counts(cluster: ArgoCluster) -> None:
    name = cluster.submit("fan-out")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    pods = cluster.pods(name).values()
    wanted = {"small": "1", "medium": "2", "large": "4"}
    assert len(pods) == len(wanted)
    logs = cluster.argo("logs", name).stdout
    for pod in pods:
        flags = pod["metadata"]["annotations"]["slurm.hpk.io/flags"]
        cpus = flags.removeprefix("--cpus-per-task=")
        assert cpus in wanted.values(), flags  # expanded by Argo, not left as a template
        shown = subprocess.run(
            ["scontrol", "show", "job", job_of(pod)], capture_output=True, text=True, check=True
        ).stdout
        assert f"NumCPUs={cpus} " in shown and f"CPUs/Task={cpus} " in shown, shown
    for shard, cpus in wanted.items():
        assert f"shard {shard} asked Slurm for {cpus} CPUs" in logs, logs


def test_an_output_parameter_reaches_the_next_step(cluster: ArgoCluster) -> None:
    name = cluster.submit("output-parameters")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    pods = cluster.pods(name)
    (produce,) = (pod for node, pod in pods.items() if node.endswith(".produce"))
    (consume,) = (pod for node, pod in pods.items() if node.endswith(".consume"))
    nodes = workflow["status"]["nodes"].values()
    (produced,) = (node for node in nodes if node.get("displayName") == "produce")
    value = produced["outputs"]["parameters"][0]["value"]
    assert json.loads(value)["note"] == "it's $5, `quoted` & done", produced
    log = cluster.kubectl("logs", "-n", NAMESPACE, consume["metadata"]["name"], "-c", "main")
    # The emissary's own log lines follow the step's output, as on any Kubernetes.
    assert log.splitlines()[0] == f"received: {value}", log
    assert job_of(produce) != job_of(consume)


def test_an_output_artifact_reaches_the_next_step_through_minio(cluster: ArgoCluster) -> None:
    name = cluster.submit("artifacts")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
    pods = cluster.pods(name)
    (produce,) = (pod for node, pod in pods.items() if node.endswith(".produce"))
    (consume,) = (pod for node, pod in pods.items() if node.endswith(".consume"))
    assert job_of(produce) != job_of(consume)
    log = cluster.kubectl("logs", "-n", NAMESPACE, consume["metadata"]["name"], "-c", "main")
    lines = log.splitlines()
    assert lines[0].startswith("written on "), log
    assert lines[1] == "numbers: 1000, sum 500500", log
    # The artifact went through MinIO: Argo recorded the repository it used (the one hpk
    # configured) and the object's key, and MinIO's drive in the user's hpk folder holds it
    # (an object is a folder of that name on MinIO's drive, under its bucket's folder).
    repository = workflow["status"]["artifactRepositoryRef"]
    assert repository["configMap"] == "artifact-repositories", repository
    bucket = repository["artifactRepository"]["s3"]["bucket"]
    assert bucket == "artifacts", repository
    nodes = workflow["status"]["nodes"].values()
    (produced,) = (node for node in nodes if node.get("displayName") == "produce")
    (artifact,) = (a for a in produced["outputs"]["artifacts"] if a["name"] == "results")
    stored = cluster.home / "artifacts" / "data" / bucket / artifact["s3"]["key"]
    assert cluster.run("test", "-e", str(stored)).returncode == 0, (stored, artifact)


def test_a_failing_step_is_retried_then_reported_with_its_exit_code(
    cluster: ArgoCluster,
) -> None:
    name = cluster.submit("retry")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Failed", cluster.explain(name)
    attempts = [node for node in workflow["status"]["nodes"].values() if node["type"] == "Pod"]
    assert len(attempts) == 3, attempts  # the first run and two retries
    for attempt in attempts:
        assert attempt["phase"] == "Failed"
        assert "exit code 3" in attempt["message"], attempt
    jobs = [job_of(pod) for pod in cluster.pods(name).values()]
    assert len(set(jobs)) == 3
    states = sacct(*jobs, fields="State,ExitCode")
    assert all(fields == ["FAILED", "3:0"] for fields in states.values()), states


def test_a_step_deadline_is_enforced_by_slurm(cluster: ArgoCluster) -> None:
    name = cluster.submit("deadline")
    pod = eventually(
        "the deadline step's job",
        lambda: next(
            (p for p in cluster.pods(name).values() if JOB_ID in p["metadata"]["annotations"]),
            None,
        ),
    )
    shown = subprocess.run(
        ["scontrol", "show", "job", job_of(pod)], capture_output=True, text=True, check=True
    ).stdout
    assert "TimeLimit=00:01:00" in shown, shown
    workflow = cluster.finished(name, timeout=240)
    assert workflow["status"]["phase"] == "Failed", cluster.explain(name)
    assert eventually("sacct TIMEOUT", lambda: job_state(job_of(pod)) == "TIMEOUT", timeout=60)
    (step,) = (n for n in workflow["status"]["nodes"].values() if n["type"] == "Pod")
    assert step["phase"] == "Failed", step
    # Slurm's TERM reached the step's emissary, which passes it on with kill(-1): in the
    # step's own PID namespace that reaches no other job's processes.
    for app in ("workflow-controller", "argo-server"):
        (other,) = cluster.app_pods(app)
        assert job_state(job_of(other)) == "RUNNING", app


def test_argo_delete_cancels_the_running_steps_jobs(cluster: ArgoCluster) -> None:
    name = cluster.submit("deadline")  # a step that sleeps for minutes

    def running_job() -> str | None:
        for pod in cluster.pods(name).values():
            job = pod["metadata"]["annotations"].get(JOB_ID)
            if job and pod.get("status", {}).get("phase") == "Running":
                return str(job)
        return None

    job = eventually("the step running", running_job, timeout=120)
    deleted = cluster.argo("delete", name)
    assert deleted.returncode == 0, deleted.stderr
    # The kubelet sends the job's script TERM (so that each container's exit is recorded),
    # which Slurm accounts as FAILED 15:0; a job killed after the grace period is CANCELLED.
    # Either way it ends long before its sleep of 600 s would.
    ended = eventually(
        f"job {job} ended",
        lambda: (
            job_state(job) in ("CANCELLED", "FAILED") and sacct(job, fields="State,Elapsed")[job]
        ),
        timeout=90,
    )
    hours, minutes, _ = (int(part) for part in ended[1].split(":"))
    assert hours == 0 and minutes < 2, ended
    eventually("the step's pod gone", lambda: not cluster.pods(name), timeout=90)


def test_a_second_users_argo_runs_beside_this_one(
    cluster: ArgoCluster, second_install: UserInstall
) -> None:
    # Each user's controller and server listen on their own pod's address, so the two
    # installations' ports (9090, 6060, 2746) cannot collide on a node.
    other = ArgoCluster(second_install)
    try:
        other = argo_up(second_install)
        for argo in (cluster, other):
            for app in ("workflow-controller", "argo-server"):
                (pod,) = argo.app_pods(app)
                assert pod["status"]["phase"] == "Running", pod["status"]
                assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_CIDR, pod["status"]
        mine, theirs = cluster.submit("hello-world"), other.submit("hello-world")
        assert cluster.finished(mine)["status"]["phase"] == "Succeeded", cluster.explain(mine)
        assert other.finished(theirs)["status"]["phase"] == "Succeeded", other.explain(theirs)
        users = sacct(
            *(job_of(pod) for pod in [*cluster.pods(mine).values(), *other.pods(theirs).values()]),
            fields="User",
        )
        assert {fields[0] for fields in users.values()} == {
            cluster.install.user.pw_name,
            second_install.user.pw_name,
        }, users
    finally:
        argo_down(other)


def test_the_controller_survives_a_restart_of_the_kubelet(cluster: ArgoCluster) -> None:
    def controller() -> dict[str, Any]:
        (pod,) = cluster.app_pods("workflow-controller")
        return pod

    before = controller()
    # The kubelet runs inside the control-plane job: restarting it is `hpk down` and `hpk up`,
    # while the controller's own Slurm job runs on.
    assert cluster.hpk("down").returncode == 0
    assert job_state(job_of(before)) == "RUNNING"
    up = cluster.hpk("up", "--timeout=240")
    assert up.returncode == 0, up.stdout + up.stderr
    after = controller()
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert job_of(after) == job_of(before)
    assert job_state(job_of(after)) == "RUNNING"
    name = cluster.submit("hello-world")
    workflow = cluster.finished(name)
    assert workflow["status"]["phase"] == "Succeeded", cluster.explain(name)
