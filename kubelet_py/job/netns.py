"""A pod's own network namespace, made inside its job without root (docs/networking.md).

The job starts one holder, `python -I -m kubelet_py.job.netns hold …`, under
`unshare --user --map-root-user --net`. As root of that new user namespace it brings `lo`
up, and it can open the overlay's TUN device there, with the pod's address and routes. It
hands the device to the job over an inherited socket (SCM_RIGHTS), since the tunnel's helper
runs on the node's network. The hub's holder also turns IPv4 forwarding on. Then it becomes
`cat` reading that socket, which ends when the job closes it, or dies.

Every container's launcher then runs through `enter_argv`:
- it joins the holder's user and network namespaces (`nsenter`);
- it drops back to the user's own uid and gid in a nested user namespace (`unshare`).

So the containers share the pod's localhost and ports, keep the user's identity, and hold no
capability over the pod's network.

Stdlib only, and nothing but util-linux and iproute2 on the node: it runs on compute nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETIFF = 0x400454CA
TUN_DEVICE = "/dev/net/tun"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
"""Ports below it need a capability in the namespace; 0 in a pod's own namespace lets its
containers, which run as the user, bind :80 as a container running as root would (Docker and
rootless runtimes set the same)."""


class NamespaceRefused(OSError):
    """The node would not make the pod's namespace or device (user or network namespaces
    disabled, `/dev/net/tun` closed to the user); the pod then uses the node's network."""


@dataclass(frozen=True)
class Interface:
    """The pod's overlay interface, as the holder sets it up in the namespace."""

    name: str
    address: str
    """With its prefix length: `10.244.1.2/32`."""
    mtu: int
    routes: tuple[str, ...] = ()
    """Destinations routed through it (`10.244.0.0/16`)."""
    local: tuple[str, ...] = ()
    """More addresses of the namespace itself, on `lo` (the hub's cluster DNS address)."""

    def arguments(self) -> list[str]:
        words = [f"--tun={self.name}", f"--address={self.address}", f"--mtu={self.mtu}"]
        words += [f"--route={route}" for route in self.routes]
        return words + [f"--local={address}" for address in self.local]


def open_tun(name: str) -> int:
    """A TUN device named `name` in this process's network namespace, with offloads
    (IFF_VNET_HDR), which give a tunnel several times the throughput; its descriptor."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise NamespaceRefused(error.errno, f"cannot open {TUN_DEVICE}: {error.strerror}") from None
    try:
        request = struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, request)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Holder:
    """A running holder, seen from the job: its process, and the TUN device it handed over."""

    process: subprocess.Popen[bytes]
    channel: socket.socket
    tun_fd: int | None

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        """End the holder; the namespace goes with its last process."""
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None
        self.channel.close()
        self.process.communicate()


def start_holder(
    interface: Interface | None = None,
    *,
    forwarding: bool = False,
    python: str = sys.executable,
    timeout_s: float = 30.0,
) -> Holder:
    """Make the pod's namespace and wait until it is set up. With `forwarding`, the
    namespace routes IPv4 between its interfaces: the hub's does, a pod's does not.

    Raises NamespaceRefused when the node refuses a user or network namespace, or the TUN
    device, with the holder's own words; or when the holder has not reported within
    `timeout_s` (it is then killed).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = ["unshare", "--user", "--map-root-user", "--net", python, "-I", "-m", __name__]
    argv += ["hold", f"--channel={theirs.fileno()}"]
    argv += interface.arguments() if interface else []
    argv += ["--forwarding"] if forwarding else []
    process = subprocess.Popen(
        argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    theirs.close()
    ours.settimeout(timeout_s)
    ended = "the holder ended at once"
    try:
        message, fds, _, _ = socket.recv_fds(ours, 1024, 1)
    except TimeoutError:
        process.kill()
        message, fds, ended = b"", [], f"the holder did not report within {timeout_s:g} s"
    except OSError:
        message, fds = b"", []
    ours.settimeout(None)
    if not message.startswith(b"ok"):
        ours.close()
        for fd in fds:
            os.close(fd)
        said = process.communicate()[1].decode(errors="replace")
        raise NamespaceRefused(0, " ".join(said.split())[-500:] or ended)
    return Holder(process=process, channel=ours, tun_fd=fds[0] if fds else None)


def enter_argv(holder_pid: int, *, uid: int, gid: int) -> list[str]:
    """The words before a command that runs it in the pod's namespace, as `uid`:`gid`."""
    return [
        "nsenter", "--preserve-credentials", "--user", "--net", f"--target={holder_pid}", "--",
        "unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", "--",
    ]  # fmt: skip


def _hold(channel_fd: int, interface: Interface | None, *, forwarding: bool) -> int:
    """In the new namespaces: set them up, report to the job, then wait for its end."""
    channel = socket.socket(fileno=channel_fd)
    _ip("link", "set", "lo", "up")
    # /proc/sys/net is this namespace's own, and its root may write it.
    # Kernels before 4.11 have no such knob.
    with contextlib.suppress(FileNotFoundError), open(UNPRIVILEGED_PORT_START, "w") as knob:
        knob.write("0\n")
    if forwarding:
        with open(IP_FORWARD, "w") as switch:
            switch.write("1\n")
    fds = []
    if interface is not None:
        fds.append(open_tun(interface.name))
        _ip("addr", "add", interface.address, "dev", interface.name)
        _ip("link", "set", interface.name, "mtu", str(interface.mtu), "up")
        for route in interface.routes:
            _ip("route", "add", route, "dev", interface.name)
        for address in interface.local:
            _ip("addr", "add", address, "dev", "lo")
    socket.send_fds(channel, [b"ok"], fds)
    for fd in fds:
        os.close(fd)
    # Hold the namespace as `cat` reading the channel, which ends when the job closes it (or
    # dies): the same process, a fraction of an interpreter's memory.
    os.dup2(channel.fileno(), 0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp("cat", ["cat"])  # noqa: S606 (fixed argv)


def _ip(*words: str) -> None:
    """iproute2's `ip`, as root of the pod's namespaces; its own error on failure."""
    subprocess.run(["ip", *words], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelet_py.job.netns")
    commands = parser.add_subparsers(dest="command", required=True)
    hold = commands.add_parser("hold", help="set up this (new) network namespace and hold it")
    hold.add_argument("--channel", type=int, required=True)
    hold.add_argument("--tun")
    hold.add_argument("--address")
    hold.add_argument("--mtu", type=int, default=1420)
    hold.add_argument("--route", action="append", default=[])
    hold.add_argument("--local", action="append", default=[])
    hold.add_argument("--forwarding", action="store_true")
    args = parser.parse_args(argv)
    interface = None
    if args.tun:
        routes, local = tuple(args.route), tuple(args.local)
        interface = Interface(args.tun, args.address, args.mtu, routes, local)
    try:
        return _hold(args.channel, interface, forwarding=args.forwarding)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"kubelet_py.job.netns: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
