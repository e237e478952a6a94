"""The control-plane image: build it from the pinned tool folder, and run components in it.

On a user's cluster the control plane runs inside one Apptainer image, container/
control-plane.def, so that the site needs nothing but Apptainer. This module builds that
image offline from the binaries in the tool folder, and provides `ApptainerRunner`, the
`hpk.process.Runner` that starts a component's argv inside it. The launcher's code is the
same for both paths: give it `Binaries.in_image()` and an `ApptainerRunner` and every
component runs in the image; give it neither and they run straight from the tool folder.

The image is cached in the tool folder as
`control-plane-<kubernetes>-<etcd>-<coredns>-<hash of the .def>.sif`: a new pin or an edited
recipe builds afresh, anything else costs nothing. Building writes only there and to the tool
folder's logs/. Running writes nothing of its own, except for users without FUSE: a copy of the
image unpacked once per node into a private folder in node-local scratch, and a record of it
(place and digest) in the user's hpk folder; see runnable_image for why it is never found by
its name alone.

    python -m hpk.controlplane.image        build if needed, print the image's path
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from hpk.apptainer import FUSE_DEVICE, fuse_usable, run_options
from hpk.controlplane.errors import ControlPlaneError
from hpk.controlplane.settings import IMAGE_BIN_DIR
from hpk.files import PRIVATE_FILE_MODE, held_lock, private_dir, write_atomic
from hpk.home import HpkHome
from hpk.images import InvalidImageFile, check_sif
from hpk.paths import container_dir
from hpk.process import ProcessSpec, tail
from hpk.scratch import (
    UnsafeScratch,
    check_private_folder,
    make_private_folder,
    own_folder_problem,
    private_folder_problem,
    tree_digest,
)
from hpk.toolchain import Toolchain, ToolchainMissing, find_apptainer

log = logging.getLogger(__name__)

DEFINITION_NAME = "control-plane.def"
"""The image's Apptainer definition, in container/."""

IMAGE_PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager", "coredns", "kubectl")
"""The programs the image holds in IMAGE_BIN_DIR, all from the tool folder."""

IMAGE_SETSID = "/usr/bin/setsid"
"""busybox's setsid in the image, which every component is started through (see
ApptainerRunner)."""

BUSYBOX = Path("/bin/busybox")
"""The build host's busybox, which must be Debian's busybox-static: the image has no libc."""

#: The build argument that names each program's file in the tool folder.
_BINARY_ARGS = {
    "etcd": "ETCD_BINARY",
    "kube-apiserver": "KUBE_APISERVER_BINARY",
    "kube-controller-manager": "KUBE_CONTROLLER_MANAGER_BINARY",
    "coredns": "COREDNS_BINARY",
    "kubectl": "KUBECTL_BINARY",
}
#: The pins that go into the image's labels and file name, in file-name order.
_VERSION_ARGS = ("KUBERNETES_VERSION", "ETCD_VERSION", "COREDNS_VERSION")

_HASH_LENGTH = 12
_BUILD_TIMEOUT_S = 1800.0
_TEST_TIMEOUT_S = 300.0
_UNPACK_TIMEOUT_S = 600.0


class ControlPlaneImageError(ControlPlaneError):
    """Base class of the errors about the control-plane image."""


class ImageBuildFailed(ControlPlaneImageError):
    """The image could not be built; the message says which input or step failed."""

    def __init__(self, what: str, *, log_file: Path | None = None) -> None:
        self.what = what
        self.log_file = log_file
        message = f"control-plane image: {what}"
        if log_file is not None:
            message += f"; full log: {log_file}; its last lines:\n{tail(log_file)}"
        super().__init__(message)


class NotInImage(ControlPlaneImageError, ValueError):
    """A spec names a program that the control-plane image does not hold."""


class CannotBind(ControlPlaneImageError, ValueError):
    """A folder a component needs cannot be bound into the container."""


# --- naming --------------------------------------------------------------------------------


def definition_file() -> Path:
    return container_dir() / DEFINITION_NAME


def definition_digest(path: Path | None = None) -> str:
    """A short hash of the definition file's bytes: part of the image's file name."""
    data = (path or definition_file()).read_bytes()
    return hashlib.sha256(data).hexdigest()[:_HASH_LENGTH]


def image_file_name(pins: Mapping[str, str], *, digest: str) -> str:
    """`control-plane-<kubernetes>-<etcd>-<coredns>-<digest>.sif` for these pins."""
    versions = "-".join(pins[key] for key in _VERSION_ARGS)
    return f"control-plane-{versions}-{digest}.sif"


