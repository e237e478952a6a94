"""The README's first command, on the test bed: a Slurm job that runs the python test image
under Apptainer, then `hpk up` (the control-plane job) and kubectl against it.

It grows into "run a pod with kubectl" as the kubelet lands.
"""

from __future__ import annotations

import os
import subprocess

from hpk import cluster
from hpk.apptainer import run_options
from hpk.home import HpkHome
from hpk.images import cached_image
from hpk.test_images import register_test_images
from hpk.testbed.bed import Progress, Testbed, TestbedError
from hpk.toolchain import Toolchain

DEMO_IMAGE = "docker.io/library/python:3.11"
DEMO_PROGRAM = (
    "import platform; "
    "print(f'hello from python {platform.python_version()} in Apptainer, "
    "sum(range(10**6)) = {sum(range(10**6))}')"
)


def run_demo(bed: Testbed, progress: Progress = print) -> int:
    """Run an Apptainer job, then the control plane, and show kubectl working."""
    status = run_apptainer_job(bed, progress)
    if status != 0:
        return status
    os.environ.update(bed.env())
    home = HpkHome.default()
    progress(f"hpk up (state in {home.root})")
    status = cluster.up(home, progress=progress)
    if status != 0:
        return status
    kubectl = str(Toolchain.load().binary("kubectl"))
    for args in (["get", "--raw=/readyz"], ["get", "namespaces"]):
        progress(f"kubectl {' '.join(args)}")
        shown = subprocess.run(
            [kubectl, f"--kubeconfig={home.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for line in (shown.stdout + shown.stderr).splitlines():
            progress(f"  | {line}")
        if shown.returncode != 0:
            return shown.returncode
    progress(f"the cluster keeps running: export KUBECONFIG={home.kubeconfig}; `hpk down` stops it")
    return 0


def run_apptainer_job(bed: Testbed, progress: Progress = print) -> int:
    """Submit a job that runs the python image, wait, and print its output and verdict."""
    progress("test images")
    register_test_images()
    sif = cached_image(DEMO_IMAGE)
    if sif is None:
        raise TestbedError(f"{DEMO_IMAGE} is missing from hpk's image cache after registration")
    apptainer = Toolchain.load().binary("apptainer")

    folder = bed.settings.root / "demo"
    folder.mkdir(exist_ok=True)
    (folder / "demo.out").unlink(missing_ok=True)
    script = folder / "demo.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=hpk-demo\n"
        "#SBATCH --output=demo.out\n"
        'echo "job $SLURM_JOB_ID on node $SLURMD_NODENAME"\n'
        f'exec {apptainer} exec {" ".join(run_options())} {sif} python3 -c "{DEMO_PROGRAM}"\n'
    )
    env = {**os.environ, **bed.env()}
    progress(f"sbatch --wait {script}")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", str(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    output = folder / "demo.out"
    for line in (output.read_text() if output.exists() else "").splitlines():
        progress(f"  | {line}")
    if not job_id:
        progress(f"sbatch refused the job: {submitted.stderr.strip()}")
        return 1
    verdict = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    progress(f"sacct: {verdict or '(no record yet)'}")
    return submitted.returncode
