"""The control plane as a Slurm job, run by an ordinary user: `hpk up` submits
slurm/hpk.sbatch, kubectl works from the "login node", and scancel, `hpk down` and a second
submission behave as a user expects.

The tests run in file order against one cluster; the last ones stop and restart it.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpk.controlplane.image import ensure_image
from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually

pytestmark = pytest.mark.timeout(300)

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "coredns", "kubelet_py")


class Cluster:
    """The user's cluster, seen from the login node."""

    def __init__(self, install: UserInstall) -> None:
        self.install = install
        self.home = Path(install.user.pw_dir) / ".hpk"
        self.kubeconfig = self.home / "kubeconfig"

    def hpk(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.install.run("hpk", *args)

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        kubectl = Toolchain.load().binary("kubectl")
        env = self.install.env(KUBECONFIG=str(self.kubeconfig))
        return self.install.run(str(kubectl), "--request-timeout=20s", *args, env=env, stdin=stdin)

    def run_pod(self, pod: dict[str, Any]) -> None:
        """Create `pod` and wait until it has Succeeded; fails the test otherwise."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        # The namespace's default service account appears shortly after the namespace.
        deadline = time.monotonic() + 60
        while True:
            created = self.kubectl("create", "-f", "-", stdin=json.dumps(pod))
            if created.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert created.returncode == 0, created.stderr
        waited = self.kubectl(
            "wait",
            "-n",
            namespace,
            f"pod/{name}",
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=180s",
        )
        shown = self.kubectl("get", "pod", "-n", namespace, name, "-o", "yaml").stdout
        assert waited.returncode == 0, waited.stderr + shown

    def record(self) -> dict[str, object]:
        return dict(json.loads((self.home / "control-plane.json").read_text()))

    def job_id(self) -> str:
        return str(self.record()["job_id"])


def pod_manifest(name: str, containers: list[dict[str, Any]]) -> dict[str, Any]:
    """A pod in the namespace `pods` that runs once, without a service-account token."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "pods"},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": containers,
        },
    }


