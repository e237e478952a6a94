"""The five measurements, each on pods of a namespace of its own, cleaned up afterwards.

Every figure is taken from outside the kubelet: the benchmark's own watch on the pods (times
on receipt), the files the kubelet and the job write into each pod folder (nanosecond file
times and markers), the call log of the Slurm wrappers, slurmctld's and slurmdbd's RPC
counters, and /proc for the kubelet's footprint.
"""

from __future__ import annotations

import math
import random
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import footprint, slurmcalls
from bench.pods import (
    Created,
    PodFolder,
    PodRecorder,
    Seen,
    birth_times,
    create_pods,
    delete_pods,
    pod_manifest,
)
from bench.stack import Stack
from bench.stats import per_minute, rate, summary
from kubelet_py.adapters.apiserver import pod_path

JSON = dict[str, Any]
Progress = Callable[[str], None]

HOLD = "--hold"
"""Flags of pods that must stay pending: a held job costs Slurm and the kubelet what a
queued one does, and the 2-core host nothing."""


@dataclass(frozen=True)
class Sizes:
    """How many pods each measurement uses."""

    throughput: int = 500
    lag: int = 200
    load_small: int = 100
    load_large: int = 1000
    load_running: int = 50
    """Pods of the load measurement that run (`sleep`); the others are held pending."""
    start: int = 50
    lag_interval_s: float = 0.25
    """Lag pods are created one every this many seconds, so the host runs about 15 at once."""
    start_interval_s: float = 0.5
    """Start-breakdown pods are created one at a time, this far apart."""
    window_s: float = 60.0
    """How long the Slurm calls are counted at each load size."""

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            throughput=30,
            lag=20,
            load_small=20,
            load_large=100,
            load_running=5,
            start=10,
            lag_interval_s=0.25,
            start_interval_s=0.5,
            window_s=20.0,
        )