def image_path(toolchain: Toolchain | None = None) -> Path:
    """Where the image for the current pins and recipe is (or will be) in the tool folder."""
    tools = toolchain or Toolchain.load()
    return tools.root / image_file_name(tools.pins, digest=definition_digest())


# --- building ------------------------------------------------------------------------------


def is_static_executable(path: Path) -> bool:
    """Whether `path` is an ELF executable without a program interpreter (a dynamic loader),
    i.e. one that runs in a root filesystem without libc."""
    with path.open("rb") as stream:
        header = stream.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF":
            return False
        order = "<" if header[5] == 1 else ">"
        if header[4] == 2:  # 64-bit
            (table,) = struct.unpack_from(f"{order}Q", header, 0x20)
            entry_size, count = struct.unpack_from(f"{order}HH", header, 0x36)
        else:
            (table,) = struct.unpack_from(f"{order}I", header, 0x1C)
            entry_size, count = struct.unpack_from(f"{order}HH", header, 0x2A)
        stream.seek(table)
        headers = stream.read(entry_size * count)
    pt_interp = 3
    return all(
        struct.unpack_from(f"{order}I", headers, index * entry_size)[0] != pt_interp
        for index in range(len(headers) // entry_size)
    )


def build_arguments(toolchain: Toolchain, *, busybox: Path = BUSYBOX) -> dict[str, str]:
    """The definition's build arguments: each program's file and the pinned versions.

    Raises ImageBuildFailed naming the first input that is missing or unusable.
    """
    arguments: dict[str, str] = {}
    for program, key in _BINARY_ARGS.items():
        try:
            arguments[key] = str(toolchain.binary(program))
        except ToolchainMissing as error:
            raise ImageBuildFailed(f"{program} is missing: {error}") from None
    if not busybox.is_file():
        raise ImageBuildFailed(
            f"{busybox} is missing; install Debian's busybox-static (the image's shell)"
        )
    arguments["BUSYBOX_BINARY"] = str(busybox)
    for key in (*_BINARY_ARGS.values(), "BUSYBOX_BINARY"):
        if not is_static_executable(Path(arguments[key])):
            raise ImageBuildFailed(
                f"{arguments[key]} is not a statically linked executable, so it cannot run "
                "in the image, which has no C library"
            )
    for key in _VERSION_ARGS:
        arguments[key] = toolchain.pins[key]
    for key, value in arguments.items():
        # Values land in single-quoted shell words and in KEY=VALUE lines.
        if any(ch in value for ch in "'\n\r"):
            raise ImageBuildFailed(f"{key}={value!r}: quotes and newlines are not supported")
    return arguments


def _say(message: str) -> None:
    print(f"[control-plane-image] {message}", file=sys.stderr, flush=True)


def ensure_image(
    toolchain: Toolchain | None = None, *, progress: Callable[[str], None] = _say
) -> Path:
    """Build the control-plane image unless it is cached; return its path.

    The build goes to a temporary name in the tool folder and is renamed into place once
    it is complete and its %test passed, so the cached path always holds a working image.
    Raises ImageBuildFailed.
    """
    tools = toolchain or Toolchain.load()
    target = image_path(tools)
    if target.is_file():
        progress(f"cached: {target}")
        return target
    arguments = build_arguments(tools)
    try:
        apptainer = find_apptainer(tools)
    except ToolchainMissing as error:
        raise ImageBuildFailed(str(error)) from None
    log_dir = tools.root / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        writable = all(os.access(folder, os.W_OK) for folder in (tools.root, log_dir))
    except OSError:
        writable = False
    if not writable:
        raise ImageBuildFailed(
            f"cannot write to the tool folder {tools.root}; build as its owner, or point "
            "HPK_TOOLS_DIR at a tool folder of your own"
        )
    with held_lock(tools.root / ".control-plane-image.lock"):
        if target.is_file():  # built meanwhile by another session
            progress(f"cached: {target}")
            return target
        log_file = log_dir / f"control-plane-image-{datetime.now(UTC):%Y%m%d-%H%M%S}.log"
        progress(f"building {target.name} (log: {log_file})")
        started = time.monotonic()
        _build(target, apptainer=apptainer, arguments=arguments, log_file=log_file)
        size_mb = target.stat().st_size / 1e6
        progress(f"built {target} in {time.monotonic() - started:.0f} s, {size_mb:.0f} MB")
    return target


def _build(target: Path, *, apptainer: str, arguments: Mapping[str, str], log_file: Path) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    # A file, not --build-arg: that flag splits its values at commas.
    arguments_text = "".join(f"{key}={value}\n" for key, value in arguments.items())
    arguments_file = log_file.with_suffix(".args")
    arguments_file.write_text(arguments_text)
    argv = [
        apptainer,
        "build",
        "--force",
        # The build would run %test as root with every capability, which fails where the
        # bounding set lacks one; _self_test runs it with hpk's options instead.
        "--notest",
        "--build-arg-file",
        str(arguments_file),
        str(partial),
        str(definition_file()),
    ]
    try:
        with log_file.open("a") as stream:
            stream.write(f"=== {' '.join(argv)}\nwith {arguments_file}:\n{arguments_text}")
            stream.flush()
            result = subprocess.run(
                argv,
                cwd=container_dir(),
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                timeout=_BUILD_TIMEOUT_S,
                check=False,
            )
        if result.returncode != 0:
            raise ImageBuildFailed(
                f"apptainer build exited with status {result.returncode}", log_file=log_file
            )
        try:
            check_sif(partial)
        except InvalidImageFile as error:
            raise ImageBuildFailed(f"apptainer build left no usable SIF: {error}") from None
        _self_test(partial, apptainer=apptainer, log_file=log_file)
        partial.chmod(0o644)  # other users run it too
        partial.replace(target)
    except subprocess.TimeoutExpired as error:
        raise ImageBuildFailed(
            f"apptainer {error.cmd[1]} took longer than {error.timeout:.0f} s", log_file=log_file
        ) from None
    finally:
        partial.unlink(missing_ok=True)
        arguments_file.unlink(missing_ok=True)


def _self_test(image: Path, *, apptainer: str, log_file: Path) -> None:
    """Run the image's %test (each program reports its pinned version) in a container started
    the way the components will be; a failure keeps the image out of the cache."""
    argv = [apptainer, "test", *run_options(), str(image)]
    with log_file.open("a") as stream:
        stream.write(f"=== {' '.join(argv)}\n")
        stream.flush()
        result = subprocess.run(
            argv,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=_TEST_TIMEOUT_S,
            check=False,
        )
    if result.returncode != 0:
        raise ImageBuildFailed(
            f"the built image failed its %test (apptainer test exited with status "
            f"{result.returncode})",
            log_file=log_file,
        )


# --- running -------------------------------------------------------------------------------


def in_image_program(program: str) -> str:
    """Where the program `program` (a path on the host or in the image, or a bare name) is
    inside the image. Raises NotInImage for any other program."""
    name = PurePosixPath(program).name
    if name not in IMAGE_PROGRAMS:
        raise NotInImage(
            f"{program} is not in the control-plane image, which holds only "
            f"{', '.join(IMAGE_PROGRAMS)}"
        )
    return str(IMAGE_BIN_DIR / name)


def bind_option(path: Path) -> str:
    """`--mount` value that binds `path` at the same path inside the container.

    --mount fields are CSV, so commas, colons and quotes in a path survive; --bind would split
    on them.
    """
    if not path.is_absolute():
        raise CannotBind(f"{path}: only absolute paths can be bound")
    if any(ch in str(path) for ch in "\n\r"):
        raise CannotBind(f"{str(path)!r}: a path with a line break cannot be bound")
    row = io.StringIO()
    csv.writer(row, lineterminator="").writerow(
        ["type=bind", f"source={path}", f"destination={path}"]
    )
    return row.getvalue()


def outermost(paths: Sequence[Path]) -> list[Path]:
    """`paths` without duplicates and without those inside another one, in their order."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(o != p and p.is_relative_to(o) for o in unique)]


@dataclass(frozen=True)
class ApptainerRunner:
    """Runs each spec inside the control-plane image with `apptainer exec`.

    - Network: the host's. The components listen on the node's ports, as on the host path.
    - Files: only the image, the spec's folders (bound at the same paths, so every path in the
      argv means the same inside) and private, empty /tmp and home folders (`--contain`). The
      user's home is not visible to the components. The host's /etc/hosts and a copy of its
      /etc/resolv.conf come in through Apptainer's defaults; CoreDNS does not need the latter,
      since the launcher writes the host's nameservers into the Corefile.
    - Environment: clean (`--cleanenv`), plus the spec's `env`. The components need nothing
      from the job's environment, and some of it would change their behaviour: a site's
      HTTPS_PROXY would send the API server's calls to webhooks and aggregated APIs through
      the proxy. `--no-eval` keeps the values literal. Apptainer takes `env` on its command
      line, so it must never carry a secret (the components read theirs from files).
    - Options for the user who runs it: hpk.apptainer.run_options (`--no-privs` for root,
      `--unsquash` without a usable /dev/fuse).
    - Signals: hpk.process stops a component by signalling its process group, whose leader is
      Apptainer's starter. The starter passes every signal on to the component, so a component
      in the same group would get each SIGTERM twice, and kube-apiserver takes a second one
      as an order to exit at once (status 1) instead of shutting down cleanly. The component
      is therefore started through `setsid` in the image (same pid, its own group), and gets
      SIGTERM once, from the starter. The starter gives it a parent-death signal of SIGKILL,
      so the SIGKILL that ends an unresponsive group still takes the component with it.
    """

    image: Path
    """The control-plane SIF file (see ensure_image)."""

    apptainer: str = "apptainer"
    """The apptainer program: a path, or a name looked up on PATH."""

    uid: int | None = None
    """The user the components run as, for run_options; None: this process's user."""

    fuse_device: Path = FUSE_DEVICE
    """The FUSE device whose permissions decide whether the image must be unpacked."""

    def command(self, spec: ProcessSpec) -> list[str]:
        if not spec.argv:
            raise NotInImage(f"{spec.name}: empty command line")
        mounts: list[str] = []
        for path in outermost(spec.paths):
            mounts += ["--mount", bind_option(path)]
        env: list[str] = []
        for key, value in spec.env.items():
            env += ["--env", f"{key}={value}"]
        return [
            self.apptainer,
            "exec",
            *run_options(self.uid, device=self.fuse_device),
            "--cleanenv",
            "--no-eval",
            "--contain",
            "--cwd",
            "/",
            *env,
            *mounts,
            str(self.image),
            IMAGE_SETSID,
            in_image_program(spec.argv[0]),
            *spec.argv[1:],
        ]


