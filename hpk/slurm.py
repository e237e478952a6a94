"""The hpk command's Slurm adapter: submit, look up and cancel the control-plane job.

Every call passes argv, never a shell. A controller that cannot be reached raises
SlurmUnavailable; Slurm's own refusals raise SubmissionFailed with its message.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"}


class SlurmUnavailable(RuntimeError):
    """A Slurm command could not run or could not reach the controller."""


class SubmissionFailed(RuntimeError):
    """sbatch refused the job; the message is sbatch's."""


@dataclass(frozen=True)
class JobInfo:
    """One job as squeue shows it."""

    job_id: str
    state: str
    """Slurm's state, e.g. PENDING or RUNNING."""
    reason: str
    """Why it waits, for pending jobs ('None' otherwise)."""
    node: str
    """Node list; empty while pending."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _run(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmUnavailable(f"{argv[0]}: {error}") from error


def submit(script: Path, *, flags: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """sbatch the script with extra flags; returns the job ID."""
    result = _run(["sbatch", "--parsable", *flags, str(script)], env=env)
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip()
        if "Unable to contact slurm controller" in message:
            raise SlurmUnavailable(message)
        raise SubmissionFailed(message)
    return result.stdout.strip().split(";")[0]


def job_info(job_id: str) -> JobInfo | None:
    """The job as squeue sees it, or None once it has left the queue."""
    result = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i|%T|%r|%N"])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise SlurmUnavailable(result.stderr.strip())
    for line in result.stdout.splitlines():
        fields = line.split("|")
        if len(fields) == 4 and fields[0] == job_id:
            return JobInfo(*fields)
    return None


def cancel(job_id: str, *, batch_only: bool = False) -> None:
    """scancel the job; with batch_only, send SIGTERM to its batch script alone."""
    argv = ["scancel", "--batch", "--signal=TERM", job_id] if batch_only else ["scancel", job_id]
    result = _run(argv)
    if result.returncode != 0:
        raise SlurmUnavailable(result.stderr.strip())
