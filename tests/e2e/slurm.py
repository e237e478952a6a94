"""A small Slurm client for the end-to-end tests: submit, wait, and read what Slurm reports.

The product's own Slurm adapter lives in kubelet_py; this one exists so that the tests of the
test bed read Slurm's answers directly, with nothing of hpk in between.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


@dataclass(frozen=True)
class Accounting:
    """One job's line of `sacct -P -X`."""

    state: str
    exit_code: str
    partition: str
    node_list: str
    alloc_tres: str


def run_as(user: str | None, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def sbatch(script: Path, *flags: str, user: str | None = None, cwd: Path | None = None) -> str:
    """Submit a batch script; return the job ID. Fails the test with sbatch's message."""
    result = run_as(user, ["sbatch", "--parsable", *flags, str(script)], cwd=cwd or script.parent)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def accounting(job_id: str) -> Accounting | None:
    result = run_as(
        None,
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-j",
            job_id,
            "-o",
            "State,ExitCode,Partition,NodeList,AllocTRES",
        ],
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return None
    state, exit_code, partition, node_list, tres = lines[-1].split("|")
    return Accounting(state.split()[0], exit_code, partition, node_list, tres)


def wait_finished(job_id: str, timeout: float = 120) -> Accounting:
    """Poll sacct until the job has a terminal state and its record is complete: slurmdbd can
    report the final state a moment before the partition and node list."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = accounting(job_id)
        if seen and seen.state in TERMINAL and seen.partition and seen.node_list:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s; last sacct: {seen}")


def job_folder(root: Path, name: str, owner: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if owner:
        subprocess.run(["chown", "-R", owner, str(folder)], check=True)
    os.chmod(folder, 0o755)
    return folder
