"""Storage volumes end to end: a PersistentVolumeClaim without a class bound through the
default `hpk-local` class, written by one pod and read by the next, and gone with its folder
once deleted; hostPath volumes checked on the node (a missing Directory fails the pod with a
message naming the volume and the type, DirectoryOrCreate makes it); an emptyDir on memory
that the container sees as tmpfs and that is gone after the job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-storage"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


def log_lines(cluster: PodCluster, name: str) -> list[str]:
    log = (cluster.folder(name) / "containers" / "main" / "log").read_text()
    return [line.split(" ", 2)[2] for line in log.splitlines() if " stdout " in line]


def with_volume(
    cluster: PodCluster, name: str, script: str, volume: dict[str, Any], mount: str
) -> dict[str, Any]:
    manifest = cluster.manifest(name, ["sh", "-c", script])
    manifest["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": mount}]
    manifest["spec"]["volumes"] = [{"name": "v", **volume}]
    return manifest


def get_json(cluster: PodCluster, *args: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return dict(json.loads(out)) if out.strip() else None


def test_claim_without_a_class_is_provisioned_shared_and_deleted(cluster: PodCluster) -> None:
    storage_class = eventually(
        "the hpk-local StorageClass", lambda: get_json(cluster, "storageclass", "hpk-local")
    )
    annotations = storage_class["metadata"]["annotations"]
    assert annotations["storageclass.kubernetes.io/is-default-class"] == "true"
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    volume = {"persistentVolumeClaim": {"claimName": "data"}}
    cluster.apply(
        claim,
        with_volume(cluster, "writer", "echo 'kept across pods' >/data/note", volume, "/data"),
    )
    # The admission plugin gave the claim the default class; the binder bound it.
    bound = eventually(
        "the claim Bound",
        lambda: (
            (found := get_json(cluster, "pvc", "-n", NAMESPACE, "data"))
            and found.get("status", {}).get("phase") == "Bound"
            and found
        ),
        timeout=60,
    )
    assert bound["spec"]["storageClassName"] == "hpk-local"
    pv_name = bound["spec"]["volumeName"]
    pv = get_json(cluster, "pv", pv_name) or {}
    folder = Path(pv["spec"]["hostPath"]["path"])
    assert folder.parent == cluster.home / "volumes"
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "hpk.io/local"
    assert pv["spec"]["capacity"]["storage"] == "1Gi"
    cluster.phase("writer", "Succeeded")
    assert (folder / "note").read_text() == "kept across pods\n"

    reader = with_volume(
        cluster,
        "reader",
        "cat /data/note",
        {"persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
        "/data",
    )
    cluster.apply(reader)
    cluster.phase("reader", "Succeeded")
    assert log_lines(cluster, "reader") == ["kept across pods"]
    assert "/data:ro" in (cluster.folder("reader") / "job.sh").read_text()

    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "writer", "reader", "--wait=true")
    cluster.kubectl("delete", "pvc", "-n", NAMESPACE, "data", "--wait=true")
    eventually(
        "the volume and its folder removed",
        lambda: not folder.exists() and get_json(cluster, "pv", pv_name) is None,
        timeout=90,
    )


def test_claim_not_bound_keeps_the_pod_pending(cluster: PodCluster) -> None:
    manifest = with_volume(
        cluster, "unbound", "true", {"persistentVolumeClaim": {"claimName": "nowhere"}}, "/d"
    )
    cluster.apply(manifest)

    def waiting() -> dict[str, Any] | None:
        statuses = ((cluster.pod("unbound") or {}).get("status") or {}).get("containerStatuses")
        state = (statuses or [{}])[0].get("state", {}).get("waiting") or {}
        return state if state.get("reason") == "PersistentVolumeClaimNotBound" else None

    state = eventually("the pod waiting for its claim", waiting, timeout=60)
    assert f'PersistentVolumeClaim "{NAMESPACE}/nowhere" not found' in state["message"]
    assert not (cluster.folder("unbound") / "job-id").exists()
    events = eventually(
        "the Warning event",
        lambda: (
            (text := cluster.events("unbound")) and "PersistentVolumeClaimNotBound" in text and text
        ),
        timeout=30,
    )
    assert "nowhere" in events, events
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, "unbound", "--wait=true")


def test_host_path_types_are_checked_on_the_node(cluster: PodCluster) -> None:
    missing = cluster.root / "host" / "missing"
    made = cluster.root / "host" / "made"
    cluster.apply(
        with_volume(
            cluster,
            "hp-missing",
            "true",
            {"hostPath": {"path": str(missing), "type": "Directory"}},
            "/h",
        ),
        with_volume(
            cluster,
            "hp-create",
            "echo made >/h/file; echo ok",
            {"hostPath": {"path": str(made), "type": "DirectoryOrCreate"}},
            "/h",
        ),
    )
    failed = cluster.phase("hp-missing", "Failed")
    assert failed["status"]["reason"] == "FailedMount"
    assert failed["status"]["message"].startswith(
        f'volume "v": hostPath "{missing}" (type Directory) is not a directory on node '
    )
    assert not (cluster.folder("hp-missing") / "containers" / "main" / "started").exists()
    cluster.phase("hp-create", "Succeeded")
    assert (made / "file").read_text() == "made\n"
    assert log_lines(cluster, "hp-create") == ["ok"]


def test_memory_empty_dir_is_tmpfs_and_gone_after_the_job(cluster: PodCluster) -> None:
    cluster.apply(
        with_volume(
            cluster,
            "shm",
            "grep ' /cache ' /proc/mounts | cut -d ' ' -f 3; echo x >/cache/f && cat /cache/f",
            {"emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
            "/cache",
        )
    )
    cluster.phase("shm", "Succeeded")
    assert log_lines(cluster, "shm") == ["tmpfs", "x"]
    link = cluster.folder("shm") / "volumes" / "v"
    target = os.readlink(link)
    assert target.startswith("/dev/shm/hpk-job-"), target
    assert not Path(target).exists()
    assert not Path(target).parent.exists()


def test_empty_dir_over_its_size_limit_evicts_the_pod(cluster: PodCluster) -> None:
    cluster.apply(
        with_volume(
            cluster,
            "too-big",
            "head -c 3145728 /dev/zero >/scratch/big; echo written; sleep 120",
            {"emptyDir": {"sizeLimit": "1Mi"}},
            "/scratch",
        )
    )
    failed = cluster.phase("too-big", "Failed", timeout=90)
    assert failed["status"]["reason"] == "Evicted"
    assert failed["status"]["message"] == ('Usage of EmptyDir volume "v" exceeds the limit "1Mi".')
    assert log_lines(cluster, "too-big") == ["written"]
    main = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert main["exitCode"] == 143, main
