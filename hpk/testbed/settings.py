"""Settings of the local test bed, with one docstring per field."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from hpk.controlplane.settings import ControlPlaneSettings


@dataclass(frozen=True)
class Partition:
    name: str
    """Slurm partition name."""
    nodes: tuple[str, ...]
    """Node names in this partition."""
    default: bool = False
    """Whether jobs without -p land here."""


@dataclass(frozen=True)
class TestbedSettings:
    """Everything that shapes the test bed's Slurm cluster."""

    __test__ = False  # not a pytest test class, despite the name

    root: Path = field(
        default_factory=lambda: Path(os.environ.get("HPK_TESTBED_DIR", "/var/tmp/hpk-testbed"))  # noqa: S108
    )
    """Folder for the bed's configuration, state, logs and pid files (world-readable, so that
    ordinary users can read slurm.conf and reach munge)."""

    cluster_name: str = "hpkdev"
    """Slurm ClusterName, also registered in slurmdbd."""

    nodes: tuple[str, ...] = ("n1", "n2", "n3", "n4")
    """Names of the slurmd nodes, all on this host ("multiple slurmd")."""

    partitions: tuple[Partition, ...] = (
        Partition("batch", ("n1", "n2", "n3"), default=True),
        Partition("gpu", ("n4",)),
    )
    """Partitions; the first one marked default takes jobs without -p."""

    gpu_nodes: tuple[str, ...] = ("n4",)
    """Nodes that advertise gres/gpu (count only, no real devices)."""

    gpus_per_node: int = 2
    """How many GPUs each GPU node claims."""

    cpus_per_node: int = 16
    """CPUs each node claims (may exceed the host's; config_overrides allows it)."""

    memory_per_node_mb: int = 32768
    """RealMemory each node claims, in MB."""

    default_mem_per_cpu_mb: int = 256
    """DefMemPerCPU, so a job without --mem does not take a whole node."""

    slurmctld_port: int = 16817
    """Port of slurmctld."""

    slurmdbd_port: int = 16819
    """Port of slurmdbd."""

    slurmd_first_port: int = 16821
    """Port of the first slurmd; the others follow."""

    mariadb_port: int = 16306
    """Port of the bed's MariaDB, on 127.0.0.1 only."""

    min_job_age_s: int = 300
    """MinJobAge: how long finished jobs stay visible to squeue."""

    kill_wait_s: int = 10
    """KillWait: seconds between SIGTERM and SIGKILL when a job is cancelled."""

    def __post_init__(self) -> None:
        if any(ch.isspace() for ch in str(self.root)):
            raise ValueError(f"the test bed folder may not contain whitespace: {self.root!r}")
        known = set(self.nodes)
        for partition in self.partitions:
            unknown = set(partition.nodes) - known
            if unknown:
                raise ValueError(
                    f"partition {partition.name} names unknown nodes {sorted(unknown)}; "
                    f"known nodes: {sorted(known)}"
                )
        if sum(p.default for p in self.partitions) != 1:
            raise ValueError("exactly one partition must be the default")

    @classmethod
    def from_overrides(cls, **overrides: object) -> TestbedSettings:
        """Build settings from keyword overrides, rejecting unknown names with the valid list."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown test bed settings {unknown}; valid: {sorted(valid)}")
        return cls(**overrides)  # type: ignore[arg-type]

    def slurmd_port(self, node: str) -> int:
        return self.slurmd_first_port + self.nodes.index(node)

    # Layout of the bed's folder.
    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.run / "munge" / "munge.socket"


TESTBED_PLANE_SETTINGS = ControlPlaneSettings(
    dns_bind_address="127.0.0.1",
    etcd_ready_timeout_s=90.0,
    apiserver_ready_timeout_s=150.0,
    controller_manager_ready_timeout_s=120.0,
    coredns_ready_timeout_s=90.0,
)
"""Control-plane settings for the planes the end-to-end tests and the benchmark start on the
test bed's host: CoreDNS on loopback only, and generous start-up times, because the host has
two cores and may be busy with something else."""
