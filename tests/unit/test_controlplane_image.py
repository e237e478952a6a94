"""The control-plane image's name and build inputs, and the `apptainer exec` command line that
runs a component inside it. Nothing here starts Apptainer."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import pytest

from hpk.controlplane import Binaries, ControlPlaneSettings, Ports, StateLayout
from hpk.controlplane import components as comp
from hpk.controlplane.image import (
    IMAGE_PROGRAMS,
    IMAGE_SETSID,
    ApptainerRunner,
    CannotBind,
    ImageBuildFailed,
    NotInImage,
    UnsafeScratchFolder,
    bind_option,
    build_arguments,
    definition_digest,
    definition_file,
    ensure_image,
    image_file_name,
    image_path,
    in_image_program,
    is_static_executable,
    runnable_image,
)
from hpk.controlplane.settings import IMAGE_BIN_DIR
from hpk.pki import ClusterPKI
from hpk.process import ProcessSpec
from hpk.scratch import private_folder_problem, tree_digest
from hpk.toolchain import Toolchain, read_pins

pytestmark = pytest.mark.timeout(60)

PINS = {
    "KUBERNETES_VERSION": "1.33.13",
    "ETCD_VERSION": "3.5.24",
    "COREDNS_VERSION": "1.12.4",
    "APPTAINER_VERSION": "1.4.3",
    "ARGO_VERSION": "3.7.18",
    "METRICS_SERVER_VERSION": "0.8.0",
    "MINIO_VERSION": "0.0.0-20260212201848-7aac2a2c5b7c",
}
IMAGE = Path("/opt/hpk tools/control-plane.sif")

# --- ELF files for the static-binary check --------------------------------------------------

_PT_LOAD = 1
_PT_INTERP = 3


def elf(path: Path, *segments: int) -> Path:
    """A minimal 64-bit little-endian ELF header with one program header per segment type."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff: right after the header
    struct.pack_into("<HH", header, 0x36, 56, len(segments))  # e_phentsize, e_phnum
    table = b"".join(struct.pack("<I", kind) + bytes(52) for kind in segments)
    path.write_bytes(bytes(header) + table)
    path.chmod(0o755)
    return path


def test_static_executables_are_told_from_dynamic_ones(tmp_path: Path) -> None:
    assert is_static_executable(elf(tmp_path / "static", _PT_LOAD, _PT_LOAD))
    assert not is_static_executable(elf(tmp_path / "dynamic", _PT_LOAD, _PT_INTERP))
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert not is_static_executable(script)


def fake_toolchain(root: Path, *, skip: str = "", interp: str = "") -> Toolchain:
    """A tool folder with every control-plane program, as tiny ELF files."""
    tools = Toolchain(root=root, pins=PINS)
    owners = {"etcd": "etcd", "coredns": "coredns"}
    for program in IMAGE_PROGRAMS:
        folder = tools.component_dir(owners.get(program, "kubernetes"))
        (folder / "bin").mkdir(parents=True, exist_ok=True)
        (folder / ".complete").write_text("done\n")
        if program != skip:
            kinds = (_PT_LOAD, _PT_INTERP) if program == interp else (_PT_LOAD,)
            elf(folder / "bin" / program, *kinds)
    return tools


# --- the image's name and build inputs ------------------------------------------------------


def test_image_file_name_carries_the_versions_and_the_recipe_hash() -> None:
    name = image_file_name(PINS, digest="0123456789ab")
    assert name == "control-plane-1.33.13-3.5.24-1.12.4-0123456789ab.sif"


def test_recipe_hash_follows_the_definition_file(tmp_path: Path) -> None:
    recipe = tmp_path / "control-plane.def"
    recipe.write_text("Bootstrap: scratch\n")
    first = definition_digest(recipe)
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert definition_digest(recipe) == first
    recipe.write_text("Bootstrap: scratch\n# changed\n")
    assert definition_digest(recipe) != first


def test_image_lives_in_the_tool_folder_under_the_current_pins_and_recipe(tmp_path: Path) -> None:
    tools = Toolchain(root=tmp_path, pins=read_pins())
    path = image_path(tools)
    assert path.parent == tmp_path
    assert path.name == image_file_name(tools.pins, digest=definition_digest(definition_file()))


