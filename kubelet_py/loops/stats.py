"""What the pods use: the kubelet's Summary API (`/stats/summary`) and resource metrics
(`/metrics/resource`, what metrics-server reads for `kubectl top`).

Each hpk node is a Slurm partition, not a machine, and Slurm measures jobs, not containers:

- **A pod's** CPU and memory are its job's: everything the job runs, hpk's container
  launchers and the pod network's helpers included. `sstat` (kubelet_py.adapters.slurm,
  `SlurmClient.usage`) tells them, summed over the job's running steps, and lists the job's
  processes. One sstat call asks for every running job of the kubelet, and its answer is
  kept for `UsageSettings.ttl_s`, so that a scrape of each node, or two scrapes close
  together, make one call. Slurm's figures are only as fresh as its accounting poll
  (`JobAcctGatherFrequency`, 30 s by default), so where the job's processes can be seen from
  here (the job runs on the kubelet's host: a single-host cluster, the test bed) the pod's
  figures are the sum over those processes, read from `/proc` now. A job with srun steps is
  Slurm's alone: its tasks run on other nodes.
- **A container's** figures are those of its own processes, where they can be seen: the
  launcher of each container is found among the job's processes by its command line (which
  names the container's folder in this pod's folder), and the processes below it are the
  container's (the launcher itself is hpk's). Where the job runs on another host its
  processes cannot be seen: a pod with one running container gives that container the pod's
  figures, a pod with several gives them no figures of their own (metrics-server then leaves
  that pod out of `kubectl top pod`).
- **A node's** figures are the sum over this kubelet's running pods on it: its CPU counter
  also keeps what the pods that have ended used while the kubelet watched them, so it never
  goes down, and its memory is what the running pods hold now. A node without a running pod
  shows no usage, and metrics-server reports none for it.
- Memory is resident memory (RSS) alone: Slurm measures no page cache, so `workingSetBytes`,
  `usageBytes` and `rssBytes` are the same figure.

A pod whose figures cannot be read (its job has no running step yet, Slurm gave no figures, a
failed call) is left out of the answer and logged once, and `scrape_error` is 1; the answer
for every other pod is served. What it may touch: Slurm only through the injected
`UsageSource`, `/proc` only through `ProcessTable` (read only), nothing of the API server.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kubelet_py.adapters.slurm import JobUsage, SlurmError
from kubelet_py.job.clock import api_time
from kubelet_py.loops.logserver import Route, RouteAnswer
from kubelet_py.loops.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

JSON = dict[str, Any]

LAUNCHER_MODULE = "kubelet_py.job.launch"
"""The module every container's launcher runs (`python -I -m kubelet_py.job.launch ...`)."""


@dataclass(frozen=True)
class RunningContainer:
    """A container whose current run has started and not ended."""

    name: str
    started_at: datetime
    """When its current run started (its `started` marker)."""


