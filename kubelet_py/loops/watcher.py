"""One shared watcher of every live Slurm job of the kubelet, polling Slurm in bulk.

The kubelet may have thousands of pods; asking Slurm about each of them would load the
controller of a shared cluster. So this module asks once per interval, whatever the number of
jobs: one `squeue` call for every live job, then one `sacct` call only for the jobs squeue no
longer lists (finished longer ago than Slurm's MinJobAge). Jobs that reached a final state are
cached and never asked about again. When a call fails, the last answer is kept and the interval
grows, up to a cap.

squeue also tells each job's name, folder and comment, at no extra cost: the provider checks
them against the pod before it shows a job's state as the pod's or signals the job, so that a
job ID Slurm gave again to another job (after its state was wiped) is not taken for the pod's.

A job that neither command lists is not lost at once: sbatch may have returned a moment ago, or
Slurm may be catching up. Only after a grace window is it reported LOST.

The watcher touches nothing but Slurm, through the queries it is given, and reports changes
through a callback; it knows pods only by an opaque key used in its logs and callbacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kubelet_py.adapters.slurm import (
    FINAL_STATES,
    JOB_ID,
    AccountingDisabled,
    AccountingEntry,
    QueueEntry,
    SlurmError,
)

log = logging.getLogger(__name__)

LOST = "LOST"
"""The state of a job that neither squeue nor sacct lists after the grace window."""

WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
"""States in which a job has not started (again); their start times are Slurm's estimates."""


class SlurmQueries(Protocol):
    """The two bulk queries the watcher needs (SlurmClient has them)."""

    def queue(self, job_ids: Iterable[str]) -> Mapping[str, QueueEntry]:
        """The given jobs that squeue lists, keyed by job ID."""
        ...

    def accounting(self, job_ids: Iterable[str]) -> Mapping[str, AccountingEntry]:
        """The given jobs that sacct knows, keyed by job ID."""
        ...


@dataclass(frozen=True)
class JobView:
    """What the watcher last learnt about one job."""

    job_id: str
    """The Slurm job ID."""
    state: str
    """Slurm's long state name (PENDING, RUNNING, COMPLETED, OUT_OF_MEMORY, ...) or LOST."""
    reason: str | None
    """Slurm's reason: why a pending job waits (Priority, Resources, JobHeldUser, ...)."""
    nodes: str
    """The allocated nodes in Slurm's compressed form; empty while pending."""
    batch_host: str | None
    """The node that runs the batch script, once the job has started."""
    start_time: datetime | None
    """When the job started (None while it waits: Slurm's estimates are not kept)."""
    end_time: datetime | None
    """When the job ended, once it is final."""
    exit_code: int | None
    """The batch script's exit code, when known."""
    exit_signal: int | None
    """The signal that ended the batch script (125 for OUT_OF_MEMORY), or 0."""
    restarts: int
    """How many times Slurm requeued the job, as far as squeue told."""
    cancelled_by: str | None
    """The UID that cancelled the job, when sacct told."""
    final: bool
    """Whether Slurm will do nothing more with the job; the watcher then stops asking."""
    source: str
    """Where the view comes from: "squeue", "sacct" or "watcher" (for LOST)."""
    message: str | None = None
    """The watcher's own explanation, for LOST."""
    name: str | None = None
    """The job's name, as squeue last told; None before it did."""
    work_dir: str | None = None
    """The job's working folder, as squeue last told."""
    comment: str | None = None
    """The job's comment, as squeue last told."""

    def _signature(self) -> tuple[object, ...]:
        # What a pod's status depends on; estimates and the source do not count.
        return (
            self.state,
            self.reason,
            self.nodes,
            self.batch_host,
            self.exit_code,
            self.exit_signal,
            self.restarts,
            self.final,
            self.name,
            self.work_dir,
            self.comment,
        )

    def differs_from(self, other: JobView | None) -> bool:
        """Whether a pod's status may differ between the two views."""
        return other is None or self._signature() != other._signature()


@dataclass(frozen=True)
class WatcherSettings:
    """How often and how patiently the watcher asks Slurm."""

    interval: float = 1.0
    """Seconds between two polls while Slurm answers."""
    grace: float = 30.0
    """Seconds a job may be missing from both squeue and sacct before it is LOST."""
    max_backoff: float = 30.0
    """The longest wait between polls while Slurm's commands fail (the wait doubles)."""


@dataclass(frozen=True)
class WatcherCounters:
    """How much the watcher asked of Slurm since it was made."""

    polls: int
    """Polls that had live jobs to ask about."""
    squeue_calls: int
    """squeue calls, failed ones included."""
    sacct_calls: int
    """sacct calls, failed ones included."""
    failed_calls: int
    """Calls that failed."""


