"""`python -m bench.network`: what the pod network costs, beside the node's own network.

It builds the pod network as the jobs do, without Slurm: the hub through
hpk.controlplane.network.prepare_hub, each pod's network by running
`python -I -m kubelet_py.job.network CONFIG` on a file from kubelet_py.pod.network's
network_config, with the pod's key given to the hub (kubelet_py.adapters.hub). Then it
measures, each beside the node's network in the same run (docs/networking.md, "Targets"):

1. the pod start the network adds: the job's network step, until its line is read (the hub
   is up and knows the pod), p50 and p90; and entering the namespaces for one container
   (kubelet_py.job.netns.enter_argv, then `true`), beside a plain `true`;
2. pod-to-pod TCP throughput through the hub (`iperf3 -c <pod B> -t 5`, pod A to pod B),
   beside iperf3 over the node's loopback, with each process's CPU during the runs;
3. DNS lookup latency from a pod: CoreDNS in the hub's namespaces on 10.96.0.10:53 (as hpk runs
   it), a `hosts` answer for a Service name, 200 lookups from pod A (bench/dnsprobe.py), beside
   the same CoreDNS on the node's 127.0.0.1;
4. memory of one idle pod's network (RSS of its keeper, holder, tunnel and slirp4netns), and
   pod A's tunnel after the iperf3 runs;
5. the hub tunnel's CPU with N idle pods, each one's handshake done, and their memory / N.

    python -m bench.network [--quick] [--pods N] [--user hpk-e2e] [--out FILE]

As root it runs all of it as `--user`, an ordinary user: the pod network needs no root, and is
measured without it. /dev/net/tun must be open to every user (0666); as root it is opened for
the run if it is not, and closed again after it.
Writes bench/results/<date>-network.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import psutil

from bench.stats import percentile
from hpk.controlplane.network import POD_DNS_READY, HubFiles, prepare_hub
from hpk.toolchain import TUNNEL, Toolchain
from kubelet_py.adapters.hub import Hub, new_private_key, public_key
from kubelet_py.job.netns import TUN_DEVICE, enter_argv
from kubelet_py.pod.network import PodAddress, PodNetworkSettings, network_config

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = Path(__file__).resolve().parent / "dnsprobe.py"
POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
DNS_ADDRESS = "10.96.0.10"
SERVICE_NAME = "web.bench.svc.cluster.local"
SERVICE_ADDRESS = "10.96.12.34"
POD_A, POD_B = "10.244.2.2", "10.244.2.3"
FIRST_IDLE_POD = "10.244.1.2"
FIRST_START_POD = "10.244.100.2"
IPERF_PORT = 5201
IPERF_SECONDS = 5
IPERF_RUNS = 2
DNS_LOOKUPS = 200
MARK_VARIABLE = "HPK_BENCH_NETWORK"
"""Set in the environment of everything the benchmark starts, to find what is left over."""
STOCK_TUN_MODE = 0o666
"""/dev/net/tun's mode on a stock node (hpk.testbed.bed's): the pod network needs it."""
HANDSHAKE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

TARGETS: dict[str, tuple[str, float]] = {
    "pod_start": ("<=", 300.0),
    "throughput": (">=", 1000.0),
    "dns": ("<=", 5.0),
    "memory_idle_pod": ("<=", 30.0),
    "hub_cpu": ("<=", 5.0),
    "memory_per_pod": ("<=", 30.0),
}
"""docs/networking.md's targets, in each figure's unit (ms, Mbit/s, ms, MB, % of a core)."""


# -- the pure parts ---------------------------------------------------------------------------


def _spread(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    """p50 and p90 (as bench.rootfs takes them), the maximum and the count."""
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 0.5), digits),
        "p90": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], digits),
        "max": round(ordered[-1], digits),
        "n": len(ordered),
    }


def core_percent(cpu_s: float, wall_s: float, digits: int = 2) -> float:
    """CPU seconds over a window of wall seconds, as percent of one core."""
    if wall_s <= 0:
        raise ValueError("the window must last longer than zero seconds")
    return round(100.0 * cpu_s / wall_s, digits)


def met(value: float | None, target: tuple[str, float] | None) -> bool | None:
    """Whether `value` meets `target` (`("<=", 300.0)`); None when either is missing."""
    if value is None or target is None:
        return None
    operator, limit = target
    return value <= limit if operator == "<=" else value >= limit


def iperf_mbit(report: Mapping[str, Any]) -> float:
    """The receiver's rate of an `iperf3 -J` client report, in Mbit/s."""
    if "error" in report:
        raise ValueError(f"iperf3: {report['error']}")
    return round(float(report["end"]["sum_received"]["bits_per_second"]) / 1e6, 1)


