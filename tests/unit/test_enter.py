"""Finding and entering a running container for `kubectl exec` (kubelet_py.job.enter), on a
/proc made of literal files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubelet_py.job.enter import (
    CannotEnter,
    check_same_job,
    container_process,
    nsenter_argv,
    read_pid,
)


def process(
    proc: Path,
    pid: int,
    *,
    ppid: int,
    comm: str = "sh",
    env: dict[str, str] | None = None,
    cgroup: str = "0::/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0\n",
    ns: dict[str, str] | None = None,
) -> None:
    folder = proc / str(pid)
    (folder / "ns").mkdir(parents=True)
    (folder / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0\n")
    (folder / "comm").write_text(comm + "\n")
    (folder / "environ").write_bytes(
        b"".join(f"{k}={v}\0".encode() for k, v in (env or {}).items())
    )
    (folder / "cgroup").write_text(cgroup)
    for kind in ("mnt", "net", "pid", "uts", "ipc"):
        os.symlink(f"{kind}:[{(ns or {}).get(kind, '1')}]", folder / "ns" / kind)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    process(root, 10, ppid=1, comm="python3", env={"SLURM_JOB_ID": "7"})  # the launcher
    process(root, 11, ppid=10, comm="starter", env={"APPTAINER_X": "1"})  # apptainer
    process(root, 12, ppid=11, comm="sinit", ns={"mnt": "2", "pid": "2", "uts": "2"})
    process(
        root,
        13,
        ppid=12,
        comm="httpd",
        env={"PATH": "/bin"},
        ns={"mnt": "2", "pid": "2", "uts": "2"},
    )
    process(
        root, 20, ppid=1, comm="python3", env={"SLURM_JOB_ID": "8"}, cgroup="0::/x/job_8/step_0\n"
    )
    process(root, 21, ppid=20, comm="starter")
    process(root, 5, ppid=1, env={"SLURM_JOB_ID": "7"})  # this step of job 7
    os.symlink("5", root / "self")
    return root


def test_the_container_is_the_init_shims_child_in_its_own_mount_namespace(proc: Path) -> None:
    assert container_process(11, proc) == 13


def test_a_process_of_another_job_is_refused(proc: Path) -> None:
    check_same_job(11, job_id="7", proc=proc)  # the launcher's variables
    with pytest.raises(CannotEnter, match="not of this pod's job 7"):
        check_same_job(21, job_id="7", proc=proc)
    with pytest.raises(CannotEnter, match="is gone"):
        check_same_job(99, job_id="7", proc=proc)


def test_a_process_outside_the_job_cgroup_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    process(root, 10, ppid=1, env={"SLURM_JOB_ID": "7"}, cgroup="0::/user.slice/session-3.scope\n")
    process(root, 11, ppid=10, env={"SLURM_JOB_ID": "7"}, cgroup="0::/user.slice/session-3.scope\n")
    process(root, 5, ppid=1)  # this step
    os.symlink("5", root / "self")
    with pytest.raises(CannotEnter, match="job cgroup"):
        check_same_job(11, job_id="7", proc=root)


def test_no_container_below_the_process_is_a_clear_error(proc: Path) -> None:
    with pytest.raises(CannotEnter, match="was not found"):
        container_process(21, proc)


def test_nsenter_enters_only_the_namespaces_the_container_has_of_its_own(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    process(root, 3, ppid=1)  # this process: the node's namespaces
    process(root, 13, ppid=12, ns={"mnt": "2", "pid": "2", "uts": "2"})
    os.symlink("3", root / "self")
    argv = nsenter_argv(13, ["sh", "-c", "id"], proc=root)
    assert argv[:5] == ["nsenter", "--target=13", "--user", "--mount", "--pid"]
    assert "--uts" in argv and "--ipc" not in argv
    assert argv[argv.index("--") :] == ["--", "sh", "-c", "id"]


def test_the_pid_marker_must_hold_a_pid(tmp_path: Path) -> None:
    with pytest.raises(CannotEnter, match="not running"):
        read_pid(tmp_path)
    (tmp_path / "pid").write_text("1234\n")
    assert read_pid(tmp_path) == 1234
    (tmp_path / "pid").write_text("../../etc\n")
    with pytest.raises(CannotEnter, match="not a pid"):
        read_pid(tmp_path)
