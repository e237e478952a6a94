"""`kubectl attach` at the launcher's end (kubelet_py.job.attach), with real launchers and
real sockets."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kubelet_py.job.attach import (
    RESIZE,
    STDIN,
    STDIN_END,
    STDOUT,
    FrameReader,
    frame,
)


def wait_for(check: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextmanager
def launcher(folder: Path, *flags: str, script: str) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "kubelet_py.job.launch", "--attach", *flags, str(folder)]
    process = subprocess.Popen([*argv, "--", "sh", "-c", script])
    try:
        wait_for(lambda: (folder / "attach").exists() and (folder / "pid").exists(), "attach")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def connect(folder: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        connection.connect(f"/proc/self/fd/{fd}/attach")
    finally:
        os.close(fd)
    connection.settimeout(10)
    return connection


def output(connection: socket.socket, until: bytes) -> bytes:
    reader, seen = FrameReader(), b""
    while until not in seen:
        data = connection.recv(65536)
        if not data:
            break
        seen += b"".join(payload for kind, payload in reader.feed(data) if kind == STDOUT)
    return seen


def test_frames_survive_being_cut_anywhere() -> None:
    data = frame(STDIN, b"hello") + frame(RESIZE, struct.pack(">HH", 80, 24)) + frame(STDIN_END)
    reader = FrameReader()
    found = [item for byte in data for item in reader.feed(bytes([byte]))]
    assert found == [(STDIN, b"hello"), (RESIZE, struct.pack(">HH", 80, 24)), (STDIN_END, b"")]
    with pytest.raises(ValueError, match="frame"):
        FrameReader().feed(struct.pack(">BI", STDIN, 1 << 30))


def test_a_stdin_container_gets_the_clients_input_and_stdin_once_closes_it(tmp_path: Path) -> None:
    script = 'echo ready; while read -r line; do echo "got $line"; done; echo bye'
    with launcher(tmp_path, "--stdin", "--stdin-once", script=script) as process:
        with connect(tmp_path) as client:
            client.sendall(frame(STDIN, b"one\ntwo\n"))
            assert b"got one\ngot two\n" in output(client, b"got two\n")
        # The first client that had the input has left: the input closes.
        assert process.wait(timeout=10) == 0
    log = (tmp_path / "log").read_text()
    assert log.endswith("stdout bye\n"), log
    assert not (tmp_path / "pid").exists(), "the pid marker goes with its run"


def test_without_stdin_once_the_input_stays_open_for_the_next_client(tmp_path: Path) -> None:
    script = 'echo ready; while read -r line; do echo "got $line"; done; echo bye'
    with launcher(tmp_path, "--stdin", script=script) as process:
        first = connect(tmp_path)
        first.sendall(frame(STDIN, b"a\n") + frame(STDIN_END))
        assert b"got a\n" in output(first, b"got a\n")
        first.close()
        with connect(tmp_path) as second:
            second.sendall(frame(STDIN, b"b\n"))
            assert b"got b\n" in output(second, b"got b\n")
            assert process.poll() is None
            process.terminate()
            process.wait(timeout=10)


def test_a_tty_container_runs_on_a_terminal_that_takes_the_clients_size(tmp_path: Path) -> None:
    script = "echo ready; read -r line; stty size; [ -t 0 ] && echo on-a-terminal"
    with (
        launcher(tmp_path, "--stdin", "--tty", script=script) as process,
        connect(tmp_path) as client,
    ):
        client.sendall(frame(RESIZE, struct.pack(">HH", 123, 45)))
        # The size is set before the line that reads it is typed.
        time.sleep(0.2)
        client.sendall(frame(STDIN, b"go\n"))
        seen = output(client, b"on-a-terminal")
        assert b"45 123" in seen and b"on-a-terminal" in seen, seen
        assert process.wait(timeout=10) == 0


def test_a_client_gets_output_only_from_when_it_attaches_and_ends_with_the_run(
    tmp_path: Path,
) -> None:
    script = "echo before; sleep 1; echo after; sleep 0.3"
    with launcher(tmp_path, script=script) as process:
        wait_for(lambda: b"before" in (tmp_path / "log").read_bytes(), "the first line")
        with connect(tmp_path) as client:
            seen = output(client, b"never")  # until the run ends and the stream with it
        assert seen == b"after\n", seen
        assert process.wait(timeout=10) == 0
