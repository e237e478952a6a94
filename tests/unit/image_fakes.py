"""Fakes at the image seams: a minimal SIF file, and a registry behind the command runner.

`FakeRegistry` stands in for `apptainer pull` (hpk.images.ApptainerCommand): it writes the SIF
of a reference it serves to the path Apptainer would write, and fails as Apptainer does for
any other reference.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from hpk.images import plain_http

_HEADER = struct.Struct("<32s10s3s3s16s8q")
_DESCRIPTOR = struct.Struct("<iBIII7q128s384s")


def sif_bytes(oci_config: Mapping[str, object] | None = None, *, rootfs: bytes = b"") -> bytes:
    """A well-formed SIF file; with `oci_config`, it carries the `oci-config.json` descriptor
    Apptainer writes for images built from Docker sources, and with `rootfs` (a SquashFS
    image) its primary system partition."""
    payloads: list[tuple[int, bytes, bytes, bytes]] = []
    if oci_config is not None:
        payloads.append((0x4006, json.dumps(oci_config).encode(), b"oci-config.json", b""))
    if rootfs:
        payloads.append((0x4004, rootfs, b"rootfs", struct.pack("<ii", 1, 2)))
    count = len(payloads)
    table_offset = _HEADER.size
    data_offset = table_offset + count * _DESCRIPTOR.size
    data_size = sum(len(payload) for _, payload, _, _ in payloads)
    header = _HEADER.pack(
        b"#!/usr/bin/env run-singularity\n",
        b"SIF_MAGIC\x00",
        b"01\x00",
        b"02\x00",
        bytes(16),
        0,
        0,
        0,
        count,
        table_offset,
        count * _DESCRIPTOR.size,
        data_offset,
        data_size,
    )
    table = b""
    offset = data_offset
    for index, (kind, payload, name, extra) in enumerate(payloads):
        table += _DESCRIPTOR.pack(
            kind, 1, index + 1, 1, 0, offset, len(payload), len(payload), 0, 0, 0, 0, name, extra,
        )  # fmt: skip
        offset += len(payload)
    return header + table + b"".join(payload for _, payload, _, _ in payloads)


class FakeRegistry:
    """The command runner of `apptainer pull`, serving `images` (normalized reference ->
    SIF bytes); it counts the pulls and can take its time."""

    def __init__(self, images: Mapping[str, bytes] | None = None, *, delay_s: float = 0.0) -> None:
        self.images = dict(images or {})
        self.delay_s = delay_s
        self.pulls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        assert argv[1:5] == ["--quiet", "pull", "--force", "--disable-cache"], argv
        *options, target, source = argv[5:]
        reference = source.removeprefix("docker://")
        # Plain HTTP for a registry on the loopback, as Docker does; HTTPS elsewhere.
        assert options == (["--no-https"] if plain_http(reference.split("/", 1)[0]) else []), argv
        with self._lock:
            self.pulls.append(reference)
        time.sleep(self.delay_s)
        data = self.images.get(reference)
        if data is None:
            return 255, (
                "FATAL:   While making image from oci registry: error fetching image to cache:"
                f" failed to get checksum for {source}: connection refused\n"
            )
        Path(target).write_bytes(data)
        return 0, ""
