"""Rendering of the test bed's Slurm configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpk.testbed.config import render_slurm_config
from hpk.testbed.settings import Partition, TestbedSettings

GOLDEN = Path(__file__).parent / "golden"


def settings(**overrides: object) -> TestbedSettings:
    return TestbedSettings.from_overrides(root=Path("/srv/bed"), **overrides)


def conf_lines(text: str) -> dict[str, list[str]]:
    """slurm.conf as key -> values, in order, comments dropped."""
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            lines.setdefault(key, []).append(value)
    return lines


def test_slurm_conf_matches_golden_file() -> None:
    config = render_slurm_config(settings(), hostname="node0", cgroups=True, db_password="pw")
    golden = GOLDEN / "slurm.conf"
    if os.environ.get("HPK_UPDATE_GOLDEN"):
        golden.write_text(config.files["slurm.conf"])
    assert config.files["slurm.conf"] == golden.read_text()


def test_nodes_have_their_own_ports_and_the_gpu_node_its_gres() -> None:
    config = render_slurm_config(settings(), hostname="node0", cgroups=True, db_password="pw")
    nodes = conf_lines(config.files["slurm.conf"])["NodeName"]
    assert [n.split()[0] for n in nodes] == ["n1", "n2", "n3", "n4"]
    assert [n.split("Port=")[1].split()[0] for n in nodes] == ["16821", "16822", "16823", "16824"]
    assert "Gres=gpu:2" in nodes[3] and all("Gres" not in n for n in nodes[:3])
    assert (
        "NodeName=n4 Name=gpu Count=2 File=/srv/bed/state/fake-gpu/gpu[0-1]"
        in (config.files["gres.conf"])
    )


def test_partitions_and_default() -> None:
    config = render_slurm_config(settings(), hostname="h", cgroups=True, db_password="pw")
    partitions = conf_lines(config.files["slurm.conf"])["PartitionName"]
    assert partitions == [
        "batch Nodes=n1,n2,n3 Default=YES MaxTime=INFINITE State=UP",
        "gpu Nodes=n4 Default=NO MaxTime=INFINITE State=UP",
    ]


def test_memory_enforcement_follows_cgroup_availability() -> None:
    with_cg = conf_lines(
        render_slurm_config(settings(), hostname="h", cgroups=True, db_password="pw").files[
            "slurm.conf"
        ]
    )
    without = conf_lines(
        render_slurm_config(settings(), hostname="h", cgroups=False, db_password="pw").files[
            "slurm.conf"
        ]
    )
    assert with_cg["TaskPlugin"] == ["task/cgroup"]
    assert with_cg["ProctrackType"] == ["proctrack/cgroup"]
    assert without["TaskPlugin"] == ["task/none"]
    assert without["JobAcctGatherParams"] == ["OverMemoryKill"]


def test_database_password_only_in_the_secret_file() -> None:
    config = render_slurm_config(settings(), hostname="h", cgroups=True, db_password="s3cr3t")
    holders = {name for name, text in config.files.items() if "s3cr3t" in text}
    assert holders == {"slurmdbd.conf"} == set(config.secret_files)


def test_unknown_setting_lists_the_valid_ones() -> None:
    with pytest.raises(
        TypeError, match=r"unknown test bed settings \['cpu'\]; valid: .*cpus_per_node"
    ):
        TestbedSettings.from_overrides(cpu=4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"root": Path("/srv/my bed")}, "whitespace"),
        ({"partitions": (Partition("batch", ("n9",), default=True),)}, "unknown nodes"),
        ({"partitions": (Partition("a", ("n1",)), Partition("b", ("n2",)))}, "default"),
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TestbedSettings.from_overrides(**overrides)
