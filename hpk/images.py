"""hpk's SIF image cache: image references, where each image lives, and how it gets there.

Pods name their images the way Docker does (`busybox`, `quay.io/argoproj/argoexec:v3.6.5`).
The kubelet runs them from SIF files in one cache on the shared filesystem, keyed by the full
normalized reference. This module owns that mapping and the only ways into the cache: an
import (a SIF file, a sandbox folder or a docker-archive tarball: air-gapped sites, the test
images) and a pull (`apptainer pull docker://`), each under `image_lock`, which serialises
everyone who fills the same entry. Beside each SIF it records what the image runs by default
(ImageConfig: Docker's ENTRYPOINT, CMD and WORKDIR), read from the image as it enters the
cache. It writes nothing outside the cache folder; Apptainer, run through an injected
ApptainerCommand, does the conversions and pulls.

Layout, below the cache folder (`$HPK_IMAGE_CACHE`, else `<hpk home>/images`):

    <registry>/<repository path>/<tag>.sif
    <registry>/<repository path>/[<tag>]@<algorithm>-<hex>.sif      (references with a digest)
    <registry>/<repository path>/.<file name>.config.json            (its ImageConfig)

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

import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from hpk import sif
from hpk.files import held_lock
from hpk.image_users import home_of, sandbox_homes, sif_homes
from hpk.paths import hpk_home
from hpk.toolchain import find_apptainer

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

_OCI_CONFIG_NAME = b"oci-config.json"
"""The descriptor Apptainer writes, when it builds from a Docker or OCI source, with the
image's config (Entrypoint, Cmd, Env, WorkingDir...)."""
_CONFIG_SUFFIX = ".config.json"
_LARGEST_CONFIG = 1 << 20


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


class ImageBuildFailed(ImageError):
    """Apptainer could not turn a sandbox folder or a docker-archive into a SIF file."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"cannot build a SIF image from {source}: {problem}")
        self.source = source
        self.problem = problem


class ImagePullFailed(ImageError):
    """`apptainer pull` failed; the message carries Apptainer's own words."""

    def __init__(self, reference: str, problem: str) -> None:
        super().__init__(f"pulling {reference} failed: {problem}")
        self.reference = reference
        self.problem = problem


class ImagePullTimeout(ImagePullFailed):
    """`apptainer pull` ran longer than its time limit and was stopped."""


class ImageTooLarge(ImagePullFailed):
    """`apptainer pull` wrote more than its size limit and was stopped."""


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


