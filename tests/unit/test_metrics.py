"""The kubelet's own metrics (kubelet_py.loops.metrics): Slurm calls counted where the
adapter runs them, the work queues' depth, pods by phase and the status lag, read back in
Prometheus' text format as a scraper reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from kubelet_py.adapters.apiserver import WatchEvent
from kubelet_py.adapters.slurm import SlurmClient
from kubelet_py.loops.metrics import KubeletMetrics
from tests.unit.fakes import FakeProvider, FakeRunner, Kit, failed, make_pod, ok, until

pytestmark = pytest.mark.timeout(30)


def samples(metrics: KubeletMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_slurm_calls_are_counted_and_timed_by_command_and_outcome() -> None:
    metrics = KubeletMetrics()
    runner = FakeRunner(ok("7\n"), ok(""), failed("sinfo: error: Invalid partition"))
    client = SlurmClient(runner, observer=metrics.observe_slurm)
    client.submit(Path("/pods/default/p/job.sh"), [])
    client.queue(["7", "8"])
    with pytest.raises(Exception, match="sinfo"):
        client.partitions()
    found = samples(metrics)
    assert found[("hpk_kubelet_slurm_calls_total", (("command", "sbatch"), ("outcome", "ok")))] == 1
    assert found[("hpk_kubelet_slurm_calls_total", (("command", "squeue"), ("outcome", "ok")))] == 1
    assert (
        found[("hpk_kubelet_slurm_calls_total", (("command", "sinfo"), ("outcome", "error")))] == 1
    )
    assert found[("hpk_kubelet_slurm_call_duration_seconds_count", (("command", "sbatch"),))] == 1
    bucket = (
        "hpk_kubelet_slurm_call_duration_seconds_bucket",
        (("command", "squeue"), ("le", "+Inf")),
    )
    assert found[bucket] == 1


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = KubeletMetrics(), KubeletMetrics(CollectorRegistry())
    one.observe_slurm("sbatch", 0.01, "ok")
    key = ("hpk_kubelet_slurm_calls_total", (("command", "sbatch"), ("outcome", "ok")))
    assert samples(one)[key] == 1
    assert key not in samples(two), "nothing shared through a global registry"


def test_queue_depths_and_phases_are_read_when_scraped() -> None:
    metrics = KubeletMetrics()
    depth = {"pods": 3}
    metrics.watch_queue("pods", lambda: depth["pods"])
    metrics.watch_queue("binder", lambda: 0)
    metrics.watch_phases(lambda: {"Running": 2, "Failed": 1})
    found = samples(metrics)
    assert found[("workqueue_depth", (("name", "pods"),))] == 3
    assert found[("workqueue_depth", (("name", "binder"),))] == 0
    assert found[("hpk_kubelet_pods", (("phase", "Running"),))] == 2
    assert found[("hpk_kubelet_pods", (("phase", "Failed"),))] == 1
    assert found[("hpk_kubelet_pods", (("phase", "Pending"),))] == 0, "every phase, even at 0"
    depth["pods"] = 0
    assert samples(metrics)[("workqueue_depth", (("name", "pods"),))] == 0


def test_the_controller_reports_its_queue_phases_and_status_lag() -> None:
    provider = FakeProvider()
    kit = Kit(provider)
    lags: list[float] = []
    kit.controller.status_lag = lags.append
    writes = kit.api.patch_pod_status

    def slow_write(**kwargs: object) -> object:
        kit.clock.now += 0.75  # the API server takes its time
        return writes(**kwargs)  # type: ignore[arg-type]

    kit.api.patch_pod_status = slow_write  # type: ignore[method-assign]
    with kit.running():
        kit.controller.offer(WatchEvent("ADDED", make_pod()))
        until("the job", lambda: provider.job_id("default/web") is not None)
        kit.idle()
        assert kit.controller.phases() == {"Pending": 1}
        job_id = str(provider.job_id("default/web"))
        provider.set_status(job_id, "Running")
        until("the Running status", lambda: kit.api.of("status"))
        kit.idle()
        assert lags == [0.75], "from the provider's report to the status written"
        assert kit.controller.phases() == {"Running": 1}
        provider.set_status(job_id, "Running")
        kit.idle()
        assert lags == [0.75], "a report that changes no status is no lag"
        kit.api.failures["status"] = 1
        provider.set_status(job_id, "Succeeded", final=True)
        until("the Succeeded status", lambda: len(kit.api.of("status")) == 2)
        kit.idle()
    assert lags[1] >= 1.5, "a failed write is retried; the lag counts from the first report"
    assert kit.controller.queued() == 0
