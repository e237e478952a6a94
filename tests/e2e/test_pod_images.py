"""Images as Kubernetes users expect them, end to end: an image's ENTRYPOINT and CMD with the
pod's `command` and `args` (Docker's rules), a pod whose image cannot be pulled waiting with
ErrImagePull and ImagePullBackOff until the image is imported by hand, imagePullPolicy Never,
and `hpk images import` of a sandbox folder and of a docker-archive (`docker save` output).

No registry is reachable here: pulls of `127.0.0.1:1/...` fail at once with Apptainer's
"connection refused", which is what a user behind a firewall sees too. A real pull is proven
against a registry the test serves on the loopback (tests/e2e/registry.py): two pods share
one pull of a tag, and a third pulls the same image by its digest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.kube import PodCluster, pod_cluster
from tests.e2e.registry import Registry, serving

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-images"
ENTRYPOINT = "hpk.test/entrypoint:1"
BUSYBOX = "docker.io/library/busybox:latest"
UNREACHABLE = "127.0.0.1:1/e2e/late:1"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


def manifest(name: str, image: str, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", "image": image, **container}],
        },
    }


def stdout_lines(cluster: PodCluster, name: str) -> list[str]:
    log = (cluster.folder(name) / "containers" / "main" / "log").read_text()
    return [line.split(" ", 2)[2] for line in log.splitlines() if " stdout " in line]


def hpk_images(cluster: PodCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`hpk images ...` as the user runs it, with the kubelet's hpk home."""
    return subprocess.run(
        [sys.executable, "-m", "hpk.cli", "images", *args],
        env={**os.environ, "HPK_HOME": str(cluster.home)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def waiting_reason(cluster: PodCluster, name: str) -> tuple[str, str]:
    pod = cluster.pod(name) or {}
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    waiting = statuses[0].get("state", {}).get("waiting") or {}
    return waiting.get("reason", ""), waiting.get("message", "")


def wait_for_reason(cluster: PodCluster, name: str, reason: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found, message = waiting_reason(cluster, name)
        if found == reason:
            return message
        time.sleep(0.5)
    pytest.fail(
        f"pod {name} did not wait with {reason} within {timeout:.0f} s: "
        f"{(cluster.pod(name) or {}).get('status')}\n{cluster.log()[-3000:]}"
    )


def test_entrypoint_and_cmd_follow_docker(cluster: PodCluster) -> None:
    cluster.apply(
        manifest("default-run", ENTRYPOINT),
        manifest("args-only", ENTRYPOINT, args=["from-args", "two words"]),
        manifest("with-command", ENTRYPOINT, command=["echo", "from-command"], args=["arg"]),
        manifest("busybox-args", BUSYBOX, args=["echo", "args replace CMD sh"]),
    )
    for name in ("default-run", "args-only", "with-command", "busybox-args"):
        cluster.phase(name, "Succeeded")
    # Neither: ENTRYPOINT + CMD, in the image's WORKDIR.
    assert stdout_lines(cluster, "default-run") == ["entrypoint: default-cmd (in /srv)"]
    # args replace CMD and go to the ENTRYPOINT.
    assert stdout_lines(cluster, "args-only") == ["entrypoint: from-args two words (in /srv)"]
    # command replaces ENTRYPOINT; CMD is dropped.
    assert stdout_lines(cluster, "with-command") == ["from-command arg"]
    # busybox's CMD is ["sh"] and it has no ENTRYPOINT: args are the whole command.
    assert stdout_lines(cluster, "busybox-args") == ["args replace CMD sh"]


def test_unpullable_image_waits_until_it_is_imported(cluster: PodCluster) -> None:
    cluster.apply(manifest("late-image", UNREACHABLE, command=["echo", "imported by hand"]))
    message = wait_for_reason(cluster, "late-image", "ErrImagePull")
    assert f'Failed to pull image "{UNREACHABLE}"' in message, message
    assert "connection refused" in message, message
    wait_for_reason(cluster, "late-image", "ImagePullBackOff", timeout=30)
    pod = cluster.pod("late-image") or {}
    assert pod["status"]["phase"] == "Pending"
    assert not (cluster.folder("late-image") / "job-id").exists(), "nothing was submitted"
    events = cluster.events("late-image")
    assert "Warning" in events and UNREACHABLE in events and "connection refused" in events

    sif = ensure_test_images()[BUSYBOX]
    imported = hpk_images(cluster, "import", UNREACHABLE, str(sif))
    assert imported.returncode == 0, imported.stderr
    cluster.phase("late-image", "Succeeded", timeout=120)
    assert stdout_lines(cluster, "late-image") == ["imported by hand"]


def test_images_are_pulled_from_a_registry_once_by_tag_and_by_digest(
    cluster: PodCluster,
) -> None:
    archive = ensure_test_images()[ENTRYPOINT]
    registry = Registry()
    digest = registry.add_archive(archive, "e2e/pulled", "1")
    with serving(registry) as address:
        by_tag = f"{address}/e2e/pulled:1"
        by_digest = f"{address}/e2e/pulled@{digest}"
        cluster.apply(
            manifest("pulled-a", by_tag),
            manifest("pulled-b", by_tag, args=["second"]),
            manifest("pulled-digest", by_digest, args=["by-digest"]),
        )
        for name in ("pulled-a", "pulled-b", "pulled-digest"):
            cluster.phase(name, "Succeeded")
    assert stdout_lines(cluster, "pulled-a") == ["entrypoint: default-cmd (in /srv)"]
    assert stdout_lines(cluster, "pulled-b") == ["entrypoint: second (in /srv)"]
    assert stdout_lines(cluster, "pulled-digest") == ["entrypoint: by-digest (in /srv)"]
    # Each blob (config, layer) was fetched once per cache entry, the tag's and the digest's:
    # the tag's two pods shared one pull.
    fetched = [
        line.rsplit("/blobs/", 1)[1]
        for line in registry.requests
        if line.startswith("GET ") and "/blobs/" in line
    ]
    assert sorted(fetched) == sorted([*registry.blobs] * 2), registry.requests
    listed = hpk_images(cluster, "list")
    assert listed.returncode == 0, listed.stderr
    assert f"{address}/e2e/pulled:1" in listed.stdout, listed.stdout
    assert by_digest in listed.stdout, listed.stdout
    events = cluster.events("pulled-a")
    assert "Pulling" in events, events


def test_never_pull_of_a_missing_image(cluster: PodCluster) -> None:
    cluster.apply(manifest("never", "hpk.test/absent:1", imagePullPolicy="Never"))
    message = wait_for_reason(cluster, "never", "ErrImageNeverPull")
    assert 'Container image "hpk.test/absent:1" is not present with pull policy of Never' in message
    assert (cluster.pod("never") or {})["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "never", "--wait=false")


def test_import_of_a_sandbox_and_a_docker_archive(
    cluster: PodCluster, toolchain: Toolchain, tmp_path: Path
) -> None:
    archive = ensure_test_images()[ENTRYPOINT]
    sandbox = tmp_path / "sandbox"
    apptainer = str(toolchain.binary("apptainer"))
    built = subprocess.run(
        [apptainer, "--quiet", "build", "--sandbox", str(sandbox), f"docker-archive:{archive}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    for reference, source in (("hpk.test/sandbox:1", sandbox), ("hpk.test/archive:1", archive)):
        imported = hpk_images(cluster, "import", reference, str(source))
        assert imported.returncode == 0, imported.stderr
    listed = hpk_images(cluster, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert 'ENTRYPOINT ["/bin/sh"' in rows["hpk.test/archive:1"], listed.stdout
    assert "WORKDIR /srv" in rows["hpk.test/archive:1"], listed.stdout
    # A sandbox keeps the words (in its runscript), not the WORKDIR.
    assert 'CMD ["default-cmd"]' in rows["hpk.test/sandbox:1"], listed.stdout

    cluster.apply(
        manifest("from-sandbox", "hpk.test/sandbox:1", args=["sandbox"]),
        manifest("from-archive", "hpk.test/archive:1"),
    )
    cluster.phase("from-sandbox", "Succeeded")
    cluster.phase("from-archive", "Succeeded")
    assert stdout_lines(cluster, "from-sandbox") == ["entrypoint: sandbox (in /)"]
    assert stdout_lines(cluster, "from-archive") == ["entrypoint: default-cmd (in /srv)"]
