"""Container lifecycle hooks run by the launcher inside the pod's Slurm job, end to end:
- a postStart exec hook writes a file to an emptyDir while the container, already running,
  waits for it (the hook runs beside the entrypoint, and the container counts as started
  only after it); a preStop exec hook writes to a hostPath volume, which outlives the pod,
  before TERM reaches the container, whose trap prints what it found into its log;
- an httpGet postStart hook reaches a server in a native sidecar (the sidecar's own exec
  postStart hook waits until its server answers, which holds the main container back);
- a postStart hook that fails kills the container: the pod fails with the hook's message in
  the container's state and a FailedPostStartHook Warning Event;
- a `sleep` preStop hook holds the deletion back for at least its seconds, and no longer
  than the grace period, after which TERM ends the container (143, not KILL's 137).

Each pod's Slurm job is checked in sacct. The pods use the node's network, so the test picks a
port free on this machine (the test bed's nodes run here too).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from kubelet_py.job.podfolder import parse_time
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-hooks"
JOB_ID = "slurm.hpk.io/job-id"
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVER_PORT = free_port()


def busybox(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def exec_hook(script: str) -> dict[str, Any]:
    return {"exec": {"command": ["sh", "-c", script]}}


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "containers": list(containers),
            **spec,
        },
    }


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def job_state(job_id: str) -> str:
    out = slurm("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State").strip()
    return out.splitlines()[-1].split()[0] if out else ""


def queue_state(job_id: str) -> str:
    """The job's state as slurmctld has it now (sacct, fed by slurmdbd, may lag behind)."""
    return slurm("squeue", "-h", "-j", job_id, "-o", "%T").strip()


def job_ended(job_id: str) -> str:
    """The job's final state in sacct, once it has one."""

    def ended() -> str:
        state = job_state(job_id)
        return "" if state in LIVE else state

    return str(eventually(f"job {job_id} ended in sacct", ended, timeout=60))


def main_status(found: dict[str, Any], kind: str = "containerStatuses") -> Any:
    return next(c for c in found["status"].get(kind, []) if c["name"] == "main")


def log_lines(folder: Path) -> list[str]:
    """A container's log in the pod folder (it outlives the pod), without times and streams."""
    return [line.split(" ", 2)[2] for line in (folder / "log").read_text().splitlines()]


def kept(cluster: PodCluster) -> Path:
    """A hostPath folder on the node (this machine) that outlives the pods."""
    return cluster.root / "kept"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE, serve_api=True) as running:
        running.apply(
            pod(
                "ordered",
                busybox(
                    "main",
                    # Running already: waits for the postStart hook's file, then for TERM.
                    "until [ -e /work/hooked ]; do sleep 0.1; done; "
                    'echo "main saw $(cat /work/hooked)"; '
                    'trap \'echo "TERM after $(cat /kept/pre-stop 2>/dev/null || echo nothing)"; '
                    "exit 0' TERM; "
                    "while :; do sleep 0.2; done",
                    lifecycle={
                        "postStart": exec_hook("sleep 2; echo postStart > /work/hooked"),
                        "preStop": exec_hook("sleep 2; echo preStop > /kept/pre-stop"),
                    },
                    volumeMounts=[
                        {"name": "work", "mountPath": "/work"},
                        {"name": "kept", "mountPath": "/kept"},
                    ],
                ),
                terminationGracePeriodSeconds=30,
                volumes=[
                    {"name": "work", "emptyDir": {}},
                    {
                        "name": "kept",
                        "hostPath": {"path": str(kept(running)), "type": "DirectoryOrCreate"},
                    },
                ],
            ),
            pod(
                "http-hook",
                busybox(
                    "main",
                    "until [ -e /www/hit ]; do sleep 0.1; done; cat /www/hit",
                    lifecycle={
                        "postStart": {
                            "httpGet": {
                                "port": SERVER_PORT,
                                "path": "/cgi-bin/hit?from=postStart",
                                "httpHeaders": [{"name": "X-Hook", "value": "postStart"}],
                            }
                        }
                    },
                    volumeMounts=[{"name": "www", "mountPath": "/www"}],
                ),
                initContainers=[
                    busybox(
                        "server",
                        # A CGI script that records who asked, and what.
                        "echo ok > /www/index.html && mkdir -p /www/cgi-bin && "
                        "printf '%s\\n' '#!/bin/sh' "
                        "'echo \"hit by $HTTP_USER_AGENT: $QUERY_STRING\" > /www/hit' "
                        "'printf \"Content-Type: text/plain\\r\\n\\r\\nok\\n\"' "
                        "> /www/cgi-bin/hit && chmod +x /www/cgi-bin/hit && "
                        f"exec httpd -f -p 127.0.0.1:{SERVER_PORT} -h /www",
                        restartPolicy="Always",
                        lifecycle={
                            # Started (so the main container starts) once it answers.
                            "postStart": exec_hook(
                                f"until wget -q -O /dev/null http://127.0.0.1:{SERVER_PORT}/; "
                                "do sleep 0.2; done"
                            )
                        },
                        volumeMounts=[{"name": "www", "mountPath": "/www"}],
                    )
                ],
                terminationGracePeriodSeconds=5,
                volumes=[{"name": "www", "emptyDir": {}}],
            ),
            pod(
                "failed-hook",
                busybox(
                    "main",
                    "echo up; exec sleep 600",
                    lifecycle={"postStart": exec_hook("echo no config >&2; exit 3")},
                ),
                terminationGracePeriodSeconds=5,
            ),
            pod(
                "sleepy",
                busybox(
                    "main",
                    "echo up; exec sleep 600",
                    lifecycle={"preStop": {"sleep": {"seconds": 6}}},
                ),
                terminationGracePeriodSeconds=30,
            ),
        )
        yield running


