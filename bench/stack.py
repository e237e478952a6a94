"""The benchmark's own stack: a private Slurm test bed, a control plane and an hpk-kubelet.

Everything lives below one folder (default /var/tmp/hpk-bench) and uses ports of its own, so
the shared test bed at /var/tmp/hpk-testbed and its users are never disturbed:

- the bed: `hpk.testbed.Testbed` with its own munged (its own socket and key), MariaDB,
  slurmdbd, slurmctld and slurmd, on nodes named bn1..bnN that claim many CPUs, and a short
  MinJobAge so finished jobs leave squeue soon and the kubelet's sacct path is exercised;
- the control plane: `hpk.controlplane.ControlPlane` on free ports, as the end-to-end tests
  start it;
- the kubelet: `python -m kubelet_py.main`, as the control-plane job starts it, with its own
  hpk home (the test images in its image cache) and the call-counting wrappers
  (bench.slurmcalls) first on its PATH.

Needs root, as the test bed does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.slurmcalls import CallLog, install_wrappers
from hpk.controlplane import ControlPlane
from hpk.controlplane.job import prepare_kubelet
from hpk.pki import ClusterPKI
from hpk.testbed.bed import Testbed
from hpk.testbed.images import register_test_images
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS, Partition, TestbedSettings
from hpk.toolchain import Toolchain
from kubelet_py import CONNECTED_MESSAGE
from kubelet_py.adapters.apiserver import KubeApi, NotFound

PARTITION = "batch"
NODE = f"hpk-{PARTITION}"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StackSettings:
    """Where the benchmark's stack lives and how big its Slurm cluster claims to be."""

    root: Path = Path("/var/tmp/hpk-bench")  # noqa: S108 - munged needs a world-traversable path
    """Folder of the bed, the control plane's state and the kubelet's hpk home."""

    nodes: int = 4
    """slurmd nodes (bn1..bnN), all in one partition."""

    cpus_per_node: int = 256
    """CPUs each node claims: 1,000 one-CPU jobs fit at once."""

    memory_per_node_mb: int = 262144
    """RealMemory each node claims."""

    min_job_age_s: int = 60
    """MinJobAge: finished jobs leave squeue after this, then only sacct knows them."""

    first_port: int = 36800
    """Base of the bed's ports (slurmctld +17, slurmdbd +19, slurmd +21.., MariaDB +6); the
    shared bed uses 16800 and the lifecycle test 26800."""

    keep_bed: bool = False
    """Leave the bed up at the end (a later run reuses it, which saves its start)."""


