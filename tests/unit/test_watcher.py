"""The shared job watcher, driven poll by poll with a fake clock against a fake Slurm.

The fake Slurm is a CommandRunner that answers squeue and sacct in their real text formats
(the shapes printed by Slurm 22.05 on the test bed), so the watcher is tested through the real
SlurmClient and the calls counted are the commands Slurm would see.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from kubelet_py.adapters.slurm import CommandResult, SlurmClient, first_node
from kubelet_py.loops.watcher import LOST, JobView, JobWatcher, WatcherSettings


@dataclass
class FakeJob:
    state: str
    reason: str = "None"
    nodes: str = ""
    start: str = "N/A"
    end: str = "N/A"
    wait_status: int = 0
    exit_code: str = "0:0"
    restarts: int = 0


class FakeSlurm:
    """squeue and sacct over two tables of jobs, with Slurm's quirks about unknown IDs."""

    def __init__(self) -> None:
        self.queued: dict[str, FakeJob] = {}
        self.accounted: dict[str, FakeJob] = {}
        self.calls: list[list[str]] = []
        self.fail_squeue = False
        self.fail_sacct = False
        self.sacct_disabled = False

    def run(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        self.calls.append(list(argv))
        ids = argv[argv.index("-j") + 1].split(",")
        if argv[0] == "squeue":
            if self.fail_squeue:
                return CommandResult(
                    1, "", "slurm_load_jobs error: Unable to contact slurm controller\n"
                )
            known = [job_id for job_id in ids if job_id in self.queued]
            if len(ids) == 1 and not known:
                return CommandResult(1, "", "slurm_load_jobs error: Invalid job id specified\n")
            return CommandResult(0, "".join(self._squeue_line(i) for i in known), "")
        if argv[0] == "sacct":
            if self.sacct_disabled:
                return CommandResult(1, "", "Slurm accounting storage is disabled\n")
            if self.fail_sacct:
                return CommandResult(
                    1, "", "sacct: error: Problem talking to the database: Connection refused\n"
                )
            known = [job_id for job_id in ids if job_id in self.accounted]
            return CommandResult(0, "".join(self._sacct_line(i) for i in known), "")
        raise AssertionError(f"unexpected command {argv}")

    def _squeue_line(self, job_id: str) -> str:
        job = self.queued[job_id]
        host = first_node(job.nodes) or "n/a"
        return (
            f"{job_id}|{job_id}|{job.state}|{job.reason}|{job.nodes}|{host}|batch|"
            f"{job.start}|{job.end}|{job.wait_status}|{job.restarts}\n"
        )

    def _sacct_line(self, job_id: str) -> str:
        job = self.accounted[job_id]
        nodes = job.nodes or "None assigned"
        start = "Unknown" if job.start == "N/A" else job.start
        end = "Unknown" if job.end == "N/A" else job.end
        return (
            f"{job_id}|{job_id}|{job.state}|{job.exit_code}|{job.reason}|{nodes}|batch|"
            f"{start}|{end}\n"
        )

    def commands(self, name: str) -> list[list[str]]:
        return [argv for argv in self.calls if argv[0] == name]

    def asked(self, name: str) -> list[list[str]]:
        """The job IDs of each call of the command."""
        return [argv[argv.index("-j") + 1].split(",") for argv in self.commands(name)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


RUNNING = FakeJob("RUNNING", nodes="n1", start="2026-11-24T10:08:21", end="NONE")
PENDING = FakeJob("PENDING", reason="Priority")
COMPLETED = FakeJob("COMPLETED", nodes="n1", start="2026-11-24T10:03:07", end="2026-11-24T10:03:07")
FAILED_3 = FakeJob(
    "FAILED",
    reason="NonZeroExitCode",
    nodes="n1",
    start="2026-11-24T10:03:07",
    end="2026-11-24T10:03:07",
    wait_status=768,
    exit_code="3:0",
)


class Harness:
    def __init__(self, **settings: float) -> None:
        self.slurm = FakeSlurm()
        self.clock = Clock()
        self.changes: list[tuple[str, JobView]] = []
        self.watcher = JobWatcher(
            SlurmClient(self.slurm),
            lambda key, view: self.changes.append((key, view)),
            settings=WatcherSettings(**settings),
            clock=self.clock,
        )

    def states(self) -> list[tuple[str, str]]:
        return [(key, view.state) for key, view in self.changes]


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.mark.parametrize("count", [1, 100, 1000])
def test_one_squeue_call_per_poll_whatever_the_number_of_jobs(count: int) -> None:
    h = Harness()
    ids = [str(100 + n) for n in range(count)]
    for job_id in ids:
        h.slurm.queued[job_id] = RUNNING
        h.watcher.register(job_id, f"default/pod-{job_id}")
    for _ in range(3):
        h.watcher.poll_once()
        h.clock.advance(1)
    assert len(h.slurm.commands("squeue")) == 3
    assert h.slurm.commands("sacct") == []
    assert all(sorted(asked) == sorted(ids) for asked in h.slurm.asked("squeue"))
    assert len(h.changes) == count, "each job is reported once, when first seen"
    counters = h.watcher.counters
    assert (counters.polls, counters.squeue_calls, counters.sacct_calls) == (3, 3, 0)


def test_sacct_is_asked_only_about_jobs_squeue_no_longer_lists(h: Harness) -> None:
    h.slurm.queued |= {"11": RUNNING, "12": PENDING}
    h.slurm.accounted |= {"11": RUNNING, "12": PENDING, "13": FAILED_3}
    for job_id in ("11", "12", "13"):
        h.watcher.register(job_id, f"ns/p{job_id}")
    h.watcher.poll_once()
    assert h.slurm.asked("sacct") == [["13"]]
    assert dict(h.states()) == {"ns/p11": "RUNNING", "ns/p12": "PENDING", "ns/p13": "FAILED"}
    failed = h.watcher.view("13")
    assert failed is not None
    assert (failed.exit_code, failed.exit_signal, failed.final) == (3, 0, True)
    assert failed.source == "sacct"


def test_sacct_is_not_called_when_squeue_lists_every_job(h: Harness) -> None:
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    assert h.slurm.commands("sacct") == []


def test_a_job_missing_everywhere_is_not_lost_within_the_grace_window(h: Harness) -> None:
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.clock.advance(29.5)
    h.watcher.poll_once()
    assert h.changes == []
    assert h.watcher.view("11") is None
    h.clock.advance(0.5)
    h.watcher.poll_once()
    assert h.states() == [("ns/a", LOST)]
    lost = h.changes[0][1]
    assert lost.final
    assert lost.message is not None and "neither squeue nor sacct" in lost.message


def test_a_job_listed_late_within_the_grace_window_is_followed(h: Harness) -> None:
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.clock.advance(20)
    h.watcher.poll_once()
    h.slurm.queued["11"] = PENDING
    h.clock.advance(20)
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "PENDING")]
    h.clock.advance(60)
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "PENDING")]