@dataclass(frozen=True)
class ImageConfig:
    """What an image runs when the pod does not say: Docker's ENTRYPOINT, CMD and WORKDIR.

    Recorded beside each cached SIF when it enters the cache. A SIF built from a Docker or OCI
    source carries them; a SIF built from an Apptainer definition file has none (`oci` False)
    and its runscript decides what runs.
    """

    oci: bool
    """Whether the image has OCI metadata; False for a native SIF (run its runscript)."""
    entrypoint: tuple[str, ...] = ()
    """ENTRYPOINT; empty when the image has none."""
    cmd: tuple[str, ...] = ()
    """CMD: the default arguments; empty when the image has none."""
    working_dir: str = ""
    """WORKDIR; empty: Docker's default, `/`."""
    homes: tuple[tuple[int, str], ...] | None = None
    """(uid, home) of each user the image's /etc/passwd lists (hpk.image_users): what HOME is
    in a container of that user. None: not read (a record older than this field)."""

    def home(self, uid: int) -> str:
        """HOME in a container of this image that runs as `uid`, as Kubernetes sets it."""
        return home_of(self.homes, uid)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "oci": self.oci,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "workingDir": self.working_dir,
        }
        if self.homes is not None:
            record["homes"] = {str(uid): home for uid, home in self.homes}
        return record

    @classmethod
    def from_json(cls, data: object) -> ImageConfig:
        """From `to_json`'s form; raises ValueError for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("oci"), bool):
            raise ValueError("not an image config record")
        homes = data.get("homes")
        if homes is not None and not (
            isinstance(homes, dict)
            and all(uid.isdigit() and isinstance(home, str) for uid, home in homes.items())
        ):
            raise ValueError("homes is not an object of uid -> home")
        return cls(
            oci=data["oci"],
            entrypoint=_words(data.get("entrypoint"), "entrypoint"),
            cmd=_words(data.get("cmd"), "cmd"),
            working_dir=str(data.get("workingDir") or ""),
            homes=None if homes is None else _homes(homes.items()),
        )

    @classmethod
    def from_oci(cls, config: object) -> ImageConfig:
        """From the `config` object of an OCI image configuration (Docker's field names)."""
        if not isinstance(config, dict):
            raise ValueError("the OCI config is not an object")
        working_dir = config.get("WorkingDir") or ""
        if not isinstance(working_dir, str):
            raise ValueError("WorkingDir is not a string")
        return cls(
            oci=True,
            entrypoint=_words(config.get("Entrypoint"), "Entrypoint"),
            cmd=_words(config.get("Cmd"), "Cmd"),
            working_dir=working_dir,
        )


NATIVE_IMAGE = ImageConfig(oci=False, homes=())
"""The config of an image without OCI metadata."""


def _homes(homes: Iterable[tuple[str | int, str]]) -> tuple[tuple[int, str], ...]:
    return tuple(sorted((int(uid), home) for uid, home in homes))


def _words(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(word, str) for word in value):
        raise ValueError(f"{name} is not a list of strings")
    return tuple(value)


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
            header = stream.read(sif.HEADER.size)
            size = os.fstat(stream.fileno()).st_size
    except OSError as error:
        raise InvalidImageFile(path, f"cannot read it ({error.strerror})") from error
    if len(header) < sif.HEADER.size:
        raise InvalidImageFile(
            path, f"it has {size} bytes, fewer than the {sif.HEADER.size}-byte SIF header"
        )
    launch, magic, version, _arch, _uuid, *numbers = sif.HEADER.unpack(header)
    if magic != sif.MAGIC:
        raise InvalidImageFile(
            path, f"no SIF magic at byte 32 (the file starts with {header[:16]!r})"
        )
    if version != sif.VERSION:
        raise InvalidImageFile(path, f"SIF format version {version!r} is not supported")
    descriptors_offset, descriptors_size, data_offset, data_size = numbers[4:]
    end = max(descriptors_offset + descriptors_size, data_offset + data_size)
    if end > size:
        raise InvalidImageFile(
            path, f"it is truncated: its header describes {end} bytes, the file has {size}"
        )
    log.debug("%s: SIF, launch line %r, %d bytes", path, launch.rstrip(b"\0"), size)


def sif_config(path: Path) -> ImageConfig:
    """The image config a SIF file carries: its `oci-config.json` descriptor, which Apptainer
    writes when it builds from a Docker or OCI source (NATIVE_IMAGE's fields when it has
    none), and the homes of the users its /etc/passwd lists.

    Raises InvalidImageFile for a file that is no SIF, or whose OCI config is unreadable.
    """
    config = _sif_oci_config(path)
    return replace(config, homes=_homes(sif_homes(path).items()))


def _sif_oci_config(path: Path) -> ImageConfig:
    """The image config a SIF file carries: its `oci-config.json` descriptor, which Apptainer
    writes when it builds from a Docker or OCI source; NATIVE_IMAGE when it has none.

    Raises InvalidImageFile for a file that is no SIF, or whose OCI config is unreadable.
    """
    check_sif(path)
    with path.open("rb") as stream:
        for found in sif.descriptors(stream):
            if found.kind != sif.GENERIC_JSON or found.name != _OCI_CONFIG_NAME:
                continue
            if found.size > _LARGEST_CONFIG:
                raise InvalidImageFile(path, f"its OCI config has {found.size} bytes")
            stream.seek(found.offset)
            try:
                return ImageConfig.from_oci(json.loads(stream.read(found.size)))
            except ValueError as error:
                raise InvalidImageFile(path, f"its OCI config is unreadable: {error}") from error
    return NATIVE_IMAGE


def sandbox_config(folder: Path) -> ImageConfig:
    """The image config of a sandbox folder that Apptainer made from a Docker or OCI source,
    with the homes of the users its /etc/passwd lists (see `_sandbox_oci_config`)."""
    return replace(_sandbox_oci_config(folder), homes=_homes(sandbox_homes(folder).items()))


def _sandbox_oci_config(folder: Path) -> ImageConfig:
    """The image config of a sandbox folder that Apptainer made from a Docker or OCI source.

    Such a folder keeps no OCI config, only the runscript Apptainer wrote, whose
    `OCI_ENTRYPOINT='...'` and `OCI_CMD='...'` lines hold the words, each double-quoted.
    A folder without them is a native image.
    """
    try:
        runscript = (folder / ".singularity.d" / "runscript").read_text(errors="replace")
    except OSError:
        return NATIVE_IMAGE
    found: dict[str, tuple[str, ...]] = {}
    for line in runscript.splitlines():
        name, equals, value = line.partition("=")
        if equals and name in ("OCI_ENTRYPOINT", "OCI_CMD") and name not in found:
            try:
                (text,) = shlex.split(value) or [""]
                found[name] = _double_quoted_words(text)
            except ValueError:
                return NATIVE_IMAGE  # not the form Apptainer writes
    if not found:
        return NATIVE_IMAGE
    return ImageConfig(
        oci=True, entrypoint=found.get("OCI_ENTRYPOINT", ()), cmd=found.get("OCI_CMD", ())
    )


def _double_quoted_words(text: str) -> tuple[str, ...]:
    """Words each in shell double quotes, where a backslash escapes `$`, a backquote, `"`,
    a backslash and a newline (the form Apptainer writes OCI_ENTRYPOINT and OCI_CMD in)."""
    words: list[str] = []
    index = 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        if text[index] != '"':
            raise ValueError(f"a word does not start with a double quote at {index}")
        index += 1
        word: list[str] = []
        while True:
            if index >= len(text):
                raise ValueError("a double-quoted word does not end")
            char = text[index]
            if char == "\\" and index + 1 < len(text) and text[index + 1] in '$`"\\\n':
                word.append(text[index + 1])
                index += 2
            elif char == '"':
                index += 1
                break
            else:
                word.append(char)
                index += 1
        words.append("".join(word))
    return tuple(words)


def config_file(sif: Path) -> Path:
    """Where the config of a cached SIF is recorded: a hidden file beside it."""
    return sif.with_name(f".{sif.name}{_CONFIG_SUFFIX}")


def image_config(sif: Path) -> ImageConfig:
    """The recorded config of a cached SIF file; read from the SIF itself when none was
    recorded (an entry older than the record), and NATIVE_IMAGE when that fails too."""
    try:
        recorded = ImageConfig.from_json(json.loads(config_file(sif).read_text()))
    except (OSError, ValueError) as error:
        log.debug("%s: no recorded config (%s); reading the SIF", sif, error)
    else:
        if recorded.homes is None:  # recorded before hpk read the image's users
            recorded = replace(recorded, homes=_homes(sif_homes(sif).items()))
        return recorded
    try:
        return sif_config(sif)
    except InvalidImageFile as error:
        log.warning("%s: %s; running it as a native image", sif, error)
        return NATIVE_IMAGE


class ApptainerCommand(Protocol):
    """Runs one Apptainer command line (a build or a pull); returns its exit status and its
    output (stdout and stderr together). The seam a test's registry replaces; Slurm's
    commands have their own, kubelet_py.adapters.slurm.CommandRunner."""

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]: ...


