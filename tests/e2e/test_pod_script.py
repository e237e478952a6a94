"""Rendered pod jobs, run by the real Slurm test bed with the real Apptainer and test images.

Each test renders a pod with kubelet_py.pod.render, writes the job script and env files into a pod
folder the way the kubelet does, submits with the rendered sbatch arguments (argv, no shell),
and checks what the job contract promises: the stamped log, the markers, the exit codes Slurm
records, the options Slurm applied, and the environment the process sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.bed import Testbed, cgroups_usable
from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from kubelet_py.job.clock import rfc3339
from kubelet_py.pod.render import RenderSettings, render_pod
from tests.e2e.conftest import UserInstall
from tests.e2e.slurm import Accounting, wait_finished

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BUSYBOX = "docker.io/library/busybox:latest"
PYTHON = "docker.io/library/python:3.11"
UID = "7d1e4c62-0b3a-4f5e-9a8b-c0ffee000001"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"

Pod = dict[str, Any]


def pod(name: str, *containers: Pod, **spec: Any) -> Pod:
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": UID,
            "annotations": spec.pop("annotations", {}),
        },
        "spec": {"restartPolicy": "Never", "containers": list(containers), **spec},
    }


def shell(name: str, script: str, **fields: Any) -> Pod:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def python(name: str, code: str, **fields: Any) -> Pod:
    return {"name": name, "image": "python:3.11", "command": ["python3", "-c", code], **fields}


@dataclass(frozen=True)
class RunningPod:
    """A pod's folder and its Slurm job, read as the kubelet would read them."""

    folder: Path
    job_id: str

    def marker(self, container: str, name: str) -> str:
        return (self.folder / "containers" / container / name).read_text()

    def started(self, container: str) -> str:
        text = self.marker(container, "started")
        assert re.fullmatch(f"{STAMP}\n", text), text
        return text.strip()

    def exit(self, container: str) -> tuple[int, str]:
        text = self.marker(container, "exit")
        assert re.fullmatch(rf"\d+ {STAMP}\n", text), text
        code, stamp = text.split()
        return int(code), stamp

    def log(self, container: str) -> list[tuple[str, str]]:
        """(stream, line) per entry; every entry's time must be well formed."""
        entries = []
        path = self.folder / "containers" / container / "log"
        for raw in path.read_bytes().decode().split("\n")[:-1]:
            stamp, stream, line = raw.split(" ", 2)
            assert re.fullmatch(STAMP, stamp), raw
            entries.append((stream, line))
        return entries

    def stdout(self, container: str) -> list[str]:
        return [line for stream, line in self.log(container) if stream == "stdout"]

    def slurm_output(self) -> str:
        path = self.folder / "slurm.out"
        return path.read_text(errors="replace") if path.exists() else "(no slurm.out)"

    def wait(self, timeout: float = 240) -> Accounting:
        return wait_finished(self.job_id, timeout=timeout)

    def wait_ended(self, timeout: float = 120) -> Accounting:
        """Wait until every process of the job is gone. sacct says CANCELLED as soon as the job
        is cancelled, while Slurm still waits KillWait before its KILL."""
        acct = self.wait()
        wait_for(lambda: self.squeue_state() != "COMPLETING", timeout=timeout, what="the job's end")
        return acct

    def squeue_state(self) -> str:
        result = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", self.job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        return result.stdout.strip()

    def scontrol(self) -> dict[str, str]:
        result = subprocess.run(
            ["scontrol", "show", "job", "-o", self.job_id],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))


@pytest.fixture(scope="module")
def images(testbed: Testbed) -> dict[str, Path]:
    """The test images' SIF files, which every user may read."""
    return ensure_test_images()


@pytest.fixture
def pods(job_dir: Path, toolchain: Toolchain, images: dict[str, Path]) -> Iterator[PodSubmitter]:
    submitter = PodSubmitter(root=job_dir, apptainer=toolchain.binary("apptainer"), images=images)
    yield submitter
    for submitted in submitter.submitted:
        subprocess.run(["scancel", submitted.job_id], check=False, timeout=30)