def test_a_job_that_vanishes_is_lost_only_a_grace_window_later(h: Harness) -> None:
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.clock.advance(100)
    del h.slurm.queued["11"]
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING")]
    h.clock.advance(30)
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING"), ("ns/a", LOST)]
    assert h.changes[-1][1].batch_host == "n1", "the lost job keeps the node it ran on"


def test_a_job_sacct_still_calls_running_but_squeue_forgot_is_lost(h: Harness) -> None:
    h.slurm.accounted["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING")]
    h.clock.advance(30)
    h.watcher.poll_once()
    assert h.states()[-1] == ("ns/a", LOST)
    message = h.changes[-1][1].message
    assert message is not None and "sacct still reports it RUNNING" in message


def test_a_failed_squeue_keeps_the_last_answer_and_backs_off() -> None:
    h = Harness(interval=1.0, max_backoff=8.0)
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    assert h.watcher.next_delay() == 1.0
    h.slurm.fail_squeue = True
    delays = []
    for _ in range(5):
        h.clock.advance(60)
        h.watcher.poll_once()
        delays.append(h.watcher.next_delay())
    assert delays == [2.0, 4.0, 8.0, 8.0, 8.0]
    view = h.watcher.view("11")
    assert view is not None and view.state == "RUNNING"
    assert h.slurm.commands("sacct") == [], "no sacct for jobs squeue could not be asked about"
    assert h.states() == [("ns/a", "RUNNING")]
    assert h.watcher.counters.failed_calls == 5
    h.slurm.fail_squeue = False
    h.slurm.queued["11"] = COMPLETED
    h.watcher.poll_once()
    assert h.watcher.next_delay() == 1.0
    assert h.states() == [("ns/a", "RUNNING"), ("ns/a", "COMPLETED")]


