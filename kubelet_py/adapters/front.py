"""The kubelet API's front: `hpk-kubelet-api serve` (container/kubelet-api), as a child.

The front holds the kubelet's HTTPS port. It serves `/exec`, `/attach` and `/portForward`
with the Kubernetes kubelet's own streaming packages and hands every other request, and its
plans, to the Python kubelet on a Unix socket (kubelet_py.loops.logserver).

`Front.start` starts it and waits for its "ready" line (the port is bound then); it keeps
the front's stdin open, so that the front ends when the kubelet does, even by KILL. A watch
thread starts it again when it ends by itself while the kubelet runs.
"""

from __future__ import annotations

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
    listen: str
    """address:port of the kubelet API."""
    cert: Path
    key: Path
    client_ca: Path
    backend: Path
    """The Python kubelet's Unix socket."""

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
            raise FrontFailed(
                f"{self.settings.binary.name} did not start (exit status {process.returncode}; "
                "its own words are in this log above)"
            )
        log.info("the kubelet API's front listens on %s", self.settings.listen)
        return process

    def _keep(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set():
                return
            log.error("the kubelet API's front ended (exit status %s); starting it again", code)
            time.sleep(RESTART_DELAY_S)
            try:
                self._process = self._launch()
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
