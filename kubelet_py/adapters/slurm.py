"""The kubelet's Slurm adapter: the only module of kubelet_py that runs Slurm's commands.

It runs `sbatch`, `squeue`, `sacct`, `scancel`, `sinfo` and `sstat` through a `CommandRunner`
it is given, so that unit tests replace the commands with a fake and never patch globals. Every
call passes argv, never a shell, and goes through `SlurmClient._run`, the one place where an
injected `CallObserver` hears of each call (the kubelet's metrics count them there). Everything
above this module sees parsed, typed answers and typed errors; Slurm's text formats stay here.

Facts about Slurm 22.05 this module is built on (measured on the test bed):

- `squeue -j` with a single unknown ID fails with rc 1 ("Invalid job id specified"); with two
  or more IDs it silently leaves the unknown ones out and returns rc 0.
- `squeue -O field` pads and truncates to 20 characters; `field:0` prints the whole value, and
  a suffix after the size (`field:0|`) gives a delimiter.
- `squeue -O exit_code` is the raw wait status (768 for exit 3, 253 for signal 125 with the
  core flag); sacct prints the same as "code:signal".
- `sacct` prints "CANCELLED by <uid>" as the state, and 0:0 as the exit code of a job that
  scancel ended while scontrol says 0:15; its JSON output misreports exit codes, so only the
  text output (`-P`) is read.
- `scancel` of an unknown job returns rc 0; with `--signal` it fails ("Invalid job id
  specified").
- `sacct` knows the fields `JobName`, `WorkDir` and `Comment`, but it stores the comment only
  when slurm.conf has `AccountingStoreFlags=job_comment`; without it the field is empty.
- An unreachable controller makes squeue, sbatch, scancel and sinfo retry for about 9 s and then
  fail with "Unable to contact slurm controller"; an unreachable slurmdbd makes sacct fail at
  once.
- `sstat` has no TotalCPU field (sacct has); its `TRESUsageInTot` sums the step's tasks:
  `cpu=` is CPU time as `[D-]HH:MM:SS` or `MM:SS[.mmm]`, whole seconds in practice, and `mem=`
  the tasks' resident memory at Slurm's last accounting poll (bytes with `--noconvert`, else
  with a K/M/G suffix). Its figures are only as fresh as that poll (`JobAcctGatherFrequency`,
  30 s by default), and with `JobAcctGatherType=jobacct_gather/none` they stay empty.
- `sstat -a -j A,B` takes a list of jobs and prints every running step of each (`A.batch`,
  `A.extern`, `A.0`, ...); a job that has ended or has not started prints no line, only an
  error on stderr, and the exit code stays 0. `Pids` lists each step's processes on its node.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from kubelet_py.errors import BackendError, SubmissionRefused

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[1-9][0-9]*(_[0-9]+)?")
"""A job ID as sbatch prints it, or one task of an array ("ID_N"). Use `fullmatch`: `$` would
let a trailing newline through."""

FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
"""States after which Slurm does nothing more with a job. A job Slurm requeues (after a
preemption or a node failure) never shows these: squeue lists it as PENDING again."""

UNREACHABLE_MARKERS = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Transport endpoint is not connected",
    "Connection refused",
    "Problem talking to the database",
    "backup controller in standby mode",
    "Zero Bytes were transmitted or received",
)
"""Parts of Slurm's messages that mean "the controller or slurmdbd is not there", as opposed
to a refusal that retrying cannot fix."""

ACCOUNTING_DISABLED = "accounting storage is disabled"

_QUEUE_FIELDS = (
    "JobArrayID",
    "JobID",
    "State",
    "Reason",
    "NodeList",
    "BatchHost",
    "Partition",
    "StartTime",
    "EndTime",
    "exit_code",
    "RestartCnt",
    "Name",
    "WorkDir",
    "Comment",
)
_QUEUE_FORMAT = ",".join(f"{name}:0|" for name in _QUEUE_FIELDS[:-1]) + f",{_QUEUE_FIELDS[-1]}:0"
_FIXED_QUEUE_FIELDS = 11
"""The fields before the name, folder and comment, none of which can hold the delimiter."""

_LISTED_FORMAT = "JobID:0|,State:0|,Name:0|,WorkDir:0|,Comment:0"
_IDENTIFIED_FORMAT = "JobArrayID:0|,State:0|,Name:0|,WorkDir:0|,Comment:0"
_IDENTIFIED_ACCOUNTING = "JobID,State,JobName,WorkDir,Comment"

_ACCOUNTING_FIELDS = (
    "JobID",
    "JobIDRaw",
    "State",
    "ExitCode",
    "Reason",
    "NodeList",
    "Partition",
    "Start",
    "End",
)

_USAGE_FIELDS = ("JobID", "TRESUsageInTot", "Pids")

_NO_TIME = frozenset({"", "N/A", "NONE", "None", "Unknown"})
_NO_NODES = frozenset({"", "None assigned", "(null)", "n/a"})


class SlurmError(BackendError):
    """A Slurm command failed; the message is Slurm's, with the command named."""


