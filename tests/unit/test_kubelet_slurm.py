"""The kubelet's Slurm adapter against a fake command runner.

The squeue and sacct outputs below were printed by Slurm 22.05.8 on the local test bed (job IDs
and times are real; the listed jobs' folders are made up to hold the delimiter); the adapter
must read them as a user would: states, reasons, exit codes, nodes, names and folders.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubelet_py.adapters.slurm import (
    AccountingDisabled,
    ExitStatus,
    ListedJob,
    SlurmClient,
    SlurmError,
    SlurmSettings,
    SlurmUnavailable,
    SubmissionFailed,
    first_node,
    gpus_in_gres,
    parse_accounting,
    parse_listed,
    parse_queue,
)
from tests.unit.fakes import FakeRunner, failed, ok

SQUEUE_OUTPUT = """\
16|16|CANCELLED|None|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:11|15|0
13|13|COMPLETED|None|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07|0|0
19_0|21|COMPLETED|None|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07|0|0
19_2|19|COMPLETED|None|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07|0|0
14|14|FAILED|NonZeroExitCode|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07|768|0
15|15|OUT_OF_MEMORY|OutOfMemory|n1|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:08|253|0
24|24|TIMEOUT|TimeLimit|n1|n1|batch|2026-11-24T10:08:27|2026-11-24T10:09:46|15|0
27|27|PENDING|Resources||n/a|batch|N/A|N/A|0|0
28|28|PENDING|Priority||n/a|batch|N/A|N/A|0|0
17|17|PENDING|JobHeldUser||n/a|batch|N/A|N/A|0|0
20|20|PENDING|BeginTime||n/a|batch|2026-11-24T10:05:58|NONE|0|1
26|26|RUNNING|None|n[1-3]|n1|batch|2026-11-24T10:10:38|NONE|0|0
25|25|RUNNING|None|n4|n4|gpu|2026-11-24T10:08:21|NONE|0|0
29|29|CANCELLED|Priority||n/a|batch|2026-11-24T10:10:39|2026-11-24T10:10:39|0|0
"""

SACCT_OUTPUT = """\
13|13|COMPLETED|0:0|None|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07
14|14|FAILED|3:0|None|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07
15|15|OUT_OF_MEMORY|0:125|None|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:08
16|16|CANCELLED by 0|0:0|None|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:11
17|17|PENDING|0:0|JobHeldUser|None assigned|batch|Unknown|Unknown
19_0|21|COMPLETED|0:0|None|n1|batch|2026-11-24T10:03:07|2026-11-24T10:03:07
20|20|CANCELLED by 0|0:0|BeginTime|n[1-3]|batch|2026-11-24T10:06:16|2026-11-24T10:08:25
24|24|TIMEOUT|0:0|None|n1|batch|2026-11-24T10:08:27|2026-11-24T10:09:46
25|25|RUNNING|0:0|None|n4|gpu|2026-11-24T10:08:21|Unknown
27|27|CANCELLED by 0|0:0|None|None assigned|batch|2026-11-24T10:10:39|2026-11-24T10:10:39
"""

SINFO_OUTPUT = """\
batch|batch*|up|n1|127.0.0.1|16|32768|(null)|mixed
batch|batch*|up|n2|127.0.0.1|16|32768|(null)|idle
batch|batch*|up|n3|127.0.0.1|16|32768|(null)|drained
gpu|gpu|up|n4|127.0.0.1|16|32768|gpu:2|mixed
"""

CONTROLLER_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- squeue -----------------------------------------------------------------------------


def test_queue_asks_squeue_once_for_all_jobs_with_full_width_fields() -> None:
    runner = FakeRunner(ok(SQUEUE_OUTPUT))
    SlurmClient(runner).queue(["13", "14", "15", "13"])
    (argv,) = runner.calls
    assert argv[:6] == ["squeue", "-h", "-t", "all", "-j", "13,14,15"]
    fields = argv[argv.index("-O") + 1].split(",")
    assert fields[0] == "JobArrayID:0|"
    assert fields[-3:] == ["Name:0|", "WorkDir:0|", "Comment:0"], "what tells whose a job is"
    assert fields[-1] == "Comment:0", "the last field has no delimiter after it"
    assert all(field.endswith(":0|") for field in fields[:-1])


def test_queue_reads_states_reasons_nodes_and_exit_codes() -> None:
    entries = parse_queue(SQUEUE_OUTPUT)
    assert entries["14"].state == "FAILED"
    assert entries["14"].reason == "NonZeroExitCode"
    assert entries["14"].exit == ExitStatus(code=3, signal=0)
    assert entries["15"].state == "OUT_OF_MEMORY"
    assert entries["15"].exit == ExitStatus(code=0, signal=125)
    assert entries["16"].exit == ExitStatus(code=0, signal=15)
    assert entries["24"].state == "TIMEOUT"
    assert entries["24"].reason == "TimeLimit"
    assert entries["13"].reason is None
    assert entries["13"].end_time == at("2026-11-24T10:03:07")


def test_queue_reads_pending_jobs_without_nodes_or_times() -> None:
    entries = parse_queue(SQUEUE_OUTPUT)
    held = entries["17"]
    assert (held.state, held.reason, held.nodes, held.batch_host) == (
        "PENDING",
        "JobHeldUser",
        "",
        None,
    )
    assert held.start_time is None and held.end_time is None
    assert entries["27"].reason == "Resources"
    assert entries["28"].reason == "Priority"


def test_queue_reads_a_requeued_job() -> None:
    requeued = parse_queue(SQUEUE_OUTPUT)["20"]
    assert requeued.state == "PENDING"
    assert requeued.reason == "BeginTime"
    assert requeued.restarts == 1


def test_queue_reads_running_jobs_with_node_lists() -> None:
    entries = parse_queue(SQUEUE_OUTPUT)
    assert entries["26"].nodes == "n[1-3]"
    assert entries["26"].batch_host == "n1"
    assert entries["26"].start_time == at("2026-11-24T10:10:38")
    assert entries["26"].end_time is None
    assert entries["25"].partition == "gpu"
    assert entries["25"].batch_host == "n4"


def test_queue_keys_array_tasks_by_their_task_id() -> None:
    entries = parse_queue(SQUEUE_OUTPUT)
    assert entries["19_0"].raw_id == "21"
    assert entries["19_2"].raw_id == "19"
    assert "19" not in entries


def test_queue_of_a_single_unknown_job_is_empty_rather_than_an_error() -> None:
    # squeue -j with one unknown ID fails; with two or more it just leaves them out.
    runner = FakeRunner(failed("slurm_load_jobs error: Invalid job id specified\n"))
    assert SlurmClient(runner).queue(["99999"]) == {}


def test_queue_of_several_unknown_jobs_is_empty() -> None:
    runner = FakeRunner(ok(""))
    assert SlurmClient(runner).queue(["99998", "99999"]) == {}


def test_queue_raises_slurm_unavailable_when_the_controller_is_down() -> None:
    runner = FakeRunner(failed(CONTROLLER_DOWN))
    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        SlurmClient(runner).queue(["13", "14"])


def test_queue_of_no_jobs_runs_nothing() -> None:
    runner = FakeRunner()
    assert SlurmClient(runner).queue([]) == {}
    assert runner.calls == []


@pytest.mark.parametrize("bad", ["abc", "0", "12,13", "13 ", "-1", "13_"])
def test_malformed_job_ids_are_refused_before_slurm_sees_them(bad: str) -> None:
    runner = FakeRunner()
    with pytest.raises(ValueError, match="not Slurm job IDs"):
        SlurmClient(runner).queue(["13", bad])
    assert runner.calls == []


def test_unreadable_squeue_lines_are_skipped() -> None:
    entries = parse_queue("garbage\n" + SQUEUE_OUTPUT.splitlines()[1] + "\n\n")
    assert list(entries) == ["13"]


LISTED_OUTPUT = """\
17|PENDING|hpk/default/held|/home/alice/.hpk/pods/default/held|hpk-uid=abc
24|TIMEOUT|hpk/default/slow|/home/alice/.hpk/pods/default/slow|hpk-uid=timeout
25|RUNNING|hpk/lab/gpu|/home/alice/.hpk/pods/lab/gpu|hpk-uid=0b6c
13|COMPLETED|sbatch|/home/alice/a|b|(null)
20|PENDING|other|/home/alice/with space|pipe|with space|pipe
"""


def test_listed_jobs_lists_only_own_jobs_and_filters_by_comment() -> None:
    runner = FakeRunner(ok(LISTED_OUTPUT))
    found = SlurmClient(runner).listed_jobs("hpk-uid=")
    assert sorted(found) == ["17", "24", "25"]
    assert found["25"] == ListedJob(
        job_id="25",
        state="RUNNING",
        name="hpk/lab/gpu",
        work_dir="/home/alice/.hpk/pods/lab/gpu",
        comment="hpk-uid=0b6c",
    )
    (argv,) = runner.calls
    assert "--me" in argv and "-j" not in argv and argv[argv.index("-t") + 1] == "all"


def test_listed_jobs_reads_a_folder_holding_the_delimiter() -> None:
    by_id = {job.job_id: job for job in parse_listed(LISTED_OUTPUT)}
    assert by_id["13"].work_dir == "/home/alice/a|b"
    assert by_id["13"].comment is None
    assert by_id["20"].work_dir == "/home/alice/with space|pipe|with space"
    assert by_id["20"].comment == "pipe"


# --- sacct ------------------------------------------------------------------------------


def test_accounting_asks_sacct_once_in_parsable_text_for_allocations_only() -> None:
    runner = FakeRunner(ok(SACCT_OUTPUT))
    SlurmClient(runner).accounting(["13", "14"])
    (argv,) = runner.calls
    assert argv[0] == "sacct"
    assert {"-P", "-n", "-X"} <= set(argv)
    assert "--json" not in argv, "sacct's JSON reports exit 3 as 0 in Slurm 22.05"
    assert argv[argv.index("-j") + 1] == "13,14"
    assert argv[argv.index("-o") + 1].split(",")[:4] == ["JobID", "JobIDRaw", "State", "ExitCode"]


def test_accounting_reads_exit_codes_and_cancellations() -> None:
    entries = parse_accounting(SACCT_OUTPUT)
    assert entries["14"].state == "FAILED"
    assert entries["14"].exit == ExitStatus(code=3, signal=0)
    assert entries["15"].state == "OUT_OF_MEMORY"
    assert entries["15"].exit == ExitStatus(code=0, signal=125)
    assert entries["16"].state == "CANCELLED"
    assert entries["16"].cancelled_by == "0"
    assert entries["13"].cancelled_by is None
    assert entries["24"].state == "TIMEOUT"


def test_accounting_reads_nodes_and_times() -> None:
    entries = parse_accounting(SACCT_OUTPUT)
    assert entries["20"].nodes == "n[1-3]"
    assert entries["20"].batch_host == "n1"
    assert entries["20"].reason == "BeginTime"
    assert entries["17"].nodes == "" and entries["17"].batch_host is None
    assert entries["17"].start_time is None and entries["17"].end_time is None
    assert entries["27"].batch_host is None, "a job cancelled while pending had no node"
    assert entries["25"].end_time is None
    assert entries["15"].end_time == at("2026-11-24T10:03:08")
    assert entries["19_0"].raw_id == "21"


def test_accounting_keeps_the_last_record_of_a_job_printed_twice() -> None:
    text = (
        "20|20|REQUEUED|0:0|None|n[1-3]|batch|2026-11-24T10:03:13|2026-11-24T10:03:55\n"
        "20|20|RUNNING|0:0|None|n2|batch|2026-11-24T10:06:16|Unknown\n"
    )
    assert parse_accounting(text)["20"].state == "RUNNING"


def test_accounting_failure_when_slurmdbd_is_down_is_slurm_unavailable() -> None:
    runner = FakeRunner(
        failed(
            "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent "
            "connection to host:127.0.0.1:16998: Connection refused\n"
            "sacct: error: Sending PersistInit msg: Connection refused\n"
            "sacct: error: Problem talking to the database: Connection refused\n"
        )
    )
    with pytest.raises(SlurmUnavailable, match="Problem talking to the database"):
        SlurmClient(runner).accounting(["13"])


def test_accounting_without_slurmdbd_says_so() -> None:
    runner = FakeRunner(failed("Slurm accounting storage is disabled\n"))
    with pytest.raises(AccountingDisabled):
        SlurmClient(runner).accounting(["13"])


# --- sbatch -----------------------------------------------------------------------------


def test_submit_passes_flags_as_argv_and_returns_the_job_id(tmp_path: Path) -> None:
    script = tmp_path / "a dir; with 'quotes'" / "job.sh"
    runner = FakeRunner(ok("42\n"))
    env = {"PATH": "/usr/bin", "SLURM_CONF": "/etc/slurm.conf"}
    job_id = SlurmClient(runner).submit(script, ["--mem=64M", "--comment=hpk-uid=u 1"], env=env)
    assert job_id == "42"
    assert runner.calls == [
        ["sbatch", "--parsable", "--mem=64M", "--comment=hpk-uid=u 1", str(script)]
    ]
    assert runner.envs == [env]


def test_submit_does_not_repeat_parsable_when_the_flags_have_it(tmp_path: Path) -> None:
    runner = FakeRunner(ok("42\n"))
    SlurmClient(runner).submit(tmp_path / "job.sh", ["--parsable", "--no-requeue"])
    assert runner.calls[0].count("--parsable") == 1


def test_submit_reads_the_cluster_suffix_of_a_federated_answer(tmp_path: Path) -> None:
    runner = FakeRunner(ok("42;hpkdev\n"))
    assert SlurmClient(runner).submit(tmp_path / "job.sh", []) == "42"


def test_submit_refused_raises_submission_failed_with_sbatchs_message(tmp_path: Path) -> None:
    runner = FakeRunner(
        failed(
            "sbatch: error: Memory specification can not be satisfied\n"
            "sbatch: error: Batch job submission failed: Requested node configuration is not "
            "available\n"
        )
    )
    with pytest.raises(SubmissionFailed) as caught:
        SlurmClient(runner).submit(tmp_path / "job.sh", ["--mem=100G"])
    assert str(caught.value) == (
        "Memory specification can not be satisfied; Batch job submission failed: "
        "Requested node configuration is not available"
    )


def test_submit_with_the_controller_down_raises_slurm_unavailable(tmp_path: Path) -> None:
    runner = FakeRunner(
        failed(
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller "
            "(connect failure)\n"
        )
    )
    with pytest.raises(SlurmUnavailable, match="Unable to contact slurm controller"):
        SlurmClient(runner).submit(tmp_path / "job.sh", [])


def test_submit_without_a_job_id_in_the_answer_is_final(tmp_path: Path) -> None:
    runner = FakeRunner(ok("\n"))
    with pytest.raises(SubmissionFailed, match="no job ID"):
        SlurmClient(runner).submit(tmp_path / "job.sh", [])


def test_every_command_gets_the_configured_timeout(tmp_path: Path) -> None:
    runner = FakeRunner(ok("42\n"))
    SlurmClient(runner, settings=SlurmSettings(timeout=7.5)).submit(tmp_path / "job.sh", [])
    assert runner.timeouts == [7.5]


# --- scancel ----------------------------------------------------------------------------


def test_cancel_runs_scancel_for_the_job() -> None:
    runner = FakeRunner(ok(""))
    SlurmClient(runner).cancel("42")
    assert runner.calls == [["scancel", "42"]]


def test_cancel_with_a_signal_reaches_the_batch_script() -> None:
    runner = FakeRunner(ok(""))
    SlurmClient(runner).cancel("42", signal="TERM")
    assert runner.calls == [["scancel", "--signal=TERM", "--full", "42"]]


def test_signalling_a_job_slurm_forgot_is_not_an_error() -> None:
    runner = FakeRunner(
        failed("scancel: error: Kill job error on job id 13: Invalid job id specified\n")
    )
    SlurmClient(runner).cancel("13", signal="TERM")


def test_cancel_with_the_controller_down_raises_slurm_unavailable() -> None:
    runner = FakeRunner(
        failed(
            "scancel: error: Kill job error on job id 13: Unable to contact slurm controller "
            "(connect failure)\n",
            rc=8,
        )
    )
    with pytest.raises(SlurmUnavailable):
        SlurmClient(runner).cancel("13")


def test_cancel_refused_for_another_reason_is_a_slurm_error() -> None:
    runner = FakeRunner(
        failed("scancel: error: Kill job error on job id 13: Access/permission denied\n")
    )
    with pytest.raises(SlurmError, match="permission denied") as caught:
        SlurmClient(runner).cancel("13")
    assert not isinstance(caught.value, SlurmUnavailable)


def test_cancel_refuses_a_signal_that_is_not_a_name() -> None:
    with pytest.raises(ValueError, match="not a signal"):
        SlurmClient(FakeRunner()).cancel("13", signal="TERM 14")


# --- sinfo ------------------------------------------------------------------------------


def test_partitions_sum_usable_nodes_and_mark_the_default() -> None:
    runner = FakeRunner(ok(SINFO_OUTPUT))
    batch, gpu = SlurmClient(runner).partitions()
    assert (batch.name, batch.default, batch.available) == ("batch", True, True)
    assert [node.name for node in batch.nodes] == ["n1", "n2", "n3"]
    assert batch.cpus == 32, "the drained node n3 offers nothing"
    assert batch.memory_mb == 65536
    assert batch.gpus == 0
    assert (gpu.name, gpu.default, gpu.gpus, gpu.cpus) == ("gpu", False, 2, 16)
    assert gpu.nodes[0].address == "127.0.0.1"
    (argv,) = runner.calls
    assert argv[:3] == ["sinfo", "-h", "-N"]


def test_partitions_with_the_controller_down_raise_slurm_unavailable() -> None:
    runner = FakeRunner(
        failed("slurm_load_partitions: Unable to contact slurm controller (connect failure)\n")
    )
    with pytest.raises(SlurmUnavailable):
        SlurmClient(runner).partitions()


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("(null)", 0),
        ("gpu:2", 2),
        ("gpu:a100:4(S:0-1)", 4),
        ("gpu:a100:2,gpu:v100:1,mps:100", 3),
        ("mps:100", 0),
    ],
)
def test_gpus_are_counted_from_gres(gres: str, gpus: int) -> None:
    assert gpus_in_gres(gres) == gpus


@pytest.mark.parametrize(
    ("nodes", "first"),
    [
        ("n1", "n1"),
        ("n[1-3]", "n1"),
        ("n[07-09,11]", "n07"),
        ("gpu[3,5],cpu1", "gpu3"),
        ("rack[2-3]-n[4-5]", "rack2-n4"),
        ("", None),
    ],
)
def test_first_node_of_a_host_list(nodes: str, first: str | None) -> None:
    assert first_node(nodes) == first


def test_exit_status_from_wait_status_and_text() -> None:
    assert ExitStatus.from_wait_status(768) == ExitStatus(3, 0)
    assert ExitStatus.from_wait_status(253) == ExitStatus(0, 125)
    assert ExitStatus.parse("0:125") == ExitStatus(0, 125)
    assert ExitStatus.parse("") is None
    assert ExitStatus(0, 15).shell_code == 143
    assert ExitStatus(3, 0).shell_code == 3
    assert str(ExitStatus(3, 0)) == "3:0"
