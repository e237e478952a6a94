"""`kubectl attach`: a running container's output, and its input when it has `stdin: true`.

Two ends, both in the pod's job on the node of its batch script:

- `AttachPoint`, in the container's launcher (kubelet_py.job.launch): a Unix socket in the
  container's folder, `attach`, 0600 in a folder of the job's user. Every client gets what
  the container writes from the moment it connects, and what clients send goes to the
  container's input (a pipe, or its terminal with `tty: true`). With `stdinOnce: true` the
  input closes when the first client that had it leaves, as Kubernetes does.
- the client, `python -I -m kubelet_py.job.attach [--stdin] CONTAINER_DIR`, which the kubelet's
  plan runs through `srun --jobid=<job> --overlap` (kubelet_py.pod.streams): it copies the
  socket to its own stdout and stderr and, with `--stdin`, its stdin to the socket. On a
  terminal (srun --pty) it puts that terminal in raw mode and sends its size, at first and on
  each SIGWINCH. It ends when the container's output ends (its run is over).

On the socket, each message is a frame: one byte of kind, four of length (big-endian), then
the bytes. Kinds: STDOUT and STDERR (to the client), STDIN, STDIN_END and RESIZE (from it;
RESIZE holds columns and rows, two bytes each).

The socket's path may be long (the pod folder's): it is bound and reached through
/proc/self/fd/<the folder's descriptor>/attach, whose length does not depend on it.

Compute-node code: stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

SOCKET = "attach"

STDOUT, STDERR, STDIN, STDIN_END, RESIZE = 1, 2, 3, 4, 5
_HEADER = struct.Struct(">BI")
_LONGEST_FRAME = 1 << 20
_READ_SIZE = 1 << 16


def frame(kind: int, data: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(data)) + data


class FrameReader:
    """Frames out of the bytes of a stream, as they come."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames `data` completes; ValueError for a frame too long to be one."""
        self._pending += data
        frames = []
        while len(self._pending) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._pending)
            if length > _LONGEST_FRAME:
                raise ValueError(f"a frame of {length} bytes")
            end = _HEADER.size + length
            if len(self._pending) < end:
                break
            frames.append((kind, bytes(self._pending[_HEADER.size : end])))
            del self._pending[:end]
        return frames


def _folder_path(dir_fd: int) -> str:
    return f"/proc/self/fd/{dir_fd}/{SOCKET}"


class AttachPoint:
    """The launcher's end: the socket, its clients, and the container's input."""

    def __init__(self, container_dir: Path, *, stdin_once: bool = False) -> None:
        self.stdin_once = stdin_once
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, FrameReader] = {}
        self._input: int | None = None
        self._resize: Callable[[int, int], None] | None = None
        self._input_closed = False
        self._had_input: set[socket.socket] = set()
        dir_fd = os.open(container_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = _folder_path(dir_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            mask = os.umask(0o077)
            try:
                self._listener.bind(path)
            finally:
                os.umask(mask)
        finally:
            os.close(dir_fd)
        self._listener.listen(8)
        self._wake_r, self._wake_w = os.pipe()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="attach", daemon=True)
        self._thread.start()

    # -- the launcher's side --------------------------------------------------------------

    def run_started(
        self, input_fd: int | None, resize: Callable[[int, int], None] | None = None
    ) -> None:
        """A run has started: what clients send now goes to `input_fd` (None: nowhere)."""
        with self._lock:
            self._input, self._resize, self._input_closed = input_fd, resize, False

    def run_ended(self) -> None:
        """The run's output has ended: every client is told so by the end of its stream."""
        with self._lock:
            self._input, self._resize = None, None
            clients = list(self._clients)
            self._clients.clear()
        for client in clients:
            client.close()

    def output(self, stream: str, data: bytes) -> None:
        """Bytes the container wrote on `stream` ("stdout" or "stderr"), to every client."""
        message = frame(STDOUT if stream == "stdout" else STDERR, data)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.sendall(message)
            except OSError:
                self._drop(client)

    def close(self) -> None:
        self._stopped = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=1.0)
        self.run_ended()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the clients -----------------------------------------------------------------------

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ, None)
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stopped:
                for key, _ in selector.select(1.0):
                    if key.data == "wake":
                        return
                    if key.fileobj is self._listener:
                        new, _ = self._listener.accept()
                        new.settimeout(5.0)  # a client that stops reading is dropped
                        with self._lock:
                            self._clients[new] = FrameReader()
                        selector.register(new, selectors.EVENT_READ, "client")
                        continue
                    client = key.fileobj
                    assert isinstance(client, socket.socket)
                    if not self._receive(client):
                        with contextlib.suppress(KeyError, ValueError):
                            selector.unregister(client)
                        self._drop(client)
                # Clients the output dropped are no longer watched.
                watched = [k.fileobj for k in selector.get_map().values() if k.data == "client"]
                with self._lock:
                    gone = [client for client in watched if client not in self._clients]
                for client in gone:
                    selector.unregister(client)

    def _receive(self, client: socket.socket) -> bool:
        """Handle what `client` sent; False once it has gone."""
        try:
            data = client.recv(_READ_SIZE)
        except OSError:
            return False
        if not data:
            return False
        with self._lock:
            reader = self._clients.get(client)
        if reader is None:
            return False
        try:
            frames = reader.feed(data)
        except ValueError:
            return False
        for kind, payload in frames:
            if kind == STDIN:
                self._had_input.add(client)
                self._write_input(payload)
            elif kind == STDIN_END:
                self._had_input.add(client)
                if self.stdin_once:
                    self._close_input()
            elif kind == RESIZE and len(payload) == 4:
                columns, rows = struct.unpack(">HH", payload)
                with self._lock:
                    resize = self._resize
                if resize is not None:
                    resize(columns, rows)
        return True

    def _write_input(self, data: bytes) -> None:
        with self._lock:
            fd = None if self._input_closed else self._input
        if fd is None:
            return
        try:
            os.write(fd, data)
        except OSError:  # the container closed its input, or ended
            self._close_input()

    def _close_input(self) -> None:
        with self._lock:
            fd, self._input_closed = self._input, True
            self._input = None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop(self, client: socket.socket) -> None:
        with self._lock:
            self._clients.pop(client, None)
        client.close()
        if self.stdin_once and client in self._had_input:
            self._close_input()
        self._had_input.discard(client)


