"""Pods of several containers and the container-level fields, end to end: containers that
share an emptyDir (one mounting it read-only) and localhost, securityContext identities, a GPU
pod's flags and `--nv`, and an srun-launched pod whose ranks run over two nodes.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-containers"
JOB_ID = "slurm.hpk.io/job-id"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE, nodes=("hpk-batch", "hpk-gpu")) as running:
        yield running


def log_lines(cluster: PodCluster, name: str, container: str = "main") -> list[str]:
    log = (cluster.folder(name) / "containers" / container / "log").read_text()
    return [line.split(" ", 2)[2] for line in log.splitlines() if " stdout " in line]


def container(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def scontrol(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture(scope="module")
def launched(cluster: PodCluster) -> PodCluster:
    """Every pod of the module, created at once so that their jobs overlap."""
    shared = cluster.manifest("shared", ["true"])
    shared["spec"]["containers"] = [
        container(
            "writer",
            "echo from-writer > /data/note; echo wrote",
            volumeMounts=[{"name": "data", "mountPath": "/data"}],
        ),
        container(
            "reader",
            "while [ ! -e /data/note ]; do sleep 0.2; done; cat /data/note; "
            "if echo x > /data/mine 2>/dev/null; then echo write-allowed; "
            "else echo write-refused; fi",
            volumeMounts=[{"name": "data", "mountPath": "/data", "readOnly": True}],
        ),
    ]
    shared["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]

    identity = cluster.manifest("identity", ["true"])
    identity["spec"]["securityContext"] = {"runAsUser": 1234, "runAsGroup": 2345}
    identity["spec"]["containers"] = [
        container(
            "main",
            'echo "ids $(id -u) $(id -g)"; touch /scratch/made && echo scratch-writable',
            securityContext={"seccompProfile": {"type": "RuntimeDefault"}},
            volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
        ),
        container("own", 'echo "ids $(id -u) $(id -g)"', securityContext={"runAsUser": 4321}),
    ]
    identity["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]

    gpu = cluster.manifest("gpu", ["true"])
    gpu["spec"]["nodeSelector"] = {"hpk.io/partition": "gpu"}
    gpu["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}

    ranks = cluster.manifest(
        "ranks",
        ["sh", "-c", 'echo "rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"'],
        annotations={
            "slurm.hpk.io/flags": "--nodes=2 --ntasks=4",
            "slurm.hpk.io/launcher": "srun",
        },
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = cluster.manifest("localhost", ["true"])
    local["spec"]["containers"] = [
        container(
            "server",
            f"echo served-over-localhost > /www/hello; httpd -f -p 127.0.0.1:{port} -h /www & "
            "server=$!; while [ ! -e /www/done ]; do sleep 0.2; done; kill $server",
            volumeMounts=[{"name": "www", "mountPath": "/www"}],
        ),
        container(
            "client",
            f"until wget -q -O - http://127.0.0.1:{port}/hello; do sleep 0.2; done; "
            "touch /www/done",
            volumeMounts=[{"name": "www", "mountPath": "/www"}],
        ),
    ]
    local["spec"]["volumes"] = [{"name": "www", "emptyDir": {}}]
    cluster.apply(shared, identity, gpu, ranks, local)
    return cluster


def test_containers_share_an_empty_dir_and_a_read_only_mount_refuses_writes(
    launched: PodCluster,
) -> None:
    pod = launched.phase("shared", "Succeeded")
    assert log_lines(launched, "shared", "writer") == ["wrote"]
    assert log_lines(launched, "shared", "reader") == ["from-writer", "write-refused"]
    statuses = {s["name"]: s for s in pod["status"]["containerStatuses"]}
    assert set(statuses) == {"writer", "reader"}
    for status in statuses.values():
        assert status["state"]["terminated"]["exitCode"] == 0, status
    logs = launched.kubectl("logs", "-n", NAMESPACE, "shared", "-c", "reader", check=False)
    assert logs == "" or "from-writer" in logs  # served only when the kubelet API is on


def test_containers_of_a_pod_reach_each_other_on_localhost(launched: PodCluster) -> None:
    launched.phase("localhost", "Succeeded")
    assert log_lines(launched, "localhost", "client") == ["served-over-localhost"]


def test_run_as_user_and_group_are_honoured_and_the_rest_is_reported(
    launched: PodCluster,
) -> None:
    launched.phase("identity", "Succeeded")
    assert log_lines(launched, "identity") == ["ids 1234 2345", "scratch-writable"]
    # The container's runAsUser wins over the pod's; the group stays the pod's.
    assert log_lines(launched, "identity", "own") == ["ids 4321 2345"]
    events = eventually(
        "the SecurityContextNotHonoured Event",
        lambda: "SecurityContextNotHonoured" in (text := launched.events("identity")) and text,
    )
    assert "seccompProfile RuntimeDefault" in events


def test_a_gpu_pod_asks_slurm_for_gres_and_runs_with_nv(launched: PodCluster) -> None:
    pod = launched.phase("gpu", "Succeeded")
    assert pod["spec"]["nodeName"] == "hpk-gpu"
    shown = scontrol(pod["metadata"]["annotations"][JOB_ID])
    assert "Partition=gpu" in shown and "gres/gpu=1" in shown, shown
    script = (launched.folder("gpu") / "job.sh").read_text()
    assert re.search(r"exec .*--nv", script.replace("\\\n", " ")), script


def test_an_srun_pod_runs_four_ranks_over_two_nodes(launched: PodCluster) -> None:
    pod = launched.phase("ranks", "Succeeded")
    lines = sorted(log_lines(launched, "ranks"))
    folder = launched.folder("ranks")
    # Everything the job wrote, to say why when a rank's line is missing.
    said = [
        (path.name, path.read_text(errors="replace")[-2000:])
        for path in (folder / "containers" / "main" / "log", folder / "slurm.out")
        if path.exists()
    ]
    assert [line.split()[:4] for line in lines] == [
        ["rank", str(rank), "of", "4"] for rank in range(4)
    ], said
    nodes = {line.split()[-1] for line in lines}
    assert len(nodes) == 2, lines
    shown = scontrol(pod["metadata"]["annotations"][JOB_ID])
    assert "NumNodes=2" in shown and "NumTasks=4" in shown, shown