def test_post_start_runs_beside_the_container_and_pre_stop_before_term(
    cluster: PodCluster,
) -> None:
    def started() -> dict[str, Any] | None:
        found = cluster.pod("ordered") or {}
        status = found.get("status", {})
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        statuses = status.get("containerStatuses") or [{}]
        return found if statuses[0].get("started") else None

    found = eventually("ordered's container started", started, timeout=180)
    main = main_status(found)
    assert "running" in main["state"] and main["ready"] is True, main
    assert main["restartCount"] == 0, main
    folder = cluster.folder("ordered") / "containers" / "main"
    # The container ran before the hook had ended (it waited for the hook's file, which the
    # hook wrote 2 s after its start): `started` says when its command started, and was
    # written only once the hook had ended.
    eventually("main saw the hook's file", lambda: "main saw postStart" in log_lines(folder))
    command_started = parse_time((folder / "started").read_text())
    assert command_started is not None
    hooked = (cluster.folder("ordered") / "volumes" / "work" / "hooked").stat().st_mtime
    assert command_started.timestamp() < hooked, (command_started, hooked)
    assert (folder / "started").stat().st_mtime >= hooked
    job_id = found["metadata"]["annotations"][JOB_ID]
    assert queue_state(job_id) == "RUNNING"

    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "ordered", "--wait=false")
    eventually("pod ordered gone", lambda: cluster.pod("ordered") is None, timeout=60)
    # The hook wrote to the hostPath before TERM came: the trap found its file.
    assert (kept(cluster) / "pre-stop").read_text() == "preStop\n"
    assert log_lines(folder)[-1] == "TERM after preStop", log_lines(folder)
    assert (folder / "exit").read_text().startswith("0 ")
    # TERM reaches the job script, whose trap ends it with 143 (sacct: FAILED, not CANCELLED).
    assert job_ended(job_id) in ("FAILED", "CANCELLED")


def test_an_http_post_start_reaches_a_server_in_a_sidecar(cluster: PodCluster) -> None:
    found = cluster.phase("http-hook", "Succeeded", timeout=180)
    main = main_status(found)
    assert main["state"]["terminated"]["exitCode"] == 0, main
    assert main["restartCount"] == 0, main
    logs = cluster.kubectl("logs", "-n", NAMESPACE, "http-hook", "-c", "main")
    assert logs == "hit by kube-probe/hpk: from=postStart\n", logs
    # The sidecar started only once its own hook passed, so its server answered in time;
    # the main container started after it.
    folders = cluster.folder("http-hook") / "containers"
    sidecar = parse_time((folders / "server" / "started").read_text())
    started = parse_time((folders / "main" / "started").read_text())
    assert sidecar is not None and started is not None and sidecar < started
    assert job_ended(found["metadata"]["annotations"][JOB_ID]) == "COMPLETED"


def test_a_failing_post_start_kills_the_container_with_the_hooks_message(
    cluster: PodCluster,
) -> None:
    found = cluster.phase("failed-hook", "Failed", timeout=180)
    terminated = main_status(found)["state"]["terminated"]
    # TERM after the failed hook ended `sleep` (KILL 5 s later, had it ignored TERM).
    assert terminated["exitCode"] in (143, 137), terminated
    assert terminated["message"] == (
        'PostStartHook failed: exec ["sh", "-c", "echo no config >&2; exit 3"] exited with 3\n'
        "no config"
    ), terminated

    def warned() -> str:
        text = cluster.events("failed-hook")
        return text if "FailedPostStartHook" in text else ""

    events = eventually("a FailedPostStartHook Event", warned)
    assert "Warning" in events and "container main: PostStartHook failed" in events, events
    folder = cluster.folder("failed-hook") / "containers" / "main"
    assert "hpk: PostStartHook failed: " in (folder / "log").read_text()
    assert job_ended(found["metadata"]["annotations"][JOB_ID]) == "FAILED"


def test_a_sleep_pre_stop_holds_the_deletion_back_within_the_grace_period(
    cluster: PodCluster,
) -> None:
    found = cluster.phase("sleepy", "Running", timeout=180)
    folder = cluster.folder("sleepy") / "containers" / "main"
    eventually(
        "sleepy's container up", lambda: (folder / "log").exists() and "up" in log_lines(folder)
    )
    job_id = found["metadata"]["annotations"][JOB_ID]
    deleted = time.time()
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "sleepy", "--wait=false")
    state = job_ended(job_id)
    took = time.monotonic() - began
    eventually("pod sleepy gone", lambda: cluster.pod("sleepy") is None, timeout=60)
    print(f"job {job_id} ended {state} {took:.1f} s after the delete")
    # TERM came once the 6 s sleep was over, and ended `sleep` (143): no KILL at the end of
    # the 30 s grace period.
    exit_code, _, at = (folder / "exit").read_text().strip().partition(" ")
    assert exit_code == "143", exit_code
    ended_at = parse_time(at)
    assert ended_at is not None
    assert ended_at.timestamp() - deleted >= 6.0, (deleted, ended_at)
    assert 6.0 <= took < 25.0, took
    assert state in ("FAILED", "CANCELLED"), state
