"""The README's first command, on the test bed: a Slurm job that runs the python test image
under Apptainer, then `hpk up` (the control-plane job), then a pod created with kubectl, shown
as Kubernetes sees it (`kubectl get pod`, `kubectl logs`) and as Slurm does (`sacct`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from hpk import cluster
from hpk.apptainer import run_options
from hpk.home import HpkHome
from hpk.images import cached_image
from hpk.testbed.bed import Progress, Testbed, TestbedError
from hpk.testbed.images import register_test_images
from hpk.toolchain import Toolchain
from kubelet_py.provider import JOB_ID_ANNOTATION

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
    status = run_demo_pod(home, progress)
    if status != 0:
        return status
    progress(f"the cluster keeps running: export KUBECONFIG={home.kubeconfig}; `hpk down` stops it")
    return 0


DEMO_POD = "hpk-demo"
DEMO_POD_MANIFEST = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": DEMO_POD, "namespace": "default"},
    "spec": {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "hello",
                "image": DEMO_IMAGE,
                "command": ["python3", "-c", DEMO_PROGRAM],
                "resources": {"requests": {"cpu": "1", "memory": "512Mi"}},
            }
        ],
    },
}


def run_demo_pod(home: HpkHome, progress: Progress = print) -> int:
    """Create a pod with kubectl, wait for it to end, and show it, its log and its job."""
    kubectl = [str(Toolchain.load().binary("kubectl")), f"--kubeconfig={home.kubeconfig}"]

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*kubectl, *args], input=stdin, capture_output=True, text=True, timeout=300, check=False
        )

    def show(*args: str) -> int:
        progress(f"kubectl {' '.join(args)}")
        shown = run(*args)
        for line in (shown.stdout + shown.stderr).splitlines():
            progress(f"  | {line}")
        return shown.returncode

    def until_done(*args: str, stdin: str | None = None, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while (done := run(*args, stdin=stdin)).returncode != 0:
            if time.monotonic() > deadline:
                progress(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
                return False
            time.sleep(1)
        return True

    # `hpk up` is ready once the kubelet's nodes are registered; the controller-manager
    # creates the namespace's service account a moment after the API server is ready.
    run("delete", "pod", DEMO_POD, "--ignore-not-found", "--wait=true")
    if show("get", "nodes") or not until_done(
        "create", "-f", "-", stdin=json.dumps(DEMO_POD_MANIFEST)
    ):
        return 1
    progress(f"pod {DEMO_POD} created; waiting for it to succeed")
    wait = ["wait", f"pod/{DEMO_POD}", "--for=jsonpath={.status.phase}=Succeeded"]
    if show(*wait, "--timeout=300s") or show("get", "pod", DEMO_POD, "-o", "wide"):
        show("describe", "pod", DEMO_POD)
        return 1
    if show("logs", DEMO_POD):
        return 1
    found = run("get", "pod", DEMO_POD, "-o", "json")
    job_id = json.loads(found.stdout)["metadata"]["annotations"][JOB_ID_ANNOTATION]
    fields = "JobID,JobName%30,Partition,AllocCPUS,ReqMem,State,ExitCode"
    progress(f"sacct -X -j {job_id} -o {fields}")
    # slurmdbd completes a job's record (its name among others) a moment after the job ends.
    deadline = time.monotonic() + 30
    while True:
        accounted = subprocess.run(
            ["sacct", "-X", "-j", job_id, "-o", fields],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if f"/{DEMO_POD}" in accounted.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    for line in (accounted.stdout + accounted.stderr).splitlines():
        progress(f"  | {line}")
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
