"""The in-job launcher: markers, stamped log lines, exit codes and signals, with real processes
(no Slurm, no Apptainer)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from kubelet_py.job.clock import rfc3339
from kubelet_py.job.launch import LONGEST_LINE, Backoff, Clock, exit_code, launch, restarts

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"


def entries(folder: Path) -> list[tuple[str, str, str]]:
    """The log as (time, stream, line), checking every entry's shape."""
    found = []
    for raw in (folder / "log").read_bytes().split(b"\n")[:-1]:
        stamp, stream, line = raw.decode().split(" ", 2)
        assert re.fullmatch(STAMP, stamp), stamp
        found.append((stamp, stream, line))
    return found


def marker(folder: Path, name: str) -> str:
    return (folder / name).read_text()


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp[:26] + "+00:00")  # microseconds are enough to order


def test_rfc3339_has_nine_digits_and_utc() -> None:
    assert rfc3339(1_700_000_000_000_000_001) == "2023-11-14T22:13:20.000000001Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000000000Z"


@pytest.mark.parametrize(("returncode", "code"), [(0, 0), (3, 3), (-15, 143), (-9, 137)])
def test_exit_codes_as_a_shell_reports_them(returncode: int, code: int) -> None:
    assert exit_code(returncode) == code


def test_lines_are_stamped_by_stream_and_markers_written(tmp_path: Path) -> None:
    folder = tmp_path / "containers" / "main"
    script = "echo out1; echo err1 >&2; sleep 0.2; echo out2; printf 'no newline'; exit 3"
    code = launch(folder, ["sh", "-c", script])
    assert code == 3
    lines = entries(folder)
    assert [(stream, line) for _, stream, line in lines] == [
        ("stdout", "out1"),
        ("stderr", "err1"),
        ("stdout", "out2"),
        ("stdout", "no newline"),
    ]
    started = marker(folder, "started")
    assert re.fullmatch(f"{STAMP}\n", started)
    exit_text = marker(folder, "exit")
    assert re.fullmatch(rf"3 {STAMP}\n", exit_text)
    times = [parse(started), *(parse(stamp) for stamp, _, _ in lines), parse(exit_text[2:])]
    assert times == sorted(times)
    assert (folder / "log").stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in folder.iterdir()) == ["exit", "log", "started"]


def test_bytes_pass_unchanged(tmp_path: Path) -> None:
    data = "tab\there ü \x1b[1mbold\x1b[0m \\ 'q' \"d\"\r"
    launch(tmp_path, [sys.executable, "-c", f"import sys; sys.stdout.write({data!r} + '\\n')"])
    assert entries(tmp_path)[0][1:] == ("stdout", data)


def test_a_long_line_is_logged_in_pieces(tmp_path: Path) -> None:
    size = LONGEST_LINE + 10
    launch(tmp_path, [sys.executable, "-c", f"print('x' * {size})"])
    assert [len(line) for _, _, line in entries(tmp_path)] == [LONGEST_LINE, 10]


def test_a_second_run_appends_to_the_log(tmp_path: Path) -> None:
    launch(tmp_path, ["echo", "one"])
    launch(tmp_path, ["echo", "two"])
    assert [line for _, _, line in entries(tmp_path)] == ["one", "two"]


def test_unreadable_image_means_125(tmp_path: Path) -> None:
    code = launch(tmp_path, ["echo", "never"], image=tmp_path / "missing.sif")
    assert code == 125
    assert marker(tmp_path, "exit").startswith("125 ")
    [(_, stream, line)] = entries(tmp_path)
    assert stream == "stderr" and "cannot read the image file" in line


def test_a_command_that_cannot_start_means_125(tmp_path: Path) -> None:
    assert launch(tmp_path, [str(tmp_path / "no-such-program")]) == 125
    assert "cannot start" in entries(tmp_path)[0][2]


def run_launcher(folder: Path, script: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "kubelet_py.job.launch", str(folder), "--", "sh", "-c", script]
    )
    deadline = time.monotonic() + 10
    while not (folder / "log").exists() or b"up" not in (folder / "log").read_bytes():
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.02)
    return process


def test_term_is_passed_on_and_the_real_code_recorded(tmp_path: Path) -> None:
    process = run_launcher(
        tmp_path, "trap 'echo bye; exit 7' TERM; echo up; while :; do sleep 0.05; done"
    )
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 7
    assert marker(tmp_path, "exit").startswith("7 ")
    assert [line for _, _, line in entries(tmp_path)] == ["up", "bye"]


def test_a_container_killed_by_term_exits_143(tmp_path: Path) -> None:
    process = run_launcher(tmp_path, "echo up; exec sleep 30")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 143
    assert marker(tmp_path, "exit").startswith("143 ")


def test_usage_errors() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubelet_py.job.launch", "dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "usage" in result.stderr


# ---------------------------------------------------------------------------------------------
# Restarts (restartPolicy OnFailure and Always, native sidecars)


