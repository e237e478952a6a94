"""The provider on the pod network: each pod's address and key, told to the hub (a unix
socket answering as hpk-tunnel's does), its podIP once the job reports it, and
the Warning and the nodes' condition when a node refuses the pod its own network."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from kubelet_py.adapters.hub import new_private_key, public_key
from kubelet_py.job.podfolder import write_marker
from kubelet_py.pod.network import PodNetworkSettings
from kubelet_py.provider import NETWORK_FALLBACK, SlurmProvider
from tests.unit.fakes import Bed, FakeHubSocket, job_view, make_pod


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHubSocket]:
    running = FakeHubSocket(tmp_path / "hub.sock")
    yield running
    running.close()


ECHO = {"metadata": {"name": "echo"}, "spec": {"clusterIP": "10.96.0.77", "ports": [{"port": 80}]}}


def on_the_network(bed: Bed, control: Path) -> SlurmProvider:
    network = PodNetworkSettings(
        hub_endpoint="192.0.2.10:51820",
        hub_public_key=public_key(new_private_key()),
        tunnel=PurePosixPath("/opt/hpk-tunnel"),
    )
    settings = replace(
        bed.provider.settings,
        network=network,
        hub_control=control,
        node_addresses={"n1": "192.0.2.21"},
    )
    return SlurmProvider(
        slurm=bed.slurm, watcher=bed.watcher, settings=settings, services=lambda _ns: [ECHO]
    )


def test_a_pod_gets_an_address_and_a_key_the_hub_knows_and_loses_them_when_forgotten(
    tmp_path: Path, hub: FakeHubSocket
) -> None:
    bed = Bed(tmp_path)
    provider = on_the_network(bed, tmp_path / "hub.sock")
    pod = make_pod()
    job_id = provider.create_pod(pod)
    config = json.loads((bed.folder() / "network.json").read_text())
    assert config["interface"]["address"] == "10.244.0.2/32"
    private = next(
        line.partition("=")[2]
        for line in config["tunnel"]["config"].splitlines()
        if line.startswith("private_key=")
    )
    added = hub.requests[0].splitlines()
    assert added[:2] == ["set=1", f"public_key={public_key(private)}"]
    assert "allowed_ip=10.244.0.2/32" in added

    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    status = provider.get_pod_status("default", "web")
    assert status is not None and "podIP" not in status  # the job has not said yet
    write_marker(bed.folder() / "network", "pod")
    status = provider.get_pod_status("default", "web")
    assert status is not None and status["podIP"] == "10.244.0.2"
    assert provider.network_condition()[:2] == (True, "HubReady")

    provider.forget(pod)
    assert hub.requests[-1].splitlines()[1:3] == [
        f"public_key={public_key(private)}",
        "remove=true",
    ]


def test_a_node_that_refused_is_warned_of_once_and_shown_on_the_nodes(
    tmp_path: Path, hub: FakeHubSocket
) -> None:
    bed = Bed(tmp_path)
    provider = on_the_network(bed, tmp_path / "hub.sock")
    job_id = provider.create_pod(make_pod())
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    reason = "cannot open /dev/net/tun: Permission denied"
    write_marker(bed.folder() / "network", f"host {reason}")
    status = provider.get_pod_status("default", "web")
    assert status is not None and status["podIP"] == status["hostIP"] == "192.0.2.21"
    warnings = provider.take_warnings("default/web")
    assert [w[0] for w in warnings] == [NETWORK_FALLBACK] and reason in warnings[0][1]
    provider.get_pod_status("default", "web")
    assert provider.take_warnings("default/web") == ()  # once
    ready, why, message = provider.network_condition()
    assert (ready, why) == (False, NETWORK_FALLBACK) and reason in message


def test_without_a_hub_the_nodes_say_pods_use_their_network(tmp_path: Path) -> None:
    assert Bed(tmp_path).provider.network_condition()[:2] == (False, "NoPodNetwork")


def test_a_pod_on_the_pod_network_gets_its_namespaces_service_links(
    tmp_path: Path, hub: FakeHubSocket
) -> None:
    bed = Bed(tmp_path)
    provider = on_the_network(bed, tmp_path / "hub.sock")
    provider.create_pod(make_pod())
    assert "ECHO_SERVICE_HOST=10.96.0.77\n" in (bed.folder() / "env" / "main").read_text()
    off = make_pod("quiet", uid="u-quiet")
    off["spec"]["enableServiceLinks"] = False
    provider.create_pod(off)
    env = bed.folder("quiet") / "env" / "main"
    assert not env.exists() or "ECHO_SERVICE_HOST" not in env.read_text()


def test_after_a_restart_an_adopted_pod_keeps_its_address_and_key(
    tmp_path: Path, hub: FakeHubSocket
) -> None:
    bed = Bed(tmp_path)
    pod = make_pod()
    job_id = on_the_network(bed, tmp_path / "hub.sock").create_pod(pod)
    added = hub.requests[-1]
    bed.listed(job_id, pod["metadata"]["uid"])
    restarted = on_the_network(bed, tmp_path / "hub.sock")
    assert restarted.create_pod(pod) == job_id
    assert restarted.adopted("default/web") == "pod folder"
    assert hub.requests[-1] == added  # the same key, told to the hub again, for the same address
    bed.watcher.views[job_id] = job_view(job_id, "RUNNING")
    write_marker(bed.folder() / "network", "pod")
    status = restarted.get_pod_status("default", "web")
    assert status is not None and status["podIP"] == "10.244.0.2"
