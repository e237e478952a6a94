"""hpk's SIF image cache: image references, where each image lives, and how it gets there.

Pods name their images the way Docker does (`busybox`, `quay.io/argoproj/argoexec:v3.6.5`).
The kubelet runs them from SIF files in one cache on the shared filesystem, keyed by the full
normalized reference. This module owns that mapping and the only ways into the cache: an
import of a SIF file (air-gapped sites, the test images) and, for pulls, `image_lock`, which
serialises everyone who fills the same entry. It touches nothing outside the cache folder.

Layout, below the cache folder (`$HPK_IMAGE_CACHE`, else `<hpk home>/images`):

    <registry>/<repository path>/<tag>.sif
    <registry>/<repository path>/[<tag>]@<algorithm>-<hex>.sif      (references with a digest)

The mapping is injective and never leaves the cache folder, by the reference grammar:
- a registry's `:port` becomes `_port`; registry names cannot contain `_`;
- repository path components start with `[a-z0-9]`, so they are never `..`, never clash with
  `@` digest files, and never with the hidden lock and temporary files (`.<name>...`);
- a component that ends in `.sif` would shadow a tag file of its parent repository
  (`a/b:c` is `a/b/c.sif`), so such a folder gets a trailing `_`, which components cannot end
  with.

Folders are 0755 and files 0644 because a site may share one cache between its users.
Locks are `fcntl.flock` locks, which hold across nodes on NFS; Lustre needs `-o flock`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpk.files import held_lock
from hpk.paths import hpk_home

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_DOCKER_SCHEME = "docker://"
_NAME_MAX_LENGTH = 255  # Docker's limit for registry + "/" + repository path

_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: Digest algorithms Docker registers, with the length of their hex encoding.
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}

_DIR_MODE = 0o755
_FILE_MODE = 0o644
_SIF_SUFFIX = ".sif"
_COPY_CHUNK = 1 << 20

# The SIF global header (github.com/apptainer/sif, pkg/sif/sif.go): a 32-byte launch script,
# the 10-byte magic, a 3-byte version, a 3-byte architecture, a 16-byte UUID, then eight
# little-endian int64: created, modified, free and total descriptors, descriptor offset and
# size, data offset and size.
_SIF_HEADER = struct.Struct("<32s10s3s3s16s8q")
_SIF_MAGIC = b"SIF_MAGIC\x00"
_SIF_VERSION = b"01\x00"


class ImageError(Exception):
    """Base class of the errors about images and the image cache."""


class InvalidImageReference(ImageError, ValueError):
    """An image reference that Docker's grammar does not accept."""

    def __init__(self, reference: str, problem: str) -> None:
        super().__init__(f"invalid image reference {reference!r}: {problem}")
        self.reference = reference
        self.problem = problem