# --- a node-local copy for users without FUSE ----------------------------------------------


class UnsafeScratchFolder(ControlPlaneImageError):
    """Node-local scratch offers no folder that only this user could change."""


@dataclass(frozen=True)
class UnpackedImage:
    """What hpk recorded when it unpacked an image on a node: where, and the tree's digest."""

    path: Path
    digest: str

    @classmethod
    def load(cls, record: Path) -> UnpackedImage | None:
        """The record in `record`, or None when there is none or it is unreadable."""
        try:
            data = json.loads(record.read_text())
            return cls(path=Path(data["path"]), digest=str(data["digest"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring the unreadable record %s: %s", record, error)
            return None

    def save(self, record: Path) -> None:
        write_atomic(record, json.dumps({"path": str(self.path), "digest": self.digest}) + "\n")


def scratch_base() -> Path:
    """Node-local scratch: $TMPDIR (a site may give each job its own), else /tmp."""
    return Path(os.environ.get("TMPDIR") or "/tmp")  # noqa: S108


def unpacked_record(records: Path, image: Path, *, node: str | None = None) -> Path:
    """The file in `records` that says where `image` is unpacked on `node` (default: here)."""
    node = node or socket.gethostname()
    return records / f"{node.replace('/', '_')}--{image.stem}.json"


def reuse_problem(unpacked: UnpackedImage, *, owner: int) -> str | None:
    """Why the recorded copy must not be run again, or None when it may.

    Its folder (made by mkdtemp) must still be a real folder of `owner`'s with mode 0700 in
    a safe base, which no one else can change, and its tree must match the recorded digest,
    which catches a copy left half-removed by /tmp cleaning or changed by the user.
    """
    try:
        check_private_folder(unpacked.path.parent, owner=owner)
    except UnsafeScratch as error:
        return str(error)
    # Apptainer gives the image's root its own mode; the folder around it keeps others out.
    problem = own_folder_problem(unpacked.path, owner=owner)
    if problem is not None:
        return f"{unpacked.path}: {problem}"
    try:
        digest = tree_digest(unpacked.path)
    except OSError as error:
        return f"{unpacked.path}: cannot be read ({error})"
    if digest != unpacked.digest:
        return f"{unpacked.path}: its content differs from what hpk unpacked there"
    return None


def runnable_image(
    image: Path,
    *,
    apptainer: str,
    records: Path | None = None,
    uid: int | None = None,
    owner: int | None = None,
    scratch: Path | None = None,
    fuse_device: Path = FUSE_DEVICE,
) -> Path:
    """The image as this node should run it: the SIF itself where the user can use FUSE.

    Without FUSE, Apptainer unpacks a SIF for every container it starts: about 300 MB and
    1.5 s for each component at each start. Instead the SIF is unpacked once per node into a
    sandbox folder in node-local scratch, which every component of this and later jobs on the
    node then runs from.

    Another user of the node can write to scratch too, so the copy is never found by a name:
    it goes into a fresh folder made by mkdtemp (0700) in `scratch` (default: scratch_base()),
    and its place and digest are recorded in `records` (the user's own 0700 state; default
    <hpk home>/scratch), one file per node and image. A later run reuses the recorded copy
    only if reuse_problem finds nothing wrong; otherwise it says why and unpacks afresh, so
    the real image always starts. It refuses (UnsafeScratchFolder) only when `scratch` itself
    is unsafe: then no folder in it could be trusted. Callers hold the hpk folder's lock, as
    the control-plane job does; a lock in `records` keeps two callers apart anyway.

    `uid` is the user the components run as (for FUSE); `owner` the uid that must own the
    folders, default this process's user.
    """
    uid = os.geteuid() if uid is None else uid
    if fuse_usable(uid, device=fuse_device):
        return image
    owner = os.geteuid() if owner is None else owner
    records = records or HpkHome.default().root / "scratch"
    record = unpacked_record(records, image)
    private_dir(records)
    with held_lock(records / ".lock", mode=PRIVATE_FILE_MODE):
        unpacked = UnpackedImage.load(record)
        if unpacked is not None:
            started = time.monotonic()
            problem = reuse_problem(unpacked, owner=owner)
            if problem is None:
                log.info(
                    "running %s from its verified copy %s (checked in %.1f s)",
                    image.name,
                    unpacked.path,
                    time.monotonic() - started,
                )
                return unpacked.path
            if not os.path.lexists(unpacked.path.parent):  # scratch was cleaned: no news
                log.info("the copy %s of %s is gone; unpacking afresh", unpacked.path, image.name)
            else:
                log.warning("not running the copy %s of %s: %s", unpacked.path, image, problem)
        try:
            folder = make_private_folder(
                scratch or scratch_base(), prefix=f"hpk-{uid}-", owner=owner
            )
        except UnsafeScratch as error:
            raise UnsafeScratchFolder(
                f"cannot unpack the control-plane image on this node: {error}; point TMPDIR "
                "at a folder only you can write to"
            ) from None
        target = folder / image.stem
        started = time.monotonic()
        _unpack(image, target, apptainer=apptainer)
        try:
            fresh = UnpackedImage(path=target, digest=tree_digest(target))
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise ImageBuildFailed(f"cannot read back the unpacked {target}: {error}") from None
        fresh.save(record)
        if unpacked is not None and unpacked.path.parent != folder:
            _remove_own_copy(unpacked.path.parent, owner=owner, uid=uid)
    log.info(
        "unpacked %s into %s for runs without FUSE in %.1f s",
        image,
        target,
        time.monotonic() - started,
    )
    return target


def _unpack(image: Path, target: Path, *, apptainer: str) -> None:
    """`apptainer build --sandbox`; on failure the folder made for it goes, and the error
    says why."""
    try:
        result = subprocess.run(
            [apptainer, "build", "--force", "--sandbox", str(target), str(image)],
            capture_output=True,
            text=True,
            timeout=_UNPACK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise ImageBuildFailed(f"unpacking {image} into {target} failed: {error}") from None
    if result.returncode != 0:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise ImageBuildFailed(
            f"unpacking {image} into {target} failed: {result.stderr.strip()[-500:]}"
        )


def _remove_own_copy(folder: Path, *, owner: int, uid: int) -> None:
    """Remove a copy this user replaced, if it is still a folder of theirs made by hpk.

    Anything else in scratch is someone else's business, and is left alone.
    """
    if not folder.name.startswith(f"hpk-{uid}-"):
        return
    if private_folder_problem(folder, owner=owner) is not None:
        return
    shutil.rmtree(folder, ignore_errors=True)  # it does not follow symlinks
    log.info("removed the replaced copy %s", folder)


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpk.controlplane.image",
        description="Build the control-plane image from the tool folder (unless it is cached) "
        "and print its path.",
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_image()
    except ControlPlaneImageError as error:
        print(f"[control-plane-image] FAILED: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