def test_build_arguments_name_every_program_and_pin(tmp_path: Path) -> None:
    tools = fake_toolchain(tmp_path / "tools")
    busybox = elf(tmp_path / "busybox", _PT_LOAD)
    arguments = build_arguments(tools, busybox=busybox)
    assert arguments["ETCD_BINARY"] == str(tools.component_dir("etcd") / "bin" / "etcd")
    assert arguments["KUBECTL_BINARY"] == str(tools.component_dir("kubernetes") / "bin" / "kubectl")
    assert arguments["BUSYBOX_BINARY"] == str(busybox)
    assert arguments["KUBERNETES_VERSION"] == "1.33.13"
    # Exactly the arguments the recipe uses: a typo on either side would break the build.
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", definition_file().read_text()))
    assert used == set(arguments)


def test_recipe_installs_every_program_where_the_runner_looks() -> None:
    recipe = definition_file().read_text()
    for program in IMAGE_PROGRAMS:
        assert f'"$bin/{program}"' in recipe
    assert f"bin=$root{IMAGE_BIN_DIR}" in recipe
    for label in ("kubernetes-version", "etcd-version", "coredns-version"):
        assert f"io.hpk.{label}" in recipe


def test_missing_program_is_named(tmp_path: Path) -> None:
    tools = fake_toolchain(tmp_path / "tools", skip="kube-controller-manager")
    with pytest.raises(ImageBuildFailed) as caught:
        build_arguments(tools, busybox=elf(tmp_path / "busybox", _PT_LOAD))
    assert "kube-controller-manager is missing" in str(caught.value)
    assert "build-toolchain.sh" in str(caught.value)


def test_dynamically_linked_program_is_refused(tmp_path: Path) -> None:
    tools = fake_toolchain(tmp_path / "tools", interp="coredns")
    with pytest.raises(ImageBuildFailed) as caught:
        build_arguments(tools, busybox=elf(tmp_path / "busybox", _PT_LOAD))
    assert "bin/coredns is not a statically linked executable" in str(caught.value)


def test_missing_busybox_is_named(tmp_path: Path) -> None:
    tools = fake_toolchain(tmp_path / "tools")
    with pytest.raises(ImageBuildFailed, match="busybox-static"):
        build_arguments(tools, busybox=tmp_path / "no-busybox")


def test_quote_in_a_tool_path_is_refused(tmp_path: Path) -> None:
    tools = fake_toolchain(tmp_path / "it's tools")
    with pytest.raises(ImageBuildFailed, match="quotes and newlines"):
        build_arguments(tools, busybox=elf(tmp_path / "busybox", _PT_LOAD))


def test_cached_image_is_not_built_again(tmp_path: Path) -> None:
    tools = Toolchain(root=tmp_path, pins=read_pins())  # no programs: a build would fail
    image_path(tools).write_bytes(b"a built image")
    said: list[str] = []
    assert ensure_image(tools, progress=said.append) == image_path(tools)
    assert said == [f"cached: {image_path(tools)}"]