def job_line(line: str) -> tuple[int, int]:
    """(holder, keeper) from the network step's line `pod <holder> <keeper>`; RuntimeError
    with its reason when it says `host <reason>`."""
    words = line.split()
    if len(words) == 3 and words[0] == "pod" and words[1].isdigit() and words[2].isdigit():
        return int(words[1]), int(words[2])
    raise RuntimeError(f"the pod's network did not start: {line.strip() or '(no line)'}")


def nth_address(first: str, index: int) -> str:
    return str(ipaddress.ip_address(first) + index)


def corefile(*, port: int, bind: str) -> str:
    """CoreDNS's configuration as hpk's (templates/coredns/Corefile.j2), with a `hosts` answer
    for the Service name in place of the `kubernetes` plugin, which needs an API server."""
    return (
        f".:{port} {{\n"
        f"    bind {bind}\n"
        "    errors\n"
        "    hosts {\n"
        f"        {SERVICE_ADDRESS} {SERVICE_NAME}\n"
        "    }\n"
        "    cache 30\n"
        "    loadbalance\n"
        "}\n"
    )


@dataclass(frozen=True)
class Figure:
    """One line of the table: the pod network's value, the node network's, the target."""

    key: str
    label: str
    unit: str
    pod: float | None
    host: float | None
    detail: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def target(self) -> tuple[str, float] | None:
        return TARGETS.get(self.key)

    def as_json(self) -> dict[str, Any]:
        target = self.target
        return {
            "label": self.label,
            "unit": self.unit,
            "pod_network": self.pod,
            "host_network": self.host,
            "target": None if target is None else {"op": target[0], "value": target[1]},
            "met": met(self.pod, target),
            "note": self.note,
            **self.detail,
        }


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    shown = f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return f"{shown} {unit}"


