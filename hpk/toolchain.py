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
    "coredns": "COREDNS_VERSION",
    "apptainer": "APPTAINER_VERSION",
    "argo": "ARGO_VERSION",
    "metrics-server": "METRICS_SERVER_VERSION",
}


#: The pod network's tunnel, built from this checkout's container/tunnel: its folder's version
#: is the wireguard-go pin and a hash of these files, so that a change of source rebuilds it.
TUNNEL = "hpk-tunnel"
TUNNEL_SOURCES = ("go.mod", "go.sum", "main.go")


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


def tunnel_version(pins: dict[str, str], source: Path | None = None) -> str:
    """The tunnel's version, exactly as build-toolchain.sh computes it: the wireguard-go pin,
    then the first 12 hex digits of the sha256 of its source files, concatenated."""
    source = source or container_dir() / "tunnel"
    digest = hashlib.sha256(b"".join((source / name).read_bytes() for name in TUNNEL_SOURCES))
    return f"{pins['WIREGUARD_GO_VERSION']}-{digest.hexdigest()[:12]}"


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

    def tunnel(self) -> Path:
        """Path of hpk-tunnel built from this checkout's source; raises if it was not."""
        version = tunnel_version(self.pins)
        folder = self.root / f"{TUNNEL}-{version}"
        if (folder / "bin" / TUNNEL).is_file() and (folder / ".complete").is_file():
            return folder / "bin" / TUNNEL
        raise ToolchainMissing(
            f"{TUNNEL} {version} is not in the tool folder {self.root}; "
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