def user_processes(uid: int) -> list[str]:
    """Command lines of the user's control-plane processes still alive."""
    found = []
    for process in psutil.process_iter(["uids", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        owner = process.info["uids"]
        if owner and owner.real == uid and any(name in cmdline for name in COMPONENTS):
            found.append(cmdline)
    return found


def wait_job_gone(job_id: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if out in ("", "COMPLETED", "CANCELLED", "FAILED"):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still in the queue after {timeout} s")


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[Cluster]:
    plane = Cluster(user_install)
    user_install.run("rm", "-rf", str(plane.home))  # freshly generated certificates
    started = time.monotonic()
    up = plane.hpk("up", "--timeout=240")
    print(up.stdout, up.stderr)
    assert up.returncode == 0, f"hpk up failed:\n{up.stdout}\n{up.stderr}"
    print(f"hpk up took {time.monotonic() - started:.1f} s")
    yield plane
    plane.hpk("down")


def test_hpk_up_prints_the_export_line_and_kubectl_works(cluster: Cluster) -> None:
    assert cluster.kubeconfig.exists()
    readyz = cluster.kubectl("get", "--raw=/readyz")
    assert readyz.stdout.strip() == "ok", readyz.stderr
    version = cluster.kubectl("version", "-o", "json")
    assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == "v1.33.13"


def test_the_job_is_the_users_and_runs_in_slurm(cluster: Cluster) -> None:
    job = subprocess.run(
        ["scontrol", "show", "job", cluster.job_id()], capture_output=True, text=True, check=True
    ).stdout
    assert "JobState=RUNNING" in job
    assert "JobName=hpk-control-plane" in job
    assert re.search(rf"UserId={cluster.install.user.pw_name}\(", job)


def test_namespace_and_configmap_round_trip(cluster: Cluster) -> None:
    assert cluster.kubectl("create", "namespace", "e2e").returncode == 0
    created = cluster.kubectl(
        "-n", "e2e", "create", "configmap", "kept", "--from-literal=answer=42"
    )
    assert created.returncode == 0, created.stderr
    read = cluster.kubectl("-n", "e2e", "get", "configmap", "kept", "-o", "jsonpath={.data.answer}")
    assert read.stdout == "42"


def test_a_pod_runs_as_the_users_slurm_job(cluster: Cluster) -> None:
    busybox = ensure_test_images()["docker.io/library/busybox:latest"]
    imported = cluster.hpk("images", "import", "docker.io/library/busybox:latest", str(busybox))
    assert imported.returncode == 0, imported.stderr
    cluster.kubectl("create", "namespace", "pods")
    pod = pod_manifest(
        "whoami",
        [
            {"name": "main", "image": "busybox", "command": ["id", "-u"]},
            # An ordinary user becomes root in a user namespace (--fakeroot) ...
            {
                "name": "root",
                "image": "busybox",
                "command": ["id", "-u"],
                "securityContext": {"runAsUser": 0},
            },
            # ... and cannot become another user: it runs as itself, with a Warning.
            {
                "name": "other",
                "image": "busybox",
                "command": ["id", "-u"],
                "securityContext": {"runAsUser": 4321},
            },
        ],
    )
    cluster.run_pod(pod)
    annotations = cluster.kubectl(
        "get", "pod", "-n", "pods", "whoami", "-o", "jsonpath={.metadata.annotations}"
    )
    job_id = json.loads(annotations.stdout)["slurm.hpk.io/job-id"]
    wanted = f"{cluster.install.user.pw_name}|COMPLETED"

    def accounted() -> bool:
        line = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "User,State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return line == wanted

    eventually(f"sacct: job {job_id} {wanted}", accounted, timeout=30)
    uid = str(cluster.install.user.pw_uid)
    for container, wanted_uid in (("main", uid), ("root", "0"), ("other", uid)):
        logs = cluster.kubectl("logs", "-n", "pods", "whoami", "-c", container)
        assert logs.stdout.strip() == wanted_uid, (container, logs.stderr)
    events = cluster.kubectl(
        "get", "events", "-n", "pods", "--field-selector=involvedObject.name=whoami"
    ).stdout
    assert "SecurityContextNotHonoured" in events and "runAsUser 4321" in events, events


def test_a_container_signalling_everything_reaches_only_its_own_processes(
    cluster: Cluster,
) -> None:
    # kill -1 signals every process the sender may signal: in the node's PID namespace that
    # is all of the user's processes there, the control plane's included. Each container
    # has PIDs of its own, so only its own processes are hit.
    command = ["sh", "-c", "sleep 60 & kill -TERM -1; wait; echo survived"]
    cluster.run_pod(
        pod_manifest("kill-all", [{"name": "main", "image": "busybox", "command": command}])
    )
    logs = cluster.kubectl("logs", "-n", "pods", "kill-all")
    assert "survived" in logs.stdout, logs.stdout + logs.stderr
    assert cluster.kubectl("get", "--raw=/readyz").stdout.strip() == "ok"
    assert cluster.record()["state"] == "ready"


def test_coredns_resolves_the_kubernetes_service(cluster: Cluster) -> None:
    ports = json.loads((cluster.home / "control-plane" / "ports.json").read_text())
    endpoint = str(cluster.record()["apiserver"])
    address = endpoint.removeprefix("https://").rsplit(":", 1)[0]
    answer = subprocess.run(
        [
            "dig",
            f"@{address}",
            "-p",
            str(ports["dns"]),
            "+short",
            "+time=2",
            "+tries=5",
            "kubernetes.default.svc.cluster.local",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.stdout.strip() == "10.96.0.1", answer


def test_anonymous_request_gets_401(cluster: Cluster) -> None:
    endpoint = str(cluster.record()["apiserver"])
    context = ssl.create_default_context(cafile=str(cluster.home / "pki" / "ca.crt"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{endpoint}/api/v1/namespaces", context=context, timeout=10)  # noqa: S310
    refused.value.close()
    assert refused.value.code == 401


def test_hpk_folder_is_private(cluster: Cluster) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(cluster.home) == 0o700
    assert mode(cluster.kubeconfig) == 0o600
    keys = list(cluster.home.rglob("*.key"))
    assert len(keys) >= 10
    assert {path.name: mode(path) for path in keys} == {path.name: 0o600 for path in keys}
    kubeconfigs = list((cluster.home / "control-plane" / "kubeconfigs").glob("*.conf"))
    assert kubeconfigs and all(mode(path) == 0o600 for path in kubeconfigs)


def test_status_shows_job_endpoint_health_and_certificates(cluster: Cluster) -> None:
    shown = cluster.hpk("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"job:        {cluster.job_id()} (RUNNING)" in shown.stdout
    for component in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "coredns",
        "hpk-kubelet",
    ):
        assert re.search(rf"{component}\s+healthy", shown.stdout), shown.stdout
    assert re.search(r"apiserver\s+issued 0 d ago, expires in 36[45] d", shown.stdout)


def test_second_up_starts_nothing(cluster: Cluster) -> None:
    before = cluster.job_id()
    again = cluster.hpk("up")
    assert again.returncode == 0
    assert f"already running: job {before}" in again.stdout
    assert cluster.job_id() == before


def test_second_control_plane_on_the_same_folder_is_refused(cluster: Cluster) -> None:
    second = cluster.install.run("hpk", "control-plane", "run", timeout=60)
    assert second.returncode == 1
    assert f"a control plane already runs on {cluster.home}: job {cluster.job_id()}" in (
        second.stderr
    )
    assert cluster.kubectl("get", "--raw=/readyz").stdout.strip() == "ok"


def test_scancel_stops_everything_and_a_new_job_resumes_the_data(cluster: Cluster) -> None:
    job_id = cluster.job_id()
    cancelled = cluster.install.run("scancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    wait_job_gone(job_id)
    uid = cluster.install.user.pw_uid
    deadline = time.monotonic() + 30
    while user_processes(uid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert user_processes(uid) == []

    up = cluster.hpk("up", "--timeout=240")
    assert up.returncode == 0, up.stdout + up.stderr
    assert cluster.job_id() != job_id
    read = cluster.kubectl("-n", "e2e", "get", "configmap", "kept", "-o", "jsonpath={.data.answer}")
    assert read.stdout == "42"


def test_hpk_down_stops_the_components_in_order(cluster: Cluster) -> None:
    job_id = cluster.job_id()
    down = cluster.hpk("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped (stopped)" in down.stdout
    output = (cluster.home / "logs" / f"control-plane-{job_id}.out").read_text()
    order = [
        output.index(f"stopping {name} (pid")
        for name in ("hpk-kubelet", "kube-controller-manager", "kube-apiserver", "etcd")
    ]
    assert order == sorted(order), output
    assert user_processes(cluster.install.user.pw_uid) == []
    assert cluster.record()["state"] == "stopped"


def test_missing_binary_fails_the_job_fast_and_names_it(
    user_install: UserInstall, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = Path(user_install.user.pw_dir) / ".hpk-missing-tools"
    user_install.run("rm", "-rf", str(home))
    env = user_install.env(HPK_HOME=str(home), HPK_TOOLS_DIR="/var/tmp/no-such-tool-folder")
    started = time.monotonic()
    up = user_install.run("hpk", "up", "--timeout=120", env=env)
    assert up.returncode == 1
    assert time.monotonic() - started < 60
    assert "is not in the tool folder /var/tmp/no-such-tool-folder" in up.stdout, up.stdout
    user_install.run("rm", "-rf", str(home))


def test_control_plane_runs_from_its_image(user_install: UserInstall) -> None:
    image = ensure_image()
    home = Path(user_install.user.pw_dir) / ".hpk-image"
    user_install.run("rm", "-rf", str(home))
    env = user_install.env(HPK_HOME=str(home), HPK_CONTROL_PLANE_IMAGE=str(image))
    try:
        up = user_install.run("hpk", "up", "--timeout=240", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        kubectl = Toolchain.load().binary("kubectl")
        readyz = user_install.run(
            str(kubectl), f"--kubeconfig={home}/kubeconfig", "get", "--raw=/readyz", env=env
        )
        assert readyz.stdout.strip() == "ok", readyz.stderr
        for component in ("etcd", "kube-apiserver", "kube-controller-manager", "coredns"):
            started = (home / "control-plane" / "logs" / f"{component}.log").read_text()
            assert re.search(rf"hpk starts: \S*apptainer exec .*{re.escape(image.stem)}", started)
        assert user_install.run("hpk", "down", env=env).returncode == 0
        assert user_processes(user_install.user.pw_uid) == []
    finally:
        user_install.run("hpk", "down", env=env)
        # The copy of the image unpacked without FUSE lives in node-local scratch, in the
        # folder mkdtemp made for it (about 320 MB): removed with the test's hpk folder.
        for record in (home / "scratch").glob("*.json"):
            copy = Path(json.loads(record.read_text())["path"])
            user_install.run("rm", "-rf", str(copy.parent))
        user_install.run("rm", "-rf", str(home))


def test_missing_image_fails_the_job_fast_and_names_it(user_install: UserInstall) -> None:
    home = Path(user_install.user.pw_dir) / ".hpk-missing-image"
    user_install.run("rm", "-rf", str(home))
    env = user_install.env(HPK_HOME=str(home), HPK_CONTROL_PLANE_IMAGE="/var/tmp/none.sif")
    up = user_install.run("hpk", "up", "--timeout=120", env=env)
    assert up.returncode == 1
    assert "the control-plane image /var/tmp/none.sif does not exist" in up.stdout, up.stdout
    user_install.run("rm", "-rf", str(home))


def test_sbatch_script_directly_as_root(testbed: object, tmp_path: Path) -> None:
    """The script works on its own, without `hpk up`, for users who prefer plain sbatch."""
    home = Path("/var/tmp") / f"hpk-direct-{os.getpid()}"
    env = {**os.environ, "HPK_HOME": str(home), "HPK_PYTHON": sys.executable}
    script = Path(__file__).resolve().parents[2] / "slurm" / "hpk.sbatch"
    try:
        job = subprocess.run(
            ["sbatch", "--parsable", f"--output={tmp_path}/out-%j.txt", str(script)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        deadline = time.monotonic() + 180
        kubeconfig = home / "kubeconfig"
        while not kubeconfig.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kubeconfig.exists(), (tmp_path / f"out-{job}.txt").read_text()
        kubectl = Toolchain.load().binary("kubectl")
        readyz = subprocess.run(
            [str(kubectl), f"--kubeconfig={kubeconfig}", "get", "--raw=/readyz"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert readyz.stdout.strip() == "ok", readyz.stderr
        subprocess.run(["scancel", job], check=True)
        wait_job_gone(job)
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)
