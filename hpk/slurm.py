"""The hpk command's use of Slurm: submitting, following and stopping the control-plane job.

It goes through the kubelet's Slurm adapter (kubelet_py.adapters.slurm), so both share one set of
commands, parsers, job-ID checks and typed errors. The one call only `hpk down` needs is
here: SIGTERM to the job's batch shell alone, so that hpk stops the components in order.

The job IDs come from hpk's own cluster record and submissions, never from a pod: nothing in
kubelet_py imports this module, and the kubelet acts only on jobs it proves a pod's own (see
kubelet_py.provider), which the control-plane job never is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kubelet_py.adapters.slurm import (
    QueueEntry,
    SlurmClient,
    SlurmUnavailable,
    SubmissionFailed,
    SubprocessRunner,
)

__all__ = ["QueueEntry", "SlurmUnavailable", "SubmissionFailed"]

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}

_client = SlurmClient(SubprocessRunner())


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


def stop_batch_shell(job_id: str, *, client: SlurmClient | None = None) -> None:
    """SIGTERM to the batch shell alone, not to every process of the job.

    Raises ValueError for a string that is not a job ID (nothing runs then), SlurmUnavailable
    or SlurmError when scancel fails.
    """
    (client or _client).cancel(job_id, signal="TERM", batch_only=True)