class SlurmUnavailable(SlurmError):
    """Slurm could not be reached (controller or slurmdbd down, command missing or too slow).
    Retrying later may succeed."""


class SubmissionFailed(SlurmError, SubmissionRefused):
    """sbatch refused the job; the message is sbatch's. Retrying the same job will not help."""


class AccountingDisabled(SlurmError):
    """The site runs Slurm without slurmdbd, so sacct knows no finished jobs."""


class CommandResult(NamedTuple):
    """What a command returned."""

    returncode: int
    stdout: str
    stderr: str


CallObserver = Callable[[str, float, str], None]
"""Told of each Slurm command the client ran: (command name, seconds it took, outcome), the
outcome "ok" (exit code 0), "error" (any other code) or "unavailable" (it could not run, or
ran out of time). It must be quick and must not raise."""


class CommandRunner(Protocol):
    """Runs one command. The seam that unit tests replace."""

    def run(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        """Run argv (never through a shell) and return its exit status and output.

        `env` is the command's whole environment; None inherits this process's. Raises
        SlurmUnavailable when the command cannot be started or runs longer than `timeout`
        seconds (it is then killed).
        """
        ...


class SubprocessRunner:
    """The real runner: one child process per command."""

    def run(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=None if env is None else dict(env),
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as error:
            raise SlurmUnavailable(f"{argv[0]} did not answer within {timeout:g} s") from error
        except OSError as error:
            raise SlurmUnavailable(f"{argv[0]} could not run: {error}") from error
        return CommandResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class ExitStatus:
    """How a job's batch script ended: Slurm's "code:signal"."""

    code: int
    """The exit code, when the script exited."""
    signal: int
    """The signal that ended it, or 0. OUT_OF_MEMORY jobs show 125 here."""

    @classmethod
    def from_wait_status(cls, raw: int) -> ExitStatus:
        """From a raw wait status, as `squeue -O exit_code` prints it."""
        return cls(code=(raw >> 8) & 0xFF, signal=raw & 0x7F)

    @classmethod
    def parse(cls, text: str) -> ExitStatus | None:
        """From sacct's "code:signal"; None when the text is not of that form."""
        code, sep, signal = text.strip().partition(":")
        if not sep or not code.isdigit() or not signal.isdigit():
            return None
        return cls(code=int(code), signal=int(signal))

    @property
    def shell_code(self) -> int:
        """The code a shell would report: the exit code, or 128 + the signal."""
        return 128 + self.signal if self.signal else self.code

    def __str__(self) -> str:
        return f"{self.code}:{self.signal}"


@dataclass(frozen=True)
class QueueEntry:
    """One job as squeue lists it."""

    job_id: str
    """The ID as the job's owner knows it ("123", or "123_4" for an array task)."""
    raw_id: str
    """Slurm's internal ID (differs from job_id for array tasks)."""
    state: str
    """Slurm's long state name, e.g. PENDING, RUNNING, COMPLETING, OUT_OF_MEMORY."""
    reason: str | None
    """Why the job waits or why it ended (e.g. Priority, JobHeldUser, NonZeroExitCode)."""
    nodes: str
    """The node list in Slurm's compressed form ("n[1-3]"); empty while pending."""
    batch_host: str | None
    """The node that runs the batch script."""
    partition: str
    """The partition the job runs in (or one of those it may run in)."""
    start_time: datetime | None
    """When the job started; for a pending job, Slurm's estimate."""
    end_time: datetime | None
    """When the job ended; for a running job, its time limit."""
    exit: ExitStatus
    """How the batch script ended; 0:0 while it runs."""
    restarts: int
    """How many times Slurm requeued the job."""
    name: str | None = None
    """The job's name; None when squeue was not asked for it."""
    work_dir: str | None = None
    """The job's working folder; None when squeue was not asked for it."""
    comment: str | None = None
    """The job's comment; None when it has none."""


@dataclass(frozen=True)
class ListedJob:
    """One of the user's jobs with what tells whose it is: its name, folder and comment."""

    job_id: str
    """The ID as the job's owner knows it."""
    state: str
    """Slurm's long state name."""
    name: str
    """The job's --job-name."""
    work_dir: str
    """The job's working folder (--chdir), as Slurm keeps it."""
    comment: str | None
    """The job's --comment; None when it has none, or when sacct (which does not store it
    without `AccountingStoreFlags=job_comment`) reported the job with none."""
    source: str = "squeue"
    """Which command told: "squeue" or "sacct"."""


@dataclass(frozen=True)
class AccountingEntry:
    """One job as `sacct -X` (allocations only, no steps) reports it."""

    job_id: str
    """The ID as the job's owner knows it ("123", or "123_4" for an array task)."""
    raw_id: str
    """Slurm's internal ID."""
    state: str
    """Slurm's long state name, without sacct's " by <uid>" suffix."""
    cancelled_by: str | None
    """The UID that cancelled the job, from "CANCELLED by <uid>"."""
    exit: ExitStatus | None
    """How the batch script ended (sacct's ExitCode)."""
    reason: str | None
    """Slurm's reason, mostly "None" once a job has ended."""
    nodes: str
    """The node list in Slurm's compressed form; empty when none was assigned."""
    batch_host: str | None
    """The first node of the allocation, where the batch script ran."""
    partition: str
    """The partition the job ran in."""
    start_time: datetime | None
    """When the job started."""
    end_time: datetime | None
    """When the job ended."""


@dataclass(frozen=True)
class StepUsage:
    """What `sstat` tells of one running step of a job."""

    step_id: str
    """The step as sstat names it: "123.batch", "123.extern", "123.0"."""
    cpu_seconds: float | None
    """CPU time its tasks used so far (TRESUsageInTot's cpu); None when Slurm gave none."""
    memory_bytes: int | None
    """Resident memory of its tasks at Slurm's last poll (TRESUsageInTot's mem); None when
    Slurm gave none."""
    pids: tuple[int, ...] = ()
    """The step's processes on its node, as Slurm's process tracking knows them."""

    @property
    def job_id(self) -> str:
        return self.step_id.partition(".")[0]


@dataclass(frozen=True)
class JobUsage:
    """A running job's steps as `sstat -a` tells of them, and their sums."""

    job_id: str
    steps: tuple[StepUsage, ...]

    @property
    def cpu_seconds(self) -> float | None:
        """CPU time of all its running steps; None when no step had a figure."""
        known = [step.cpu_seconds for step in self.steps if step.cpu_seconds is not None]
        return sum(known) if known else None

    @property
    def memory_bytes(self) -> int | None:
        """Resident memory of all its running steps; None when no step had a figure."""
        known = [step.memory_bytes for step in self.steps if step.memory_bytes is not None]
        return sum(known) if known else None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(pid for step in self.steps for pid in step.pids)


@dataclass(frozen=True)
class NodeInfo:
    """One node of a partition, as sinfo shows it."""

    name: str
    """Slurm's node name."""
    address: str
    """The node's NodeAddr (an IP address or a host name)."""
    cpus: int
    """CPUs the node offers to jobs."""
    memory_mb: int
    """Memory the node offers to jobs (RealMemory), in MB."""
    gpus: int
    """GPUs in the node's generic resources."""
    state: str
    """sinfo's long node state, e.g. idle, mixed, allocated, down*, drained."""

    @property
    def usable(self) -> bool:
        """Whether Slurm can start jobs on the node now or later (not down, drained or failed)."""
        state = self.state.rstrip("*~#!%$@^-").lower()
        return not any(word in state for word in ("down", "drain", "fail", "maint", "unknown"))


@dataclass(frozen=True)
class PartitionInfo:
    """One partition, as sinfo shows it."""

    name: str
    """The partition's name."""
    default: bool
    """Whether jobs that name no partition go here."""
    available: bool
    """Whether the partition is up (sinfo's %a is "up")."""
    nodes: tuple[NodeInfo, ...] = field(default=())
    """The partition's nodes."""

    @property
    def cpus(self) -> int:
        """CPUs of the usable nodes."""
        return sum(node.cpus for node in self.nodes if node.usable)

    @property
    def memory_mb(self) -> int:
        """Memory of the usable nodes, in MB."""
        return sum(node.memory_mb for node in self.nodes if node.usable)

    @property
    def gpus(self) -> int:
        """GPUs of the usable nodes."""
        return sum(node.gpus for node in self.nodes if node.usable)


@dataclass(frozen=True)
class SlurmSettings:
    """How the adapter runs Slurm's commands."""

    timeout: float = 60.0
    """Seconds a command may take. An unreachable controller makes commands retry for about
    9 s before they give up, so this is well above that."""
    squeue: str = "squeue"
    """The squeue command."""
    sacct: str = "sacct"
    """The sacct command."""
    sbatch: str = "sbatch"
    """The sbatch command."""
    scancel: str = "scancel"
    """The scancel command."""
    sinfo: str = "sinfo"
    """The sinfo command."""
    sstat: str = "sstat"
    """The sstat command."""


class SlurmClient:
    """Typed calls to Slurm's commands. Safe to share between threads."""

    def __init__(
        self,
        runner: CommandRunner,
        *,
        settings: SlurmSettings | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._runner = runner
        self._settings = settings or SlurmSettings()
        self._observer = observer

    def submit(
        self,
        script: Path,
        argv_flags: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """sbatch the script with the given options; returns the new job's ID.

        `env` is sbatch's whole environment (None: this process's); by default sbatch hands
        it to the job. Raises SlurmUnavailable when the controller cannot be reached (the job
        may then exist all the same, if the answer was lost after Slurm accepted it), and
        SubmissionFailed with sbatch's message when Slurm refuses the job.
        """
        parsable = [] if "--parsable" in argv_flags else ["--parsable"]
        argv = [self._settings.sbatch, *parsable, *argv_flags, str(script)]
        result = self._run(argv, env=env)
        message = _message(result)
        if result.returncode != 0:
            if _unreachable(message):
                raise SlurmUnavailable(f"sbatch: {message}")
            raise SubmissionFailed(message or f"sbatch failed with exit code {result.returncode}")
        lines = result.stdout.strip().splitlines()
        job_id = lines[-1].split(";")[0].strip() if lines else ""
        if not JOB_ID.fullmatch(job_id):
            # Slurm took the job or not; a retry could duplicate it, so this is final.
            raise SubmissionFailed(f"sbatch printed no job ID: {result.stdout.strip()!r}")
        log.debug("job %s: submitted %s", job_id, script)
        return job_id

    def queue(self, job_ids: Iterable[str]) -> dict[str, QueueEntry]:
        """The given jobs as squeue lists them, in one call, keyed by job ID.

        Finished jobs are listed until Slurm's MinJobAge has passed; jobs squeue does not know
        are missing from the answer. An array's base ID lists all its tasks ("ID_N").
        """
        ids = _checked_ids(job_ids)
        if not ids:
            return {}
        argv = [self._settings.squeue, "-h", "-t", "all", "-j", ",".join(ids), "-O", _QUEUE_FORMAT]
        result = self._run(argv)
        if result.returncode != 0:
            message = _message(result)
            # squeue asks for a single ID with its own call, which fails when the ID is unknown.
            if len(ids) == 1 and "Invalid job id specified" in message:
                return {}
            raise _failure("squeue", message, result.returncode)
        return parse_queue(result.stdout)

    def listed_jobs(self, comment_prefix: str) -> dict[str, ListedJob]:
        """This user's jobs squeue lists (finished ones too) whose comment starts with the
        prefix, with their names and working folders, in one call.

        For recovery after a restart: a job is the kubelet's when its comment is
        "hpk-uid=<pod UID>" and its folder is a pod folder of the kubelet's hpk home.
        """
        argv = [self._settings.squeue, "-h", "-t", "all", "--me", "-O", _LISTED_FORMAT]
        result = self._run(argv)
        if result.returncode != 0:
            raise _failure("squeue", _message(result), result.returncode)
        return {
            job.job_id: job
            for job in parse_listed(result.stdout)
            if job.comment is not None and job.comment.startswith(comment_prefix)
        }

    def identify(self, job_ids: Iterable[str]) -> dict[str, ListedJob]:
        """The name, folder and comment of each given job of this user, keyed by job ID: what
        proves whose a job is before the kubelet adopts, signals or cancels it.

        One squeue call (pending, running and recently finished jobs), then one sacct call for
        the jobs squeue no longer lists. Jobs neither knows are missing from the answer, as
        are other users' jobs (`--me`; sacct shows only the user's own). A site without
        slurmdbd answers from squeue alone.
        """
        ids = _checked_ids(job_ids)
        if not ids:
            return {}
        argv = [self._settings.squeue, "-h", "-t", "all", "--me", "-j", ",".join(ids)]
        result = self._run([*argv, "-O", _IDENTIFIED_FORMAT])
        found: dict[str, ListedJob] = {}
        if result.returncode == 0:
            found = {job.job_id: job for job in parse_listed(result.stdout)}
        elif not (len(ids) == 1 and "Invalid job id specified" in _message(result)):
            raise _failure("squeue", _message(result), result.returncode)
        missing = [job_id for job_id in ids if job_id not in found]
        if not missing:
            return found
        # sacct shows root every user's jobs, so the user is named, as squeue's --me does.
        argv = [self._settings.sacct, "-P", "-n", "-X", f"--user={os.getuid()}"]
        result = self._run([*argv, "-j", ",".join(missing), "-o", _IDENTIFIED_ACCOUNTING])
        if result.returncode != 0:
            message = _message(result)
            if ACCOUNTING_DISABLED in message:
                return found
            raise _failure("sacct", message, result.returncode)
        for job in parse_listed(result.stdout, source="sacct"):
            if job.job_id in missing:  # sacct may add the tasks of an array
                found[job.job_id] = job
        return found

    def accounting(self, job_ids: Iterable[str]) -> dict[str, AccountingEntry]:
        """The given jobs as sacct reports them, in one call, keyed by job ID.

        Jobs sacct does not know are missing from the answer. Raises AccountingDisabled on a
        site without slurmdbd.
        """
        ids = _checked_ids(job_ids)
        if not ids:
            return {}
        argv = [
            self._settings.sacct,
            "-P",
            "-n",
            "-X",
            "-j",
            ",".join(ids),
            "-o",
            ",".join(_ACCOUNTING_FIELDS),
        ]
        result = self._run(argv)
        if result.returncode != 0:
            message = _message(result)
            if ACCOUNTING_DISABLED in message:
                raise AccountingDisabled(f"sacct: {message}")
            raise _failure("sacct", message, result.returncode)
        return parse_accounting(result.stdout)

    def cancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """End the job, or send it a signal. Idempotent: a job Slurm no longer knows is fine.

        With a signal (e.g. "TERM"), scancel sends it to the batch script as well as to the
        job's steps and every process of the job (`--full`); with `batch_only` to the batch
        script alone (`--batch`), whose trap then stops the rest in its own order: a pod's
        job records its containers' exit and passes TERM to their launchers, which run the
        preStop hooks first, and `hpk down` lets the control-plane job stop its components.
        The caller has proven the job its own: this only checks that the ID is one.
        """
        _checked_ids([job_id])
        argv = [self._settings.scancel]
        if signal is not None:
            if not re.fullmatch(r"(SIG)?[A-Z0-9]+", signal):
                raise ValueError(f"not a signal name or number: {signal!r}")
            argv += [f"--signal={signal}", "--batch" if batch_only else "--full"]
        elif batch_only:
            raise ValueError("batch_only needs a signal: a cancellation ends the whole job")
        argv.append(job_id)
        result = self._run(argv)
        if result.returncode == 0:
            log.debug("job %s: scancel %s", job_id, " ".join(argv[1:-1]) or "sent")
            return
        message = _message(result)
        if "Invalid job id specified" in message or "already completing or completed" in message:
            log.info("job %s: nothing to cancel, Slurm no longer runs it", job_id)
            return
        raise _failure("scancel", message, result.returncode)

    def partitions(self) -> list[PartitionInfo]:
        """Every partition with its nodes, from one sinfo call."""
        argv = [self._settings.sinfo, "-h", "-N", "-o", "%R|%P|%a|%N|%o|%c|%m|%G|%T"]
        result = self._run(argv)
        if result.returncode != 0:
            raise _failure("sinfo", _message(result), result.returncode)
        return parse_partitions(result.stdout)

    def usage(self, job_ids: Iterable[str]) -> dict[str, JobUsage]:
        """The running steps of the given jobs as sstat tells of them, in one call, keyed by
        job ID. Jobs without a running step (pending, ended, unknown) are missing."""
        ids = _checked_ids(job_ids)
        if not ids:
            return {}
        argv = [self._settings.sstat, "-a", "-n", "-P", "--noconvert", "-j", ",".join(ids)]
        result = self._run([*argv, "-o", ",".join(_USAGE_FIELDS)])
        message = _message(result)
        if result.returncode != 0:
            raise _failure("sstat", message, result.returncode)
        found = parse_usage(result.stdout)
        if not found and _unreachable(message):
            raise SlurmUnavailable(f"sstat: {message}")
        return {job_id: usage for job_id, usage in found.items() if job_id in ids}

    def _run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> CommandResult:
        began = time.monotonic()
        outcome = "unavailable"
        try:
            result = self._runner.run(argv, timeout=self._settings.timeout, env=env)
            outcome = "ok" if result.returncode == 0 else "error"
            return result
        finally:
            if self._observer is not None:
                self._observer(os.path.basename(argv[0]), time.monotonic() - began, outcome)


def parse_queue(text: str) -> dict[str, QueueEntry]:
    """Parse the output of `squeue -h -O` with this module's fields.

    The name, folder and comment come last, read as `parse_listed` reads them; a line of the
    first eleven fields alone has none.
    """
    entries: dict[str, QueueEntry] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", _FIXED_QUEUE_FIELDS)
        identity: tuple[str | None, str | None, str | None] = (None, None, None)
        if len(parts) == _FIXED_QUEUE_FIELDS + 1 and parts[-1].count("|") >= 2:
            name, _, rest = parts.pop().partition("|")
            work_dir, _, comment = rest.rpartition("|")
            identity = (name, work_dir, None if comment.strip() in ("", "(null)") else comment)
        if len(parts) != _FIXED_QUEUE_FIELDS:
            log.warning("squeue printed a line this adapter cannot read: %r", line)
            continue
        (job_id, raw_id, state, reason, nodes, batch_host, partition) = (
            part.strip() for part in parts[:7]
        )
        start, end, exit_code, restarts = parts[7:]
        entries[job_id] = QueueEntry(
            job_id=job_id,
            raw_id=raw_id,
            state=state,
            reason=_reason(reason),
            nodes="" if nodes in _NO_NODES else nodes,
            batch_host=None if batch_host in _NO_NODES else batch_host,
            partition=partition,
            start_time=parse_time(start),
            end_time=parse_time(end),
            exit=ExitStatus.from_wait_status(_int(exit_code)),
            restarts=_int(restarts),
            name=identity[0],
            work_dir=identity[1],
            comment=identity[2],
        )
    return entries


def parse_listed(text: str, *, source: str = "squeue") -> list[ListedJob]:
    """Parse the output of `squeue -h -O` with the fields of `SlurmClient.listed_jobs`, or of
    `sacct -P -n -X -o JobID,State,JobName,WorkDir,Comment` (source "sacct").

    The folder and the comment come last and either may hold the delimiter; the kubelet's
    own comments never do, so the comment is what follows the last one. sacct's "CANCELLED
    by <uid>" is read as CANCELLED.
    """
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 3)
        if len(parts) != 4:
            log.warning("squeue printed a line this adapter cannot read: %r", line)
            continue
        job_id, state, name, rest = parts
        work_dir, _, comment = rest.rpartition("|")
        jobs.append(
            ListedJob(
                job_id=job_id.strip(),
                state=state.partition(" by ")[0].strip(),
                name=name,
                work_dir=work_dir,
                comment=None if comment.strip() in ("", "(null)") else comment.rstrip("\n"),
                source=source,
            )
        )
    return jobs


def parse_accounting(text: str) -> dict[str, AccountingEntry]:
    """Parse the output of `sacct -P -n -X -o` with this module's fields.

    When sacct prints a job twice (it may, after a requeue or when IDs were reused), the last
    line wins: sacct prints the newest record last.
    """
    entries: dict[str, AccountingEntry] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != len(_ACCOUNTING_FIELDS):
            log.warning("sacct printed a line this adapter cannot read: %r", line)
            continue
        job_id, raw_id, state_text, exit_code, reason, nodes, partition, start, end = parts
        state, _, by = state_text.partition(" by ")
        nodes = "" if nodes in _NO_NODES else nodes
        entries[job_id] = AccountingEntry(
            job_id=job_id,
            raw_id=raw_id,
            state=state.strip(),
            cancelled_by=by.strip() or None,
            exit=ExitStatus.parse(exit_code),
            reason=_reason(reason),
            nodes=nodes,
            batch_host=first_node(nodes),
            partition=partition,
            start_time=parse_time(start),
            end_time=parse_time(end),
        )
    return entries


def parse_usage(text: str) -> dict[str, JobUsage]:
    """Parse `sstat -a -n -P --noconvert -o JobID,TRESUsageInTot,Pids`: one line per running
    step; the steps of a job are gathered under its ID."""
    steps: dict[str, list[StepUsage]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != len(_USAGE_FIELDS) or "." not in parts[0]:
            log.warning("sstat printed a line this adapter cannot read: %r", line)
            continue
        step_id, tres, pids = parts
        usage = tres_usage(tres)
        step = StepUsage(
            step_id=step_id,
            cpu_seconds=parse_cpu_time(usage["cpu"]) if "cpu" in usage else None,
            memory_bytes=parse_bytes(usage["mem"]) if "mem" in usage else None,
            pids=tuple(int(pid) for pid in pids.split(",") if pid.strip().isdigit()),
        )
        steps.setdefault(step.job_id, []).append(step)
    return {job_id: JobUsage(job_id=job_id, steps=tuple(found)) for job_id, found in steps.items()}


def tres_usage(text: str) -> dict[str, str]:
    """A TRES string such as "cpu=00:00:05,mem=1101824,fs/disk=2012" as name -> value."""
    pairs = (item.partition("=") for item in text.split(","))
    return {name.strip(): value.strip() for name, sep, value in pairs if sep and value.strip()}


def parse_cpu_time(text: str) -> float | None:
    """A CPU time as sstat prints it ("05:07.250", "00:05:07", "01:02:03", "2-01:02:03") in
    seconds; None when it is none of these."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text.strip())
    if match is None:
        return None
    days, hours, minutes, seconds = match.groups()
    if days is not None and hours is None:  # "D-MM:SS" is no format of Slurm's
        return None
    return ((int(days or 0) * 24 + int(hours or 0)) * 60 + int(minutes)) * 60 + float(seconds)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_bytes(text: str) -> int | None:
    """A size as Slurm prints it ("1101824", "1076K", "1.50M") in bytes; None otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]?)", text.strip())
    if match is None:
        return None
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def parse_partitions(text: str) -> list[PartitionInfo]:
    """Parse `sinfo -h -N -o '%R|%P|%a|%N|%o|%c|%m|%G|%T'`: one line per node and partition."""
    order: list[str] = []
    heads: dict[str, tuple[bool, bool]] = {}
    nodes: dict[str, list[NodeInfo]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split("|")]
        if len(parts) != 9:
            log.warning("sinfo printed a line this adapter cannot read: %r", line)
            continue
        name, marked, avail, node, address, cpus, memory, gres, state = parts
        if name not in heads:
            order.append(name)
            heads[name] = (marked.endswith("*"), avail.lower() == "up")
            nodes[name] = []
        nodes[name].append(
            NodeInfo(
                name=node,
                address=address,
                cpus=_int(cpus.rstrip("+")),
                memory_mb=_int(memory.rstrip("+")),
                gpus=gpus_in_gres(gres),
                state=state,
            )
        )
    return [
        PartitionInfo(
            name=name,
            default=heads[name][0],
            available=heads[name][1],
            nodes=tuple(nodes[name]),
        )
        for name in order
    ]


def gpus_in_gres(gres: str) -> int:
    """The number of GPUs in a GRES string such as "gpu:2", "gpu:a100:4(S:0-1),mps:100"."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def first_node(nodes: str) -> str | None:
    """The first host of a Slurm host list: "n[3-5,9],m1" → "n3"."""
    if not nodes:
        return None
    depth = 0
    end = len(nodes)
    for index, char in enumerate(nodes):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    head = nodes[:end]
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[,-]", match.group(1))[0], head)


def parse_time(text: str) -> datetime | None:
    """A time as Slurm prints it (local time, no zone), in UTC; None for N/A, Unknown, NONE."""
    text = text.strip()
    if text in _NO_TIME:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.astimezone(UTC)


def _reason(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "(null)") else text


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _checked_ids(job_ids: Iterable[str]) -> list[str]:
    ids = list(dict.fromkeys(job_ids))
    bad = [job_id for job_id in ids if not JOB_ID.fullmatch(job_id)]
    if bad:
        # Slurm would fail the whole call for one malformed ID.
        raise ValueError(f"not Slurm job IDs: {bad}")
    return ids


def _message(result: CommandResult) -> str:
    """Slurm's message without the "sbatch: error: " prefixes, one line."""
    text = result.stderr.strip() or result.stdout.strip()
    lines = [re.sub(r"^\w+: (error|fatal): ", "", line).strip() for line in text.splitlines()]
    return "; ".join(line for line in lines if line)


def _unreachable(message: str) -> bool:
    return any(marker.lower() in message.lower() for marker in UNREACHABLE_MARKERS)


def _failure(command: str, message: str, returncode: int) -> SlurmError:
    text = f"{command}: {message or f'exit code {returncode}'}"
    return SlurmUnavailable(text) if _unreachable(message) else SlurmError(text)
