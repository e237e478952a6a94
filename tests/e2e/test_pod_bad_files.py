"""One pod's bad files never stop a kubelet thread that serves every pod, end to end.

A container replaces its service-account token file with a folder (it reaches its own token
volume's folder through a hostPath volume, the explicit way to the user's files). Its next
refresh fails, which the pod's Events report, and another pod's token is still issued again
while it runs. The kubelet runs with `--token-refresh-fraction=0.02`, so that a token of 600 s
(the shortest Kubernetes allows) is issued again after 12 s instead of 480 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hpk.testbed.bed import Testbed
from tests.e2e.kube import WATCH_TOKEN, PodCluster, eventually, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-pod-bad-files"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(
        testbed, namespace=NAMESPACE, kubelet_args=["--token-refresh-fraction=0.02"]
    ) as running:
        yield running


def with_token(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod with a projected token of 600 s in volume `tok`, mounted at /tok."""
    container = manifest["spec"]["containers"][0]
    container.setdefault("volumeMounts", []).append({"name": "tok", "mountPath": "/tok"})
    manifest["spec"].setdefault("volumes", []).append(
        {
            "name": "tok",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "path": "token",
                            "expirationSeconds": 600,
                            "audience": "hpk-test",
                        }
                    }
                ]
            },
        }
    )
    return manifest


SPOIL = """
rm /spoil/token && mkdir /spoil/token && echo spoiled
sleep 120
"""


def spoiled(cluster: PodCluster) -> bool:
    """Whether the spoiler replaced its token file by a folder; fails at once when it ended."""
    folder = cluster.folder("spoiler")
    if (folder / "volumes" / "tok" / "token").is_dir():
        return True
    phase = ((cluster.pod("spoiler") or {}).get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        log = folder / "containers" / "main" / "log"
        shown = log.read_text() if log.exists() else "(no log)"
        out = folder / "slurm.out"
        shown += "\n" + (out.read_text()[-3000:] if out.exists() else "(no slurm.out)")
        pytest.fail(f"the spoiler ended {phase} before it spoiled its token:\n{shown}")
    return False


def test_a_token_file_replaced_by_a_folder_spoils_no_other_pods_refresh(
    cluster: PodCluster,
) -> None:
    spoiler = with_token(cluster.manifest("spoiler", ["sh", "-c", SPOIL]))
    own_volume = cluster.folder("spoiler") / "volumes" / "tok"
    spoiler["spec"]["containers"][0]["volumeMounts"].append({"name": "own", "mountPath": "/spoil"})
    spoiler["spec"]["volumes"].append({"name": "own", "hostPath": {"path": str(own_volume)}})
    cluster.apply(spoiler)
    cluster.phase("spoiler", "Running")
    eventually("the spoiler's token file replaced by a folder", lambda: spoiled(cluster))

    cluster.apply(with_token(cluster.manifest("watcher", ["sh", "-c", WATCH_TOKEN])))
    eventually(
        "the spoiler's TokenRefreshFailed event",
        lambda: "TokenRefreshFailed" in cluster.events("spoiler"),
        timeout=90,
    )
    cluster.phase("watcher", "Succeeded", timeout=200)
    log = (cluster.folder("watcher") / "containers" / "main" / "log").read_text()
    assert "rewritten after about" in log, log
    events = cluster.events("spoiler")
    assert events.count("TokenRefreshFailed") == 1, f"reported more than once:\n{events}"
    assert "cannot write token tok/token: Is a directory" in events, events
    kubelet = cluster.log()
    assert f"{NAMESPACE}/watcher: token" in kubelet
    assert "thread tokens failed" not in kubelet
