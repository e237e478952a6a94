"""MinIO, the S3 server behind Argo's default artifact repository, which `hpk addons install
argo` sets up (hpk.addons runs it).

Argo passes artifacts between steps through an artifact repository; without one, a workflow
with an output artifact fails ("You need to configure artifact storage"). Sites really run
MinIO for this, and Argo's own quick start does too. Here:

- **The image** is made from the binary the toolchain built from MinIO's module (the static
  binary as `/usr/bin/minio`, its ENTRYPOINT, as upstream's image has it) and imported into
  the user's image cache under `localhost/minio:<pin>`: the pin is a commit of the module, of
  which upstream published no image.
- **The data** lives in a folder of the user's hpk folder, `artifacts/data`, bound into the
  pod as a hostPath: the home is shared, so whichever node the pod's job lands on sees it,
  and artifacts outlive the cluster. The Deployment's strategy is Recreate, so two servers
  never share that folder.
- **The credentials** are made once, at random, and kept in `artifacts/credentials` (0600);
  MinIO reads them from a Secret in the install namespace, and each namespace workflows run
  in gets the same Secret for its steps.
- **The repository** is a ConfigMap `artifact-repositories` in each of those namespaces,
  annotated as its default, which Argo's controller reads before its own configuration. It
  names the Service's cluster DNS name, so a step reaches MinIO on the pod network through
  kube-proxy, and it lets the first upload create the bucket.

This module touches the image cache and the user's hpk folder; it talks to the cluster only
through the objects it returns.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpk.docker_archive import folder, regular_file, write_docker_archive
from hpk.files import private_dir, write_atomic
from hpk.images import import_made_image
from hpk.toolchain import Toolchain

Manifest = dict[str, Any]

NAME = "minio"
S3_PORT = 9000
CONSOLE_PORT = 9001
BUCKET = "artifacts"
SECRET = "hpk-artifacts"  # noqa: S105 (the Secret's name)
"""The Secret with the S3 keys (`accesskey`, `secretkey`), in the install namespace and in
each namespace workflows run in."""
REPOSITORIES = "artifact-repositories"
"""The ConfigMap name Argo's controller looks for in a workflow's namespace."""
REPOSITORY_KEY = "hpk-minio"
DEFAULT_REPOSITORY = "workflows.argoproj.io/default-artifact-repository"
DATA = "/data"
LABELS = {"app": NAME, "app.kubernetes.io/managed-by": "hpk", "app.kubernetes.io/part-of": "argo"}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class ArtifactStoreError(RuntimeError):
    """The artifact store cannot be set up; the message says what failed."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class ArtifactStore:
    """The store's folder in the user's hpk folder (HpkHome.artifacts)."""

    root: Path

    @property
    def data(self) -> Path:
        """MinIO's drive: one folder per bucket."""
        return self.root / "data"

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials"

    def ensure(self) -> Credentials:
        """The store's credentials, made on first use, and its data folder (both private to
        the user)."""
        private_dir(self.data)
        if not self.credentials_file.exists():
            # MinIO wants an access key of at least 3 characters and a secret of at least 8.
            made = {"accesskey": f"hpk-{secrets.token_hex(6)}", "secretkey": secrets.token_hex(20)}
            write_atomic(self.credentials_file, json.dumps(made) + "\n")
        try:
            found = json.loads(self.credentials_file.read_text())
            return Credentials(str(found["accesskey"]), str(found["secretkey"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArtifactStoreError(
                f"{self.credentials_file} is not the credentials hpk wrote ({error}); remove "
                "it to make new ones (MinIO then starts with the new ones, and its data stays)"
            ) from error


def image_reference(version: str) -> str:
    return f"localhost/{NAME}:{version}"


def image_archive(target: Path, *, binary: Path, version: str) -> Path:
    """MinIO's image as a `docker save` tarball: /usr/bin/minio as ENTRYPOINT, CA
    certificates, and a /data for its drive."""
    entries = [
        folder("usr"),
        folder("usr/bin"),
        folder("etc"),
        folder("etc/ssl"),
        folder("etc/ssl/certs"),
        folder("tmp", 0o1777),
        folder(DATA.lstrip("/")),
        regular_file("usr/bin/minio", binary.read_bytes(), 0o755),
        regular_file("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\n"),
        regular_file("etc/group", b"root:x:0:\n"),
        regular_file("etc/nsswitch.conf", b"hosts: files dns\n"),
    ]
    if CA_BUNDLE.is_file():
        entries.append(regular_file("etc/ssl/certs/ca-certificates.crt", CA_BUNDLE.read_bytes()))
    write_docker_archive(
        target,
        entries=entries,
        config={
            "Entrypoint": ["minio"],
            "Env": ["PATH=/usr/bin:/bin"],
        },
        tags=[image_reference(version)],
    )
    return target


def import_minio_image(*, toolchain: Toolchain, cache_dir: Path | None = None) -> tuple[str, Path]:
    """The image in the user's cache (made and imported unless it is there); its reference
    and its SIF file."""
    version = toolchain.pins["MINIO_VERSION"]
    reference = image_reference(version)
    sif = import_made_image(
        reference,
        lambda archive: image_archive(archive, binary=toolchain.binary(NAME), version=version),
        apptainer=str(toolchain.binary("apptainer")),
        cache_dir=cache_dir,
    )
    return reference, sif


def _meta(name: str, namespace: str) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": dict(LABELS)}


def secret(namespace: str, credentials: Credentials) -> Manifest:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(SECRET, namespace),
        "type": "Opaque",
        "data": {
            "accesskey": b64(credentials.access_key),
            "secretkey": b64(credentials.secret_key),
        },
    }


def deployment(namespace: str, *, image: str, data: Path) -> Manifest:
    """One MinIO on the pod network, its drive the store's data folder."""
    keys = [
        ("MINIO_ROOT_USER", "accesskey"),
        ("MINIO_ROOT_PASSWORD", "secretkey"),
    ]
    probe = {"path": "/minio/health/ready", "port": "s3"}
    container = {
        "name": NAME,
        "image": image,
        "args": [
            "server",
            DATA,
            f"--address=:{S3_PORT}",
            f"--console-address=:{CONSOLE_PORT}",
            "--certs-dir=/tmp/certs",
        ],
        "env": [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}
            for name, key in keys
        ]
        + [{"name": "MINIO_UPDATE", "value": "off"}],
        "ports": [
            {"name": "s3", "containerPort": S3_PORT, "protocol": "TCP"},
            {"name": "console", "containerPort": CONSOLE_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {**probe, "path": "/minio/health/live"},
            "periodSeconds": 10,
            "failureThreshold": 3,
            "initialDelaySeconds": 10,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": DATA}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME, namespace),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": NAME}},
            # One data folder: the old server must stop before the new one opens it.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": dict(LABELS)},
                "spec": {
                    "containers": [container],
                    "volumes": [
                        {"name": "data", "hostPath": {"path": str(data), "type": "Directory"}}
                    ],
                },
            },
        },
    }


