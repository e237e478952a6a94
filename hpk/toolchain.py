"""The pinned toolchain: where container/build-toolchain.sh put each component.

The pins live in container/versions.env, shared with the shell recipe. Each component sits in
<tools>/<name>-<version>/bin, and is usable only once the recipe wrote its `.complete` mark.
This module only reads; building is the recipe's job.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hpk.paths import container_dir

_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S*)$")

#: Component name in the tool folder -> the versions.env key that pins it.
COMPONENTS = {
    "etcd": "ETCD_VERSION",
    "kubernetes": "KUBERNETES_VERSION",
    "kube-proxy": "KUBERNETES_VERSION",
    "kubernetes-e2e": "KUBERNETES_VERSION",
    "coredns": "COREDNS_VERSION",
    "apptainer": "APPTAINER_VERSION",
    "argo": "ARGO_VERSION",
    "metrics-server": "METRICS_SERVER_VERSION",
    "minio": "MINIO_VERSION",
}


@dataclass(frozen=True)
class LocalPart:
    """A helper built from this checkout's source, in container/<folder>: its folder in the
    tool folder is named by its pin and a hash of that source, so that a change of source
    builds it again."""

    name: str
    """The program, and the start of its folder's name."""

    folder: str
    """Its source folder under container/."""

    pin: str
    """The versions.env key of the upstream module it is built on."""


#: The pod network's tunnel (container/tunnel, on wireguard-go).
TUNNEL = LocalPart("hpk-tunnel", "tunnel", "WIREGUARD_GO_VERSION")
#: The kubelet API's front for exec, attach and port-forward (container/kubelet-api, on the
#: Kubernetes kubelet's streaming packages).
KUBELET_API = LocalPart("hpk-kubelet-api", "kubelet-api", "KUBERNETES_VERSION")
LOCAL_PARTS = (TUNNEL, KUBELET_API)


class ToolchainMissing(RuntimeError):
    """A pinned component has not been built; the message says how to build it."""


def read_pins(path: Path | None = None) -> dict[str, str]:
    """Parse versions.env: KEY=VALUE lines, comments and blank lines ignored."""
    path = path or container_dir() / "versions.env"
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        pins[match.group(1)] = match.group(2)
    return pins


def part_sources(source: Path) -> list[Path]:
    """A local part's source files, in the order build-toolchain.sh hashes them: go.mod,
    go.sum and every .go file, sorted by name."""
    names = {"go.mod", "go.sum", *(path.name for path in source.glob("*.go"))}
    return [source / name for name in sorted(names)]


def part_version(pins: dict[str, str], part: LocalPart, source: Path | None = None) -> str:
    """A local part's version, exactly as build-toolchain.sh computes it: its pin, then the
    first 12 hex digits of the sha256 of its source files, concatenated."""
    source = source or container_dir() / part.folder
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in part_sources(source)))
    return f"{pins[part.pin]}-{digest.hexdigest()[:12]}"


def tools_dir() -> Path:
    """The tool folder, chosen exactly as build-toolchain.sh chooses it."""
    override = os.environ.get("HPK_TOOLS_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/hpk-tools")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hpk-tools"


@dataclass(frozen=True)
class Toolchain:
    """The bin folders of the pinned components."""

    root: Path
    pins: dict[str, str]

    @classmethod
    def load(cls) -> Toolchain:
        return cls(root=tools_dir(), pins=read_pins())

    def component_dir(self, name: str) -> Path:
        return self.root / f"{name}-{self.pins[COMPONENTS[name]]}"

    def bin_dirs(self) -> list[Path]:
        return [self.component_dir(name) / "bin" for name in COMPONENTS]

    def missing(self) -> list[str]:
        return [
            f"{name} {self.pins[COMPONENTS[name]]}"
            for name in COMPONENTS
            if not (self.component_dir(name) / ".complete").is_file()
        ]

    def binary(self, name: str) -> Path:
        """Path of a built binary such as 'kube-apiserver'; raises if it was not built."""
        for directory in self.bin_dirs():
            candidate = directory / name
            if candidate.is_file() and (directory.parent / ".complete").is_file():
                return candidate
        raise ToolchainMissing(
            f"{name} is not in the tool folder {self.root}; "
            "build it with: bash container/build-toolchain.sh"
        )

    def local(self, part: LocalPart) -> Path:
        """Path of a local part built from this checkout's source; raises if it was not."""
        version = part_version(self.pins, part)
        folder = self.root / f"{part.name}-{version}"
        if (folder / "bin" / part.name).is_file() and (folder / ".complete").is_file():
            return folder / "bin" / part.name
        raise ToolchainMissing(
            f"{part.name} {version} is not in the tool folder {self.root}; "
            "build it with: bash container/build-toolchain.sh"
        )

    def path_with_tools(self, path: str | None = None) -> str:
        """PATH with the tool folders first."""
        rest = path if path is not None else os.environ.get("PATH", "")
        return os.pathsep.join([*(str(d) for d in self.bin_dirs()), rest])


def find_apptainer(toolchain: Toolchain | None = None) -> str:
    """The pinned Apptainer from the tool folder, else the one on PATH (a site's).

    Raises ToolchainMissing when there is neither.
    """
    try:
        return str((toolchain or Toolchain.load()).binary("apptainer"))
    except ToolchainMissing:
        found = shutil.which("apptainer")
        if found is None:
            raise ToolchainMissing("apptainer is neither in the tool folder nor on PATH") from None
        return found
