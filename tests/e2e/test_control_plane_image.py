"""The control plane inside the control-plane image (container/control-plane.def).

The image is built by `python -m hpk.controlplane.image` (cached in the tool folder), and the
same launcher as on the host path runs etcd, kube-apiserver, kube-controller-manager and
CoreDNS inside it through `ApptainerRunner`: as root, and as the ordinary user hpk-e2e.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hpk.controlplane import Binaries, ControlPlane, components
from hpk.controlplane.image import ApptainerRunner
from hpk.controlplane.probes import TLSClient, answers
from hpk.pki import ClusterPKI
from hpk.process import start_process
from hpk.testbed.settings import TESTBED_PLANE_SETTINGS
from hpk.toolchain import Toolchain, find_apptainer
from tests.e2e.conftest import UserInstall

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SETTINGS = TESTBED_PLANE_SETTINGS
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "coredns")
HOST_ONLY = "HPK_E2E_HOST_ONLY"
"""Set in the launcher's environment only; a clean container environment lacks it."""


# --- helpers ---------------------------------------------------------------------------------


def kubectl(kubeconfig: Path, *args: str) -> str:
    binary = Toolchain.load().binary("kubectl")
    result = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", "--request-timeout=20s", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def dig_short(port: int, name: str) -> list[str]:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=3", "+short", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.stdout.split()


def image_labels(pid: int) -> dict[str, str]:
    """The labels of the image that is the root filesystem of process `pid`."""
    labels: dict[str, str] = json.loads(
        Path(f"/proc/{pid}/root/.singularity.d/labels.json").read_text()
    )
    return labels


def component_in_container(starter_pid: int) -> psutil.Process:
    """The one process Apptainer's starter `starter_pid` runs in the container."""
    starter = psutil.Process(starter_pid)
    assert starter.name() == "starter", starter.cmdline()
    children = starter.children()
    assert len(children) == 1, [child.cmdline() for child in children]
    return children[0]


def assert_runs_in_the_image(name: str, starter_pid: int, *, uid: int) -> psutil.Process:
    process = component_in_container(starter_pid)
    assert process.cmdline()[0] == f"/usr/local/bin/{name}"
    assert process.uids().real == uid
    pins = Toolchain.load().pins
    labels = image_labels(process.pid)
    assert labels["io.hpk.image"] == "control-plane"
    assert labels["io.hpk.kubernetes-version"] == pins["KUBERNETES_VERSION"]
    assert labels["io.hpk.etcd-version"] == pins["ETCD_VERSION"]
    assert labels["io.hpk.coredns-version"] == pins["COREDNS_VERSION"]
    # Its own process group, so that the starter's forwarded SIGTERM is the only one.
    assert os.getpgid(process.pid) == process.pid != os.getpgid(starter_pid)
    return process


def assert_gone(processes: list[psutil.Process], folder: Path) -> None:
    _, alive = psutil.wait_procs(processes, timeout=15)
    assert alive == []
    left = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(folder) in part for part in process.info["cmdline"] or []):
            left.append(process.info["cmdline"])
    assert left == []


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(toolchain: Toolchain) -> Path:
    """The image, built (or found cached) by the module's command-line entry point."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hpk.controlplane.image"],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    print(
        f"{result.stderr.strip()}\nimage ready after {time.monotonic() - started:.1f} s: "
        f"{path} ({path.stat().st_size / 1e6:.0f} MB)"
    )
    assert path.parent == toolchain.root
    return path


@pytest.fixture(scope="module")
def runner(image: Path, toolchain: Toolchain) -> ApptainerRunner:
    return ApptainerRunner(image, apptainer=find_apptainer(toolchain))


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh folder below /var/tmp that every user can traverse, removed afterwards."""
    folder = Path("/var/tmp") / f"hpk-e2e-image-{uuid.uuid4().hex[:12]}"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def new_plane(root: Path, runner: ApptainerRunner) -> ControlPlane:
    return ControlPlane(
        root / "state",
        pki=ClusterPKI(root / "pki"),
        settings=SETTINGS,
        binaries=Binaries.in_image(),
        runner=runner,
    )


@pytest.fixture(scope="module")
def plane(runner: ApptainerRunner) -> Iterator[ControlPlane]:
    """One control plane in the image, as root, shared by the read-only checks."""
    root = Path("/var/tmp") / f"hpk-e2e-image-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    control_plane = new_plane(root, runner)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(HOST_ONLY, "1")
            control_plane.start()
        print(f"control plane in the image ready: {control_plane.startup_seconds}")
        yield control_plane
    finally:
        control_plane.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- the image -------------------------------------------------------------------------------


