"""Helpers for the end-to-end tests that drive a control plane they started themselves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hpk.controlplane import ControlPlane
from hpk.controlplane.job import kubelet_api_args, prepare_kubelet
from hpk.pki import ClusterPKI
from hpk.testbed.bed import Testbed
from hpk.testbed.images import register_test_images
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS
from hpk.toolchain import Toolchain

# A pod script: prints when the token mounted at /tok is rewritten (within 90 s), with its mode.
WATCH_TOKEN = """
first=$(cat /tok/token)
for i in $(seq 1 90); do
    sleep 1
    now=$(cat /tok/token)
    if [ -n "$now" ] && [ "$now" != "$first" ]; then
        echo "rewritten after about $i s, mode $(stat -c %a /tok/token)"
        exit 0
    fi
done
echo "never rewritten"
exit 1
"""


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
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """hpk-kubelet against `plane`, as the control-plane job starts it, logging to `log_file`.

    With `serve_api` it serves its HTTPS API (`kubectl logs`) on the plane's kubelet port,
    with a serving certificate from the plane's CA; without, it serves none. `extra_args` go
    on its command line last.
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
                *extra_args,
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


class PodCluster:
    """A control plane of the pinned toolchain and an hpk-kubelet on the test bed, with a
    namespace for one test module's pods; everything lives in a folder under /var/tmp."""

    def __init__(
        self,
        testbed: Testbed,
        *,
        namespace: str,
        serve_api: bool = False,
        prefix: str = "pods",
        kubelet_args: Sequence[str] = (),
    ) -> None:
        self.testbed = testbed
        self.kubelet_args = tuple(kubelet_args)
        self.namespace = namespace
        self.serve_api = serve_api
        self.root = Path(tempfile.mkdtemp(prefix=f"hpk-{prefix}-e2e-", dir="/var/tmp"))
        self.root.chmod(0o755)  # munged and the jobs' users reach the pod folders through it
        self.home = self.root / "home"
        self.plane = ControlPlane(
            self.root / "state", pki=ClusterPKI(self.root / "pki"), settings=TESTBED_PLANE_SETTINGS
        )
        self.kubeconfig: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        """The kubelet's log files, one per start."""

    # -- the stack ------------------------------------------------------------------------

    def up(self, nodes: Sequence[str] = ("hpk-batch",)) -> None:
        """Start the plane and the kubelet; wait for `nodes` and the namespace."""
        register_test_images(cache_dir=self.home / "images")
        self.plane.start()
        self.kubeconfig = prepare_kubelet(self.plane)
        self.start_kubelet()
        wanted = {f"node/{name}" for name in nodes}
        eventually(
            f"nodes {', '.join(nodes)}",
            lambda: wanted <= set(self.kubectl("get", "nodes", "-o", "name", check=False).split()),
        )
        self.kubectl("create", "namespace", self.namespace)
        eventually(
            "the namespace's default service account",
            lambda: self.kubectl(
                "get", "serviceaccount", "default", "-n", self.namespace, "-o", "name", check=False
            ),
        )

    def start_kubelet(self) -> None:
        assert self.kubeconfig is not None
        log_file = self.root / f"kubelet-{len(self.logs) + 1}.log"
        self.logs.append(log_file)
        self.process = start_kubelet(
            self.plane,
            self.kubeconfig,
            log_file=log_file,
            env={"SLURM_CONF": str(self.testbed.settings.slurm_conf), "HPK_HOME": str(self.home)},
            serve_api=self.serve_api,
            extra_args=self.kubelet_args,
        )

    def stop_kubelet(self) -> None:
        stop_process(self.process)

    def down(self) -> None:
        """Stop everything and cancel the jobs this module's pods left (by their names)."""
        self.stop_kubelet()
        out = subprocess.run(
            ["squeue", "-h", "--me", "-o", "%i %j"], capture_output=True, text=True, check=False
        ).stdout
        left = [line.split()[0] for line in out.splitlines() if f"/{self.namespace}/" in line]
        if left:
            subprocess.run(["scancel", *left], check=False)
        self.plane.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the pods -------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        return admin_kubectl(self.plane, *args, check=check, stdin=stdin)

    def pod(self, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", "pod", "-n", self.namespace, name, "-o", "json", check=False)
        return dict(json.loads(out)) if out.strip() else None

    def pods(self) -> dict[str, dict[str, Any]]:
        out = self.kubectl("get", "pods", "-n", self.namespace, "-o", "json")
        return {item["metadata"]["name"]: item for item in json.loads(out)["items"]}

    def manifest(
        self, name: str, command: list[str], *, annotations: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A busybox pod running `command` once, which the kubelet accepts today."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "annotations": dict(annotations or {}),
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [{"name": "main", "image": "busybox", "command": command}],
            },
        }

    def apply(self, *manifests: Mapping[str, Any]) -> None:
        """Create the objects, in one kubectl call."""
        body = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
        self.kubectl("create", "-f", "-", stdin=json.dumps(body))

    def phase(self, name: str, wanted: str, timeout: float = 180) -> dict[str, Any]:
        """The pod once its phase is `wanted`; fails at once if it ends in another phase."""

        last: list[dict[str, Any] | None] = [None]

        def probe() -> dict[str, Any] | None:
            found = last[0] = self.pod(name)
            phase = (found or {}).get("status", {}).get("phase")
            if phase in ("Succeeded", "Failed") and phase != wanted:
                pytest.fail(f"pod {name} ended {phase}: {found}\n{self.log()[-3000:]}")
            return found if phase == wanted else None

        try:
            return dict(eventually(f"pod {name} {wanted}", probe, timeout=timeout))
        except pytest.fail.Exception:
            # What the pod was when time ran out, and the kubelet's last words, to say why.
            status = (last[0] or {}).get("status")
            pytest.fail(
                f"pod {name} not {wanted} in {timeout:.0f} s: {status}\n{self.log()[-3000:]}"
            )

    def events(self, name: str) -> str:
        return self.kubectl(
            "get", "events", "-n", self.namespace, f"--field-selector=involvedObject.name={name}"
        )

    def folder(self, name: str) -> Path:
        return self.home / "pods" / self.namespace / name

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())


@contextlib.contextmanager
def pod_cluster(
    testbed: Testbed,
    *,
    namespace: str,
    nodes: Sequence[str] = ("hpk-batch",),
    serve_api: bool = False,
    kubelet_args: Sequence[str] = (),
) -> Iterator[PodCluster]:
    """A PodCluster that is up inside the block and down after it, whatever happened."""
    cluster = PodCluster(
        testbed,
        namespace=namespace,
        serve_api=serve_api,
        prefix=namespace,
        kubelet_args=kubelet_args,
    )
    try:
        cluster.up(nodes)
        yield cluster
    finally:
        cluster.down()