class InvalidImageFile(ImageError):
    """A file offered to the cache that is not a readable, complete SIF image."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is not a usable SIF image: {problem}")
        self.path = path
        self.problem = problem


class ImageNotCached(ImageError):
    """The cache holds no image for a reference."""

    def __init__(self, reference: str) -> None:
        super().__init__(f"no cached image for {reference}")
        self.reference = reference


@dataclass(frozen=True)
class ImageReference:
    """A normalized image reference; str() gives its canonical text, the cache key."""

    registry: str
    """Registry host, with its port if any (`docker.io`, `localhost:5000`)."""
    repository: str
    """Repository path below the registry (`library/busybox`)."""
    tag: str | None
    """Tag; `latest` when the reference named neither a tag nor a digest."""
    digest: str | None
    """Content digest `<algorithm>:<hex>`, when the reference pinned one."""

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class CachedImage:
    """One image in the cache, as `hpk images list` shows it."""

    reference: str
    """Normalized reference."""
    path: Path
    """The SIF file."""
    size: int
    """Size of the SIF file in bytes."""


def parse_reference(text: str) -> ImageReference:
    """Parse an image reference with Docker's rules, filling in the default registry and tag.

    A `docker://` prefix is dropped; other transports are refused, since the cache holds only
    images named the Docker way.
    """
    ref = text
    if ref.startswith(_DOCKER_SCHEME):
        ref = ref[len(_DOCKER_SCHEME) :]
    elif "://" in ref:
        raise InvalidImageReference(text, "only docker:// references are supported")
    if not ref:
        raise InvalidImageReference(text, "the reference is empty")
    if any(ch.isspace() for ch in ref):
        raise InvalidImageReference(text, "a reference may not contain whitespace")

    name, has_digest, digest_text = ref.partition("@")
    digest = _check_digest(text, digest_text) if has_digest else None

    tag: str | None = None
    colon = name.rfind(":")
    if colon > name.rfind("/"):  # a colon before the first slash is a registry port
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidImageReference(
                text,
                f"tag {tag!r} must be 1 to 128 of A-Z a-z 0-9 _ . - and may not start with . or -",
            )
    if not name:
        raise InvalidImageReference(text, "the repository name is missing")

    registry, repository = _split_registry(name)
    _check_name(text, registry, repository)

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry=registry, repository=repository, tag=tag, digest=digest)


def normalize_reference(text: str) -> str:
    """The canonical form of an image reference: `busybox` -> `docker.io/library/busybox:latest`."""
    return str(parse_reference(text))


def _check_name(text: str, registry: str, repository: str) -> None:
    if not _REGISTRY.fullmatch(registry):
        raise InvalidImageReference(text, f"registry {registry!r} is not a valid host[:port]")
    for component in repository.split("/"):
        if not component:
            raise InvalidImageReference(text, f"repository path {repository!r} has an empty part")
        if component != component.lower():
            raise InvalidImageReference(text, f"repository path {repository!r} must be lowercase")
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidImageReference(
                text,
                f"repository path component {component!r} must be lowercase letters and digits"
                " joined by single '.', '_', '__' or runs of '-'",
            )
    if len(registry) + 1 + len(repository) > _NAME_MAX_LENGTH:
        raise InvalidImageReference(text, f"the name is longer than {_NAME_MAX_LENGTH} characters")


def _check_digest(text: str, digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        known = ", ".join(sorted(_DIGEST_HEX_LENGTH))
        raise InvalidImageReference(
            text, f"digest {digest!r} must be <algorithm>:<hex> with algorithm one of {known}"
        )
    if not re.fullmatch(f"[0-9a-f]{{{length}}}", hex_part):
        raise InvalidImageReference(
            text, f"a {algorithm} digest must be {length} lowercase hex digits, got {hex_part!r}"
        )
    return digest


def _split_registry(name: str) -> tuple[str, str]:
    """Docker's rule: the first path element is a registry if it looks like a host name."""
    head, slash, rest = name.partition("/")
    if not slash:
        return DEFAULT_REGISTRY, f"library/{name}"
    looks_like_host = "." in head or ":" in head or head == "localhost" or head != head.lower()
    if not looks_like_host:
        return DEFAULT_REGISTRY, name
    if head == "index.docker.io":
        head = DEFAULT_REGISTRY
    if head == DEFAULT_REGISTRY and "/" not in rest:
        rest = f"library/{rest}"
    return head, rest


# --- the cache layout -----------------------------------------------------------------------


def image_cache_dir() -> Path:
    """The cache folder: $HPK_IMAGE_CACHE, else <hpk home>/images."""
    override = os.environ.get("HPK_IMAGE_CACHE")
    return Path(override) if override else hpk_home() / "images"


def relative_image_path(reference: ImageReference) -> PurePosixPath:
    """Where an image lives inside the cache folder (see the module docstring)."""
    folders = [reference.registry.replace(":", "_")]
    for component in reference.repository.split("/"):
        folders.append(f"{component}_" if component.endswith(_SIF_SUFFIX) else component)
    stem = reference.tag or ""
    if reference.digest is not None:
        stem += "@" + reference.digest.replace(":", "-")
    return PurePosixPath(*folders, stem + _SIF_SUFFIX)


def reference_from_path(relative: PurePosixPath) -> ImageReference | None:
    """The reference whose image lives at `relative`, or None if no reference maps there."""
    parts = relative.parts
    if len(parts) < 3 or not parts[-1].endswith(_SIF_SUFFIX):
        return None
    registry = parts[0].replace("_", ":")
    components = [c[:-1] if c.endswith(_SIF_SUFFIX + "_") else c for c in parts[1:-1]]
    stem = parts[-1][: -len(_SIF_SUFFIX)]
    tag, has_digest, digest = stem.partition("@")
    text = f"{registry}/{'/'.join(components)}"
    if tag:
        text += f":{tag}"
    if has_digest:
        text += "@" + digest.replace("-", ":", 1)
    try:
        reference = parse_reference(text)
    except InvalidImageReference:
        return None
    # Only an exact round trip counts: `library` folders and such must map back to themselves.
    return reference if relative_image_path(reference) == relative else None


def image_path(reference: str, *, cache_dir: Path | None = None) -> Path:
    """The path the image for `reference` has (or would have) in the cache."""
    root = cache_dir if cache_dir is not None else image_cache_dir()
    return root / relative_image_path(parse_reference(reference))


def cached_image(reference: str, *, cache_dir: Path | None = None) -> Path | None:
    """The cached SIF file for `reference`, or None if the cache does not hold it."""
    path = image_path(reference, cache_dir=cache_dir)
    return path if path.is_file() else None