def table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table: figure | pod network | host network | target | met."""
    rows = [("figure", "pod network", "host network", "target", "met")]
    for figure in figures:
        target = figure.target
        verdict = {True: "met", False: "missed", None: ""}[met(figure.pod, target)]
        rows.append(
            (
                figure.label,
                _number(figure.pod, figure.unit),
                _number(figure.host, figure.unit),
                ""
                if target is None
                else f"{target[0].replace('<=', '≤').replace('>=', '≥')} "
                f"{_number(target[1], figure.unit)}",
                verdict,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


# -- processes --------------------------------------------------------------------------------


@dataclass
class Runner:
    """Starts every process of the benchmark as the ordinary user (when run as root), with an
    environment of its own that marks it as the benchmark's."""

    user: pwd.struct_passwd | None
    scratch: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def uid(self) -> int:
        return os.getuid() if self.user is None else self.user.pw_uid

    @property
    def gid(self) -> int:
        return os.getgid() if self.user is None else self.user.pw_gid

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        home = self.user.pw_dir if self.user else os.environ.get("HOME", "/")
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        return {
            "PATH": path,
            "HOME": home,
            "LANG": "C.UTF-8",
            MARK_VARIABLE: str(self.scratch),
            **(extra or {}),
        }

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **options: Any
    ) -> subprocess.Popen[bytes]:
        if self.user is not None:
            options.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        options.setdefault("stdin", subprocess.DEVNULL)
        # A group of its own: Ctrl-C reaches the benchmark alone, which then stops it all.
        return subprocess.Popen(list(argv), env=self.env(env), process_group=0, **options)

    def keep(self, argv: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
        """A process that runs until the benchmark stops it."""
        process = self.popen(argv, **options)
        self.started.append(process)
        return process

    def run(self, argv: Sequence[str], *, timeout: float = 60.0) -> tuple[float, str]:
        """Wall seconds and stdout of one run to its end; RuntimeError when it fails."""
        began = time.monotonic()
        process = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"{' '.join(argv)} took longer than {timeout:g} s") from None
        elapsed = time.monotonic() - began
        if process.returncode != 0:
            said = (err or out).decode(errors="replace").strip()[-600:]
            raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}): {said}")
        return elapsed, out.decode(errors="replace")

    def timed(self, argv: Sequence[str]) -> tuple[float, float]:
        """Wall seconds and CPU seconds (user + system, with its children) of one run."""
        began = time.monotonic()
        process = self.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode})")
        return time.monotonic() - began, usage.ru_utime + usage.ru_stime

    def enter(self, holder: int) -> list[str]:
        return enter_argv(holder, uid=self.uid, gid=self.gid)

    def leftovers(self) -> list[psutil.Process]:
        """The processes of the user that carry this run's mark."""
        found = []
        for process in psutil.process_iter(["uids"]):
            with contextlib.suppress(psutil.Error):
                if process.info["uids"] is None or process.info["uids"].real != self.uid:
                    continue
                if process.pid != os.getpid() and process.environ().get(MARK_VARIABLE) == str(
                    self.scratch
                ):
                    found.append(process)
        return found


