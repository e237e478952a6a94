"""The kubelet's Slurm adapter and job watcher against the real test bed.

Real jobs end in each of the ways a pod's job can end (exit 0, exit 3, over memory, cancelled,
time limit), wait on a hold, or are refused; the watcher follows them with one squeue call per
poll and must report what sacct reports. A counting runner around the real SubprocessRunner
records every Slurm command the adapter runs. Each test cancels its own jobs.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from hpk.testbed.bed import Testbed, cgroups_usable
from kubelet_py.adapters.slurm import (
    CommandResult,
    SlurmClient,
    SubmissionFailed,
    SubprocessRunner,
)
from kubelet_py.loops.watcher import LOST, JobView, JobWatcher, WatcherSettings
from kubelet_py.pod.status import pod_status
from tests.e2e.slurm import wait_finished

pytestmark = pytest.mark.e2e

SPEC = {"containers": [{"name": "main", "image": "docker://busybox"}]}
NEVER_SUBMITTED = "9999991"
"""A job ID far above anything the test bed hands out."""


class CountingRunner:
    """The real runner, recording each command it runs."""

    def __init__(self) -> None:
        self._inner = SubprocessRunner()
        self._lock = threading.Lock()
        self.calls: list[list[str]] = []

    def run(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        with self._lock:
            self.calls.append(list(argv))
        return self._inner.run(argv, timeout=timeout, env=env)

    def commands(self, name: str) -> list[list[str]]:
        with self._lock:
            return [argv for argv in self.calls if argv[0] == name]

    def asked(self, name: str) -> list[list[str]]:
        return [argv[argv.index("-j") + 1].split(",") for argv in self.commands(name)]


class Recorder:
    """A watcher with a change log, driven poll by poll."""

    def __init__(self, client: SlurmClient, *, grace: float = 30.0) -> None:
        self.changes: list[tuple[str, JobView]] = []
        self.watcher = JobWatcher(
            client,
            lambda key, view: self.changes.append((key, view)),
            settings=WatcherSettings(grace=grace),
        )

    def poll_until(self, done: Callable[[], bool], *, timeout: float, every: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.watcher.poll_once()
            if done():
                return
            assert time.monotonic() < deadline, f"gave up; changes so far: {self.changes}"
            time.sleep(every)

    def final(self, *job_ids: str) -> Callable[[], bool]:
        def check() -> bool:
            views = [self.watcher.view(job_id) for job_id in job_ids]
            return all(view is not None and view.final for view in views)

        return check

    def state(self, job_id: str) -> str | None:
        view = self.watcher.view(job_id)
        return view.state if view else None


@pytest.fixture
def runner(testbed: Testbed) -> CountingRunner:
    return CountingRunner()


@pytest.fixture
def client(runner: CountingRunner) -> SlurmClient:
    return SlurmClient(runner)


@pytest.fixture
def submitted() -> Iterator[list[str]]:
    """Job IDs a test submitted; cancelled at the end whatever happened."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=60)


def script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return path


def output(folder: Path) -> list[str]:
    return [f"--output={folder}/%j.out", f"--chdir={folder}"]


def squeue_lists(job_id: str) -> bool:
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0 and job_id in result.stdout.split()