def list_images(cache_dir: Path | None = None) -> list[CachedImage]:
    """Every image in the cache, sorted by reference. Lock and partial files are skipped."""
    root = cache_dir if cache_dir is not None else image_cache_dir()
    images: list[CachedImage] = []
    for path in root.rglob(f"*{_SIF_SUFFIX}"):
        if path.name.startswith(".") or not path.is_file():
            continue
        reference = reference_from_path(PurePosixPath(path.relative_to(root).as_posix()))
        if reference is None:
            log.debug("ignoring %s: not a path the image cache would use", path)
            continue
        images.append(CachedImage(str(reference), path, path.stat().st_size))
    return sorted(images, key=lambda image: image.reference)


# --- filling the cache ----------------------------------------------------------------------


def _make_folder(path: Path) -> None:
    """Create `path` and its missing parents as 0755, whatever the umask."""
    if path.is_dir():
        return
    _make_folder(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return  # another process made it first
    path.chmod(_DIR_MODE)


def _ensure_cache_root(root: Path) -> None:
    home = hpk_home()
    if root.parent == home and not home.exists():
        # The default cache sits in the private state folder, which must stay 0700.
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_folder(root)


@contextmanager
def image_lock(reference: str, *, cache_dir: Path | None = None) -> Iterator[Path]:
    """Hold the cache entry of `reference` exclusively; yields the path the image belongs at.

    Everyone who writes an entry (an import, a pull) does so under this lock, so two writers
    of the same image never clash, while different images proceed side by side. The lock is
    a hidden file next to the image; it is never removed, as removing it would let a waiter
    lock a file that a newcomer no longer sees.
    """
    root = cache_dir if cache_dir is not None else image_cache_dir()
    target = root / relative_image_path(parse_reference(reference))
    _ensure_cache_root(root)
    _make_folder(target.parent)
    with held_lock(target.with_name(f".{target.name}.lock"), mode=_FILE_MODE):
        yield target


def check_sif(path: Path) -> None:
    """Raise InvalidImageFile unless `path` carries a SIF header and all the data it announces."""
    try:
        with path.open("rb") as stream:
            header = stream.read(_SIF_HEADER.size)
            size = os.fstat(stream.fileno()).st_size
    except OSError as error:
        raise InvalidImageFile(path, f"cannot read it ({error.strerror})") from error
    if len(header) < _SIF_HEADER.size:
        raise InvalidImageFile(
            path, f"it has {size} bytes, fewer than the {_SIF_HEADER.size}-byte SIF header"
        )
    launch, magic, version, _arch, _uuid, *numbers = _SIF_HEADER.unpack(header)
    if magic != _SIF_MAGIC:
        raise InvalidImageFile(
            path, f"no SIF magic at byte 32 (the file starts with {header[:16]!r})"
        )
    if version != _SIF_VERSION:
        raise InvalidImageFile(path, f"SIF format version {version!r} is not supported")
    descriptors_offset, descriptors_size, data_offset, data_size = numbers[4:]
    end = max(descriptors_offset + descriptors_size, data_offset + data_size)
    if end > size:
        raise InvalidImageFile(
            path, f"it is truncated: its header describes {end} bytes, the file has {size}"
        )
    log.debug("%s: SIF, launch line %r, %d bytes", path, launch.rstrip(b"\0"), size)


def import_image(reference: str, sif_file: Path, *, cache_dir: Path | None = None) -> Path:
    """Copy a SIF file into the cache as the image for `reference`; returns its cache path.

    The file is checked first, then copied to a hidden temporary file and renamed into place
    under the entry's lock, so readers see the old image or the new one, never a partial one.
    An existing entry is replaced: an import is an explicit instruction.
    """
    key = normalize_reference(reference)
    source = Path(sif_file)
    check_sif(source)
    with image_lock(key, cache_dir=cache_dir) as target:
        fd, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, _FILE_MODE)
            check_sif(Path(temporary))  # the source may have changed while it was copied
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _sync_folder(target.parent)
    log.info("imported %s from %s into %s", key, source, target)
    return target


def remove_image(reference: str, *, cache_dir: Path | None = None) -> Path:
    """Remove the image for `reference` from the cache; returns the path it had.

    Under the entry's lock, so a removal never meets an import or a pull of the same image
    half-way. A job that already runs the image keeps its open file. Raises ImageNotCached
    when the cache does not hold the image.
    """
    key = normalize_reference(reference)
    if cached_image(key, cache_dir=cache_dir) is None:
        raise ImageNotCached(key)
    with image_lock(key, cache_dir=cache_dir) as target:
        try:
            target.unlink()
        except FileNotFoundError:
            raise ImageNotCached(key) from None
        _sync_folder(target.parent)
    log.info("removed %s (%s)", key, target)
    return target


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