def _chown(runner: Runner, *paths: Path) -> None:
    if runner.user is None:
        return
    for path in paths:
        os.chown(path, runner.uid, runner.gid)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(pid: int, port: int) -> bool:
    """Whether the network namespace of `pid` has a TCP socket listening on `port`."""
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                words = row.split()
                if words[3] == "0A" and int(words[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _until(what: str, done: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _cpu_ns(process: psutil.Process) -> float:
    """CPU seconds of a process's threads to the nanosecond (the scheduler's
    /proc/PID/task/*/schedstat), where cpu_times counts in clock ticks of 10 ms: an idle
    process's minute may spend less than one."""
    total = 0
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _kind(process: psutil.Process) -> str:
    words = process.cmdline()
    text = " ".join(words)
    if "hpk-tunnel" in (words[0] if words else ""):
        return "tunnel"
    if process.name() == "slirp4netns":
        return "slirp4netns"
    if "kubelet_py.job.netns" in text:
        return "holder"
    if "kubelet_py.job.network" in text:
        return "keeper"
    return process.name()


# -- the pod network --------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    ip: str
    key: str
    holder: int
    keeper: int

    @property
    def public_key(self) -> str:
        return public_key(self.key)

    def processes(self) -> dict[str, psutil.Process]:
        """Its network's processes by kind: keeper, holder, tunnel, slirp4netns."""
        keeper = psutil.Process(self.keeper)
        found = {"keeper": keeper}
        for child in keeper.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found[_kind(child)] = child
        return found


@dataclass
class Network:
    """A hub and its pods, run as the user through the real modules."""

    runner: Runner
    python: str
    tunnel: Path
    hub: Hub = field(init=False)
    settings: PodNetworkSettings = field(init=False)
    hub_process: subprocess.Popen[bytes] = field(init=False)
    hub_holder: int = field(init=False)
    control_dir: Path | None = None
    pods: dict[str, Pod] = field(default_factory=dict)

    def start_hub(self) -> None:
        folder = self.runner.scratch / "hub"
        port = _free_port(socket.SOCK_DGRAM)
        plan = prepare_hub(
            HubFiles(folder),
            tunnel=self.tunnel,
            endpoint_address="127.0.0.1",
            port=port,
            pod_cidr=POD_CIDR,
            service_cidr=SERVICE_CIDR,
            cluster_domain="cluster.local",
            log_file=folder / "hub.log",
            pid_file=folder / "hub.pid",
        )
        self.control_dir = plan.control.parent
        config = json.loads(HubFiles(folder).config.read_text())
        assert config["interface"]["local"] == [f"{DNS_ADDRESS}/32"]
        _chown(self.runner, folder, *folder.iterdir(), self.control_dir)
        self.hub_process = self.runner.keep(
            plan.spec.argv, env=plan.spec.env, stdout=subprocess.PIPE
        )
        assert self.hub_process.stdout is not None
        self.hub_holder, _ = job_line(self.hub_process.stdout.readline().decode())
        self.hub = Hub(plan.control)
        # The pods' settings as the kubelet reads them from the hub's file.
        self.settings = PodNetworkSettings.from_json(json.loads(plan.hub_file.read_text()))

    def hub_tunnel(self) -> psutil.Process:
        for child in psutil.Process(self.hub_process.pid).children(recursive=True):
            if _kind(child) == "tunnel":
                return child
        raise RuntimeError("the hub has no tunnel")

    def start_pod(self, name: str, ip: str) -> float:
        """Give the hub the pod's key, then run the pod's network step: its wall seconds
        until its line is read."""
        key = new_private_key()
        self.hub.add(public_key(key), ip)
        config = self.runner.scratch / f"{name}.json"
        marker = self.runner.scratch / "markers" / name
        text = network_config(self.settings, PodAddress(ip, key), marker=PurePosixPath(marker))
        config.write_text(text)
        config.chmod(0o600)
        _chown(self.runner, config)
        argv = [self.python, "-I", "-m", "kubelet_py.job.network", str(config)]
        began = time.monotonic()
        process = self.runner.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        elapsed = time.monotonic() - began
        _, err = process.communicate(timeout=30)
        try:
            holder, keeper = job_line(line)
        except RuntimeError as error:
            raise RuntimeError(f"{error} {err.decode(errors='replace').strip()}") from None
        self.pods[name] = Pod(name=name, ip=ip, key=key, holder=holder, keeper=keeper)
        return elapsed

    def stop_pods(self, names: Sequence[str] | None = None) -> None:
        """TERM to each keeper, then wait for them all; the hub forgets their keys."""
        chosen = list(self.pods) if names is None else list(names)
        waiting = []
        for name in chosen:
            pod = self.pods.pop(name)
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pod.keeper)
                process.terminate()
                waiting.append(process)
            with contextlib.suppress(Exception):
                self.hub.remove(pod.public_key)
        _, alive = psutil.wait_procs(waiting, timeout=STOP_TIMEOUT_S)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def handshakes_done(self, names: Sequence[str]) -> bool:
        done = self.hub.handshakes()
        return all(done.get(self.pods[name].public_key, 0) > 0 for name in names)

    def wait_handshakes(self, names: Sequence[str]) -> None:
        _until(
            f"the handshake of {len(names)} pods",
            lambda: self.handshakes_done(names),
            HANDSHAKE_TIMEOUT_S,
            0.25,
        )

    def stop(self) -> None:
        self.stop_pods()
        for process in reversed(self.runner.started):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.runner.started.clear()


def _memory(processes: Mapping[str, psutil.Process]) -> dict[str, Any]:
    """RSS of each process in MB, and the sums of RSS and PSS (which shares out the pages
    the processes share, such as the two Pythons' library pages)."""
    rss: dict[str, float] = {}
    pss = 0.0
    for kind, process in processes.items():
        info = process.memory_full_info()
        rss[kind] = round(info.rss / 1e6, 1)
        pss += info.pss / 1e6
    return {"rss_mb": rss, "rss_sum_mb": round(sum(rss.values()), 1), "pss_sum_mb": round(pss, 1)}


# -- the measurements -------------------------------------------------------------------------


def measure_start(network: Network, runs: int) -> dict[str, Any]:
    times = []
    for index in range(runs):
        name = f"start-{index}"
        times.append(network.start_pod(name, nth_address(FIRST_START_POD, index)) * 1000)
        network.stop_pods([name])
    return _spread(times)


def measure_enter(network: Network, pod: Pod, runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    runner = network.runner
    entering = [runner.run([*runner.enter(pod.holder), "true"])[0] * 1000 for _ in range(runs)]
    plain = [runner.run(["true"])[0] * 1000 for _ in range(runs)]
    return _spread(entering), _spread(plain)


def _all_cpu() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds (user + system) so far."""
    found = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:
            found[process.pid] = (str(process.info["name"]), times.user + times.system)
    return found


def busiest(
    before: Mapping[int, tuple[str, float]],
    after: Mapping[int, tuple[str, float]],
    wall_s: float,
    *,
    labels: Mapping[int, str] | None = None,
    count: int = 6,
) -> list[dict[str, Any]]:
    """The `count` processes that used the most CPU between two `_all_cpu` snapshots, as
    percent of a core (one that started in between counts from 0), named by `labels` where
    it has them."""
    used = []
    for pid, (name, seconds) in after.items():
        earlier = before.get(pid)
        spent = seconds - (earlier[1] if earlier and earlier[0] == name else 0.0)
        used.append((spent, pid, (labels or {}).get(pid, name)))
    used.sort(reverse=True)
    return [
        {"process": label, "pid": pid, "cpu_percent": core_percent(spent, wall_s)}
        for spent, pid, label in used[:count]
        if spent > 0
    ]


def _iperf(
    runner: Runner, client: list[str], watched: Mapping[str, psutil.Process]
) -> dict[str, Any]:
    """One iperf3 client run: its Mbit/s; each watched process's CPU in percent of a core
    (the client's own from its rusage); the machine's busy and softirq percent over all its
    cores; and the busiest processes of the machine meanwhile."""
    labels = {process.pid: name for name, process in watched.items()}
    everyone = _all_cpu()
    machine_before = psutil.cpu_times()
    began = time.monotonic()
    process = runner.popen(client, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    with process.stdout:
        out = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - began
    machine_after = psutil.cpu_times()
    everyone_after = _all_cpu()
    try:
        mbit = iperf_mbit(json.loads(out))
    except (ValueError, KeyError) as error:
        raise RuntimeError(
            f"iperf3 client ({process.returncode}): {error} {out[-400:]!r}"
        ) from None
    cpu = {
        name: core_percent(everyone_after[pid][1] - everyone[pid][1], wall)
        for pid, name in labels.items()
        if pid in everyone and pid in everyone_after
    }
    cpu["iperf3 client"] = core_percent(usage.ru_utime + usage.ru_stime, wall)
    # user, nice, system, idle, iowait, irq, softirq, steal (guest time is in user already)
    total = sum(machine_after[:8]) - sum(machine_before[:8])
    idle = sum(machine_after[3:5]) - sum(machine_before[3:5])
    softirq = machine_after.softirq - machine_before.softirq
    return {
        "mbit_s": mbit,
        "cpu_percent_of_a_core": cpu,
        "machine_busy_percent": round(100.0 * (1 - idle / total), 1),
        "machine_softirq_percent": round(100.0 * softirq / total, 1),
        "busiest": busiest(everyone, everyone_after, wall, labels=labels),
    }


def measure_throughput(network: Network, a: Pod, b: Pod) -> dict[str, Any]:
    runner = network.runner
    server = runner.keep(
        [*runner.enter(b.holder), "iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _until("iperf3's server in pod B", lambda: _listening(server.pid, IPERF_PORT), 10.0)
    watched = {
        "hub tunnel": network.hub_tunnel(),
        "pod A tunnel": a.processes()["tunnel"],
        "pod B tunnel": b.processes()["tunnel"],
        "iperf3 server": psutil.Process(server.pid),
    }
    client = [*runner.enter(a.holder), "iperf3", "-c", b.ip, "-p", str(IPERF_PORT)]
    client += ["-t", str(IPERF_SECONDS), "-J"]
    pod_runs = [_iperf(runner, client, watched) for _ in range(IPERF_RUNS)]

    port = _free_port(socket.SOCK_STREAM)
    local = runner.keep(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _until("iperf3's server on the loopback", lambda: _listening(local.pid, port), 10.0)
    client = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(IPERF_SECONDS), "-J"]
    host_runs = [
        _iperf(runner, client, {"iperf3 server": psutil.Process(local.pid)})
        for _ in range(IPERF_RUNS)
    ]
    for process in (server, local):
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)
        runner.started.remove(process)
    return {"pod": {"runs": pod_runs}, "host": {"runs": host_runs}}


def _coredns(runner: Runner, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = runner.keep(argv, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"CoreDNS ended: {log.read_text()[-600:]}")
        return POD_DNS_READY in log.read_text()

    _until("CoreDNS's start", ready, 20.0)
    return process


def measure_dns(network: Network, pod: Pod, coredns: Path, lookups: int) -> dict[str, Any]:
    runner = network.runner
    scratch = runner.scratch
    in_hub = scratch / "Corefile.hub"
    in_hub.write_text(corefile(port=53, bind=DNS_ADDRESS))
    port = _free_port(socket.SOCK_DGRAM)
    on_host = scratch / "Corefile.host"
    on_host.write_text(corefile(port=port, bind="127.0.0.1"))
    _chown(runner, in_hub, on_host)
    # As hpk.controlplane.network.prepare_pod_dns runs it.
    hub_dns = [
        "nsenter", "--preserve-credentials", "--user", "--net", f"--target={network.hub_holder}",
        "--", str(coredns), "-conf", str(in_hub),
    ]  # fmt: skip
    servers = [
        _coredns(runner, hub_dns, scratch / "coredns-hub.log"),
        _coredns(runner, [str(coredns), "-conf", str(on_host)], scratch / "coredns-host.log"),
    ]
    probe = [network.python, "-I", str(PROBE)]
    expect = ["--expect", SERVICE_ADDRESS]
    _, said = runner.run(
        [*runner.enter(pod.holder), *probe, DNS_ADDRESS, "53", SERVICE_NAME, str(lookups), *expect]
    )
    from_pod = json.loads(said)
    _, said = runner.run([*probe, "127.0.0.1", str(port), SERVICE_NAME, str(lookups), *expect])
    from_host = json.loads(said)
    for process in servers:
        process.terminate()
        process.wait(timeout=STOP_TIMEOUT_S)
        runner.started.remove(process)
    return {
        "pod": {**_spread(from_pod["ms"], 3), "answers": from_pod["answers"]},
        "host": {**_spread(from_host["ms"], 3), "answers": from_host["answers"]},
    }


def measure_idle(network: Network, count: int, window_s: float) -> dict[str, Any]:
    names = [f"idle-{index}" for index in range(count)]
    starts = []
    for index, name in enumerate(names):
        starts.append(network.start_pod(name, nth_address(FIRST_IDLE_POD, index)) * 1000)
    began = time.monotonic()
    network.wait_handshakes(names)
    handshakes_s = time.monotonic() - began
    hub_tunnel = network.hub_tunnel()
    pods = {name: network.pods[name].processes() for name in names}
    pods_before = sum(_cpu_ns(p) for processes in pods.values() for p in processes.values())
    before, ticks_before = _cpu_ns(hub_tunnel), _cpu(hub_tunnel)
    began = time.monotonic()
    time.sleep(window_s)
    wall = time.monotonic() - began
    hub_cpu = core_percent(_cpu_ns(hub_tunnel) - before, wall, 3)
    hub_ticks = core_percent(_cpu(hub_tunnel) - ticks_before, wall, 3)
    pods_after = sum(_cpu_ns(p) for processes in pods.values() for p in processes.values())
    memory = [_memory(processes) for processes in pods.values()]
    done = network.hub.handshakes()
    network.stop_pods(names)
    return {
        "pods": count,
        "window_s": round(wall, 1),
        "hub_tunnel_cpu_percent": hub_cpu,
        "hub_tunnel_cpu_percent_in_clock_ticks": hub_ticks,
        "hub_tunnel_rss_mb": round(hub_tunnel.memory_info().rss / 1e6, 1),
        "pods_network_cpu_percent_total": core_percent(pods_after - pods_before, wall, 3),
        "rss_per_pod_mb": round(sum(m["rss_sum_mb"] for m in memory) / count, 1),
        "pss_per_pod_mb": round(sum(m["pss_sum_mb"] for m in memory) / count, 1),
        "handshakes_done": sum(1 for value in done.values() if value > 0),
        "all_handshakes_within_s": round(handshakes_s, 2),
        "start_ms": _spread(starts),
    }


@contextlib.contextmanager
def tun_open(root: bool) -> Iterator[dict[str, Any]]:
    """/dev/net/tun open to every user for the run; what was done about it."""
    mode = stat.S_IMODE(os.stat(TUN_DEVICE).st_mode)
    found: dict[str, Any] = {"mode": f"{mode:04o}", "changed": False}
    if mode & STOCK_TUN_MODE == STOCK_TUN_MODE:
        yield found
        return
    if not root:
        raise SystemExit(f"{TUN_DEVICE} is {mode:04o}: the pod network needs it 0666")
    Path(TUN_DEVICE).chmod(STOCK_TUN_MODE)
    print(f"{TUN_DEVICE} was {mode:04o}: 0666 for this run, {mode:04o} again after it")
    found["changed"] = True
    try:
        yield found
    finally:
        Path(TUN_DEVICE).chmod(mode)


def measure(network: Network, *, quick: bool, pods: int, coredns: Path) -> list[Figure]:
    runs = 5 if quick else 20
    network.start_hub()
    start = measure_start(network, runs)
    network.start_pod("a", POD_A)
    network.start_pod("b", POD_B)
    a, b = network.pods["a"], network.pods["b"]
    network.wait_handshakes(["a", "b"])
    idle_memory = _memory(a.processes())
    entering, plain = measure_enter(network, a, runs)
    dns = measure_dns(network, a, coredns, DNS_LOOKUPS)
    throughput = measure_throughput(network, a, b)
    loaded = {
        "pod A tunnel": a.processes()["tunnel"].memory_info().rss,
        "pod B tunnel": b.processes()["tunnel"].memory_info().rss,
        "hub tunnel": network.hub_tunnel().memory_info().rss,
    }
    after_memory = _memory(a.processes())
    network.stop_pods(["a", "b"])
    idle = measure_idle(network, pods, 20.0 if quick else 60.0)
    pod_runs = [run["mbit_s"] for run in throughput["pod"]["runs"]]
    host_runs = [run["mbit_s"] for run in throughput["host"]["runs"]]
    return [
        Figure(
            "pod_start",
            f"pod start added by the network setup, p50 ({start['n']} runs)",
            "ms",
            start["p50"],
            0.0,
            {"pod": start, f"start_with_{pods}_pods_ms": idle["start_ms"]},
            "on the node's network the job runs no network step: 0 by definition",
        ),
        Figure(
            "enter",
            "entering the pod's namespaces for one container (`true`), p50",
            "ms",
            entering["p50"],
            plain["p50"],
            {"pod": entering, "host": plain},
            "pod: enter_argv (nsenter, then unshare) and `true`; host: `true` alone",
        ),
        Figure(
            "throughput",
            f"pod-to-pod TCP through the hub, iperf3 -t {IPERF_SECONDS}, max of {IPERF_RUNS}",
            "Mbit/s",
            max(pod_runs),
            max(host_runs),
            throughput,
            "host: iperf3 over the node's loopback (127.0.0.1)",
        ),
        Figure(
            "dns",
            f"DNS lookup of a Service name from a pod, p50 of {DNS_LOOKUPS}",
            "ms",
            dns["pod"]["p50"],
            dns["host"]["p50"],
            dns,
            "pod: CoreDNS in the hub on 10.96.0.10:53; host: the same CoreDNS on 127.0.0.1",
        ),
        Figure(
            "memory_idle_pod",
            "memory of one idle pod's network (RSS: keeper, holder, tunnel, slirp4netns)",
            "MB",
            idle_memory["rss_sum_mb"],
            0.0,
            {"pod": idle_memory},
            "RSS counts the pages the processes share once each; pss_sum_mb shares them out",
        ),
        Figure(
            "tunnel_after_iperf",
            "pod A's tunnel RSS after the iperf3 runs",
            "MB",
            round(loaded["pod A tunnel"] / 1e6, 1),
            None,
            {
                "rss_mb": {name: round(rss / 1e6, 1) for name, rss in loaded.items()},
                "pod_a_network": after_memory,
            },
        ),
        Figure(
            "hub_cpu",
            f"hub tunnel CPU with {pods} idle pods, over {idle['window_s']:g} s",
            "% of a core",
            idle["hub_tunnel_cpu_percent"],
            0.0,
            idle,
            "on the node's network there is no hub: 0",
        ),
        Figure(
            "memory_per_pod",
            f"memory per pod's network with {pods} idle pods (RSS sum / N)",
            "MB",
            idle["rss_per_pod_mb"],
            0.0,
            {"pss_per_pod_mb": idle["pss_per_pod_mb"]},
        ),
    ]


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        root = Path(__file__).resolve().parent.parent
        argv = ["git", "-C", str(root), "rev-parse", "--short", "HEAD"]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.network",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs, shorter windows")
    parser.add_argument("--pods", type=int, default=None, help="idle pods (100; 10 quick)")
    parser.add_argument("--user", default="hpk-e2e", help="the user it all runs as, as root")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    pods = args.pods or (10 if args.quick else 100)
    root = os.geteuid() == 0
    user = pwd.getpwnam(args.user) if root else None
    toolchain = Toolchain.load()
    tunnel, coredns = toolchain.local(TUNNEL), toolchain.binary("coredns")
    # TERM ends the run as Ctrl-C does: through the `finally`s, which stop what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="hpk-bench-network-", dir="/tmp"))
    runner = Runner(user=user, scratch=scratch)
    (scratch / "markers").mkdir()
    _chown(runner, scratch, scratch / "markers")
    network = Network(runner=runner, python=sys.executable, tunnel=tunnel)
    leftover: list[str] = []
    try:
        with tun_open(root) as tun:
            try:
                figures = measure(network, quick=args.quick, pods=pods, coredns=coredns)
            finally:
                network.stop()
                left = runner.leftovers()
                leftover = [" ".join(process.cmdline()) for process in left]
                for process in left:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                if leftover:
                    print(f"left running after the stop, killed: {leftover}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: what it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if network.control_dir is not None:
            shutil.rmtree(network.control_dir, ignore_errors=True)
    now = datetime.now(UTC)
    out = args.out or RESULTS / f"{now:%Y-%m-%d}-network.json"
    results = {
        "date": now.isoformat(timespec="seconds"),
        "commit": _commit(),
        "user": args.user if user is not None else pwd.getpwuid(os.geteuid()).pw_name,
        "quick": args.quick,
        "machine": {
            "cores": os.cpu_count(),
            "load_average_at_start": [round(value, 2) for value in load],
            "kernel": platform.release(),
        },
        "tun_device": tun,
        "left_over_after_stop": leftover,
        "figures": {figure.key: figure.as_json() for figure in figures},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(table(figures))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
