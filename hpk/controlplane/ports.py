"""The TCP/UDP ports of one control plane, chosen free and remembered in ports.json.

The control plane shares its node with other users' jobs, so no port can be fixed in advance.
Each port is found by binding port 0. The choice is written to <state>/ports.json, so other
tools (the kubelet, `hpk status`) can find the components, and so a restart can ask for the same
ports again: a user's kubeconfig keeps working when the API server's port is still free on the
next node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hpk.files import PRIVATE_FILE_MODE, write_atomic

log = logging.getLogger(__name__)

PORTS_FILE = "ports.json"


@dataclass(frozen=True)
class Ports:
    """Every port the control plane listens on."""

    etcd_client: int
    """etcd's client port (TLS, 127.0.0.1)."""

    etcd_peer: int
    """etcd's peer port (TLS, 127.0.0.1); unused by a single member but always bound."""

    apiserver: int
    """kube-apiserver's secure port."""

    controller_manager: int
    """kube-controller-manager's secure port (health checks, metrics)."""

    dns: int
    """CoreDNS's DNS port, UDP and TCP."""

    dns_health: int
    """CoreDNS's health plugin (HTTP, /health)."""

    dns_ready: int
    """CoreDNS's ready plugin (HTTP, /ready)."""

    kubelet: int
    """hpk-kubelet's HTTPS API (`kubectl logs`), on every address; its nodes advertise it in
    `status.daemonEndpoints`. Not 10250: other users' kubelets may share the node."""

    hub: int
    """The pod network hub's tunnel (UDP, every address): where pods' tunnels connect."""

    metrics_server: int
    """metrics-server's HTTPS port, on the network of the node its pod runs on (`hpk addons
    install metrics-server`): chosen free here like the others; nothing listens on it here."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def values(self) -> list[int]:
        return list(self.as_dict().values())


UDP_PORTS = frozenset({"dns", "hub"})
"""Fields whose port must be free for UDP as well as TCP."""

ADDED_PORTS = frozenset({"kubelet", "hub", "metrics_server"})
"""Fields a ports.json written by an older hpk lacks. Such a record is still used: these
ports are read as 0 ("not recorded") and chosen afresh, the others kept."""


def save_ports(path: Path, ports: Ports) -> None:
    write_atomic(path, json.dumps(ports.as_dict(), indent=2) + "\n", mode=PRIVATE_FILE_MODE)


def load_ports(path: Path) -> Ports | None:
    """The ports recorded in `path`, or None if there is no usable record."""
    try:
        data = json.loads(path.read_text())
        return Ports(
            **{
                f.name: int(data[f.name] if f.name in data or f.name not in ADDED_PORTS else 0)
                for f in fields(Ports)
            }
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


@contextlib.contextmanager
def _bound(port: int, *, kind: socket.SocketKind) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        # Lets the check pass over TIME_WAIT leftovers (as Go's listeners do), but not over
        # a live listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        yield sock
    finally:
        sock.close()


def port_is_free(port: int, *, udp: bool = False) -> bool:
    """Whether `port` can be bound on every IPv4 address (for TCP, and UDP if asked)."""
    try:
        with _bound(port, kind=socket.SOCK_STREAM):
            if udp:
                with _bound(port, kind=socket.SOCK_DGRAM):
                    pass
    except OSError:
        return False
    return True


def choose_ports(previous: Ports | None = None) -> Ports:
    """Reuse each port of `previous` that is still free; pick a fresh free port for the rest
    (and for a port `previous` records as 0).

    Sockets stay bound until all ports are chosen, so no port is handed out twice.
    """
    chosen: dict[str, int] = {}
    with contextlib.ExitStack() as held:
        for f in fields(Ports):
            udp = f.name in UDP_PORTS
            wanted: int | None = getattr(previous, f.name) if previous else None
            if wanted and wanted not in chosen.values() and port_is_free(wanted, udp=udp):
                chosen[f.name] = wanted
                continue
            while True:
                tcp = held.enter_context(_bound(0, kind=socket.SOCK_STREAM))
                port = int(tcp.getsockname()[1])
                if port in chosen.values():
                    continue
                if udp and not port_is_free_udp(port):
                    continue
                chosen[f.name] = port
                break
    ports = Ports(**chosen)
    if previous is not None and ports != previous:
        moved = {k: v for k, v in ports.as_dict().items() if previous.as_dict()[k] != v}
        log.info("ports changed since the last run: %s", moved)
    return ports


def port_is_free_udp(port: int) -> bool:
    try:
        with _bound(port, kind=socket.SOCK_DGRAM):
            return True
    except OSError:
        return False
