"""Which pods join the pod network, their addresses, and their job's network file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import pytest

from kubelet_py.adapters.hub import new_private_key, public_key
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.environment import service_links
from kubelet_py.pod.network import (
    AddressPool,
    PodAddress,
    PodNetworkSettings,
    hosts_file,
    network_config,
    resolv_conf,
    wants_pod_network,
)
from kubelet_py.pod.render import RenderSettings, render_pod

HUB_KEY = public_key(new_private_key())
NETWORK = PodNetworkSettings(
    hub_endpoint="192.0.2.10:51820",
    hub_public_key=HUB_KEY,
    tunnel=PurePosixPath("/opt/tools/hpk-tunnel"),
)


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "default",
            "name": "web",
            "uid": "u-1",
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "main", "image": "busybox"}], **spec},
    }


def test_a_pod_joins_unless_it_asks_for_the_nodes_network_or_runs_srun() -> None:
    assert wants_pod_network(pod())
    assert not wants_pod_network(pod(hostNetwork=True))
    assert not wants_pod_network(pod({"hpk.io/network": "host"}))
    assert not wants_pod_network(pod({"slurm.hpk.io/launcher": "srun"}))
    assert wants_pod_network(pod({"hpk.io/network": "pod"}))


@pytest.mark.parametrize(
    ("annotations", "spec", "says"),
    [
        ({"hpk.io/network": "overlay"}, {}, "neither"),
        ({"hpk.io/network": "pod"}, {"hostNetwork": True}, "hostNetwork"),
        ({"hpk.io/network": "pod", "slurm.hpk.io/launcher": "srun"}, {}, "srun"),
    ],
)
def test_a_choice_it_cannot_have_is_refused(
    annotations: dict[str, str], spec: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidPodSpec, match=says) as refused:
        wants_pod_network(pod(annotations, **spec))
    assert refused.value.field == "metadata.annotations[hpk.io/network]"


def test_addresses_are_unique_never_the_hubs_and_not_reused_at_once() -> None:
    pool = AddressPool("10.244.0.0/29")  # 6 hosts: the hub's and 5 for pods
    assert pool.hub == "10.244.0.1"
    taken = [pool.take(f"pod-{n}") for n in range(5)]
    assert taken == [f"10.244.0.{n}" for n in range(2, 7)]
    assert pool.take("pod-0") == "10.244.0.2"  # the same owner keeps its address
    with pytest.raises(RuntimeError, match="no free address"):
        pool.take("pod-5")
    pool.release("pod-1")
    pool.release("pod-3")
    assert pool.take("pod-5") == "10.244.0.3"  # the free one after the last given
    assert pool.take("pod-6") == "10.244.0.5"


def test_restored_addresses_are_held_again_and_never_doubled() -> None:
    pool = AddressPool("10.244.0.0/16")
    assert pool.restore("a", "10.244.3.7")
    assert pool.restore("a", "10.244.3.7")
    assert not pool.restore("b", "10.244.3.7")
    assert not pool.restore("b", "10.244.0.1")  # the hub's
    assert not pool.restore("b", "10.245.0.2")  # outside the range
    assert pool.take("a") == "10.244.3.7"


def test_the_network_file_names_the_hub_and_keeps_the_key_to_itself() -> None:
    private = new_private_key()
    text = network_config(
        NETWORK, PodAddress("10.244.0.9", private), marker=PurePosixPath("/pods/x/network")
    )
    config = json.loads(text)
    assert config["interface"] == {
        "name": "hpk0",
        "address": "10.244.0.9/32",
        "mtu": 1420,
        "routes": ["10.244.0.0/16", "10.96.0.0/16"],
    }
    tunnel = config["tunnel"]["config"].splitlines()
    assert f"private_key={private}" in tunnel
    assert f"public_key={HUB_KEY}" in tunnel
    assert "endpoint=192.0.2.10:51820" in tunnel
    assert config["egress"] == "slirp4netns"
    assert config["marker"] == "/pods/x/network"


def test_a_joining_pods_script_enters_its_namespace_and_a_host_pods_does_not() -> None:
    settings = RenderSettings(
        pod_dir=PurePosixPath("/pods/default/web"),
        apptainer=PurePosixPath("/usr/bin/apptainer"),
        images={"busybox": PurePosixPath("/images/busybox.sif")},
        network=NETWORK,
    )
    address = PodAddress("10.244.0.9", new_private_key())
    joined = render_pod(pod(), settings, address=address)
    assert "kubelet_py.job.network network.json" in joined.script
    assert '"${enter[@]}" "$python" -I -m kubelet_py.job.launch' in joined.script
    assert json.loads(joined.files["network.json"])["interface"]["address"] == "10.244.0.9/32"

    host = render_pod(pod(hostNetwork=True, hostAliases=[{"ip": "192.0.2.7"}]), settings)
    assert host.warnings == (
        ("NodeNetwork", "hostAliases: not honoured, the pod uses its node's network"),
    )
    assert "kubelet_py.job.network" not in host.script
    assert "enter" not in host.script
    assert "network.json" not in host.files

    with pytest.raises(ValueError, match="needs its address"):
        render_pod(pod(), settings)


def test_keys_pair_as_wireguard_pairs_them() -> None:
    # RFC 7748's test vector (Alice's key pair).
    private = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
    assert public_key(private) == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert len(bytes.fromhex(new_private_key())) == 32


def test_cluster_first_names_the_cluster_dns_with_the_kubernetes_search_path() -> None:
    assert resolv_conf(pod(), NETWORK) == (
        "nameserver 10.96.0.10\n"
        "search default.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )
    assert resolv_conf(pod(dnsPolicy="Default"), NETWORK) is None  # the node's


def test_dns_config_adds_to_the_policy_and_none_takes_it_alone() -> None:
    config = {
        "nameservers": ["192.0.2.53"],
        "searches": ["lab.example"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}],
    }
    assert resolv_conf(pod(dnsConfig=config), NETWORK) == (
        "nameserver 10.96.0.10\nnameserver 192.0.2.53\n"
        "search default.svc.cluster.local svc.cluster.local cluster.local lab.example\n"
        "options ndots:2 edns0\n"
    )
    assert resolv_conf(pod(dnsPolicy="None", dnsConfig=config), NETWORK) == (
        "nameserver 192.0.2.53\nsearch lab.example\noptions ndots:2 edns0\n"
    )
    with pytest.raises(InvalidPodSpec, match="needs a nameserver"):
        resolv_conf(pod(dnsPolicy="None"), NETWORK)
    with pytest.raises(InvalidPodSpec, match="no IP address"):
        resolv_conf(pod(dnsConfig={"nameservers": ["dns.example; rm -rf /"]}), NETWORK)


def test_the_hosts_file_names_the_pod_its_fqdn_and_its_aliases() -> None:
    aliases = [{"ip": "192.0.2.7", "hostnames": ["db", "db.lab"]}]
    text = hosts_file(
        pod(hostname="web-0", subdomain="web", hostAliases=aliases),
        "10.244.0.9",
        domain="cluster.local",
    )
    assert text.splitlines()[1:] == [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "10.244.0.9\tweb-0.web.default.svc.cluster.local\tweb-0",
        "# Entries added by HostAliases.",
        "192.0.2.7\tdb db.lab",
    ]
    assert "10.244.0.9\tweb\n" in hosts_file(pod(), "10.244.0.9", domain="cluster.local")
    with pytest.raises(InvalidPodSpec, match="host names"):
        hosts_file(
            pod(hostAliases=[{"ip": "192.0.2.7", "hostnames": ["a b"]}]), "10.244.0.9", domain="x"
        )


def test_service_links_follow_kubernetes_names_and_skip_services_without_a_cluster_ip() -> None:
    services = [
        {
            "metadata": {"name": "redis-primary"},
            "spec": {
                "clusterIP": "10.96.0.50",
                "ports": [{"name": "redis", "port": 6379, "protocol": "TCP"}, {"port": 9121}],
            },
        },
        {"metadata": {"name": "web"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
        {"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "x.org"}},
        {
            "metadata": {"name": "bad"},
            "spec": {"clusterIP": "10.96.0.9;rm", "ports": [{"port": 1}]},
        },
    ]
    assert service_links(services) == {
        "REDIS_PRIMARY_SERVICE_HOST": "10.96.0.50",
        "REDIS_PRIMARY_SERVICE_PORT": "6379",
        "REDIS_PRIMARY_SERVICE_PORT_REDIS": "6379",
        "REDIS_PRIMARY_PORT": "tcp://10.96.0.50:6379",
        "REDIS_PRIMARY_PORT_6379_TCP": "tcp://10.96.0.50:6379",
        "REDIS_PRIMARY_PORT_6379_TCP_PROTO": "tcp",
        "REDIS_PRIMARY_PORT_6379_TCP_PORT": "6379",
        "REDIS_PRIMARY_PORT_6379_TCP_ADDR": "10.96.0.50",
        "REDIS_PRIMARY_PORT_9121_TCP": "tcp://10.96.0.50:9121",
        "REDIS_PRIMARY_PORT_9121_TCP_PROTO": "tcp",
        "REDIS_PRIMARY_PORT_9121_TCP_PORT": "9121",
        "REDIS_PRIMARY_PORT_9121_TCP_ADDR": "10.96.0.50",
    }


def test_the_hub_file_carries_the_settings_both_ways() -> None:
    settings = replace(NETWORK, services_ready=PurePosixPath("/state/network/services-ready"))
    written = json.loads(json.dumps(settings.to_json()))
    assert written["hub_endpoint"] == "192.0.2.10:51820"
    assert PodNetworkSettings.from_json(written) == settings
    assert PodNetworkSettings.from_json(json.loads(json.dumps(NETWORK.to_json()))) == NETWORK
