"""The README's first command, on the test bed: one Slurm job that runs the python test
image under Apptainer and prints what it computed.

It grows into "submit slurm/hpk.sbatch and run a pod with kubectl" as the control plane and
the kubelet land.
"""

from __future__ import annotations

import os
import subprocess

from hpk.apptainer import run_options
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
    """Submit the demo job, wait for it, and print its output and Slurm's verdict."""
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
