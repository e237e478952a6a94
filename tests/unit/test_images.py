"""The image cache: reference normalization, the cache layout, imports and their lock."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import tarfile
import threading
from pathlib import Path

import pytest

from hpk.docker_archive import write_docker_archive
from hpk.images import (
    InvalidImageFile,
    InvalidImageReference,
    cached_image,
    check_sif,
    image_lock,
    image_path,
    import_image,
    import_made_image,
    list_images,
    normalize_reference,
)
from hpk.images_cli import add_images_commands
from hpk.paths import container_dir
from hpk.testbed.images import (
    TEST_IMAGES,
    built_images_dir,
    busybox_entries,
    recipe_oci_config,
    recipes_dir,
)

DIGEST = "sha256:" + "0123456789abcdef" * 4


def write_sif(path: Path, payload: bytes = b"squashfs" * 64) -> Path:
    """A minimal file with a SIF global header whose data region is `payload`."""
    header = struct.pack(
        "<32s10s3s3s16s8q",
        b"#!/usr/bin/env run-singularity\n",
        b"SIF_MAGIC\x00",
        b"01\x00",
        b"02\x00",
        bytes(16),
        0,  # created
        0,  # modified
        0,  # free descriptors
        0,  # total descriptors
        128,  # descriptors offset
        0,  # descriptors size
        128,  # data offset
        len(payload),
    )
    path.write_bytes(header + payload)
    return path


@pytest.mark.parametrize(
    ("reference", "normalized"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("user/app:1", "docker.io/user/app:1"),
        ("quay.io/argoproj/argoexec:v3.6.5", "quay.io/argoproj/argoexec:v3.6.5"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        ("localhost/x:dev", "localhost/x:dev"),
        ("registry.example.org:443/a/b/c:Tag_1.0-rc", "registry.example.org:443/a/b/c:Tag_1.0-rc"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"busybox:1.36@{DIGEST}", f"docker.io/library/busybox:1.36@{DIGEST}"),
        (f"localhost:5000/x@{DIGEST}", f"localhost:5000/x@{DIGEST}"),
        ("docker://alpine:3.19", "docker.io/library/alpine:3.19"),
        ("docker://ghcr.io/o/r", "ghcr.io/o/r:latest"),
        ("a__b/c-d--e.f_g", "docker.io/a__b/c-d--e.f_g:latest"),
        # Docker reads a bare "name:port" as a name and a tag.
        ("localhost:5000", "docker.io/library/localhost:5000"),
    ],
)
def test_normalize_reference(reference: str, normalized: str) -> None:
    assert normalize_reference(reference) == normalized
    assert normalize_reference(normalized) == normalized


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("", "empty"),
        ("docker://", "empty"),
        ("Busybox", "must be lowercase"),
        ("user/App:1", "must be lowercase"),
        ("quay.io/Argoproj/argoexec", "must be lowercase"),
        ("busybox:", "tag ''"),
        ("busybox:-x", "tag '-x'"),
        ("busybox:.x", "tag '.x'"),
        ("busybox:a+b", "tag 'a+b'"),
        ("busybox:" + "t" * 129, "1 to 128"),
        ("busybox@sha256:abc", "64 lowercase hex"),
        ("busybox@sha256:" + "A" * 64, "64 lowercase hex"),
        ("busybox@md5:" + "a" * 32, "algorithm one of"),
        ("busybox@", "algorithm one of"),
        ("a//b", "empty part"),
        ("a/b/", "empty part"),
        ("-a/b", "component '-a'"),
        ("a/b_", "component 'b_'"),
        ("a/../b", "component '..'"),
        ("a b", "whitespace"),
        ("shub://a/b", "only docker://"),
        ("my_host:5000/x", "registry 'my_host:5000'"),
        ("host-.example.com/x", "registry 'host-.example.com'"),
        ("x/" + "a" * 260, "longer than 255"),
    ],
)
def test_malformed_references_are_rejected(reference: str, problem: str) -> None:
    with pytest.raises(InvalidImageReference) as caught:
        normalize_reference(reference)
    message = str(caught.value)
    assert repr(reference) in message
    assert problem in message
    assert caught.value.reference == reference


def test_readable_cache_paths(tmp_path: Path) -> None:
    def path(reference: str) -> str:
        return image_path(reference, cache_dir=tmp_path).relative_to(tmp_path).as_posix()

    assert path("busybox") == "docker.io/library/busybox/latest.sif"
    assert path("quay.io/argoproj/argoexec:v3.6.5") == "quay.io/argoproj/argoexec/v3.6.5.sif"
    assert path("localhost:5000/x:1") == "localhost_5000/x/1.sif"
    assert path(f"busybox@{DIGEST}") == f"docker.io/library/busybox/@{DIGEST.replace(':', '-')}.sif"
    assert (
        path(f"busybox:1@{DIGEST}") == f"docker.io/library/busybox/1@{DIGEST.replace(':', '-')}.sif"
    )


#: References whose naive mappings would collide or shadow one another.
TRICKY = [
    "a/b:c",
    "a/b/c",
    "a/b/c:latest",
    "a/b:c.sif",
    "a/b/c.sif",
    "a/b/c.sif:x",
    "a/b:latest",
    "a/b/latest",
    "localhost:5000/x",
    "localhost_5000/x",
    "localhost/x",
    "localhost:5001/x",
    f"a/b@{DIGEST}",
    f"a/b:latest@{DIGEST}",
    "a/b:sha256-" + DIGEST.split(":")[1],
    "docker.io/library/a",
    "docker.io/a/library",
    "registry.io/a:b",
    "registry.io/a/b",
]


def test_tricky_references_map_to_distinct_coexisting_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    paths = {normalize_reference(ref): image_path(ref, cache_dir=cache) for ref in TRICKY}
    assert len(set(paths.values())) == len(paths), "two references share one file"
    for path in paths.values():
        assert ".." not in path.parts
        assert path.is_relative_to(cache)
        # No image's file may be a folder on another image's path.
        assert not any(path in other.parents for other in paths.values())

    source = write_sif(tmp_path / "image.sif")
    for reference in TRICKY:
        import_image(reference, source, cache_dir=cache)
    listed = {image.reference: image.path for image in list_images(cache)}
    assert listed == paths


def test_cached_image_finds_only_imported_images(tmp_path: Path) -> None:
    source = write_sif(tmp_path / "image.sif")
    assert cached_image("busybox", cache_dir=tmp_path / "cache") is None
    target = import_image("busybox", source, cache_dir=tmp_path / "cache")
    assert cached_image("docker.io/library/busybox:latest", cache_dir=tmp_path / "cache") == target
    assert cached_image("busybox:1.36", cache_dir=tmp_path / "cache") is None
    assert target.read_bytes() == source.read_bytes()


def test_cache_folder_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_sif(tmp_path / "image.sif")
    monkeypatch.delenv("HPK_IMAGE_CACHE", raising=False)
    monkeypatch.setenv("HPK_HOME", str(tmp_path / "home"))
    target = import_image("busybox", source)
    assert target == tmp_path / "home/images/docker.io/library/busybox/latest.sif"
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700

    monkeypatch.setenv("HPK_IMAGE_CACHE", str(tmp_path / "shared"))
    assert cached_image("busybox") is None
    assert import_image("busybox", source).is_relative_to(tmp_path / "shared")


def test_cache_is_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    source = write_sif(tmp_path / "image.sif")
    old = os.umask(0o077)
    try:
        target = import_image("quay.io/a/b:1", source, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    folders = [tmp_path / "cache", *(p for p in (tmp_path / "cache").rglob("*") if p.is_dir())]
    assert len(folders) == 4
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def leftovers(cache: Path) -> list[str]:
    """Files in the cache other than lock files."""
    return sorted(
        p.relative_to(cache).as_posix()
        for p in cache.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"FROM busybox\nRUN true\n" * 10, "no SIF magic at byte 32"),
        (b"#!/usr/bin/env run-singularity\n", "fewer than the 128-byte SIF header"),
        (b"", "it has 0 bytes"),
    ],
)
def test_import_rejects_a_file_that_is_not_sif(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    bogus = tmp_path / "bogus.sif"
    bogus.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(InvalidImageFile) as caught:
        import_image("busybox", bogus, cache_dir=cache)
    assert str(bogus) in str(caught.value)
    assert problem in str(caught.value)
    assert cached_image("busybox", cache_dir=cache) is None
    assert not cache.exists() or leftovers(cache) == []


def test_import_rejects_a_truncated_sif(tmp_path: Path) -> None:
    whole = write_sif(tmp_path / "whole.sif")
    cut = tmp_path / "cut.sif"
    cut.write_bytes(whole.read_bytes()[:-10])
    check_sif(whole)
    with pytest.raises(InvalidImageFile, match="truncated"):
        import_image("busybox", cut, cache_dir=tmp_path / "cache")
    assert leftovers(tmp_path / "cache") == []


def test_import_of_a_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageFile, match="cannot read it"):
        import_image("busybox", tmp_path / "absent.sif", cache_dir=tmp_path / "cache")


def test_a_failed_reimport_keeps_the_cached_image(tmp_path: Path) -> None:
    good = write_sif(tmp_path / "good.sif")
    cache = tmp_path / "cache"
    target = import_image("busybox", good, cache_dir=cache)
    (tmp_path / "bad.sif").write_text("not an image")
    with pytest.raises(InvalidImageFile):
        import_image("busybox", tmp_path / "bad.sif", cache_dir=cache)
    assert target.read_bytes() == good.read_bytes()


def test_concurrent_imports_of_one_reference_leave_one_valid_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sources = [
        write_sif(tmp_path / f"image-{n}.sif", payload=bytes([n]) * (1 << 20)) for n in range(8)
    ]
    start = threading.Barrier(len(sources))
    results: list[Path] = []
    errors: list[BaseException] = []

    def run(source: Path) -> None:
        try:
            start.wait()
            results.append(import_image("busybox:1.36", source, cache_dir=cache))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(set(results)) == 1
    target = results[0]
    check_sif(target)
    assert target.read_bytes() in [source.read_bytes() for source in sources]
    assert leftovers(cache) == [
        "docker.io/library/busybox/.1.36.sif.config.json",  # its ENTRYPOINT and CMD: none
        "docker.io/library/busybox/1.36.sif",
    ]


def test_import_waits_for_the_entry_lock(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = write_sif(tmp_path / "image.sif")
    finished = threading.Event()

    def importer() -> None:
        import_image("busybox", source, cache_dir=cache)
        finished.set()

    with image_lock("docker.io/library/busybox:latest", cache_dir=cache) as target:
        thread = threading.Thread(target=importer)
        thread.start()
        assert not finished.wait(0.5), "the import did not wait for the lock"
        assert not target.exists()
        # Another image is not held up by this lock.
        import_image("busybox:other", source, cache_dir=cache)
    thread.join(timeout=30)
    assert finished.is_set()
    assert cached_image("busybox", cache_dir=cache) == target


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpk")
    add_images_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_import_and_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HPK_IMAGE_CACHE", str(tmp_path / "cache"))
    source = write_sif(tmp_path / "image.sif")
    assert run_cli(["images", "list"]) == 0
    assert "no images" in capsys.readouterr().out

    assert run_cli(["images", "import", "python:3.11", str(source)]) == 0
    assert run_cli(["images", "import", "docker://localhost:5000/x", str(source)]) == 0
    capsys.readouterr()
    assert run_cli(["images", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REFERENCE", "SIZE", "PATH", "RUNS"]
    assert [line.split()[0] for line in lines[1:]] == [
        "docker.io/library/python:3.11",
        "localhost:5000/x:latest",
    ]
    assert str(tmp_path / "cache/docker.io/library/python/3.11.sif") in lines[1]
    assert lines[1].endswith("  runscript"), "a SIF without OCI metadata runs its runscript"


def test_cli_rm_removes_named_images_and_reports_missing_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HPK_IMAGE_CACHE", str(tmp_path / "cache"))
    source = write_sif(tmp_path / "image.sif")
    for reference in ("busybox", "python:3.11"):
        assert run_cli(["images", "import", reference, str(source)]) == 0
    capsys.readouterr()
    assert run_cli(["images", "rm", "docker.io/library/busybox:latest", "alpine"]) == 1
    out, err = capsys.readouterr()
    assert "removed docker.io/library/busybox:latest" in out
    assert err.strip() == "hpk: no cached image for docker.io/library/alpine:latest"
    assert cached_image("busybox") is None
    assert cached_image("python:3.11") is not None, "only what was named is removed"
    assert run_cli(["images", "rm", "busybox"]) == 1, "a second removal finds nothing"


def test_cli_reports_errors_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HPK_IMAGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "notes.txt").write_text("hello")
    assert run_cli(["images", "import", "busybox", str(tmp_path / "notes.txt")]) == 1
    assert run_cli(["images", "import", "Busybox", str(tmp_path / "notes.txt")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("hpk: ") and "notes.txt is not a usable SIF image" in errors[0]
    assert "invalid image reference 'Busybox'" in errors[1]


def test_test_image_folder_is_keyed_by_the_recipes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(container_dir(), tmp_path / "container")
    monkeypatch.setenv("HPK_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("HPK_TOOLS_DIR", str(tmp_path / "tools"))
    before = built_images_dir()
    assert before.parent == tmp_path / "tools"
    assert built_images_dir() == before
    recipes = {image.recipe for image in TEST_IMAGES if image.recipe}
    assert recipes <= {path.name for path in recipes_dir().iterdir()}

    recipe = recipes_dir() / TEST_IMAGES[0].recipe
    recipe.write_text(recipe.read_text() + "\n# changed\n")
    assert built_images_dir() != before


def test_recipes_carry_docker_hubs_cmd() -> None:
    assert recipe_oci_config(recipes_dir() / "busybox.def") == {"Cmd": ["sh"]}
    assert recipe_oci_config(recipes_dir() / "python-3.11.def") == {"Cmd": ["python3"]}


def test_docker_archive_is_a_docker_save_tarball(tmp_path: Path) -> None:
    config = {"Entrypoint": ["/bin/echo"], "Cmd": ["hi"]}
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    for path in (first, second):
        write_docker_archive(path, entries=busybox_entries(), config=config, tags=["hpk.test/x:1"])
    assert first.read_bytes() == second.read_bytes(), "deterministic"
    with tarfile.open(first) as archive:
        (manifest,) = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        image = json.loads(archive.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
        (layer_name,) = manifest["Layers"]
        layer = archive.extractfile(layer_name).read()  # type: ignore[union-attr]
    assert manifest["RepoTags"] == ["hpk.test/x:1"]
    assert image["config"] == config
    assert image["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as files:
        names = files.getnames()
    assert "bin/busybox" in names
    assert "bin/sh" in names


def test_a_made_image_the_cache_holds_is_not_made_again(tmp_path: Path) -> None:
    cached = image_path("localhost/tool:1", cache_dir=tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"sif")
    made: list[Path] = []
    found = import_made_image("localhost/tool:1", made.append, cache_dir=tmp_path)
    assert found == cached
    assert made == []
