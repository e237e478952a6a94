"""Lifecycle hooks in the launcher, with real processes: a postStart hook runs beside the
container and holds back its `started` marker and its probes, a failing one stops the run and
leaves it to the restart policy, a preStop hook runs before the container gets TERM and is
bounded by the grace period. No Slurm and no Apptainer: a small stand-in for `apptainer`
runs what comes after the image, so an exec hook runs on the host as the container does."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kubelet_py.job.hooks import EXEC, HTTP_GET, SLEEP, Hook, Hooks, run_hook
from kubelet_py.job.launch import Clock, launch
from kubelet_py.job.podfolder import ContainerFolder, parse_time
from kubelet_py.job.probes import TCP_SOCKET, Probe, Probes

# A container's loop that says nothing when TERM to its process group ends a `sleep` in it
# (dash reports "Terminated" for such a command).
WAIT_FOREVER = "while :; do sleep 0.02; done 2>/dev/null"

# What `apptainer exec ... SIF WORDS...` does here: run WORDS.
FAKE_APPTAINER = """#!/bin/sh
while [ "$#" -gt 0 ] && [ "${1%.sif}" = "$1" ]; do shift; done
shift
exec "$@"
"""


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


class Pod:
    """A container folder, an image file and an `apptainer` that runs on the host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "containers" / "main"
        self.image = root / "image.sif"
        self.image.write_bytes(b"")
        self.apptainer = root / "apptainer"
        self.apptainer.write_text(FAKE_APPTAINER)
        self.apptainer.chmod(0o755)

    def command(self, script: str) -> list[str]:
        """The container's command line, as the job script gives it to the launcher."""
        apptainer = [str(self.apptainer), "--quiet", "exec", "--cleanenv", str(self.image)]
        return [*apptainer, "sh", "-c", script]

    def hooks_file(self, hooks: dict[str, Any]) -> Path:
        path = self.root / "hooks.json"
        path.write_text(json.dumps(hooks))
        return path

    def start(self, script: str, *options: str) -> subprocess.Popen[bytes]:
        """The launcher as the job script starts it, in a process of its own."""
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "kubelet_py.job.launch", "--image", str(self.image)),
                *options,
                str(self.folder),
                "--",
                *self.command(script),
            ]
        )

    def log(self) -> list[str]:
        path = self.folder / "log"
        text = path.read_text() if path.exists() else ""
        return [line.split(" ", 2)[2] for line in text.splitlines()]

    def wait_for(self, what: str, found: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not found():
            assert time.monotonic() < deadline, f"{what} did not happen"
            time.sleep(0.02)


class FakeClock:
    """Time that moves only when the launcher waits between runs: back-offs cost no time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now, sleep=self.sleep)


@pytest.fixture
def the_pod(tmp_path: Path) -> Pod:
    return Pod(tmp_path)


def shell(script: str) -> dict[str, Any]:
    return {"kind": EXEC, "command": ["sh", "-c", script]}


# -- postStart ------------------------------------------------------------------------------


def test_post_start_runs_beside_the_command_and_holds_back_started_and_probes(
    the_pod: Pod,
) -> None:
    root = the_pod.root
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probes = root / "probes.json"
    readiness = {"kind": TCP_SOCKET, "port": port, "periodSeconds": 0.1}
    probes.write_text(json.dumps({"grace": 5, "readiness": readiness}))
    # The hook needs the container running (it waits for its file), and waits for `go`.
    hooks = the_pod.hooks_file(
        {
            "grace": 5,
            "postStart": shell(
                f"until [ -e {root}/up ]; do sleep 0.02; done; "
                f"until [ -e {root}/go ]; do sleep 0.02; done; echo hooked > {root}/hooked"
            ),
        }
    )
    container = (
        f"touch {root}/up; echo up; until [ -e {root}/hooked ]; do sleep 0.02; done; "
        f"echo saw $(cat {root}/hooked); until [ -e {root}/end ]; do sleep 0.02; done"
    )
    process = the_pod.start(container, "--probes", str(probes), "--hooks", str(hooks))
    try:
        folder = the_pod.folder
        the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
        # The hook waits for `go`: the run has not started, so nothing is probed yet.
        assert not (folder / "started").exists()
        assert not (folder / "startup").exists() and not (folder / "ready").exists()
        (root / "go").touch()
        the_pod.wait_for("the started marker", (folder / "started").exists)
        the_pod.wait_for("the readiness probe", (folder / "ready").exists)
        # `started` says when the command started: before the hook could end.
        started = parse_time((folder / "started").read_text())
        assert started is not None
        assert started.timestamp() <= (root / "go").stat().st_mtime
        (root / "end").touch()
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
        listener.close()
    assert the_pod.log() == ["up", "saw hooked"]
    assert not (folder / "poststart-failed").exists()


def test_a_failing_post_start_stops_the_run_and_never_counts_it_started(the_pod: Pod) -> None:
    hooks = Hooks(post_start=Hook.from_json(shell("echo not ready; exit 3")), grace=5)
    began = time.monotonic()
    code = launch(
        the_pod.folder,
        the_pod.command("echo up; exec sleep 30"),
        image=the_pod.image,
        hooks=hooks,
    )
    assert code == 143  # TERM from the launcher ended sleep
    assert time.monotonic() - began < 10
    folder = ContainerFolder(the_pod.folder)
    failure = folder.read_hook_failure("postStart")
    assert failure is not None
    assert failure.summary == 'exec ["sh", "-c", "echo not ready; exit 3"] exited with 3'
    assert failure.output == "not ready"
    assert the_pod.log()[-1] == (
        f"hpk: PostStartHook failed: {failure.summary}; stopping the container"
    )
    # The run did start its command: `started` is written, before `exit`.
    started, ended = folder.read_started(), folder.read_exit()
    assert started is not None and ended is not None and ended.at is not None
    assert started <= ended.at


def test_after_a_failed_post_start_the_restart_policy_decides(the_pod: Pod) -> None:
    root = the_pod.root
    # Fails on the first run, passes on the second; the second run's container then ends 0.
    hook = shell(
        f'n=$(cat {root}/runs 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > {root}/runs; '
        f'[ "$n" -ge 2 ] && touch {root}/hooked'
    )
    clock = FakeClock()
    code = launch(
        the_pod.folder,
        the_pod.command(f"echo run; until [ -e {root}/hooked ]; do sleep 0.02; done"),
        image=the_pod.image,
        restart="OnFailure",
        hooks=Hooks(post_start=Hook.from_json(hook), grace=5),
        clock=clock.clock(),
    )
    assert code == 0
    assert clock.slept == pytest.approx(10)  # Kubernetes' first back-off
    folder = the_pod.folder
    assert (folder / "restarts").read_text() == "1\n"
    assert (folder / "last").read_text().startswith("143 ")
    previous = (folder / "log.previous").read_text()
    assert "hpk: PostStartHook failed: " in previous and "exited with 1" in previous
    # The second run's hook passed: the first run's failure is gone with it.
    assert not (folder / "poststart-failed").exists()
    assert (folder / "started").exists() and (folder / "exit").read_text().startswith("0 ")


def test_a_failed_post_start_runs_the_pre_stop_hook_before_term(the_pod: Pod) -> None:
    root = the_pod.root
    # The hook fails once the container has set its trap.
    hooks = Hooks(
        post_start=Hook.from_json(shell(f"until [ -e {root}/up ]; do sleep 0.02; done; exit 1")),
        pre_stop=Hook.from_json(shell(f"echo stopping > {root}/pre-stop")),
        grace=5,
    )
    code = launch(
        the_pod.folder,
        the_pod.command(
            f"trap 'cat {root}/pre-stop; exit 0' TERM; echo up; touch {root}/up; {WAIT_FOREVER}"
        ),
        image=the_pod.image,
        hooks=hooks,
    )
    assert code == 0  # the container's own code: TERM came, and the hook's file was there
    log = the_pod.log()
    assert log[-1] == "stopping", log
    assert sorted(log[:-1]) == [
        'hpk: PostStartHook failed: exec ["sh", "-c", '
        f'"until [ -e {root}/up ]; do sleep 0.02; done; exit 1"] exited with 1; '
        "stopping the container",
        "up",
    ]


class _Answers(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        _Answers.seen.append((self.path, self.headers.get("X-Hook")))
        self.send_response(204 if self.path == "/started" else 500)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_an_http_post_start_passes_on_2xx_with_its_headers(the_pod: Pod, http_port: int) -> None:
    hook = {
        "kind": HTTP_GET,
        "port": http_port,
        "path": "/started",
        "headers": [["X-Hook", "postStart"]],
    }
    code = launch(
        the_pod.folder,
        the_pod.command("echo up"),
        image=the_pod.image,
        hooks=Hooks(post_start=Hook.from_json(hook)),
    )
    assert code == 0
    assert ("/started", "postStart") in _Answers.seen
    assert not (the_pod.folder / "poststart-failed").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("path", "port", "ending"),
    [("/broken", None, "answered 500"), ("/", "closed", "failed: [Errno 111] Connection refused")],
)
def test_an_http_post_start_fails_on_5xx_and_on_a_closed_port(
    the_pod: Pod, http_port: int, path: str, port: str | None, ending: str
) -> None:
    number = free_port() if port == "closed" else http_port
    hook = Hook(kind=HTTP_GET, port=number, path=path)
    code = launch(
        the_pod.folder,
        the_pod.command("exec sleep 30"),
        image=the_pod.image,
        hooks=Hooks(post_start=hook, grace=5),
    )
    assert code == 143
    failure = ContainerFolder(the_pod.folder).read_hook_failure("postStart")
    assert failure is not None
    assert failure.summary == f"httpGet http://127.0.0.1:{number}{path} {ending}"


# -- preStop --------------------------------------------------------------------------------


def test_pre_stop_runs_before_term_reaches_the_container(the_pod: Pod) -> None:
    root = the_pod.root
    hooks = the_pod.hooks_file(
        {"grace": 10, "preStop": shell(f"sleep 0.5; echo drained > {root}/pre-stop")}
    )
    process = the_pod.start(
        f"trap 'echo TERM after $(cat {root}/pre-stop 2>/dev/null || echo nothing); exit 0' "
        "TERM; echo up; while :; do sleep 0.02; done",
        "--hooks",
        str(hooks),
    )
    the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert the_pod.log() == ["up", "TERM after drained"]


def test_a_hanging_pre_stop_is_cut_short_by_the_grace_period(the_pod: Pod) -> None:
    hooks = the_pod.hooks_file({"grace": 30, "preStop": shell("exec sleep 60")})
    process = the_pod.start(
        "trap 'echo TERM; exit 0' TERM; echo up; while :; do sleep 0.02; done",
        *("--grace", "1", "--hooks", str(hooks)),
    )
    the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    took = time.monotonic() - sent
    assert 0.9 < took < 5, took
    assert the_pod.log() == [
        "up",
        "hpk: PreStopHook did not end within 1 s; stopping the container",
        "TERM",
    ]


def test_kill_comes_at_least_two_seconds_after_a_pre_stop_used_the_grace_period(
    the_pod: Pod,
) -> None:
    hooks = the_pod.hooks_file({"grace": 30, "preStop": shell("exec sleep 60")})
    process = the_pod.start(
        "trap '' TERM; echo up; while :; do sleep 0.02; done",
        *("--grace", "1", "--hooks", str(hooks)),
    )
    the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 137
    took = time.monotonic() - sent
    # The hook takes the grace period (1 s), TERM is ignored, KILL 2 s after it.
    assert 2.9 < took < 8, took
    assert (the_pod.folder / "exit").read_text().startswith("137 ")


def test_a_sleep_pre_stop_waits_its_seconds_then_term(the_pod: Pod) -> None:
    hooks = the_pod.hooks_file({"grace": 10, "preStop": {"kind": SLEEP, "seconds": 1}})
    process = the_pod.start("echo up; exec sleep 30", "--hooks", str(hooks))
    the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 143
    assert 1.0 <= time.monotonic() - sent < 5


def test_a_failing_pre_stop_is_recorded_and_the_stop_goes_on(the_pod: Pod) -> None:
    hooks = the_pod.hooks_file({"grace": 10, "preStop": shell("echo no drain >&2; exit 2")})
    process = the_pod.start("echo up; exec sleep 30", "--hooks", str(hooks))
    the_pod.wait_for("the container's start", lambda: "up" in the_pod.log())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 143
    failure = ContainerFolder(the_pod.folder).read_hook_failure("preStop")
    assert failure is not None
    assert failure.summary.endswith("exited with 2") and failure.output == "no drain"
    assert the_pod.log()[-1].startswith("hpk: PreStopHook failed: ")


def test_a_container_that_ends_by_itself_runs_no_pre_stop(the_pod: Pod) -> None:
    root = the_pod.root
    hooks = Hooks(pre_stop=Hook.from_json(shell(f"touch {root}/pre-stop")), grace=5)
    code = launch(the_pod.folder, the_pod.command("exit 4"), image=the_pod.image, hooks=hooks)
    assert code == 4
    assert not (root / "pre-stop").exists()  # the run is over: no hook runs any more


def test_a_liveness_failure_runs_the_pre_stop_hook_then_term(the_pod: Pod) -> None:
    root = the_pod.root
    probe = Probe(kind=TCP_SOCKET, port=free_port(), period=0.1, failure_threshold=2)
    # The hook ends once the container has set its trap, so TERM finds the trap.
    hooks = Hooks(
        pre_stop=Hook.from_json(
            shell(f"until [ -e {root}/up ]; do sleep 0.02; done; echo drained > {root}/pre-stop")
        ),
        grace=5,
    )
    code = launch(
        the_pod.folder,
        the_pod.command(
            f"trap 'cat {root}/pre-stop; exit 0' TERM; echo up; touch {root}/up; {WAIT_FOREVER}"
        ),
        image=the_pod.image,
        probes=Probes(liveness=probe, grace=5),
        hooks=hooks,
    )
    assert code == 0
    assert the_pod.log() == [
        "up",
        "drained",
        "hpk: Liveness probe failed 2 times; stopping the container",
    ]


# -- the handlers on their own --------------------------------------------------------------


def test_an_exec_hook_without_an_image_fails_with_a_reason() -> None:
    outcome = run_hook(
        Hook.from_json(shell("true")), exec_prefix=[], timeout=None, stop=threading.Event()
    )
    assert not outcome.ok and "no image" in outcome.summary


def test_a_sleep_hook_is_cut_short_by_its_timeout() -> None:
    began = time.monotonic()
    outcome = run_hook(
        Hook(kind=SLEEP, seconds=30), exec_prefix=[], timeout=0.2, stop=threading.Event()
    )
    assert outcome.timed_out and not outcome.ok
    assert time.monotonic() - began < 5


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie waiting for its parent counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_an_exec_hook_is_killed_with_its_children_when_stopped(tmp_path: Path) -> None:
    stop = threading.Event()
    pid_file = tmp_path / "pid"
    hook = Hook.from_json(shell(f"sleep 60 & echo $! > {pid_file}; wait"))
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    outcome = run_hook(hook, exec_prefix=["env"], timeout=None, stop=stop)
    assert outcome.summary.endswith("stopped") and not outcome.ok
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not gone(child):  # KILL reached the hook's whole process group
        assert time.monotonic() < deadline, "the hook's child outlived it"
        time.sleep(0.02)
