"""The pods' usage (kubelet_py.loops.stats): sstat's figures through an injected source, the
containers' processes from a folder laid out like /proc, and the Summary API's and the
resource metrics' answers as metrics-server and `kubectl get --raw` read them."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubelet_py.adapters.slurm import JobUsage, SlurmUnavailable, StepUsage
from kubelet_py.loops.stats import (
    PodStats,
    ProcessTable,
    RunningContainer,
    RunningPod,
    UsageSettings,
    container_usage,
    resource_metrics,
    stats_routes,
    summary,
)

pytestmark = pytest.mark.timeout(30)

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
T0 = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)


class FakeProc:
    """A folder laid out like /proc: `<pid>/stat` and `<pid>/cmdline`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self,
        pid: int,
        ppid: int,
        argv: Sequence[str],
        *,
        cpu_s: float = 0.0,
        reaped_s: float = 0.0,
        rss: int = 0,
        comm: str = "x",
    ) -> None:
        folder = self.root / str(pid)
        folder.mkdir(parents=True)
        user = round(cpu_s * TICKS)
        children = round(reaped_s * TICKS)
        # Fields 3 to 24 of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt
        # majflt cmajflt utime stime cutime cstime priority nice threads itreal start vsize rss
        rest = f"S {ppid} 1 1 0 -1 0 0 0 0 0 {user} 0 {children} 0 20 0 1 0 100 0 {rss // PAGE}"
        (folder / "stat").write_text(f"{pid} ({comm}) {rest} 0 0 0\n")
        (folder / "cmdline").write_bytes(b"\0".join(word.encode() for word in argv) + b"\0")


def launcher(folder: Path, container: str) -> list[str]:
    return [
        "/usr/bin/python3",
        "-I",
        "-m",
        "kubelet_py.job.launch",
        "--image",
        "/images/busybox.sif",
        "--termination",
        "/dev/termination-log",
        str(folder / "containers" / container),
        "--",
        "/tools/apptainer",
        "--quiet",
        "exec",
    ]


def running_pod(
    folder: Path,
    *,
    name: str = "web",
    uid: str = "uid-web",
    job_id: str = "41",
    node: str = "hpk-batch",
    containers: Sequence[str] = ("main",),
) -> RunningPod:
    return RunningPod(
        namespace="default",
        name=name,
        uid=uid,
        node=node,
        job_id=job_id,
        folder=folder,
        started_at=T0,
        containers=tuple(
            RunningContainer(name=c, started_at=T0 + timedelta(seconds=1)) for c in containers
        ),
    )


def job(job_id: str, cpu: float | None, memory: int | None, pids: Sequence[int] = ()) -> JobUsage:
    step = StepUsage(f"{job_id}.batch", cpu_seconds=cpu, memory_bytes=memory, pids=tuple(pids))
    return JobUsage(job_id=job_id, steps=(step,))


class Source:
    """The UsageSource seam: answers from `jobs`, counts its calls."""

    def __init__(self, jobs: dict[str, JobUsage] | None = None) -> None:
        self.jobs = dict(jobs or {})
        self.calls: list[list[str]] = []
        self.down = False

    def __call__(self, job_ids: Sequence[str]) -> dict[str, JobUsage]:
        self.calls.append(list(job_ids))
        if self.down:
            raise SlurmUnavailable("sstat: Unable to contact slurm controller")
        return {job_id: self.jobs[job_id] for job_id in job_ids if job_id in self.jobs}


class Times:
    def __init__(self) -> None:
        self.mono = 0.0
        self.wall = T0 + timedelta(seconds=10)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def make_stats(
    pods: list[RunningPod], source: Source, proc: Path, times: Times | None = None
) -> PodStats:
    clock = times or Times()
    return PodStats(
        pods=lambda: list(pods),
        usage=source,
        processes=ProcessTable(proc),
        settings=UsageSettings(ttl_s=5.0),
        clock=lambda: clock.mono,
        now=lambda: clock.wall,
    )