def run_apptainer(argv: Sequence[str]) -> tuple[int, str]:
    """The real ApptainerCommand."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as error:
        return 127, f"cannot run {argv[0]}: {error.strerror or error}"
    return result.returncode, result.stdout


@dataclass(frozen=True)
class PullLimits:
    """What one pull may take: a registry is the pod spec's to choose, and an endless stream
    or a huge image must not hold a pull slot, or fill the disk, for ever."""

    timeout_s: float | None = None
    """Longest a pull may run; None: no limit."""

    max_bytes: int | None = None
    """Most disk a pull may fill: the SIF it writes and Apptainer's temporary files (layers
    and the unpacked root filesystem, in a private APPTAINER_TMPDIR); None: no limit."""

    poll_s: float = 0.5
    """How often the time and the size are looked at while the pull runs."""


class LimitExceeded(Exception):
    """`run_limited` stopped the command: it ran out of time, or wrote too much."""

    def __init__(self, *, timeout: bool, detail: str, output: str) -> None:
        super().__init__(detail)
        self.timeout = timeout
        self.detail = detail
        self.output = output


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes of the files at or below `paths` (links are not followed; what cannot be read,
    such as an unpacked layer's folder of mode 000, is left out)."""
    total = 0
    stack = list(paths)
    while stack:
        path = stack.pop()
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            try:
                stack.extend(path.iterdir())
            except OSError:
                continue
        else:
            total += info.st_size
    return total


