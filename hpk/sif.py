"""The SIF container format's header and descriptor table (github.com/apptainer/sif,
pkg/sif): just enough to find a SIF's partitions and objects without Apptainer."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

HEADER = struct.Struct("<32s10s3s3s16s8q")
"""The global header (pkg/sif/sif.go): a 32-byte launch script, the 10-byte magic, a 3-byte
version, a 3-byte architecture, a 16-byte UUID, then eight little-endian int64: created,
modified, free and total descriptors, descriptor offset and size, data offset and size."""
MAGIC = b"SIF_MAGIC\x00"
VERSION = b"01\x00"
DESCRIPTOR = struct.Struct("<iBIII7q128s384s")
"""One descriptor (pkg/sif/descriptor.go, rawDescriptor): data type, used flag, ID, group,
link, then offset, size, size with padding, created, modified, uid, gid (int64), a 128-byte
name and 384 bytes of type-specific data."""
GENERIC_JSON = 0x4006
PARTITION = 0x4004


@dataclass(frozen=True)
class Descriptor:
    """One used object of a SIF."""

    kind: int
    offset: int
    size: int
    name: bytes
    """Its name, without the padding NULs."""
    extra: bytes
    """The type-specific data (a partition's: file system type, partition type, ...)."""


def descriptors(stream: BinaryIO) -> list[Descriptor]:
    """The used descriptors of the SIF open as `stream` (struct.error when it is too short)."""
    stream.seek(0)
    header = HEADER.unpack(stream.read(HEADER.size))
    count, offset = header[8], header[9]
    stream.seek(offset)
    table = stream.read(count * DESCRIPTOR.size)
    found = []
    for index in range(min(count, len(table) // DESCRIPTOR.size)):
        kind, used, _id, _group, _link, start, size, *_rest, name, extra = DESCRIPTOR.unpack_from(
            table, index * DESCRIPTOR.size
        )
        if used:
            found.append(Descriptor(kind, start, size, name.rstrip(b"\0"), extra))
    return found
