"""The job's network step (kubelet_py.job.network): a part that cannot start leaves the pod on
the node's network, with the reason on its one line and in the `network` marker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubelet_py.job.netns import TUN_DEVICE


def run_network(config: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-I", "-m", "kubelet_py.job.network", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_an_unreadable_configuration_leaves_the_pod_on_the_nodes_network(tmp_path: Path) -> None:
    said = run_network(tmp_path / "missing.json")
    assert said.startswith("host cannot read the network configuration"), said


def test_a_tunnel_that_cannot_run_is_the_reason_given(tmp_path: Path) -> None:
    try:
        open(TUN_DEVICE, "rb").close()
    except OSError as error:
        pytest.skip(f"{TUN_DEVICE} cannot be opened here: {error.strerror}")
    marker = tmp_path / "network"
    config = tmp_path / "network.json"
    missing = tmp_path / "no-such-tunnel"
    config.write_text(
        json.dumps(
            {
                "interface": {"name": "hpk0", "address": "10.244.0.9/32", "mtu": 1420},
                "tunnel": {"binary": str(missing), "config": ""},
                "marker": str(marker),
            }
        )
    )
    said = run_network(config)
    assert said == f"host cannot run {missing}: No such file or directory", said
    assert marker.read_text() == f"{said}\n"