def test_build_without_programs_fails_before_starting_apptainer(tmp_path: Path) -> None:
    tools = Toolchain(root=tmp_path, pins=read_pins())
    with pytest.raises(ImageBuildFailed, match="etcd is missing"):
        ensure_image(tools, progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []


# --- the runner -----------------------------------------------------------------------------


@pytest.fixture
def fuse(tmp_path: Path) -> Path:
    device = tmp_path / "fuse"
    device.write_text("")
    device.chmod(0o600)  # usable by its owner (and root) only, as on the test machines
    return device


def spec(
    *argv: str, paths: tuple[Path, ...] = (), env: dict[str, str] | None = None
) -> ProcessSpec:
    return ProcessSpec(
        name="etcd",
        argv=argv,
        log_file=Path("/state/logs/etcd.log"),
        pid_file=Path("/state/run/etcd.pid"),
        paths=paths,
        env=env or {},
    )


def split(command: list[str]) -> tuple[list[str], list[str]]:
    """Apptainer's part of `command` (up to the image) and what runs inside."""
    at = command.index(str(IMAGE))
    return command[:at], command[at + 1 :]


def test_root_runs_without_privileges_from_the_mounted_image(fuse: Path) -> None:
    runner = ApptainerRunner(IMAGE, apptainer="/tools/apptainer", uid=0, fuse_device=fuse)
    options, inside = split(runner.command(spec("/usr/local/bin/etcd", "--name=hpk")))
    assert options[:2] == ["/tools/apptainer", "exec"]
    assert "--no-privs" in options
    assert "--unsquash" not in options
    assert inside == [IMAGE_SETSID, "/usr/local/bin/etcd", "--name=hpk"]


def test_user_without_fuse_unpacks_the_image(fuse: Path) -> None:
    runner = ApptainerRunner(IMAGE, uid=fuse.stat().st_uid + 4242, fuse_device=fuse)
    options, _ = split(runner.command(spec("/usr/local/bin/etcd")))
    assert options[0] == "apptainer"
    assert "--unsquash" in options
    assert "--no-privs" not in options


def test_environment_is_clean_apart_from_the_spec(fuse: Path) -> None:
    runner = ApptainerRunner(IMAGE, uid=0, fuse_device=fuse)
    options, _ = split(runner.command(spec("etcd", env={"GODEBUG": "x509sha1=1", "A": "$B"})))
    assert {"--cleanenv", "--no-eval", "--contain"} <= set(options)
    assert options[options.index("--cwd") + 1] == "/"
    pairs = [options[i + 1] for i, option in enumerate(options) if option == "--env"]
    assert pairs == ["GODEBUG=x509sha1=1", "A=$B"]
    assert "--net" not in options and "--network" not in options  # the host's network


@pytest.mark.parametrize(
    "program",
    [
        "/var/cache/hpk-tools/kubernetes-1.33.13/bin/kube-apiserver",
        "/usr/local/bin/kube-apiserver",
        "kube-apiserver",
    ],
)
def test_programs_map_to_their_place_in_the_image(program: str) -> None:
    assert in_image_program(program) == "/usr/local/bin/kube-apiserver"


def test_program_outside_the_image_is_refused(fuse: Path) -> None:
    runner = ApptainerRunner(IMAGE, uid=0, fuse_device=fuse)
    with pytest.raises(NotInImage, match="/usr/bin/slurmctld is not in the control-plane image"):
        runner.command(spec("/usr/bin/slurmctld"))


def test_binaries_in_image_are_the_images_programs() -> None:
    binaries = Binaries.in_image()
    for path in (
        binaries.etcd,
        binaries.kube_apiserver,
        binaries.kube_controller_manager,
        binaries.coredns,
    ):
        assert path.parent == IMAGE_BIN_DIR
        assert path.name in IMAGE_PROGRAMS
        assert in_image_program(str(path)) == str(path)


def mounts(options: list[str]) -> list[str]:
    return [options[i + 1] for i, option in enumerate(options) if option == "--mount"]


def test_each_folder_is_bound_once_at_the_same_path(fuse: Path) -> None:
    runner = ApptainerRunner(IMAGE, uid=0, fuse_device=fuse)
    paths = (Path("/home/u/.hpk/state"), Path("/home/u/.hpk/state/pki"), Path("/scratch/pki"))
    options, _ = split(runner.command(spec("etcd", paths=(*paths, paths[0]))))
    assert mounts(options) == [
        "type=bind,source=/home/u/.hpk/state,destination=/home/u/.hpk/state",
        "type=bind,source=/scratch/pki,destination=/scratch/pki",
    ]
    assert "--bind" not in options


def test_awkward_folder_names_survive_the_mount_syntax() -> None:
    weird = Path('/var/tmp/a dir, with: "quotes";')
    assert bind_option(weird) == (
        'type=bind,"source=/var/tmp/a dir, with: ""quotes"";",'
        '"destination=/var/tmp/a dir, with: ""quotes"";"'
    )


def test_relative_or_multi_line_folders_are_refused() -> None:
    with pytest.raises(CannotBind, match="only absolute paths"):
        bind_option(Path("state"))
    with pytest.raises(CannotBind, match="line break"):
        bind_option(Path("/var/tmp/a\nb"))


# --- what the components need is bound ------------------------------------------------------


def context(tmp_path: Path) -> comp.Context:
    return comp.Context(
        settings=ControlPlaneSettings(),
        binaries=Binaries.in_image(),
        pki=ClusterPKI(tmp_path / "elsewhere" / "pki"),
        ports=Ports(
            etcd_client=2379,
            etcd_peer=2380,
            apiserver=6443,
            controller_manager=10257,
            dns=1053,
            dns_health=8080,
            dns_ready=8181,
            kubelet=10250,
            hub=51820,
            metrics_server=4443,
        ),
        layout=StateLayout(tmp_path / "state"),
        advertise_address="192.0.2.10",
        dns_bind_address="192.0.2.10",
    )


def paths_in(argv: tuple[str, ...]) -> list[Path]:
    """Every absolute path an argument names (`--flag=/path` or `/path`)."""
    found = []
    for argument in argv[1:]:
        value = argument.split("=", 1)[1] if argument.startswith("--") else argument
        if value.startswith("/"):
            found.append(Path(value))
    return found


@pytest.mark.parametrize("name", comp.ORDER)
def test_every_file_a_component_names_is_bound(tmp_path: Path, name: str) -> None:
    ctx = context(tmp_path)
    component = comp.BUILDERS[name](ctx)
    named = paths_in(component.spec.argv)
    if name == comp.COREDNS:  # the Corefile names the kubeconfig CoreDNS reads
        named.append(ctx.layout.coredns_kubeconfig)
    assert named, "every component reads certificates or a config file"
    bound = component.spec.paths
    unbound = [p for p in named if not any(p.is_relative_to(folder) for folder in bound)]
    assert unbound == []
    runner = ApptainerRunner(IMAGE, uid=0)
    options, inside = split(runner.command(component.spec))
    assert inside[1:] == [str(Binaries.in_image().etcd.parent / name), *component.spec.argv[1:]]
    assert len(mounts(options)) == 2  # the state folder and the PKI folder


def fake_apptainer(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for `apptainer build --force --sandbox DIR SIF` that counts its calls."""
    calls = tmp_path / "calls"
    program = tmp_path / "apptainer"
    program.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\nmkdir -p "$4/usr/local/bin"\n'
        'echo real > "$4/usr/local/bin/kube-apiserver"\n'
    )
    program.chmod(0o755)
    return program, calls


class Node:
    """One node without FUSE: its scratch base, the user's record folder and an Apptainer."""

    def __init__(self, tmp_path: Path) -> None:
        self.apptainer, self.calls = fake_apptainer(tmp_path)
        self.sif = tmp_path / "control-plane-1.33.13-abc.sif"
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir()
        self.scratch.chmod(0o1777)
        self.records = tmp_path / "home" / "scratch"
        self.no_fuse = tmp_path / "no-fuse"

    def runnable(self) -> Path:
        return runnable_image(
            self.sif,
            apptainer=str(self.apptainer),
            records=self.records,
            uid=4242,
            scratch=self.scratch,
            fuse_device=self.no_fuse,
        )

    def unpacks(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_runnable_image_is_the_sif_where_fuse_works(tmp_path: Path) -> None:
    device = tmp_path / "fuse"
    device.write_text("")
    device.chmod(0o666)
    sif = tmp_path / "control-plane-x.sif"
    assert runnable_image(sif, apptainer="false", uid=4242, fuse_device=device) == sif


def test_image_is_unpacked_once_into_a_fresh_private_folder(node: Node) -> None:
    folders = {node.runnable() for _ in range(3)}
    assert node.unpacks() == 1
    assert len(folders) == 1
    (folder,) = folders
    assert folder.name == "control-plane-1.33.13-abc"
    assert folder.parent.parent == node.scratch
    assert re.fullmatch(r"hpk-4242-\w{8,}", folder.parent.name), folder.parent.name
    assert private_folder_problem(folder.parent, owner=os.geteuid()) is None
    assert (folder / "usr/local/bin/kube-apiserver").read_text() == "real\n"


def test_record_of_the_copy_is_private_and_holds_its_digest(node: Node) -> None:
    folder = node.runnable()
    (record,) = node.records.glob("*.json")
    assert record.name.endswith(f"--{node.sif.stem}.json")
    assert stat.S_IMODE(node.records.stat().st_mode) == 0o700
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    data = json.loads(record.read_text())
    assert data == {"path": str(folder), "digest": tree_digest(folder)}


def test_folder_planted_under_the_old_predictable_name_is_never_used(node: Node) -> None:
    planted_root = node.scratch / "hpk-4242"
    planted = planted_root / node.sif.stem
    (planted / "usr/local/bin").mkdir(parents=True)
    (planted / "usr/local/bin/kube-apiserver").write_text("#!/bin/sh\necho planted\n")
    (planted_root / f"{node.sif.stem}.complete").write_text("")
    planted_root.chmod(0o777)
    folder = node.runnable()
    assert not folder.is_relative_to(planted_root)
    assert node.unpacks() == 1
    assert (folder / "usr/local/bin/kube-apiserver").read_text() == "real\n"


def plant_record(node: Node, path: Path) -> None:
    """Point the user's record at `path`, with the digest of what is there now."""
    (record,) = node.records.glob("*.json")
    record.write_text(json.dumps({"path": str(path), "digest": tree_digest(path)}))


def test_changed_copy_is_unpacked_afresh_and_the_old_one_removed(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    first = node.runnable()
    (first / "usr/local/bin/kube-apiserver").write_text("#!/bin/sh\necho planted\n")
    second = node.runnable()
    assert second != first
    assert node.unpacks() == 2
    assert (second / "usr/local/bin/kube-apiserver").read_text() == "real\n"
    assert not first.parent.exists()
    assert f"{first}: its content differs from what hpk unpacked there" in caplog.text


def test_copy_whose_folder_others_can_enter_is_not_used(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    first = node.runnable()
    first.parent.chmod(0o755)
    second = node.runnable()
    assert second != first
    assert node.unpacks() == 2
    assert f"{first.parent}: has mode 0755" in caplog.text
    assert first.parent.exists()  # not hpk's to remove any more: its mode is not hpk's


def test_copy_behind_a_symlink_is_not_used(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    first = node.runnable()
    link = node.scratch / "hpk-4242-link"
    link.symlink_to(first.parent)
    plant_record(node, link / first.name)
    second = node.runnable()
    assert not second.is_relative_to(link)
    assert second != first
    assert f"{link}: is a symbolic link, not a folder" in caplog.text


def test_copy_in_a_base_others_can_rename_in_is_not_used(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    first = node.runnable()
    node.scratch.chmod(0o777)
    with pytest.raises(UnsafeScratchFolder, match=f"{node.scratch}: has mode 0777"):
        node.runnable()
    assert "without the sticky bit" in caplog.text
    assert node.unpacks() == 1
    assert first.is_dir()


def test_copy_of_another_owner_is_not_used(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.runnable()
    someone_else = os.geteuid() + 4242
    with pytest.raises(UnsafeScratchFolder, match="owned by uid"):
        runnable_image(
            node.sif,
            apptainer=str(node.apptainer),
            records=node.records,
            uid=4242,
            owner=someone_else,
            scratch=node.scratch,
            fuse_device=node.no_fuse,
        )
    assert "owned by uid" in caplog.text
    assert node.unpacks() == 1


def test_copy_removed_by_scratch_cleaning_is_unpacked_again_quietly(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    first = node.runnable()
    shutil.rmtree(first.parent)
    second = node.runnable()
    assert second != first and second.is_dir()
    assert node.unpacks() == 2
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_unreadable_record_means_a_fresh_copy(node: Node) -> None:
    first = node.runnable()
    (record,) = node.records.glob("*.json")
    record.write_text("{not json")
    assert node.runnable() != first
    assert node.unpacks() == 2


def test_failed_unpack_leaves_nothing_and_says_why(node: Node) -> None:
    node.apptainer.write_text('#!/bin/sh\necho "FATAL: no space left" >&2\nexit 255\n')
    with pytest.raises(ImageBuildFailed, match="no space left"):
        node.runnable()
    assert list(node.scratch.iterdir()) == []
    assert list(node.records.glob("*.json")) == []


def test_missing_apptainer_is_a_build_failure_that_leaves_nothing(node: Node) -> None:
    node.apptainer.unlink()
    with pytest.raises(ImageBuildFailed, match="No such file"):
        node.runnable()
    assert list(node.scratch.iterdir()) == []
