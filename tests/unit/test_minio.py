"""MinIO, Argo's default artifact repository: its credentials, its image and its objects."""

from __future__ import annotations

import base64
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest
import yaml

from hpk import minio
from hpk.minio import ArtifactStore, ArtifactStoreError, Credentials


def test_the_credentials_are_made_once_and_kept_private(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "hpk" / "artifacts")
    first = store.ensure()
    assert first == store.ensure()
    assert len(first.access_key) >= 3
    assert len(first.secret_key) >= 8
    assert first != ArtifactStore(tmp_path / "other").ensure()
    assert stat.S_IMODE(store.credentials_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.data.stat().st_mode) == 0o700


def test_credentials_not_written_by_hpk_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.data.mkdir()
    store.credentials_file.write_text(json.dumps({"accesskey": "a"}))
    with pytest.raises(ArtifactStoreError, match="remove it"):
        store.ensure()


def test_the_image_has_the_binary_as_its_entrypoint(tmp_path: Path) -> None:
    binary = tmp_path / "minio"
    binary.write_bytes(b"\x7fELF minio")
    archive = minio.image_archive(tmp_path / "minio.tar", binary=binary, version="0.0.1")
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert manifest[0]["RepoTags"] == ["localhost/minio:0.0.1"]
        config = json.load(outer.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
        layer = outer.extractfile(manifest[0]["Layers"][0]).read()  # type: ignore[union-attr]
    assert config["config"]["Entrypoint"] == ["minio"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as inner:
        member = inner.getmember("usr/bin/minio")
        assert member.mode & 0o111
        assert inner.extractfile(member).read() == b"\x7fELF minio"  # type: ignore[union-attr]
        assert inner.getmember("data").isdir()


def test_the_server_keeps_its_data_in_the_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    deployment, service = minio.server("argo", image="localhost/minio:1", store=store)
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "data", "hostPath": {"path": str(store.data), "type": "Directory"}}
    ]
    container = pod["containers"][0]
    assert container["args"][:2] == ["server", "/data"]
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
    }
    assert secrets == {
        "MINIO_ROOT_USER": {"name": minio.SECRET, "key": "accesskey"},
        "MINIO_ROOT_PASSWORD": {"name": minio.SECRET, "key": "secretkey"},
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert {port["port"] for port in service["spec"]["ports"]} == {9000, 9001}


def test_each_namespace_gets_the_keys_and_its_default_repository() -> None:
    keys = Credentials("hpk-abc", "s3cret-s3cret")
    secret, repositories = minio.namespace_objects(
        "science", install_namespace="argo", credentials=keys
    )
    assert secret["metadata"]["namespace"] == "science"
    assert base64.b64decode(secret["data"]["accesskey"]).decode() == "hpk-abc"
    assert base64.b64decode(secret["data"]["secretkey"]).decode() == "s3cret-s3cret"
    meta = repositories["metadata"]
    assert (meta["name"], meta["namespace"]) == ("artifact-repositories", "science")
    default = meta["annotations"]["workflows.argoproj.io/default-artifact-repository"]
    # Argo reads the value as YAML.
    s3 = yaml.safe_load(repositories["data"][default])["s3"]
    assert s3["endpoint"] == "minio.argo.svc:9000"
    assert s3["insecure"] is True
    assert s3["accessKeySecret"] == {"name": minio.SECRET, "key": "accesskey"}
    assert s3["secretKeySecret"] == {"name": minio.SECRET, "key": "secretkey"}
    assert "createBucketIfNotPresent" in s3
