"""The test bed's Slurm answers as a real cluster does: jobs run, and sacct reports their
states and exit codes; memory limits, partitions and GRES work; Apptainer runs in jobs."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

import pytest

from hpk.apptainer import run_options
from hpk.images import cached_image
from hpk.testbed.bed import Testbed, cgroups_usable
from hpk.testbed.images import ensure_test_images, register_test_images
from hpk.toolchain import Toolchain
from tests.e2e.slurm import job_folder, sbatch, wait_finished

PYTHON_IMAGE = "docker.io/library/python:3.11"
PROBE = "import sys; print('python', '.'.join(map(str, sys.version_info[:2])), 'in apptainer')"


def write_script(folder: Path, body: str) -> Path:
    script = folder / "job.sh"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def python_sif(testbed: Testbed) -> Path:
    register_test_images()
    sif = cached_image(PYTHON_IMAGE)
    assert sif is not None, f"{PYTHON_IMAGE} is not in hpk's image cache after registration"
    return sif


@pytest.mark.timeout(300)
def test_apptainer_job_runs_python_image(
    job_dir: Path, toolchain: Toolchain, python_sif: Path
) -> None:
    apptainer = toolchain.binary("apptainer")
    options = " ".join(run_options())
    script = write_script(
        job_dir, f'exec {apptainer} exec {options} {python_sif} python3 -c "{PROBE}"'
    )
    job = sbatch(script, "--output=out.txt", "--job-name=e2e-apptainer")
    acct = wait_finished(job)
    assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0")
    assert (job_dir / "out.txt").read_text().strip().endswith("python 3.11 in apptainer")


@pytest.mark.timeout(120)
def test_exit_code_3_is_failed_3(job_dir: Path, testbed: Testbed) -> None:
    job = sbatch(write_script(job_dir, "echo about to fail; exit 3"), "--output=out.txt")
    acct = wait_finished(job)
    assert (acct.state, acct.exit_code) == ("FAILED", "3:0")
    assert (job_dir / "out.txt").read_text() == "about to fail\n"


@pytest.mark.timeout(180)
def test_job_over_its_memory_is_stopped(job_dir: Path, testbed: Testbed) -> None:
    hog = "python3 -c \"data = 'x' * (600 * 1024 * 1024); print(len(data))\""
    job = sbatch(write_script(job_dir, hog), "--mem=64M", "--output=out.txt")
    acct = wait_finished(job)
    if cgroups_usable():
        print("memory enforced by cgroups: expecting OUT_OF_MEMORY")
        assert acct.state == "OUT_OF_MEMORY", acct
    else:
        print("no cgroups on this host: expecting FAILED from OverMemoryKill")
        assert acct.state == "FAILED", acct
    assert "629145600" not in (job_dir / "out.txt").read_text()


@pytest.mark.timeout(120)
def test_gpu_job_lands_on_the_gpu_partition(job_dir: Path, testbed: Testbed) -> None:
    gpu_nodes = testbed.settings.gpu_nodes
    script = write_script(job_dir, 'echo "gpus=$SLURM_GPUS_ON_NODE"')
    job = sbatch(script, "-p", "gpu", "--gres=gpu:1", "--output=out.txt")
    acct = wait_finished(job)
    assert acct.state == "COMPLETED"
    assert acct.partition == "gpu"
    assert acct.node_list in gpu_nodes
    assert "gres/gpu=1" in acct.alloc_tres
    assert (job_dir / "out.txt").read_text() == "gpus=1\n"


@pytest.mark.timeout(120)
def test_job_without_partition_lands_on_the_default_one(job_dir: Path, testbed: Testbed) -> None:
    job = sbatch(write_script(job_dir, "hostname"), "--output=out.txt")
    acct = wait_finished(job)
    default = next(p for p in testbed.settings.partitions if p.default)
    assert acct.state == "COMPLETED"
    assert acct.partition == default.name
    assert acct.node_list in default.nodes


@pytest.mark.timeout(300)
def test_ordinary_user_runs_apptainer_in_a_job(
    testbed: Testbed, toolchain: Toolchain, ordinary_user: pwd.struct_passwd
) -> None:
    user = ordinary_user.pw_name
    folder = job_folder(testbed.settings.root / "e2e-jobs", f"user-{user}", owner=user)
    try:
        sif = ensure_test_images()[PYTHON_IMAGE]
        apptainer = toolchain.binary("apptainer")
        probe = f"{PROBE}; import os; print(os.getuid())"
        options = " ".join(run_options(ordinary_user.pw_uid))
        script = write_script(
            folder, f'id -un\nexec {apptainer} exec {options} {sif} python3 -c "{probe}"'
        )
        subprocess.run(["chown", user, str(script)], check=True)
        job = sbatch(script, "--output=out.txt", "--error=err.txt", user=user)
        acct = wait_finished(job)
        errors = (folder / "err.txt").read_text()
        assert (acct.state, acct.exit_code) == ("COMPLETED", "0:0"), errors
        assert (folder / "out.txt").read_text().splitlines() == [
            user,
            "python 3.11 in apptainer",
            str(ordinary_user.pw_uid),
        ]
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