@dataclass
class _Tracked:
    key: str
    registered_at: float
    view: JobView | None = None
    missing_since: float | None = None


class JobWatcher:
    """Tracks registered jobs and calls `on_change(key, view)` whenever a job's view changes.

    Drive it with `start()` (a daemon thread polling every interval) or call `poll_once()`
    yourself, as the unit tests do with a fake clock. `on_change` runs on the polling thread;
    it must not block for long and must not call `poll_once`.
    """

    def __init__(
        self,
        slurm: SlurmQueries,
        on_change: Callable[[str, JobView], None],
        *,
        settings: WatcherSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slurm = slurm
        self._on_change = on_change
        self._settings = settings or WatcherSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._jobs: dict[str, _Tracked] = {}
        self._failures = 0
        self._polls = 0
        self._squeue_calls = 0
        self._sacct_calls = 0
        self._failed_calls = 0
        self._accounting_disabled_logged = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, job_id: str, key: str) -> None:
        """Watch a job for the pod `key`. Registering a job again only updates its key."""
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a Slurm job ID: {job_id!r}")
        with self._lock:
            tracked = self._jobs.get(job_id)
            if tracked is None:
                self._jobs[job_id] = _Tracked(key=key, registered_at=self._clock())
                log.debug("job %s (%s): watching", job_id, key)
            else:
                tracked.key = key

    def forget(self, job_id: str) -> None:
        """Stop watching a job (its pod is gone). Unknown IDs are fine."""
        with self._lock:
            tracked = self._jobs.pop(job_id, None)
        if tracked is not None:
            log.debug("job %s (%s): no longer watched", job_id, tracked.key)

    def view(self, job_id: str) -> JobView | None:
        """The last view of a job, or None if it is not watched or not listed yet."""
        with self._lock:
            tracked = self._jobs.get(job_id)
            return tracked.view if tracked else None

    def watched(self) -> dict[str, str]:
        """Every watched job ID with its key."""
        with self._lock:
            return {job_id: tracked.key for job_id, tracked in self._jobs.items()}

    @property
    def counters(self) -> WatcherCounters:
        """Calls made so far, for benchmarks and logs."""
        with self._lock:
            return WatcherCounters(
                polls=self._polls,
                squeue_calls=self._squeue_calls,
                sacct_calls=self._sacct_calls,
                failed_calls=self._failed_calls,
            )

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval, or a capped doubling after failures."""
        with self._lock:
            failures = self._failures
        if failures == 0:
            return self._settings.interval
        return min(self._settings.interval * 2.0**failures, self._settings.max_backoff)

    def poll_once(self) -> None:
        """Ask Slurm once about every live job and report what changed.

        Makes at most one squeue call and one sacct call. A failed call leaves every view as
        it was and makes the next delay longer.
        """
        with self._poll_lock:
            changes = self._poll()
        for key, view in changes:
            try:
                self._on_change(key, view)
            except Exception:
                log.exception("job %s (%s): the change handler failed", view.job_id, key)

    def start(self) -> None:
        """Poll on a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="hpk-job-watcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Poll now rather than at the end of the interval (e.g. right after a submission)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the polling thread and wait for it."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        due = time.monotonic() + self.next_delay()
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            began = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive any surprise
                log.exception("the job watcher's poll failed")
            # At a fixed rate: the next poll is due an interval after this one began, so a
            # slower poll (more jobs) does not make the polls fewer, nor the lag longer.
            due = began + self.next_delay()

    def _poll(self) -> list[tuple[str, JobView]]:
        with self._lock:
            live = [
                job_id
                for job_id, tracked in self._jobs.items()
                if tracked.view is None or not tracked.view.final
            ]
            if not live:
                return []
            self._polls += 1
            self._squeue_calls += 1
        try:
            listed = self._slurm.queue(live)
        except SlurmError as error:
            self._failed(f"squeue failed: {error}", live)
            return []
        missing = [job_id for job_id in live if job_id not in listed]
        unanswered = set(missing)
        accounted: Mapping[str, AccountingEntry] = {}
        accounting_ok = True
        if missing:
            with self._lock:
                self._sacct_calls += 1
            try:
                accounted = self._slurm.accounting(missing)
            except AccountingDisabled as error:
                # Without slurmdbd, squeue is all there is: jobs it forgot are lost.
                if not self._accounting_disabled_logged:
                    log.warning("sacct is not usable, relying on squeue alone: %s", error)
                    self._accounting_disabled_logged = True
            except SlurmError as error:
                self._failed(f"sacct failed: {error}", missing)
                accounting_ok = False
        now = self._clock()
        changes: list[tuple[str, JobView]] = []
        with self._lock:
            if accounting_ok:
                self._failures = 0
            for job_id in live:
                tracked = self._jobs.get(job_id)
                if tracked is None:  # forgotten while Slurm was asked
                    continue
                if job_id in unanswered and not accounting_ok:
                    continue
                view = self._next_view(job_id, tracked, listed=listed, accounted=accounted, now=now)
                if view is not None and view.differs_from(tracked.view):
                    changes.append((tracked.key, view))
                    self._log_change(tracked.key, tracked.view, view)
                if view is not None:
                    tracked.view = view
        return changes

    def _next_view(
        self,
        job_id: str,
        tracked: _Tracked,
        *,
        listed: Mapping[str, QueueEntry],
        accounted: Mapping[str, AccountingEntry],
        now: float,
    ) -> JobView | None:
        entry = listed.get(job_id)
        if entry is not None:
            tracked.missing_since = None
            return _from_queue(entry)
        previous = tracked.view
        record = accounted.get(job_id)
        if record is not None and record.state in FINAL_STATES:
            tracked.missing_since = None
            return _from_accounting(record, previous)
        # Neither lists the job as finished: not yet listed, or lost.
        if tracked.missing_since is None:
            tracked.missing_since = now
        if now - tracked.missing_since < self._settings.grace:
            if record is not None:
                return _from_accounting(record, previous)
            return previous
        if record is not None:
            message = (
                f"squeue no longer lists Slurm job {job_id} and sacct still reports it "
                f"{record.state}: the controller has forgotten it"
            )
        else:
            message = f"neither squeue nor sacct knows Slurm job {job_id}"
        return JobView(
            job_id=job_id,
            state=LOST,
            reason=None,
            nodes=previous.nodes if previous else "",
            batch_host=previous.batch_host if previous else None,
            start_time=previous.start_time if previous else None,
            end_time=None,
            exit_code=None,
            exit_signal=None,
            restarts=previous.restarts if previous else 0,
            cancelled_by=None,
            final=True,
            source="watcher",
            message=message,
            name=previous.name if previous else None,
            work_dir=previous.work_dir if previous else None,
            comment=previous.comment if previous else None,
        )

    def _failed(self, message: str, job_ids: list[str]) -> None:
        with self._lock:
            self._failures += 1
            self._failed_calls += 1
            failures = self._failures
        delay = self.next_delay()
        sample = ", ".join(job_ids[:5]) + (", ..." if len(job_ids) > 5 else "")
        log.warning(
            "jobs %s: %s; keeping the last answer, next try in %.1f s (failure %d)",
            sample,
            message,
            delay,
            failures,
        )

    @staticmethod
    def _log_change(key: str, before: JobView | None, after: JobView) -> None:
        was = before.state if before else "not listed"
        detail = f" ({after.reason})" if after.reason else ""
        if after.message:
            detail = f": {after.message}"
        log.info("job %s (%s): %s -> %s%s", after.job_id, key, was, after.state, detail)


