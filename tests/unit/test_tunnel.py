"""hpk-tunnel (container/tunnel) for real: a hub and pods, each in its own namespace, joined by
WireGuard over the loopback, as docs/networking.md lays the pod network out.

The binary is the tool folder's (bash container/build-toolchain.sh) or the one HPK_TUNNEL
names. The tests also need user and network namespaces and `/dev/net/tun`, as test_netns.py.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from hpk.toolchain import TUNNEL, Toolchain, ToolchainMissing
from kubelet_py.job.netns import TUN_DEVICE, Holder, Interface, enter_argv, start_holder

POD_CIDR = "10.244.0.0/16"
SERVER_PORT = 8080
MTU = 1420

ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    connection, (client, _) = server.accept()
    with connection:
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        connection.sendall(client.encode() + b"\\n" + received)
"""
CLIENT = """
import socket, sys
payload = bytes(range(256)) * 1024
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
except OSError as error:
    print("failed:", error)
    sys.exit(1)
client, _, echoed = reply.partition(b"\\n")
print(client.decode(), "echoed" if echoed == payload else f"{len(echoed)} bytes back")
"""


def tunnel_binary() -> Path | None:
    if os.environ.get("HPK_TUNNEL"):
        return Path(os.environ["HPK_TUNNEL"])
    try:
        return Toolchain.load().local(TUNNEL)
    except ToolchainMissing:
        return None


def namespaces_refused() -> str:
    """Why this machine cannot run the tests, or ''."""
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR))
    except OSError as error:
        return f"{TUN_DEVICE} cannot be opened: {error.strerror}"
    made = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "true"], check=False, capture_output=True
    )
    if made.returncode != 0:
        return f"no user and network namespace: {made.stderr.decode().strip()}"
    return ""


BINARY = tunnel_binary()
REFUSED = namespaces_refused()
pytestmark = [
    pytest.mark.skipif(
        BINARY is None or not BINARY.is_file(),
        reason="hpk-tunnel is not built: run bash container/build-toolchain.sh, "
        "or set HPK_TUNNEL to a binary built from container/tunnel",
    ),
    pytest.mark.skipif(bool(REFUSED), reason=REFUSED),
]


@dataclass(frozen=True)
class Keys:
    """A WireGuard key pair, in hex as the UAPI text wants it."""

    private: str
    public: str

    @classmethod
    def generate(cls) -> Keys:
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw.hex(), key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex())


@dataclass
class Endpoint:
    """One namespace and the tunnel that serves its device."""

    holder: Holder
    tunnel: subprocess.Popen[bytes]
    keys: Keys

    def stop(self) -> tuple[int, bytes]:
        """SIGTERM, as the job sends it; the exit status, and what the tunnel wrote on stdout."""
        self.tunnel.terminate()
        stdout, _ = self.tunnel.communicate(timeout=10)
        self.holder.close()
        return self.tunnel.returncode, stdout