class Bench:
    """Runs the measurements on a started stack."""

    def __init__(self, stack: Stack, sizes: Sizes, progress: Progress, *, seed: int = 6) -> None:
        self.stack = stack
        self.sizes = sizes
        self.progress = progress
        self.random = random.Random(seed)  # noqa: S311 - a repeatable sample, no secret
        self.api = stack.require_api()

    # -- 1. submission throughput -------------------------------------------------------

    def throughput(self) -> JSON:
        n = self.sizes.throughput
        namespace = "bench-throughput"
        self.progress(f"throughput: {n} held pods created at once")
        self.stack.create_namespace(namespace)
        recorder = PodRecorder(self.api, namespace)
        recorder.start()
        mark = self.stack.calls.mark()
        manifests = [pod_manifest(f"tp-{i:04d}", ["true"], flags=HOLD) for i in range(n)]
        created = create_pods(self.api, namespace, manifests, threads=8)
        seen = recorder.wait(
            "every pod with a job ID",
            lambda s: sum(1 for x in s.values() if x.job_id_at) >= n,
            timeout=120 + n,
        )
        recorder.stop()
        folders = self._folders(namespace, created)
        submitted = [folders[c.name].mtime("job-id") for c in created]
        claimed = [folders[c.name].mtime("uid") for c in created]
        if None in submitted or None in claimed:
            raise RuntimeError("a pod has a job ID annotation but no job-id file")
        first_sent = min(c.sent for c in created)
        last_submitted = max(t for t in submitted if t is not None)
        first_claimed = min(t for t in claimed if t is not None)
        last_seen = max(x.job_id_at for x in seen.values() if x.job_id_at is not None)
        sbatch_calls = [
            call
            for call in self.stack.calls.since(mark)
            if call.command == "sbatch" and f"--job-name=hpk/{namespace}/" in " ".join(call.argv)
        ]
        self._clean(namespace, folders.values())

        self.progress(f"throughput: a plain loop of sbatch over the same {n} scripts")
        plain = self._sbatch_loop(sbatch_calls, wrapped=False)
        wrapped = self._sbatch_loop(sbatch_calls, wrapped=True)
        hpk_rate = rate(n, last_submitted - first_sent)
        return {
            "pods": n,
            "jobs": "held (--hold), so that no job runs while submissions are timed",
            "hpk": {
                "create_span_s": round(max(c.returned for c in created) - first_sent, 3),
                "created_to_last_sbatch_s": round(last_submitted - first_sent, 3),
                "rate_per_s": round(hpk_rate, 2),
                "created_to_last_annotation_s": round(last_seen - first_sent, 3),
                "annotation_rate_per_s": round(rate(n, last_seen - first_sent), 2),
                "kubelet_span_s": round(last_submitted - first_claimed, 3),
                "kubelet_rate_per_s": round(rate(n, last_submitted - first_claimed), 2),
            },
            "plain_loop": plain,
            "plain_loop_through_wrappers": wrapped,
            "ratio": round(hpk_rate / plain["rate_per_s"], 3),
            "target_ratio": 0.9,
            "met": hpk_rate / plain["rate_per_s"] >= 0.9,
            "notes": (
                "hpk: from the first create request to the last job-id file (written when "
                "sbatch returned); plain loop: one bash script running sbatch with the "
                "kubelet's own argv for each pod, as the wrappers logged it"
            ),
        }

    def _sbatch_loop(self, calls: Sequence[slurmcalls.Call], *, wrapped: bool) -> JSON:
        sbatch = self.stack.wrappers / "sbatch" if wrapped else "sbatch"
        script = self.stack.settings.root / ("loop-wrapped.sh" if wrapped else "loop.sh")
        lines = ["#!/bin/bash"]
        lines += [shlex.join([str(sbatch), *call.argv]) for call in calls]
        script.write_text("\n".join(lines) + "\n")
        env = self.stack.slurm_env()
        began = time.monotonic()
        done = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, env=env, check=False
        )
        elapsed = time.monotonic() - began
        job_ids = [line.split(";")[0] for line in done.stdout.split() if line.strip()]
        if job_ids:
            subprocess.run(["scancel", *job_ids], env=env, check=False, capture_output=True)
        if len(job_ids) != len(calls):
            raise RuntimeError(
                f"the sbatch loop made {len(job_ids)} of {len(calls)} jobs: {done.stderr[-2000:]}"
            )
        return {
            "calls": len(calls),
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(rate(len(calls), elapsed), 2),
            "per_call_ms": round(1000 * elapsed / max(1, len(calls)), 2),
        }

    # -- 2. status lag ------------------------------------------------------------------

    def lag(self) -> JSON:
        n = self.sizes.lag
        namespace = "bench-lag"
        interval = self.sizes.lag_interval_s
        self.progress(f"lag: {n} pods sleeping 1-5 s, one created every {interval:g} s")
        self.stack.create_namespace(namespace)
        recorder = PodRecorder(self.api, namespace)
        recorder.start()
        sleeps = [round(self.random.uniform(1.0, 5.0), 2) for _ in range(n)]
        manifests = [pod_manifest(f"lag-{i:04d}", ["sleep", f"{s}"]) for i, s in enumerate(sleeps)]
        created = create_pods(self.api, namespace, manifests, interval_s=interval)
        seen = recorder.wait(
            "every container terminated",
            lambda s: sum(1 for x in s.values() if x.terminated_at) >= n,
            timeout=120 + 10 * n * max(interval, 0.1),
        )
        recorder.stop()
        folders = self._folders(namespace, created)
        lags: list[float] = []
        failed = 0
        for c in created:
            finished = folders[c.name].finished()
            terminated = seen[c.name].terminated_at
            if finished is None or terminated is None:
                raise RuntimeError(f"pod {c.name}: no exit marker or no terminated status")
            failed += finished[0] != 0
            lags.append(terminated - finished[1])
        self._clean(namespace, folders.values())
        stats = summary(lags)
        return {
            "pods": n,
            "source": "the container's exit marker (ns) to the watch event that first shows "
            "it terminated, stamped on receipt by the benchmark",
            "create_interval_s": interval,
            "failed_containers": failed,
            "lag_s": stats,
            "target": {"p50_s": 1.0, "p99_s": 2.0},
            "met": float(stats["p50"]) <= 1.0 and float(stats["p99"]) <= 2.0,
        }

    # -- 3 and 4. Slurm load and the kubelet's footprint --------------------------------

    def load(self) -> tuple[JSON, JSON]:
        s = self.sizes
        namespace = "bench-load"
        self.stack.create_namespace(namespace)
        pid = self.stack.kubelet_pid()
        names: list[str] = []
        steps: list[JSON] = []
        footprints: list[JSON] = []
        for size in (s.load_small, s.load_large):
            add = size - len(names)
            running = max(0, min(s.load_running, size) - len(names))
            self.progress(f"load: {size} live pods ({s.load_running} running, the rest held)")
            manifests = [
                pod_manifest(f"load-{len(names) + i:04d}", ["sleep", "3600"])
                if i < running
                else pod_manifest(f"load-{len(names) + i:04d}", ["true"], flags=HOLD)
                for i in range(add)
            ]
            names += [str(m["metadata"]["name"]) for m in manifests]
            create_pods(self.api, namespace, manifests, threads=8)
            self._settle(namespace, size=size, running=min(s.load_running, size))
            step, footprint_at = self._window(namespace, pid, size=size)
            steps.append(step)
            footprints.append(footprint_at)
        folders = [PodFolder(self.stack.pods_dir / namespace / name) for name in names]
        self._clean(namespace, folders)
        small, large = steps
        # The windows are equally long: the same count means at most one call apart (a
        # once-a-minute call may fall into one window and not the other).
        same = all(
            abs(large["commands"][c] - small["commands"][c]) <= 1
            for c in ("squeue", "sacct", "scontrol", "sinfo")
        )
        load = {
            "sizes": steps,
            "same_count_at_both_sizes": same,
            "targets": {
                "same_count_at_both_sizes": True,
                "squeue_per_minute_max": 60,
                "sacct": "only for jobs that left the queue",
            },
            # At most one squeue a second: a window of W seconds holds up to W + 1 ticks of a
            # once-a-second timer, counting both of its ends.
            "met": same
            and all(
                step["commands"]["squeue"] <= math.floor(step["window_s"]) + 1 for step in steps
            )
            and all(step["sacct_job_ids_in_queue"] == 0 for step in steps),
        }
        last = footprints[-1]
        footprint_result = {
            **last,
            "by_size": footprints,
            "target": {"rss_mb": 250, "cpu_share": 0.10},
            "met": last["rss_mb"] <= 250 and last["cpu_share"] <= 0.10,
        }
        return load, footprint_result

    def _settle(self, namespace: str, *, size: int, running: int) -> None:
        """Wait until every pod has a status from the kubelet and the running ones run."""
        deadline = time.monotonic() + 120 + size
        while True:
            pods = self.api.get(pod_path(namespace)).get("items") or []
            reported = [p for p in pods if (p.get("status") or {}).get("containerStatuses")]
            runs = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if len(pods) >= size and len(reported) >= size and len(runs) >= running:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{namespace}: {len(reported)} of {size} pods reported, "
                    f"{len(runs)} of {running} running"
                )
            time.sleep(2.0)
        waited = footprint.wait_idle(self.stack.kubelet_pid(), timeout_s=30.0)
        self.progress(f"load: {size} pods settled (kubelet quiet after {waited:.0f} s)")

    def _window(self, namespace: str, pid: int, *, size: int) -> tuple[JSON, JSON]:
        env = self.stack.slurm_env()
        window = self.sizes.window_s
        mark = self.stack.calls.mark()
        ctld_before = slurmcalls.read_sdiag(env)
        dbd_before = slurmcalls.read_dbd_stats(env)
        first = footprint.sample(pid)
        rss_peak = first.rss_kb
        deadline = first.at + window
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            rss_peak = max(rss_peak, footprint.sample(pid).rss_kb)
        last = footprint.sample(pid)
        end = self.stack.calls.mark()
        ctld = slurmcalls.delta(ctld_before, slurmcalls.read_sdiag(env))
        dbd = slurmcalls.delta(dbd_before, slurmcalls.read_dbd_stats(env))
        seconds = last.at - first.at
        calls = self.stack.calls.since(mark, end)
        counted = slurmcalls.count_calls(calls)
        squeue_ids = [len(c.job_ids()) for c in calls if c.command == "squeue"]
        queued = self._queued_ids(env)
        sacct_ids = {i for c in calls if c.command == "sacct" for i in c.job_ids()}
        ctld.pop("REQUEST_STATS_INFO", None)  # the benchmark's own sdiag
        dbd.pop("DBD_GET_STATS", None)
        step = {
            "live_pods": size,
            "running_pods": min(self.sizes.load_running, size),
            "window_s": round(seconds, 1),
            "commands": counted,
            "commands_per_minute": {
                name: round(per_minute(count, seconds), 1) for name, count in counted.items()
            },
            "largest_squeue_job_list": max(squeue_ids, default=0),
            "sacct_job_ids": len(sacct_ids),
            "sacct_job_ids_in_queue": len(sacct_ids & queued),
            "slurmctld_rpcs_per_minute": {
                name: round(per_minute(count, seconds), 1) for name, count in ctld.items()
            },
            "slurmctld_rpcs_by_command_per_minute": {
                name: round(per_minute(count, seconds), 1)
                for name, count in slurmcalls.by_command(ctld).items()
            },
            "sacct_queries_seen_by_slurmdbd_per_minute": round(
                per_minute(dbd.get(slurmcalls.SACCT_QUERY, 0), seconds), 1
            ),
            "slurmdbd_rpcs_per_minute": {
                name: round(per_minute(count, seconds), 1) for name, count in dbd.items()
            },
        }
        usage = {
            "live_pods": size,
            "rss_mb": round(last.rss_kb / 1024, 1),
            "rss_peak_in_window_mb": round(rss_peak / 1024, 1),
            "hwm_mb": round(last.hwm_kb / 1024, 1),
            "threads": last.threads,
            "cpu_share": round(footprint.cpu_share(first, last), 4),
            "cpu_share_with_slurm_commands": round(
                footprint.cpu_share(first, last, children=True), 4
            ),
            "window_s": round(seconds, 1),
        }
        self.progress(
            f"load: {size} pods: {step['commands_per_minute']} per minute; kubelet "
            f"{usage['rss_mb']} MB, {100 * usage['cpu_share']:.1f}% of a core"
        )
        return step, usage

    def _queued_ids(self, env: dict[str, str]) -> set[str]:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, check=False
        ).stdout
        return set(out.split())

    # -- 5. pod start breakdown ---------------------------------------------------------

    def start(self) -> JSON:
        n = self.sizes.start
        namespace = "bench-start"
        interval = self.sizes.start_interval_s
        self.progress(f"start: {n} pods, one every {interval:g} s")
        self.stack.create_namespace(namespace)
        recorder = PodRecorder(self.api, namespace)
        recorder.start()
        manifests = [pod_manifest(f"st-{i:04d}", ["sleep", "3"]) for i in range(n)]
        created = create_pods(self.api, namespace, manifests, interval_s=interval)
        seen = recorder.wait(
            "every pod Running and done",
            lambda s: sum(1 for x in s.values() if x.running_at and x.terminated_at) >= n,
            timeout=120 + 10 * n * max(interval, 0.1),
        )
        recorder.stop()
        folders = self._folders(namespace, created)
        births = birth_times(
            [f.path / name for f in folders.values() for name in ("uid", "slurm.out")]
        )
        parts: dict[str, list[float]] = {
            "api": [],
            "kubelet_pickup": [],
            "kubelet_submit": [],
            "kubelet": [],
            "slurm": [],
            "container": [],
            "status": [],
            "total": [],
        }
        for c in created:
            folder = folders[c.name]
            times = _start_times(c, folder, births, seen[c.name])
            parts["api"].append(c.returned - c.sent)
            parts["kubelet_pickup"].append(times["claimed"] - c.returned)
            parts["kubelet_submit"].append(times["submitted"] - times["claimed"])
            parts["kubelet"].append(times["submitted"] - c.returned)
            parts["slurm"].append(times["job_started"] - times["submitted"])
            parts["container"].append(times["container_started"] - times["job_started"])
            parts["status"].append(times["running_seen"] - times["container_started"])
            parts["total"].append(times["running_seen"] - c.sent)
        self._clean(namespace, folders.values())
        stats = {name: summary(values) for name, values in parts.items()}
        return {
            "pods": n,
            "create_interval_s": interval,
            "parts_s": stats,
            "definitions": {
                "api": "create request sent -> API server answered",
                "kubelet_pickup": "answered -> the pod folder's uid file (kubelet took the pod:"
                " watch, binding, work queue)",
                "kubelet_submit": "uid file -> job-id file (render, files, sbatch returned)",
                "kubelet": "kubelet_pickup + kubelet_submit",
                "slurm": "job-id file -> slurm.out created (slurmd started the batch script)",
                "container": "slurm.out created -> the container's started marker",
                "status": "started marker -> the benchmark's watch shows the pod Running",
                "total": "create request sent -> Running seen",
            },
            "target": {"kubelet_p50_s": 0.1},
            "met": float(stats["kubelet"]["p50"]) <= 0.1,
        }

    # -- helpers ------------------------------------------------------------------------

    def _folders(self, namespace: str, created: Sequence[Created]) -> dict[str, PodFolder]:
        return {c.name: PodFolder(self.stack.pods_dir / namespace / c.name) for c in created}

    def _clean(self, namespace: str, folders: Any) -> None:
        """Delete the pods, cancel what is left of their jobs, and let the kubelet calm down."""
        job_ids = [j for j in (f.job_id() for f in folders) if j]
        delete_pods(self.api, namespace)
        if job_ids:
            subprocess.run(
                ["scancel", *job_ids], env=self.stack.slurm_env(), check=False, capture_output=True
            )
        footprint.wait_idle(self.stack.kubelet_pid(), timeout_s=60.0)


def _start_times(
    created: Created, folder: PodFolder, births: dict[Any, float], seen: Seen
) -> dict[str, float]:
    submitted = folder.mtime("job-id")
    claimed = births.get(folder.path / "uid") or folder.mtime("uid")
    job_started = births.get(folder.path / "slurm.out")
    container_started = folder.started()
    running_seen = seen.running_at
    found = {
        "claimed": claimed,
        "submitted": submitted,
        "job_started": job_started,
        "container_started": container_started,
        "running_seen": running_seen,
    }
    missing = [name for name, value in found.items() if value is None]
    if missing:
        raise RuntimeError(f"pod {created.name}: no {', '.join(missing)}")
    return {name: float(value) for name, value in found.items() if value is not None}
