"""The container images hpk's tests run, built locally because no registry is reachable.

Each image is an Apptainer definition file in container/test-images/ and is cached as a SIF
file next to the pinned toolchain, in <tools>/test-images-<hash>/, where the hash covers the
recipe files, the Apptainer pin and this module's docker-archive writer: a changed recipe builds
afresh, an unchanged one costs nothing. A recipe's `io.hpk.test-image.oci-config` label holds
the Docker Hub config of the image it stands in for (its CMD); the build stores it in the SIF
as the `oci-config.json` descriptor Apptainer writes for images built from Docker sources, so
hpk runs it the way Docker runs the real image.

One image is no recipe: `hpk.test/entrypoint:1`, an image with an ENTRYPOINT, is written as a
`docker save` tarball (a docker-archive) from the host's busybox, and goes into the cache
through the very import users run (`hpk images import`), which has Apptainer convert it.

`register_test_images` imports them all into hpk's image cache under the names Docker would
give them, so pods can say `image: busybox`.

Building needs root (debootstrap) and the Debian mirror; it starts no container, since the
recipes do all their work on the host (see the recipes' %setup sections).

    python -m hpk.testbed.images [--register]
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hpk.docker_archive import Entry, folder, regular_file, symlink, write_docker_archive
from hpk.files import held_lock
from hpk.images import cached_image, check_sif, import_image
from hpk.paths import container_dir
from hpk.toolchain import Toolchain, ToolchainMissing, tools_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestImage:
    """One test image and the reference it stands in for."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    """File name stem of the built SIF (`<name>.sif`)."""
    reference: str
    """The normalized Docker reference it is cached under."""
    recipe: str
    """Its Apptainer definition file, in container/test-images/; empty for an image written
    as a docker-archive (`<name>.tar`, see `archive_config`)."""


#: Every test image; the one place that names them.
TEST_IMAGES: tuple[TestImage, ...] = (
    TestImage("busybox", "docker.io/library/busybox:latest", "busybox.def"),
    TestImage("python-3.11", "docker.io/library/python:3.11", "python-3.11.def"),
    TestImage("entrypoint", "hpk.test/entrypoint:1", ""),
    TestImage("jupyterlab", "hpk.test/jupyterlab:4.6.6", "jupyterlab.def"),
)

ENTRYPOINT_CONFIG: dict[str, object] = {
    "Entrypoint": ["/bin/sh", "-c", 'echo "entrypoint: $* (in $PWD)"', "entrypoint"],
    "Cmd": ["default-cmd"],
    "WorkingDir": "/srv",
    "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
}
"""The docker-archive image's config: its output names the words the ENTRYPOINT got and the
folder it ran in, so a test can tell CMD, args and command apart, and see WORKDIR."""

OCI_CONFIG_LABEL = "io.hpk.test-image.oci-config"
_SIF_GENERIC_JSON = "6"  # `apptainer sif add --datatype`: 6-GenericJSON


class TestImageBuildFailed(RuntimeError):
    """A test image could not be built; the message names the image and its log."""

    __test__ = False


def recipes_dir() -> Path:
    return container_dir() / "test-images"


def recipe_hash(toolchain: Toolchain | None = None) -> str:
    """A short hash of every recipe file and the Apptainer pin: the cache folder's key."""
    pins = (toolchain or Toolchain.load()).pins
    digest = hashlib.sha256(f"apptainer={pins['APPTAINER_VERSION']}\n".encode())
    digest.update(json.dumps(ENTRYPOINT_CONFIG, sort_keys=True).encode())
    for function in (write_docker_archive, busybox_entries):
        digest.update(inspect.getsource(function).encode())
    for path in sorted(recipes_dir().iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\n{path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def built_images_dir(toolchain: Toolchain | None = None) -> Path:
    """Where the built SIF files for the current recipes live (or will)."""
    return tools_dir() / f"test-images-{recipe_hash(toolchain)}"


def _say(message: str) -> None:
    print(f"[test-images] {message}", flush=True)


def ensure_test_images(progress: Callable[[str], None] = _say) -> dict[str, Path]:
    """Build the test images that are not cached yet; returns reference -> SIF file."""
    toolchain = Toolchain.load()
    apptainer = toolchain.binary("apptainer")
    folder = built_images_dir(toolchain)
    wanted = {image.reference: folder / _built_name(image) for image in TEST_IMAGES}
    if all(path.is_file() for path in wanted.values()):
        progress(f"all {len(wanted)} images cached in {folder}")
        return wanted

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # the SIF files must be readable by the users that run them
    log_dir = tools_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"test-images-{datetime.now(UTC):%Y%m%d-%H%M%S}.log"
    with held_lock(folder / ".build.lock"):
        for image in TEST_IMAGES:
            target = wanted[image.reference]
            if target.is_file():
                progress(f"{image.name}: cached ({target})")
                continue
            if not image.recipe:
                write_docker_archive(
                    target,
                    entries=busybox_entries(),
                    config=ENTRYPOINT_CONFIG,
                    tags=[image.reference],
                )
                progress(f"{image.name}: docker-archive written ({target})")
                continue
            if os.geteuid() != 0:
                raise TestImageBuildFailed(
                    f"test image {image.name} ({image.reference}) is not built and building "
                    "needs root (debootstrap); run: sudo python -m hpk.testbed.images"
                )
            progress(f"{image.name}: building {image.reference} (log: {log_file})")
            started = time.monotonic()
            build_image(image, target=target, apptainer=apptainer, log_file=log_file)
            size_mb = target.stat().st_size / 1e6
            progress(f"{image.name}: done in {time.monotonic() - started:.0f} s, {size_mb:.1f} MB")
    return wanted


def build_image(
    image: TestImage,
    *,
    target: Path,
    apptainer: Path,
    log_file: Path | None = None,
    recipes: Path | None = None,
    environment: dict[str, str] | None = None,
) -> None:
    """Build `image` from its recipe in `recipes` (default: the test images' folder) into
    `target`, with `environment` added to the build's (which the recipe's %setup sees)."""
    recipes = recipes or recipes_dir()
    if log_file is None:
        log_file = tools_dir() / "logs" / f"test-images-{datetime.now(UTC):%Y%m%d-%H%M%S}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    with log_file.open("a") as stream:
        stream.write(f"=== {image.name} ({image.reference}) from {image.recipe}\n")
        stream.flush()
        result = subprocess.run(
            [str(apptainer), "build", "--force", "--notest", str(partial), image.recipe],
            cwd=recipes,
            env={**os.environ, **(environment or {})},
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
        raise TestImageBuildFailed(
            f"test image {image.name} ({image.reference}) did not build: apptainer exited "
            f"with {result.returncode}; full log: {log_file}; its last lines:\n{tail}"
        )
    check_sif(partial)
    config = recipe_oci_config(recipes / image.recipe)
    if config is not None:
        # The config Apptainer would have written had the image come from Docker Hub.
        config_json = partial.with_name(f".{image.name}.oci-config.json")
        config_json.write_text(json.dumps(config))
        adding = subprocess.run(
            [
                *(str(apptainer), "sif", "add", "--datatype", _SIF_GENERIC_JSON, "--groupid", "1"),
                *("--filename", "oci-config.json", str(partial), str(config_json)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        config_json.unlink()
        if adding.returncode != 0:
            partial.unlink(missing_ok=True)
            raise TestImageBuildFailed(
                f"test image {image.name}: adding its OCI config failed: {adding.stderr.strip()}"
            )
    partial.chmod(0o644)
    partial.replace(target)


def _built_name(image: TestImage) -> str:
    return f"{image.name}.sif" if image.recipe else f"{image.name}.tar"


def recipe_oci_config(recipe: Path) -> dict[str, object] | None:
    """The OCI config in a recipe's `io.hpk.test-image.oci-config` label, if it has one."""
    in_labels = False
    for line in recipe.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("%"):
            in_labels = stripped == "%labels"
        elif in_labels and stripped.startswith(OCI_CONFIG_LABEL + " "):
            config = json.loads(stripped[len(OCI_CONFIG_LABEL) :])
            if not isinstance(config, dict):
                raise ValueError(f"{recipe}: label {OCI_CONFIG_LABEL} is not a JSON object")
            return config
    return None


def busybox_entries(busybox: Path = Path("/bin/busybox")) -> list[Entry]:
    """The layer of a busybox image: the host's static busybox and its applets (as busybox.def
    has them), and the few files a shell expects."""
    entries = [
        folder(name, 0o1777 if name == "tmp" else 0o755)
        for name in ("bin", "etc", "root", "sbin", "srv", "tmp", "usr", "usr/bin", "usr/sbin")
    ]
    entries.append(regular_file("bin/busybox", busybox.read_bytes(), 0o755))
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries += [
        symlink(applet, "/bin/busybox") for applet in sorted(set(applets) - {"bin/busybox"})
    ]
    entries += [
        regular_file(name, text)
        for name, text in (
            ("etc/group", b"root:x:0:\n"),
            ("etc/hosts", b""),
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/resolv.conf", b""),
        )
    ]
    return entries


def register_test_images(cache_dir: Path | None = None) -> dict[str, Path]:
    """Build the test images if needed and put them into hpk's image cache.

    Returns reference -> path in the cache. An entry that already holds the same bytes is left
    alone, so a second call is cheap.
    """
    registered: dict[str, Path] = {}
    for reference, built in ensure_test_images().items():
        if built.suffix == ".tar":  # through the import users run: Apptainer converts it
            registered[reference] = import_image(reference, built, cache_dir=cache_dir)
            continue
        present = cached_image(reference, cache_dir=cache_dir)
        if present is not None and filecmp.cmp(present, built, shallow=False):
            registered[reference] = present
        else:
            registered[reference] = import_image(reference, built, cache_dir=cache_dir)
    return registered


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hpk.testbed.images", description="Build (and cache) hpk's test images."
    )
    parser.add_argument(
        "--register", action="store_true", help="also import them into hpk's image cache"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        images = register_test_images() if args.register else ensure_test_images()
    except (TestImageBuildFailed, ToolchainMissing) as error:
        print(f"[test-images] FAILED: {error}", file=sys.stderr)
        return 1
    for reference, path in images.items():
        print(f"{reference} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