@dataclass
class Stack:
    """The running stack; `start()` and `stop()` bracket a run."""

    settings: StackSettings
    bed: Testbed = field(init=False)
    plane: ControlPlane | None = None
    kubelet: subprocess.Popen[bytes] | None = None
    api: KubeApi | None = None

    def __post_init__(self) -> None:
        s = self.settings
        names = tuple(f"bn{index}" for index in range(1, s.nodes + 1))
        self.bed = Testbed(
            TestbedSettings.from_overrides(
                root=s.root / "bed",
                cluster_name="hpkbench",
                nodes=names,
                partitions=(Partition(PARTITION, names, default=True),),
                gpu_nodes=(),
                cpus_per_node=s.cpus_per_node,
                memory_per_node_mb=s.memory_per_node_mb,
                min_job_age_s=s.min_job_age_s,
                kill_wait_s=5,
                slurmctld_port=s.first_port + 17,
                slurmdbd_port=s.first_port + 19,
                slurmd_first_port=s.first_port + 21,
                mariadb_port=s.first_port + 6,
            )
        )

    # -- layout -------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """The kubelet's hpk home: pods/ and images/."""
        return self.settings.root / "home"

    @property
    def pods_dir(self) -> Path:
        return self.home / "pods"

    @property
    def wrappers(self) -> Path:
        return self.settings.root / "slurm-wrappers"

    @property
    def calls(self) -> CallLog:
        return CallLog(self.settings.root / "slurm-calls.log")

    @property
    def kubelet_log(self) -> Path:
        return self.settings.root / "kubelet.log"

    def slurm_env(self) -> dict[str, str]:
        """An environment whose Slurm commands talk to the bench's bed (no wrappers)."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.bed.settings.slurm_conf),
            "PATH": Toolchain.load().path_with_tools(),
        }

    # -- start and stop -----------------------------------------------------------------

    def start(self, progress: Progress) -> None:
        root = self.settings.root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        progress(f"private test bed in {self.bed.settings.root}")
        self.bed.up(progress=lambda message: progress(f"  bed: {message}"))
        self._clear_queue()

        for stale in ("plane", "pki", "home"):
            shutil.rmtree(root / stale, ignore_errors=True)
        progress("test images into the kubelet's image cache")
        register_test_images(cache_dir=self.home / "images")
        progress("control plane")
        self.plane = ControlPlane(
            root / "plane",
            pki=ClusterPKI(root / "pki"),
            settings=TESTBED_PLANE_SETTINGS,
        )
        self.plane.start()
        self.api = KubeApi(self.plane.layout.admin_kubeconfig, request_timeout_s=60.0)

        progress("hpk-kubelet, with Slurm's commands counted")
        self.calls.path.unlink(missing_ok=True)
        install_wrappers(self.wrappers, self.calls.path, path=self.slurm_env()["PATH"])
        kubeconfig = prepare_kubelet(self.plane)
        env = {
            **self.slurm_env(),
            "HPK_HOME": str(self.home),
            "PATH": f"{self.wrappers}{os.pathsep}{self.slurm_env()['PATH']}",
        }
        with self.kubelet_log.open("wb") as out:
            self.kubelet = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kubelet_py.main",
                    f"--kubeconfig={kubeconfig}",
                    f"--node-ip={self.plane.context.advertise_address}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._wait("the kubelet to connect", self._connected, timeout=120)
        self._wait(f"node {NODE}", self._node_ready, timeout=120)
        progress(f"ready: kubelet pid {self.kubelet.pid}, node {NODE}")

    def stop(self, progress: Progress) -> None:
        if self.kubelet is not None and self.kubelet.poll() is None:
            self.kubelet.terminate()
            try:
                self.kubelet.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kubelet.kill()
                self.kubelet.wait(timeout=10)
        if self.api is not None:
            self.api.close()
        if self.plane is not None:
            progress("stopping the control plane")
            self.plane.stop()
        if self.settings.keep_bed:
            self._clear_queue()
            progress(f"the private bed stays up (SLURM_CONF={self.bed.settings.slurm_conf})")
        else:
            progress("stopping the private bed")
            self.bed.down(progress=lambda message: progress(f"  bed: {message}"))

    def create_namespace(self, name: str) -> None:
        api = self.require_api()
        api.create("/api/v1/namespaces", {"metadata": {"name": name}})
        path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
        self._wait(f"namespace {name}'s service account", lambda: api.get_or_none(path) is not None)

    def require_api(self) -> KubeApi:
        if self.api is None:
            raise RuntimeError("the stack is not started")
        return self.api

    def kubelet_pid(self) -> int:
        if self.kubelet is None or self.kubelet.poll() is not None:
            tail = self.kubelet_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the kubelet is not running; its log ends:\n{tail}")
        return self.kubelet.pid

    # -- helpers ------------------------------------------------------------------------

    def _connected(self) -> bool:
        self.kubelet_pid()
        return CONNECTED_MESSAGE in self.kubelet_log.read_text(errors="replace")

    def _node_ready(self) -> bool:
        try:
            node = self.require_api().get(f"/api/v1/nodes/{NODE}")
        except NotFound:
            return False
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _clear_queue(self) -> None:
        """Cancel whatever an earlier run left in the bed's queue."""
        env = self.slurm_env()
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%A"], capture_output=True, text=True, env=env, check=False
        ).stdout.split()
        if listed:
            subprocess.run(["scancel", *listed], env=env, check=False, capture_output=True)

    def _wait(self, what: str, probe: Callable[[], object], *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout:.0f} s")
