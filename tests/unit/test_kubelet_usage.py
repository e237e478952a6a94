"""The Slurm adapter's `sstat` call (the pods' usage) and its observer (the kubelet's metrics
of Slurm calls), against a fake command runner.

The sstat output below is laid out as Slurm 22.05's sstat prints `-a -n -P --noconvert -o
JobID,TRESUsageInTot,Pids` (its source: one line per running step, the TRES string with
`cpu=` as a time and `mem=` in bytes, the step's pids joined by commas); a job with no running
step prints no line, only an error on stderr, and sstat still exits 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubelet_py.adapters.slurm import (
    CommandResult,
    SlurmClient,
    SlurmError,
    SlurmSettings,
    SlurmUnavailable,
    parse_bytes,
    parse_cpu_time,
    parse_usage,
    tres_usage,
)
from tests.unit.fakes import FakeRunner, failed, ok

SSTAT_OUTPUT = """\
41.extern|cpu=00:00:00,energy=0,fs/disk=2012,mem=0,pages=0,vmem=0|3001
41.batch|cpu=00:01:05,energy=0,fs/disk=51234,mem=52428800,pages=0,vmem=309288960|3010,3011,3012
41.0|cpu=01:00:02,energy=0,fs/disk=0,mem=1048576,pages=0,vmem=0|3020
42.batch|cpu=00:00:07,energy=0,fs/disk=0,mem=2097152,pages=0,vmem=0|4010
43.batch|energy=0,fs/disk=0,pages=0,vmem=0|
"""


def test_usage_asks_sstat_once_for_every_job_and_sums_their_steps() -> None:
    runner = FakeRunner(ok(SSTAT_OUTPUT))
    found = SlurmClient(runner).usage(["41", "42", "43", "44"])
    assert runner.calls == [
        [
            "sstat",
            "-a",
            "-n",
            "-P",
            "--noconvert",
            "-j",
            "41,42,43,44",
            "-o",
            "JobID,TRESUsageInTot,Pids",
        ]
    ], "one call for all jobs, every running step of each (-a), bytes unconverted"
    assert set(found) == {"41", "42", "43"}, "a job without a running step is missing"
    job = found["41"]
    assert [step.step_id for step in job.steps] == ["41.extern", "41.batch", "41.0"]
    assert job.cpu_seconds == 65 + 3602, "the batch step and the srun step, in core-seconds"
    assert job.memory_bytes == 52428800 + 1048576
    assert job.pids == (3001, 3010, 3011, 3012, 3020)
    assert found["42"].cpu_seconds == 7
    assert found["42"].memory_bytes == 2097152
    # Slurm without accounting (jobacct_gather/none) lists the step without figures.
    assert found["43"].cpu_seconds is None
    assert found["43"].memory_bytes is None
    assert found["43"].pids == ()


def test_usage_of_no_job_asks_nothing() -> None:
    runner = FakeRunner()
    assert SlurmClient(runner).usage([]) == {}
    assert runner.calls == []
    with pytest.raises(ValueError, match="not Slurm job IDs"):
        SlurmClient(runner).usage(["12;rm"])


def test_usage_failures_are_typed() -> None:
    down = "sstat: error: couldn't get steps for job 41\nUnable to contact slurm controller"
    with pytest.raises(SlurmUnavailable):
        SlurmClient(FakeRunner(CommandResult(0, "", down))).usage(["41"])
    with pytest.raises(SlurmError, match="sstat"):
        SlurmClient(FakeRunner(failed("sstat: fatal: Invalid field requested"))).usage(["41"])
    # An error about one job is no failure of the others: the answer holds what was printed.
    partial = CommandResult(0, "42.batch|cpu=00:00:07,mem=10|1\n", "couldn't get steps for job 41")
    assert set(SlurmClient(FakeRunner(partial)).usage(["41", "42"])) == {"42"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:00:00", 0.0),
        ("00:05", 5.0),
        ("05:07.250", 307.25),
        ("00:05:07", 307.0),
        ("01:02:03", 3723.0),
        ("2-01:02:03", 2 * 86400 + 3723.0),
        ("", None),
        ("2-01:02", None),
        ("INVALID", None),
    ],
)
def test_cpu_times_as_sstat_prints_them(text: str, seconds: float | None) -> None:
    assert parse_cpu_time(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1101824", 1101824),
        ("1076K", 1076 * 1024),
        ("1.50M", 1572864),
        ("2G", 2 << 30),
        ("x", None),
    ],
)
def test_sizes_with_and_without_slurms_units(text: str, size: int | None) -> None:
    assert parse_bytes(text) == size


def test_tres_strings_and_unreadable_lines() -> None:
    assert tres_usage("cpu=00:00:05,fs/disk=2012,mem=") == {"cpu": "00:00:05", "fs/disk": "2012"}
    assert parse_usage("garbage\n41|cpu=00:00:01|1\n") == {}, "lines that are no step"


def test_every_command_is_observed_with_its_outcome() -> None:
    observed: list[tuple[str, float, str]] = []

    class Unreachable:
        def run(self, argv: object, *, timeout: float, env: object = None) -> CommandResult:
            raise SlurmUnavailable("squeue did not answer within 60 s")

    settings = SlurmSettings(squeue="/opt/slurm/bin/squeue")
    client = SlurmClient(
        FakeRunner(ok("1\n"), failed("sbatch: error: Batch job submission failed")),
        settings=settings,
        observer=lambda *call: observed.append(call),
    )
    assert client.submit(Path("/p/job.sh"), []) == "1"
    with pytest.raises(SlurmError):
        client.submit(Path("/p/job.sh"), [])
    with pytest.raises(SlurmUnavailable):
        SlurmClient(Unreachable(), settings=settings, observer=lambda *c: observed.append(c)).queue(
            ["7"]
        )
    assert [(command, outcome) for command, _, outcome in observed] == [
        ("sbatch", "ok"),
        ("sbatch", "error"),
        ("squeue", "unavailable"),
    ], "named by the program, whatever its path"
    assert all(seconds >= 0 for _, seconds, _ in observed)
