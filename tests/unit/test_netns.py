"""A pod's own network namespace (kubelet_py.job.netns), made for real with unshare and nsenter.

These need user and network namespaces, which the machines the suite runs on allow
(TESTBED.md); the TUN test also needs `/dev/net/tun` open to the user running it.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubelet_py.job.netns import (
    IP_FORWARD,
    TUN_DEVICE,
    Holder,
    Interface,
    NamespaceRefused,
    enter_argv,
    start_holder,
)

SERVE = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
connection, _ = server.accept()
connection.sendall(b"from the pod")
"""
FETCH = """
import socket, sys
print(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).recv(64).decode())
"""
SEND = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hi", (sys.argv[1], 9))
"""


@pytest.fixture
def holder() -> Iterator[Holder]:
    started = start_holder()
    yield started
    started.close()


def inside(holder: Holder, code: str, *args: str, uid: int = 4321) -> list[str]:
    """Python `code` run in the pod's namespace as `uid`."""
    return in_pod(holder, sys.executable, "-I", "-c", code, *args, uid=uid)


def in_pod(holder: Holder, *words: str, uid: int = 4321) -> list[str]:
    return [*enter_argv(holder.pid, uid=uid, gid=uid), *words]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_processes_of_one_pod_share_its_localhost_and_not_the_nodes(holder: Holder) -> None:
    port = free_port()
    with socket.socket() as on_the_node:  # the node's own :port is taken, the pod's is not
        on_the_node.bind(("127.0.0.1", port))
        on_the_node.listen()
        with subprocess.Popen(
            inside(holder, SERVE, str(port)), stdout=subprocess.PIPE, text=True
        ) as server:
            try:
                assert server.stdout is not None
                assert server.stdout.readline().strip() == "listening"
                fetched = run(inside(holder, FETCH, str(port)))
                assert fetched.stdout.strip() == "from the pod", fetched.stderr
            finally:
                server.kill()


def test_a_pods_process_keeps_the_users_identity_and_no_power_over_the_network(
    holder: Holder,
) -> None:
    who = run(inside(holder, "import os; print(os.getuid(), os.getgid())"))
    assert who.stdout.split() == ["4321", "4321"], who.stderr
    add = run(in_pod(holder, "ip", "link", "add", "x0", "type", "dummy"))
    assert add.returncode != 0
    assert "Operation not permitted" in add.stderr


def test_a_pods_process_binds_a_port_below_1024_as_a_container_running_as_root_would(
    holder: Holder,
) -> None:
    code = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 80)); print(s.getsockname()[1])"
    bound = run(inside(holder, code))
    assert bound.stdout.strip() == "80", bound.stderr


@pytest.mark.skipif(
    not os.access(TUN_DEVICE, os.R_OK | os.W_OK), reason=f"{TUN_DEVICE} is closed to this user"
)
def test_the_tun_device_made_in_the_pod_carries_its_packets_to_the_job() -> None:
    interface = Interface("hpk0", "10.244.1.2/32", 1420, routes=("10.244.0.0/16",))
    holder = start_holder(interface)
    try:
        assert holder.tun_fd is not None
        shown = run(in_pod(holder, "ip", "-o", "-4", "addr", "show", "hpk0", uid=0))
        assert "10.244.1.2/32" in shown.stdout, shown.stderr
        subprocess.run(inside(holder, SEND, "10.244.9.9"), check=True, timeout=30)
        assert "10.244.9.9" in [socket.inet_ntoa(p[16:20]) for p in ipv4_packets(holder.tun_fd)]
    finally:
        holder.close()


@pytest.mark.parametrize("forwarding", [False, True])
def test_only_a_namespace_made_to_forward_routes_between_its_interfaces(forwarding: bool) -> None:
    holder = start_holder(forwarding=forwarding)
    try:
        switch = run(in_pod(holder, "cat", IP_FORWARD, uid=0))
        assert switch.stdout.strip() == ("1" if forwarding else "0"), switch.stderr
    finally:
        holder.close()


def ipv4_packets(tun_fd: int, *, within_s: float = 5.0) -> Iterator[bytes]:
    """The IPv4 packets that come out of the device (the kernel also sends its own IPv6 ones)
    until none has come for `within_s`; each after its virtio-net header (offloads)."""
    while select.select([tun_fd], [], [], within_s)[0]:
        packet = os.read(tun_fd, 65536)[10:]
        if packet and packet[0] >> 4 == 4:
            assert socket.inet_ntoa(packet[12:16]) == "10.244.1.2"
            yield packet
            return


def test_a_namespace_the_node_will_not_make_is_refused_with_its_reason() -> None:
    with pytest.raises(NamespaceRefused, match="nowhere/python"):
        start_holder(python="/nowhere/python")


def test_a_holder_that_never_reports_is_killed_and_refused(tmp_path: Path) -> None:
    stuck = tmp_path / "stuck-python"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    stuck.chmod(0o755)
    began = time.monotonic()
    with pytest.raises(NamespaceRefused, match=r"did not report within 0\.5 s"):
        start_holder(python=str(stuck), timeout_s=0.5)
    assert time.monotonic() - began < 10
