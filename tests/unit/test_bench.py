"""The benchmark harness's arithmetic and parsing (bench/), without any daemon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import footprint, slurmcalls
from bench.stats import marker_time, per_minute, percentile, rate, summary

SDIAG = """\
Latency for 1000 calls to gettimeofday(): 22 microseconds

Remote Procedure Call statistics by message type
\tREQUEST_PARTITION_INFO                  ( 2009) count:152    ave_time:220    total_time:33536
\tREQUEST_JOB_INFO                        ( 2003) count:150    ave_time:547    total_time:83258
\tREQUEST_SUBMIT_BATCH_JOB                ( 4003) count:25     ave_time:1176   total_time:29416
\tREQUEST_NODE_INFO                       ( 2007) count:8      ave_time:353    total_time:2827

Remote Procedure Call statistics by user
\troot            (       0) count:446    ave_time:445    total_time:198872
"""


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([1, 2, 3, 4, 5], 0.0) == 1
    assert percentile([1, 2, 3, 4, 5], 1.0) == 5
    assert percentile(list(range(101)), 0.99) == pytest.approx(99.0)
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_summary_and_rates() -> None:
    found = summary([0.1, 0.2, 0.3, 0.4, 10.0])
    assert found["count"] == 5
    assert found["p50"] == 0.3
    assert found["max"] == 10.0
    assert found["p99"] == pytest.approx(9.616)
    assert summary([]) == {"count": 0}
    assert rate(500, 4.0) == 125.0
    assert math.isinf(rate(1, 0.0))
    assert per_minute(10, 20.0) == 30.0


def test_marker_time_keeps_the_nanoseconds() -> None:
    first = marker_time("2026-11-24T11:49:13.638987890Z")
    second = marker_time("2026-11-24T11:49:13.638988890Z\n")
    # A float of today's epoch seconds resolves about 0.24 us.
    assert second - first == pytest.approx(1e-6, abs=3e-7)
    assert marker_time("1970-01-01T00:00:01Z") == 1.0
    with pytest.raises(ValueError, match="UTC"):
        marker_time("2026-11-24T11:49:13+01:00")


def test_the_call_log_is_parsed_per_command_with_its_job_ids(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    log.write_text(
        "sinfo\t-h\t-N\t-o\t%R|%P\n"
        "squeue\t-h\t-t\tall\t-j\t1,2,3\t-O\tJobID:0\n"
        "sacct\t-P\t-n\t-X\t-j\t4\n"
        "scancel\t--signal=TERM\t--full\t7\n"
        "squ"  # a torn last line is not a call
    )
    calls = slurmcalls.CallLog(log)
    everything = calls.since(0)
    assert slurmcalls.count_calls(everything) == {
        "sbatch": 0,
        "squeue": 1,
        "sacct": 1,
        "scontrol": 0,
        "sinfo": 1,
        "scancel": 1,
    }
    assert everything[1].job_ids() == ["1", "2", "3"]
    assert everything[2].job_ids() == ["4"]
    assert everything[3].job_ids() == ["7"]
    mark = calls.mark()
    with log.open("a") as stream:
        stream.write("\nsqueue\t-j\t9\n")
    assert [c.command for c in calls.since(mark)] == ["squeue"]


def test_wrappers_log_each_call_and_run_the_real_command(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    for name in slurmcalls.COMMANDS:
        (real / name).write_text(f'#!/bin/sh\necho {name} ran "$@"\n')
        (real / name).chmod(0o755)
    log = tmp_path / "calls.log"
    found = slurmcalls.install_wrappers(tmp_path / "wrap", log, path=str(real))
    assert found["squeue"] == real / "squeue"
    import subprocess  # noqa: PLC0415

    out = subprocess.run(
        [str(tmp_path / "wrap" / "squeue"), "-j", "5,6", "-o", "a b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "squeue ran -j 5,6 -o a b\n"
    (call,) = slurmcalls.parse_calls(log.read_text())
    assert call.argv == ("-j", "5,6", "-o", "a b")


def test_sdiag_counts_by_message_type_and_their_growth() -> None:
    before = slurmcalls.parse_rpc_stats(SDIAG)
    assert before == {
        "REQUEST_PARTITION_INFO": 152,
        "REQUEST_JOB_INFO": 150,
        "REQUEST_SUBMIT_BATCH_JOB": 25,
        "REQUEST_NODE_INFO": 8,
    }
    after = dict(before, REQUEST_JOB_INFO=210, REQUEST_NODE_INFO=3)
    grown = slurmcalls.delta(before, after)
    # A counter that shrank was reset: it counts from zero.
    assert grown == {"REQUEST_JOB_INFO": 60, "REQUEST_NODE_INFO": 3}
    assert slurmcalls.by_command(grown)["squeue"] == 60
    assert slurmcalls.by_command(grown)["sinfo"] == 3


def test_proc_files_give_memory_and_cpu_time() -> None:
    status = "Name:\tpython\nVmHWM:\t  120000 kB\nVmRSS:\t  100000 kB\nThreads:\t12\n"
    assert footprint.parse_status(status) == {"VmHWM": 120000, "VmRSS": 100000, "Threads": 12}
    # The command name may hold spaces and parentheses.
    stat = "42 (py (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 12 0"
    assert footprint.parse_stat(stat, ticks=100) == (3.0, 0.5)
    first = footprint.Sample(at=10.0, rss_kb=1, hwm_kb=1, threads=1, cpu_s=1.0, children_cpu_s=0.0)
    last = footprint.Sample(at=20.0, rss_kb=1, hwm_kb=1, threads=1, cpu_s=2.0, children_cpu_s=1.0)
    assert footprint.cpu_share(first, last) == pytest.approx(0.1)
    assert footprint.cpu_share(first, last, children=True) == pytest.approx(0.2)


def test_the_chart_is_drawn_from_a_small_results_file(tmp_path: Path) -> None:
    from bench.chart import draw  # noqa: PLC0415

    results = {
        "date": "2026-11-24T12:00:00+00:00",
        "mode": "quick",
        "machine": {"cpus": 2, "commit": "abc1234"},
        "throughput": {
            "pods": 30,
            "hpk": {"rate_per_s": 40.0},
            "plain_loop": {"rate_per_s": 100.0},
            "ratio": 0.4,
        },
        "lag": {"pods": 20, "lag_s": {"p50": 0.6, "p95": 1.1, "p99": 1.3}},
        "load": {
            "sizes": [
                {
                    "live_pods": n,
                    "commands_per_minute": {"squeue": 60, "sacct": 0, "scontrol": 0, "sinfo": 1},
                }
                for n in (20, 100)
            ]
        },
        "footprint": {
            "by_size": [
                {
                    "live_pods": 100,
                    "rss_mb": 70.0,
                    "cpu_share": 0.02,
                    "cpu_share_with_slurm_commands": 0.05,
                }
            ]
        },
    }
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results))
    png = draw(source)
    assert png == tmp_path / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