@dataclass
class PodSubmitter:
    """Renders pods and submits them as the kubelet will: files first, then sbatch argv."""

    root: Path
    apptainer: Path
    images: dict[str, Path]

    def __post_init__(self) -> None:
        self.submitted: list[RunningPod] = []

    def submit(
        self,
        the_pod: Pod,
        *,
        folder: Path | None = None,
        images: dict[str, Path] | None = None,
        user: UserInstall | None = None,
    ) -> RunningPod:
        meta = the_pod["metadata"]
        folder = folder or self.root / "pods" / meta["namespace"] / meta["name"]
        settings = RenderSettings(
            pod_dir=folder,
            apptainer=self.apptainer,
            images=self.images if images is None else images,
            python=user.python if user else Path(sys.executable),
            partition="batch",
        )
        rendered = render_pod(the_pod, settings)
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
        script = folder / "job.sh"
        script.write_text(rendered.script)
        script.chmod(0o700)
        for name, content in rendered.files.items():
            path = folder / name
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_text(content)
            path.chmod(0o600)
        if user:
            subprocess.run(["chown", "-R", user.user.pw_name, str(folder)], check=True)
            result = user.run("sbatch", *rendered.sbatch_args, timeout=60)
        else:
            result = subprocess.run(
                ["sbatch", *rendered.sbatch_args],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job_id = result.stdout.strip().split(";")[0]
        assert job_id.isdigit(), result.stdout
        (folder / "job-id").write_text(f"{job_id}\n")
        submitted = RunningPod(folder=folder, job_id=job_id)
        self.submitted.append(submitted)
        return submitted


def wait_for(condition: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_echo_pod_in_a_weird_folder_logs_a_stamped_line_and_exits_0(
    pods: PodSubmitter, job_dir: Path
) -> None:
    folder = job_dir / 'it\'s a "pod"; folder' / "default" / "echo"
    before = rfc3339(time.time_ns())
    running = pods.submit(pod("echo", shell("main", "echo hello world")), folder=folder)
    job = running.scontrol()
    assert job["JobName"] == "hpk/default/echo"
    assert job["Partition"] == "batch"
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    assert running.log("main") == [("stdout", "hello world")]
    code, ended = running.exit("main")
    assert code == 0
    assert before < running.started("main") <= ended
    assert (folder / "slurm.out").exists()


def test_job_identity_in_scontrol(pods: PodSubmitter) -> None:
    running = pods.submit(pod("identity", shell("main", "true")))
    job = running.scontrol()
    assert job["JobName"] == "hpk/default/identity"
    assert job["Comment"] == f"hpk-uid={UID}"
    assert job["WorkDir"] == str(running.folder)
    assert job["StdOut"] == job["StdErr"] == str(running.folder / "slurm.out")
    assert job["Requeue"] == "0"
    assert running.wait().state == "COMPLETED", running.slurm_output()


ORDER_POD = pod(
    "order",
    shell(
        "ping",
        "touch /shared/ping; i=0; until [ -e /shared/pong ]; do"
        " i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done; cat /shared/order",
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
    ),
    shell(
        "pong",
        "i=0; until [ -e /shared/ping ]; do"
        " i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done; touch /shared/pong",
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
    ),
    initContainers=[
        shell(
            "first",
            "sleep 1; echo first > /shared/order",
            volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
        ),
        shell(
            "second",
            "echo second >> /shared/order",
            volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
        ),
    ],
    volumes=[{"name": "shared", "emptyDir": {}}],
)


def test_init_containers_run_in_order_before_the_main_ones(pods: PodSubmitter) -> None:
    running = pods.submit(ORDER_POD)
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    first_end = running.exit("first")[1]
    second_end = running.exit("second")[1]
    assert running.started("first") < first_end <= running.started("second")
    assert second_end <= running.started("ping")
    assert second_end <= running.started("pong")
    assert running.stdout("ping") == ["first", "second"]


def test_main_containers_run_side_by_side_and_share_an_empty_dir(pods: PodSubmitter) -> None:
    # ping and pong wait for each other's file: they both end only if they ran together.
    running = pods.submit(ORDER_POD)
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    assert running.exit("ping")[0] == running.exit("pong")[0] == 0
    last_start = max(running.started("ping"), running.started("pong"))
    first_end = min(running.exit("ping")[1], running.exit("pong")[1])
    assert last_start < first_end
    assert (running.folder / "volumes" / "shared" / "pong").exists()


def test_a_failing_container_fails_the_job_with_its_code(pods: PodSubmitter) -> None:
    running = pods.submit(
        pod(
            "fails",
            shell("ok", "echo fine"),
            shell("bad", "echo about to fail >&2; exit 3"),
        )
    )
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("FAILED", "3:0"), running.slurm_output()
    assert running.exit("bad")[0] == 3
    assert running.exit("ok")[0] == 0
    assert running.log("bad") == [("stderr", "about to fail")]


def test_a_failing_init_container_ends_the_job_before_the_main_ones(pods: PodSubmitter) -> None:
    running = pods.submit(
        pod(
            "init-fails",
            shell("main", "echo never"),
            initContainers=[shell("setup", "exit 4"), shell("later", "echo never")],
        )
    )
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("FAILED", "4:0"), running.slurm_output()
    assert running.exit("setup")[0] == 4
    assert not (running.folder / "containers" / "later").exists()
    assert not (running.folder / "containers" / "main").exists()


def test_scancel_records_each_containers_end(pods: PodSubmitter, testbed: Testbed) -> None:
    running = pods.submit(
        pod(
            "cancelled",
            # Ends with its own code when asked to stop.
            shell("graceful", "trap 'echo bye; exit 0' TERM; echo up; sleep 300 & wait"),
            # Dies of the TERM.
            shell("plain", "echo up; sleep 300"),
            # Ignores TERM, so only Slurm's KILL (after KillWait) ends it and its launcher.
            shell("stubborn", "trap '' TERM; echo up; sleep 300 & wait; sleep 300"),
        )
    )
    names = ("graceful", "plain", "stubborn")
    wait_for(
        lambda: all(_has_log(running, name) and running.stdout(name) == ["up"] for name in names),
        timeout=120,
        what="the containers to start",
    )
    cancelled_at = rfc3339(time.time_ns())
    subprocess.run(["scancel", running.job_id], check=True, timeout=30)
    acct = running.wait_ended(timeout=testbed.settings.kill_wait_s + 60)
    assert acct.state == "CANCELLED", acct
    assert running.exit("graceful")[0] == 0, running.slurm_output()
    assert running.stdout("graceful") == ["up", "bye"]
    assert running.exit("plain")[0] == 143
    assert running.exit("stubborn")[0] == 137  # the trap's mark: nothing outlived the KILL
    assert all(running.exit(name)[1] >= cancelled_at for name in names)


def _has_log(running: RunningPod, name: str) -> bool:
    return (running.folder / "containers" / name / "log").exists()


def test_scancel_during_an_init_container(pods: PodSubmitter) -> None:
    running = pods.submit(
        pod(
            "cancel-init", shell("main", "echo never"), initContainers=[shell("setup", "sleep 300")]
        )
    )
    wait_for(
        (running.folder / "containers" / "setup" / "started").exists,
        timeout=120,
        what="the init container to start",
    )
    time.sleep(1)  # let Apptainer start the container process
    subprocess.run(["scancel", running.job_id], check=True, timeout=30)
    assert running.wait_ended().state == "CANCELLED"
    assert running.exit("setup")[0] == 143
    assert not (running.folder / "containers" / "main").exists()


def test_requests_become_cpus_memory_and_time_limit(pods: PodSubmitter) -> None:
    running = pods.submit(
        pod(
            "resources",
            python(
                "count",
                "import os; print(len(os.sched_getaffinity(0)))",
                resources={"requests": {"cpu": "1500m", "memory": "100Mi"}},
            ),
            shell("idle", "true", resources={"limits": {"cpu": "500m", "memory": "28Mi"}}),
            activeDeadlineSeconds=90,
        )
    )
    job = running.scontrol()
    assert job["MinMemoryNode"] == "128M"  # 100Mi + 28Mi
    assert job["MinCPUsNode"] == "2"  # 1.5 + 0.5 cores
    assert job["CPUs/Task"] == "2"
    assert job["TimeLimit"] == "00:02:00"  # 90 s, rounded up to whole minutes
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    assert "cpu=2" in acct.alloc_tres and "mem=128M" in acct.alloc_tres
    if cgroups_usable():
        assert running.stdout("count") == ["2"]  # the cgroup's cpuset holds the two CPUs


@pytest.mark.skipif(not cgroups_usable(), reason="memory is enforced by cgroups only")
def test_memory_request_is_enforced(pods: PodSubmitter) -> None:
    hog = "data = bytearray(400 * 1024 * 1024); print(len(data))"
    running = pods.submit(
        pod("hog", python("hog", hog, resources={"requests": {"memory": "64Mi"}}))
    )
    acct = running.wait()
    assert acct.state == "OUT_OF_MEMORY", (acct, running.slurm_output())
    assert running.exit("hog")[0] == 137
    assert running.stdout("hog") == []


def test_flags_annotation_moves_a_gpu_pod_to_the_gpu_partition(
    pods: PodSubmitter, testbed: Testbed
) -> None:
    running = pods.submit(
        pod(
            "gpu",
            shell("main", "echo gpu", resources={"limits": {"nvidia.com/gpu": "1"}}),
            annotations={"slurm.hpk.io/flags": "-p gpu --time=5"},
        )
    )
    job = running.scontrol()
    assert job["Partition"] == "gpu"
    assert job["TimeLimit"] == "00:05:00"
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    assert acct.node_list in testbed.settings.gpu_nodes
    assert "gres/gpu=1" in acct.alloc_tres
    assert running.stdout("main") == ["gpu"]


TRICKY = {
    "QUOTES": 'it\'s "quoted"',
    "NEWLINES": "line one\nline two\n",
    "DOLLARS": "$HOME ${PATH} $(not-a-ref",
    "BACKTICKS": "`id` $(id) \\ \\n",
    "JSON": '{"a": [1, "two"], "b": {"c": null}}',
    "UNICODE": "héllo wörld ✓ 日本 🚀",
    "SPACES": "  leading and trailing  ",
    "EMPTY": "",
}
PRINT_ENV = (
    "import json, os, sys;"
    " names = sys.argv[1:];"
    " print(json.dumps({n: os.environ.get(n) for n in names}))"
)


def env_pod(name: str) -> Pod:
    return pod(
        name,
        {
            "name": "main",
            "image": "python:3.11",
            "command": ["python3", "-c", PRINT_ENV],
            "args": [*TRICKY, "BASE", "DERIVED", "ESCAPED", "HPK_TEST_LEAK"],
            "env": [
                *({"name": key, "value": value} for key, value in TRICKY.items()),
                {"name": "BASE", "value": "/data"},
                {"name": "DERIVED", "value": "$(BASE)/in"},
                {"name": "ESCAPED", "value": "$$(BASE) stays"},
            ],
        },
    )


EXPECTED_ENV = {
    **TRICKY,
    "BASE": "/data",
    "DERIVED": "/data/in",
    "ESCAPED": "$(BASE) stays",
    "HPK_TEST_LEAK": None,  # the kubelet's environment does not reach the container
}


def test_env_values_reach_the_process_byte_for_byte(
    pods: PodSubmitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPK_TEST_LEAK", "from the submitting process")
    running = pods.submit(env_pod("env"))
    script = (running.folder / "job.sh").read_text()
    for value in TRICKY.values():
        assert not value.strip() or value not in script
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    [line] = running.stdout("main")
    assert json.loads(line) == EXPECTED_ENV
    assert (running.folder / "env" / "main").stat().st_mode & 0o777 == 0o600


def test_an_unreadable_image_exits_125(pods: PodSubmitter, job_dir: Path) -> None:
    missing = {BUSYBOX: job_dir / "missing.sif"}
    running = pods.submit(pod("no-image", shell("main", "true")), images=missing)
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("FAILED", "125:0"), running.slurm_output()
    assert running.exit("main")[0] == 125
    [(stream, line)] = running.log("main")
    assert stream == "stderr" and "cannot read the image file" in line


@pytest.mark.timeout(900)  # the first use installs hpk for the user
def test_an_ordinary_user_runs_a_pod(
    pods: PodSubmitter, user_install: UserInstall, job_dir: Path
) -> None:
    folder = job_dir / "pods" / "default" / "as-user"
    the_pod = env_pod("as-user")
    the_pod["spec"]["containers"].append(python("whoami", "import os; print(os.getuid())"))
    for container in the_pod["spec"]["containers"]:
        # Without FUSE each container unpacks its image (--unsquash), in the job's memory.
        container["resources"] = {"requests": {"memory": "384Mi"}}
    running = pods.submit(the_pod, folder=folder, user=user_install)
    acct = running.wait()
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), running.slurm_output()
    assert running.stdout("whoami") == [str(user_install.user.pw_uid)]
    assert json.loads(running.stdout("main")[0]) == EXPECTED_ENV
    assert os.stat(folder / "containers" / "main" / "exit").st_uid == user_install.user.pw_uid
