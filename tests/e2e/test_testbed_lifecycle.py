"""`hpk dev up` and `down` on a bed of their own: up is idempotent and recovers a crashed
daemon, and down leaves no process, port or cgroup behind.

This bed has its own folder, ports and node names, so it runs beside the session's bed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hpk.testbed.bed import Testbed, port_listeners
from hpk.testbed.settings import Partition, TestbedSettings
from tests.e2e.slurm import sbatch, wait_finished


@pytest.fixture
def small_bed() -> Iterator[Testbed]:
    # munged insists that every folder above its socket is traversable by all users, which
    # pytest's own temporary folders are not.
    root = Path(tempfile.mkdtemp(prefix="hpk-lifecycle-", dir="/var/tmp"))
    settings = TestbedSettings.from_overrides(
        root=root,
        cluster_name="hpklife",
        nodes=("lc1", "lc2"),
        partitions=(Partition("batch", ("lc1",), default=True), Partition("gpu", ("lc2",))),
        gpu_nodes=("lc2",),
        slurmctld_port=26817,
        slurmdbd_port=26819,
        slurmd_first_port=26821,
        mariadb_port=26306,
    )
    bed = Testbed(settings)
    yield bed
    bed.down(progress=print)
    shutil.rmtree(root)


def ports(settings: TestbedSettings) -> list[int]:
    return [settings.slurmctld_port, settings.slurmdbd_port, settings.mariadb_port] + [
        settings.slurmd_port(n) for n in settings.nodes
    ]


def slurm_env(bed: Testbed) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(bed.settings.slurm_conf)}


@pytest.mark.timeout(600)
def test_up_is_idempotent_recovers_and_down_leaves_nothing(small_bed: Testbed) -> None:
    s = small_bed.settings
    small_bed.up(progress=print)
    first = dict(small_bed.status())
    assert all(first.values()), first

    small_bed.up(progress=print)
    assert dict(small_bed.status()) == first, "a second up must not restart anything"

    # A crash of slurmctld leaves a stale pid file; up starts it again, the rest untouched.
    crashed = first["slurmctld"]
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    psutil.Process(crashed).wait(timeout=10)
    small_bed.up(progress=print)
    after = dict(small_bed.status())
    assert after["slurmctld"] not in (None, crashed)
    assert {k: v for k, v in after.items() if k != "slurmctld"} == {
        k: v for k, v in first.items() if k != "slurmctld"
    }

    # The recovered bed runs jobs, and a job still running at down is cancelled.
    script = s.root / "sleep.sh"
    script.write_text("#!/bin/bash\nsleep 300\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(s.slurm_conf))
        quick = s.root / "quick.sh"
        quick.write_text("#!/bin/bash\necho hi\n")
        assert wait_finished(sbatch(quick, "--output=/dev/null")).state == "COMPLETED"
        sbatch(script, "--output=/dev/null")

    small_bed.down(progress=print)
    pids = [pid for pid in after.values() if pid]
    assert not [pid for pid in pids if psutil.pid_exists(pid)], "a daemon survived down"
    assert not [p for p in ports(s) if port_listeners(p)], "a port is still held"
    leftovers = [str(p) for n in s.nodes for p in Path("/sys/fs/cgroup").glob(f"*/slurm_{n}")]
    assert not leftovers, f"cgroups left behind: {leftovers}"
    stray = subprocess.run(
        ["pgrep", "-f", f"sleep.sh|{s.root}"], capture_output=True, text=True, check=False
    )
    assert stray.stdout.strip() == "", "a job process survived down"
    assert all(pid is None for _, pid in small_bed.status())


@pytest.mark.timeout(60)
def test_down_with_nothing_running_is_a_no_op(small_bed: Testbed) -> None:
    said: list[str] = []
    small_bed.down(progress=said.append)
    assert said == ["nothing running"]