def test_image_labels_carry_the_pinned_versions(image: Path, toolchain: Toolchain) -> None:
    result = subprocess.run(
        [find_apptainer(toolchain), "inspect", "--labels", "--json", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    labels = json.loads(result.stdout)["data"]["attributes"]["labels"]
    assert labels["io.hpk.kubernetes-version"] == "1.33.13"
    assert labels["io.hpk.etcd-version"] == toolchain.pins["ETCD_VERSION"]
    assert labels["io.hpk.coredns-version"] == toolchain.pins["COREDNS_VERSION"]


def test_second_build_is_a_cache_hit(image: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hpk.controlplane.image"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(result.stdout.strip()) == image
    assert "cached" in result.stderr
    assert time.monotonic() - started < 30


# --- as root ---------------------------------------------------------------------------------


def test_kubectl_gets_ok_from_readyz(plane: ControlPlane) -> None:
    assert kubectl(plane.layout.admin_kubeconfig, "get", "--raw=/readyz").strip() == "ok"


def test_server_reports_the_pinned_version(plane: ControlPlane) -> None:
    version = json.loads(kubectl(plane.layout.admin_kubeconfig, "version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.33.13"


def test_every_component_runs_inside_the_image(plane: ControlPlane) -> None:
    assert set(plane.processes) == set(COMPONENTS)
    for name, started in plane.processes.items():
        process = assert_runs_in_the_image(name, started.pid, uid=0)
        environment = process.environ()
        assert HOST_ONLY not in environment, f"{name} sees the launcher's environment"
        assert environment.get("PATH", "").startswith("/usr/local/bin:")


def test_coredns_in_the_image_resolves_the_kubernetes_service(plane: ControlPlane) -> None:
    assert dig_short(plane.ports.dns, "kubernetes.default.svc.cluster.local") == ["10.96.0.1"]


def test_stop_is_clean_and_leaves_no_process(scratch: Path, runner: ApptainerRunner) -> None:
    control_plane = new_plane(scratch, runner)
    control_plane.start()
    try:
        print(f"control plane in the image ready: {control_plane.startup_seconds}")
        started = dict(control_plane.processes)
        inside = [
            assert_runs_in_the_image(name, process.pid, uid=0) for name, process in started.items()
        ]
    finally:
        control_plane.stop()
    statuses = {name: process.returncode() for name, process in started.items()}
    # kube-apiserver exits 1 at once on a second SIGTERM: 0 shows that it got only one and
    # shut down cleanly.
    assert statuses["kube-apiserver"] == 0
    assert all(status in (0, -15) for status in statuses.values()), statuses
    starters = [psutil.Process(p.pid) for p in started.values() if psutil.pid_exists(p.pid)]
    assert_gone([*starters, *inside], scratch)
    assert list((scratch / "state" / "run").iterdir()) == []


def test_component_deaf_to_sigterm_is_killed_with_its_starter(
    scratch: Path, runner: ApptainerRunner
) -> None:
    control_plane = new_plane(scratch, runner)
    ctx = control_plane.prepare()
    etcd = components.etcd(ctx)
    process = start_process(etcd.spec, runner=runner)
    try:
        deadline = time.monotonic() + 60
        tls = TLSClient(
            ca=control_plane.pki.etcd_ca.cert, client=control_plane.pki.apiserver_etcd_client
        )
        url = f"{ctx.etcd_url}/health"
        while not answers(url, tls=tls, expect='"health":"true"'):
            assert process.alive() and time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.2)
        inside = assert_runs_in_the_image("etcd", process.pid, uid=0)
        inside.suspend()  # SIGSTOP: the forwarded SIGTERM stays pending
    finally:
        status = process.stop(timeout=2.0)
    assert status == -9  # the starter, killed after the grace time
    assert_gone([inside], scratch)


# --- as an ordinary user ---------------------------------------------------------------------


def wait_for_file(path: Path, driver: subprocess.Popen[str], *, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if driver.poll() is not None:
            pytest.fail(f"the control plane as a user exited with status {driver.returncode}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.5)
    return json.loads(path.read_text())


def test_ordinary_user_runs_the_control_plane_in_the_image(
    scratch: Path,
    image: Path,
    toolchain: Toolchain,
    user_install: UserInstall,
) -> None:
    user = user_install.user
    root = scratch / "user"
    root.mkdir(mode=0o700)
    os.chown(root, user.pw_uid, user.pw_gid)
    driver_log = scratch / "driver.log"
    with driver_log.open("w") as log:
        driver = subprocess.Popen(
            [
                "runuser",
                "-u",
                user.pw_name,
                "--",
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                f"HOME={user.pw_dir}",
                # The script imports the tests' shared settings from the user's copy.
                f"PYTHONPATH={user_install.source}",
                "PYTHONDONTWRITEBYTECODE=1",
                str(user_install.python),
                str(user_install.source / "tests" / "e2e" / "control_plane_as_user.py"),
                str(root),
                str(image),
                find_apptainer(toolchain),
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        try:
            started = wait_for_file(root / "started.json", driver, timeout=400)
        except BaseException:
            print(driver_log.read_text())
            raise
        print(f"control plane in the image as {user.pw_name}: {started['startup_seconds']}")
        kubeconfig = Path(started["admin_kubeconfig"])
        assert kubectl(kubeconfig, "get", "--raw=/readyz").strip() == "ok"
        version = json.loads(kubectl(kubeconfig, "version", "-o", "json"))
        assert version["serverVersion"]["gitVersion"] == "v1.33.13"
        assert dig_short(started["dns_port"], "kubernetes.default.svc.cluster.local") == [
            "10.96.0.1"
        ]
        starters = {name: psutil.Process(pid) for name, pid in started["pids"].items()}
        assert set(starters) == set(COMPONENTS)
        inside = [
            assert_runs_in_the_image(name, starter.pid, uid=user.pw_uid)
            for name, starter in starters.items()
        ]
    finally:
        assert driver.stdin is not None
        driver.stdin.close()  # the driver stops the control plane
        status = driver.wait(timeout=120)
    assert status == 0, driver_log.read_text()
    statuses = json.loads((root / "stopped.json").read_text())["statuses"]
    assert statuses["kube-apiserver"] == 0
    assert_gone([*starters.values(), *inside], scratch)