# ---------------------------------------------------------------------------------------------
# The client


def _terminal_size(fd: int) -> bytes | None:
    try:
        rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return struct.pack(">HH", columns, rows)


def _follow_terminal(connection: socket.socket) -> list[Any]:
    """On a terminal: raw mode, and its size sent now and on each change; the settings to
    restore."""
    saved = termios.tcgetattr(0)
    tty.setraw(0)

    def send_size(_signum: int = 0, _frame: FrameType | None = None) -> None:
        size = _terminal_size(0)
        if size:
            with contextlib.suppress(OSError):
                connection.sendall(frame(RESIZE, size))

    send_size()
    signal.signal(signal.SIGWINCH, send_size)
    return saved


def attach(container_dir: Path, *, stdin: bool) -> int:
    """Copy the container's output here, and this input there, until its output ends."""
    dir_fd = os.open(container_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(_folder_path(dir_fd))
    except OSError:
        print("hpk: the container is not running", file=sys.stderr)
        return 1
    finally:
        os.close(dir_fd)
    saved = _follow_terminal(connection) if os.isatty(0) else None
    try:
        return _copy(connection, stdin=stdin)
    except OSError:
        return 0
    finally:
        connection.close()
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy(connection: socket.socket, *, stdin: bool) -> int:
    """The client's loop: output frames to stdout and stderr, stdin to input frames."""
    reader = FrameReader()
    outputs = {STDOUT: 1, STDERR: 2}
    with selectors.DefaultSelector() as selector:
        selector.register(connection, selectors.EVENT_READ, "socket")
        if stdin:
            selector.register(0, selectors.EVENT_READ, "stdin")
        while True:
            for key, _ in selector.select():
                if key.data == "stdin":
                    data = os.read(0, _READ_SIZE)
                    connection.sendall(frame(STDIN, data) if data else frame(STDIN_END))
                    if not data:
                        selector.unregister(0)
                    continue
                data = connection.recv(_READ_SIZE)
                if not data:
                    return 0
                for kind, payload in reader.feed(data):
                    if kind in outputs:
                        _write_all(outputs[kind], payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I -m kubelet_py.job.attach")
    parser.add_argument("--stdin", action="store_true", help="send this input to the container")
    parser.add_argument("container_dir", type=Path)
    args = parser.parse_args(argv)
    return attach(args.container_dir, stdin=args.stdin)


if __name__ == "__main__":
    sys.exit(main())