@pytest.mark.timeout(280)
def test_the_watcher_reports_how_each_job_ended_as_sacct_does(
    client: SlurmClient, runner: CountingRunner, job_dir: Path, submitted: list[str]
) -> None:
    flags = output(job_dir)
    # The time-limit job goes first: Slurm needs 60 to 90 s to end it, while the rest run.
    timeout_job = client.submit(script(job_dir, "sleep.sh", "sleep 600"), [*flags, "--time=1"])
    submitted.append(timeout_job)
    ok = client.submit(script(job_dir, "ok.sh", "echo fine"), flags)
    three = client.submit(script(job_dir, "three.sh", "exit 3"), flags)
    hog = "python3 -c \"data = b'x' * (300 * 1024 * 1024); print(len(data))\""
    oom = client.submit(script(job_dir, "oom.sh", hog), [*flags, "--mem=64M"])
    victim = client.submit(job_dir / "sleep.sh", flags)
    submitted.extend([ok, three, oom, victim])

    recorder = Recorder(client)
    for job_id in (timeout_job, ok, three, oom, victim):
        recorder.watcher.register(job_id, f"e2e/pod-{job_id}")
    recorder.poll_until(lambda: recorder.state(victim) == "RUNNING", timeout=60)
    subprocess.run(["scancel", victim], check=True, timeout=60)
    recorder.poll_until(recorder.final(ok, three, oom, victim, timeout_job), timeout=200)

    expected_oom = "OUT_OF_MEMORY" if cgroups_usable() else "FAILED"
    views: dict[str, JobView] = {}
    for job_id in submitted:
        view = recorder.watcher.view(job_id)
        assert view is not None
        views[job_id] = view
        accounting = wait_finished(job_id)
        assert view.state == accounting.state, (job_id, view, accounting)
        assert view.batch_host in ("n1", "n2", "n3")
    assert [views[job_id].state for job_id in (ok, three, oom, victim, timeout_job)] == [
        "COMPLETED",
        "FAILED",
        expected_oom,
        "CANCELLED",
        "TIMEOUT",
    ]
    assert (views[three].exit_code, views[three].exit_signal) == (3, 0)
    assert wait_finished(three).exit_code == "3:0"
    if expected_oom == "OUT_OF_MEMORY":
        assert (views[oom].exit_code, views[oom].exit_signal) == (0, 125)
        assert wait_finished(oom).exit_code == "0:125"

    # Every poll asked squeue once about all live jobs; all of them were still listed there,
    # so sacct was never needed.
    counters = recorder.watcher.counters
    assert counters.squeue_calls == counters.polls == len(runner.commands("squeue"))
    assert runner.commands("sacct") == []
    assert counters.failed_calls == 0

    # What a user would see of each pod: the phase, and the reason when there is one.
    shown = {}
    for job_id, view in views.items():
        status = pod_status(SPEC, view, {})
        shown[job_id] = (status["phase"], status.get("reason"))
    assert shown[ok] == ("Succeeded", None)
    assert shown[three] == ("Failed", None)
    assert shown[victim] == ("Failed", "Cancelled")
    assert shown[timeout_job] == ("Failed", "DeadlineExceeded")
    if expected_oom == "OUT_OF_MEMORY":
        assert shown[oom] == ("Failed", "OOMKilled")