def test_a_failed_sacct_neither_loses_jobs_nor_drops_squeue_news(h: Harness) -> None:
    h.slurm.queued |= {"11": RUNNING, "12": RUNNING}
    h.watcher.register("11", "ns/a")
    h.watcher.register("12", "ns/b")
    h.watcher.poll_once()
    del h.slurm.queued["11"]
    h.slurm.queued["12"] = COMPLETED
    h.slurm.fail_sacct = True
    for _ in range(5):
        h.clock.advance(60)
        h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING"), ("ns/b", "RUNNING"), ("ns/b", "COMPLETED")]
    assert h.watcher.next_delay() > 1.0
    h.slurm.fail_sacct = False
    h.slurm.accounted["11"] = FAILED_3
    h.watcher.poll_once()
    assert h.states()[-1] == ("ns/a", "FAILED")
    assert h.watcher.next_delay() == 1.0


def test_without_accounting_a_job_squeue_forgot_is_lost_after_the_grace(h: Harness) -> None:
    h.slurm.sacct_disabled = True
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    del h.slurm.queued["11"]
    h.watcher.poll_once()
    h.clock.advance(30)
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING"), ("ns/a", LOST)]


def test_final_states_are_cached_and_never_asked_again(h: Harness) -> None:
    h.slurm.queued |= {"11": FAILED_3, "12": RUNNING}
    h.watcher.register("11", "ns/a")
    h.watcher.register("12", "ns/b")
    h.watcher.poll_once()
    h.watcher.poll_once()
    assert h.slurm.asked("squeue") == [["11", "12"], ["12"]]
    h.slurm.queued["12"] = COMPLETED
    h.watcher.poll_once()
    calls = len(h.slurm.calls)
    for _ in range(3):
        h.watcher.poll_once()
    assert len(h.slurm.calls) == calls, "no live job left, so Slurm is not asked"
    view = h.watcher.view("11")
    assert view is not None and view.final and view.exit_code == 3
    assert h.watcher.counters.polls == 3


def test_changes_are_reported_once_and_estimates_do_not_count(h: Harness) -> None:
    h.slurm.queued["11"] = FakeJob("PENDING", reason="Priority", start="2027-01-01T00:00:00")
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.slurm.queued["11"] = FakeJob("PENDING", reason="Priority", start="2027-02-01T00:00:00")
    h.watcher.poll_once()
    h.slurm.queued["11"] = FakeJob("PENDING", reason="Resources")
    h.watcher.poll_once()
    h.watcher.poll_once()
    h.slurm.queued["11"] = RUNNING
    h.watcher.poll_once()
    h.watcher.poll_once()
    h.slurm.queued["11"] = FAILED_3
    h.watcher.poll_once()
    assert [(view.state, view.reason) for _, view in h.changes] == [
        ("PENDING", "Priority"),
        ("PENDING", "Resources"),
        ("RUNNING", None),
        ("FAILED", "NonZeroExitCode"),
    ]
    pending = h.changes[0][1]
    assert pending.start_time is None, "a pending job's start time is only an estimate"


