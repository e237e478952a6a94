"""The cluster record: which Slurm job runs the control plane, on which node, in what state.

The job writes it (~/.hpk/control-plane.json, 0600) as it starts, becomes ready, checks its
components and stops; `hpk up`, `down` and `status` on the login node read it. It is only a
report: whether a control plane really runs is decided by the lock it holds and by Slurm.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpk.files import write_atomic

STATES = ("starting", "ready", "stopping", "stopped", "failed")


@dataclass
class ClusterRecord:
    """What the control-plane job last said about itself."""

    job_id: str | None
    """Slurm job ID, or None when run outside Slurm."""
    node: str
    """Host name of the node the job runs on."""
    pid: int
    """Pid of `hpk control-plane run` on that node."""
    state: str = "starting"
    """One of STATES."""
    apiserver: str = ""
    """The API server's URL as the login node reaches it."""
    message: str = ""
    """Why the job failed, or the last noteworthy event."""
    health: dict[str, bool] = field(default_factory=dict)
    """Each component's last health check, by name."""
    started: float = field(default_factory=time.time)
    """When the job began (Unix time)."""
    updated: float = field(default_factory=time.time)
    """When this record was written (Unix time)."""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown control-plane state {self.state!r}; valid: {STATES}")

    def save(self, path: Path) -> None:
        self.updated = time.time()
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


def read_record(path: Path) -> ClusterRecord | None:
    """The record at `path`, or None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text())
        return ClusterRecord(**data)
    except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError):
        return None
