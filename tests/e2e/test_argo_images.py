"""Argo's images, made from the pinned binaries and imported under upstream's names, run as
pods: the groundwork for installing Argo Workflows into an hpk cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hpk.argo import ARGO_IMAGES, import_argo_images
from hpk.testbed.bed import Testbed
from hpk.toolchain import Toolchain
from tests.e2e.kube import PodCluster, pod_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAMESPACE = "e2e-argo-images"


@pytest.fixture(scope="module")
def cluster(testbed: Testbed) -> Iterator[PodCluster]:
    with pod_cluster(testbed, namespace=NAMESPACE) as running:
        yield running


def test_argo_images_run_their_binaries_as_pods(cluster: PodCluster) -> None:
    version = Toolchain.load().pins["ARGO_VERSION"]
    imported = import_argo_images(cache_dir=cluster.home / "images")
    assert sorted(imported) == sorted(image.reference(version) for image in ARGO_IMAGES)
    manifests = []
    for image in ARGO_IMAGES:
        manifest = cluster.manifest(image.name, ["true"])
        container = manifest["spec"]["containers"][0]
        del container["command"]  # the image's ENTRYPOINT runs, with these args
        container["image"] = image.reference(version)
        container["args"] = ["version"]
        manifests.append(manifest)
    cluster.apply(*manifests)
    for image in ARGO_IMAGES:
        cluster.phase(image.name, "Succeeded")
        log = (cluster.folder(image.name) / "containers" / "main" / "log").read_text()
        assert f"{image.binary}: v{version}" in log, log
