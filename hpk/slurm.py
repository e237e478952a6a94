"""The hpk command's use of Slurm: submitting, following and stopping the control-plane job.

It goes through the kubelet's Slurm adapter (kubelet_py.slurm), so both share one set of
commands, parsers and typed errors. The one call only `hpk down` needs is here: SIGTERM to
the job's batch shell alone, so that hpk stops the components in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kubelet_py.slurm import (
    QueueEntry,
    SlurmClient,
    SlurmUnavailable,
    SubmissionFailed,
    SubprocessRunner,
)

__all__ = ["QueueEntry", "SlurmUnavailable", "SubmissionFailed"]

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}

_runner = SubprocessRunner()
_client = SlurmClient(_runner)


def submit(script: Path, *, flags: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """sbatch the script with extra flags; returns the job ID."""
    return _client.submit(script, flags, env=env)


def job_info(job_id: str) -> QueueEntry | None:
    """The job as squeue lists it, or None once it has left the queue."""
    return _client.queue([job_id]).get(job_id)


def is_active(job: QueueEntry | None) -> bool:
    return job is not None and job.state in ACTIVE_STATES


def cancel(job_id: str) -> None:
    _client.cancel(job_id)


def stop_batch_shell(job_id: str) -> None:
    """SIGTERM to the batch shell alone, not to every process of the job."""
    result = _runner.run(["scancel", "--batch", "--signal=TERM", job_id], timeout=60)
    if result.returncode != 0:
        raise SlurmUnavailable(result.stderr.strip() or f"scancel exited {result.returncode}")
