"""Helpers for the end-to-end tests that drive a control plane they started themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from hpk.controlplane import ControlPlane
from hpk.controlplane.job import kubelet_api_args
from hpk.toolchain import Toolchain


def admin_kubectl(
    plane: ControlPlane, *args: str, check: bool = True, stdin: str | None = None
) -> str:
    """The pinned kubectl as the cluster's admin; fails the test when `check` and it fails."""
    result = subprocess.run(
        [
            str(Toolchain.load().binary("kubectl")),
            f"--kubeconfig={plane.layout.admin_kubeconfig}",
            "--request-timeout=20s",
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def eventually(what: str, probe: Callable[[], Any], *, timeout: float = 60.0) -> Any:
    """Call `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def start_kubelet(
    plane: ControlPlane,
    kubeconfig: Path,
    *,
    log_file: Path,
    env: Mapping[str, str],
    serve_api: bool = False,
) -> subprocess.Popen[bytes]:
    """hpk-kubelet against `plane`, as the control-plane job starts it, logging to `log_file`.

    With `serve_api` it serves its HTTPS API (`kubectl logs`) on the plane's kubelet port,
    with a serving certificate from the plane's CA; without, it serves none.
    """
    api_args = kubelet_api_args(plane) if serve_api else ()
    with log_file.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubelet_py.main",
                f"--kubeconfig={kubeconfig}",
                f"--node-ip={plane.context.advertise_address}",
                *api_args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; nothing if it has already ended."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
