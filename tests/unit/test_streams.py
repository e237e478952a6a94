"""The kubelet's plans for exec, attach and port-forward (kubelet_py.pod.streams)."""

from __future__ import annotations

from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from kubelet_py.pod.status import ContainerMarkers
from kubelet_py.pod.streams import (
    PlanRefused,
    PlanSettings,
    StreamRequest,
    StreamTarget,
    plan,
    srun_environment,
)

STARTED = ContainerMarkers(started_at=datetime(2026, 12, 3, tzinfo=UTC))
SETTINGS = PlanSettings(
    python=PurePosixPath("/opt/hpk/bin/python"),
    relay=Path("/tmp/hpk-hub-x/relay"),
    environment={"PATH": "/usr/bin", "SLURM_JOB_ID": "7", "SLURM_CONF": "/etc/slurm.conf"},
)


def target(**changes: Any) -> StreamTarget:
    pod = {
        "metadata": {"namespace": "ns", "name": "p", "annotations": {}},
        "spec": {
            "initContainers": [{"name": "setup"}],
            "containers": [{"name": "main"}, {"name": "side"}],
        },
    }
    fields: dict[str, Any] = {
        "pod": pod,
        "job_id": "42",
        "folder": Path("/home/u/.hpk/pods/ns/p"),
        "batch_host": "n3",
        "state": "RUNNING",
        "markers": {"main": STARTED, "side": STARTED},
        "address": "10.244.0.9",
        "on_pod_network": True,
    }
    return StreamTarget(**{**fields, **changes})


def request(**fields: Any) -> StreamRequest:
    return StreamRequest.parse(
        {"kind": "exec", "namespace": "ns", "pod": "p", "container": "main", **fields}
    )


def refusal(req: StreamRequest, running: StreamTarget | None) -> PlanRefused:
    with pytest.raises(PlanRefused) as caught:
        plan(req, running, SETTINGS)
    return caught.value


def test_exec_is_a_step_of_the_pods_own_job_on_its_batch_host() -> None:
    found = plan(request(command=["sh", "-c", "echo hi"], stdin=True), target(), SETTINGS)
    srun, _, helper = " ".join(found.argv).partition(" -- ")
    assert srun.split() == [
        "srun",
        "--jobid=42",
        "--overlap",
        "--nodes=1",
        "--ntasks=1",
        "--nodelist=n3",
        "--quiet",
        "--unbuffered",
        "--job-name=exec",
    ]
    assert found.argv[found.argv.index("--") + 1 :] == (
        "/opt/hpk/bin/python",
        "-I",
        "-m",
        "kubelet_py.job.enter",
        "/home/u/.hpk/pods/ns/p/containers/main",
        "--",
        "sh",
        "-c",
        "echo hi",
    )
    # srun names the pod's job alone: the control-plane job's own variables are left out.
    assert set(found.env) == {"PATH=/usr/bin", "SLURM_CONF=/etc/slurm.conf"}
    assert helper


def test_a_terminal_and_no_input_change_srun_and_enter() -> None:
    found = plan(request(command=["sh"], tty=True), target(), SETTINGS)
    assert "--pty" in found.argv and "--input=none" in found.argv
    assert found.argv[found.argv.index("kubelet_py.job.enter") + 1] == "--tty"


def test_attach_connects_to_the_launchers_socket() -> None:
    found = plan(request(kind="attach", stdin=True), target(), SETTINGS)
    assert "--job-name=attach" in found.argv
    assert found.argv[-3:] == (
        "kubelet_py.job.attach",
        "--stdin",
        "/home/u/.hpk/pods/ns/p/containers/main",
    )


def test_port_forward_dials_the_pod_address_through_the_relay_or_the_nodes_directly() -> None:
    found = plan(request(kind="portforward"), target(), SETTINGS)
    assert (found.address, found.relay, found.argv) == ("10.244.0.9", "/tmp/hpk-hub-x/relay", ())
    on_host = plan(
        request(kind="portforward"), target(on_pod_network=False, address="192.0.2.7"), SETTINGS
    )
    assert (on_host.address, on_host.relay) == ("192.0.2.7", "")


@pytest.mark.parametrize(
    ("running", "fields", "status", "words"),
    [
        (None, {}, HTTPStatus.NOT_FOUND, 'pod "ns/p" is not run by this kubelet'),
        (
            target(batch_host=None, state="PENDING"),
            {},
            HTTPStatus.BAD_REQUEST,
            "job 42 is not running (PENDING)",
        ),
        (target(), {"container": "nosuch"}, HTTPStatus.NOT_FOUND, "it has: setup, main, side"),
        (
            target(),
            {"container": "setup"},
            HTTPStatus.BAD_REQUEST,
            'container "setup" of pod "ns/p" is not running',
        ),
        (
            target(markers={"main": ContainerMarkers(started_at=STARTED.started_at, exit_code=3)}),
            {},
            HTTPStatus.BAD_REQUEST,
            "(it exited with 3)",
        ),
        (
            target(address=None),
            {"kind": "portforward"},
            HTTPStatus.BAD_REQUEST,
            "has no address yet",
        ),
    ],
)
def test_what_cannot_be_reached_is_refused_with_its_reason(
    running: StreamTarget | None, fields: dict[str, Any], status: HTTPStatus, words: str
) -> None:
    refused = refusal(request(command=["true"], **fields), running)
    assert refused.status == status
    assert words in refused.message


def test_the_container_srun_starts_cannot_be_entered() -> None:
    running = target()
    running.pod["metadata"]["annotations"]["slurm.hpk.io/launcher"] = "srun:side"
    refused = refusal(request(container="side", command=["true"]), running)
    assert "started by srun on every task" in refused.message
    assert plan(request(command=["true"]), running, SETTINGS).argv  # main is not srun's


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"kind": "shell", "namespace": "ns", "pod": "p"},
        {"kind": "exec", "namespace": "ns", "pod": "p", "container": "main"},
        {"kind": "exec", "namespace": "ns", "pod": 3, "command": ["x"]},
        {"kind": "exec", "namespace": "ns", "pod": "p", "command": "ls"},
    ],
)
def test_a_malformed_request_is_a_bad_request(data: object) -> None:
    with pytest.raises(PlanRefused) as caught:
        StreamRequest.parse(data)
    assert caught.value.status == HTTPStatus.BAD_REQUEST


def test_srun_environment_keeps_slurm_conf_only() -> None:
    env = {
        "HOME": "/h",
        "SLURM_CONF": "/c",
        "SLURM_JOB_ID": "1",
        "SRUN_DEBUG": "1",
        "SLURMD_NODENAME": "n",
    }
    assert srun_environment(env) == ("HOME=/h", "SLURM_CONF=/c")
