"""`docker save` tarballs written from files in hand: how hpk makes Docker-style images without
a registry or a Docker daemon (the test images, the Argo images), for `hpk images import`,
which Apptainer converts offline.

One layer, an OCI image config (Entrypoint, Cmd, Env, User, WorkingDir), and the tags. The
output is deterministic: the same entries and config give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One member of the image's layer."""

    path: str
    """Relative to the image's root (`bin/busybox`)."""
    mode: int = 0o644
    data: bytes | None = None
    """A file's bytes; None for a folder or a link."""
    link: str | None = None
    """A symbolic link's target."""


def folder(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, mode=mode)


def regular_file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, mode=mode, data=data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, mode=0o777, link=target)


def write_docker_archive(
    path: Path,
    *,
    entries: Sequence[Entry],
    config: Mapping[str, object],
    tags: Sequence[str],
) -> None:
    """Write a `docker save` tarball of a one-layer image with `entries` and the OCI image
    `config` to `path` (atomically, mode 0644)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode
            if entry.link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, entry.link
                tar.addfile(info)
            elif entry.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    image_config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": dict(config),
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        },
        sort_keys=True,
    ).encode()
    config_name = f"{hashlib.sha256(image_config).hexdigest()}.json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": list(tags), "Layers": [f"{diff_id}/layer.tar"]}]
    ).encode()
    partial = path.with_name(f".{path.name}.part")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, payload in (
            (config_name, image_config),
            (f"{diff_id}/layer.tar", layer_bytes),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            archive.addfile(info, io.BytesIO(payload))
    partial.chmod(0o644)
    partial.replace(path)
