"""The srun launcher annotation: which container starts once per Slurm task, how the job script
starts it, and the task environment handed into the container."""

from __future__ import annotations

import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import pytest

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.job.task import task_environment
from kubelet_py.pod.render import LAUNCHER_FIELD, RenderSettings, render_pod
from kubelet_py.pod.security import JobUser


def pod(launcher: str | None, *names: str) -> dict[str, Any]:
    annotations = {"slurm.hpk.io/flags": "--nodes=2 --ntasks=4"}
    if launcher is not None:
        annotations["slurm.hpk.io/launcher"] = launcher
    return {
        "metadata": {
            "name": "mpi",
            "namespace": "default",
            "uid": "u-1",
            "annotations": annotations,
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": name, "image": "busybox", "command": ["echo", name]} for name in names
            ],
        },
    }


def script(the_pod: dict[str, Any]) -> str:
    settings = RenderSettings(
        pod_dir=PurePosixPath("/home/u/.hpk/pods/default/mpi"),
        apptainer=PurePosixPath("/opt/apptainer"),
        images={"busybox": PurePosixPath("/images/busybox.sif")},
        job_user=JobUser(1000, 1000),
    )
    return render_pod(the_pod, settings).script


def srun_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "srun" in line and "-m" in line]


def started_under_srun(text: str) -> list[str]:
    """Names of the containers whose launch block holds the srun line."""
    names = []
    for block in text.split("kubelet_py.job.launch ")[1:]:
        launch = block.split(" &\n", 1)[0]
        if "srun --kill-on-bad-exit=1" in launch:
            names.append(launch.split('"$containers"/', 1)[1].split()[0])
    return names


def test_without_the_annotation_nothing_runs_under_srun() -> None:
    assert srun_lines(script(pod(None, "main"))) == []


@pytest.mark.parametrize(
    ("launcher", "names", "chosen"),
    [
        ("srun", ("solver",), ["solver"]),
        ("srun", ("wait", "main"), ["main"]),
        ("srun:wait", ("wait", "main"), ["wait"]),
    ],
)
def test_the_named_container_starts_once_per_task(
    launcher: str, names: tuple[str, ...], chosen: list[str]
) -> None:
    text = script(pod(launcher, *names))
    assert started_under_srun(text) == chosen
    assert srun_lines(text) == [
        'srun --kill-on-bad-exit=1 "$python" -I -m kubelet_py.job.task -- \\'
    ]


@pytest.mark.parametrize(
    ("launcher", "names", "problem"),
    [
        ("mpirun", ("main",), "only launcher is srun"),
        ("srun:nope", ("main",), "'nope' is not a main container"),
        ("srun", ("a", "b"), "say which"),
    ],
)
def test_a_bad_launcher_is_refused_naming_the_annotation(
    launcher: str, names: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(InvalidPodSpec) as caught:
        script(pod(launcher, *names))
    assert caught.value.field == LAUNCHER_FIELD
    assert problem in caught.value.problem


def test_the_task_hands_its_slurm_and_mpi_variables_to_the_container() -> None:
    environ = {
        "SLURM_PROCID": "3",
        "SLURMD_NODENAME": "n2",
        "PMIX_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "HOME": "/home/u",
        "SECRET_TOKEN": "x",
    }
    found = task_environment(environ)
    passed = {name for name in found if name.startswith("APPTAINERENV_")}
    assert passed == {
        "APPTAINERENV_SLURM_PROCID",
        "APPTAINERENV_SLURMD_NODENAME",
        "APPTAINERENV_PMIX_RANK",
        "APPTAINERENV_OMPI_COMM_WORLD_SIZE",
    }
    assert found["APPTAINERENV_SLURM_PROCID"] == "3"
    assert found["HOME"] == "/home/u"


def test_the_task_becomes_its_command() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-m",
            "kubelet_py.job.task",
            "--",
            "sh",
            "-c",
            "echo $APPTAINERENV_SLURM_PROCID",
        ],
        env={"SLURM_PROCID": "2", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "2\n")
    usage = subprocess.run(
        [sys.executable, "-I", "-m", "kubelet_py.job.task", "sh"], capture_output=True, check=False
    )
    assert usage.returncode == 2


def test_srun_tasks_keep_the_nodes_pids_and_the_others_get_their_own() -> None:
    text = script(pod("srun:main", "main", "helper"))
    blocks = {
        block.split('"$containers"/', 1)[1].split()[0]: block.split(" &\n", 1)[0]
        for block in text.split("kubelet_py.job.launch ")[1:]
    }
    assert "--pid" not in blocks["main"].split()  # MPI ranks under srun share the node's
    assert "--pid" in blocks["helper"].split()