@pytest.mark.timeout(120)
def test_a_held_job_is_pending_with_slurms_reason_until_released(
    client: SlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    held = client.submit(script(job_dir, "sleep.sh", "sleep 600"), [*output(job_dir), "--hold"])
    submitted.append(held)
    recorder = Recorder(client)
    recorder.watcher.register(held, "e2e/held")
    recorder.poll_until(lambda: recorder.state(held) == "PENDING", timeout=30)
    view = recorder.watcher.view(held)
    assert view is not None and view.reason == "JobHeldUser" and not view.final
    status = pod_status(SPEC, view, {})
    assert status["phase"] == "Pending"
    scheduled = next(c for c in status["conditions"] if c["type"] == "PodScheduled")
    assert f"Slurm job {held} is pending (JobHeldUser)" in scheduled["message"]

    subprocess.run(["scontrol", "release", held], check=True, timeout=60)
    recorder.poll_until(lambda: recorder.state(held) == "RUNNING", timeout=60)
    running = recorder.watcher.view(held)
    assert running is not None and running.start_time is not None
    addresses = {
        node.name: node.address for partition in client.partitions() for node in partition.nodes
    }
    status = pod_status(SPEC, running, {}, node_addresses=addresses)
    assert status["phase"] == "Running"
    assert status["hostIP"] == "127.0.0.1"
    # Released, the job may wait a moment with another reason before it runs; each of those
    # is a change the pod's status shows, and nothing is reported twice.
    seen = [(view.state, view.reason) for _, view in recorder.changes]
    assert seen[0] == ("PENDING", "JobHeldUser")
    assert seen[-1] == ("RUNNING", None)
    assert all(before != after for before, after in itertools.pairwise(seen)), seen


@pytest.mark.timeout(180)
def test_one_squeue_per_poll_for_many_jobs(
    client: SlurmClient, runner: CountingRunner, job_dir: Path, submitted: list[str]
) -> None:
    sleeper = script(job_dir, "sleep.sh", "sleep 600")
    for _ in range(60):
        submitted.append(client.submit(sleeper, [*output(job_dir), "--hold"]))
    recorder = Recorder(client)
    for job_id in submitted:
        recorder.watcher.register(job_id, f"e2e/many-{job_id}")
    for _ in range(5):
        recorder.watcher.poll_once()
    assert len(runner.commands("squeue")) == 5
    assert all(sorted(asked) == sorted(submitted) for asked in runner.asked("squeue"))
    assert runner.commands("sacct") == []
    assert {recorder.state(job_id) for job_id in submitted} == {"PENDING"}
    assert len(recorder.changes) == len(submitted), "each job reported once"

    subprocess.run(["scancel", *submitted], check=True, timeout=60)
    polls_before = recorder.watcher.counters.polls
    recorder.poll_until(recorder.final(*submitted), timeout=60)
    assert {recorder.state(job_id) for job_id in submitted} == {"CANCELLED"}
    polls = recorder.watcher.counters.polls - polls_before
    assert len(runner.commands("squeue")) == 5 + polls


def _a_job_squeue_has_forgotten(testbed: Testbed, job_dir: Path) -> str:
    """A finished job squeue no longer lists but sacct knows: from the bed's history, or one
    submitted now and waited for until Slurm's MinJobAge has passed."""
    result = subprocess.run(
        # No --state filter: with one, sacct 22.05 prints nothing for this window.
        ["sacct", "-X", "-n", "-P", "-S", "now-2days", "-o", "JobID,State"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in reversed(result.stdout.splitlines()):
        job_id, _, state = line.partition("|")
        if job_id.isdigit() and state in ("COMPLETED", "FAILED") and not squeue_lists(job_id):
            return job_id
    job_id = SlurmClient(SubprocessRunner()).submit(script(job_dir, "ok.sh", "true"), [])
    deadline = time.monotonic() + testbed.settings.min_job_age_s + 120
    while squeue_lists(job_id):
        assert time.monotonic() < deadline, f"squeue still lists job {job_id}"
        time.sleep(5)
    return job_id


@pytest.mark.timeout(600)
def test_sacct_is_asked_only_about_jobs_squeue_no_longer_lists(
    testbed: Testbed,
    client: SlurmClient,
    runner: CountingRunner,
    job_dir: Path,
    submitted: list[str],
) -> None:
    forgotten = _a_job_squeue_has_forgotten(testbed, job_dir)
    accounting = wait_finished(forgotten)
    held = client.submit(script(job_dir, "sleep.sh", "sleep 600"), [*output(job_dir), "--hold"])
    submitted.append(held)

    recorder = Recorder(client, grace=3.0)
    for job_id in (forgotten, held, NEVER_SUBMITTED):
        recorder.watcher.register(job_id, f"e2e/{job_id}")
    recorder.watcher.poll_once()

    assert runner.asked("squeue") == [[forgotten, held, NEVER_SUBMITTED]]
    assert runner.asked("sacct") == [[forgotten, NEVER_SUBMITTED]]
    old = recorder.watcher.view(forgotten)
    assert old is not None and old.source == "sacct" and old.final
    assert old.state == accounting.state
    assert f"{old.exit_code}:{old.exit_signal}" == accounting.exit_code
    assert recorder.state(held) == "PENDING"
    assert recorder.watcher.view(NEVER_SUBMITTED) is None, "within the grace window"

    recorder.poll_until(lambda: recorder.state(NEVER_SUBMITTED) == LOST, timeout=30)
    # The final job from sacct was not asked about again.
    assert all(forgotten not in asked for asked in runner.asked("squeue")[1:])
    assert all(forgotten not in asked for asked in runner.asked("sacct")[1:])
    assert pod_status(SPEC, recorder.watcher.view(NEVER_SUBMITTED), {})["reason"] == (
        "SlurmJobLost"
    )


@pytest.mark.timeout(120)
def test_cancel_is_idempotent_and_signals_reach_the_batch_script(
    client: SlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    body = "trap 'echo got TERM; exit 143' TERM\necho started\nsleep 600 & wait"
    job_id = client.submit(script(job_dir, "trap.sh", body), output(job_dir))
    submitted.append(job_id)
    recorder = Recorder(client)
    recorder.watcher.register(job_id, "e2e/cancel")
    recorder.poll_until(lambda: recorder.state(job_id) == "RUNNING", timeout=60)
    log = job_dir / f"{job_id}.out"
    deadline = time.monotonic() + 30
    while "started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    client.cancel(job_id, signal="TERM")
    recorder.poll_until(recorder.final(job_id), timeout=60)
    assert "got TERM" in log.read_text()
    ended = recorder.watcher.view(job_id)
    assert ended is not None
    # The script's trap ended the job with 143: Slurm calls that FAILED, not CANCELLED.
    assert (ended.state, ended.exit_code) == ("FAILED", 143)
    client.cancel(job_id, signal="TERM")
    client.cancel(job_id)
    client.cancel(NEVER_SUBMITTED)
    client.cancel(NEVER_SUBMITTED, signal="KILL")


@pytest.mark.timeout(60)
def test_a_request_slurm_cannot_satisfy_is_refused_with_its_message(
    client: SlurmClient, job_dir: Path
) -> None:
    with pytest.raises(SubmissionFailed, match="Memory specification can not be satisfied"):
        client.submit(script(job_dir, "big.sh", "true"), [*output(job_dir), "--mem=100G"])
    with pytest.raises(SubmissionFailed, match=r"(?i)invalid partition"):
        client.submit(job_dir / "big.sh", ["-p", "no-such-partition"])


@pytest.mark.timeout(60)
def test_partitions_are_the_beds(client: SlurmClient, testbed: Testbed) -> None:
    partitions = {partition.name: partition for partition in client.partitions()}
    assert set(partitions) == {"batch", "gpu"}
    assert partitions["batch"].default and not partitions["gpu"].default
    assert [node.name for node in partitions["batch"].nodes] == ["n1", "n2", "n3"]
    assert [node.name for node in partitions["gpu"].nodes] == list(testbed.settings.gpu_nodes)
    assert partitions["gpu"].gpus == 2
    assert {node.cpus for p in partitions.values() for node in p.nodes} == {16}
    assert {node.memory_mb for p in partitions.values() for node in p.nodes} == {32768}


@pytest.mark.timeout(60)
def test_jobs_are_found_again_by_their_comment(
    client: SlurmClient, job_dir: Path, submitted: list[str]
) -> None:
    uid = uuid.uuid4()
    job_id = client.submit(
        script(job_dir, "sleep.sh", "sleep 600"),
        [*output(job_dir), "--hold", f"--comment=hpk-uid={uid}"],
    )
    submitted.append(job_id)
    found = client.listed_jobs(f"hpk-uid={uid}")
    assert list(found) == [job_id]
    assert found[job_id].comment == f"hpk-uid={uid}"
    assert found[job_id].state == "PENDING"
    assert found[job_id].name == "sleep.sh"
    assert Path(found[job_id].work_dir) == job_dir
    assert client.listed_jobs(f"hpk-uid={uuid.uuid4()}") == {}