def families(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


# --- the containers' processes ------------------------------------------------------------


def test_each_container_gets_the_processes_below_its_launcher(tmp_path: Path) -> None:
    folder = tmp_path / "pods" / "default" / "web"
    proc = FakeProc(tmp_path / "proc")
    proc.add(3010, 1, ["/bin/bash", "/pods/job.sh"], cpu_s=0.5, rss=4 << 20)
    proc.add(3011, 3010, launcher(folder, "main"), cpu_s=0.3, rss=20 << 20)
    proc.add(3012, 3011, ["/tools/apptainer", "exec"], cpu_s=1.0, rss=8 << 20, comm="a (b) c")
    proc.add(3013, 3012, ["python3", "-c", "loop"], cpu_s=40.0, reaped_s=2.0, rss=30 << 20)
    proc.add(3014, 3010, launcher(folder, "sidecar"), cpu_s=0.2, rss=20 << 20)
    proc.add(3015, 3014, ["sleep", "inf"], cpu_s=0.0, rss=1 << 20)
    # The launcher of another pod's container, a pid Slurm listed that this host gives
    # another process: not this pod's.
    proc.add(3016, 3010, launcher(tmp_path / "pods" / "default" / "other", "main"), cpu_s=9.0)
    processes = ProcessTable(tmp_path / "proc").read([3010, 3011, 3012, 3013, 3014, 3015, 3016, 9])
    assert set(processes) == {3010, 3011, 3012, 3013, 3014, 3015, 3016}, "pid 9 is not here"
    assert processes[3012].ppid == 3011, "a command name with spaces and parentheses"
    usage = container_usage(processes, folder / "containers")
    assert usage is not None
    assert set(usage) == {"main", "sidecar"}
    assert usage["main"].cpu_seconds == pytest.approx(43.0), "children and reaped, no launcher"
    assert usage["main"].memory_bytes == (8 << 20) + (30 << 20)
    assert usage["sidecar"].cpu_seconds == pytest.approx(0.0)
    assert usage["sidecar"].memory_bytes == 1 << 20
    assert container_usage({}, folder / "containers") is None, "no launcher: not visible here"


# --- sampling ------------------------------------------------------------------------------


def test_one_sstat_call_serves_every_scrape_within_the_ttl(tmp_path: Path) -> None:
    times = Times()
    source = Source({"41": job("41", 10.0, 64 << 20), "42": job("42", 3.0, 8 << 20)})
    pods = [
        running_pod(tmp_path / "web"),
        running_pod(tmp_path / "gpu", name="gpu", uid="uid-gpu", job_id="42", node="hpk-gpu"),
    ]
    stats = make_stats(pods, source, tmp_path / "proc", times)
    summary(stats, "hpk-batch")
    resource_metrics(stats, "hpk-gpu")
    times.advance(4.9)
    summary(stats, None)
    assert source.calls == [["41", "42"]], "every running job in one call, served 5 s"
    times.advance(0.2)
    summary(stats, "hpk-batch")
    assert len(source.calls) == 2


def test_summary_of_a_node_with_rates_from_two_samples(tmp_path: Path) -> None:
    times = Times()
    source = Source({"41": job("41", 10.0, 64 << 20), "42": job("42", 3.0, 8 << 20)})
    pods = [
        running_pod(tmp_path / "web"),
        running_pod(tmp_path / "gpu", name="gpu", uid="uid-gpu", job_id="42", node="hpk-gpu"),
    ]
    stats = make_stats(pods, source, tmp_path / "proc", times)
    first = summary(stats, "hpk-batch")
    assert first["node"]["nodeName"] == "hpk-batch"
    assert "usageNanoCores" not in first["node"]["cpu"], "no rate from one sample"
    assert first["node"]["cpu"]["usageCoreNanoSeconds"] == 10_000_000_000
    assert [pod["podRef"]["name"] for pod in first["pods"]] == ["web"], "only the node's pods"
    times.advance(10)
    source.jobs["41"] = job("41", 25.0, 96 << 20)
    answer = summary(stats, "hpk-batch")
    node = answer["node"]
    assert node["cpu"]["usageNanoCores"] == 1_500_000_000, "15 core-seconds in 10 s"
    assert node["memory"] == {
        "time": "2026-12-03T10:00:20Z",
        "workingSetBytes": 96 << 20,
        "usageBytes": 96 << 20,
        "rssBytes": 96 << 20,
    }
    (pod,) = answer["pods"]
    assert pod["podRef"] == {"name": "web", "namespace": "default", "uid": "uid-web"}
    assert pod["startTime"] == "2026-12-03T10:00:00Z"
    assert pod["cpu"]["usageNanoCores"] == 1_500_000_000
    assert pod["cpu"]["usageCoreNanoSeconds"] == 25_000_000_000
    (container,) = pod["containers"]
    assert container["name"] == "main"
    assert container["startTime"] == "2026-12-03T10:00:01Z"
    assert container["cpu"]["usageCoreNanoSeconds"] == 25_000_000_000, "its pod's: one container"
    assert container["memory"]["workingSetBytes"] == 96 << 20
    both = summary(stats, None)
    assert {p["podRef"]["name"] for p in both["pods"]} == {"web", "gpu"}
    assert both["node"]["memory"]["rssBytes"] == (96 << 20) + (8 << 20)


def test_a_node_counter_keeps_the_cpu_of_pods_that_ended(tmp_path: Path) -> None:
    times = Times()
    source = Source({"41": job("41", 10.0, 64 << 20), "43": job("43", 2.0, 1 << 20)})
    pods = [running_pod(tmp_path / "web")]
    stats = make_stats(pods, source, tmp_path / "proc", times)
    assert summary(stats, "hpk-batch")["node"]["cpu"]["usageCoreNanoSeconds"] == 10 * 10**9
    pods[:] = [running_pod(tmp_path / "late", name="late", uid="uid-late", job_id="43")]
    times.advance(6)
    node = summary(stats, "hpk-batch")["node"]
    assert node["cpu"]["usageCoreNanoSeconds"] == 12 * 10**9, "never goes down"
    assert node["memory"]["workingSetBytes"] == 1 << 20, "only what runs holds memory"


def test_containers_are_measured_by_their_processes_where_they_are_seen(tmp_path: Path) -> None:
    folder = tmp_path / "pods" / "default" / "web"
    proc = FakeProc(tmp_path / "proc")
    proc.add(3010, 1, ["/bin/bash", "/pods/job.sh"], cpu_s=0.5, rss=4 << 20)
    proc.add(3011, 3010, launcher(folder, "main"), cpu_s=0.3, rss=20 << 20)
    proc.add(3012, 3011, ["busy"], cpu_s=30.0, rss=10 << 20)
    proc.add(3014, 3010, launcher(folder, "wait"), cpu_s=0.2, rss=20 << 20)
    proc.add(3015, 3014, ["argoexec", "wait"], cpu_s=1.5, rss=12 << 20)
    source = Source({"41": job("41", 33.0, 80 << 20, pids=[3010, 3011, 3012, 3014, 3015])})
    stats = make_stats(
        [running_pod(folder, containers=("main", "wait"))], source, tmp_path / "proc"
    )
    text = resource_metrics(stats, "hpk-batch")
    found = families(text)
    containers = {
        labels["container"]: value for labels, value in found["container_cpu_usage_seconds_total"]
    }
    assert containers == {"main": pytest.approx(30.0), "wait": pytest.approx(1.5)}
    memory = {
        labels["container"]: value for labels, value in found["container_memory_working_set_bytes"]
    }
    assert memory == {"main": 10 << 20, "wait": 12 << 20}
    assert found["pod_cpu_usage_seconds_total"] == [
        ({"pod": "web", "namespace": "default"}, pytest.approx(32.5))
    ], "its job's processes as /proc shows them now (not sstat's 33), launchers included"
    assert found["pod_memory_working_set_bytes"] == [
        ({"pod": "web", "namespace": "default"}, (4 + 20 + 10 + 20 + 12) << 20)
    ]
    assert found["node_cpu_usage_seconds_total"] == [({}, pytest.approx(32.5))]
    assert found["scrape_error"] == [({}, 0.0)]
    started = dict(
        (labels["container"], value) for labels, value in found["container_start_time_seconds"]
    )
    assert started == {"main": (T0 + timedelta(seconds=1)).timestamp()} | {
        "wait": (T0 + timedelta(seconds=1)).timestamp()
    }
    stamp = str(int((T0 + timedelta(seconds=10)).timestamp() * 1000))
    samples = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    assert samples and all(line.endswith(f" {stamp}") for line in samples), "stamped in ms"
    assert re.search(
        r'^container_cpu_usage_seconds_total\{container="main",namespace="default",pod="web"\} ',
        text.decode(),
        re.MULTILINE,
    ), "the labels metrics-server reads"


def test_where_processes_are_not_seen_only_a_lone_container_gets_figures(tmp_path: Path) -> None:
    source = Source(
        {"41": job("41", 12.0, 32 << 20, pids=[77]), "42": job("42", 5.0, 16 << 20, pids=[78])}
    )
    pods = [
        running_pod(tmp_path / "web"),
        running_pod(
            tmp_path / "two", name="two", uid="uid-two", job_id="42", containers=("a", "b")
        ),
    ]
    found = families(resource_metrics(make_stats(pods, source, tmp_path / "proc"), "hpk-batch"))
    assert [labels for labels, _ in found["container_cpu_usage_seconds_total"]] == [
        {"container": "main", "pod": "web", "namespace": "default"}
    ], "two containers of one job cannot be told apart"
    assert {labels["pod"]: value for labels, value in found["pod_cpu_usage_seconds_total"]} == {
        "web": 12.0,
        "two": 5.0,
    }
    answer = summary(make_stats(pods, source, tmp_path / "proc"), "hpk-batch")
    two = next(pod for pod in answer["pods"] if pod["podRef"]["name"] == "two")
    assert [container.keys() for container in two["containers"]] == [
        {"name", "startTime"},
        {"name", "startTime"},
    ]
    assert two["memory"]["workingSetBytes"] == 16 << 20


def test_a_pod_without_figures_is_left_out_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    times = Times()
    source = Source({"41": job("41", 12.0, 32 << 20), "42": job("42", None, None)})
    pods = [
        running_pod(tmp_path / "web"),
        running_pod(tmp_path / "dark", name="dark", uid="uid-dark", job_id="42"),
        running_pod(tmp_path / "new", name="new", uid="uid-new", job_id="44"),
    ]
    stats = make_stats(pods, source, tmp_path / "proc", times)
    with caplog.at_level(logging.INFO, logger="kubelet_py.loops.stats"):
        found = families(resource_metrics(stats, "hpk-batch"))
        times.advance(6)
        resource_metrics(stats, "hpk-batch")
    assert {labels["pod"] for labels, _ in found["pod_cpu_usage_seconds_total"]} == {"web"}
    assert found["scrape_error"] == [({}, 1.0)]
    lines = [record.getMessage() for record in caplog.records]
    assert sum("default/dark: job 42" in line for line in lines) == 1, lines
    assert sum("default/new: job 44" in line and "no running step" in line for line in lines) == 1


def test_a_failed_sstat_call_answers_without_pods(tmp_path: Path) -> None:
    source = Source({"41": job("41", 12.0, 32 << 20)})
    source.down = True
    stats = make_stats([running_pod(tmp_path / "web")], source, tmp_path / "proc")
    found = families(resource_metrics(stats, "hpk-batch"))
    assert "pod_cpu_usage_seconds_total" not in found
    assert found["scrape_error"] == [({}, 1.0)]
    assert summary(stats, "hpk-batch")["pods"] == []


def test_the_routes_answer_json_and_prometheus_text(tmp_path: Path) -> None:
    stats = make_stats([running_pod(tmp_path / "web")], Source({"41": job("41", 1, 1)}), tmp_path)
    routes = stats_routes(stats)
    answer = routes["/stats/summary"]("hpk-batch", {})
    assert answer.content_type == "application/json"
    assert json.loads(answer.body)["pods"][0]["podRef"]["name"] == "web"
    text = routes["/metrics/resource"]("hpk-batch", {})
    assert text.content_type.startswith("text/plain; version=0.0.4")
    assert b"node_memory_working_set_bytes 1.0 " in text.body


def test_a_job_with_srun_steps_is_measured_by_slurm_alone(tmp_path: Path) -> None:
    folder = tmp_path / "pods" / "default" / "mpi"
    proc = FakeProc(tmp_path / "proc")
    proc.add(3011, 1, launcher(folder, "main"), cpu_s=0.3, rss=20 << 20)
    proc.add(3012, 3011, ["srun", "apptainer"], cpu_s=0.1, rss=6 << 20)
    proc.add(5000, 1, ["someone", "else"], cpu_s=500.0, rss=1 << 30)  # a task's pid elsewhere
    steps = (
        StepUsage("41.batch", cpu_seconds=1.0, memory_bytes=30 << 20, pids=(3011, 3012)),
        StepUsage("41.0", cpu_seconds=80.0, memory_bytes=200 << 20, pids=(5000,)),
    )
    source = Source({"41": JobUsage(job_id="41", steps=steps)})
    stats = make_stats([running_pod(folder, name="mpi")], source, tmp_path / "proc")
    found = families(resource_metrics(stats, "hpk-batch"))
    assert found["pod_cpu_usage_seconds_total"] == [
        ({"pod": "mpi", "namespace": "default"}, 81.0)
    ], "Slurm's figures for every step; no pid of another node is read here"
    assert found["container_cpu_usage_seconds_total"] == [
        ({"container": "main", "pod": "mpi", "namespace": "default"}, 81.0)
    ], "its one container: the srun tasks, not the srun client below its launcher"
