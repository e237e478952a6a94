"""Argo Workflows' images, made from the pinned binaries the toolchain built, for sites (and
test machines) that reach no registry.

Argo's install manifests name `quay.io/argoproj/workflow-controller:v<version>` and
`quay.io/argoproj/argocli:v<version>` (the argo-server), and its controller starts every step's
pod with `quay.io/argoproj/argoexec:v<version>`. Upstream builds each on a distroless static
base: the static binary in /bin, the binary's name as ENTRYPOINT, `/etc/nsswitch.conf`, an
empty `/etc/ssh/ssh_known_hosts`, CA certificates, and user 8737 for the controller and the
server. `argo_image_archives` writes the same as `docker save` tarballs, and
`import_argo_images` puts them into hpk's image cache under exactly those names, as an
air-gapped site would; `hpk addons install argo` (hpk.addons) does so before it installs Argo.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpk.docker_archive import Entry, folder, regular_file, write_docker_archive
from hpk.images import cached_image, import_image
from hpk.toolchain import Toolchain

REGISTRY = "quay.io/argoproj"
ARGO_USER = 8737
"""The uid upstream's non-root images run as."""
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ArgoImage:
    """One of Argo's images and how upstream builds it."""

    name: str
    """The image's name in quay.io/argoproj."""
    binary: str
    """The binary in /bin, also the image's ENTRYPOINT."""
    user: int | None
    """The USER of the image; None: root (argoexec, whose emissary runs as the step's user)."""

    def reference(self, version: str) -> str:
        return f"{REGISTRY}/{self.name}:v{version}"


ARGO_IMAGES = (
    ArgoImage("workflow-controller", "workflow-controller", ARGO_USER),
    ArgoImage("argoexec", "argoexec", None),
    ArgoImage("argocli", "argo", ARGO_USER),
)


def image_entries(image: ArgoImage, binary: Path, *, ca_bundle: Path = CA_BUNDLE) -> list[Entry]:
    """The layer of `image`: its binary in /bin and the few files of the distroless base."""
    passwd = (
        f"root:x:0:0:root:/root:/sbin/nologin\nargo:x:{ARGO_USER}:{ARGO_USER}::/tmp:/sbin/nologin\n"
    )
    entries = [
        folder("bin"),
        folder("etc"),
        folder("etc/ssh"),
        folder("etc/ssl"),
        folder("etc/ssl/certs"),
        folder("root", 0o700),
        folder("tmp", 0o1777),
        regular_file(f"bin/{image.binary}", binary.read_bytes(), 0o755),
        regular_file("etc/passwd", passwd.encode()),
        regular_file("etc/group", f"root:x:0:\nargo:x:{ARGO_USER}:\n".encode()),
        regular_file("etc/nsswitch.conf", b"hosts: files dns\n"),
        regular_file("etc/ssh/ssh_known_hosts", b""),
    ]
    if ca_bundle.is_file():
        entries.append(regular_file("etc/ssl/certs/ca-certificates.crt", ca_bundle.read_bytes()))
    return entries


def image_config(image: ArgoImage) -> dict[str, object]:
    """The OCI config upstream's image has: ENTRYPOINT the binary, PATH, and the user."""
    config: dict[str, object] = {"Entrypoint": [image.binary], "Env": [f"PATH={PATH}"]}
    if image.user is not None:
        config["User"] = str(image.user)
    return config


def argo_image_archives(folder_out: Path, toolchain: Toolchain | None = None) -> dict[str, Path]:
    """Write each Argo image as a `docker save` tarball into `folder_out`; reference -> file."""
    tools = toolchain or Toolchain.load()
    version = tools.pins["ARGO_VERSION"]
    written = {}
    for image in ARGO_IMAGES:
        reference = image.reference(version)
        target = folder_out / f"{image.name}.tar"
        write_docker_archive(
            target,
            entries=image_entries(image, tools.binary(image.binary)),
            config=image_config(image),
            tags=[reference],
        )
        written[reference] = target
    return written


def import_argo_images(
    *,
    cache_dir: Path | None = None,
    toolchain: Toolchain | None = None,
    skip_cached: bool = False,
) -> dict[str, Path]:
    """Make Argo's images and import them into hpk's image cache; reference -> cache path.

    With `skip_cached`, an image the cache already holds under its reference is left as it is
    (the reference names the pinned release, so it holds the same binary).
    """
    tools = toolchain or Toolchain.load()
    version = tools.pins["ARGO_VERSION"]
    done = {}
    if skip_cached:
        for image in ARGO_IMAGES:
            found = cached_image(image.reference(version), cache_dir=cache_dir)
            if found is not None:
                done[image.reference(version)] = found
    if len(done) == len(ARGO_IMAGES):
        return done
    with tempfile.TemporaryDirectory(prefix="hpk-argo-images-") as scratch:
        archives = argo_image_archives(Path(scratch), tools)
        for reference, archive in archives.items():
            if reference not in done:
                done[reference] = import_image(
                    reference,
                    archive,
                    cache_dir=cache_dir,
                    apptainer=str(tools.binary("apptainer")),
                )
    return done