def start_endpoint(
    interface: Interface,
    config: str,
    folder: Path,
    *,
    keys: Keys | None = None,
    forwarding: bool = False,
    control: Path | None = None,
    within_s: float = 10.0,
) -> Endpoint:
    """A namespace with `interface`, and hpk-tunnel on it with `keys` and the rest of its
    `config` (UAPI text), once it says ready; its log is in `folder`."""
    assert BINARY is not None
    keys = keys or Keys.generate()
    holder = start_holder(interface, forwarding=forwarding)
    assert holder.tun_fd is not None
    log = folder / f"tunnel-{interface.address.split('/')[0]}.log"
    ready, ready_w = os.pipe()
    config_r, config_w = os.pipe()  # the text is far smaller than a pipe holds
    os.write(config_w, f"private_key={keys.private}\n{config}".encode())
    os.close(config_w)
    argv = [str(BINARY), f"--tun-fd={holder.tun_fd}", f"--ready-fd={ready_w}"]
    argv += [f"--control={control}"] if control else []
    with log.open("wb") as stderr:
        tunnel = subprocess.Popen(
            argv,
            pass_fds=[holder.tun_fd, ready_w],
            stdin=config_r,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    os.close(ready_w)
    os.close(config_r)
    try:
        said = os.read(ready, 64) if select.select([ready], [], [], within_s)[0] else b""
    finally:
        os.close(ready)
    if said != b"ready\n":
        tunnel.kill()
        tunnel.communicate()
        holder.close()
        raise AssertionError(f"hpk-tunnel did not get ready: {log.read_text()!r}")
    return Endpoint(holder=holder, tunnel=tunnel, keys=keys)


def pod_config(network: Network) -> str:
    """A pod's one peer: the hub, for the whole pod network."""
    return (
        f"public_key={network.hub.keys.public}\nendpoint=127.0.0.1:{network.hub_port}\n"
        f"allowed_ip={POD_CIDR}\npersistent_keepalive_interval=25\n"
    )


def pod_interface(address: str) -> Interface:
    return Interface("hpk0", f"{address}/32", MTU, routes=(POD_CIDR,))


def uapi(control: Path, request: str) -> str:
    """One request on the tunnel's control socket; its reply, up to the blank line."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(10)
        connection.connect(str(control))
        connection.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, f"the control socket closed after {reply!r}"
            reply += chunk
    return reply.decode()


def handshakes(control: Path) -> dict[str, int]:
    """The time of each peer's last handshake, by public key, as the tunnel reports it."""
    times, key = {}, ""
    for line in uapi(control, "get=1\n\n").splitlines():
        name, _, value = line.partition("=")
        if name == "public_key":
            key = value
        elif name == "last_handshake_time_sec":
            times[key] = int(value)
    return times


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def in_pod(endpoint: Endpoint, code: str, *args: str) -> list[str]:
    """Python `code` run in the pod's namespace, as an ordinary uid."""
    enter = enter_argv(endpoint.holder.pid, uid=4321, gid=4321)
    return [*enter, sys.executable, "-I", "-c", code, *args]


def connect(endpoint: Endpoint, address: str, *, timeout_s: float) -> str:
    """From the pod: send 256 KiB to `address`'s echo server, read it back; what it says."""
    result = subprocess.run(
        in_pod(endpoint, CLIENT, address, str(SERVER_PORT), str(timeout_s)),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s * 3 + 10,
    )
    return (result.stdout + result.stderr).strip()


@dataclass
class Network:
    hub: Endpoint
    hub_port: int
    control: Path
    """The hub's control socket."""
    pods: dict[str, Endpoint]
    """By address."""
    folder: Path


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """The hub (10.244.0.1, forwarding) and pods 10.244.1.2 and 10.244.2.2, with an echo
    server on pod B. The pods are configured on stdin; the hub learns its two peers on its
    control socket, and their endpoints from their first handshakes."""
    folder = tmp_path_factory.mktemp("tunnel")
    port, control = free_udp_port(), folder / "hub.sock"
    hub = start_endpoint(
        Interface("hpk0", "10.244.0.1/16", MTU),
        f"listen_port={port}\n",
        folder,
        forwarding=True,
        control=control,
    )
    network = Network(hub=hub, hub_port=port, control=control, pods={}, folder=folder)
    try:
        keys = {address: Keys.generate() for address in ("10.244.1.2", "10.244.2.2")}
        peers = "".join(
            f"public_key={pod.public}\nallowed_ip={address}/32\n" for address, pod in keys.items()
        )
        assert uapi(control, f"set=1\n{peers}\n") == "errno=0\n\n"
        for address, pod in keys.items():
            network.pods[address] = start_endpoint(
                pod_interface(address), pod_config(network), folder, keys=pod
            )
        with subprocess.Popen(
            in_pod(network.pods["10.244.2.2"], ECHO, "10.244.2.2", str(SERVER_PORT)),
            stdout=subprocess.PIPE,
            text=True,
        ) as server:
            try:
                assert server.stdout is not None
                assert server.stdout.readline().strip() == "listening"
                yield network
            finally:
                server.kill()
    finally:
        for endpoint in [hub, *network.pods.values()]:
            endpoint.stop()


def test_a_pod_reaches_another_pod_through_the_hub_both_ways(network: Network) -> None:
    said = connect(network.pods["10.244.1.2"], "10.244.2.2", timeout_s=10)
    assert said == "10.244.1.2 echoed", said  # seen from pod B with pod A's own address
    shaken = handshakes(network.control)
    assert all(shaken[pod.keys.public] > 0 for pod in network.pods.values()), shaken


def test_a_pod_whose_key_the_hub_does_not_know_reaches_nobody(network: Network) -> None:
    stranger = start_endpoint(pod_interface("10.244.3.2"), pod_config(network), network.folder)
    try:
        began = time.monotonic()
        said = connect(stranger, "10.244.2.2", timeout_s=3)
        assert said == "failed: timed out", said
        assert time.monotonic() - began < 15
        assert stranger.keys.public not in handshakes(network.control)
        # The same pod gets through once the hub is given its key: the key was the reason.
        added = f"set=1\npublic_key={stranger.keys.public}\nallowed_ip=10.244.3.2/32\n\n"
        assert uapi(network.control, added) == "errno=0\n\n"
        said = connect(stranger, "10.244.2.2", timeout_s=15)
        assert said == "10.244.3.2 echoed", said
    finally:
        assert stranger.stop() == (0, b"")


def test_on_sigterm_a_tunnel_exits_0_and_removes_its_control_socket(tmp_path: Path) -> None:
    control = tmp_path / "hub.sock"
    hub = start_endpoint(Interface("hpk0", "10.244.0.1/16", MTU), "", tmp_path, control=control)
    try:
        assert control.stat().st_mode & 0o777 == 0o600
    finally:
        assert hub.stop() == (0, b"")  # and nothing on stdout: it is the job's
    assert not control.exists()


def test_a_bad_configuration_exits_2_with_one_line_saying_why() -> None:
    assert BINARY is not None
    holder = start_holder(pod_interface("10.244.1.2"))
    try:
        assert holder.tun_fd is not None
        refused = subprocess.run(
            [str(BINARY), f"--tun-fd={holder.tun_fd}"],
            input=b"private_key=not-hex\n",
            pass_fds=[holder.tun_fd],
            capture_output=True,
            check=False,
            timeout=30,
        )
    finally:
        holder.close()
    assert refused.returncode == 2
    lines = refused.stderr.decode().splitlines()
    assert len(lines) == 1 and "bad configuration" in lines[0], lines
