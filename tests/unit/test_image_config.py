"""What an image runs: its recorded ENTRYPOINT, CMD and WORKDIR, and the argv Kubernetes
gives a container from them and the pod's `command` and `args`.

The SIF files are made here (tests.unit.fakes) with and without the `oci-config.json`
descriptor Apptainer writes for images built from Docker sources; the conversions Apptainer
does itself (docker-archive, sandbox) run for real in tests/e2e/test_pod_images.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pytest

from hpk.images import (
    NATIVE_IMAGE,
    ImageBuildFailed,
    ImageConfig,
    InvalidImageFile,
    config_file,
    image_config,
    import_image,
    list_images,
    remove_image,
    sandbox_config,
    sif_config,
    source_kind,
)
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.command import container_argv
from kubelet_py.pod.render import RenderSettings, render_pod
from tests.unit.fakes import sif_bytes

ENTRYPOINT = ImageConfig(
    oci=True, entrypoint=("/ep", "-x"), cmd=("c1", "c2"), working_dir="/w", homes=()
)
CMD_ONLY = ImageConfig(oci=True, cmd=("sh",), homes=())
ENTRYPOINT_ONLY = ImageConfig(oci=True, entrypoint=("/ep",), homes=())
NEITHER = ImageConfig(oci=True, homes=())


@pytest.mark.parametrize(
    ("config", "command", "args", "expected"),
    [
        # ENTRYPOINT and CMD
        (ENTRYPOINT, [], [], ("exec", ["/ep", "-x", "c1", "c2"])),
        (ENTRYPOINT, [], ["a"], ("exec", ["/ep", "-x", "a"])),
        (ENTRYPOINT, ["/cmd"], [], ("exec", ["/cmd"])),
        (ENTRYPOINT, ["/cmd"], ["a"], ("exec", ["/cmd", "a"])),
        # CMD only (busybox, python)
        (CMD_ONLY, [], [], ("exec", ["sh"])),
        (CMD_ONLY, [], ["echo", "hi"], ("exec", ["echo", "hi"])),
        (CMD_ONLY, ["/cmd"], [], ("exec", ["/cmd"])),
        (CMD_ONLY, ["/cmd"], ["a"], ("exec", ["/cmd", "a"])),
        # ENTRYPOINT only
        (ENTRYPOINT_ONLY, [], [], ("exec", ["/ep"])),
        (ENTRYPOINT_ONLY, [], ["a"], ("exec", ["/ep", "a"])),
        (ENTRYPOINT_ONLY, ["/cmd"], ["a"], ("exec", ["/cmd", "a"])),
        # neither: only a command runs
        (NEITHER, [], [], ("exec", [])),
        (NEITHER, [], ["a"], ("exec", ["a"])),
        (NEITHER, ["/cmd"], [], ("exec", ["/cmd"])),
        # a native SIF: its runscript gets args, unless the pod gives a command
        (NATIVE_IMAGE, [], [], ("run", [])),
        (NATIVE_IMAGE, [], ["a"], ("run", ["a"])),
        (NATIVE_IMAGE, ["/cmd"], [], ("exec", ["/cmd"])),
        (NATIVE_IMAGE, ["/cmd"], ["a"], ("exec", ["/cmd", "a"])),
    ],
)
def test_argv_follows_docker(
    config: ImageConfig, command: list[str], args: list[str], expected: tuple[str, list[str]]
) -> None:
    assert container_argv(command=command, args=args, config=config) == expected


def pod(container: dict[str, object]) -> dict[str, object]:
    return {
        "metadata": {"namespace": "default", "name": "p", "uid": "u-1"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "hpk.test/ep:1", **container}],
        },
    }


def render(container: dict[str, object], config: ImageConfig) -> str:
    settings = RenderSettings(
        pod_dir=PurePosixPath("/pods/p"),
        apptainer=PurePosixPath("/bin/apptainer"),
        images={"hpk.test/ep:1": PurePosixPath("/cache/ep.sif")},
        image_configs={"hpk.test/ep:1": config},
    )
    return render_pod(pod(container), settings).script


def test_rendered_script_execs_entrypoint_with_args_in_the_image_workdir() -> None:
    script = render({"args": ["a b"]}, ENTRYPOINT)
    assert "--quiet exec " in script
    assert "/cache/ep.sif /ep -x 'a b' &" in script
    assert "--pwd /w" in script
    assert "c1" not in script  # args replace CMD


def test_pod_working_dir_wins_over_the_image_workdir() -> None:
    assert "--pwd /here" in render({"workingDir": "/here"}, ENTRYPOINT)


def test_native_image_runs_its_runscript_with_args() -> None:
    script = render({"args": ["a"]}, NATIVE_IMAGE)
    assert "--quiet run " in script
    assert "/cache/ep.sif a &" in script
    assert "--pwd / " in script


def test_image_with_nothing_to_run_needs_a_command() -> None:
    with pytest.raises(InvalidPodSpec) as caught:
        render({}, NEITHER)
    assert caught.value.field == "spec.containers[0].command"
    assert "no ENTRYPOINT or CMD" in str(caught.value)


# --- reading the metadata -------------------------------------------------------------------


def test_sif_config_reads_the_oci_config_descriptor(tmp_path: Path) -> None:
    sif = tmp_path / "ep.sif"
    sif.write_bytes(
        sif_bytes({"Entrypoint": ["/ep"], "Cmd": ["c"], "WorkingDir": "/w", "Env": ["A=1"]})
    )
    assert sif_config(sif) == ImageConfig(
        oci=True, entrypoint=("/ep",), cmd=("c",), working_dir="/w", homes=()
    )


def test_sif_config_with_null_entrypoint_and_cmd(tmp_path: Path) -> None:
    sif = tmp_path / "x.sif"
    sif.write_bytes(sif_bytes({"Entrypoint": None, "Cmd": None}))
    assert sif_config(sif) == NEITHER


def test_sif_without_oci_config_is_native(tmp_path: Path) -> None:
    sif = tmp_path / "native.sif"
    sif.write_bytes(sif_bytes())
    assert sif_config(sif) == NATIVE_IMAGE


def test_unreadable_oci_config_is_an_invalid_image(tmp_path: Path) -> None:
    sif = tmp_path / "bad.sif"
    sif.write_bytes(sif_bytes({"Entrypoint": "not a list"}))
    with pytest.raises(InvalidImageFile, match="Entrypoint is not a list of strings"):
        sif_config(sif)


def test_sandbox_config_from_apptainers_runscript(tmp_path: Path) -> None:
    runscript = tmp_path / ".singularity.d" / "runscript"
    runscript.parent.mkdir()
    # Written by Apptainer 1.4.3 for Entrypoint ["/bin/sh", "-c", <ENTRYPOINT[2] below>] and
    # Cmd ["default", "a b", "it's"].
    runscript.write_text(
        "#!/bin/sh\n"
        + r"""OCI_ENTRYPOINT='"/bin/sh" "-c" "echo \"\$* \`x\` \\\\\""'"""
        + "\n"
        + r"""OCI_CMD='"default" "a b" "it'"'"'s"'"""
        + "\n"
        + 'if [ -z "$OCI_CMD" ]; then\n'
    )
    assert sandbox_config(tmp_path) == ImageConfig(
        oci=True,
        entrypoint=("/bin/sh", "-c", r'echo "$* `x` \\"'),
        cmd=("default", "a b", "it's"),
        homes=(),
    )


def test_sandbox_from_a_definition_file_is_native(tmp_path: Path) -> None:
    (tmp_path / ".singularity.d").mkdir()
    (tmp_path / ".singularity.d" / "runscript").write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
    assert sandbox_config(tmp_path) == NATIVE_IMAGE
    assert sandbox_config(tmp_path / "missing") == NATIVE_IMAGE


# --- importing ------------------------------------------------------------------------------


def docker_archive(path: Path) -> Path:
    with tarfile.open(path, "w") as archive:
        data = json.dumps([{"Config": "c.json", "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


def test_source_kinds(tmp_path: Path) -> None:
    (tmp_path / "a.sif").write_bytes(sif_bytes())
    assert source_kind(tmp_path / "a.sif") == "sif"
    assert source_kind(tmp_path) == "sandbox"
    assert source_kind(docker_archive(tmp_path / "a.tar")) == "docker-archive"
    with tarfile.open(tmp_path / "other.tar", "w"):
        pass
    with pytest.raises(InvalidImageFile, match="nor is it a sandbox folder or a docker-archive"):
        source_kind(tmp_path / "other.tar")


class FakeBuild:
    """The command runner of `apptainer build`: writes `sif` where Apptainer would."""

    def __init__(self, sif: bytes | None) -> None:
        self.sif = sif
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        if self.sif is None:
            return 255, "INFO:    Starting build...\nFATAL:   Unable to build: no such image\n"
        Path(argv[-2]).write_bytes(self.sif)
        return 0, ""


def test_import_of_a_docker_archive_builds_and_records_its_config(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "ep.tar")
    build = FakeBuild(sif_bytes({"Entrypoint": ["/ep"], "Cmd": ["c"]}))
    cache = tmp_path / "cache"
    target = import_image("hpk.test/ep:1", archive, cache_dir=cache, apptainer="/a", runner=build)
    (call,) = build.calls
    assert call[:4] == ["/a", "--quiet", "build", "--force"]
    assert call[-1] == f"docker-archive:{archive}"
    assert target == cache / "hpk.test/ep/1.sif"
    recorded = json.loads(config_file(target).read_text())
    assert recorded == {
        "oci": True, "entrypoint": ["/ep"], "cmd": ["c"], "workingDir": "", "homes": {}
    }  # fmt: skip
    assert image_config(target).entrypoint == ("/ep",)
    assert [image.reference for image in list_images(cache)] == ["hpk.test/ep:1"]
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".part")] == []
    remove_image("hpk.test/ep:1", cache_dir=cache)
    assert not config_file(target).exists()


def test_import_of_an_apptainer_sandbox_takes_its_runscripts_words(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    (sandbox / ".singularity.d").mkdir(parents=True)
    (sandbox / ".singularity.d" / "runscript").write_text("OCI_CMD='\"python3\"'\n")
    build = FakeBuild(sif_bytes())  # a SIF built from a sandbox keeps no OCI config
    cache = tmp_path / "cache"
    target = import_image("py:3", sandbox, cache_dir=cache, apptainer="/a", runner=build)
    assert build.calls[0][-1] == str(sandbox)
    assert image_config(target) == ImageConfig(oci=True, cmd=("python3",), homes=())


def test_failed_build_names_apptainers_error_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ImageBuildFailed, match="FATAL: Unable to build: no such image"):
        import_image(
            "x:1", docker_archive(tmp_path / "x.tar"), cache_dir=cache, apptainer="/a",
            runner=FakeBuild(None),
        )  # fmt: skip
    assert [p.name for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"] == []


def test_entry_without_a_record_reads_the_sif(tmp_path: Path) -> None:
    sif = tmp_path / "old.sif"
    sif.write_bytes(sif_bytes({"Cmd": ["sh"]}))
    assert image_config(sif) == CMD_ONLY
    sif.write_bytes(b"garbage")
    assert image_config(sif) == NATIVE_IMAGE


def test_an_image_word_no_process_can_receive_is_refused() -> None:
    with pytest.raises(InvalidPodSpec) as caught:
        render({}, ImageConfig(oci=True, cmd=("echo", "a\0b")))
    assert caught.value.field == "spec.containers[0].image"
