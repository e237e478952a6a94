"""The recipe's version pins, and the agreement between the shell recipe and hpk.toolchain."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hpk.paths import container_dir
from hpk.toolchain import (
    COMPONENTS,
    LOCAL_PARTS,
    TUNNEL,
    LocalPart,
    Toolchain,
    ToolchainMissing,
    part_sources,
    part_version,
    read_pins,
    tools_dir,
)

RECIPE = container_dir() / "build-toolchain.sh"


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


EXACT = re.compile(r"\d+\.\d+\.\d+(-\d{14}-[0-9a-f]{12})?")
"""x.y.z, or a Go pseudo-version: a commit, for a module that tags no semantic versions."""


def test_every_component_is_pinned_to_an_exact_version() -> None:
    pins = read_pins()
    for key in COMPONENTS.values():
        assert EXACT.fullmatch(pins[key]), f"{key} must be an exact x.y.z (or pseudo-) version"


def test_pins_meet_the_projects_constraints() -> None:
    pins = read_pins()
    assert version(pins["KUBERNETES_VERSION"])[:2] == (1, 33)
    assert version(pins["APPTAINER_VERSION"])[:2] in {(1, 3), (1, 4)}
    # Kubernetes >= 1.31 relies on etcd health endpoints that arrived in 3.5.11.
    assert version(pins["ETCD_VERSION"]) >= (3, 5, 11)
    assert pins["APPTAINER_MODULE_SUM"].startswith("h1:")
    assert version(pins["ARGO_VERSION"])[:2] in {(3, 6), (3, 7)}
    assert pins["ARGO_MODULE_SUM"].startswith("h1:")


def test_malformed_pin_file_is_rejected_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "versions.env"
    bad.write_text("# comment\nKUBERNETES_VERSION=1.33.1\nnot a pin\n")
    with pytest.raises(ValueError, match=r"versions.env:3"):
        read_pins(bad)


@pytest.mark.parametrize("override", [None, "/srv/hpk tools"])
def test_recipe_and_python_choose_the_same_tool_folder(
    override: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HPK_TOOLS_DIR"}
    monkeypatch.delenv("HPK_TOOLS_DIR", raising=False)
    if override:
        env["HPK_TOOLS_DIR"] = override
        monkeypatch.setenv("HPK_TOOLS_DIR", override)
    printed = subprocess.run(
        ["bash", str(RECIPE), "--print-dir"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == str(tools_dir())


def test_component_folders_are_keyed_by_version(tmp_path: Path) -> None:
    chain = Toolchain(root=tmp_path, pins=read_pins())
    assert (
        chain.component_dir("kubernetes").name == f"kubernetes-{chain.pins['KUBERNETES_VERSION']}"
    )
    assert sorted(chain.missing()) == sorted(
        f"{name} {chain.pins[key]}" for name, key in COMPONENTS.items()
    )


def test_binary_without_completed_build_names_the_recipe(tmp_path: Path) -> None:
    chain = Toolchain(root=tmp_path, pins=read_pins())
    half_built = chain.component_dir("etcd") / "bin"
    half_built.mkdir(parents=True)
    (half_built / "etcd").write_text("")
    with pytest.raises(ToolchainMissing, match=r"build-toolchain\.sh"):
        chain.binary("etcd")
    (half_built.parent / ".complete").write_text("")
    assert chain.binary("etcd") == half_built / "etcd"


def test_the_tunnel_is_built_on_the_pinned_wireguard_go() -> None:
    go_mod = (container_dir() / "tunnel" / "go.mod").read_text()
    assert f"golang.zx2c4.com/wireguard v{read_pins()['WIREGUARD_GO_VERSION']}\n" in go_mod


@pytest.mark.parametrize("part", LOCAL_PARTS, ids=lambda part: part.name)
def test_recipe_and_python_give_a_local_part_the_same_version(part: LocalPart) -> None:
    pins = read_pins()
    printed = subprocess.run(
        ["bash", str(RECIPE), "--part-version", part.folder, pins[part.pin]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert part_version(pins, part) == printed


def test_a_change_to_a_local_parts_source_changes_its_version(tmp_path: Path) -> None:
    pins = read_pins()
    for path in part_sources(container_dir() / TUNNEL.folder):
        shutil.copy(path, tmp_path / path.name)
    assert part_version(pins, TUNNEL, tmp_path) == part_version(pins, TUNNEL)
    with (tmp_path / "main.go").open("a") as source:
        source.write("// changed\n")
    assert part_version(pins, TUNNEL, tmp_path) != part_version(pins, TUNNEL)
    (tmp_path / "extra.go").write_text("package main\n")
    assert "extra.go" in [path.name for path in part_sources(tmp_path)]


def test_a_local_part_is_found_only_once_built(tmp_path: Path) -> None:
    chain = Toolchain(root=tmp_path, pins=read_pins())
    folder = tmp_path / f"hpk-tunnel-{part_version(chain.pins, TUNNEL)}"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "hpk-tunnel").write_text("")
    with pytest.raises(ToolchainMissing, match=r"hpk-tunnel .*build-toolchain\.sh"):
        chain.local(TUNNEL)
    (folder / ".complete").write_text("")
    assert chain.local(TUNNEL) == folder / "bin" / "hpk-tunnel"
