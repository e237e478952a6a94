"""An ordinary user's own hpk cluster, as the user runs it: `hpk up` from the "login node",
kubectl with the user's kubeconfig, and `hpk down` at the end."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually

BUSYBOX = "docker.io/library/busybox:latest"


class UserCluster:
    """The user's hpk cluster in a home of its own (`~/<folder>`), with one namespace."""

    def __init__(self, install: UserInstall, *, folder: str, namespace: str) -> None:
        self.install = install
        self.namespace = namespace
        self.home = Path(install.user.pw_dir) / folder
        self.kubeconfig = self.home / "kubeconfig"

    def run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = self.install.env(HPK_HOME=str(self.home), KUBECONFIG=str(self.kubeconfig))
        return self.install.run(*argv, env=env, stdin=stdin)

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        kubectl = str(Toolchain.load().binary("kubectl"))
        done = self.run(kubectl, "--request-timeout=20s", *args, stdin=stdin)
        assert not check or done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def create(self, manifest: dict[str, Any]) -> None:
        self.kubectl("create", "-n", self.namespace, "-f", "-", stdin=json.dumps(manifest))

    def pod(self, name: str) -> dict[str, Any]:
        out = self.kubectl("get", "pod", "-n", self.namespace, name, "-o", "json")
        return dict(json.loads(out))

    def ended(self, name: str, timeout: float = 180) -> dict[str, Any]:
        """The pod once it is Succeeded or Failed."""

        def done() -> dict[str, Any] | None:
            pod = self.pod(name)
            return pod if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        return dict(eventually(f"pod {name} ended", done, timeout=timeout))

    def logs(self, name: str, container: str = "main") -> str:
        return self.kubectl("logs", "-n", self.namespace, name, "-c", container)

    def events(self, name: str) -> list[dict[str, Any]]:
        selector = f"--field-selector=involvedObject.name={name}"
        out = self.kubectl("get", "events", "-n", self.namespace, selector, "-o", "json")
        return list(json.loads(out)["items"])

    def control_plane_job(self) -> str:
        return str(json.loads((self.home / "control-plane.json").read_text())["job_id"])


@contextlib.contextmanager
def user_cluster(install: UserInstall, *, folder: str, namespace: str) -> Iterator[UserCluster]:
    """The user's cluster up, with busybox in its image cache and `namespace` ready; down
    after the block, whatever happened."""
    cluster = UserCluster(install, folder=folder, namespace=namespace)
    cluster.run("rm", "-rf", str(cluster.home))
    up = cluster.run("hpk", "up", "--timeout=240")
    assert up.returncode == 0, f"hpk up failed:\n{up.stdout}\n{up.stderr}"
    try:
        busybox = ensure_test_images()[BUSYBOX]
        imported = cluster.run("hpk", "images", "import", BUSYBOX, str(busybox))
        assert imported.returncode == 0, imported.stderr
        cluster.kubectl("create", "namespace", namespace)
        eventually(
            "the namespace's default service account",
            lambda: cluster.kubectl(
                "get", "serviceaccount", "default", "-n", namespace, check=False
            ),
        )
        yield cluster
    finally:
        cluster.run("hpk", "down")
