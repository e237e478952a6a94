"""What the control plane needs to know about the node it landed on.

Its hostname and addresses go into the API server's certificate, its primary address is what
the API server advertises (the `kubernetes` service's endpoint may not be a loopback address),
and its resolvers are where CoreDNS sends every name outside the cluster domain. Only reads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from pathlib import Path

import psutil


class NoUsableAddress(RuntimeError):
    """The node has no non-loopback address the API server could advertise."""


def hostname() -> str:
    return socket.gethostname()


def node_addresses() -> list[str]:
    """Every non-loopback, non-link-local address of the node, IPv4 first."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(address.address.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip in found:
                continue
            found.append(ip)
    found.sort(key=lambda ip: (ip.version, ip))
    return [str(ip) for ip in found]


def primary_address() -> str:
    """The IPv4 address the node uses for its default route, else its first address.

    Connecting a UDP socket sends nothing; it only asks the kernel which source address a
    packet to that destination would get.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # TEST-NET-2: never a real peer
        address = str(probe.getsockname()[0])
        if not ipaddress.ip_address(address).is_loopback:
            return address
    addresses = node_addresses()
    if not addresses:
        raise NoUsableAddress("the node has no non-loopback IP address to advertise")
    return addresses[0]


def host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The nameservers of `resolv_conf`, as CoreDNS's forward plugin wants them."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except FileNotFoundError:
        return []
    servers: list[str] = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
    return servers
