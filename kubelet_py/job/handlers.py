"""The actions that probes and lifecycle hooks share: a command in the container's image, an
HTTP GET, a TCP connection.

Kubernetes calls them handlers: a probe and a postStart or preStop hook run the same `exec`
and `httpGet` (and a probe `tcpSocket`). In hpk both run in the container's launcher, inside
the pod's job (kubelet_py.job.probes, kubelet_py.job.hooks), so they run them here, the one
way:

- `exec` is `apptainer exec` of the container's own image with its own options, environment
  file and binds (`exec_prefix` takes them from the container's command line), followed by
  the handler's words: a new Apptainer process beside the container, which sees its files and
  volumes, and its network (the launcher already runs in the pod's network namespace when the
  pod has one, so does the process it starts);
- `httpGet` and `tcpSocket` connect from the launcher, which shares the pod's network, to
  127.0.0.1 unless the handler names a host.

Stdlib only, with kubelet_py.job.termination: it runs in the job on the compute node.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kubelet_py.job.termination import HOOK_PATH, READY_PATH

USER_AGENT = "kube-probe/hpk"
"""What an httpGet handler sends as User-Agent unless its headers say otherwise."""

_POLL_SECONDS = 0.05
_READ_SIZE = 1 << 16


def exec_prefix(command: Sequence[str], image: Path | None) -> list[str]:
    """`apptainer ... exec ... SIF` of COMMAND, for exec handlers: the same options, binds and
    environment as the container, its `run` turned into `exec`; [] when COMMAND is no plain
    `apptainer exec|run` of the image (an srun container)."""
    if image is None or str(image) not in command:
        return []
    words = list(command[: list(command).index(str(image)) + 1])
    actions = [i for i, word in enumerate(words) if word in ("exec", "run")]
    if not actions or "apptainer" not in Path(words[0]).name:
        return []
    words[actions[0]] = "exec"
    # An exec handler is no new run of the container: it waits for no termination handshake.
    for index in range(len(words) - 2, 0, -1):
        target = words[index + 1].split(":")[1:2]
        if words[index] == "--bind" and target in ([READY_PATH], [HOOK_PATH]):
            del words[index : index + 2]
    return words


@dataclass(frozen=True)
class ExecResult:
    """How an exec handler's command ended."""

    code: int | None
    """Its exit code (128 + N for signal N); None when it did not end in time, was
    stopped, or could not start."""
    output: bytes = b""
    """The end of what it wrote to stdout and stderr, when that was asked for."""
    problem: str | None = None
    """Why there is no code: `timed out`, `stopped`, or why it could not start."""


def run_exec(
    words: Sequence[str],
    *,
    timeout: float | None,
    stop: threading.Event | None = None,
    keep: int = 0,
) -> ExecResult:
    """Run `words` (an exec prefix and a handler's command) with no input, until it ends,
    `timeout` seconds have passed (None: no limit) or `stop` is set; then its whole process
    group gets KILL. The last `keep` bytes of its output are kept (0: it goes nowhere)."""
    try:
        process = subprocess.Popen(
            list(words),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if keep else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if keep else subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as error:
        return ExecResult(code=None, problem=f"cannot start {words[0]}: {error.strerror}")
    tail = bytearray()
    reader = None
    if process.stdout is not None:
        reader = threading.Thread(target=_keep_tail, args=(process.stdout, tail, keep), daemon=True)
        reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    problem = None
    while process.poll() is None:
        if stop is not None and stop.is_set():
            problem = "stopped"
        elif deadline is not None and time.monotonic() >= deadline:
            problem = "timed out"
        if problem is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_POLL_SECONDS)
    if reader is not None:
        reader.join(timeout=1.0)
    code = process.returncode
    return ExecResult(
        code=None if problem else 128 - code if code < 0 else code,
        output=bytes(tail),
        problem=problem,
    )


def _keep_tail(stream: IO[bytes], tail: bytearray, keep: int) -> None:
    """Read `stream` to its end, keeping its last `keep` bytes in `tail`."""
    try:
        while data := os.read(stream.fileno(), _READ_SIZE):
            tail += data
            del tail[:-keep]
    except OSError:
        pass
    finally:
        stream.close()


def http_get(
    *,
    host: str,
    port: int,
    path: str,
    scheme: str = "HTTP",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float | None,
) -> int:
    """The status of a GET of `path` from `host`:`port` (HTTPS without certificate checks,
    as Kubernetes does). Raises OSError, http.client.HTTPException or ValueError when no
    answer came; `timeout` (None: none) bounds each step of the exchange."""
    connection: http.client.HTTPConnection
    if scheme.upper() == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = {"User-Agent": USER_AGENT, "Accept": "*/*"}
        sent.update(dict(headers))
        connection.request("GET", path, headers=sent)
        return connection.getresponse().status
    finally:
        connection.close()


def passes(status: int) -> bool:
    """Whether an HTTP status counts as a pass: 200-399, as Kubernetes' probes count it."""
    return 200 <= status < 400


def tcp_connect(host: str, port: int, *, timeout: float) -> None:
    """Connect to `host`:`port` and close; raises OSError when no connection is accepted."""
    with socket.create_connection((host, port), timeout=timeout):
        pass