class FakeClock:
    """Time that moves only when the launcher waits, so back-offs cost no real time."""

    def __init__(self, *, stop_after: float | None = None) -> None:
        self.now = 0.0
        self.slept = 0.0
        self.stop_after = stop_after
        """Send this process TERM once this many seconds were slept (ends a restart loop)."""

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if self.stop_after is not None and self.slept >= self.stop_after:
            self.stop_after = None
            os.kill(os.getpid(), signal.SIGTERM)

    def clock(self) -> Clock:
        return Clock(monotonic=self.monotonic, sleep=self.sleep)


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """launch() takes over TERM, INT and HUP; give them back after each test."""
    saved = {
        signum: signal.getsignal(signum)
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
    }
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def lines(path: Path) -> list[str]:
    return [raw.split(" ", 2)[2] for raw in path.read_text().splitlines()]


# Fails (exit 1) until it has run `runs` times, counting its runs in a file next to it.
def failing_until(folder: Path, runs: int) -> list[str]:
    counter = folder.parent / "runs"
    script = (
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" >"{counter}"; '
        f'echo "run $n"; [ "$n" -ge {runs} ] || exit 1'
    )
    return ["sh", "-c", script]


def test_backoff_is_kubernetes_own() -> None:
    backoff = Backoff()
    assert [backoff.delay(ran=1) for _ in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff.delay(ran=600) == 10  # ten minutes of running start it again
    assert backoff.delay(ran=599) == 20


@pytest.mark.parametrize(
    ("policy", "code", "again"),
    [("Never", 1, False), ("OnFailure", 0, False), ("OnFailure", 2, True), ("Always", 0, True)],
)
def test_which_ends_restart(policy: str, code: int, again: bool) -> None:
    assert restarts(policy, code) is again


def test_on_failure_restarts_until_success_and_keeps_the_previous_run(tmp_path: Path) -> None:
    folder = tmp_path / "containers" / "main"
    fake = FakeClock()
    code = launch(folder, failing_until(folder, 4), restart="OnFailure", clock=fake.clock())
    assert code == 0
    assert fake.slept == pytest.approx(10 + 20 + 40)
    assert marker(folder, "restarts") == "3\n"
    last_code, last_started, last_finished = marker(folder, "last").split()
    assert last_code == "1" and re.fullmatch(STAMP, last_started)
    assert parse(last_started) <= parse(last_finished) <= parse(marker(folder, "started"))
    assert marker(folder, "exit").startswith("0 ")
    assert lines(folder / "log") == ["run 4"]
    assert lines(folder / "log.previous") == ["run 3"]
    assert not (folder / "backoff").exists()


def test_never_runs_once(tmp_path: Path) -> None:
    folder = tmp_path / "main"
    fake = FakeClock()
    assert launch(folder, failing_until(folder, 2), clock=fake.clock()) == 1
    assert fake.slept == 0
    assert sorted(path.name for path in folder.iterdir()) == ["exit", "log", "started"]


def test_always_restarts_a_container_that_succeeds_until_a_signal(tmp_path: Path) -> None:
    folder = tmp_path / "main"
    fake = FakeClock(stop_after=25)  # TERM during the second back-off (10 s, then 20 s)
    code = launch(folder, ["echo", "done"], restart="Always", clock=fake.clock())
    assert code == 0
    assert marker(folder, "restarts") == "1\n"
    assert marker(folder, "last").startswith("0 ")
    assert marker(folder, "exit").startswith("0 ")
    assert not (folder / "backoff").exists()  # the wait was cut short: no more restarts


def test_the_backoff_marker_says_how_long_and_until_when(tmp_path: Path) -> None:
    folder = tmp_path / "main"
    seen: list[str] = []

    def sleep(seconds: float) -> None:
        seen.append(marker(folder, "backoff"))
        os.kill(os.getpid(), signal.SIGTERM)

    before = time.time()
    code = launch(folder, ["sh", "-c", "exit 3"], restart="OnFailure", clock=Clock(sleep=sleep))
    assert code == 3
    delay, until = seen[0].split()
    assert delay == "10"
    assert before + 9 < parse(until).timestamp() < time.time() + 11
    assert marker(folder, "exit").startswith("3 ")
    assert not (folder / "restarts").exists()


def test_grace_then_kill_for_a_container_that_ignores_term(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "kubelet_py.job.launch", "--restart", "Always", "--grace", "1"),
            str(tmp_path),
            "--",
            *("sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.05; done"),
        ]
    )
    deadline = time.monotonic() + 10
    while not (tmp_path / "log").exists() or b"up" not in (tmp_path / "log").read_bytes():
        assert time.monotonic() < deadline, "the container did not start"
        time.sleep(0.02)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 137
    assert 0.9 < time.monotonic() - sent < 5
    assert marker(tmp_path, "exit").startswith("137 ")
    assert not (tmp_path / "restarts").exists()  # stopped, not restarted


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="restart policy 'Sometimes'"):
        launch(tmp_path, ["true"], restart="Sometimes")


def test_the_log_and_markers_are_never_written_through_links(tmp_path: Path) -> None:
    folder = tmp_path / "main"
    folder.mkdir()
    key = tmp_path / "ca.key"
    key.write_text("PRIVATE KEY\n")
    (folder / "log").symlink_to(key)
    (folder / "started").symlink_to(key)
    (folder / "exit").symlink_to(key)
    assert launch(folder, ["echo", "hello"]) == 0
    assert key.read_text() == "PRIVATE KEY\n"
    assert not any((folder / name).is_symlink() for name in ("log", "started", "exit"))
    assert [line for _, _, line in entries(folder)] == ["hello"]
    assert marker(folder, "exit").startswith("0 ")
