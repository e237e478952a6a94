"""The kubelet API's front: `hpk-kubelet-api serve` (container/kubelet-api), as a child.

The front holds the kubelet's HTTPS port. It serves `/exec`, `/attach` and `/portForward`
with the Kubernetes kubelet's own streaming packages and hands every other request, and its
plans, to the Python kubelet on a Unix socket (kubelet_py.loops.logserver).

`Front.start` starts it and waits for its "ready" line (the main port is bound then). Its
stdin stays open: on it the kubelet asks for a node's own port (`open_port`: "listen NODE
PORT", answered on its stdout with "listening NODE PORT" or "failed NODE WHY"), and when it
closes the front ends, so that it ends with the kubelet even by KILL. A watch thread starts
it again, with the nodes' ports, when it ends by itself while the kubelet runs.
"""

from __future__ import annotations

import contextlib
import logging
import select
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
RESTART_DELAY_S = 1.0


class FrontFailed(RuntimeError):
    """The front did not start; the message holds what it said."""


@dataclass(frozen=True)
class FrontSettings:
    binary: Path
    address: str
    port: int
    """The kubelet API's main port."""
    cert: Path
    key: Path
    client_ca: Path
    backend: Path
    """The Python kubelet's Unix socket."""

    @property
    def listen(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            "serve",
            f"--listen={self.listen}",
            f"--cert={self.cert}",
            f"--key={self.key}",
            f"--client-ca={self.client_ca}",
            f"--backend={self.backend}",
        ]


class Front:
    def __init__(self, settings: FrontSettings) -> None:
        self.settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ports: dict[str, int] = {}
        """Node -> the port of its own the front serves for it."""

    def start(self) -> None:
        """Start the front and wait until it listens; FrontFailed when it does not."""
        self._process = self._launch()
        self._watch = threading.Thread(target=self._keep, name="front", daemon=True)
        self._watch.start()

    def _launch(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            self.settings.argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
        )
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        line = process.stdout.readline() if readable else b""
        if line.strip() != b"ready":
            process.kill()
            process.wait()
            _close_pipes(process)
            raise FrontFailed(
                f"{self.settings.binary.name} did not start (exit status {process.returncode}; "
                "its own words are in this log above)"
            )
        log.info("the kubelet API's front listens on %s", self.settings.listen)
        return process

    def open_port(self, node: str, wanted: int) -> int:
        """Have the front serve `node` on a port of its own: `wanted`, or one the system
        picks (0, or when `wanted` is taken); the port. OSError when it cannot."""
        with self._lock:
            port = self._ask(node, wanted)
            if port is None and wanted:
                port = self._ask(node, 0)
            if port is None:
                raise OSError(f"the kubelet API's front cannot listen for node {node}")
            self._ports[node] = port
            return port

    def _ask(self, node: str, port: int) -> int | None:
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            return None
        try:
            process.stdin.write(f"listen {node} {port}\n".encode())
            process.stdin.flush()
        except OSError:
            return None
        readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        answer = process.stdout.readline().decode(errors="replace").split() if readable else []
        if answer[:2] == ["listening", node] and len(answer) == 3 and answer[2].isdigit():
            return int(answer[2])
        log.warning("the kubelet API's front did not listen for node %s: %s", node, answer)
        return None

    def _keep(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set():
                return
            with self._lock:  # not while open_port reads the front's answer
                _close_pipes(process)
            log.error("the kubelet API's front ended (exit status %s); starting it again", code)
            time.sleep(RESTART_DELAY_S)
            try:
                with self._lock:
                    self._process = self._launch()
                    for node, port in list(self._ports.items()):
                        if self._ask(node, port) is None:
                            log.error("node %s lost its kubelet API port %d", node, port)
            except (FrontFailed, OSError) as error:
                log.error("%s", error)
                time.sleep(RESTART_DELAY_S)
                self._process = process  # waited already: the loop tries again

    def stop(self) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()  # the front ends when its stdin does
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            _close_pipes(process)
        if self._watch is not None:
            self._watch.join(timeout=3)


def _close_pipes(process: subprocess.Popen[bytes]) -> None:
    for pipe in (process.stdin, process.stdout):
        if pipe is not None and not pipe.closed:
            with contextlib.suppress(OSError):
                pipe.close()
