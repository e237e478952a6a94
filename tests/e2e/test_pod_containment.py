"""Pods are contained, end to end, as an ordinary user runs hpk: a container sees only what its
pod spec gives it.

The user `hpk-e2e` runs `hpk up`; every pod below is a Slurm job of that user, and its
containers run under Apptainer with the user's own rights. Even so:
- the user's home, the cluster's keys and the admin kubeconfig are out of reach, and HOME is
  the image's, never the host's;
- writes to /tmp and to the image's own file system succeed, stay private to the container
  and are gone when it ends; `readOnlyRootFilesystem` makes the image read-only again;
- what a container writes at its terminationMessagePath becomes its terminated state's
  message (FallbackToLogsOnError: the end of its log).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually
from tests.e2e.user_cluster import UserCluster, user_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAMESPACE = "contained"


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[UserCluster]:
    with user_cluster(user_install, folder=".hpk-containment", namespace=NAMESPACE) as running:
        yield running


def pod(name: str, *containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": list(containers),
        },
    }


def shell(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def job_of(found: dict[str, Any]) -> str:
    return str(found["metadata"]["annotations"]["slurm.hpk.io/job-id"])


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.strip()


def test_a_pod_reaches_neither_the_users_home_nor_the_clusters_keys(
    cluster: UserCluster,
) -> None:
    home = Path(cluster.install.user.pw_dir)
    marker = home / f"private-{uuid.uuid4().hex[:8]}"
    cluster.run("sh", "-c", f"echo mine > {marker}")
    secrets = [cluster.home / "pki" / "ca.key", cluster.kubeconfig, marker]
    for path in secrets:
        assert cluster.run("test", "-r", str(path)).returncode == 0, f"{path} must exist"
    tries = " ".join(str(path) for path in secrets)
    script = (
        'echo "HOME=$HOME"; '
        f"for f in {tries}; do "
        'if cat "$f" >/dev/null 2>&1; then echo "READ $f"; else echo "unreadable $f"; fi; done; '
        f'ls -a {home} "$HOME" /home /tmp 2>&1 | sed "s/^/seen: /"'
    )
    try:
        cluster.create(pod("snoop", shell("main", script)))
        found = cluster.ended("snoop")
        assert found["status"]["phase"] == "Succeeded", found["status"]
        log = cluster.logs("snoop")
    finally:
        marker.unlink(missing_ok=True)
    assert "HOME=/\n" in log  # busybox lists no such user: Kubernetes' HOME is /
    for path in secrets:
        assert f"unreadable {path}\n" in log, log
    seen = "\n".join(line for line in log.splitlines() if line.startswith("seen: "))
    assert "READ" not in log, log
    assert f"seen: ls: {home}: No such file or directory" in seen, log
    assert marker.name not in seen and ".hpk-containment" not in seen, log
    print(f"job {job_of(found)}: {sacct_state(job_of(found))}")
    assert sacct_state(job_of(found)) == "COMPLETED"


def test_writes_to_tmp_and_the_image_are_private_and_gone_at_the_end(
    cluster: UserCluster,
) -> None:
    token = f"t{uuid.uuid4().hex[:10]}"
    write = (
        f"echo {token} >/tmp/{token} && mkdir -p /var/lib/x && echo {token} >/var/lib/x/{token}"
        f" && echo {token} >/var/tmp/{token} && cat /tmp/{token} /var/lib/x/{token} && "
        "echo written && sleep 15"
    )
    read_only = (
        "if touch /var/lib/ro-test 2>/dev/null; then echo writable; else echo read-only; fi; "
        "echo ok >/tmp/scratch && echo tmp-writable"
    )
    cluster.create(
        pod(
            "writer",
            shell("main", write),
            shell("readonly", read_only, securityContext={"readOnlyRootFilesystem": True}),
        )
    )
    eventually(
        "the writer's files",
        lambda: (
            "written"
            in cluster.kubectl("logs", "-n", NAMESPACE, "writer", "-c", "main", check=False)
        ),
        timeout=120,
    )
    outside = [Path("/tmp") / token, Path("/var/tmp") / token, Path("/var/lib/x") / token]
    assert not any(path.exists() for path in outside), "the files must not reach the host"
    writer = cluster.ended("writer")
    assert writer["status"]["phase"] == "Succeeded", writer["status"]
    assert cluster.logs("writer", "main").splitlines()[:3] == [token, token, "written"]
    assert cluster.logs("writer", "readonly").splitlines() == ["read-only", "tmp-writable"]

    cluster.create(
        pod(
            "reader",
            shell("main", f"ls /tmp/{token} /var/lib/x/{token} /var/tmp/{token}; echo rc=$?"),
        )
    )
    assert cluster.ended("reader")["status"]["phase"] == "Succeeded"
    assert cluster.logs("reader").strip().endswith("rc=1")
    assert token not in cluster.logs("reader").replace(f"/{token}", "")  # only the names asked
    # The job removed its node-local folders when it ended: nothing of the writer is left.
    job_id = job_of(writer)
    assert sacct_state(job_id) == "COMPLETED"
    searched = ["/tmp", "/var/tmp", "/dev/shm", cluster.install.user.pw_dir]
    names = ["(", "-name", token, "-o", "-name", f"hpk-job-{job_id}.*", ")"]
    found = subprocess.run(
        ["find", *searched, "-xdev", *names],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert found == "", f"left on the host: {found}"


def test_the_termination_message_is_the_containers_state_message(cluster: UserCluster) -> None:
    cluster.create(
        pod(
            "says",
            shell("file", "echo 'finished: 42 items' >/dev/termination-log; exit 3"),
            shell(
                "fallback",
                "echo first; echo the last words; exit 2",
                terminationMessagePolicy="FallbackToLogsOnError",
            ),
            shell(
                "elsewhere",
                "echo 'from /tmp' >/tmp/message",
                terminationMessagePath="/tmp/message",
            ),
        )
    )
    found = cluster.ended("says")
    assert found["status"]["phase"] == "Failed"
    states = {s["name"]: s["state"]["terminated"] for s in found["status"]["containerStatuses"]}
    assert (states["file"]["exitCode"], states["file"]["message"]) == (3, "finished: 42 items\n")
    assert states["fallback"]["exitCode"] == 2
    assert states["fallback"]["message"] == "first\nthe last words"
    assert (states["elsewhere"]["exitCode"], states["elsewhere"].get("message")) == (
        0,
        "from /tmp\n",
    )
    assert sacct_state(job_of(found)) == "FAILED"


def test_a_secret_expanded_into_args_is_warned_of(cluster: UserCluster) -> None:
    cluster.kubectl(
        "create", "secret", "generic", "api", "-n", NAMESPACE, "--from-literal=token=s3cr3t"
    )
    leaky = shell("main", 'echo "token given"', args=["--token=$(TOKEN)"])
    leaky["command"] = ["sh", "-c", 'echo "given: ${1#--token=}" | tr a-z A-Z', "sh"]
    leaky["env"] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}
    ]
    cluster.create(pod("leaky", leaky))
    found = cluster.ended("leaky")
    assert found["status"]["phase"] == "Succeeded", found["status"]
    assert cluster.logs("leaky").strip() == "GIVEN: S3CR3T"  # Kubernetes expands it: it runs
    warned = [e for e in cluster.events("leaky") if e["reason"] == "SecretInArguments"]
    assert warned and warned[0]["type"] == "Warning", cluster.events("leaky")
    assert "spec.containers[0].args[0] expands TOKEN from a Secret" in warned[0]["message"]