def service(namespace: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(NAME, namespace),
        "spec": {
            "selector": {"app": NAME},
            "ports": [
                {"name": "s3", "port": S3_PORT, "targetPort": "s3", "protocol": "TCP"},
                {"name": "console", "port": CONSOLE_PORT, "targetPort": "console"},
            ],
        },
    }


def endpoint(install_namespace: str) -> str:
    return f"{NAME}.{install_namespace}.svc:{S3_PORT}"


def repository(namespace: str, *, install_namespace: str) -> Manifest:
    """The default artifact repository of the workflows of `namespace`."""
    s3 = {
        "endpoint": endpoint(install_namespace),
        "bucket": BUCKET,
        "insecure": True,
        "createBucketIfNotPresent": {},
        "accessKeySecret": {"name": SECRET, "key": "accesskey"},
        "secretKeySecret": {"name": SECRET, "key": "secretkey"},
    }
    meta = _meta(REPOSITORIES, namespace)
    meta["annotations"] = {DEFAULT_REPOSITORY: REPOSITORY_KEY}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {REPOSITORY_KEY: json.dumps({"s3": s3}, indent=2)},
    }


def server(install_namespace: str, *, image: str, store: ArtifactStore) -> list[Manifest]:
    """The server's objects, in the order they are applied."""
    return [deployment(install_namespace, image=image, data=store.data), service(install_namespace)]


def namespace_objects(
    namespace: str, *, install_namespace: str, credentials: Credentials
) -> list[Manifest]:
    """What a namespace's workflows need to use the store: its keys and the repository."""
    return [
        secret(namespace, credentials),
        repository(namespace, install_namespace=install_namespace),
    ]