@dataclass(frozen=True)
class RunningPod:
    """A pod whose job runs now, as the provider knows it."""

    namespace: str
    name: str
    uid: str
    node: str
    """The node it is bound to (`spec.nodeName`)."""
    job_id: str
    folder: Path
    """Its pod folder; the launchers' command lines name its `containers/<name>`."""
    started_at: datetime | None
    """When its job started."""
    containers: tuple[RunningContainer, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Usage:
    """CPU and memory of a pod, a container or a node at one moment."""

    cpu_seconds: float
    """CPU time used so far, in core-seconds."""
    memory_bytes: int
    """Resident memory now."""


@dataclass(frozen=True)
class PodSample:
    pod: RunningPod
    usage: Usage
    containers: Mapping[str, Usage]
    """Container name -> its own figures; only the containers measured (module docstring)."""


@dataclass(frozen=True)
class Sample:
    """Every running pod's figures, taken at one moment."""

    at: datetime
    pods: tuple[PodSample, ...]
    failed: bool
    """Whether some pod's figures could not be read (it is left out)."""


@dataclass(frozen=True)
class UsageSettings:
    """How often Slurm is asked."""

    ttl_s: float = 5.0
    """How long one sstat answer serves: metrics-server scrapes every node at once, and a
    second scrape within this time is answered from the same call."""


UsageSource = Callable[[Sequence[str]], Mapping[str, JobUsage]]
"""Job IDs -> the running steps of each, in one call (SlurmClient.usage); raises SlurmError."""

RunningPods = Callable[[], Sequence[RunningPod]]
"""The pods whose jobs run now (SlurmProvider.running_pods)."""


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Process:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    cpu_seconds: float
    """Its user and system time, and that of the children it has reaped."""
    rss_bytes: int
    argv: tuple[str, ...]


class ProcessTable:
    """Reads processes from /proc (or a folder laid out like it, for the unit tests)."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    def read(self, pids: Iterable[int]) -> dict[int, Process]:
        """The given processes that exist here; the others (gone, or on another host) are
        missing."""
        found = {}
        for pid in pids:
            try:
                stat = (self.root / str(pid) / "stat").read_text()
                argv = (self.root / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            # The command name is in parentheses and may itself hold spaces and parentheses.
            fields = stat[stat.rfind(")") + 2 :].split()
            try:
                ppid = int(fields[1])
                ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
                rss_pages = int(fields[21])
            except (IndexError, ValueError):
                continue
            found[pid] = Process(
                pid=pid,
                ppid=ppid,
                cpu_seconds=ticks / self._ticks,
                rss_bytes=max(0, rss_pages) * self._page,
                argv=tuple(part.decode(errors="replace") for part in argv.split(b"\0") if part),
            )
        return found


def launcher_container(process: Process, containers_dir: Path) -> str | None:
    """The container a launcher process runs, when it is one of this pod's launchers: its
    argv runs kubelet_py.job.launch, and the word before `--` is `<containers_dir>/<name>`."""
    argv = process.argv
    if LAUNCHER_MODULE not in argv or "--" not in argv:
        return None
    folder = argv[argv.index("--") - 1]
    parent, _, name = folder.rstrip("/").rpartition("/")
    if not name or os.path.normpath(parent) != os.path.normpath(containers_dir):
        return None
    return name


def container_usage(
    processes: Mapping[int, Process], containers_dir: Path
) -> dict[str, Usage] | None:
    """Each container's figures from the job's processes: the processes below its launcher
    (the launcher itself is hpk's, not the container's). None when no launcher of this pod is
    among them: the job runs where this host cannot see its processes."""
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    usage: dict[str, Usage] = {}
    for process in processes.values():
        name = launcher_container(process, containers_dir)
        if name is None:
            continue
        cpu, memory = 0.0, 0
        below = list(children.get(process.pid, ()))
        while below:
            pid = below.pop()
            cpu += processes[pid].cpu_seconds
            memory += processes[pid].rss_bytes
            below.extend(children.get(pid, ()))
        before = usage.get(name)  # a launcher that forked a probe is still one container
        usage[name] = Usage(
            cpu_seconds=cpu + (before.cpu_seconds if before else 0.0),
            memory_bytes=memory + (before.memory_bytes if before else 0),
        )
    return usage or None


def _local_pids(job: JobUsage) -> tuple[int, ...]:
    """The job's processes that may be this host's: those of its batch (and extern) step,
    which run on one node. A job with srun steps has tasks on other nodes, whose pids mean
    nothing here, and whose containers are those tasks, not what runs below their
    launchers: its processes are not looked at."""
    if any(not step.step_id.endswith((".batch", ".extern")) for step in job.steps):
        return ()
    return job.pids


# ---------------------------------------------------------------------------------------------
# Sampling


class PodStats:
    """Samples the running pods' figures on demand, and answers for a node (module docstring).

    Thread-safe: the kubelet API serves each request on a thread of its own.
    """

    def __init__(
        self,
        *,
        pods: RunningPods,
        usage: UsageSource,
        processes: ProcessTable | None = None,
        settings: UsageSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pods = pods
        self._usage = usage
        self._processes = processes or ProcessTable()
        self.settings = settings or UsageSettings()
        self._clock = clock
        self._now = now
        self.started = now()
        """When the kubelet began to measure: the nodes' startTime."""
        self._lock = threading.Lock()
        self._sample: tuple[float, Sample] | None = None
        self._rates: dict[str, tuple[tuple[datetime, float] | None, tuple[datetime, float]]] = {}
        """Figure key -> its sample before the last one (None before there is one) and its
        last one: the two a CPU rate is computed from."""
        self._ended: dict[str, float] = {}
        """Node -> CPU time of its pods that have ended since the kubelet watched them."""
        self._last_cpu: dict[str, tuple[str, float]] = {}
        """Pod UID -> (node, its last CPU figure), to move to `_ended` once it is gone."""
        self._unread: set[str] = set()
        """Pods whose figures could not be read, each logged once."""

    def sample(self) -> Sample:
        """Every running pod's figures; one Slurm call per `settings.ttl_s` at most."""
        with self._lock:
            if self._sample is not None and self._clock() - self._sample[0] < self.settings.ttl_s:
                return self._sample[1]
            sample = self._take()
            self._sample = (self._clock(), sample)
            return sample

    def _take(self) -> Sample:
        running = list(self._pods())
        at = self._now()
        failed = False
        try:
            jobs = self._usage([pod.job_id for pod in running]) if running else {}
        except SlurmError as error:
            log.warning("sstat failed; no pod's figures this time: %s", error)
            jobs, failed = {}, True
        pods = []
        for pod in running:
            measured = self._measure(pod, jobs.get(pod.job_id))
            if measured is None:
                failed = True
                continue
            pods.append(measured)
        self._retire(pods, running)
        return Sample(at=at, pods=tuple(pods), failed=failed)

    def _measure(self, pod: RunningPod, job: JobUsage | None) -> PodSample | None:
        processes = self._processes.read(_local_pids(job)) if job is not None else {}
        containers = container_usage(processes, pod.folder / "containers")
        usage: Usage | None = None
        if containers is not None:  # its processes are seen here: fresher than Slurm's poll
            usage = Usage(
                cpu_seconds=sum(process.cpu_seconds for process in processes.values()),
                memory_bytes=sum(process.rss_bytes for process in processes.values()),
            )
        elif job is not None and job.cpu_seconds is not None and job.memory_bytes is not None:
            usage = Usage(cpu_seconds=job.cpu_seconds, memory_bytes=job.memory_bytes)
        if usage is None:
            if pod.uid not in self._unread:
                self._unread.add(pod.uid)
                why = "sstat lists no running step" if job is None else "sstat gave no figures"
                log.info("%s: job %s: no usage figures (%s); left out", pod.key, pod.job_id, why)
            return None
        self._unread.discard(pod.uid)
        running = {container.name for container in pod.containers}
        if containers is not None:
            containers = {name: used for name, used in containers.items() if name in running}
        elif len(running) == 1:
            containers = {next(iter(running)): usage}
        else:
            containers = {}
        return PodSample(pod=pod, usage=usage, containers=containers)

    def _retire(self, pods: Sequence[PodSample], running: Sequence[RunningPod]) -> None:
        """Keep the CPU time of pods that are no longer running in their node's counter, and
        forget what was kept of them."""
        alive = {pod.uid for pod in running}
        for uid, (node, cpu) in list(self._last_cpu.items()):
            if uid not in alive:
                self._ended[node] = self._ended.get(node, 0.0) + cpu
                del self._last_cpu[uid]
        for key in [key for key in self._rates if key.split("/")[1] not in alive]:
            if not key.startswith("node/"):
                del self._rates[key]
        for sample in pods:
            self._last_cpu[sample.pod.uid] = (sample.pod.node, sample.usage.cpu_seconds)
        self._unread &= alive

    def node_usage(self, node: str | None, sample: Sample) -> Usage:
        """The node's figures in `sample`: its running pods' sum, with the CPU time of its
        ended pods (None: every node's)."""
        pods = [pod for pod in sample.pods if node is None or pod.pod.node == node]
        with self._lock:
            ended = sum(cpu for name, cpu in self._ended.items() if node is None or name == node)
        return Usage(
            cpu_seconds=ended + sum(pod.usage.cpu_seconds for pod in pods),
            memory_bytes=sum(pod.usage.memory_bytes for pod in pods),
        )

    def nano_cores(self, key: str, at: datetime, cpu_seconds: float) -> int | None:
        """The CPU rate since the last sample of `key`, in billionths of a core; None for its
        first sample."""
        with self._lock:
            earlier, last = self._rates.get(key, (None, (at, cpu_seconds)))
            if last[0] < at:  # a new sample: the last one becomes the one before
                earlier, last = last, (at, cpu_seconds)
            self._rates[key] = (earlier, last)
        if earlier is None or last[0] <= earlier[0]:
            return None
        seconds = (last[0] - earlier[0]).total_seconds()
        return max(0, round((last[1] - earlier[1]) / seconds * 1e9))


# ---------------------------------------------------------------------------------------------
# The answers


def _cpu(stats: PodStats, key: str, at: datetime, used: Usage) -> JSON:
    cpu: JSON = {
        "time": api_time(at),
        "usageCoreNanoSeconds": round(used.cpu_seconds * 1e9),
    }
    rate = stats.nano_cores(key, at, used.cpu_seconds)
    if rate is not None:
        cpu["usageNanoCores"] = rate
    return cpu


def _memory(at: datetime, used: Usage) -> JSON:
    return {
        "time": api_time(at),
        "workingSetBytes": used.memory_bytes,
        "usageBytes": used.memory_bytes,
        "rssBytes": used.memory_bytes,
    }


def summary(stats: PodStats, node: str | None) -> JSON:
    """The Summary API's answer (k8s.io/kubelet/pkg/apis/stats/v1alpha1) for `node`, or for
    every node of the kubelet when None."""
    sample = stats.sample()
    at = sample.at
    used = stats.node_usage(node, sample)
    pods = []
    for measured in sample.pods:
        pod = measured.pod
        if node is not None and pod.node != node:
            continue
        containers = []
        for container in pod.containers:
            figures = measured.containers.get(container.name)
            entry: JSON = {"name": container.name, "startTime": api_time(container.started_at)}
            if figures is not None:
                key = f"container/{pod.uid}/{container.name}/{container.started_at.timestamp()}"
                entry["cpu"] = _cpu(stats, key, at, figures)
                entry["memory"] = _memory(at, figures)
            containers.append(entry)
        pods.append(
            {
                "podRef": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
                "startTime": api_time(pod.started_at or at),
                "containers": containers,
                "cpu": _cpu(stats, f"pod/{pod.uid}", at, measured.usage),
                "memory": _memory(at, measured.usage),
            }
        )
    return {
        "node": {
            "nodeName": node or "",
            "startTime": api_time(stats.started),
            "cpu": _cpu(stats, f"node/{node or ''}", at, used),
            "memory": _memory(at, used),
        },
        "pods": pods,
    }


class _ResourceMetrics(Collector):
    """The resource metrics of one sample, as the kubelet's `/metrics/resource` names them."""

    def __init__(self, stats: PodStats, node: str | None) -> None:
        self.stats = stats
        self.node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        sample = self.stats.sample()
        stamp = sample.at.timestamp()
        used = self.stats.node_usage(self.node, sample)
        node_cpu = CounterMetricFamily(
            "node_cpu_usage_seconds",
            "Cumulative cpu time consumed by the node in core-seconds: the sum over the "
            "kubelet's pods on it",
        )
        node_cpu.add_metric([], used.cpu_seconds, timestamp=stamp)
        node_memory = GaugeMetricFamily(
            "node_memory_working_set_bytes",
            "Current working set of the node in bytes: the sum over the kubelet's running "
            "pods on it",
        )
        node_memory.add_metric([], used.memory_bytes, timestamp=stamp)
        labels = ["container", "pod", "namespace"]
        container_cpu = CounterMetricFamily(
            "container_cpu_usage_seconds",
            "Cumulative cpu time consumed by the container in core-seconds",
            labels=labels,
        )
        container_memory = GaugeMetricFamily(
            "container_memory_working_set_bytes",
            "Current working set of the container in bytes",
            labels=labels,
        )
        container_start = GaugeMetricFamily(
            "container_start_time_seconds",
            "Start time of the container since unix epoch in seconds",
            labels=labels,
        )
        pod_cpu = CounterMetricFamily(
            "pod_cpu_usage_seconds",
            "Cumulative cpu time consumed by the pod in core-seconds: its Slurm job's",
            labels=["pod", "namespace"],
        )
        pod_memory = GaugeMetricFamily(
            "pod_memory_working_set_bytes",
            "Current working set of the pod in bytes: its Slurm job's",
            labels=["pod", "namespace"],
        )
        for measured in sample.pods:
            pod = measured.pod
            if self.node is not None and pod.node != self.node:
                continue
            pod_cpu.add_metric(
                [pod.name, pod.namespace], measured.usage.cpu_seconds, timestamp=stamp
            )
            pod_memory.add_metric(
                [pod.name, pod.namespace], measured.usage.memory_bytes, timestamp=stamp
            )
            for container in pod.containers:
                figures = measured.containers.get(container.name)
                if figures is None:
                    continue
                names = [container.name, pod.name, pod.namespace]
                container_cpu.add_metric(names, figures.cpu_seconds, timestamp=stamp)
                container_memory.add_metric(names, figures.memory_bytes, timestamp=stamp)
                container_start.add_metric(names, container.started_at.timestamp(), timestamp=stamp)
        error = GaugeMetricFamily(
            "scrape_error",
            "1 if there was an error while getting container metrics, 0 otherwise",
        )
        error.add_metric([], 1 if sample.failed else 0, timestamp=stamp)
        yield from (
            container_cpu,
            container_memory,
            container_start,
            node_cpu,
            node_memory,
            pod_cpu,
            pod_memory,
            error,
        )


def resource_metrics(stats: PodStats, node: str | None) -> bytes:
    """The `/metrics/resource` answer for `node` (None: every node's), in Prometheus' text
    format, each sample stamped with the time it was taken (in ms)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ResourceMetrics(stats, node))
    return generate_latest(registry)


def stats_routes(stats: PodStats) -> dict[str, Route]:
    """The kubelet API's `/stats/summary` and `/metrics/resource`, for the node of the port
    asked (every node's for a port that stands for none)."""

    def summary_route(node: str | None, _query: Mapping[str, Sequence[str]]) -> RouteAnswer:
        body = json.dumps(summary(stats, node), indent=2).encode()
        return RouteAnswer(body=body, content_type="application/json")

    def resource_route(node: str | None, _query: Mapping[str, Sequence[str]]) -> RouteAnswer:
        return RouteAnswer(body=resource_metrics(stats, node), content_type=CONTENT_TYPE)

    return {"/stats/summary": summary_route, "/metrics/resource": resource_route}
