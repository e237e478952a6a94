"""From Slurm's view of a job and its containers' markers to the pod status users see.

One test per Slurm state (and per way a container can end), each checking what `kubectl get
pod` and `kubectl describe pod` would show: the phase, the reason, the conditions and each
container's state and exit code.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.job.podfolder import HookFailure
from kubelet_py.loops.watcher import JobView
from kubelet_py.pod.status import ContainerMarkers, pod_status, read_markers

T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
ADDRESSES = {"n1": "127.0.0.1", "n4": "10.0.0.4"}

SPEC: dict[str, Any] = {"containers": [{"name": "main", "image": "docker://busybox:1.36"}]}
SPEC_WITH_INIT: dict[str, Any] = {
    "initContainers": [
        {"name": "fetch", "image": "docker://busybox:1.36"},
        {"name": "prepare", "image": "docker://busybox:1.36"},
    ],
    "containers": [
        {"name": "main", "image": "docker://python:3.12"},
        {"name": "sidecar", "image": "docker://busybox:1.36"},
    ],
}


def job(state: str, **fields: Any) -> JobView:
    started = state not in ("PENDING", "CONFIGURING", "REQUEUED")
    final = fields.pop("final", state in FINALS)
    values: dict[str, Any] = {
        "job_id": "42",
        "state": state,
        "reason": None,
        "nodes": "n1" if started else "",
        "batch_host": "n1" if started else None,
        "start_time": T0 if started else None,
        "end_time": T0 + timedelta(minutes=5) if final else None,
        "exit_code": 0,
        "exit_signal": 0,
        "restarts": 0,
        "cancelled_by": None,
        "final": final,
        "source": "squeue",
    }
    values.update(fields)
    return JobView(**values)


FINALS = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "LOST",
}


def ran(start: int = 1, end: int | None = None, code: int | None = None) -> ContainerMarkers:
    """Markers of a container that started `start` s after the job and maybe ended."""
    return ContainerMarkers(
        started_at=T0 + timedelta(seconds=start),
        exit_code=code,
        finished_at=None if end is None else T0 + timedelta(seconds=end),
    )


def container(status: dict[str, Any], name: str, kind: str = "containerStatuses") -> Any:
    return next(c for c in status[kind] if c["name"] == name)


def condition(status: dict[str, Any], kind: str) -> Any:
    return next(c for c in status["conditions"] if c["type"] == kind)


def terminated(status: dict[str, Any], name: str, kind: str = "containerStatuses") -> Any:
    return container(status, name, kind)["state"]["terminated"]


# --- before and while Slurm runs the job ------------------------------------------------


def test_a_job_slurm_does_not_list_yet_leaves_the_pod_pending() -> None:
    status = pod_status(SPEC, None, {})
    assert status["phase"] == "Pending"
    scheduled = condition(status, "PodScheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "SlurmPending")
    assert "not list the job yet" in scheduled["message"]
    assert container(status, "main")["state"]["waiting"]["reason"] == "SlurmPending"


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("Priority", "higher priority"),
        ("Resources", "resources"),
        ("JobHeldUser", "scontrol release 42"),
        ("BeginTime", "(--begin) has not come yet"),
        ("QOSMaxJobsPerUserLimit", "QOS"),
        ("PartitionConfig", "will not start unless the request or the partition changes"),
        ("ReqNodeNotAvail, UnavailableNodes:n[1-3]", "not available"),
    ],
)
def test_a_pending_job_shows_slurms_reason(reason: str, words: str) -> None:
    status = pod_status(SPEC, job("PENDING", reason=reason), {})
    assert status["phase"] == "Pending"
    scheduled = condition(status, "PodScheduled")
    assert scheduled["status"] == "False"
    assert f"Slurm job 42 is pending ({reason})" in scheduled["message"]
    assert words in scheduled["message"]
    waiting = container(status, "main")["state"]["waiting"]
    assert waiting == {"reason": "SlurmPending", "message": scheduled["message"]}
    assert "startTime" not in status and "hostIP" not in status


def test_a_pending_pod_with_init_containers_waits_in_every_container() -> None:
    status = pod_status(SPEC_WITH_INIT, job("PENDING", reason="Priority"), {})
    assert [c["state"]["waiting"]["reason"] for c in status["initContainerStatuses"]] == [
        "SlurmPending",
        "SlurmPending",
    ]
    initialized = condition(status, "Initialized")
    assert initialized["status"] == "False"
    assert initialized["message"] == "containers with incomplete status: [fetch prepare]"


def test_a_running_job_makes_the_pod_running_with_start_time_and_host_ip() -> None:
    status = pod_status(SPEC, job("RUNNING"), {"main": ran(2)}, node_addresses=ADDRESSES)
    assert status["phase"] == "Running"
    assert status["startTime"] == "2026-11-24T10:00:00Z"
    assert status["hostIP"] == "127.0.0.1"
    assert status["podIP"] == "127.0.0.1"
    assert status["hostIPs"] == [{"ip": "127.0.0.1"}]
    main = container(status, "main")
    assert main["state"] == {"running": {"startedAt": "2026-11-24T10:00:02Z"}}
    assert main["ready"] is True and main["started"] is True
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodScheduled": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    assert condition(status, "Ready")["lastTransitionTime"] == "2026-11-24T10:00:02Z"


def test_a_running_job_whose_container_has_not_started_yet() -> None:
    status = pod_status(SPEC, job("RUNNING"), {})
    assert status["phase"] == "Running"
    assert container(status, "main")["state"]["waiting"]["reason"] == "ContainerCreating"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    assert ready["message"] == "containers with unready status: [main]"


def test_a_host_name_is_not_given_as_host_ip() -> None:
    status = pod_status(SPEC, job("RUNNING"), {}, node_addresses={"n1": "node1.cluster"})
    assert "hostIP" not in status and "podIP" not in status


def test_init_containers_run_in_order_before_the_main_containers() -> None:
    markers = {"fetch": ran(1, 3, 0), "prepare": ran(4)}
    status = pod_status(SPEC_WITH_INIT, job("RUNNING"), markers)
    assert status["phase"] == "Running"
    fetch = terminated(status, "fetch", "initContainerStatuses")
    assert (fetch["exitCode"], fetch["reason"]) == (0, "Completed")
    assert fetch["finishedAt"] == "2026-11-24T10:00:03Z"
    prepare = container(status, "prepare", "initContainerStatuses")
    assert prepare["state"] == {"running": {"startedAt": "2026-11-24T10:00:04Z"}}
    assert prepare["ready"] is False
    assert container(status, "main")["state"]["waiting"]["reason"] == "PodInitializing"
    initialized = condition(status, "Initialized")
    assert initialized["status"] == "False"
    assert initialized["message"] == "containers with incomplete status: [prepare]"


def test_after_the_init_containers_the_main_containers_run_side_by_side() -> None:
    markers = {
        "fetch": ran(1, 2, 0),
        "prepare": ran(2, 3, 0),
        "main": ran(4),
        "sidecar": ran(4),
    }
    status = pod_status(SPEC_WITH_INIT, job("RUNNING"), markers)
    initialized = condition(status, "Initialized")
    assert initialized["status"] == "True"
    assert initialized["lastTransitionTime"] == "2026-11-24T10:00:03Z"
    assert condition(status, "Ready")["status"] == "True"
    assert all(c["ready"] for c in status["containerStatuses"])


def test_a_job_that_is_completing_is_still_running() -> None:
    status = pod_status(SPEC, job("COMPLETING"), {"main": ran(1, 9, 0)})
    assert status["phase"] == "Running"
    assert terminated(status, "main")["reason"] == "Completed"
    assert condition(status, "Ready")["status"] == "False"


def test_every_condition_clears_the_reason_and_message_an_earlier_status_gave_it() -> None:
    # The status is written as a strategic merge patch, which merges conditions by type: a
    # key left out would keep the "pending (JobHeldUser)" of the pod's Pending status.
    held = pod_status(SPEC, job("PENDING", reason="JobHeldUser"), {})
    assert "JobHeldUser" in condition(held, "PodScheduled")["message"]
    done = pod_status(SPEC, job("COMPLETED"), {"main": ran(1, 2, 0)})
    for found in done["conditions"]:
        assert "reason" in found and "message" in found, found
    scheduled = condition(done, "PodScheduled")
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == ("True", None, None)
    running = pod_status(SPEC, job("RUNNING"), {"main": ran(1)})
    assert condition(running, "Ready")["reason"] is None


def test_a_configuring_job_is_pending() -> None:
    status = pod_status(SPEC, job("CONFIGURING", batch_host="n1"), {})
    assert status["phase"] == "Pending"
    assert "waits for them to be ready" in condition(status, "PodScheduled")["message"]


# --- how a job ends ---------------------------------------------------------------------


def test_completed_means_succeeded_with_each_containers_exit() -> None:
    markers = {"fetch": ran(1, 2, 0), "prepare": ran(2, 3, 0), "main": ran(4, 8, 0)}
    markers["sidecar"] = ran(4, 9, 0)
    status = pod_status(SPEC_WITH_INIT, job("COMPLETED"), markers, node_addresses=ADDRESSES)
    assert status["phase"] == "Succeeded"
    assert "reason" not in status
    assert status["message"] == "Slurm job 42 completed"
    main = terminated(status, "main")
    assert main == {
        "exitCode": 0,
        "reason": "Completed",
        "startedAt": "2026-11-24T10:00:04Z",
        "finishedAt": "2026-11-24T10:00:08Z",
    }
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")
    assert status["hostIP"] == "127.0.0.1"
    assert status["startTime"] == "2026-11-24T10:00:00Z"


def test_failed_means_failed_with_the_real_exit_codes() -> None:
    markers = {"fetch": ran(1, 2, 0), "prepare": ran(2, 3, 0)}
    markers |= {"main": ran(4, 8, 3), "sidecar": ran(4, 9, 0)}
    view = job("FAILED", reason="NonZeroExitCode", exit_code=3)
    status = pod_status(SPEC_WITH_INIT, view, markers)
    assert status["phase"] == "Failed"
    assert "reason" not in status
    assert status["message"] == "Slurm job 42 failed (exit code 3:0)"
    assert (terminated(status, "main")["exitCode"], terminated(status, "main")["reason"]) == (
        3,
        "Error",
    )
    assert terminated(status, "sidecar")["exitCode"] == 0
    assert condition(status, "Initialized")["status"] == "True"


def test_a_failed_init_container_fails_the_pod_and_the_rest_never_start() -> None:
    markers = {"fetch": ran(1, 2, 7)}
    status = pod_status(SPEC_WITH_INIT, job("FAILED", exit_code=7), markers)
    assert status["phase"] == "Failed"
    fetch = terminated(status, "fetch", "initContainerStatuses")
    assert (fetch["exitCode"], fetch["reason"]) == (7, "Error")
    prepare = terminated(status, "prepare", "initContainerStatuses")
    assert prepare["reason"] == "ContainerCannotRun"
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (7, "ContainerCannotRun")
    assert main["message"] == "the container never started: init container fetch failed"
    assert main["finishedAt"] == "2026-11-24T10:05:00Z"
    initialized = condition(status, "Initialized")
    assert initialized["status"] == "False"
    assert initialized["message"] == "containers with incomplete status: [fetch prepare]"


def test_an_image_that_cannot_run_is_container_cannot_run() -> None:
    status = pod_status(SPEC, job("FAILED", exit_code=125), {"main": ran(1, 1, 125)})
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (125, "ContainerCannotRun")


def test_a_job_cancelled_outside_kubernetes_fails_the_pod_with_a_reason() -> None:
    view = job("CANCELLED", cancelled_by="0", exit_signal=15)
    status = pod_status(SPEC, view, {"main": ran(1, 30, 143)})
    assert status["phase"] == "Failed"
    assert status["reason"] == "Cancelled"
    assert status["message"] == "Slurm job 42 was cancelled outside Kubernetes by UID 0"
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (143, "Cancelled")


def test_a_job_cancelled_while_pending_never_ran() -> None:
    view = job("CANCELLED", reason="Priority", batch_host=None, nodes="")
    status = pod_status(SPEC, view, {}, node_addresses=ADDRESSES)
    assert status["phase"] == "Failed"
    assert status["reason"] == "Cancelled"
    assert "startTime" not in status and "hostIP" not in status
    assert condition(status, "PodScheduled")["status"] == "False"
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (143, "Cancelled")
    assert main["message"].startswith("the container never started")


def test_a_time_limit_is_deadline_exceeded() -> None:
    status = pod_status(
        SPEC_WITH_INIT,
        job("TIMEOUT", reason="TimeLimit"),
        {
            "fetch": ran(1, 2, 0),
            "prepare": ran(2, 3, 0),
            "main": ran(4, 60, 143),
            "sidecar": ran(4),
        },
    )
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert status["message"] == "Slurm job 42 reached its time limit"
    assert terminated(status, "main")["reason"] == "DeadlineExceeded"
    sidecar = terminated(status, "sidecar")
    assert (sidecar["exitCode"], sidecar["reason"]) == (143, "DeadlineExceeded")
    assert sidecar["startedAt"] == "2026-11-24T10:00:04Z"
    assert sidecar["finishedAt"] == "2026-11-24T10:05:00Z", "the job's end, as nothing else"
    assert sidecar["message"].startswith("the container was running when")


def test_out_of_memory_is_oom_killed_with_exit_code_137() -> None:
    spec = {"containers": [{"name": "main", "image": "a"}, {"name": "helper", "image": "b"}]}
    view = job("OUT_OF_MEMORY", reason="OutOfMemory", exit_signal=125)
    status = pod_status(spec, view, {"main": ran(1, 5, 137), "helper": ran(1, 5, 143)})
    assert (status["phase"], status["reason"]) == ("Failed", "OOMKilled")
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (137, "OOMKilled")
    assert terminated(status, "helper")["reason"] == "Error", "the trap stopped it, not the OOM"


def test_out_of_memory_before_the_marker_was_written() -> None:
    status = pod_status(SPEC, job("OUT_OF_MEMORY", exit_signal=125), {"main": ran(1)})
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (137, "OOMKilled")


def test_a_failed_node_is_node_lost() -> None:
    status = pod_status(SPEC, job("NODE_FAIL", reason="NodeDown"), {"main": ran(1)})
    assert (status["phase"], status["reason"]) == ("Failed", "NodeLost")
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (137, "NodeLost")


@pytest.mark.parametrize(
    ("state", "pod_reason", "container_reason", "code"),
    [
        ("CANCELLED", "Cancelled", "Cancelled", 143),
        ("TIMEOUT", "DeadlineExceeded", "DeadlineExceeded", 143),
        ("DEADLINE", "DeadlineExceeded", "DeadlineExceeded", 143),
        ("OUT_OF_MEMORY", "OOMKilled", "OOMKilled", 137),
        ("NODE_FAIL", "NodeLost", "NodeLost", 137),
        ("BOOT_FAIL", "NodeLost", "NodeLost", 137),
        ("PREEMPTED", "Preempted", "Preempted", 143),
        ("LOST", "SlurmJobLost", "ContainerStatusUnknown", 137),
    ],
)
def test_each_final_state_stops_a_running_container_with_its_reason(
    state: str, pod_reason: str, container_reason: str, code: int
) -> None:
    """The table in docs/kubelet.md: a container still running when the job ended."""
    status = pod_status(SPEC, job(state), {"main": ran(1)})
    assert (status["phase"], status["reason"]) == ("Failed", pod_reason)
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (code, container_reason)
    assert main["message"].startswith("the container was running when"), main


@pytest.mark.parametrize("state", ["PENDING", "REQUEUED", "REQUEUE_HOLD"])
def test_a_job_waiting_again_after_a_run_is_pending(state: str) -> None:
    # squeue still names the node of the run before; the job has not started again.
    view = job(state, reason="BeginTime", batch_host="n1", nodes="n1", restarts=1)
    status = pod_status(SPEC, view, {"main": ran(1, 9, 143)})
    assert status["phase"] == "Pending"
    assert container(status, "main")["state"]["waiting"]["reason"] == "SlurmPending"


def test_a_preempted_job_slurm_will_not_requeue_fails_the_pod() -> None:
    status = pod_status(SPEC, job("PREEMPTED"), {"main": ran(1, 9, 143)})
    assert (status["phase"], status["reason"]) == ("Failed", "Preempted")


def test_a_requeued_job_is_pending_again_and_forgets_the_last_runs_markers() -> None:
    old = {"main": ran(1, 20, 143)}
    pending = job("PENDING", reason="BeginTime", restarts=1)
    status = pod_status(SPEC, pending, old)
    assert status["phase"] == "Pending"
    waiting = container(status, "main")["state"]["waiting"]
    assert waiting["reason"] == "SlurmPending"
    assert waiting["message"].endswith("(BeginTime): Slurm delays a job it has requeued")
    rerun = job("RUNNING", restarts=1, start_time=T0 + timedelta(minutes=3))
    status = pod_status(SPEC, rerun, old)
    assert status["phase"] == "Running"
    assert container(status, "main")["state"]["waiting"]["reason"] == "ContainerCreating"
    new = {"main": ran(182)}
    status = pod_status(SPEC, rerun, new)
    assert container(status, "main")["state"]["running"]["startedAt"] == "2026-11-24T10:03:02Z"


def test_a_lost_job_fails_the_pod_with_the_watchers_explanation() -> None:
    message = "neither squeue nor sacct knows Slurm job 42"
    view = job("LOST", message=message, source="watcher", end_time=None)
    status = pod_status(SPEC, view, {"main": ran(1)})
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed",
        "SlurmJobLost",
        message,
    )
    main = terminated(status, "main")
    assert (main["exitCode"], main["reason"]) == (137, "ContainerStatusUnknown")
    assert "finishedAt" not in main


def test_an_unknown_final_state_still_fails_the_pod() -> None:
    status = pod_status(SPEC, job("SPECIAL_EXIT", final=True, exit_code=2), {})
    assert (status["phase"], status["reason"]) == ("Failed", "SpecialExit")
    assert terminated(status, "main")["exitCode"] == 2


@pytest.mark.parametrize("state", sorted(FINALS))
def test_a_final_status_depends_only_on_its_inputs_and_is_json(state: str) -> None:
    view = job(state)
    markers = {"main": ran(1, 4, 0 if state == "COMPLETED" else 1)}
    first = pod_status(SPEC_WITH_INIT, view, markers, node_addresses=ADDRESSES)
    second = pod_status(SPEC_WITH_INIT, view, markers, node_addresses=ADDRESSES)
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert first["phase"] == ("Succeeded" if state == "COMPLETED" else "Failed")
    for status in first["initContainerStatuses"] + first["containerStatuses"]:
        assert {"name", "image", "imageID", "ready", "restartCount", "state"} <= set(status)
        assert list(status["state"]) == ["terminated"]


# --- the markers in the pod folder ------------------------------------------------------


def test_read_markers_reads_started_and_exit_files(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    (containers / "main").mkdir(parents=True)
    (containers / "main" / "started").write_text("2026-11-24T10:00:01.123456789Z\n")
    (containers / "main" / "exit").write_text("3 2026-11-24T10:00:09.5+00:00\n")
    (containers / "sidecar").mkdir()
    (containers / "sidecar" / "started").write_text("2026-11-24 10:00:02+00:00\n")
    (containers / "broken").mkdir()
    (containers / "broken" / "exit").write_text("garbage\n")
    (containers / "stray-file").write_text("")
    markers = read_markers(tmp_path)
    assert markers["main"] == ContainerMarkers(
        started_at=datetime(2026, 11, 24, 10, 0, 1, 123456, tzinfo=UTC),
        exit_code=3,
        finished_at=datetime(2026, 11, 24, 10, 0, 9, 500000, tzinfo=UTC),
    )
    assert markers["sidecar"] == ContainerMarkers(
        started_at=datetime(2026, 11, 24, 10, 0, 2, tzinfo=UTC)
    )
    assert markers["broken"] == ContainerMarkers()
    assert set(markers) == {"main", "sidecar", "broken"}


def test_read_markers_follows_no_link_a_container_planted(tmp_path: Path) -> None:
    pod = tmp_path / "pod"
    main = pod / "containers" / "main"
    main.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "exit").write_text("0 2026-11-24T10:00:09Z\n")
    (elsewhere / "ready").write_text("")
    (main / "started").write_text("2026-11-24T10:00:01Z\n")
    (main / "exit").symlink_to(elsewhere / "exit")
    (main / "ready").symlink_to(elsewhere / "ready")
    os.mkfifo(main / "restarts")  # would hang a reader that waited for a writer
    (pod / "containers" / "linked").symlink_to(elsewhere)
    markers = read_markers(pod)
    assert set(markers) == {"main"}
    assert markers["main"] == ContainerMarkers(
        started_at=datetime(2026, 11, 24, 10, 0, 1, tzinfo=UTC)
    )
    (pod / "containers").rename(tmp_path / "real")
    (pod / "containers").symlink_to(tmp_path / "real")
    assert read_markers(pod) == {}


def test_read_markers_of_a_pod_folder_without_containers(tmp_path: Path) -> None:
    assert read_markers(tmp_path) == {}
    assert read_markers(tmp_path / "missing") == {}


def test_an_exit_marker_without_a_time_still_gives_the_code(tmp_path: Path) -> None:
    (tmp_path / "containers" / "main").mkdir(parents=True)
    (tmp_path / "containers" / "main" / "exit").write_text("137\n")
    assert read_markers(tmp_path)["main"] == ContainerMarkers(exit_code=137)


def test_markers_a_little_older_than_slurms_start_time_still_count() -> None:
    # The node's clock may be behind the controller's; without a requeue, markers are current.
    early = ContainerMarkers(started_at=T0 - timedelta(seconds=30))
    status = pod_status(SPEC, job("RUNNING"), {"main": early})
    assert container(status, "main")["state"]["running"]["startedAt"] == "2026-11-24T09:59:30Z"


# --- restarts (restartPolicy OnFailure and Always) and native sidecars --------------------


def again(
    start: int, *, restarts: int, last: ContainerMarkers, end: int | None = None, **more: Any
) -> ContainerMarkers:
    """Markers of a container on its (restarts + 1)th run, `last` being the run before."""
    return ContainerMarkers(
        started_at=T0 + timedelta(seconds=start),
        finished_at=None if end is None else T0 + timedelta(seconds=end),
        restarts=restarts,
        last=last,
        **more,
    )


def test_a_restarted_container_counts_its_restarts_and_shows_the_run_before() -> None:
    markers = {"main": again(40, restarts=2, last=ran(12, 20, code=1))}
    status = pod_status(SPEC, job("RUNNING"), markers)
    main = container(status, "main")
    assert main["restartCount"] == 2
    assert main["state"] == {"running": {"startedAt": "2026-11-24T10:00:40Z"}}
    assert main["lastState"]["terminated"] == {
        "exitCode": 1,
        "reason": "Error",
        "startedAt": "2026-11-24T10:00:12Z",
        "finishedAt": "2026-11-24T10:00:20Z",
    }
    assert main["ready"] is True
    assert condition(status, "Ready")["status"] == "True"


def test_a_container_waiting_to_restart_is_in_crash_loop_back_off() -> None:
    markers = {
        "main": again(
            30,
            end=35,
            exit_code=2,
            restarts=1,
            last=ran(1, 10, code=2),
            backoff_seconds=20,
        )
    }
    status = pod_status(SPEC, job("RUNNING"), markers)
    assert status["phase"] == "Running"
    main = container(status, "main")
    assert main["state"]["waiting"] == {
        "reason": "CrashLoopBackOff",
        "message": "back-off 20s restarting failed container=main",
    }
    # The run that just ended is the last state, as kubectl describe shows it.
    assert main["lastState"]["terminated"]["exitCode"] == 2
    assert main["lastState"]["terminated"]["startedAt"] == "2026-11-24T10:00:30Z"
    assert (main["restartCount"], main["ready"]) == (1, False)
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    assert ready["message"] == "containers with unready status: [main]"


def test_a_container_that_ended_after_restarts_keeps_its_count() -> None:
    markers = {"main": again(30, end=31, exit_code=0, restarts=1, last=ran(1, 2, code=1))}
    status = pod_status(SPEC, job("COMPLETED"), markers)
    assert status["phase"] == "Succeeded"
    main = container(status, "main")
    assert (main["restartCount"], terminated(status, "main")["reason"]) == (1, "Completed")
    assert main["lastState"]["terminated"]["exitCode"] == 1


def test_a_job_cancelled_during_a_back_off_shows_the_last_run() -> None:
    markers = {
        "main": again(30, end=31, exit_code=0, restarts=3, last=ran(1, 2), backoff_seconds=80)
    }
    status = pod_status(SPEC, job("CANCELLED"), markers)
    assert status["phase"] == "Failed"
    assert terminated(status, "main")["exitCode"] == 0
    assert container(status, "main")["restartCount"] == 3


SIDECAR_SPEC: dict[str, Any] = {
    "initContainers": [
        {"name": "setup", "image": "busybox"},
        {"name": "proxy", "image": "busybox", "restartPolicy": "Always"},
    ],
    "containers": [{"name": "main", "image": "busybox"}],
    "restartPolicy": "Never",
}


def test_a_sidecar_that_has_started_lets_the_containers_start_and_is_ready() -> None:
    markers = {"setup": ran(1, 2, code=0), "proxy": ran(3), "main": ran(4)}
    status = pod_status(SIDECAR_SPEC, job("RUNNING"), markers)
    proxy = container(status, "proxy", "initContainerStatuses")
    assert (proxy["started"], proxy["ready"]) == (True, True)
    assert proxy["state"] == {"running": {"startedAt": "2026-11-24T10:00:03Z"}}
    initialized = condition(status, "Initialized")
    assert (initialized["status"], initialized["lastTransitionTime"]) == (
        "True",
        "2026-11-24T10:00:03Z",
    )
    assert condition(status, "Ready")["status"] == "True"


def test_a_sidecar_that_has_not_started_keeps_the_pod_initializing() -> None:
    status = pod_status(SIDECAR_SPEC, job("RUNNING"), {"setup": ran(1, 2, code=0)})
    initialized = condition(status, "Initialized")
    assert (initialized["status"], initialized["message"]) == (
        "False",
        "containers with incomplete status: [proxy]",
    )
    assert container(status, "main")["state"]["waiting"]["reason"] == "PodInitializing"


def test_a_sidecar_waiting_to_restart_makes_the_pod_unready() -> None:
    proxy = again(9, end=10, exit_code=1, restarts=0, last=None, backoff_seconds=10)
    markers = {"setup": ran(1, 2, code=0), "proxy": proxy, "main": ran(4)}
    status = pod_status(SIDECAR_SPEC, job("RUNNING"), markers)
    assert condition(status, "Initialized")["status"] == "True"
    ready = condition(status, "ContainersReady")
    assert (ready["status"], ready["message"]) == (
        "False",
        "containers with unready status: [proxy]",
    )
    assert container(status, "main")["ready"] is True


def test_a_sidecar_stopped_after_the_containers_does_not_fail_the_pod() -> None:
    markers = {"setup": ran(1, 2, code=0), "proxy": ran(3, 21, code=143), "main": ran(4, 20, 0)}
    status = pod_status(SIDECAR_SPEC, job("COMPLETED"), markers)
    assert status["phase"] == "Succeeded"
    assert condition(status, "Initialized")["status"] == "True"
    assert terminated(status, "main")["reason"] == "Completed"
    assert terminated(status, "proxy", "initContainerStatuses")["exitCode"] == 143


def test_read_markers_reads_the_restart_files(tmp_path: Path) -> None:
    folder = tmp_path / "containers" / "main"
    folder.mkdir(parents=True)
    (folder / "started").write_text("2026-11-24T10:00:30.000000001Z\n")
    (folder / "exit").write_text("1 2026-11-24T10:00:31.000000000Z\n")
    (folder / "restarts").write_text("2\n")
    (folder / "last").write_text(
        "1 2026-11-24T10:00:10.500000000Z 2026-11-24T10:00:11.000000000Z\n"
    )
    (folder / "backoff").write_text("40 2026-11-24T10:01:11.000000000Z\n")
    marker = read_markers(tmp_path)["main"]
    assert (marker.restarts, marker.backoff_seconds) == (2, 40.0)
    assert marker.last == ContainerMarkers(
        started_at=datetime(2026, 11, 24, 10, 0, 10, 500000, tzinfo=UTC),
        exit_code=1,
        finished_at=T0 + timedelta(seconds=11),
    )
    for name in ("restarts", "last", "backoff"):
        (folder / name).write_text("garbage\n")
    damaged = read_markers(tmp_path)["main"]
    assert (damaged.restarts, damaged.last, damaged.backoff_seconds) == (0, None, None)


# --- probes -------------------------------------------------------------------------------

PROBED: dict[str, Any] = {
    "containers": [
        {
            "name": "main",
            "image": "docker://busybox:1.36",
            "startupProbe": {"tcpSocket": {"port": 80}},
            "readinessProbe": {"httpGet": {"port": 80}},
        }
    ]
}


def test_a_probed_container_is_started_and_ready_only_by_its_markers() -> None:
    status = pod_status(PROBED, job("RUNNING"), {"main": ran(2)})
    main = container(status, "main")
    assert main["started"] is False and main["ready"] is False
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "ContainersReady")["reason"] == "ContainersNotReady"

    started = replace(ran(2), startup_passed=True)
    main = container(pod_status(PROBED, job("RUNNING"), {"main": started}), "main")
    assert main["started"] is True and main["ready"] is False

    ready = replace(started, probe_ready=True)
    status = pod_status(PROBED, job("RUNNING"), {"main": ready})
    assert container(status, "main")["ready"] is True
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "ContainersReady")["status"] == "True"


def test_read_markers_reads_the_probe_markers(tmp_path: Path) -> None:
    folder = tmp_path / "containers" / "main"
    folder.mkdir(parents=True)
    (folder / "started").write_text("2026-11-24T10:00:01.123456789Z\n")
    assert read_markers(tmp_path)["main"].probe_ready is False
    (folder / "startup").write_text("\n")
    (folder / "ready").write_text("\n")
    markers = read_markers(tmp_path)["main"]
    assert markers.probe_ready is True and markers.startup_passed is True


# --- lifecycle hooks -----------------------------------------------------------------------

HOOKED: dict[str, Any] = {
    "containers": [
        {
            "name": "main",
            "image": "docker://busybox:1.36",
            "lifecycle": {"postStart": {"exec": {"command": ["false"]}}},
        }
    ]
}
FAILED_HOOK = HookFailure(
    stamp="2026-11-24T10:00:03.000000000Z",
    summary='exec ["false"] exited with 1',
    output="no config",
)


def test_a_container_in_its_post_start_hook_is_waiting_and_not_started() -> None:
    # The launcher writes `started` once the hook has passed: until then, no marker.
    status = pod_status(HOOKED, job("RUNNING"), {"main": ContainerMarkers()})
    main = container(status, "main")
    assert main["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert (main["started"], main["ready"]) == (False, False)


def test_a_container_whose_post_start_hook_failed_says_why_while_it_is_stopped() -> None:
    markers = {"main": ContainerMarkers(post_start_failure=FAILED_HOOK)}
    main = container(pod_status(HOOKED, job("RUNNING"), markers), "main")
    assert main["state"]["waiting"] == {
        "reason": "PostStartHookError",
        "message": 'PostStartHook failed: exec ["false"] exited with 1\nno config',
    }
    assert main["started"] is False


def test_the_run_a_failed_post_start_hook_ended_carries_its_message() -> None:
    ended = replace(ran(1, 4, code=143), post_start_failure=FAILED_HOOK, backoff_seconds=10)
    main = container(pod_status(HOOKED, job("RUNNING"), {"main": ended}), "main")
    assert main["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    last = main["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (143, "Error")
    assert last["message"] == 'PostStartHook failed: exec ["false"] exited with 1\nno config'
    # What the container wrote at its terminationMessagePath comes first.
    written = replace(ended, backoff_seconds=None, termination_message="bye")
    status = pod_status(HOOKED, job("FAILED", exit_code=143), {"main": written})
    assert terminated(status, "main")["message"] == "bye"


def test_read_markers_reads_the_hook_failures(tmp_path: Path) -> None:
    folder = tmp_path / "containers" / "main"
    folder.mkdir(parents=True)
    (folder / "poststart-failed").write_text(
        '2026-11-24T10:00:03.000000000Z\nexec ["false"] exited with 1\nno config\n'
    )
    (folder / "prestop-failed").write_text("not a time\nsleep 5s ended\n")  # damaged
    markers = read_markers(tmp_path)["main"]
    assert markers.post_start_failure == FAILED_HOOK
    assert markers.pre_stop_failure is None
