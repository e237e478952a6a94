"""A pod's network inside its job: namespace, tunnel to the hub, egress (docs/networking.md).

The job script runs, before its containers,

    python -I -m kubelet_py.job.network CONFIG

and reads the one line it prints:
- `pod <holder> <keeper>`: the pod's namespace is held by process `<holder>`, and its
  containers enter it through kubelet_py.job.netns.enter_argv. Process `<keeper>` keeps the
  namespace, the tunnel and the egress running until it gets TERM or INT, and then ends them;
- `host <reason>`: the node refused the namespace or its device. The containers use the node's
  network, and the `network` marker in the pod folder tells the kubelet why.

CONFIG is JSON, written by the kubelet (0600, it holds the tunnel's private key):
- `interface`: kubelet_py.job.netns.Interface's fields;
- `tunnel`: `binary` (hpk-tunnel) and `config` (WireGuard's configuration text);
- `egress`: `slirp4netns`, for a way out to the node's network and beyond, or null;
- `masquerade`: true for the hub, whose egress carries pods' traffic to the API server and
  beyond (iptables' MASQUERADE on the egress device, as slirp4netns answers only its own
  address);
- `forwarding`: true for the hub, which routes between the pods;
- `control`: for the hub, the tunnel's control socket, through which the kubelet adds pods;
- `marker`: where to write the `network` marker, or null.

The control-plane job runs the hub the same way, with forwarding on and a control socket.

Stdlib only: it runs on compute nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from kubelet_py.job.netns import Holder, Interface, NamespaceRefused, start_holder
from kubelet_py.job.podfolder import write_marker

WATCH_INTERVAL_S = 5.0
"""How often the keeper looks whether the holder, the tunnel and the egress still run."""

READY_TIMEOUT_S = 10.0
"""How long the tunnel and slirp4netns each have to say they are ready."""

EGRESS_DEVICE = "tap0"
EGRESS_MTU = 65520
"""slirp4netns's fastest MTU (its documentation's recommendation)."""


@dataclass(frozen=True)
class NetworkConfig:
    """One pod's (or the hub's) network, as the kubelet wrote it."""

    interface: Interface
    tunnel_binary: str
    tunnel_config: str
    egress: str | None = None
    masquerade: bool = False
    forwarding: bool = False
    control: str | None = None
    marker: str | None = None

    @classmethod
    def load(cls, path: Path) -> NetworkConfig:
        return cls.parse(path.read_text())

    @classmethod
    def parse(cls, text: str) -> NetworkConfig:
        """The configuration in `text`; ValueError, KeyError or TypeError when it is none."""
        data: dict[str, Any] = json.loads(text)
        face = data["interface"]
        interface = Interface(
            name=face["name"],
            address=face["address"],
            mtu=int(face["mtu"]),
            routes=tuple(face.get("routes", ())),
            local=tuple(face.get("local", ())),
        )
        return cls(
            interface=interface,
            tunnel_binary=data["tunnel"]["binary"],
            tunnel_config=data["tunnel"]["config"],
            egress=data.get("egress"),
            masquerade=bool(data.get("masquerade", False)),
            forwarding=bool(data.get("forwarding", False)),
            control=data.get("control"),
            marker=data.get("marker"),
        )

    @property
    def private_key(self) -> str:
        """The tunnel's private key, from its configuration text; ValueError without one."""
        for line in self.tunnel_config.splitlines():
            key, _, value = line.partition("=")
            if key == "private_key":
                return value
        raise ValueError("the tunnel's configuration has no private_key")


class Refused(Exception):
    """A part of the pod's network would not start; the pod uses the node's network."""


def _await_ready(fd: int, process: subprocess.Popen[bytes], what: str, errors: BinaryIO) -> None:
    """Wait until `process` writes to `fd` (its ready descriptor); Refused, with what it
    wrote to `errors`, when it ends first or takes longer than READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                process.kill()
                raise Refused(f"{what} was not ready within {READY_TIMEOUT_S:g} s")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            if readable and os.read(fd, 64):
                return
            if readable or process.poll() is not None:
                process.wait()
                errors.seek(0)
                said = errors.read(4096)
                words = " ".join(said.decode(errors="replace").split())[-300:]
                raise Refused(f"{what} ended: {words or f'exit code {process.returncode}'}")
    finally:
        os.close(fd)


def _start_helper(
    what: str,
    argv: Callable[[int], list[str]],
    *,
    keep_fds: tuple[int, ...] = (),
    stdin: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv(ready_fd)` and wait until it writes to its ready descriptor; Refused, with
    its own words, when it cannot start. Its stderr goes to an unnamed file, read only if it
    fails to start: a pipe nobody reads once it runs could fill and stop it."""
    ready_read, ready_write = os.pipe()
    words = argv(ready_write)
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                words,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=[*keep_fds, ready_write],
            )
        except OSError as error:
            os.close(ready_read)
            raise Refused(f"cannot run {words[0]}: {error.strerror}") from None
        finally:
            os.close(ready_write)
        if process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write((stdin or "").encode())
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        _await_ready(ready_read, process, what, errors)
    return process


