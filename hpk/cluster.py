"""`hpk up`, `hpk down` and `hpk status`: the user's control plane seen from the login node.

`up` submits slurm/hpk.sbatch and follows the job until the API server answers; `down` asks
the job to stop in order and waits for it; `status` shows the job, the endpoint, each
component's health as the job last reported it, and the certificates' age.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpk import slurm
from hpk.controlplane.probes import TLSClient, answers
from hpk.files import private_dir
from hpk.home import HpkHome
from hpk.paths import project_root
from hpk.pki import ClusterPKI, load_certificate
from hpk.record import ClusterRecord, read_record

Progress = Callable[[str], None]


def sbatch_script() -> Path:
    return project_root() / "slurm" / "hpk.sbatch"


@dataclass(frozen=True)
class Running:
    """A control-plane job that Slurm still has, with what it last reported."""

    job: slurm.QueueEntry
    record: ClusterRecord


def running(home: HpkHome) -> Running | None:
    """The control plane of this hpk folder if its job is still queued or running."""
    record = read_record(home.record)
    if record is None or record.job_id is None:
        return None
    job = slurm.job_info(record.job_id)
    if job is None or not slurm.is_active(job):
        return None
    return Running(job, record)


def apiserver_ready(home: HpkHome, endpoint: str) -> bool:
    pki = ClusterPKI(home.pki)
    return answers(
        f"{endpoint}/readyz", tls=TLSClient(ca=pki.ca.cert, client=pki.admin), expect="ok"
    )


def up(
    home: HpkHome, *, flags: Sequence[str] = (), progress: Progress, timeout: float = 600
) -> int:
    """Submit the control-plane job unless one runs; wait until its API server answers."""
    current = running(home)
    if current is not None:
        progress(
            f"a control plane is already {current.job.state.lower()}: job {current.job.job_id}"
            f" on {current.job.nodes or '(not yet placed)'}; starting nothing"
        )
        progress(f"export KUBECONFIG={home.kubeconfig}")
        return 0
    private_dir(home.root)
    private_dir(home.job_logs)
    env = {
        **os.environ,
        "HPK_HOME": str(home.root),
        # The job runs hpk with this interpreter, wherever the user installed it.
        "HPK_PYTHON": sys.executable,
    }
    output = home.job_logs / "control-plane-%j.out"
    job_id = slurm.submit(sbatch_script(), flags=[f"--output={output}", *flags], env=env)
    progress(f"submitted job {job_id} (output: {str(output).replace('%j', job_id)})")
    return _follow(home, job_id, progress=progress, timeout=timeout)


def _follow(home: HpkHome, job_id: str, *, progress: Progress, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    said = ""
    while time.monotonic() < deadline:
        job = slurm.job_info(job_id)
        record = read_record(home.record)
        ours = record is not None and record.job_id == job_id
        if job is None or not slurm.is_active(job):
            state = job.state if job else "gone from the queue"
            message = record.message if ours and record else ""
            progress(f"job {job_id} ended ({state}) before the control plane was ready {message}")
            _show_output(home, job_id, progress)
            return 1
        if job.state == "PENDING":
            line = "queued" if job.reason in (None, "None", "") else f"queued ({job.reason})"
        elif ours and record and record.state == "ready":
            if apiserver_ready(home, record.apiserver):
                progress(f"ready: {record.apiserver} (job {job_id} on {job.nodes})")
                progress(f"export KUBECONFIG={home.kubeconfig}")
                return 0
            line = "waiting for the API server to answer"
        else:
            line = f"starting on {job.nodes}"
        if line != said:
            progress(line)
            said = line
        time.sleep(0.5)
    progress(f"job {job_id} not ready after {timeout:.0f} s; it keeps running (see `hpk status`)")
    return 1


def _show_output(home: HpkHome, job_id: str, progress: Progress) -> None:
    output = home.job_logs / f"control-plane-{job_id}.out"
    if output.exists():
        for line in output.read_text(errors="replace").splitlines()[-15:]:
            progress(f"  | {line}")


def down(home: HpkHome, *, progress: Progress, timeout: float = 120) -> int:
    """Ask the control-plane job to stop in order, and wait until it has."""
    current = running(home)
    if current is None:
        progress("no control plane is running")
        return 0
    job_id = current.job.job_id
    if current.job.state == "PENDING":
        slurm.cancel(job_id)
        progress(f"cancelled queued job {job_id}")
        return 0
    # SIGTERM to the batch shell alone lets hpk stop the components in order; a plain scancel
    # would signal every process of the job at once.
    slurm.stop_batch_shell(job_id)
    progress(f"stopping job {job_id} on {current.job.nodes}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = slurm.job_info(job_id)
        if not slurm.is_active(job):
            record = read_record(home.record)
            progress(f"stopped ({record.state if record else 'no record'})")
            return 0
        time.sleep(0.5)
    progress(f"job {job_id} still running after {timeout:.0f} s; cancelling it")
    slurm.cancel(job_id)
    return 1


def status(home: HpkHome, *, show: Progress) -> int:
    """Print the control plane's job, endpoint, health and certificates; 0 when it is ready."""
    record = read_record(home.record)
    current = running(home)
    if record is None:
        show(f"no control plane has run from {home.root}")
        return 3
    job = current.job if current else None
    show(f"job:        {record.job_id} ({job.state if job else 'not in the queue'})")
    show(f"node:       {record.node}")
    state = record.state
    if current is None and state in ("starting", "ready", "stopping"):
        state += " (last word of a job that is no longer in the queue)"
    show(f"state:      {state}{' - ' + record.message if record.message else ''}")
    show(f"endpoint:   {record.apiserver or '-'}")
    reachable = bool(current and record.apiserver and apiserver_ready(home, record.apiserver))
    show(f"api server: {'answers /readyz' if reachable else 'not reachable'}")
    age = time.time() - record.updated
    for name, healthy in record.health.items():
        show(f"  {name:24} {'healthy' if healthy else 'UNHEALTHY'} ({age:.0f} s ago)")
    show("certificates:")
    for line in certificate_ages(home):
        show(f"  {line}")
    return 0 if reachable and record.state == "ready" else 3


def certificate_ages(home: HpkHome) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    lines = []
    for cert_file in sorted(home.pki.rglob("*.crt")):
        cert = load_certificate(cert_file)
        issued = (now - cert.not_valid_before_utc).days
        left = (cert.not_valid_after_utc - now).days
        name = str(cert_file.relative_to(home.pki).with_suffix(""))
        lines.append(f"{name:28} issued {issued} d ago, expires in {left} d")
    return lines
