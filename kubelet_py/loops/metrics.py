"""The kubelet's own metrics, served at the kubelet API's `/metrics` in Prometheus' text format.

- `hpk_kubelet_slurm_calls_total{command,outcome}` and
  `hpk_kubelet_slurm_call_duration_seconds{command}`: every Slurm command the kubelet ran
  (sbatch, squeue, sacct, scancel, sinfo, sstat), counted and timed where
  kubelet_py.adapters.slurm runs them all (`SlurmClient._run`, through `observe_slurm`).
  The outcome is `ok` (exit code 0), `error` (another code) or `unavailable` (the command
  could not run or ran out of time).
- `workqueue_depth{name}`: the keys waiting in the pod controller's (`pods`) and the binder's
  (`binder`) work queues, due or not, as client-go's work queues name it.
- `hpk_kubelet_pods{phase}`: the pods bound to the kubelet's nodes by the phase the
  controller knows for each (the status it wrote last, else the pod's own).
- `hpk_kubelet_pod_status_lag_seconds`: from the moment the kubelet heard of a change of a
  pod's job (its Slurm state, from the job watcher, or its containers' markers, from the
  marker watch) to the moment the pod's new status was written to the API server. The
  benchmark's status lag (bench/measures.py, container exit marker to the watch event that
  shows the container terminated) is this, plus the wait for the watcher's or marker watch's
  next poll before, and the watch's delivery after.

The registry is the one given (a fresh one by default), never prometheus_client's global
one, so that tests and two kubelets in one process do not share counts. Gauges are read when
scraped, from callbacks, so nothing has to keep them up to date.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubelet_py.loops.logserver import Route, RouteAnswer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus' text format, as `/metrics` and `/metrics/resource` answer."""

SLURM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a quick squeue takes 10 to 30 ms, an unreachable controller makes commands wait
about 9 s, and the adapter gives up after 60 s."""

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: a status write normally takes some ms, and a busy API server some s."""

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")


class KubeletMetrics:
    """The kubelet's metrics (see the module docstring) in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.slurm_calls = Counter(
            "hpk_kubelet_slurm_calls",
            "Slurm commands the kubelet ran, by command and outcome (ok, error, unavailable)",
            ["command", "outcome"],
            registry=self.registry,
        )
        self.slurm_seconds = Histogram(
            "hpk_kubelet_slurm_call_duration_seconds",
            "How long each Slurm command the kubelet ran took, by command",
            ["command"],
            buckets=SLURM_BUCKETS,
            registry=self.registry,
        )
        self.status_lag = Histogram(
            "hpk_kubelet_pod_status_lag_seconds",
            "From a change of a pod's job seen by the kubelet (job watcher or marker watch) "
            "to its status written to the API server",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._queues: dict[str, Callable[[], int]] = {}
        self._phases: Callable[[], Mapping[str, int]] | None = None
        self.registry.register(_Gauges(self))

    def observe_slurm(self, command: str, seconds: float, outcome: str) -> None:
        """A kubelet_py.adapters.slurm.CallObserver: count and time one command."""
        self.slurm_calls.labels(command=command, outcome=outcome).inc()
        self.slurm_seconds.labels(command=command).observe(seconds)

    def observe_status_lag(self, seconds: float) -> None:
        self.status_lag.observe(max(0.0, seconds))

    def watch_queue(self, name: str, depth: Callable[[], int]) -> None:
        """Report `depth()` as the work queue `name`'s depth at each scrape."""
        with self._lock:
            self._queues[name] = depth

    def watch_phases(self, phases: Callable[[], Mapping[str, int]]) -> None:
        """Report `phases()` (phase -> pods) as the pods by phase at each scrape."""
        with self._lock:
            self._phases = phases

    def render(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)

    def route(self) -> Route:
        """The kubelet API's `/metrics`: the same for every node's port."""

        def metrics(_node: str | None, _query: Mapping[str, Sequence[str]]) -> RouteAnswer:
            return RouteAnswer(body=self.render(), content_type=CONTENT_TYPE)

        return metrics

    def callbacks(
        self,
    ) -> tuple[dict[str, Callable[[], int]], Callable[[], Mapping[str, int]] | None]:
        with self._lock:
            return dict(self._queues), self._phases


class _Gauges(Collector):
    """The gauges read from callbacks when scraped."""

    def __init__(self, metrics: KubeletMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queues, phases = self.metrics.callbacks()
        depth = GaugeMetricFamily(
            "workqueue_depth", "Keys waiting in the work queue, due or not", labels=["name"]
        )
        for name, read in sorted(queues.items()):
            depth.add_metric([name], read())
        yield depth
        pods = GaugeMetricFamily(
            "hpk_kubelet_pods",
            "Pods bound to the kubelet's nodes, by the phase the controller knows",
            labels=["phase"],
        )
        if phases is not None:
            counted = dict(phases())
            for phase in (*PHASES, *sorted(set(counted) - set(PHASES))):
                pods.add_metric([phase], counted.get(phase, 0))
        yield pods