def run_limited(
    argv: Sequence[str],
    *,
    limits: PullLimits,
    watched: Sequence[Path] = (),
    env: dict[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str]:
    """Run a command as `run_apptainer` does, stopping it (KILL to its whole process group) when
    it runs longer than `limits.timeout_s` or the files at `watched` grow past
    `limits.max_bytes`; raises LimitExceeded then."""
    started = clock()
    try:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its helpers (mksquashfs...) are stopped with it
        )
    except OSError as error:
        return 127, f"cannot run {argv[0]}: {error.strerror or error}"
    output = bytearray()

    def read() -> None:
        assert child.stdout is not None
        fd = child.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            output.extend(chunk)
            del output[: max(0, len(output) - (1 << 16))]  # its last words are enough

    reader = threading.Thread(target=read, name="pull-output", daemon=True)
    reader.start()
    stopped: LimitExceeded | None = None
    try:
        while True:
            try:
                child.wait(timeout=limits.poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            ran = clock() - started
            if limits.timeout_s is not None and ran > limits.timeout_s:
                detail = f"stopped after {limits.timeout_s:g} s, its time limit"
                stopped = LimitExceeded(timeout=True, detail=detail, output="")
            elif limits.max_bytes is not None and disk_usage(watched) > limits.max_bytes:
                detail = f"stopped: it wrote more than {_size(limits.max_bytes)}, its size limit"
                stopped = LimitExceeded(timeout=False, detail=detail, output="")
            if stopped is not None:
                break
    finally:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        reader.join(5.0)
        if child.stdout is not None:
            child.stdout.close()
    text = output.decode(errors="replace")
    if stopped is not None:
        stopped.output = text
        raise stopped
    return child.returncode, text


def _size(count: int) -> str:
    """A byte count as people read it: 10 GiB, 512 MiB, 1500 B."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def _apptainer_error(output: str) -> str:
    """Apptainer's own words: its FATAL/ERROR lines, else the last line it wrote."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("FATAL:", "ERROR:"))]
    chosen = errors or lines[-1:] or ["no output"]
    return " ".join(" ".join(line.split()) for line in chosen)[:1000]


def source_kind(source: Path) -> str:
    """`sif`, `sandbox` or `docker-archive`: what an import source is.

    Raises InvalidImageFile for anything else, naming the accepted kinds.
    """
    if source.is_dir():
        return "sandbox"
    try:
        with source.open("rb") as stream:
            start = stream.read(sif.HEADER.size)
    except OSError as error:
        raise InvalidImageFile(source, f"cannot read it ({error.strerror})") from error
    if start[32:42] == sif.MAGIC:
        return "sif"
    try:
        with tarfile.open(source) as archive:
            names = {name.removeprefix("./") for name in archive.getnames()}
    except (tarfile.TarError, OSError):
        names = set()
    if "manifest.json" in names:
        return "docker-archive"
    try:
        check_sif(source)
    except InvalidImageFile as error:
        raise InvalidImageFile(
            source,
            f"{error.problem}; nor is it a sandbox folder or a docker-archive tarball"
            " (`docker save` output, with a manifest.json)",
        ) from error
    return "sif"


def import_image(
    reference: str,
    source: Path,
    *,
    cache_dir: Path | None = None,
    apptainer: str | None = None,
    runner: ApptainerCommand = run_apptainer,
) -> Path:
    """Put an image into the cache for `reference`; returns its cache path.

    `source` is a SIF file (copied), a sandbox folder or a docker-archive tarball (`docker
    save` output); Apptainer builds a SIF file from the last two, without a network. The
    image's ENTRYPOINT, CMD and WORKDIR are recorded beside it. Under the entry's lock the
    new SIF file is written to a hidden temporary file and renamed into place, so readers
    see the old image or the new one, never a partial one. An existing entry is replaced:
    an import is an explicit instruction.
    """
    key = normalize_reference(reference)
    source = Path(source)
    kind = source_kind(source)
    if kind == "sif":
        check_sif(source)
    with image_lock(key, cache_dir=cache_dir) as target:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        temporary = Path(name)
        try:
            if kind == "sif":
                with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                config = sif_config(temporary)  # the source may have changed while copied
            else:
                os.close(fd)
                argument = str(source.resolve())
                if kind == "docker-archive":
                    argument = f"docker-archive:{argument}"
                binary = apptainer or find_apptainer()
                status, output = runner(
                    [binary, "--quiet", "build", "--force", str(temporary), argument]
                )
                if status != 0:
                    raise ImageBuildFailed(f"{kind} {source}", _apptainer_error(output))
                config = sif_config(temporary)
                if kind == "sandbox" and not config.oci:
                    config = sandbox_config(source)
            _install(temporary, target, config)
        finally:
            temporary.unlink(missing_ok=True)
    log.info("imported %s from %s %s into %s", key, kind, source, target)
    return target


def plain_http(registry: str, insecure: Collection[str] = ()) -> bool:
    """Whether `registry` (host[:port]) is reached over plain HTTP: one on the loopback, as
    Docker treats localhost and 127.0.0.0/8, or one the site names in `insecure`."""
    if registry in insecure:
        return True
    if registry.startswith("["):  # [IPv6]:port
        host = registry[1 : registry.find("]")]
    else:
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pull_image(
    reference: str,
    *,
    cache_dir: Path | None = None,
    apptainer: str | None = None,
    runner: ApptainerCommand | None = None,
    fresh_since: float | None = None,
    insecure_registries: Collection[str] = (),
    limits: PullLimits | None = None,
) -> Path:
    """Pull `docker://reference` into the cache; returns its cache path.

    Without a `runner`, Apptainer runs under `limits` (`run_limited`, with a private
    APPTAINER_TMPDIR whose size counts): ImagePullTimeout when it runs too long,
    ImageTooLarge when it writes too much. A `runner` (a test's registry) is trusted to end;
    the SIF it writes is still held to `limits.max_bytes`.

    Pulls of the same entry are serialised by its lock (two kubelets share it too), and the
    ones that waited do not pull again: with `fresh_since` None, an entry present once the lock
    is held is kept (IfNotPresent); with a wall-clock time, an entry written at or after it
    counts as fresh (Always: someone pulled it since this caller asked). A registry on the
    loopback or in `insecure_registries` is reached over plain HTTP. Raises ImagePullFailed
    with Apptainer's error.
    """
    key = normalize_reference(reference)
    with image_lock(key, cache_dir=cache_dir) as target:
        if target.is_file():
            if fresh_since is None:
                return target
            if target.stat().st_mtime >= fresh_since:
                log.info("%s: pulled meanwhile by another", key)
                return target
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        temporary = Path(name)
        limits = limits or PullLimits()
        try:
            binary = apptainer or find_apptainer()
            started = time.monotonic()
            http = plain_http(parse_reference(key).registry, insecure_registries)
            argv = [
                binary,
                "--quiet",
                "pull",
                "--force",
                # hpk's cache is the SIF; Apptainer's own layer cache would hold it twice.
                "--disable-cache",
                *(["--no-https"] if http else []),
                str(temporary),
                f"docker://{key}",
            ]
            if runner is None:
                status, output = _pull_limited(key, argv, temporary, limits)
            else:
                status, output = runner(argv)
            if status != 0:
                raise ImagePullFailed(key, _apptainer_error(output))
            written = disk_usage([temporary])
            if limits.max_bytes is not None and written > limits.max_bytes:
                raise ImageTooLarge(
                    key,
                    f"the image has {_size(written)}, more than {_size(limits.max_bytes)}, "
                    "its size limit",
                )
            try:
                config = sif_config(temporary)
            except InvalidImageFile as error:
                raise ImagePullFailed(key, f"Apptainer wrote no usable SIF: {error}") from error
            _install(temporary, target, config)
        finally:
            temporary.unlink(missing_ok=True)
    log.info("pulled %s into %s in %.1f s", key, target, time.monotonic() - started)
    return target


def _pull_limited(
    key: str, argv: Sequence[str], temporary: Path, limits: PullLimits
) -> tuple[int, str]:
    """`run_limited` of `apptainer pull` with a private APPTAINER_TMPDIR, which counts toward
    the size and is removed afterwards (what a stopped pull left too)."""
    scratch = Path(tempfile.mkdtemp(prefix="hpk-pull-"))  # 0700, the user's own
    env = {**os.environ, "APPTAINER_TMPDIR": str(scratch)}
    try:
        return run_limited(argv, limits=limits, watched=[temporary, scratch], env=env)
    except LimitExceeded as stopped:
        error = ImagePullTimeout if stopped.timeout else ImageTooLarge
        raise error(key, f"the pull was {stopped.detail}") from None
    finally:
        _remove_tree(scratch)


def _remove_tree(path: Path) -> None:
    """Remove a pull's scratch folder, whose unpacked layers may hold folders without write
    or search permission."""

    def make_writable(_function: Any, failed: str, _info: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)

    shutil.rmtree(path, onerror=make_writable)
    if os.path.lexists(path):
        log.warning("pull scratch folder %s not fully removed", path)


def _install(temporary: Path, target: Path, config: ImageConfig) -> None:
    """Move a complete SIF file into its entry, its config recorded first (under the lock)."""
    os.chmod(temporary, _FILE_MODE)
    record = config_file(target)
    fd, name = tempfile.mkstemp(prefix=record.name, suffix=".part", dir=target.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(config.to_json(), out)
    os.chmod(name, _FILE_MODE)
    os.replace(name, record)
    os.replace(temporary, target)
    _sync_folder(target.parent)


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
        config_file(target).unlink(missing_ok=True)
        _sync_folder(target.parent)
    log.info("removed %s (%s)", key, target)
    return target


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_made_image(
    reference: str,
    write_archive: Callable[[Path], object],
    *,
    apptainer: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The SIF file of `reference` in the image cache. Unless the cache holds it, it is made
    from the docker-archive `write_archive` writes to the path it is given (in a scratch
    folder), through the import users run: how hpk brings in the images it makes itself
    from built binaries."""
    found = cached_image(reference, cache_dir=cache_dir)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="hpk-made-image-") as scratch:
        archive = Path(scratch) / "image.tar"
        write_archive(archive)
        return import_image(reference, archive, cache_dir=cache_dir, apptainer=apptainer)
