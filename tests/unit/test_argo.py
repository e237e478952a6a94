"""Argo's images as hpk makes them: upstream's names, layout and config, from the pinned
binaries."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from hpk.argo import ARGO_IMAGES, ARGO_USER, argo_image_archives, image_config, image_entries
from hpk.toolchain import Toolchain, read_pins

PINS = read_pins()


def test_images_are_named_as_the_install_manifests_name_them() -> None:
    version = PINS["ARGO_VERSION"]
    assert [image.reference(version) for image in ARGO_IMAGES] == [
        f"quay.io/argoproj/workflow-controller:v{version}",
        f"quay.io/argoproj/argoexec:v{version}",
        f"quay.io/argoproj/argocli:v{version}",
    ]


def test_configs_are_upstreams() -> None:
    controller, executor, server = ARGO_IMAGES
    assert image_config(controller)["Entrypoint"] == ["workflow-controller"]
    assert image_config(controller)["User"] == str(ARGO_USER)
    assert image_config(executor)["Entrypoint"] == ["argoexec"]
    assert "User" not in image_config(executor)  # root: the emissary runs as the step's user
    assert image_config(server)["Entrypoint"] == ["argo"]  # argocli runs `argo server`
    assert image_config(server)["User"] == str(ARGO_USER)


def test_the_layer_holds_the_binary_and_the_base_files(tmp_path: Path) -> None:
    binary = tmp_path / "argoexec"
    binary.write_bytes(b"\x7fELF static")
    bundle = tmp_path / "ca.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    entries = {
        entry.path: entry for entry in image_entries(ARGO_IMAGES[1], binary, ca_bundle=bundle)
    }
    assert entries["bin/argoexec"].data == b"\x7fELF static"
    assert entries["bin/argoexec"].mode == 0o755
    assert entries["tmp"].mode == 0o1777
    assert f"argo:x:{ARGO_USER}:" in (entries["etc/passwd"].data or b"").decode()
    assert entries["etc/ssl/certs/ca-certificates.crt"].data == bundle.read_bytes()
    assert "etc/nsswitch.conf" in entries and "etc/ssh/ssh_known_hosts" in entries


def test_archives_carry_the_reference_and_config(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    bin_dir = tools / f"argo-{PINS['ARGO_VERSION']}" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir.parent / ".complete").write_text("now\n")
    for image in ARGO_IMAGES:
        (bin_dir / image.binary).write_bytes(image.binary.encode())
    archives = argo_image_archives(tmp_path, Toolchain(root=tools, pins=PINS))
    for image in ARGO_IMAGES:
        reference = image.reference(PINS["ARGO_VERSION"])
        with tarfile.open(archives[reference]) as archive:
            (manifest,) = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
            config = json.loads(archive.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
        assert manifest["RepoTags"] == [reference]
        assert config["config"] == image_config(image)
