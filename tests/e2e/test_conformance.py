"""Kubernetes' conformance tests of [sig-network] (`e2e.test`, built from the pinned module)
against an ordinary user's hpk cluster.

The test suite runs a few of them, chosen to cover what hpk implements (ClusterIP Services
through kube-proxy and cluster DNS, pod-to-pod traffic, the API server's Service), and all
must pass. The DNS tests are not among them: they read their results through the API
server's pod proxy, which cannot reach the pod network yet. `make conformance` runs all of
them (HPK_CONFORMANCE=all) and prints passed / total with the reason of each failure; that
run is not expected to pass whole, and it fails only if the suite itself could not run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpk.testbed import conformance
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall

ALL = os.environ.get("HPK_CONFORMANCE") == "all"
pytestmark = pytest.mark.timeout(4 * 3600 if ALL else 1200)

SUBSET = (
    "Services should serve a basic endpoint from pods",
    "Services should serve multiport endpoints from pods",
    "Networking Granular Checks: Pods should function for intra-pod communication: http",
    "Services should provide secure master service",
    "EndpointSlice should have Endpoints and EndpointSlices pointing to API Server",
)
"""The tests the suite runs in CI: each is one `It` of the [sig-network] conformance set."""

KEPT_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
"""The namespaces of the cluster itself, left in place when the suite's own are cleared."""


class ConformanceCluster:
    def __init__(self, install: UserInstall) -> None:
        self.install = install
        self.home = Path(install.user.pw_dir) / ".hpk-conformance"
        self.kubeconfig = self.home / "kubeconfig"

    def env(self) -> dict[str, str]:
        return self.install.env(HPK_HOME=str(self.home), KUBECONFIG=str(self.kubeconfig))

    def hpk(self, *args: str, timeout: float = 300) -> str:
        done = self.install.run("hpk", *args, env=self.env(), timeout=timeout)
        assert done.returncode == 0, f"hpk {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def clear_pods(self, timeout: float = 240) -> None:
        """Delete the namespaces the suite made and wait until their pods are gone.

        e2e.test deletes each test's namespace without waiting for it, and the pods' jobs
        outlive `hpk down` (as they do for any user: a new control-plane job takes them back).
        """
        listed = self.install.run(
            "kubectl", "get", "namespaces", "-o", "name", env=self.env(), timeout=60
        )
        ours = [
            name
            for name in listed.stdout.split()
            if name.removeprefix("namespace/") not in KEPT_NAMESPACES
        ]
        if ours:
            self.install.run("kubectl", "delete", "--wait=false", *ours, env=self.env(), timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pods = self.install.run(
                "kubectl", "get", "pods", "-A", "-o", "name", env=self.env(), timeout=60
            )
            if pods.returncode == 0 and not pods.stdout.strip():
                return
            time.sleep(2)

    def cancel_leftover_jobs(self) -> None:
        """Cancel any job still running from this cluster's folder (a pod the API server
        could not delete in time); other tests count the user's processes."""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            queue = self.install.run("squeue", "--me", "-h", "-o", "%i|%Z", timeout=60)
            leftover = [
                job
                for job, _, folder in (line.partition("|") for line in queue.stdout.splitlines())
                if folder.startswith(f"{self.home}/")
            ]
            if not leftover:
                return
            self.install.run("scancel", *leftover, timeout=60)
            time.sleep(2)


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[ConformanceCluster]:
    tools = Toolchain.load()
    images = conformance.ensure_conformance_images(tools)
    made = ConformanceCluster(user_install)
    user_install.run("rm", "-rf", str(made.home))
    try:
        made.hpk("up", "--timeout=240")
        for reference, path in images.items():
            made.hpk("images", "import", reference, str(path))
        yield made
    finally:
        made.clear_pods()
        user_install.run("hpk", "down", env=made.env(), timeout=300)
        made.cancel_leftover_jobs()
        user_install.run("rm", "-rf", str(made.home))


def test_sig_network_conformance(cluster: ConformanceCluster, tmp_path: Path) -> None:
    tools = Toolchain.load()
    report = cluster.home / "conformance-report"
    if ALL:
        focus = conformance.FOCUS
    else:
        focus = "|".join(rf"\[sig-network\] {re.escape(name)}" for name in SUBSET)
    started = time.monotonic()
    run = cluster.install.run(
        str(tools.binary("e2e.test")),
        *conformance.e2e_arguments(
            kubeconfig=cluster.kubeconfig, report_dir=report, focus=focus, skip=conformance.SKIP
        ),
        env=cluster.env(),
        timeout=4 * 3600 - 600 if ALL else 1100,
    )
    took = time.monotonic() - started
    saved = tmp_path / "e2e.log"
    saved.write_text(run.stdout + run.stderr)
    junit = report / "junit_01.xml"
    assert cluster.install.run("test", "-f", str(junit)).returncode == 0, (
        f"e2e.test wrote no report (exit {run.returncode}); the end of its output:\n"
        + (run.stdout + run.stderr)[-4000:]
    )
    copy = tmp_path / "junit.xml"
    shutil.copyfile(junit, copy)
    results = conformance.junit_results(copy)
    told = conformance.summary(results)
    print(f"conformance ({'all' if ALL else 'subset'}) in {took:.0f} s: {told}")
    ran = [r for r in results if r.outcome != "skipped"]
    if ALL:
        assert ran, told
        return
    names = {r.name for r in ran if "[sig-network]" in r.name}
    assert len(names) == len(SUBSET), (names, told)
    assert all(r.outcome == "passed" for r in ran), told + "\n" + (run.stdout + run.stderr)[-6000:]