def test_a_requeued_job_goes_back_to_pending_with_its_restart_count(h: Harness) -> None:
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.slurm.queued["11"] = FakeJob("PENDING", reason="BeginTime", restarts=1)
    h.watcher.poll_once()
    view = h.changes[-1][1]
    assert (view.state, view.reason, view.restarts, view.final) == (
        "PENDING",
        "BeginTime",
        1,
        False,
    )


def test_a_preempted_job_slurm_did_not_requeue_is_final(h: Harness) -> None:
    # A job Slurm requeues shows as PENDING again; PREEMPTED is what stays of one it did not.
    h.slurm.queued["11"] = FakeJob(
        "PREEMPTED", nodes="n1", start="2026-11-24T10:03:07", end="2026-11-24T10:04:00"
    )
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.watcher.poll_once()
    assert [(view.state, view.final) for _, view in h.changes] == [("PREEMPTED", True)]
    assert len(h.slurm.commands("squeue")) == 1


def test_a_job_cancelled_while_pending_has_no_start_time(h: Harness) -> None:
    h.slurm.queued["29"] = FakeJob(
        "CANCELLED", reason="Priority", start="2026-11-24T10:10:39", end="2026-11-24T10:10:39"
    )
    h.watcher.register("29", "ns/a")
    h.watcher.poll_once()
    view = h.changes[0][1]
    assert view.final and view.batch_host is None
    assert view.end_time is not None


def test_forgotten_jobs_are_no_longer_asked_about(h: Harness) -> None:
    h.slurm.queued |= {"11": RUNNING, "12": RUNNING}
    h.watcher.register("11", "ns/a")
    h.watcher.register("12", "ns/b")
    h.watcher.poll_once()
    h.watcher.forget("11")
    h.watcher.forget("404")
    h.watcher.poll_once()
    assert h.slurm.asked("squeue")[-1] == ["12"]
    assert h.watcher.view("11") is None
    assert h.watcher.watched() == {"12": "ns/b"}


def test_registering_again_updates_the_key_and_keeps_the_view(h: Harness) -> None:
    h.slurm.queued["11"] = RUNNING
    h.watcher.register("11", "ns/a")
    h.watcher.poll_once()
    h.watcher.register("11", "ns/renamed")
    h.slurm.queued["11"] = COMPLETED
    h.watcher.poll_once()
    assert h.states() == [("ns/a", "RUNNING"), ("ns/renamed", "COMPLETED")]


def test_a_failing_change_handler_does_not_stop_the_watcher() -> None:
    slurm = FakeSlurm()
    seen: list[str] = []

    def handler(key: str, view: JobView) -> None:
        seen.append(key)
        raise RuntimeError("boom")

    watcher = JobWatcher(SlurmClient(slurm), handler, clock=Clock())
    slurm.queued |= {"11": RUNNING, "12": RUNNING}
    watcher.register("11", "ns/a")
    watcher.register("12", "ns/b")
    watcher.poll_once()
    assert seen == ["ns/a", "ns/b"]


def test_register_refuses_what_is_not_a_job_id(h: Harness) -> None:
    with pytest.raises(ValueError, match="not a Slurm job ID"):
        h.watcher.register("12;rm -rf", "ns/a")


def test_no_jobs_no_calls(h: Harness) -> None:
    h.watcher.poll_once()
    assert h.slurm.calls == []


def test_the_thread_polls_until_stopped() -> None:
    slurm = FakeSlurm()
    slurm.queued["11"] = RUNNING
    seen = threading.Event()
    watcher = JobWatcher(
        SlurmClient(slurm),
        lambda key, view: seen.set(),
        settings=WatcherSettings(interval=0.01),
    )
    watcher.register("11", "ns/a")
    watcher.start()
    try:
        assert seen.wait(5)
    finally:
        watcher.stop()
    calls = len(slurm.calls)
    assert calls >= 1
    watcher.wake()
    threading.Event().wait(0.05)
    assert len(slurm.calls) == calls, "a stopped watcher asks nothing"
