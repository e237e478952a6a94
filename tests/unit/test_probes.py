"""The probe runner: real HTTP and TCP checks, thresholds on a fake clock, and the launcher."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from kubelet_py.job.handlers import exec_prefix
from kubelet_py.job.probes import EXEC, HTTP_GET, TCP_SOCKET, Probe, Probes, Runner, check


class _Handler(http.server.BaseHTTPRequestHandler):
    seen_headers: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        _Handler.seen_headers = dict(self.headers)
        self.send_response(200 if self.path == "/healthz" else 500)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_get_passes_on_2xx_and_sends_headers(http_port: int) -> None:
    probe = Probe(kind=HTTP_GET, port=http_port, path="/healthz", headers=(("X-Probe", "yes"),))
    assert check(probe)
    assert _Handler.seen_headers.get("X-Probe") == "yes"


def test_http_get_fails_on_5xx_and_on_a_closed_port(http_port: int) -> None:
    assert not check(Probe(kind=HTTP_GET, port=http_port, path="/broken"))
    assert not check(Probe(kind=HTTP_GET, port=free_port(), path="/healthz"))


def test_tcp_socket_passes_only_when_something_listens() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert check(Probe(kind=TCP_SOCKET, port=listener.getsockname()[1]))
    assert not check(Probe(kind=TCP_SOCKET, port=free_port()))


class Results:
    """A fake check: the next results per probe kind, recorded calls."""

    def __init__(self, results: list[bool]) -> None:
        self.results = results
        self.calls = 0

    def __call__(self, probe: Probe) -> bool:
        self.calls += 1
        return self.results.pop(0)


def test_readiness_needs_its_threshold_and_writes_then_removes_the_marker(tmp_path: Path) -> None:
    probe = Probe(kind=TCP_SOCKET, port=1, period=5, success_threshold=2, failure_threshold=2)
    results = Results([True, True, False, False])
    runner = Runner(Probes(readiness=probe), tmp_path, on_failure=lambda p: None, check=results)
    assert (tmp_path / "startup").exists()  # no startup probe: started at once
    assert runner.step(0) == 5
    assert not (tmp_path / "ready").exists()
    runner.step(4)  # not due yet
    assert results.calls == 1
    runner.step(5)
    assert (tmp_path / "ready").exists()
    runner.step(10)
    assert (tmp_path / "ready").exists()  # one failure is below the threshold
    runner.step(15)
    assert not (tmp_path / "ready").exists()


def test_liveness_failure_calls_back_once_after_the_threshold(tmp_path: Path) -> None:
    probe = Probe(kind=TCP_SOCKET, port=1, initial_delay=3, period=1, failure_threshold=3)
    failed: list[Probe] = []
    runner = Runner(
        Probes(liveness=probe), tmp_path, on_failure=failed.append, check=Results([False] * 5)
    )
    runner.step(0)
    assert not failed  # the initial delay
    for now in (3, 4):
        runner.step(now)
    assert not failed
    runner.step(5)
    assert failed == [probe]
    runner.step(6)
    assert len(failed) == 1 and runner.failed


def test_startup_gates_the_other_probes(tmp_path: Path) -> None:
    startup = Probe(kind=TCP_SOCKET, port=1, period=1, failure_threshold=5)
    readiness = Probe(kind=HTTP_GET, port=2, period=1, initial_delay=2)
    seen: list[str] = []

    def fake(probe: Probe) -> bool:
        seen.append(probe.kind)
        return probe.kind == HTTP_GET or len(seen) >= 2

    runner = Runner(
        Probes(startup=startup, readiness=readiness),
        tmp_path,
        on_failure=lambda p: None,
        check=fake,
    )
    assert not (tmp_path / "startup").exists()
    runner.step(0)
    runner.step(1)
    assert runner.started and (tmp_path / "startup").exists()
    runner.step(2)  # readiness's delay counts from the start-up: due at 3
    assert seen == [TCP_SOCKET, TCP_SOCKET]
    runner.step(3)
    assert seen[-1] == HTTP_GET and (tmp_path / "ready").exists()
    runner.finish()
    assert not (tmp_path / "ready").exists() and not (tmp_path / "startup").exists()


def test_probes_file_round_trip(tmp_path: Path) -> None:
    (tmp_path / "p").write_text(
        json.dumps(
            {
                "grace": 7,
                "liveness": {"kind": "httpGet", "port": 80, "path": "/x", "headers": [["a", "b"]]},
            }
        )
    )
    probes = Probes.load(tmp_path / "p")
    assert probes.liveness == Probe(kind=HTTP_GET, port=80, path="/x", headers=(("a", "b"),))
    assert probes.kill_grace(probes.liveness) == 7
    assert probes.readiness is None


def test_the_launcher_stops_a_container_whose_liveness_probe_fails(tmp_path: Path) -> None:
    probes = {
        "grace": 1,
        "liveness": {
            "kind": "tcpSocket",
            "port": free_port(),
            "periodSeconds": 0.2,
            "failureThreshold": 2,
        },
    }
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    folder = tmp_path / "c"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "kubelet_py.job.launch", "--restart", "Never"),
            *("--probes", str(tmp_path / "probes.json"), str(folder), "--"),
            *("sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.05; done"),
        ]
    )
    began = time.monotonic()
    assert process.wait(timeout=20) == 137  # TERM ignored: KILL after the 1 s grace
    assert time.monotonic() - began < 10
    assert (folder / "exit").read_text().startswith("137 ")
    assert b"Liveness probe failed" in (folder / "log").read_bytes()


def test_an_exec_probe_passes_when_its_command_exits_zero() -> None:
    # The prefix stands for `apptainer exec ... SIF`: here a shell runs the probe's words.
    prefix = ["sh", "-c", '"$@"', "probe"]
    assert check(Probe(kind=EXEC, command=("true",)), exec_prefix=prefix)
    assert not check(Probe(kind=EXEC, command=("false",)), exec_prefix=prefix)
    assert not check(Probe(kind=EXEC, command=("true",)))  # no prefix: it cannot run


def test_the_exec_prefix_is_the_containers_apptainer_line_up_to_the_image() -> None:
    sif = Path("/cache/busybox.sif")
    command = ["/opt/apptainer", "--quiet", "run", "--cleanenv", "--bind", "a:b", str(sif), "x"]
    assert exec_prefix(command, sif) == [*command[:2], "exec", *command[3:7]]
    srun = ["srun", "python", "-m", "kubelet_py.job.task", "--", *command]
    assert exec_prefix(srun, sif) == []
    assert exec_prefix(command, None) == []


def test_no_marker_after_the_run_ended(tmp_path: Path) -> None:
    probe = Probe(kind=TCP_SOCKET, port=1, period=1)
    runner = Runner(
        Probes(readiness=probe), tmp_path, on_failure=lambda p: None, check=Results([True])
    )
    runner.finish()
    runner.step(0)  # a check that was under way when the run ended
    assert not (tmp_path / "ready").exists()