def start_tunnel(config: NetworkConfig, tun_fd: int) -> subprocess.Popen[bytes]:
    """hpk-tunnel on the node's network, carrying the device the holder opened."""
    control = [f"--control={config.control}"] if config.control else []
    return _start_helper(
        "the tunnel",
        lambda ready: [config.tunnel_binary, f"--tun-fd={tun_fd}", f"--ready-fd={ready}", *control],
        keep_fds=(tun_fd,),
        stdin=config.tunnel_config,
    )


def start_egress(holder_pid: int) -> subprocess.Popen[bytes]:
    """slirp4netns for the namespace of `holder_pid`: its own way out through the node's
    sockets, with the node's loopback out of reach (`--disable-host-loopback`)."""
    options = ["--configure", f"--mtu={EGRESS_MTU}", "--disable-host-loopback"]
    return _start_helper(
        "slirp4netns",
        lambda ready: [
            "slirp4netns",
            *options,
            f"--ready-fd={ready}",
            str(holder_pid),
            EGRESS_DEVICE,
        ],
    )


def masquerade(holder_pid: int, device: str) -> None:
    """Traffic that leaves through `device` takes its address (iptables, as root of the
    namespace's user namespace); Refused when iptables cannot."""
    argv = ["nsenter", "--preserve-credentials", "--user", "--net", f"--target={holder_pid}"]
    argv += ["--", "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", device, "-j", "MASQUERADE"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Refused(f"iptables: {error}") from None
    if done.returncode != 0:
        raise Refused(f"iptables: {' '.join(done.stderr.split())[-300:]}")


@dataclass
class Network:
    """The running parts of one namespace's network."""

    holder: Holder
    processes: list[subprocess.Popen[bytes]]

    def named(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        names = ("the tunnel", "slirp4netns")
        return list(zip(names, self.processes, strict=False))

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.holder.close()


def start(config: NetworkConfig, *, python: str = sys.executable) -> Network:
    """The namespace, its tunnel and its egress; Refused (NamespaceRefused for the
    namespace itself) with the reason when a part cannot start, after stopping the others."""
    holder = start_holder(config.interface, forwarding=config.forwarding, python=python)
    network = Network(holder=holder, processes=[])
    try:
        assert holder.tun_fd is not None
        network.processes.append(start_tunnel(config, holder.tun_fd))
        os.close(holder.tun_fd)  # the tunnel holds it now
        holder.tun_fd = None
        if config.egress == "slirp4netns":
            network.processes.append(start_egress(holder.pid))
            if config.masquerade:
                masquerade(holder.pid, EGRESS_DEVICE)
    except BaseException:
        network.stop()
        raise
    return network


def _mark(config: NetworkConfig, text: str) -> None:
    if config.marker:
        with contextlib.suppress(OSError):
            write_marker(Path(config.marker), text)


def run(config_path: Path, *, foreground: bool = False) -> int:
    """Report the one line, then hold the network until TERM or INT.

    It is held by a child in a session of its own, so that the job script, which reads the
    line and goes on, need not wait for it; the script's end sends it TERM. `foreground`
    holds it in this process instead, reporting on stdout (the control-plane job's hub).
    """
    if foreground:
        return _hold(config_path, sys.stdout, detach=False)
    ours, theirs = os.pipe()
    child = os.fork()
    if child:
        os.close(theirs)
        with os.fdopen(ours) as line:
            said = line.readline().strip()
        print(said or "host the pod's network ended before it was set up", flush=True)
        return 0
    os.close(ours)
    os.setsid()
    # Nothing it starts may hold the job script's pipe open: it reports on its own.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        with os.fdopen(theirs, "w") as report:
            code = _hold(config_path, report, detach=True)
    finally:
        os._exit(code)


def _hold(config_path: Path, report: TextIO, *, detach: bool) -> int:
    try:
        config = NetworkConfig.load(config_path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"host cannot read the network configuration {config_path}: {error}", file=report)
        return 0
    try:
        network = start(config)
    except (NamespaceRefused, Refused) as error:
        reason = " ".join(str(error).split())
        _mark(config, f"host {reason}")
        print(f"host {reason}", file=report, flush=True)
        return 0
    # Blocked only now: the processes started above would inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _mark(config, "pod")
    print(f"pod {network.holder.pid} {os.getpid()}", file=report, flush=True)
    if detach:
        report.close()
    try:
        ended = _watch(network)
    finally:
        network.stop()
    if not detach:  # the hub's log says why it stopped
        print(ended, flush=True)
    return 0 if ended.startswith("stopped") else 1


def _watch(network: Network) -> str:
    """Until TERM or INT, or until a part of the network ends by itself; what happened."""
    while True:
        got = signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, WATCH_INTERVAL_S)
        if got is not None:
            return f"stopped by {signal.Signals(got.si_signo).name}"
        parts = [("the holder", network.holder.process), *network.named()]
        for name, process in parts:
            if process.poll() is not None:
                return f"{name} ended with code {process.returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelet_py.job.network")
    parser.add_argument("config", type=Path, help="the network's JSON configuration")
    parser.add_argument("--foreground", action="store_true", help="hold it in this process")
    args = parser.parse_args(argv)
    return run(args.config, foreground=args.foreground)


if __name__ == "__main__":
    sys.exit(main())