def _from_queue(entry: QueueEntry) -> JobView:
    final = entry.state in FINAL_STATES
    return JobView(
        job_id=entry.job_id,
        state=entry.state,
        reason=entry.reason,
        nodes=entry.nodes,
        batch_host=entry.batch_host,
        start_time=None if entry.state in WAITING_STATES else entry.start_time,
        end_time=entry.end_time if final else None,
        exit_code=entry.exit.code,
        exit_signal=entry.exit.signal,
        restarts=entry.restarts,
        cancelled_by=None,
        final=final,
        source="squeue",
        name=entry.name,
        work_dir=entry.work_dir,
        comment=entry.comment,
    )


def _from_accounting(record: AccountingEntry, previous: JobView | None) -> JobView:
    final = record.state in FINAL_STATES
    return JobView(
        job_id=record.job_id,
        state=record.state,
        reason=record.reason,
        nodes=record.nodes,
        batch_host=record.batch_host,
        start_time=None if record.state in WAITING_STATES else record.start_time,
        end_time=record.end_time if final else None,
        exit_code=record.exit.code if record.exit else None,
        exit_signal=record.exit.signal if record.exit else None,
        # sacct -X has no restart count; keep what squeue told.
        restarts=previous.restarts if previous else 0,
        cancelled_by=record.cancelled_by,
        final=final,
        source="sacct",
        # sacct is not asked for them: what squeue told.
        name=previous.name if previous else None,
        work_dir=previous.work_dir if previous else None,
        comment=previous.comment if previous else None,
    )
